"""Adversarial attacks on a pure `apply_fn(x) -> logits`: FGSM and PGD under an L-inf budget.

Used to evaluate robustness (`robust.adversarial_accuracy`, which re-exports both) and to train on
adversarial examples (`distill.adversarial_view`). Inputs are whatever the model reads (here:
standardized images); budgets are in those units.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax.attr._core import check_x, num_classes_of, validate_target
from distill_jax.metrics._fidelity import accuracy


def _check_attack(apply_fn, x, labels, epsilon):
    x = check_x(x)
    validate_target(labels, x.shape[0], num_classes_of(apply_fn, x), name="labels")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    return x, jnp.asarray(labels).astype(jnp.int32)


def _loss_grad(apply_fn, x, labels):
    def loss(v):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(apply_fn(v), labels))

    return jax.grad(loss)(x)


def _clip(x, clip):
    return x if clip is None else jnp.clip(x, clip[0], clip[1])


def fgsm(apply_fn: Callable, x: jax.Array, labels: jax.Array, *, epsilon: float, clip: tuple[float, float] | None = None) -> jax.Array:
    """Fast gradient sign attack (L-inf).

    x_adv = clip(x + epsilon * sign(d CE(f(x), y) / dx)).

    Args:
      x: [batch, ...]; labels: [batch]; epsilon: L-inf budget; clip: optional (lo, hi) valid input range.
    Returns:
      adversarial examples like x.
    Reference: Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing Adversarial Examples".
    """
    x, labels = _check_attack(apply_fn, x, labels, epsilon)
    return _clip(x + epsilon * jnp.sign(_loss_grad(apply_fn, x, labels)), clip)


def pgd(
    apply_fn: Callable,
    x: jax.Array,
    labels: jax.Array,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    key: jax.Array,
    clip: tuple[float, float] | None = None,
    random_start: bool = True,
) -> jax.Array:
    """Projected gradient descent attack (L-inf), on the cross-entropy.

    x_0 = x + U(-eps, eps) (random_start);  x_{t+1} = P_{B_inf(x, eps)}(clip(x_t + a sign(grad CE(x_t)))).

    Args:
      epsilon: budget; step_size: a; steps: >= 1 iterations (lax.fori_loop); key: for the random start.
    Returns:
      adversarial examples like x.
    Reference: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".
    """
    x, labels = _check_attack(apply_fn, x, labels, epsilon)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    start = x + (jax.random.uniform(key, x.shape, x.dtype, -epsilon, epsilon) if random_start else 0.0)
    start = _clip(start, clip)

    def body(_, v):
        v = v + step_size * jnp.sign(_loss_grad(apply_fn, v, labels))
        return _clip(jnp.clip(v, x - epsilon, x + epsilon), clip)

    return jax.lax.fori_loop(0, steps, body, start)


ATTACKS: dict[str, Callable] = {"fgsm": fgsm, "pgd": pgd}


def adversarial_accuracy(apply_fn: Callable, x: jax.Array, labels: jax.Array, *, attack: str = "fgsm", **attack_kw) -> jax.Array:
    """Accuracy on adversarial examples made by `ATTACKS[attack](apply_fn, x, labels, **attack_kw)`. Returns a scalar."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}; got {attack!r}")
    x_adv = ATTACKS[attack](apply_fn, x, labels, **attack_kw)
    return accuracy(apply_fn(x_adv), jnp.asarray(labels))
