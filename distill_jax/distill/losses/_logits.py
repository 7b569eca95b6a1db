"""Losses on logits: cross entropy, soft cross entropy, Hinton KD (Hinton et al. 2015), the
distillation loss, defensive distillation (Papernot et al. 2016) and logit matching (Ba & Caruana 2014).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.distill.losses._common import (
    _check_floating,
    _check_logits,
    _check_rank,
    _check_same_shape,
    _check_temperature,
    _concrete_scalar,
    _fail,
)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross entropy of integer labels under softmax(logits), per example.

    Formula: ``CE_b = -log softmax(z_b)[y_b] = logsumexp(z_b) - z_b[y_b]``.

    Labels outside ``[0, classes)`` cannot be checked at trace time; their value is
    unspecified (the caller's data loader guarantees the range).

    Args:
      logits: ``[batch, classes]`` floating.
      labels: ``[batch]`` integer class indices.

    Returns:
      ``[batch]`` non-negative losses.

    Reference: any textbook; computed with ``log_softmax`` so it is finite for any
    finite logits.
    """
    fn = "cross_entropy"
    _check_logits(fn, "logits", logits)
    _check_rank(fn, "labels", labels, (1,), "[batch] integer class indices")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise _fail(
            fn, f"labels has dtype {jnp.result_type(labels)}; expected an integer dtype "
            "(use soft_cross_entropy for probability targets)"
        )
    if jnp.shape(labels)[0] != jnp.shape(logits)[0]:
        raise _fail(
            fn,
            f"labels has shape {tuple(jnp.shape(labels))} but logits has shape "
            f"{tuple(jnp.shape(logits))}; expected labels [batch] with the logits' batch",
        )
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_p, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Cross entropy of a target distribution under softmax(logits), per example.

    Formula: ``H_b = -sum_c q_bc * log softmax(z_b)_c``.

    Args:
      logits: ``[batch, classes]`` floating.
      target_probs: ``[batch, classes]``, rows non-negative and summing to 1.

    Returns:
      ``[batch]`` losses (>= the entropy of the target).

    Reference: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
    Network", soft-target objective.
    """
    fn = "soft_cross_entropy"
    _check_logits(fn, "logits", logits)
    _check_floating(fn, "target_probs", target_probs)
    _check_same_shape(fn, "logits", logits, "target_probs", target_probs, "[batch, classes]")
    return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _kd(student_logits: jax.Array, teacher_logits: jax.Array, temperature) -> jax.Array:
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    p_t = jnp.exp(log_p_t)
    # Direct form. exp(log_p_t) underflows to exactly 0 for hopeless classes; 0 * finite = 0.
    kl_direct = jnp.sum(p_t * (log_p_t - log_p_s), axis=-1)
    # Near-shift form, for rows where d = (t - s) / T spans less than 1: with d' = d - max(d),
    #   KL = sum_c p_t,c d'_c - log(sum_c p_s,c exp(d'_c))
    #      = sum_c p_t,c d'_c - log1p(sum_c p_s,c expm1(d'_c)).
    # Its rounding error scales with |d'| rather than with |log p| (the direct form loses
    # about 3 digits in float32 at T = 100, where KL is O(1e-4) but log p is O(1)), and it
    # is exactly 0 when d is constant. d' <= 0, so expm1 never overflows; the range bound
    # keeps the log1p argument above e^-1 - 1.
    d = (teacher_logits - student_logits) / temperature
    d = d - jax.lax.stop_gradient(jnp.max(d, axis=-1, keepdims=True))  # KL is shift invariant
    near = jnp.min(d, axis=-1) > -1.0
    d_safe = jnp.where(near[:, None], d, 0.0)  # keeps the unused branch's gradient finite
    kl_near = jnp.sum(p_t * d_safe, axis=-1) - jnp.log1p(
        jnp.sum(jnp.exp(log_p_s) * jnp.expm1(d_safe), axis=-1)
    )
    kl = jnp.where(near, kl_near, kl_direct)
    return temperature**2 * kl


def _check_logit_pair(fn: str, student_logits, teacher_logits, temperature) -> None:
    """Student and teacher logits [batch, classes] of one shape, and a temperature T > 0."""
    _check_logits(fn, "student_logits", student_logits)
    _check_logits(fn, "teacher_logits", teacher_logits)
    _check_same_shape(fn, "student_logits", student_logits, "teacher_logits", teacher_logits, "[batch, classes]")
    _check_temperature(fn, temperature)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature) -> jax.Array:
    """Knowledge-distillation loss: temperature-softened KL from teacher to student.

    Formula: ``T^2 * KL(p_t || p_s)`` with ``p_t = softmax(t / T)``, ``p_s = softmax(s / T)``,
    i.e. ``T^2 * sum_c p_t,c * (log p_t,c - log p_s,c)``. Its gradient with respect to the
    student logits is ``T * (p_s - p_t)``; the ``T^2`` factor keeps gradient magnitudes
    comparable across temperatures (Hinton et al. 2015, section 2).

    The value is 0 exactly when ``s - t`` is constant within each example (softmax is
    shift invariant) and positive otherwise. Computed from ``log_softmax`` of both
    sides, so it stays finite for ``|logits|`` up to 1e4 and ``T`` in [0.5, 100] in
    float32 (no ``exp`` of an unshifted logit anywhere). Rows whose scaled logit
    difference ``(t - s) / T`` spans less than 1 use the algebraically equal form
    ``sum p_t d - log1p(sum p_s expm1(d))`` (``d`` shifted to max 0), which keeps float32
    accuracy at high ``T``, where KL is tiny next to ``log p``. The value is not clipped
    at 0 (rounding may leave about ``-1e-7 |d|``), so the gradient stays exact.

    Args:
      student_logits: ``[batch, classes]`` floating.
      teacher_logits: ``[batch, classes]`` floating (the caller stops its gradient).
      temperature: scalar ``T > 0`` (keyword-only). A traced value is not checked.

    Returns:
      ``[batch]`` losses.

    Reference: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
    Network", arXiv:1503.02531.
    """
    fn = "kd_loss"
    _check_logit_pair(fn, student_logits, teacher_logits, temperature)
    return _kd(student_logits, teacher_logits, temperature)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature,
    alpha,
) -> jax.Array:
    """Hinton's combined objective: soft teacher targets plus hard labels.

    Formula: ``alpha * kd_loss(s, t; T) + (1 - alpha) * cross_entropy(s, y)``; the
    cross entropy uses the student logits at temperature 1.

    Args:
      student_logits: ``[batch, classes]`` floating.
      teacher_logits: ``[batch, classes]`` floating.
      labels: ``[batch]`` integer class indices.
      temperature: scalar ``T > 0`` (keyword-only).
      alpha: scalar weight in ``[0, 1]`` of the KD term (keyword-only). Traced values
        of ``temperature`` / ``alpha`` are not checked.

    Returns:
      ``[batch]`` losses.

    Reference: Hinton, Vinyals & Dean (2015), arXiv:1503.02531, section 2.
    """
    fn = "distillation_loss"
    _check_logit_pair(fn, student_logits, teacher_logits, temperature)
    a = _concrete_scalar(fn, "alpha", alpha)
    if a is not None and not (0.0 <= a <= 1.0):
        raise _fail(
            fn, f"alpha={a!r}; expected a value in [0, 1] (weight of the KD term; "
            "1 - alpha weighs the label cross entropy)"
        )
    ce = cross_entropy(student_logits, labels)
    return alpha * _kd(student_logits, teacher_logits, temperature) + (1.0 - alpha) * ce


def defensive_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature) -> jax.Array:
    """Defensive distillation: cross entropy of the teacher's softmax at ``T`` under the student's softmax at ``T``.

    Formula: ``L_b = -sum_c softmax(t_b / T)_c * log softmax(s_b / T)_c``, per example, with no
    ``T^2`` factor (Papernot et al. train the distilled network on this objective as it is; its
    gradient with respect to the student logits is ``(softmax(s / T) - softmax(t / T)) / T``, zero
    exactly when ``s - t`` is constant within the example). The minimum over ``s`` is the entropy
    ``H(softmax(t / T))``, not 0: this is a cross entropy, not ``kd_loss``'s KL.

    The student is trained at temperature ``T`` and used at ``T = 1``: its logits are left as they
    are, so they come out about ``T`` times larger than those of a network trained at ``T = 1``
    (they had to reach the teacher's softened distribution after the division by ``T``). At
    ``T = 1`` its softmax is then nearly one-hot and its cross-entropy gradient with respect to the
    input nearly 0, which is why gradient attacks (FGSM, PGD) find little to follow: the defence
    masks gradients rather than removing adversarial examples (Carlini & Wagner 2016,
    "Defensive Distillation is Not Robust to Adversarial Examples").

    Args:
      student_logits: ``[batch, classes]`` floating.
      teacher_logits: ``[batch, classes]`` floating (the caller stops its gradient).
      temperature: scalar ``T > 0`` (keyword-only); Papernot et al. used ``T`` from 20 to 100.

    Returns:
      ``[batch]`` losses (>= the entropy of ``softmax(t / T)``).

    Reference: Papernot, McDaniel, Wu, Jha & Swami (2016), "Distillation as a Defense to
    Adversarial Perturbations against Deep Neural Networks", IEEE S&P, section IV.
    """
    fn = "defensive_distillation_loss"
    _check_logit_pair(fn, student_logits, teacher_logits, temperature)
    return soft_cross_entropy(student_logits / temperature, jax.nn.softmax(teacher_logits / temperature, axis=-1))


def logit_matching_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Mean squared error between student and teacher logits, per example.

    Formula: ``(1 / C) * sum_c (s_c - t_c)^2``. (Ba & Caruana regress the logits with
    ``(1 / 2) * sum_c``; the mean only rescales the learning rate.)

    Args:
      student_logits: ``[batch, classes]`` floating.
      teacher_logits: ``[batch, classes]`` floating.

    Returns:
      ``[batch]`` losses.

    Reference: Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?", NeurIPS.
    """
    fn = "logit_matching_loss"
    _check_logits(fn, "student_logits", student_logits)
    _check_logits(fn, "teacher_logits", teacher_logits)
    _check_same_shape(
        fn, "student_logits", student_logits, "teacher_logits", teacher_logits,
        "[batch, classes]",
    )
    return jnp.mean(jnp.square(student_logits - teacher_logits), axis=-1)
