"""Perturbation attributions: model-agnostic methods that only run `apply_fn` forward (no gradients).

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring): every
method here is `method(apply_fn, x, target, *, options)`. Occlusion (sliding windows, `explain.occlusion`) lives in explain.py;
`feature_ablation` is its non-overlapping-patch form.

feature_ablation, rise, kernel_shap and lime perturb the input, read the model's score for the
target class and turn the score changes into a map shaped like `x`. They share one notion of a
*feature*: for NHWC images a cell of a regular grid of `patch`-sized patches (all channels of a
patch together; the last row/column of patches is smaller when the patch does not divide the image),
for any other input [batch, ...] each element on its own (`feature_ids`). A feature is *present* in
a perturbed copy when it keeps its value from `x` and *absent* when it takes the baseline's value:
perturbed = baseline + z[ids] * (x - baseline) for a coalition z in {0, 1}^M.

Scores: feature_ablation, kernel_shap and lime explain the target *logit* (the model output as
given, as Captum does); rise explains the target *softmax probability*, as the RISE paper does.

Memory: the perturbed copies go through `apply_fn` `chunk` samples at a time (each sample is the
whole batch), by `jax.lax.map(..., batch_size=sample_chunk(chunk, samples))` or, where the result is
a running sum (rise), by `jax.lax.scan` over chunks; only per-sample scores ([samples, batch, K]),
never all perturbed copies, are kept. The values do not depend on `chunk` (up to rounding).

Targets: [batch] ints, or [batch, K] ints (the result gains a K axis after the batch axis). All K
targets are read from the same forward passes. Inside `jax.jit` an out-of-range target gives NaN for
its example (see explain.py); with concrete targets it raises ValueError.
"""
from __future__ import annotations

import functools
from math import comb
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attribution_core import (
    ApplyFn, check_key, check_positive_int, check_x, mask_invalid, num_classes_of, resolve_baseline, sample_chunk,
    validate_target,
)

__all__ = [
    "MAX_EXACT_FEATURES",
    "feature_ablation",
    "feature_ids",
    "kernel_shap",
    "kernel_shap_coalitions",
    "lime",
    "lime_coalitions",
    "rise",
    "rise_masks",
]

# exact=True in kernel_shap evaluates 2^M - 2 coalitions; beyond this it is rarely what one wants.
MAX_EXACT_FEATURES = 20

_HIGHEST = jax.lax.Precision.HIGHEST  # the regressions must not run in bf16/TF32 on accelerators


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _check_fraction(value: Any, name: str) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")
    return float(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_nonnegative(value: Any, name: str) -> float:
    if not _is_number(value) or not 0 <= value < np.inf:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def _check_positive(value: Any, name: str) -> float:
    if not _is_number(value) or not 0 < value < np.inf:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def _patch_shape(patch: Any, image_hw: tuple[int, int]) -> tuple[int, int]:
    pair = (patch, patch) if isinstance(patch, (int, np.integer)) else tuple(np.atleast_1d(patch).tolist())
    if len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1 for p in pair):
        raise ValueError(f"patch must be a positive int or a pair (h, w) of positive ints; got {patch!r}")
    if pair[0] > image_hw[0] or pair[1] > image_hw[1]:
        raise ValueError(f"patch {tuple(pair)} must fit in the image {tuple(image_hw)}")
    return int(pair[0]), int(pair[1])


def _check_inputs(apply_fn: ApplyFn, x: Any, target: Any, chunk: Any, *, image: bool = False):
    """(x, target as int32, number of classes), after every check shared by the four methods."""
    sample_chunk(chunk, 1)  # raises for a bad chunk before anything is traced
    x = check_x(x)
    if image and x.ndim != 4:
        raise ValueError(f"x must be NHWC images [batch, H, W, C] here; got shape {x.shape}")
    c = num_classes_of(apply_fn, x)
    return x, validate_target(target, x.shape[0], c), c


