"""Per-example statistics over flattened maps: average ranks, Pearson and Spearman correlation.

Each function takes [batch, ...] arrays and returns one value per example ([batch]); they are
shared by the agreement metrics (teacher vs student maps) and the faithfulness metrics.
They are jitted: called on host arrays each is one compiled program per input shape (op by op it was
about ten), and inside a traced function they are inlined like any jnp code.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import compilation
from distill_jax._checks import check_int


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


# --------------------------------------------------------------------------------------------
# Similarity of two maps
# --------------------------------------------------------------------------------------------
def ssim(a: jax.Array, b: jax.Array, *, win_size: int = 7) -> jax.Array:
    """Structural similarity of two flattened maps (1-D SSIM over windows of `win_size` values).

    SSIM_b = mean_w [(2 mu_a mu_b + C1)(2 s_ab + C2)] / [(mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)]
    over every window w of win_size consecutive values of the flattened maps (no padding), with
    window means mu, sample (co)variances s (divisor win_size - 1), C1 = (0.01 R)^2,
    C2 = (0.03 R)^2 and R = max(a_b, b_b) - min(a_b, b_b).
    This is what Quantus' `ssim` computes: skimage.metrics.structural_similarity(a_flat, b_flat,
    data_range=R) with skimage's defaults (uniform 7-value window, K1 = 0.01, K2 = 0.03, sample
    covariance, border windows cropped). Window variances are computed around the window mean (not
    as E[x^2] - E[x]^2), which is more accurate in float32. Two equal constant maps (R = 0) get 1;
    skimage gives NaN there.

    Args:
      a, b: [batch, ...] of the same shape, at least win_size values per example.
      win_size: odd window length >= 3.
    Returns:
      [batch] in [-1, 1] (1 = identical).
    Reference: Wang, Bovik, Sheikh & Simoncelli 2004, "Image Quality Assessment: From Error
    Visibility to Structural Similarity".
    """
    a, b = flat_pair(a, b, "ssim")
    win_size = check_int(win_size, "win_size")
    if win_size < 3 or win_size % 2 == 0 or win_size > a.shape[1]:
        raise ValueError(f"win_size must be odd, >= 3 and <= the values per example ({a.shape[1]}); got {win_size}")
    return _ssim_flat(a, b, win_size)


@partial(jax.jit, static_argnames="win_size")
def _ssim_flat(a: jax.Array, b: jax.Array, win_size: int) -> jax.Array:
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    n_win = a.shape[1] - win_size + 1

    def windows(v):  # [batch, win_size, n_win]: the values of every window
        return jnp.stack([v[:, i : i + n_win] for i in range(win_size)], axis=1)

    wa, wb = windows(a), windows(b)
    mu_a, mu_b = wa.mean(axis=1), wb.mean(axis=1)
    da, db = wa - mu_a[:, None], wb - mu_b[:, None]
    var_a = jnp.sum(da * da, axis=1) / (win_size - 1)
    var_b = jnp.sum(db * db, axis=1) / (win_size - 1)
    cov = jnp.sum(da * db, axis=1) / (win_size - 1)
    data_range = jnp.maximum(a.max(1), b.max(1)) - jnp.minimum(a.min(1), b.min(1))
    c1 = ((0.01 * data_range) ** 2)[:, None]
    c2 = ((0.03 * data_range) ** 2)[:, None]
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    value = jnp.mean(num / jnp.where(den > 0, den, 1.0), axis=1)
    return jnp.where(data_range > 0, value, 1.0)


# Per-example similarity of two maps [batch, ...] -> [batch] (1 = identical).
SIMILARITIES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "ssim": ssim,
    "spearman": spearman,
    "pearson": pearson,
}


# --------------------------------------------------------------------------------------------
# Agreement between maps
# --------------------------------------------------------------------------------------------
def top_k_overlap(a: jax.Array, b: jax.Array, *, k: int) -> jax.Array:
    """Fraction of the k largest entries of a that are also among the k largest of b.

    overlap_b = |top_k(a_b) ∩ top_k(b_b)| / k  (pass |maps| to rank by magnitude).

    Args:
      a, b: [batch, ...] of the same shape; k: 1 <= k <= entries per example (static: one compiled
        program per shape and k).
    Returns:
      [batch] in [0, 1].
    """
    if not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int in [1, {int(np.prod(jnp.shape(a)[1:]))}]; got {k!r}")
    return _top_k_overlap(a, b, k=int(k))


@compilation.run_once(static_argnames="k")
def _top_k_overlap(a, b, *, k: int):
    a, b = flat_pair(a, b, "top_k_overlap")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k must be an int in [1, {a.shape[1]}]; got {k!r}")

    def mask(v):
        _, idx = jax.lax.top_k(v, k)
        return jnp.zeros(v.shape, jnp.float32).at[idx].set(1.0)

    ma, mb = jax.vmap(mask)(a), jax.vmap(mask)(b)
    return jnp.sum(ma * mb, axis=1) / k
