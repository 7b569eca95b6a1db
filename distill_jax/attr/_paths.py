"""Path attributions beyond the straight line of integrated gradients: Guided IG (Kapishnikov et
al. 2021) and Blur IG (Xu et al. 2020).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend
from distill_jax._checks import check_int, check_number
from distill_jax.attr._core import (
    ApplyFn,
    attribution_inputs,
    check_x,
    input_grad,
    per_target,
    resolve_baseline,
    sample_chunk,
)
from distill_jax.attr._gradient import _copy_bytes, _expand, _grads_of_copies, _sum_in_chunks

# --------------------------------------------------------------------------------------------
# Guided Integrated Gradients
# --------------------------------------------------------------------------------------------
# Relative tolerance (of the total L1 distance) at which a step counts as having reached its L1
# target; the reference's 1e-9 is below float32 resolution. A miss only costs one tiny extra move.
_GUIDED_IG_RTOL = 1e-6


def _guided_ig_path(apply_fn, x, base, t, *, steps: int, fraction: float, max_dist: float):
    """Guided IG for a batch: the adaptive path and its gradient sum, on flattened features."""
    shape, batch = x.shape, x.shape[0]
    end, start = x.reshape(batch, -1), base.reshape(batch, -1)
    diff = end - start
    moving = diff != 0
    safe_diff = jnp.where(moving, diff, 1.0)
    l1_total = jnp.sum(jnp.abs(diff), axis=1)
    tol = _GUIDED_IG_RTOL * l1_total
    kth = int(np.floor(fraction * (end.shape[1] - 1)))  # numpy's quantile(..., method="lower")

    def on_line(alpha):  # the straight-line point at alpha, exact at both ends
        return jnp.where(alpha >= 1, end, start + alpha * diff)

    def step(k, carry):
        cur, attr = carry
        grad = input_grad(apply_fn, cur.reshape(shape), t).reshape(batch, -1)
        alpha = (k + 1.0) / steps
        a_min, a_max = jnp.maximum(alpha - max_dist, 0.0), jnp.minimum(alpha + max_dist, 1.0)
        x_min, x_max = on_line(a_min), on_line(a_max)
        l1_target = l1_total * (1.0 - alpha)

        def move(state):
            cur, attr, active = state
            position = jnp.where(moving, (cur - start) / safe_diff, a_max)
            pulled = jnp.where(position < a_min, x_min, cur)  # features left behind the allowed band
            l1_now = jnp.sum(jnp.abs(pulled - end), axis=1)
            reached = jnp.abs(l1_now - l1_target) <= tol
            at_max = pulled == x_max
            abs_grad = jnp.where(at_max, jnp.inf, jnp.abs(grad))
            threshold = jnp.sort(abs_grad, axis=1)[:, kth]
            chosen = (abs_grad <= threshold[:, None]) & ~at_max & ~reached[:, None]
            l1_chosen = jnp.sum(jnp.where(chosen, jnp.abs(pulled - x_max), 0.0), axis=1)
            gamma = jnp.where(l1_chosen > 0, (l1_now - l1_target) / jnp.where(l1_chosen > 0, l1_chosen, 1.0), jnp.inf)
            part = jnp.clip(gamma, 0.0, 1.0)[:, None]
            moved = jnp.where(gamma[:, None] >= 1, x_max, pulled + part * (x_max - pulled))
            new = jnp.where(active[:, None], jnp.where(chosen, moved, pulled), cur)
            still = active & ~reached & (gamma > 1) & (l1_chosen > 0)  # each round pins >= 1 feature at x_max
            return new, attr + (new - cur) * grad, still

        cur, attr, _ = jax.lax.while_loop(lambda s: jnp.any(s[2]), move, (cur, attr, jnp.ones(batch, bool)))
        return cur, attr

    _, attr = jax.lax.fori_loop(0, steps, step, (start, jnp.zeros_like(start)))
    return attr.reshape(shape)


def guided_ig(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    baseline: Any = None,
    steps: int = 64,
    fraction: float = 0.1,
    max_dist: float = 1.0,
    blur_sigma: float = 5.0,
) -> jax.Array:
    """Guided Integrated Gradients: IG along an adaptive path that first moves low-gradient features.

    A_i = sum_k g_i(p_k) * (p_{k+1,i} - p_{k,i}),  g = grad logit_target,  p_0 = x', p_steps = x.
    Step k (of `steps`) must bring the L1 distance to x down to L1(x, x') * (1 - (k+1)/steps). With
    the gradient g(p_k) it repeatedly takes the `fraction` of features with the smallest |g| (among
    those not yet at their allowed maximum), and moves them toward x, all the way while that is not
    enough, otherwise by the fraction gamma of their remaining distance that meets the budget. With
    max_dist < 1 each feature must stay within alpha_k +- max_dist of the straight line in relative
    position (laggards are pulled up first), as in PAIR saliency's `guided_ig.py`; max_dist=0 is IG
    on the straight line (a left Riemann sum), max_dist=1 the unbounded path. The per-example work
    runs in `lax.fori_loop` over steps with a batched `lax.while_loop` inside; only one copy of the
    batch goes through `apply_fn` at a time, so there is no `chunk`. Completeness holds up to the
    Riemann error: sum_i A_i ~ f(x) - f(x'), exactly for a linear model.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...]. target: [batch] or [batch, K].
      baseline: None (zeros), "zeros", "blur" (Gaussian blur, sigma `blur_sigma`), a float, or an
        array shaped like x or like one example.
      steps: gradient evaluations (>= 1). fraction: share of features moved per round, in (0, 1].
      max_dist: largest relative deviation from the straight-line path, in [0, 1].
    Returns:
      like x (or [batch, K, ...]).
    Reference: Kapishnikov et al. 2021, "Guided Integrated Gradients: an Adaptive Path Method for
      Removing Noise" (CVPR).
    """
    x, target, c = attribution_inputs(apply_fn, x, target)
    steps = check_int(steps, "steps")
    fraction = check_number(fraction, "fraction", low=0.0, high=1.0, low_open=True)
    max_dist = check_number(max_dist, "max_dist", low=0.0, high=1.0)
    base = resolve_baseline(x, baseline, blur_sigma=blur_sigma)

    def core(v, t):
        return _guided_ig_path(apply_fn, v, base, t, steps=steps, fraction=fraction, max_dist=max_dist)

    return per_target(core, x, target, c)


# --------------------------------------------------------------------------------------------
# Blur IG
# --------------------------------------------------------------------------------------------
def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """jnp.pad(mode="reflect") index mapping (mirror without repeating the edge), one reflection deep."""
    index = np.where(index < 0, -index, index)
    return np.where(index >= size, 2 * (size - 1) - index, index)


def _blur_matrix(size: int, sigma: jax.Array, radius: int) -> jax.Array:
    """[size, size] matrix M with (M v) = attr._core.gaussian_blur along one axis of v.

    The kernel k(t) ∝ exp(-t^2 / (2 sigma^2)) is applied over |t| <= r = min(radius, size - 1) with
    reflect padding and normalised over those taps (a constant image stays constant), exactly as gaussian_blur with
    truncate = (radius - 0.5) / sigma; unlike there, sigma may be traced and the radius is fixed, so
    the blur is a smooth function of sigma (sigma = 0 gives the identity).
    """
    r = min(radius, size - 1)
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    s = jnp.maximum(sigma, 1e-6)
    kernel = jnp.exp(-(taps**2) / (2 * s * s))[radius - r : radius + r + 1]
    kernel = kernel / jnp.sum(kernel)
    rows = np.repeat(np.arange(size), 2 * r + 1)
    offsets = np.tile(np.arange(-r, r + 1), size)
    return jnp.zeros((size, size), kernel.dtype).at[rows, _reflect(rows + offsets, size)].add(kernel[offsets + r])


def _blur(x: jax.Array, sigmas: jax.Array, radius: int) -> jax.Array:
    """[c, batch, H, W, C]: x [batch, H, W, C] blurred with each of the c `sigmas` (separable matrices)."""
    rows = jax.vmap(lambda s: _blur_matrix(x.shape[1], s, radius))(sigmas)
    cols = jax.vmap(lambda s: _blur_matrix(x.shape[2], s, radius))(sigmas)
    blurred = jnp.einsum("sih,sjw,bhwc->sbijc", rows, cols, x.astype(rows.dtype), precision=backend.HIGHEST)
    return blurred.astype(x.dtype)


def _blur_sigmas(max_sigma: float, steps: int, *, sqrt: bool = False) -> np.ndarray:
    """The `steps + 1` blur levels of Blur IG: sigma_i = max_sigma * i/steps (sqrt: max_sigma * sqrt(i/steps))."""
    u = np.arange(steps + 1, dtype=np.float64) / steps
    return max_sigma * (np.sqrt(u) if sqrt else u)


def blur_ig(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    max_sigma: float = 5.0,
    steps: int = 64,
    grad_step: float = 0.01,
    sqrt: bool = False,
    chunk: int | None = None,
) -> jax.Array:
    """Blur IG: integrated gradients along the path from a maximally blurred image to x.

    A = - sum_{i=0}^{steps-1} (sigma_{i+1} - sigma_i) * [(B(x, sigma_i + h) - B(x, sigma_i)) / h]
        * grad f(B(x, sigma_i)),   h = grad_step,  f = logit_target,
    with B(x, sigma) the Gaussian blur of `attr._core.gaussian_blur` (B(x, 0) = x) and
    sigma_i from `_blur_sigmas` (linear in i, or max_sigma * sqrt(i/steps) with sqrt=True: denser near
    x). The term in brackets is the finite-difference derivative of the blur in sigma (PAIR
    saliency's `blur_ig.py`), so sum_i A_i ~ f(x) - f(B(x, max_sigma)), where B(x, max_sigma) =
    gaussian_blur(x, sigma=max_sigma); for a linear model with h = max_sigma / steps (and sqrt=False)
    the sum telescopes exactly. Unlike PAIR (zero padding, and a sqrt path that ends at
    sqrt(max_sigma)), the blur reflects at the borders and both spacings end at max_sigma. Every
    blur uses the kernel support radius R = ceil(3 max_sigma) (gaussian_blur's support at
    max_sigma), so B is smooth in sigma along the whole path.
    The blur levels run `chunk` at a time (one `apply_fn` call on chunk*batch images per
    `lax.scan` step), keeping only the running sum.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, H, W, C] images. target: [batch] or [batch, K].
      max_sigma: the blur (pixels, > 0) of the path's start; PAIR's default 50 suits 224-pixel images.
      steps: number of blur levels (>= 1). grad_step: h > 0, the sigma step of the finite difference.
      sqrt: square-root spacing of the blur levels.
      chunk: blur levels per `lax.scan` step (None: the backend default of `sample_chunk`).
    Returns:
      like x (or [batch, K, H, W, C]).
    Reference: Xu, Venugopalan & Sundararajan 2020, "Attribution in Scale and Space" (CVPR).
    """
    x = check_x(x)
    if x.ndim != 4:
        raise ValueError(f"blur_ig needs NHWC images x [batch, H, W, C]; got shape {tuple(x.shape)}")
    x, target, c = attribution_inputs(apply_fn, x, target)
    max_sigma = check_number(max_sigma, "max_sigma", low=0.0, low_open=True)
    steps = check_int(steps, "steps")
    grad_step = check_number(grad_step, "grad_step", low=0.0, low_open=True)
    if not isinstance(sqrt, (bool, np.bool_)):
        raise ValueError(f"sqrt must be True or False; got {sqrt!r}")
    chunk = sample_chunk(chunk, steps, sample_bytes=_copy_bytes(x, target))
    sigmas = _blur_sigmas(max_sigma, steps, sqrt=bool(sqrt))
    levels = np.asarray(sigmas[:-1], np.float32)
    widths = np.asarray(np.diff(sigmas), np.float32)
    radius = int(np.ceil(3.0 * max_sigma))

    def core(v, t):
        def terms(sigma, width):
            blurred = _blur(v, sigma, radius)
            derivative = (_blur(v, sigma + grad_step, radius) - blurred) / grad_step
            return _expand(width, blurred.ndim) * derivative * _grads_of_copies(apply_fn, blurred, t)

        return -_sum_in_chunks(terms, (levels, widths), steps, chunk, jnp.zeros_like(v))

    return per_target(core, x, target, c)
