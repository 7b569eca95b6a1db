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

import jax
import jax.numpy as jnp

# Norms below this are treated as this (keeps normalisation of an all-zero map finite,
# with a finite gradient). Same role as the eps of torch.nn.functional.normalize.
_NORM_EPS = 1e-12


# Routing averages of the balance penalty are clipped to [eps, 1 - eps].
_BALANCE_EPS = 1e-6


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
