"""Checks of scalar hyper-parameters shared by the library: one argument order,
`check_*(name, value, ...)`, each raising `ValueError` with a message that names the argument.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def _number(name: str, value) -> float | None:
    """The Python float of a scalar hyper-parameter, or None when it is traced (then unchecked)."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {tuple(jnp.shape(value))}")
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_nonnegative(name: str, value) -> float | None:
    v = _number(name, value)
    if v is not None and not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be >= 0; got {v!r}")
    return v


def _check_positive(name: str, value) -> float:
    v = _number(name, value)
    if v is None or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be > 0; got {value!r}")
    return v


def _check_delta(delta) -> float:
    d = _number("delta", delta)
    if d is None or not 0 < d < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")
    return d


def _check_count(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)
