"""Axiomatic checks of attributions: integrated gradients' completeness (the attributions sum
to f(x) - f(baseline); Sundararajan et al. 2017, Proposition 1).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.attr._core import (
    ApplyFn,
    attribution_inputs,
    completeness_error,
    per_target_scored,
    resolve_baseline,
)


def ig_completeness_error(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    baseline: Any = None,
    blur_sigma: float = 5.0,
    eps: float = 1e-9,
) -> jax.Array:
    """Relative completeness error of a path attribution.

    err_b = |sum_i A_bi - (f(x_b) - f(x'_b))| / max(|f(x_b) - f(x'_b)|, eps),   f = logit_target.

    Args:
      apply_fn: pure x -> logits [batch, classes]. x: [batch, ...].
      attribution: like x for [batch] targets ([batch, K, ...] for [batch, K] targets).
      target: [batch] or [batch, K] class indices.
      baseline, blur_sigma: the baseline x' (as `integrated_gradients`). eps: floor of the denominator.
    Returns:
      [batch] (or [batch, K]).
    Reference: Sundararajan et al. 2017 (the completeness axiom).
    """
    x, target, c = attribution_inputs(apply_fn, x, target)
    base = resolve_baseline(x, baseline, blur_sigma=blur_sigma)

    def score(v, a, t):
        if a.shape != v.shape:
            raise ValueError(f"attribution must have the shape of x {tuple(v.shape)} (one map per target); "
                             f"got {tuple(a.shape)}")
        return completeness_error(apply_fn, v, base, t, a, eps)

    return per_target_scored(score, x, jnp.asarray(attribution), target, c)
