"""Per-example losses for the three families of distillation.

Loss-based (the student imitates the teacher's outputs):
  ``cross_entropy``, ``soft_cross_entropy``, ``kd_loss``, ``distillation_loss``,
  ``defensive_distillation_loss``, ``logit_matching_loss``.
Model-based (the student imitates the teacher's internals, or has a readable form):
  ``hint_loss`` (FitNets), ``soft_tree_loss``, ``soft_tree_kd_loss`` and ``tree_balance_penalty``
  (soft decision trees).
Mask-based (the student imitates where the teacher looks):
  ``attention_map``, ``attention_transfer_loss``, ``input_saliency``,
  ``saliency_matching_loss``.

Argument order: the library's one convention (``distill_jax.attribution_core``'s docstring), i.e.
``kd_loss(student_logits, teacher_logits)`` with labels last.
Every loss returns one value per example (``[batch]``) and the caller reduces;
the one exception is ``tree_balance_penalty``, which is a batch-level scalar by
definition. Hyper-parameters are keyword-only. Shapes, dtypes and concrete
hyper-parameter values are checked at trace time; a bad input raises a
``ValueError`` naming the function, the argument, the shapes and what is allowed.

These functions are pure: nothing here applies ``stop_gradient`` to teacher
outputs. The train step does that (the teacher runs under ``stop_gradient``).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "cross_entropy",
    "soft_cross_entropy",
    "kd_loss",
    "distillation_loss",
    "defensive_distillation_loss",
    "logit_matching_loss",
    "hint_loss",
    "soft_tree_loss",
    "soft_tree_kd_loss",
    "tree_balance_penalty",
    "attention_map",
    "attention_transfer_loss",
    "input_saliency",
    "saliency_matching_loss",
]

# Norms below this are treated as this (keeps normalisation of an all-zero map finite,
# with a finite gradient). Same role as the eps of torch.nn.functional.normalize.
_NORM_EPS = 1e-12
# Routing averages of the balance penalty are clipped to [eps, 1 - eps].
_BALANCE_EPS = 1e-6


# --------------------------------------------------------------------------- checks


def _fail(fn: str, message: str) -> ValueError:
    return ValueError(f"{fn}: {message}")


def _check_rank(fn: str, name: str, x, ranks: tuple[int, ...], layout: str) -> None:
    if jnp.ndim(x) not in ranks:
        raise _fail(
            fn,
            f"{name} has shape {tuple(jnp.shape(x))} (rank {jnp.ndim(x)}); expected {layout}",
        )


def _check_floating(fn: str, name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise _fail(
            fn,
            f"{name} has dtype {jnp.result_type(x)}; expected a floating dtype "
            "(float32 or float64)",
        )


def _check_same_shape(fn: str, name_a: str, a, name_b: str, b, layout: str) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise _fail(
            fn,
            f"{name_a} has shape {tuple(jnp.shape(a))} but {name_b} has shape "
            f"{tuple(jnp.shape(b))}; they must be equal ({layout} each)",
        )


def _check_logits(fn: str, name: str, x) -> None:
    _check_rank(fn, name, x, (2,), "[batch, classes]")
    _check_floating(fn, name, x)


def _concrete_scalar(fn: str, name: str, value) -> float | None:
    """The Python float of a hyper-parameter, or None when it is traced (then unchecked)."""
    if jnp.ndim(value) != 0:
        raise _fail(fn, f"{name} has shape {tuple(jnp.shape(value))}; expected a scalar")
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_temperature(fn: str, temperature) -> None:
    t = _concrete_scalar(fn, "temperature", temperature)
    if t is not None and not (math.isfinite(t) and t > 0):
        raise _fail(
            fn,
            f"temperature={t!r}; expected a finite value > 0 "
            "(stable for T in [0.5, 100]; T=1 is the plain softmax)",
        )


# --------------------------------------------------------------------------- helpers


def _l2_normalize(v: jax.Array) -> jax.Array:
    """v / max(||v||_2, eps) over the last axis; finite value and gradient at v = 0."""
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    return v * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def _average_pool(x: jax.Array, h: int, w: int) -> jax.Array:
    """Average-pool axes 1, 2 of x [batch, H, W, ...] to [batch, h, w, ...] (h | H, w | W)."""
    b, big_h, big_w = x.shape[:3]
    rest = x.shape[3:]
    if (big_h, big_w) == (h, w):
        return x
    x = x.reshape((b, h, big_h // h, w, big_w // w) + rest)
    return x.mean(axis=(2, 4))


def _common_grid(fn: str, name_a: str, a_shape, name_b: str, b_shape) -> tuple[int, int]:
    """The smaller grid per axis; each input's grid must be an integer multiple of it."""
    h = min(a_shape[1], b_shape[1])
    w = min(a_shape[2], b_shape[2])
    for shape in (a_shape, b_shape):
        if shape[1] % h or shape[2] % w:
            raise _fail(
                fn,
                f"{name_a} has shape {tuple(a_shape)} and {name_b} has shape "
                f"{tuple(b_shape)}; their spatial grids cannot be matched by average "
                f"pooling to {h}x{w}: the larger height and width must each be an "
                "integer multiple of the smaller",
            )
    return h, w


