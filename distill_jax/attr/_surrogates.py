"""Surrogate-model attributions: Kernel SHAP (Lundberg & Lee 2017) and LIME (Ribeiro et al. 2016)
over feature groups (patches or a segmentation).
"""
from __future__ import annotations

import functools
from math import comb
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax._checks import check_int, check_key, check_number
from distill_jax.attr._core import ApplyFn, resolve_baseline
from distill_jax.attr._perturbation import (
    _HIGHEST,
    MAX_EXACT_FEATURES,
    _as_pairs,
    _check_inputs,
    _coalition_scores,
    _finish,
    _scores,
    _spread,
    feature_ids,
)


# --------------------------------------------------------------------------------------------
# KernelSHAP
# --------------------------------------------------------------------------------------------
def _shapley_kernel(num_features: int) -> np.ndarray:
    """pi(s) = (M-1) / (C(M, s) s (M-s)) for coalition sizes s = 0..M (0 at s = 0 and s = M)."""
    m = num_features
    sizes = np.arange(1, m)
    weights = np.zeros(m + 1)
    weights[1:-1] = (m - 1) / (np.array([comb(m, int(k)) for k in sizes]) * sizes * (m - sizes))
    return weights


def kernel_shap_coalitions(key: jax.Array, samples: int, features: int) -> jax.Array:
    """Random coalitions drawn from the Shapley kernel (the ones `kernel_shap(..., key=key)` evaluates).

    P(|z| = s) ∝ C(M, s) pi(s) = (M-1) / (s (M-s)) for s = 1..M-1, then z uniform among the subsets of
    size s; so P(z) ∝ pi(z), and each drawn coalition gets regression weight 1.

    Args:
      key: PRNG key. samples: n >= 1. features: M >= 2.
    Returns:
      [n, M] float32 in {0, 1}, no row all zeros or all ones.
    Reference: Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions" (NeurIPS).
    """
    key = check_key(key)
    samples = check_int(samples, "samples")
    features = check_int(features, "features")
    if features < 2:
        raise ValueError(f"features must be >= 2 (coalitions other than empty and full); got {features}")
    return _draw_kernel_shap_coalitions(key, samples, features)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_kernel_shap_coalitions(key, samples: int, features: int) -> jax.Array:
    sizes = np.arange(1, features)
    size_cdf = np.cumsum(1.0 / (sizes * (features - sizes)))
    size_cdf = jnp.asarray(size_cdf / size_cdf[-1], jnp.float32)
    u = jax.random.uniform(key, (samples, features + 1))  # column 0 picks the size, the others the order
    size = 1 + jnp.minimum(jnp.searchsorted(size_cdf, u[:, 0], side="right"), features - 2)  # inverse CDF
    order = u[:, 1:]
    # the `size` smallest of M iid uniforms: a uniform subset of that size (ties have probability 0)
    threshold = jnp.take_along_axis(jnp.sort(order, axis=1), size[:, None], axis=1)
    return (order < threshold).astype(jnp.float32)


def _all_coalitions(num_features: int) -> tuple[jax.Array, jax.Array]:
    """Every coalition but the empty and the full one, [2^M - 2, M], with its Shapley kernel weight."""
    codes = jnp.arange(1, 2**num_features - 1, dtype=jnp.int32)
    z = ((codes[:, None] >> jnp.arange(num_features, dtype=jnp.int32)) & 1).astype(jnp.float32)
    weights = jnp.asarray(_shapley_kernel(num_features), jnp.float32)[z.sum(axis=1).astype(jnp.int32)]
    return z, weights


def _constrained_wls(z, w, y, total, ridge):
    """argmin_phi sum_i w_i (y_i - z_i . phi)^2 + ridge |phi|^2  subject to  sum_j phi_j = total.

    z [n, M], w [n], y [n, P] (one regression per column), total [P] -> phi [M, P]. The Lagrange
    condition A phi = b - mu 1 gives phi = A^-1 b - A^-1 1 (1' A^-1 b - total) / (1' A^-1 1).
    """
    zw = z * w[:, None]
    a = jnp.matmul(zw.T, z, precision=_HIGHEST) + ridge * jnp.eye(z.shape[1], dtype=z.dtype)
    b = jnp.matmul(zw.T, y, precision=_HIGHEST)
    uv = jnp.linalg.solve(a, jnp.concatenate([b, jnp.ones((z.shape[1], 1), z.dtype)], axis=1))
    u, v = uv[:, :-1], uv[:, -1:]
    return u - v * (jnp.sum(u, axis=0) - total) / jnp.sum(v)


