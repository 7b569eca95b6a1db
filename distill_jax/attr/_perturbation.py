"""Perturbation attributions: model-agnostic methods that only run `apply_fn` forward (no gradients).

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring): every
method here is `method(apply_fn, x, target, *, options)`. Occlusion (sliding windows, `attr.occlusion`) lives in distill_jax.attr;
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
its example (see distill_jax.attr); with concrete targets it raises ValueError.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend
from distill_jax._checks import check_int, check_key, check_number
from distill_jax.attr._core import (
    ApplyFn,
    attribution_inputs,
    check_x,
    mask_invalid,
    per_target,
    resolve_baseline,
    sample_chunk,
    target_logits,
)
from distill_jax.attr._gradient import _targets_per_example

# exact=True in kernel_shap evaluates 2^M - 2 coalitions; beyond this it is rarely what one wants.
MAX_EXACT_FEATURES = 20


_HIGHEST = jax.lax.Precision.HIGHEST  # the regressions must not run in bf16/TF32 on accelerators


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------








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
    return attribution_inputs(apply_fn, x, target)


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
    masks, cells = check_int(masks, "masks"), check_int(cells, "cells")
    p_keep = check_number(p_keep, "p_keep", low=0, high=1, low_open=True)
    image_hw = (check_int(image_hw[0], "image_hw"), check_int(image_hw[1], "image_hw"))
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
    masks, cells = check_int(masks, "masks"), check_int(cells, "cells")
    p_keep = check_number(p_keep, "p_keep", low=0, high=1, low_open=True)
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


def _pair(v, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(pair) != 2 or any((not isinstance(p, (int, np.integer))) or p < 1 for p in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints; got {v!r}")
    return int(pair[0]), int(pair[1])


def _window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:  # make sure the last rows/columns are covered too
        starts.append(size - patch)
    return np.asarray(starts)


def occlusion_masks(image_hw: tuple[int, int], patch: int | tuple[int, int], stride: int | tuple[int, int]) -> np.ndarray:
    """The windows of `occlusion`: [P, H, W] bool, True inside window p.

    Windows of size `patch` start every `stride` rows/columns, plus a last one flush with the border.
    """
    (ph, pw), (sh, sw) = _pair(patch, "patch"), _pair(stride, "stride")
    height, width = image_hw
    if ph > height or pw > width:
        raise ValueError(f"patch {(ph, pw)} must fit in the image {(height, width)}")
    ys, xs = _window_starts(height, ph, sh), _window_starts(width, pw, sw)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    rows, cols = np.arange(height), np.arange(width)
    return ((rows[None, :, None] >= yy.reshape(-1, 1, 1)) & (rows[None, :, None] < yy.reshape(-1, 1, 1) + ph)) & (
        (cols[None, None, :] >= xx.reshape(-1, 1, 1)) & (cols[None, None, :] < xx.reshape(-1, 1, 1) + pw)
    )


def occlusion(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    patch: int | tuple[int, int] = 4,
    stride: int | tuple[int, int] = 2,
    value: float = 0.0,
    chunk: int | None = None,
) -> jax.Array:
    """Occlusion sensitivity: how much the target logit drops when a patch is replaced by `value`.

    A_bhw = mean over windows P covering (h, w) of [f(x_b) - f(x_b with P set to value)], same for every channel.

    Windows of size `patch` slide with `stride` (plus a last window flush with the border). The
    windows are evaluated by `lax.map` over window positions, each on the whole batch, `chunk`
    windows at a time (default from `backend.choices()`: one on CPU; on GPU/TPU as many as its byte
    budget allows).

    Args:
      x: [batch, H, W, C]. target: [batch] or [batch, K]. patch, stride: int or (h, w).
      chunk: windows per `lax.map` step (>= 1), or None for the backend's default.
    Returns:
      like x (or [batch, K, H, W, C]).
    Reference: Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks".
    """
    x = check_x(x)
    if x.ndim != 4:
        raise ValueError(f"occlusion needs NHWC images x [batch, H, W, C]; got shape {x.shape}")
    x, target, c = attribution_inputs(apply_fn, x, target)
    (ph, pw), (sh, sw) = _pair(patch, "patch"), _pair(stride, "stride")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be None or an integer >= 1; got {chunk!r}")
    masks = occlusion_masks(x.shape[1:3], (ph, pw), (sh, sw))
    masks_j = jnp.asarray(masks, x.dtype)  # [P, H, W]
    count = jnp.asarray(masks.sum(axis=0), x.dtype)  # every pixel is covered at least once
    if chunk is None:  # one window sends the batch through apply_fn once per target
        picked = backend.choices()
        chunk = picked.chunk(len(masks), picked.occlusion_chunk, backend.bytes_of(x, _targets_per_example(target)))
    windows_per_step = None if chunk == 1 else min(int(chunk), len(masks))  # None: lax.map's plain scan

    def core(v, t):
        full = target_logits(apply_fn, v, t)

        def drop(m):
            m4 = m[None, :, :, None]
            return full - target_logits(apply_fn, v * (1 - m4) + value * m4, t)

        diffs = jax.lax.map(drop, masks_j, batch_size=windows_per_step)  # [P, batch]
        heat = jnp.einsum("pb,phw->bhw", diffs, masks_j, precision=backend.HIGHEST) / count
        return jnp.broadcast_to(heat[..., None], v.shape)

    return per_target(core, x, target, c)