# --------------------------------------------------------------------------- loss-based


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


# --------------------------------------------------------------------------- model-based


def hint_loss(student_regressed: jax.Array, teacher_feature: jax.Array) -> jax.Array:
    """FitNets hint loss: mean squared error of a regressed student feature to a teacher feature.

    Formula: ``(1 / (h w C)) * ||pool(r(s)) - pool(t)||_2^2`` per example, where ``r`` is
    the learned regressor (it lives in ``models.py`` and has already been applied, so
    the channel counts match) and ``pool`` average-pools whichever grid is larger, per
    axis, down to the smaller ``h x w`` grid (identity when the grids agree). For
    vector features ``[batch, D]`` it is ``(1 / D) * ||r(s) - t||^2``.

    Args:
      student_regressed: ``[batch, H1, W1, C]`` or ``[batch, D]`` floating.
      teacher_feature: ``[batch, H2, W2, C]`` or ``[batch, D]`` floating, same rank;
        each of ``max(H1, H2) / min(H1, H2)`` and ``max(W1, W2) / min(W1, W2)`` must be
        an integer.

    Returns:
      ``[batch]`` losses.

    Reference: Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", ICLR.
    """
    fn = "hint_loss"
    for name, x in (("student_regressed", student_regressed), ("teacher_feature", teacher_feature)):
        _check_rank(fn, name, x, (2, 4), "[batch, H, W, C] or [batch, D]")
        _check_floating(fn, name, x)
    s_shape, t_shape = jnp.shape(student_regressed), jnp.shape(teacher_feature)
    if len(s_shape) != len(t_shape):
        raise _fail(
            fn,
            f"student_regressed has shape {tuple(s_shape)} but teacher_feature has shape "
            f"{tuple(t_shape)}; expected the same rank ([batch, H, W, C] or [batch, D] each)",
        )
    if s_shape[0] != t_shape[0] or s_shape[-1] != t_shape[-1]:
        raise _fail(
            fn,
            f"student_regressed has shape {tuple(s_shape)} but teacher_feature has shape "
            f"{tuple(t_shape)}; batch and channel (last) sizes must be equal (apply the "
            "student's hint regressor to map its channels to the teacher's)",
        )
    if len(s_shape) == 4:
        h, w = _common_grid(fn, "student_regressed", s_shape, "teacher_feature", t_shape)
        student_regressed = _average_pool(student_regressed, h, w)
        teacher_feature = _average_pool(teacher_feature, h, w)
    diff = student_regressed - teacher_feature
    return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def soft_tree_loss(
    path_probs: jax.Array, leaf_logits: jax.Array, target_probs: jax.Array
) -> jax.Array:
    """Soft decision tree objective: path-weighted cross entropy of the leaf distributions.

    Formula: ``L_b = -sum_l P_l(x_b) * sum_c T_bc * log Q_lc`` with
    ``Q_l = softmax(leaf_logits_l)`` the class distribution held by leaf ``l``,
    ``P_l(x)`` the probability of reaching leaf ``l`` (product of the routing
    probabilities along its path; see ``models.SoftDecisionTree``), and ``T`` the
    target distribution (one-hot labels or the teacher's soft targets).

    Args:
      path_probs: ``[batch, leaves]``, rows non-negative and summing to 1.
      leaf_logits: ``[leaves, classes]`` floating.
      target_probs: ``[batch, classes]``, rows non-negative and summing to 1.

    Returns:
      ``[batch]`` losses.

    Reference: Frosst & Hinton (2017), "Distilling a Neural Network Into a Soft
    Decision Tree", arXiv:1711.09784, equation 2.
    """
    fn = "soft_tree_loss"
    _check_rank(fn, "path_probs", path_probs, (2,), "[batch, leaves]")
    _check_rank(fn, "leaf_logits", leaf_logits, (2,), "[leaves, classes]")
    _check_rank(fn, "target_probs", target_probs, (2,), "[batch, classes]")
    for name, x in (("path_probs", path_probs), ("leaf_logits", leaf_logits),
                    ("target_probs", target_probs)):
        _check_floating(fn, name, x)
    (b, n_leaves), (l2, c), (b2, c2) = (
        jnp.shape(path_probs), jnp.shape(leaf_logits), jnp.shape(target_probs)
    )
    if n_leaves != l2:
        raise _fail(
            fn, f"path_probs has shape {(b, n_leaves)} but leaf_logits has shape {(l2, c)}; "
            "expected path_probs [batch, leaves] and leaf_logits [leaves, classes] with the "
            "same number of leaves"
        )
    if (b, c) != (b2, c2):
        raise _fail(
            fn, f"target_probs has shape {(b2, c2)} but path_probs has shape {(b, n_leaves)} "
            f"and leaf_logits has shape {(l2, c)}; expected target_probs [batch, classes] = "
            f"{(b, c)}"
        )
    log_q = jax.nn.log_softmax(leaf_logits, axis=-1)  # [L, C]
    ce_per_leaf = -target_probs @ log_q.T  # [B, L]: CE(T_b, Q_l)
    return jnp.sum(path_probs * ce_per_leaf, axis=-1)