def kernel_shap(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array | None = None,
    samples: int = 256,
    patch: int | tuple[int, int] = 4,
    baseline: Any = None,
    exact: bool = False,
    ridge: float = 1e-6,
    chunk: int | None = None,
) -> jax.Array:
    """KernelSHAP: Shapley values of the patches, by a Shapley-kernel weighted linear regression.

    phi = argmin sum_z pi(z) (f(h(z)) - f(x') - z . phi)^2 + ridge |phi|^2  s.t.  sum_j phi_j = f(x) - f(x'),
    pi(z) = (M-1) / (C(M, |z|) |z| (M - |z|)),   h(z) = x' + z[ids] * (x - x'),   f = logit_target,

    over the M patch features of `feature_ids` (x' the baseline). The empty and the full coalition
    (infinite kernel weight) are enforced exactly as constraints: phi_0 = f(x') and efficiency,
    sum_j phi_j = f(x) - f(x'), hold for any model. With `exact=True` all 2^M - 2 other coalitions are
    enumerated with weights pi(z), which gives the exact Shapley values of the game
    v(S) = f(h(1_S)) for any model; otherwise `samples` coalitions are drawn from pi
    (`kernel_shap_coalitions`) and weighted equally (the Monte Carlo estimate of the same objective,
    as the shap package and Captum do). The coalitions are shared by every example of the batch and
    every target. For a linear model both modes give (x - x') * w summed over each patch.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, H, W, C] images (features: patches) or [batch, d] (each element alone).
      target: [batch] or [batch, K] class indices.
      key: PRNG key for the coalitions (not needed with exact=True).
      samples: sampled coalitions n >= 1 (not used with exact=True). patch: int or (ph, pw).
      baseline: None (zeros), "zeros", "blur", a float, or an array like x or like one example.
      exact: enumerate every coalition (M <= MAX_EXACT_FEATURES; 2^M - 2 forward passes of the batch).
      ridge: >= 0, added to the diagonal of the normal equations (the weights sum to 1).
      chunk: coalitions per `lax.map` step (None: the backend default of `sample_chunk`).
    Returns:
      like x: every element carries its patch's Shapley value ([batch, K, ...] for [batch, K] targets).
    Reference: Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions" (NeurIPS).
    """
    x, target, c = _check_inputs(apply_fn, x, target, chunk)
    ids, num_features = feature_ids(x.shape, patch)
    ridge = check_number(ridge, "ridge", low=0)
    if exact:
        if num_features > MAX_EXACT_FEATURES:
            raise ValueError(
                f"exact=True enumerates 2^M coalitions and allows at most M={MAX_EXACT_FEATURES} features; "
                f"x {tuple(x.shape)} with patch {patch!r} has M={num_features} (use a larger patch or exact=False)"
            )
    else:
        key = check_key(key)
        samples = check_int(samples, "samples")
    base = resolve_baseline(x, baseline)
    targets = _as_pairs(target)
    f_x, f_base = _scores(apply_fn(x), targets), _scores(apply_fn(base), targets)
    total = f_x - f_base  # [batch, K]
    if num_features == 1:
        return _finish(_spread(total[..., None], ids, x.shape), target, c)
    if exact:
        z, w = _all_coalitions(num_features)
        w = w / jnp.sum(w)
    else:
        z = kernel_shap_coalitions(key, samples, num_features)
        w = jnp.full((samples,), 1.0 / samples, jnp.float32)
    y = _coalition_scores(apply_fn, x, base, ids, z, targets, chunk) - f_base  # [n, batch, K]
    phi = _constrained_wls(z, w, y.reshape(y.shape[0], -1).astype(jnp.float32), total.reshape(-1), ridge)
    phi = phi.T.reshape(targets.shape + (num_features,)).astype(x.dtype)
    return _finish(_spread(phi, ids, x.shape), target, c)


# --------------------------------------------------------------------------------------------
# LIME
# --------------------------------------------------------------------------------------------
def lime_coalitions(key: jax.Array, samples: int, features: int) -> jax.Array:
    """The coalitions `lime(..., key=key)` evaluates: the all-ones vector, then uniform random ones.

    z_0 = (1, ..., 1);  z_i ~ Bernoulli(1/2)^M for i >= 1 (as the lime package and Captum sample).

    Args:
      key: PRNG key. samples: n >= 1. features: M >= 1.
    Returns:
      [n, M] float32 in {0, 1}.
    Reference: Ribeiro, Singh & Guestrin 2016, "'Why Should I Trust You?': Explaining the Predictions
    of Any Classifier" (KDD).
    """
    key = check_key(key)
    samples = check_int(samples, "samples")
    features = check_int(features, "features")
    return _draw_lime_coalitions(key, samples, features)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_lime_coalitions(key, samples: int, features: int) -> jax.Array:
    z = (jax.random.uniform(key, (samples, features)) < 0.5).astype(jnp.float32)
    return z.at[0].set(1.0)


