"""Per-example statistics over flattened maps: average ranks, Pearson and Spearman correlation.

Each function takes [batch, ...] arrays and returns one value per example ([batch]); they are
shared by the agreement metrics (teacher vs student maps) and the faithfulness metrics.
They are jitted: called on host arrays each is one compiled program per input shape (op by op it was
about ten), and inside a traced function they are inlined like any jnp code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax import compilation


@compilation.run_once
def average_ranks(v: jax.Array) -> jax.Array:
    """Ranks 0..n-1 of a 1-D array, ties sharing their average rank."""
    s = jnp.sort(v)
    lo = jnp.searchsorted(s, v, side="left")
    hi = jnp.searchsorted(s, v, side="right")
    return (lo + hi - 1).astype(jnp.float32) / 2


def flat_pair(a, b, what):
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"{what}: a and b must have the same shape [batch, ...]; got {a.shape} and {b.shape}")
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


@compilation.run_once
def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-example Spearman rank correlation of two flattened maps (ties get average ranks).

    rho_b = pearson(rank(a_b), rank(b_b)); 0 when either map is constant.

    Args:
      a, b: [batch, ...] of the same shape.
    Returns:
      [batch] in [-1, 1].
    Reference: Spearman 1904; used for attribution agreement by Adebayo et al. 2018.
    """
    a, b = flat_pair(a, b, "spearman")
    return pearson(jax.vmap(average_ranks)(a), jax.vmap(average_ranks)(b))


@compilation.run_once
def pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-example Pearson correlation of two flattened arrays; 0 when either is constant.

    r_b = sum_i (a_bi - mean a_b)(b_bi - mean b_b) / sqrt(sum_i (a_bi - mean a_b)^2 sum_i (b_bi - mean b_b)^2)

    Args:
      a, b: [batch, ...] of the same shape.
    Returns:
      [batch] in [-1, 1].
    """
    a, b = flat_pair(a, b, "pearson")
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = jnp.sqrt(jnp.sum(a**2, 1) * jnp.sum(b**2, 1))
    return jnp.where(den > 0, jnp.sum(a * b, 1) / jnp.where(den > 0, den, 1.0), 0.0)