def soft_tree_kd_loss(
    path_probs: jax.Array, leaf_logits: jax.Array, teacher_logits: jax.Array, *, temperature
) -> jax.Array:
    """Hinton KD for a soft decision tree: both sides softened by ``T``, leaves read at ``T = 1``.

    Formula: ``T^2 * sum_l P_l(x) * KL(p_t || softmax(leaf_logits_l / T))`` with
    ``p_t = softmax(teacher_logits / T)``; equal to
    ``T^2 * (soft_tree_loss(P, leaf_logits / T, p_t) - H(p_t))``, the Frosst & Hinton
    path-weighted leaf cross entropy minus the target entropy (which has no gradient), so the
    value is 0 when every reachable leaf holds the teacher's distribution. Dividing the leaf
    logits by ``T`` here, as ``kd_loss`` divides a network's logits, lets the leaves become as
    sharp as the teacher when read at ``T = 1``; matching ``softmax(leaf_logits)`` to ``p_t``
    directly would leave them softened by ``T`` at test time.

    Args:
      path_probs: ``[batch, leaves]``, rows non-negative and summing to 1.
      leaf_logits: ``[leaves, classes]`` floating.
      teacher_logits: ``[batch, classes]`` floating (the caller stops its gradient).
      temperature: scalar ``T > 0`` (keyword-only).

    Returns:
      ``[batch]`` losses.

    References: Hinton, Vinyals & Dean (2015), arXiv:1503.02531, section 2; Frosst & Hinton
    (2017), arXiv:1711.09784, equation 2.
    """
    fn = "soft_tree_kd_loss"
    _check_logits(fn, "teacher_logits", teacher_logits)
    _check_temperature(fn, temperature)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_t = jnp.exp(log_p_t)
    entropy = -jnp.sum(p_t * log_p_t, axis=-1)
    cross = soft_tree_loss(path_probs, leaf_logits / temperature, p_t)
    return temperature**2 * (cross - entropy)


