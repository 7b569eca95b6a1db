"""Gradient attributions beyond plain IG and SmoothGrad: expected gradients, VarGrad, SmoothGrad^2,
Guided IG and Blur IG, for any pure `apply_fn(x) -> logits`.

Every method follows the attribution contract of `attribution_core`: `(apply_fn, x, target, *,
options)`, `x` [batch, ...] (Blur IG: NHWC images), `target` [batch] or [batch, K] ints, result
shaped like `x` (or [batch, K, ...]). Sampled methods draw sample s from
`jax.random.fold_in(key, s)`, so the values do not depend on how the samples are grouped: they run
`chunk` samples at a time (one `apply_fn` call on chunk*batch examples per `lax.scan` step) and keep
only running sums, so memory is bounded by `chunk` copies of the batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend
from distill_jax.attribution_core import (
    ApplyFn, check_key, check_positive_int, check_x, input_grad, num_classes_of, per_target, resolve_baseline,
    sample_chunk, validate_target,
)

__all__ = ["blur_ig", "gradient_shap", "guided_ig", "smoothgrad_squared", "vargrad"]


# --------------------------------------------------------------------------------------------
# Argument checks and shared machinery
# --------------------------------------------------------------------------------------------
def _check_number(value: Any, name: str, *, low: float, high: float = np.inf, low_open: bool = False) -> float:
    """`value` as a float in [low, high] ((low, high] with low_open), or a one-line ValueError naming `name`."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'(' if low_open else '['}{low}, {high}{']' if np.isfinite(high) else ')'}"
        raise ValueError(f"{name} must be a number in {bound}; got {value!r}")
    return float(value)


def _sum_in_chunks(term_fn: Callable, items: tuple[np.ndarray, ...], total: int, chunk: int, init):
    """sum_{i < total} term_fn(*items_i), `chunk` items per `lax.scan` step, keeping only the running sum.

    term_fn maps `chunk` items (each a [chunk, ...] array) to a pytree of [chunk, ...] terms. The
    items are padded to a multiple of `chunk` by repeating the last one; padded terms are dropped.
    """
    n = -(-total // chunk)
    pad = n * chunk - total
    stacked = tuple(jnp.asarray(np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode="edge")
                                .reshape((n, chunk) + a.shape[1:])) for a in items)
    valid = jnp.asarray((np.arange(n * chunk) < total).reshape(n, chunk))

    def body(acc, inp):
        chunk_items, keep = inp
        terms = term_fn(*chunk_items)

        def add(a, term):
            mask = keep.reshape((chunk,) + (1,) * (term.ndim - 1))
            return a + jnp.sum(jnp.where(mask, term, 0), axis=0)

        return jax.tree_util.tree_map(add, acc, terms), None

    acc, _ = jax.lax.scan(body, init, (stacked, valid))
    return acc


def _grads_of_copies(apply_fn: ApplyFn, z: jax.Array, t: jax.Array) -> jax.Array:
    """grad_z logit_t for copies z [c, batch, ...] of a batch, evaluated as one batch of c*batch examples."""
    c, b = z.shape[:2]
    g = input_grad(apply_fn, z.reshape((c * b,) + z.shape[2:]), jnp.tile(t, c))
    return g.reshape(z.shape)


