"""Feature scaling as fit-on-train + apply pairs: standardization ("min-std") and min-max scaling.

A scaler is a pytree (`flax.struct.dataclass`) holding statistics shaped like one example with the reduced
axes kept as size 1, so `apply` broadcasts over the batch; jit it, checkpoint it. Features with zero variance
(or zero range) are mapped to 0 instead of dividing by zero.

Reference: scikit-learn's StandardScaler / MinMaxScaler (same formulas, same zero-variance rule).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "Standardizer",
    "MinMaxScaler",
    "standardize_fit",
    "minmax_fit",
    "apply",
    "invert",
]


# A spread at or below this multiple of float32 eps times the feature's magnitude is rounding noise: treat it as 0.
_TINY = 10.0 * float(np.finfo(np.float32).eps)


@struct.dataclass
class Standardizer:
    """``(x - mean) / std``; mean/std have the example's shape with reduced axes of size 1 (std 1 where var = 0)."""

    mean: jax.Array
    std: jax.Array


@struct.dataclass
class MinMaxScaler:
    """``(x - min) / (max - min)``; ``scale = max - min`` is 1 where the range is 0."""

    min: jax.Array
    scale: jax.Array


def _reduce_axes(x, axis) -> tuple[int, ...]:
    """Axes to reduce over: default all but the last (per channel for NHWC, per feature for [n, d])."""
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have at least one example along axis 0, got shape {tuple(x.shape)}")
    if axis is None:
        axes = tuple(range(max(x.ndim - 1, 1)))
    else:
        axes = tuple(sorted({a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}))
    if 0 not in axes:
        raise ValueError(f"axis={axis} must include the batch axis 0 for x of shape {tuple(x.shape)}")
    return axes


def _as_array(x):
    """``x`` as it is if it is an array (numpy, jax or a tracer), else ``np.asarray(x)``: host data goes to the
    device as an argument of the jitted fit (``jnp.asarray`` on a numpy array would compile a program of its own)."""
    return x if hasattr(x, "ndim") and hasattr(x, "dtype") else np.asarray(x)


def _to_float(x) -> jax.Array:
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _check_finite(finite, x, name: str = "x") -> None:
    """Raises unless ``finite`` (``isfinite(x).all()`` from the fit's program) holds; traced values pass."""
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        raise ValueError(f"{name} has NaN or inf values (shape {tuple(x.shape)}); clean them before scaling")


def _stats_shape(x, axes) -> tuple[int, ...]:
    return tuple(1 if a in axes else s for a, s in enumerate(x.shape))[1:]


def _safe(spread, centre):
    """``spread``, with values at rounding-noise level (<= _TINY * |centre|, or exactly 0) replaced by 1."""
    return jnp.where(spread > _TINY * jnp.abs(centre), spread, 1.0)


def standardize_fit(x, *, axis=None) -> Standardizer:
    """Fits a standardizer: per channel by default, per feature with ``axis=0``.

    ``mean = E[x]``, ``std = sqrt(E[(x - mean)^2])`` over ``axis`` (two-pass, ddof=0); zero-variance entries get
    std 1, so they map to 0. One compiled program per input shape and ``axis`` (the NaN/inf check included;
    it runs only outside jit).

    Args:
      x: [n, ...] training data (e.g. NHWC images [n, h, w, c] or features [n, d]).
      axis: axes to reduce over, must include 0. Default: every axis but the last (per channel for NHWC);
        ``axis=0`` gives per-feature (per-pixel) statistics.

    Returns:
      Standardizer with mean/std of shape x.shape[1:] with the reduced axes set to 1.
    """
    x = _as_array(x)
    scaler, finite = _standardize_fit(x, _reduce_axes(x, axis))
    _check_finite(finite, x)
    return scaler


@functools.partial(jax.jit, static_argnums=1)
def _standardize_fit(x, axes):
    x = _to_float(x)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    std = jnp.sqrt(jnp.mean((x - mean) ** 2, axis=axes, keepdims=True))
    return Standardizer(mean=mean[0], std=_safe(std, mean)[0]), jnp.isfinite(x).all()


def minmax_fit(x, *, axis=None) -> MinMaxScaler:
    """Fits min-max scaling to [0, 1]: ``(x - min) / (max - min)`` over ``axis`` (defaults as `standardize_fit`).

    Args:
      x: [n, ...] training data.
      axis: axes to reduce over, must include 0.

    Returns:
      MinMaxScaler with min/scale of shape x.shape[1:] with the reduced axes set to 1 (scale 1 where max == min).
    """
    x = _as_array(x)
    scaler, finite = _minmax_fit(x, _reduce_axes(x, axis))
    _check_finite(finite, x)
    return scaler


@functools.partial(jax.jit, static_argnums=1)
def _minmax_fit(x, axes):
    x = _to_float(x)
    lo = jnp.min(x, axis=axes, keepdims=True)
    hi = jnp.max(x, axis=axes, keepdims=True)
    scaler = MinMaxScaler(min=lo[0], scale=_safe(hi - lo, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))[0])
    return scaler, jnp.isfinite(x).all()


def _check_apply(stat, x, name: str):
    if x.ndim != stat.ndim + 1 or any(s != 1 and s != t for s, t in zip(stat.shape, x.shape[1:])):
        raise ValueError(f"{name} of shape {tuple(x.shape)} does not match the scaler's statistics of shape "
                         f"{tuple(stat.shape)} (fitted on [n, {', '.join(map(str, stat.shape))}]-like data)")


_APPLY: dict[type, Callable] = {
    Standardizer: lambda s, x: (x - s.mean) / s.std,
    MinMaxScaler: lambda s, x: (x - s.min) / s.scale,
}


_INVERT: dict[type, Callable] = {
    Standardizer: lambda s, x: x * s.std + s.mean,
    MinMaxScaler: lambda s, x: x * s.scale + s.min,
}


def _dispatch(table, scaler, x, what: str):
    fn = table.get(type(scaler))
    if fn is None:
        raise ValueError(f"scaler must be one of {[t.__name__ for t in table]}, got {type(scaler).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    _check_apply(jax.tree_util.tree_leaves(scaler)[0], x, what)
    return fn(scaler, x)


@jax.jit
def apply(scaler, x) -> jax.Array:
    """Scales ``x`` with a fitted scaler (dispatch on its type): Standardizer ``(x - mean) / std``,
    MinMaxScaler ``(x - min) / scale``.

    Args:
      scaler: Standardizer or MinMaxScaler fitted on [n, *s] data.
      x: [m, *s] (reduced axes may have any size).

    Returns:
      [m, *s] scaled.
    """
    return _dispatch(_APPLY, scaler, x, "x")


@jax.jit
def invert(scaler, x) -> jax.Array:
    """Undoes `apply`: Standardizer ``x * std + mean``, MinMaxScaler ``x * scale + min``.

    Args:
      scaler: the fitted scaler.
      x: [m, *s] scaled data.

    Returns:
      [m, *s] in the original units.
    """
    return _dispatch(_INVERT, scaler, x, "x")