def tree_balance_penalty(node_reach: jax.Array, routing: jax.Array, *, strength) -> jax.Array:
    """Soft decision tree balance penalty (a batch-level scalar, not per example).

    Encourages every inner node to send half of the data that reaches it each way.
    Inner nodes are in breadth-first order: node ``i`` has children ``2i+1`` (left) and
    ``2i+2`` (right) and depth ``d(i) = floor(log2(i + 1))``.

    Formula::

        a_i = sum_x P^i(x) p_i(x) / sum_x P^i(x)          (sums over the batch)
        penalty = sum_i strength * 2^-d(i) * -1/2 * (log a_i + log(1 - a_i))

    ``1 - a_i`` is computed as ``sum_x P^i(x) (1 - p_i(x)) / sum_x P^i(x)`` (accurate when
    ``a_i`` is near 1), and ``a_i`` and ``1 - a_i`` are each clipped to ``>= 1e-6`` so the
    penalty stays finite; a node no example reaches (``sum_x P^i(x) = 0``) counts as
    balanced (``a_i = 1/2``). The minimum,
    reached when every ``a_i = 1/2``, is ``strength * log 2 * sum_i 2^-d(i)``.

    Args:
      node_reach: ``[batch, inner_nodes]``, ``P^i(x)`` = probability of reaching node i.
      routing: ``[batch, inner_nodes]``, ``p_i(x)`` = probability of going right at node i.
      strength: scalar ``lambda >= 0`` (keyword-only; the paper's lambda). A traced value
        is not checked.

    Returns:
      A scalar: the penalty for the whole batch (it depends on batch averages, so it
      does not decompose into per-example terms).

    Reference: Frosst & Hinton (2017), "Distilling a Neural Network Into a Soft
    Decision Tree", arXiv:1711.09784, section 4.1.
    """
    fn = "tree_balance_penalty"
    _check_rank(fn, "node_reach", node_reach, (2,), "[batch, inner_nodes]")
    _check_rank(fn, "routing", routing, (2,), "[batch, inner_nodes]")
    _check_floating(fn, "node_reach", node_reach)
    _check_floating(fn, "routing", routing)
    _check_same_shape(fn, "node_reach", node_reach, "routing", routing, "[batch, inner_nodes]")
    lam = _concrete_scalar(fn, "strength", strength)
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        raise _fail(fn, f"strength={lam!r}; expected a finite value >= 0")
    n_inner = jnp.shape(routing)[1]
    # depth(i) = floor(log2(i + 1)), computed exactly on integers:
    depth = jnp.asarray(
        [(i + 1).bit_length() - 1 for i in range(n_inner)], dtype=jnp.result_type(routing)
    )
    den = jnp.sum(node_reach, axis=0)
    reached = den > 0
    safe_den = jnp.where(reached, den, 1.0)
    # a_i and 1 - a_i each from their own sum: 1 - a_i stays accurate when a_i is near 1.
    right = jnp.where(reached, jnp.sum(node_reach * routing, axis=0) / safe_den, 0.5)
    left = jnp.where(reached, jnp.sum(node_reach * (1.0 - routing), axis=0) / safe_den, 0.5)
    right = jnp.clip(right, _BALANCE_EPS, 1.0)
    left = jnp.clip(left, _BALANCE_EPS, 1.0)
    per_node = -0.5 * (jnp.log(right) + jnp.log(left))
    return strength * jnp.sum(jnp.exp2(-depth) * per_node)