def _lime_weights(z: jax.Array, kernel_width: float) -> jax.Array:
    """exp(-d^2 / width^2), d = cosine distance of z to the all-ones vector = 1 - sqrt(|z| / M) (1 for z = 0)."""
    d = 1.0 - jnp.sqrt(jnp.sum(z, axis=1) / z.shape[1])
    return jnp.exp(-(d**2) / kernel_width**2)


def _weighted_ridge(z, w, y, ridge):
    """Coefficients of the weighted ridge regression y ~ b + z . beta (the intercept b not penalized).

    z [n, M], w [n], y [n, P] -> beta [M, P]: data centred at the weighted means, then
    (Zc' W Zc + ridge I) beta = Zc' W Yc (what sklearn's Ridge(alpha=ridge) fits with sample_weight=w).
    """
    w_sum = jnp.sum(w)
    zc = z - jnp.matmul(w, z, precision=_HIGHEST) / w_sum
    yc = y - jnp.matmul(w, y, precision=_HIGHEST) / w_sum
    zw = zc * w[:, None]
    a = jnp.matmul(zw.T, zc, precision=_HIGHEST) + ridge * jnp.eye(z.shape[1], dtype=z.dtype)
    return jnp.linalg.solve(a, jnp.matmul(zw.T, yc, precision=_HIGHEST))


def lime(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 256,
    patch: int | tuple[int, int] = 4,
    kernel_width: float = 0.25,
    baseline: Any = None,
    ridge: float = 1e-3,
    chunk: int | None = None,
) -> jax.Array:
    """LIME: the coefficients of a locally weighted linear surrogate over patch features.

    beta = argmin_{b, beta} sum_i pi(z_i) (f(h(z_i)) - b - z_i . beta)^2 + ridge |beta|^2,
    pi(z) = exp(-d(z, 1)^2 / kernel_width^2),  d = cosine distance = 1 - sqrt(|z| / M),
    h(z) = x' + z[ids] * (x - x'),   f = logit_target,

    over the M patch features of `feature_ids` (grid patches as superpixels; x' the baseline, the
    "hidden" colour), with the coalitions of `lime_coalitions` shared by every example and target.
    The weights are the paper's kernel (the lime package uses sqrt(pi) and ridge=1); the default
    ridge is only a small guard against a singular design. For a model linear in x the surrogate is
    exact whatever the weights: beta_j = sum over patch j of w (x - x').

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, H, W, C] images (features: patches) or [batch, d] (each element alone).
      target: [batch] or [batch, K] class indices.
      key: PRNG key for the coalitions. samples: n >= 1 (the first is x itself).
      patch: int or (ph, pw). kernel_width: > 0, in units of cosine distance.
      baseline: None (zeros), "zeros", "blur", a float, or an array like x or like one example.
      ridge: >= 0, the L2 penalty on beta (sklearn's Ridge alpha, with the weights above).
      chunk: coalitions per `lax.map` step (None: the backend default of `sample_chunk`).
    Returns:
      like x: every element carries its patch's coefficient ([batch, K, ...] for [batch, K] targets).
    Reference: Ribeiro, Singh & Guestrin 2016, "'Why Should I Trust You?': Explaining the Predictions
    of Any Classifier" (KDD).
    """
    x, target, c = _check_inputs(apply_fn, x, target, chunk)
    key = check_key(key)
    samples = check_int(samples, "samples")
    ids, num_features = feature_ids(x.shape, patch)
    kernel_width = check_number(kernel_width, "kernel_width", low=0, low_open=True)
    ridge = check_number(ridge, "ridge", low=0)
    base = resolve_baseline(x, baseline)
    targets = _as_pairs(target)
    z = lime_coalitions(key, samples, num_features)
    y = _coalition_scores(apply_fn, x, base, ids, z, targets, chunk)  # [n, batch, K]
    weights = _lime_weights(z, kernel_width)
    beta = _weighted_ridge(z, weights, y.reshape(samples, -1).astype(jnp.float32), ridge)
    beta = beta.T.reshape(targets.shape + (num_features,)).astype(x.dtype)
    return _finish(_spread(beta, ids, x.shape), target, c)