# --------------------------------------------------------------------------------------------
# Features, coalitions and scores (shared by all four methods)
# --------------------------------------------------------------------------------------------
def feature_ids(x_shape: tuple[int, ...], patch: int | tuple[int, int] = 1) -> tuple[np.ndarray, int]:
    """The feature index of every input element, and the number of features M.

    NHWC images [batch, H, W, C]: the image is cut into ceil(H/ph) x ceil(W/pw) patches numbered in
    row-major order, id(h, w) = (h // ph) * ceil(W / pw) + w // pw, shared by every channel; the last
    row/column of patches is smaller when ph/pw do not divide H/W. Any other [batch, ...] shape: every
    element of an example is its own feature (its flat index) and `patch` is not used.

    Args:
      x_shape: the shape of x, batch axis included.
      patch: int or (ph, pw), the patch size in pixels (images only).
    Returns:
      (ids, M): ids an int32 numpy array [H, W, 1] for images (broadcasts over channels) or
      x_shape[1:] otherwise, with values in [0, M).
    """
    if len(x_shape) != 4:
        size = int(np.prod(x_shape[1:]))
        return np.arange(size, dtype=np.int32).reshape(x_shape[1:]), size
    height, width = x_shape[1:3]
    ph, pw = _patch_shape(patch, (height, width))
    cols = -(-width // pw)
    ids = (np.arange(height)[:, None] // ph) * cols + np.arange(width)[None, :] // pw
    return ids.astype(np.int32)[:, :, None], (-(-height // ph)) * cols


def _blend(x: jax.Array, base: jax.Array, presence: jax.Array) -> jax.Array:
    """base + presence * (x - base): x where a feature is present (1), the baseline where absent (0)."""
    return base + presence.astype(x.dtype) * (x - base)


def _as_pairs(target: jax.Array) -> jax.Array:
    return target[:, None] if target.ndim == 1 else target


def _scores(logits: jax.Array, targets: jax.Array, *, prob: bool = False) -> jax.Array:
    """logits (or softmax probabilities) of the [batch, K] targets -> [batch, K] (targets clipped into range)."""
    values = jax.nn.softmax(logits, axis=-1) if prob else logits
    return jnp.take_along_axis(values, jnp.clip(targets, 0, logits.shape[1] - 1), axis=1)


def _spread(per_feature: jax.Array, ids: np.ndarray, x_shape: tuple[int, ...]) -> jax.Array:
    """[batch, K, M] values -> [batch, K, *x_shape[1:]]: every element gets the value of its feature."""
    out = per_feature[..., jnp.asarray(ids)]
    return jnp.broadcast_to(out, per_feature.shape[:2] + tuple(x_shape[1:]))


def _finish(attr: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
    """NaN for out-of-range (traced) targets; drops the K axis for [batch] targets."""
    pairs = _as_pairs(target)
    flat = attr.reshape((-1,) + attr.shape[2:])
    attr = mask_invalid(flat, pairs.reshape(-1), num_classes).reshape(attr.shape)
    return attr[:, 0] if target.ndim == 1 else attr


def _coalition_scores(apply_fn, x, base, ids, coalitions, targets, chunk):
    """Target logits of x with the features absent in each coalition set to the baseline: [n, batch, K].

    `chunk` coalitions (each applied to the whole batch) are evaluated per `lax.map` step.
    """
    ids = jnp.asarray(ids)

    def one(z):
        return _scores(apply_fn(_blend(x, base, z[ids])), targets)

    return jax.lax.map(one, coalitions, batch_size=sample_chunk(chunk, coalitions.shape[0]))


# --------------------------------------------------------------------------------------------
# Feature ablation
# --------------------------------------------------------------------------------------------
def feature_ablation(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    baseline: Any = None,
    patch: int | tuple[int, int] = 1,
    chunk: int | None = None,
) -> jax.Array:
    """Feature ablation: how much the target logit drops when one feature is set to the baseline.

    A_i = f(x) - f(x with feature P(i) set to the baseline),   f = logit_target,

    where P(i) is the patch (images) or the single element (other inputs) containing element i; every
    element of a patch gets the patch's full drop (not a share of it), as Captum's FeatureAblation does
    with a feature mask. Features are the non-overlapping patches of `feature_ids`.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, H, W, C] images (features: patches, all channels together) or [batch, d] (each of
        the d elements alone; `patch` is not used).
      target: [batch] or [batch, K] class indices.
      baseline: None (zeros), "zeros", "blur", a float, or an array like x or like one example.
      patch: int or (ph, pw); the last row/column of patches is smaller when it does not divide H/W.
      chunk: features ablated per `lax.map` step (None: the backend default of `sample_chunk`).
    Returns:
      like x ([batch, K, ...] for [batch, K] targets).
    Reference: Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks" (ECCV).
    """
    x, target, c = _check_inputs(apply_fn, x, target, chunk)
    ids, num_features = feature_ids(x.shape, patch)
    base = resolve_baseline(x, baseline)
    targets = _as_pairs(target)
    ids_j = jnp.asarray(ids)
    full = _scores(apply_fn(x), targets)

    def drop(feature):
        return full - _scores(apply_fn(_blend(x, base, ids_j != feature)), targets)

    drops = jax.lax.map(drop, jnp.arange(num_features), batch_size=sample_chunk(chunk, num_features))  # [M, batch, K]
    return _finish(_spread(jnp.moveaxis(drops, 0, -1), ids, x.shape), target, c)


# --------------------------------------------------------------------------------------------
# RISE
# --------------------------------------------------------------------------------------------
def _cell_size(cells: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    return -(-image_hw[0] // cells), -(-image_hw[1] // cells)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))  # one compilation instead of op-by-op when eager
def _rise_grids(key, masks: int, cells: int, p_keep: float, image_hw: tuple[int, int]):
    """Binary [masks, cells, cells] grids (1 with probability p_keep) and [masks, 2] crop offsets.

    One uniform draw serves both (each random call adds a slow-to-compile threefry block).
    """
    u = jax.random.uniform(key, (masks, cells * cells + 2))
    grids = (u[:, : cells * cells] < p_keep).astype(jnp.float32).reshape(masks, cells, cells)
    cell = jnp.asarray(_cell_size(cells, image_hw))
    shifts = jnp.minimum(jnp.floor(u[:, cells * cells :] * cell).astype(jnp.int32), cell - 1)
    return grids, shifts


@functools.partial(jax.jit, static_argnums=(2, 3))
def _upsample_crop(grids: jax.Array, shifts: jax.Array, cells: int, image_hw: tuple[int, int]) -> jax.Array:
    """Bilinear upsampling of each grid to (cells+1) * cell size, then an H x W crop at its offset: [n, H, W]."""
    ch, cw = _cell_size(cells, image_hw)
    up = jax.image.resize(grids, (grids.shape[0], (cells + 1) * ch, (cells + 1) * cw), method="bilinear")
    return jax.vmap(lambda m, s: jax.lax.dynamic_slice(m, (s[0], s[1]), image_hw))(up, shifts)


def rise_masks(key: jax.Array, masks: int, cells: int, p_keep: float, image_hw: tuple[int, int]) -> jax.Array:
    """The RISE masks that `rise(..., key=key)` uses, all at once (for inspection and tests).

    M_i = crop_{(dy_i, dx_i)}(bilinear_upsample(G_i)),   G_i in {0, 1}^{cells x cells}, P(G = 1) = p_keep,

    the grid upsampled to (cells+1)*ceil(H/cells) x (cells+1)*ceil(W/cells) and cropped to H x W at
    an offset drawn uniformly from [0, ceil(H/cells)) x [0, ceil(W/cells)).

    Args:
      key: PRNG key. masks: number of masks N >= 1. cells: grid size >= 1. p_keep: in (0, 1].
      image_hw: (H, W).
    Returns:
      [N, H, W] float32 masks with values in [0, 1].
    Reference: Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models" (BMVC).
    """
    key = check_key(key)
    masks, cells = check_positive_int(masks, "masks"), check_positive_int(cells, "cells")
    p_keep = _check_fraction(p_keep, "p_keep")
    image_hw = (check_positive_int(image_hw[0], "image_hw"), check_positive_int(image_hw[1], "image_hw"))
    return _upsample_crop(*_rise_grids(key, masks, cells, p_keep, image_hw), cells, image_hw)


def rise(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    masks: int = 1000,
    cells: int = 7,
    p_keep: float = 0.5,
    chunk: int | None = None,
) -> jax.Array:
    """RISE: the saliency of a pixel is the expected target probability when the pixel is kept.

    S(x) = 1 / (N * p_keep) * sum_{i=1..N} p_target(x * M_i) * M_i,   p = softmax(apply_fn(.)),

    with the random smooth masks M_i of `rise_masks` (same `key`, same masks). The masks are made and
    applied `chunk` at a time inside a `lax.scan` that keeps only the running sum, so memory does not
    grow with N.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, H, W, C] images. target: [batch] or [batch, K] class indices.
      key: PRNG key for the masks (shared by every example of the batch).
      masks: N >= 1. cells: the random grid is cells x cells. p_keep: probability that a cell is kept.
      chunk: masks per scan step (None: the backend default of `sample_chunk`).
    Returns:
      like x, the same map in every channel ([batch, K, H, W, C] for [batch, K] targets).
    Reference: Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models" (BMVC).
    """
    x, target, c = _check_inputs(apply_fn, x, target, chunk, image=True)
    key = check_key(key)
    masks, cells = check_positive_int(masks, "masks"), check_positive_int(cells, "cells")
    p_keep = _check_fraction(p_keep, "p_keep")
    image_hw = x.shape[1:3]
    step_size = sample_chunk(chunk, masks)
    steps = -(-masks // step_size)
    grids, shifts = _rise_grids(key, masks, cells, p_keep, image_hw)
    pad = steps * step_size - masks
    grids = jnp.pad(grids, ((0, pad), (0, 0), (0, 0))).reshape(steps, step_size, cells, cells)
    shifts = jnp.pad(shifts, ((0, pad), (0, 0))).reshape(steps, step_size, 2)
    real = (jnp.arange(steps * step_size) < masks).astype(x.dtype).reshape(steps, step_size)  # padding masks weigh 0
    targets = _as_pairs(target)

    def add_chunk(total, inputs):
        grid, shift, weight = inputs
        m = _upsample_crop(grid, shift, cells, image_hw).astype(x.dtype)  # [step_size, H, W]
        probs = jax.vmap(lambda mi: _scores(apply_fn(x * mi[:, :, None]), targets, prob=True))(m)
        return total + jnp.einsum("n,nbk,nhw->bkhw", weight, probs, m, precision=_HIGHEST), None

    zeros = jnp.zeros(targets.shape + image_hw, x.dtype)
    total, _ = jax.lax.scan(add_chunk, zeros, (grids, shifts, real))
    saliency = jnp.broadcast_to((total / (masks * p_keep))[..., None], targets.shape + x.shape[1:])
    return _finish(saliency, target, c)


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
    samples = check_positive_int(samples, "samples")
    features = check_positive_int(features, "features")
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
    ridge = _check_nonnegative(ridge, "ridge")
    if exact:
        if num_features > MAX_EXACT_FEATURES:
            raise ValueError(
                f"exact=True enumerates 2^M coalitions and allows at most M={MAX_EXACT_FEATURES} features; "
                f"x {tuple(x.shape)} with patch {patch!r} has M={num_features} (use a larger patch or exact=False)"
            )
    else:
        key = check_key(key)
        samples = check_positive_int(samples, "samples")
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
    samples = check_positive_int(samples, "samples")
    features = check_positive_int(features, "features")
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
    samples = check_positive_int(samples, "samples")
    ids, num_features = feature_ids(x.shape, patch)
    kernel_width = _check_positive(kernel_width, "kernel_width")
    ridge = _check_nonnegative(ridge, "ridge")
    base = resolve_baseline(x, baseline)
    targets = _as_pairs(target)
    z = lime_coalitions(key, samples, num_features)
    y = _coalition_scores(apply_fn, x, base, ids, z, targets, chunk)  # [n, batch, K]
    weights = _lime_weights(z, kernel_width)
    beta = _weighted_ridge(z, weights, y.reshape(samples, -1).astype(jnp.float32), ridge)
    beta = beta.T.reshape(targets.shape + (num_features,)).astype(x.dtype)
    return _finish(_spread(beta, ids, x.shape), target, c)