# --------------------------------------------------------------------------- mask-based


def _attention_energy(features: jax.Array, p) -> jax.Array:
    """sum_c |A_c|^p on the native grid: [batch, H, W, C] -> [batch, H, W]."""
    return jnp.sum(jnp.abs(features) ** p, axis=-1)


def _check_p(fn: str, p) -> None:
    value = _concrete_scalar(fn, "p", p)
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise _fail(
            fn, f"p={value!r}; expected a finite exponent >= 1 (p < 1 gives an "
            "unbounded gradient at zero activations; the paper uses p = 2)"
        )


def attention_map(features: jax.Array, *, p=2) -> jax.Array:
    """Activation-based spatial attention map of one layer, flattened and L2-normalised.

    Formula: ``Q = vec(sum_c |A_c|^p)``, returned as ``Q / max(||Q||_2, 1e-12)`` (like
    ``torch.nn.functional.normalize``; an all-zero layer gives an all-zero map with a
    finite gradient).

    Args:
      features: ``[batch, H, W, C]`` floating activations.
      p: exponent ``>= 1`` (keyword-only; the paper's default is 2).

    Returns:
      ``[batch, H * W]``, each row of unit L2 norm (or zero).

    Reference: Zagoruyko & Komodakis (2017), "Paying More Attention to Attention",
    ICLR, section 3.1 (F^p_sum).
    """
    fn = "attention_map"
    _check_rank(fn, "features", features, (4,), "[batch, H, W, C]")
    _check_floating(fn, "features", features)
    _check_p(fn, p)
    energy = _attention_energy(features, p)
    return _l2_normalize(energy.reshape(energy.shape[0], -1))


def attention_transfer_loss(
    student_features: jax.Array, teacher_features: jax.Array, *, p=2
) -> jax.Array:
    """Attention transfer between one student layer and one teacher layer, per example.

    Formula: ``|| Q_s / ||Q_s|| - Q_t / ||Q_t|| ||_2^2`` with ``Q = vec(sum_c |A_c|^p)``.

    Choices (documented because the paper leaves them open):

    * Resolutions may differ: the un-normalised energy maps ``sum_c |A_c|^p`` are
      computed on each layer's own grid, then the larger is average-pooled (per axis) to
      the smaller grid, then both are normalised. Pooling the maps rather than the
      features keeps activation energy that pooling signed features would cancel.
      The larger height and width must each be integer multiples of the smaller.
    * Channel counts may differ (they are summed away).
    * The **squared** L2 distance is used (value in [0, 2] since both maps are
      non-negative unit vectors). The paper's equation writes the plain norm, whose
      gradient is undefined at a perfect match; its code,
      ``(at(x) - at(y)).pow(2).mean()``, is this loss divided by ``h * w`` and averaged
      over the batch (then weighted by ``beta / 2``).

    Args:
      student_features: ``[batch, H1, W1, C1]`` floating.
      teacher_features: ``[batch, H2, W2, C2]`` floating.
      p: exponent ``>= 1`` (keyword-only; paper default 2).

    Returns:
      ``[batch]`` losses.

    Reference: Zagoruyko & Komodakis (2017), "Paying More Attention to Attention",
    ICLR, equation 2; code at github.com/szagoruyko/attention-transfer.
    """
    fn = "attention_transfer_loss"
    for name, x in (("student_features", student_features), ("teacher_features", teacher_features)):
        _check_rank(fn, name, x, (4,), "[batch, H, W, C]")
        _check_floating(fn, name, x)
    s_shape, t_shape = jnp.shape(student_features), jnp.shape(teacher_features)
    if s_shape[0] != t_shape[0]:
        raise _fail(
            fn, f"student_features has shape {tuple(s_shape)} but teacher_features has shape "
            f"{tuple(t_shape)}; the batch sizes must be equal"
        )
    _check_p(fn, p)
    _common_grid(fn, "student_features", s_shape, "teacher_features", t_shape)
    return attention_transfer_from_maps(attention_energy_map(student_features, p=p),
                                        attention_energy_map(teacher_features, p=p))


