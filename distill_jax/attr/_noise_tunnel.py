"""The noise tunnel: attributions averaged over Gaussian-noised copies of the input.

SmoothGrad (mean of the maps; Smilkov et al. 2017), SmoothGrad^2 (mean of the squared maps) and
VarGrad (their variance; Adebayo et al. 2018), as Captum's NoiseTunnel offers them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attr._core import (
    ApplyFn,
    attribution_inputs,
    check_x,
    input_grad,
    per_target,
)
from distill_jax.attr._gradient import (
    _check_sampling,
    _copy_bytes,
    _draw_samples,
    _gaussian_noise,
    _grads_of_copies,
    _range_sigma,
    _sum_in_chunks,
)


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
    sigma_b = noise * (max x_b - min x_b)  (the noise of `attr.smoothgrad`), f = logit_target.

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
    x, target, c = attribution_inputs(apply_fn, x, target)
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
    x, target, c = attribution_inputs(apply_fn, x, target)
    samples, noise, chunk, key = _check_sampling(samples, noise, chunk, key, _copy_bytes(x, target))

    def core(v, t):
        _, mean_sq = _noisy_gradient_moments(apply_fn, v, t, key=key, samples=samples, noise=noise,
                                             chunk=chunk, shift=0.0)
        return mean_sq

    return per_target(core, x, target, c)


# --------------------------------------------------------------------------------------------
# SmoothGrad
# --------------------------------------------------------------------------------------------
def smoothgrad(
    method_fn: Callable,
    apply_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 16,
    noise: float = 0.15,
    chunk: int = 1,
    **method_kw,
) -> jax.Array:
    """SmoothGrad around any attribution method.

    SG(x) = (1/n) sum_{s=1..n} M(x + e_s),  e_s ~ N(0, sigma_b^2),  sigma_b = noise * (max x_b - min x_b).

    Samples are processed `chunk` at a time by `lax.scan` (each chunk as one batch of chunk*batch
    examples), so memory does not grow with `samples`.

    Args:
      method_fn: e.g. `saliency`, `integrated_gradients`, or `grad_cam` (then `apply_fn` is its
        `forward`: forward_fn with `layer=` in `method_kw`, or a (features_fn, head_fn) pair);
        called as method_fn(apply_fn, x, target, **method_kw).
      key: PRNG key for the noise. samples: n >= 1. noise: fraction of each example's value range.
    Returns:
      what method_fn returns for x (like x, [batch, K, ...], or [batch, H, W] for grad_cam).
    Reference: Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise".
    """
    x = check_x(x)
    if not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a fraction of the input range); got {noise}")
    target = jnp.asarray(target)
    chunk = min(int(chunk), int(samples))
    n_chunks = -(-samples // chunk)
    batch = x.shape[0]
    flat = x.reshape(batch, -1)
    sigma = (noise * (flat.max(axis=1) - flat.min(axis=1))).reshape((batch,) + (1,) * (x.ndim - 1))
    counts = jnp.asarray(np.minimum(chunk, samples - chunk * np.arange(n_chunks)), x.dtype)  # real samples per chunk
    keys = jax.random.split(key, n_chunks)
    big_target = jnp.concatenate([target] * chunk, axis=0)
    # a traced mask of "real" samples: padding samples in the last chunk get weight 0
    sample_valid = jnp.arange(chunk)[None, :] < counts[:, None]

    def body(acc, inp):
        k, valid = inp
        eps = jax.random.normal(k, (chunk,) + x.shape, x.dtype) * sigma[None]
        noisy = (x[None] + eps).reshape((chunk * batch,) + x.shape[1:])
        out = method_fn(apply_fn, noisy, big_target, **method_kw)
        out = out.reshape((chunk, batch) + out.shape[1:])
        w = valid.astype(out.dtype).reshape((chunk,) + (1,) * (out.ndim - 1))
        return acc + jnp.sum(w * out, axis=0), None

    out_shape = jax.eval_shape(lambda v: method_fn(apply_fn, v, target, **method_kw), x)
    acc, _ = jax.lax.scan(body, jnp.zeros(out_shape.shape, out_shape.dtype), (keys, sample_valid))
    return acc / samples
