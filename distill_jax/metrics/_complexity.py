"""Complexity of an attribution map: sparseness (Gini index), complexity (entropy of the
fractional contributions) and discrete entropy of a histogram (Quantus's "complexity" category).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import compilation
from distill_jax._checks import check_int, check_number
from distill_jax.metrics._robustness import _check_attribution_batch


# --------------------------------------------------------------------------------------------
# Complexity (read the attribution only: no apply_fn, no x)
# --------------------------------------------------------------------------------------------
def sparseness(attribution: jax.Array, *, eps: float = 0.0) -> jax.Array:
    """Sparseness of an attribution: the Gini index of its absolute values.

    G_b = sum_{i=1..n} (2i - n - 1) a_(i) / (n sum_i a_i),  a = |A_b| + eps flattened, sorted ascending.
    0 for a uniform map, 1 - 1/n for a one-hot map; defined as 0 for a zero map (no mass to be
    concentrated; Quantus reaches the same value through its eps). Takes the attribution only: the
    score is a property of the map, so there is no apply_fn and no x.
    Quantus `Sparseness` (abs=True) adds eps = 1e-7 to every value and normalises the batch by its
    max |value| first; pass eps=1e-7 and max-normalised maps to reproduce it to the last digit
    (without eps the two differ by O(1e-7 n / sum a)).

    Args:
      attribution: [batch, ...] (any shape after the batch axis; flattened per example).
      eps: >= 0 added to every |value| (0: the exact Gini index).
    Returns:
      [batch] in [0, 1 - 1/n] (higher = sparser).
    Reference: Chalasani et al. 2020, "Concise Explanations of Neural Networks using Adversarial
    Training" (ICML).
    """
    return _gini(_check_attribution_batch(attribution), check_number(eps, "eps", low=0))


# The array metrics' cores are jitted (validation stays outside) so that eager calls compile once
# per shape instead of once per operation; inside a caller's jit they are inlined.
@compilation.run_once(static_argnames="eps")
def _gini(a: jax.Array, eps: float) -> jax.Array:
    a = jnp.sort(jnp.abs(a) + eps, axis=1)
    n = a.shape[1]
    weights = jnp.asarray(2 * np.arange(1, n + 1) - n - 1, a.dtype)
    total = a.sum(axis=1)
    gini = (a @ weights) / (n * jnp.where(total > 0, total, 1.0))
    return jnp.where(total > 0, gini, 0.0)


def _entropy(p: jax.Array) -> jax.Array:
    """-sum_i p_i log p_i over axis 1 with 0 log 0 = 0."""
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)


def complexity(attribution: jax.Array) -> jax.Array:
    """Complexity of an attribution: the entropy of its normalised absolute values.

    C_b = -sum_i p_i ln p_i,  p_i = |A_bi| / sum_j |A_bj|  (0 ln 0 = 0).
    log n for a uniform map, 0 for a one-hot map; defined as 0 for a zero map (Quantus gives NaN
    there). Takes the attribution only: the score is a property of the map, so there is no
    apply_fn and no x. Quantus `Complexity` computes p_i ln(p_i + 1e-12), a difference of at most
    n * 1e-12.

    Args:
      attribution: [batch, ...] (flattened per example).
    Returns:
      [batch] in [0, log n] (lower = simpler).
    Reference: Bhatt, Weller & Moura 2020, "Evaluating and Aggregating Feature-based Model
    Explanations" (IJCAI).
    """
    return _abs_entropy(_check_attribution_batch(attribution))


@compilation.run_once
def _abs_entropy(a: jax.Array) -> jax.Array:
    a = jnp.abs(a)
    total = a.sum(axis=1, keepdims=True)
    return _entropy(a / jnp.where(total > 0, total, 1.0))


def _histogram_bins(v: jax.Array, n_bins: int) -> jax.Array:
    """np.histogram's bin of every value of the 1-D v (n_bins equal bins over [min v, max v], last bin closed)."""
    lo, hi = v.min(), v.max()
    width = jnp.where(hi > lo, hi - lo, 1.0)
    idx = jnp.clip(jnp.floor((v - lo) / width * n_bins).astype(jnp.int32), 0, n_bins - 1)
    edges = lo + (hi - lo) * (jnp.arange(n_bins + 1, dtype=v.dtype) / n_bins)
    # numpy's own correction of values that round across an edge
    idx = idx - (v < edges[idx])
    idx = idx + ((v >= edges[idx + 1]) & (idx != n_bins - 1))
    return jnp.where(hi > lo, idx, 0)


def discrete_entropy(attribution: jax.Array, *, n_bins: int = 100) -> jax.Array:
    """Entropy of the histogram of an attribution's values (n_bins equal bins from its min to its max).

    H_b = -sum_k q_k ln q_k,  q_k = #{i : A_bi in bin k} / n  (0 for a constant map).
    As Quantus' `discrete_entropy` (np.histogram(a, bins=n_bins) then scipy.stats.entropy), the
    complexity measure of eMPRT. Signed values are binned as they are (no absolute value).

    Args:
      attribution: [batch, ...] (flattened per example). n_bins: >= 1.
    Returns:
      [batch] in [0, log min(n, n_bins)].
    Reference: Hedström et al. 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
    Parameter Randomisation Test" (XAI in Action workshop, NeurIPS).
    """
    return _histogram_entropy(_check_attribution_batch(attribution), check_int(n_bins, "n_bins"))


@partial(jax.jit, static_argnames="n_bins")
def _histogram_entropy(a: jax.Array, n_bins: int) -> jax.Array:
    bins = jax.vmap(lambda v: _histogram_bins(v, n_bins))(a)
    counts = jax.vmap(lambda b: jnp.bincount(b, length=n_bins))(bins)
    return _entropy(counts.astype(a.dtype) / a.shape[1])