def attention_energy_map(features: jax.Array, *, p=2) -> jax.Array:
    """One layer's attention energy on its own grid, scaled to unit L2 norm: what a teacher cache keeps.

    Formula: ``E = sum_c |A_c|^p`` (shape ``[batch, H, W]``), returned as ``E / max(||E||_2, 1e-12)``.
    Average pooling is linear, so pooling this map to a coarser grid and normalising again gives the
    same map as pooling ``E`` itself: a layer's ``[batch, H, W]`` map stands in for its
    ``[batch, H, W, C]`` features in `attention_transfer_from_maps` at a ``C``-th of the memory.

    Args:
      features: ``[batch, H, W, C]`` floating activations.
      p: exponent ``>= 1`` (keyword-only).

    Returns:
      ``[batch, H, W]``.
    """
    fn = "attention_energy_map"
    _check_rank(fn, "features", features, (4,), "[batch, H, W, C]")
    _check_floating(fn, "features", features)
    _check_p(fn, p)
    energy = _attention_energy(features, p)
    flat = _l2_normalize(energy.reshape(energy.shape[0], -1))
    return flat.reshape(energy.shape)


def attention_transfer_from_maps(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
    """Attention transfer between two energy maps (`attention_energy_map`), per example.

    Formula: ``|| P(S) / ||P(S)|| - P(T) / ||P(T)|| ||_2^2``, where ``P`` average-pools the finer map to
    the coarser grid (the identity on the coarser one). Equals `attention_transfer_loss` on the
    features the maps came from.

    Args:
      student_map: ``[batch, H1, W1]``; teacher_map: ``[batch, H2, W2]``; the larger height and width
        must each be integer multiples of the smaller.

    Returns:
      ``[batch]`` losses in [0, 2].
    """
    fn = "attention_transfer_from_maps"
    for name, m in (("student_map", student_map), ("teacher_map", teacher_map)):
        _check_rank(fn, name, m, (3,), "[batch, H, W]")
        _check_floating(fn, name, m)
    s_shape, t_shape = jnp.shape(student_map), jnp.shape(teacher_map)
    if s_shape[0] != t_shape[0]:
        raise _fail(fn, f"student_map has shape {tuple(s_shape)} but teacher_map has shape {tuple(t_shape)}; "
                        "the batch sizes must be equal")
    h, w = _common_grid(fn, "student_map", s_shape, "teacher_map", t_shape)
    maps = [_l2_normalize(_average_pool(m, h, w).reshape(m.shape[0], -1)) for m in (student_map, teacher_map)]
    return jnp.sum(jnp.square(maps[0] - maps[1]), axis=-1)


def _check_image_target(fn: str, x, target) -> None:
    _check_rank(fn, "x", x, (4,), "[batch, H, W, C] images")
    _check_floating(fn, "x", x)
    _check_rank(fn, "target", target, (1,), "[batch] integer class indices")
    if not jnp.issubdtype(jnp.result_type(target), jnp.integer):
        raise _fail(fn, f"target has dtype {jnp.result_type(target)}; expected an integer dtype")
    if jnp.shape(target)[0] != jnp.shape(x)[0]:
        raise _fail(
            fn, f"target has shape {tuple(jnp.shape(target))} but x has shape "
            f"{tuple(jnp.shape(x))}; expected target [batch] with the images' batch"
        )


def _target_logit_sum(fn: str, apply_fn: Callable, x: jax.Array, target: jax.Array) -> jax.Array:
    logits = apply_fn(x)
    if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != jnp.shape(x)[0]:
        raise _fail(
            fn, f"apply_fn(x) returned shape {tuple(jnp.shape(logits))} for x of shape "
            f"{tuple(jnp.shape(x))}; expected logits [batch, classes] = "
            f"[{jnp.shape(x)[0]}, classes]"
        )
    picked = jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=-1)
    return jnp.sum(picked)