def _expand(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _draw_samples(draw: Callable, key: jax.Array, ids: jax.Array):
    """draw(jax.random.fold_in(key, s)) for each sample s in `ids`, stacked on a leading axis.

    A `lax.map`, not a `vmap`: the "rbg" key types give different numbers when vmapped, and each
    sample must get the same numbers whatever chunk it falls in.
    """
    return jax.lax.map(lambda s: draw(jax.random.fold_in(key, s)), ids)


def _range_sigma(x: jax.Array, noise: float) -> jax.Array:
    """sigma_b = noise * (max x_b - min x_b), shaped to broadcast against x (as explain.smoothgrad)."""
    flat = x.reshape(x.shape[0], -1)
    return _expand(noise * (flat.max(axis=1) - flat.min(axis=1)), x.ndim)


def _standard_normal(key: jax.Array, x: jax.Array) -> jax.Array:
    # drawn flat and reshaped: XLA:CPU compiles the generator for a 1-D shape several times faster
    return jax.random.normal(key, (x.size,), x.dtype).reshape(x.shape)


def _gaussian_noise(key_s: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """The noise e_s ~ N(0, sigma_b^2) of one sample (key_s = jax.random.fold_in(key, s)), shaped like x."""
    return _standard_normal(key_s, x) * sigma


def _shap_draw(key_s: jax.Array, x: jax.Array, num_baselines: int, noise: float):
    """One expected-gradients sample for every example: (baseline index [batch], alpha [batch], noise like x).

    key_s splits into (k_uniform, k_noise); u = uniform(k_uniform, (2 * batch,)) gives the index
    floor(u[:batch] * m) and alpha = u[batch:]; the noise is noise * normal(k_noise, (x.size,)).
    (One uniform draw instead of randint + uniform: XLA:CPU compiles it about twice as fast.)
    """
    k_uniform, k_noise = jax.random.split(key_s)
    batch = x.shape[0]
    u = jax.random.uniform(k_uniform, (2 * batch,), x.dtype)
    index = jnp.minimum(jnp.floor(u[:batch] * num_baselines).astype(jnp.int32), num_baselines - 1)
    eps = _standard_normal(k_noise, x) * noise if noise > 0 else jnp.zeros_like(x)
    return index, u[batch:], eps


def _copy_bytes(x: jax.Array, target: jax.Array) -> int:
    """Bytes one sample sends through apply_fn: a copy of the batch per target (`per_target` vmaps over K)."""
    return backend.bytes_of(x, 1 if target.ndim == 1 else target.shape[1])


def _check_sampling(samples, noise, chunk, key, sample_bytes: int) -> tuple[int, float, int, jax.Array]:
    samples = check_positive_int(samples, "samples")
    noise = _check_number(noise, "noise", low=0.0)
    return samples, noise, sample_chunk(chunk, samples, sample_bytes=sample_bytes), check_key(key)


# --------------------------------------------------------------------------------------------
# Expected gradients (GradientSHAP)
# --------------------------------------------------------------------------------------------
def _check_baselines(baselines: Any, x: jax.Array) -> jax.Array:
    if baselines is None:
        return jnp.zeros((1,) + x.shape[1:], x.dtype)
    b = jnp.asarray(baselines)
    if b.shape == x.shape[1:]:
        b = b[None]
    if b.ndim != x.ndim or b.shape[1:] != x.shape[1:] or b.shape[0] < 1:
        raise ValueError(f"baselines must have shape [m, {', '.join(map(str, x.shape[1:]))}] (m >= 1 examples shaped "
                         f"like one example of x) or {tuple(x.shape[1:])}; got shape {tuple(b.shape)}")
    return b.astype(x.dtype)


def gradient_shap(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    baselines: Any = None,
    samples: int = 32,
    noise: float = 0.0,
    chunk: int | None = None,
) -> jax.Array:
    """GradientSHAP / expected gradients: IG averaged over random baselines and random path points.

    A_b = (1/n) sum_s (x~_bs - r_bs) * grad f(r_bs + alpha_bs (x~_bs - r_bs)),   f = logit_target,
    r_bs drawn uniformly from `baselines`, alpha_bs ~ U(0, 1), x~_bs = x_b + e_bs, e_bs ~ N(0, noise^2)
    (absolute std, as Captum's `stdevs`), independently per example and sample. Since
    E_alpha[(x - r) . grad f(r + alpha (x - r))] = f(x) - f(r) for any differentiable f, completeness
    holds in expectation: E[sum_i A_bi] = E[f(x~_b)] - E[f(r)]; for a linear f it holds exactly for the
    drawn samples: sum_i A_bi = (1/n) sum_s (f(x~_bs) - f(r_bs)).

    Sample s is drawn from jax.random.fold_in(key, s) (see `_shap_draw`), so every `chunk` gives
    the same values.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...]. target: [batch] or [batch, K].
      key: PRNG key (the only source of randomness).
      baselines: [m, ...] reference examples shaped like one example of x (a data sample, the
        "background"), or one example [...]; None means a single all-zeros baseline.
      samples: n >= 1 draws per example. noise: std of the Gaussian added to x (>= 0).
      chunk: samples per `lax.scan` step (None: the backend default of `sample_chunk`).
    Returns:
      like x (or [batch, K, ...]).
    References: Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions";
      Erion et al. 2021, "Improving performance of deep learning models with axiomatic attribution
      priors and expected gradients".
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    samples, noise, chunk, key = _check_sampling(samples, noise, chunk, key, _copy_bytes(x, target))
    refs = _check_baselines(baselines, x)

    def core(v, t):
        def terms(ids):
            index, alpha, eps = _draw_samples(lambda k: _shap_draw(k, v, refs.shape[0], noise), key, ids)
            start = refs[index]  # [chunk, batch, ...]
            diff = v[None] + eps - start
            return diff * _grads_of_copies(apply_fn, start + _expand(alpha, diff.ndim) * diff, t)

        return _sum_in_chunks(terms, (np.arange(samples),), samples, chunk, jnp.zeros_like(v)) / samples

    return per_target(core, x, target, c)


# --------------------------------------------------------------------------------------------
# VarGrad and SmoothGrad^2
# --------------------------------------------------------------------------------------------
def _noisy_gradient_moments(apply_fn, x, t, *, key, samples, noise, chunk, shift):
    """(mean_s d_s, mean_s d_s^2) with d_s = grad f(x + e_s) - shift, e_s ~ N(0, sigma_b^2) (running sums)."""
    sigma = _range_sigma(x, noise)

    def terms(ids):
        eps = _draw_samples(lambda k: _gaussian_noise(k, x, sigma), key, ids)
        d = _grads_of_copies(apply_fn, x[None] + eps, t) - shift
        return d, d * d

    zeros = jnp.zeros_like(x)
    total, total_sq = _sum_in_chunks(terms, (np.arange(samples),), samples, chunk, (zeros, zeros))
    return total / samples, total_sq / samples


def vargrad(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 16,
    noise: float = 0.15,
    chunk: int | None = None,
) -> jax.Array:
    """VarGrad: the variance of the input gradient over noisy copies of x.

    A_b = (1/n) sum_s (g_bs - gbar_b)^2,  g_bs = grad f(x_b + e_bs),  e_bs ~ N(0, sigma_b^2),
    sigma_b = noise * (max x_b - min x_b)  (the noise of `explain.smoothgrad`), f = logit_target.

    Computed from running sums of d_s = g_s - grad f(x) and d_s^2 (a shift that leaves the
    variance unchanged, avoids cancellation, and gives exactly 0 for a linear model):
    A = mean(d^2) - mean(d)^2, clipped at 0. Sample s uses e_s = sigma_b * z_s with
    z_s = jax.random.normal(jax.random.fold_in(key, s), (x.size,)).reshape(x.shape).

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...]. target: [batch] or [batch, K].
      key: PRNG key. samples: n >= 1. noise: fraction of each example's value range (>= 0).
      chunk: samples per `lax.scan` step (None: the backend default of `sample_chunk`).
    Returns:
      like x (or [batch, K, ...]), >= 0.
    References: Adebayo et al. 2018, "Local explanation methods for deep neural networks lack
      sensitivity to parameter values"; Hooker et al. 2019, "A Benchmark for Interpretability
      Methods in Deep Neural Networks".
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    samples, noise, chunk, key = _check_sampling(samples, noise, chunk, key, _copy_bytes(x, target))

    def core(v, t):
        shift = input_grad(apply_fn, v, t)
        mean, mean_sq = _noisy_gradient_moments(apply_fn, v, t, key=key, samples=samples, noise=noise,
                                                chunk=chunk, shift=shift)
        return jnp.maximum(mean_sq - mean * mean, 0.0)

    return per_target(core, x, target, c)


def smoothgrad_squared(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 16,
    noise: float = 0.15,
    chunk: int | None = None,
) -> jax.Array:
    """SmoothGrad-Squared: the mean squared input gradient over noisy copies of x.

    A_b = (1/n) sum_s (grad f(x_b + e_bs))^2,  e_bs ~ N(0, sigma_b^2),
    sigma_b = noise * (max x_b - min x_b),  f = logit_target.
    Sample s uses the noise of `vargrad`: e_s = sigma_b * z_s,
    z_s = jax.random.normal(jax.random.fold_in(key, s), (x.size,)).reshape(x.shape).

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...]. target: [batch] or [batch, K].
      key: PRNG key. samples: n >= 1. noise: fraction of each example's value range (>= 0).
      chunk: samples per `lax.scan` step (None: the backend default of `sample_chunk`).
    Returns:
      like x (or [batch, K, ...]), >= 0.
    Reference: Hooker et al. 2019, "A Benchmark for Interpretability Methods in Deep Neural Networks".
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    samples, noise, chunk, key = _check_sampling(samples, noise, chunk, key, _copy_bytes(x, target))

    def core(v, t):
        _, mean_sq = _noisy_gradient_moments(apply_fn, v, t, key=key, samples=samples, noise=noise,
                                             chunk=chunk, shift=0.0)
        return mean_sq

    return per_target(core, x, target, c)


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
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    steps = check_positive_int(steps, "steps")
    fraction = _check_number(fraction, "fraction", low=0.0, high=1.0, low_open=True)
    max_dist = _check_number(max_dist, "max_dist", low=0.0, high=1.0)
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
    """[size, size] matrix M with (M v) = attribution_core.gaussian_blur along one axis of v.

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
    with B(x, sigma) the Gaussian blur of `attribution_core.gaussian_blur` (B(x, 0) = x) and
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
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    max_sigma = _check_number(max_sigma, "max_sigma", low=0.0, low_open=True)
    steps = check_positive_int(steps, "steps")
    grad_step = _check_number(grad_step, "grad_step", low=0.0, low_open=True)
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
