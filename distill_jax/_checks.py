"""Checks of scalar arguments shared by the whole library, with one argument order: `check_*(value, name, ...)`.

Each returns the value as a Python number, or raises a `ValueError` whose one line names the argument, what
it must be and what it got (`"sigma must be > 0; got -2.0"`). Checks that accept a traced value (inside
`jax.jit`, where it cannot be inspected) say so and return None for it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_number", "concrete_float", "check_number", "check_int", "check_choice", "check_key"]


def is_number(value: Any) -> bool:
    """Whether `value` is a real Python or NumPy scalar number (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def concrete_float(value: Any, name: str) -> float | None:
    """The Python float of a scalar, or None when it is traced (its value is not known at trace time).

    Raises:
      ValueError: `value` is not a scalar.
    """
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got shape {tuple(jnp.shape(value))}")
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {low:g}"
    if math.isinf(low):
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(value: Any, name: str, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, traced_ok: bool = False) -> float | None:
    """`value` as a float, finite and within [low, high] (either end open when asked).

    With `traced_ok`, a traced scalar (inside `jax.jit`) passes unchecked and None is returned.
    """
    if traced_ok and not is_number(value):
        v = concrete_float(value, name)
        if v is None:
            return None
        value = v
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {_interval(low, high, low_open, high_open)}; got {value!r}")
    return float(value)


def check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (a bool or a float with an integer value is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_choice(value: Any, table: Mapping, name: str) -> Any:
    """The entry of `table` named by `value`."""
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}; got {value!r}")
    return table[value]


def check_key(key: Any, name: str = "key") -> jax.Array:
    """`key` as a jax array if it is one PRNG key, else a one-line ValueError naming `name`.

    One key: a typed key (`jax.random.key(seed)`, shape ()) or a raw uint32 key (`jax.random.PRNGKey(seed)`,
    shape [2] for the default threefry, [4] for "rbg"). Works on traced keys (only dtype and shape are read).
    """
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and jnp.ndim(key) == 0
    raw = dtype == jnp.uint32 and jnp.ndim(key) == 1
    if not (typed or raw):
        raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
                         f"got {type(key).__name__} with dtype {dtype} and shape {tuple(getattr(key, 'shape', ()))}")
    return jnp.asarray(key)