def input_saliency(apply_fn: Callable, x: jax.Array, target: jax.Array) -> jax.Array:
    """Input-gradient saliency map of the target logit, summed over channels.

    Formula: ``S_b[h, w] = sum_c | d z_b[y_b] / d x_b[h, w, c] |``.

    Per-example gradients come from one ``jax.grad`` of ``sum_b z_b[y_b]``, which is
    exact when ``apply_fn`` treats examples independently (no batch statistics).

    Args:
      apply_fn: pure function ``x -> logits [batch, classes]`` (close over params).
      x: ``[batch, H, W, C]`` floating images.
      target: ``[batch]`` integer class whose logit is explained.

    Returns:
      ``[batch, H, W]`` non-negative saliency.

    Reference: Simonyan, Vedaldi & Zisserman (2014), "Deep Inside Convolutional
    Networks: Visualising Image Classification Models and Saliency Maps", ICLR
    workshop (they take the max over channels; the sum is used here).
    """
    fn = "input_saliency"
    _check_image_target(fn, x, target)
    grads = jax.grad(lambda xx: _target_logit_sum(fn, apply_fn, xx, target))(x)
    return jnp.sum(jnp.abs(grads), axis=-1)


def saliency_matching_loss(
    student_apply_fn: Callable, x: jax.Array, target: jax.Array, teacher_saliency: jax.Array
) -> jax.Array:
    """Make the student's input-gradient saliency map match the teacher's, per example.

    Formula: ``|| vec(S_s) / ||vec(S_s)|| - vec(S_t) / ||vec(S_t)|| ||_2^2`` with
    ``S_s = input_saliency(student_apply_fn, x, target)`` and ``S_t`` the given teacher
    map (normalisation as in ``attention_map``, so an all-zero map stays finite).
    Training through it differentiates a gradient (``jax.grad`` inside ``jax.grad``);
    the function is jit-able. With ReLU students the input gradient is piecewise
    constant in ``x`` but still differentiable in the parameters, so the loss trains;
    smooth activations (softplus, gelu, tanh) give a smoother objective.

    Args:
      student_apply_fn: pure function ``x -> logits [batch, classes]`` closing over the
        student's params (differentiate the enclosing function w.r.t. those params).
      x: ``[batch, H, W, C]`` floating images.
      target: ``[batch]`` integer class whose logit is explained.
      teacher_saliency: ``[batch, H, W]`` floating, e.g.
        ``input_saliency(teacher_apply_fn, x, target)`` under ``stop_gradient``.

    Returns:
      ``[batch]`` losses in [0, 2] (both maps are non-negative).

    Reference: in the spirit of Ross, Hughes & Doshi-Velez (2017), "Right for the Right
    Reasons" (input-gradient penalties) and Zagoruyko & Komodakis (2017) (matching
    normalised maps); the double-backprop technique is Drucker & Le Cun (1992).
    """
    fn = "saliency_matching_loss"
    _check_image_target(fn, x, target)
    _check_rank(fn, "teacher_saliency", teacher_saliency, (3,), "[batch, H, W]")
    _check_floating(fn, "teacher_saliency", teacher_saliency)
    if jnp.shape(teacher_saliency) != jnp.shape(x)[:3]:
        raise _fail(
            fn, f"teacher_saliency has shape {tuple(jnp.shape(teacher_saliency))} but x has "
            f"shape {tuple(jnp.shape(x))}; expected teacher_saliency [batch, H, W] = "
            f"{tuple(jnp.shape(x)[:3])} (use losses.input_saliency on the teacher)"
        )
    student_map = input_saliency(student_apply_fn, x, target)
    b = student_map.shape[0]
    q_s = _l2_normalize(student_map.reshape(b, -1))
    q_t = _l2_normalize(teacher_saliency.reshape(b, -1))
    return jnp.sum(jnp.square(q_s - q_t), axis=-1)
