"""Principal component analysis in jnp that matches scikit-learn and scales past one device.

A fitted `PCA` is a pytree (jit it, checkpoint it). Four ways to fit, picked by `method`:

- ``"covariance"``: mean and centred scatter matrix ``S = (X - mu)^T (X - mu)``, then ``eigh(S / (n - 1))``.
  The statistics merge exactly across batches (`covariance_stats` / `merge_stats` / `fit_batches`) and across
  devices (`fit_sharded`), so data that does not fit in memory or on one device can be reduced.
- ``"full"``: SVD of the centred data, the accurate reference.
- ``"randomized"``: Halko et al. (2011) range finder with oversampling and LU-normalised power iterations.
- ``"auto"``: scikit-learn's rule: covariance for tall data with at most 1000 features, full SVD for small
  problems, randomized for few components, full otherwise.

Conventions shared with ``sklearn.decomposition.PCA``: ``explained_variance = s^2 / (n - 1)`` (ddof=1),
``explained_variance_ratio`` over the total variance of all features, and the sign of each component chosen
so its largest-magnitude loading is positive (``svd_flip(..., u_based_decision=False)``).

Reference: Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011;
Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1979 (pairwise merge).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distill_jax import backend

__all__ = [
    "PCA",
    "CovStats",
    "randomized_n_iter",
    "choose_method",
    "fit",
    "transform",
    "inverse_transform",
    "n_components_for",
    "covariance_stats",
    "merge_stats",
    "fit_from_stats",
    "fit_batches",
    "sharded_covariance_stats",
    "fit_sharded",
]


METHODS = ("auto", "covariance", "full", "randomized")


# Relative variance below which a kept component is numerically unresolved by a float32 covariance fit:
# eigenvalues of S/(n-1) carry an absolute error of about eps * lambda_max.
_CONDITION_WARN = 1e-4


@struct.dataclass
class PCA:
    """A fitted PCA.

    Fields: ``mean`` [d], ``components`` [k, d] (orthonormal rows), ``explained_variance`` [k] (ddof=1),
    ``explained_variance_ratio`` [k], ``singular_values`` [k] of the centred data; static ``whiten`` (bool)
    and ``n_samples`` (int).
    """

    mean: jax.Array
    components: jax.Array
    explained_variance: jax.Array
    explained_variance_ratio: jax.Array
    singular_values: jax.Array
    whiten: bool = struct.field(pytree_node=False, default=False)
    n_samples: int = struct.field(pytree_node=False, default=0)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])


class CovStats(NamedTuple):
    """Sufficient statistics of a set of rows: count ``n``, ``mean`` [d], centred scatter ``m2`` [d, d].

    ``m2 = sum_i (x_i - mean)(x_i - mean)^T``; two sets merge exactly (Chan et al. 1979):
    ``m2 = m2_a + m2_b + delta delta^T n_a n_b / n`` with ``delta = mean_b - mean_a``.
    """

    n: jax.Array
    mean: jax.Array
    m2: jax.Array


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_x(x, name: str = "x"):
    """``x`` after checking its rank and dtype; host arrays stay on the host (they reach the device as an
    argument of the fit's compiled program: ``jnp.asarray`` would compile a program of its own)."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {tuple(x.shape)}; "
                         f"flatten images with x.reshape(len(x), -1)")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
            or x.dtype == jnp.bool_):
        raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    return x


def _to_float(x) -> jax.Array:
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _count_nonfinite(x) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x))


def _raise_if_nonfinite(bad, shape, name: str = "x") -> None:
    """Raises if ``bad`` (a count from `_count_nonfinite`, computed in the fit's program) is positive;
    traced counts (a fit inside jit) pass."""
    if not _is_traced(bad) and int(bad):
        raise ValueError(f"{name} has {int(bad)} non-finite values (NaN or inf) in shape {tuple(shape)}; "
                         f"clean or impute them before PCA")


def _check_k(n_components, n: int, d: int) -> int:
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)):
        raise ValueError(f"n_components must be an int, got {n_components!r}; to pick k by explained variance, "
                         f"fit all components and use n_components_for(p, 0.95)")
    k = int(n_components)
    if not 1 <= k <= min(n, d):
        raise ValueError(f"n_components={k} must be in [1, min(n_samples, n_features)] = [1, {min(n, d)}] "
                         f"for x of shape ({n}, {d})")
    return k


def _flip_signs(vt: jax.Array) -> jax.Array:
    """Rows of ``vt`` with signs chosen so that each row's largest-|entry| is positive (scikit-learn's rule)."""
    idx = jnp.argmax(jnp.abs(vt), axis=1)
    signs = jnp.sign(jnp.take_along_axis(vt, idx[:, None], axis=1))
    return vt * jnp.where(signs == 0, 1.0, signs).astype(vt.dtype)


def _assemble(mean, vt, explained_variance, total_var, n: int, whiten: bool) -> PCA:
    explained_variance = jnp.maximum(explained_variance, 0.0)
    ratio = explained_variance / jnp.where(total_var > 0, total_var, 1.0)
    singular = jnp.sqrt(explained_variance * (n - 1))
    return PCA(mean=mean, components=_flip_signs(vt), explained_variance=explained_variance,
               explained_variance_ratio=ratio, singular_values=singular, whiten=whiten, n_samples=n)


def _from_scatter(mean, m2, n: int, k: int, whiten: bool, *, upper_only: bool = False) -> PCA:
    """PCA from a mean and centred scatter matrix: top-k of eigh(m2 / (n - 1)).

    With ``upper_only`` only the upper triangle of ``m2`` is used (see `_upper_scatter`); it is mirrored
    explicitly, so no backend's eigh has to honour a triangle flag.
    """
    cov = m2 / (n - 1)
    cov = jnp.triu(cov) + jnp.triu(cov, 1).T if upper_only else 0.5 * (cov + cov.T)
    evecs, evals = jax.lax.linalg.eigh(cov, symmetrize_input=False)  # ascending eigenvalues
    evals = evals[::-1][:k]
    vt = evecs[:, ::-1][:, :k].T
    return _assemble(mean, vt, evals, jnp.trace(cov), n, whiten)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b in HIGHEST precision: PCA's statistics and projections are reported and compared with
    scikit-learn; TPU bf16 passes and A100/H100 TF32 would cost about three digits (on CPU: no change)."""
    return jnp.matmul(a, b, precision=backend.HIGHEST)


def _centre(x):
    mean = jnp.mean(x, axis=0)
    return mean, x - mean


def _upper_scatter(xc: jax.Array) -> jax.Array:
    """``xc^T xc`` correct in its upper triangle, using 3/4 of the multiply-adds (XLA has no syrk).

    With columns split as ``[A B]``: block rows ``A^T [A B]`` and ``[0 B^T B]``; the lower-left block is zero.
    Split from `backend.choices().pca_split_scatter_from` features on (CPU: 256; accelerators: one product).
    """
    d = xc.shape[1]
    split_from = backend.choices().pca_split_scatter_from
    if split_from is None or d < split_from:
        return _dot(xc.T, xc)
    h = d // 2
    top = _dot(xc[:, :h].T, xc)
    bottom = jnp.pad(_dot(xc[:, h:].T, xc[:, h:]), ((0, 0), (h, 0)))
    return jnp.concatenate([top, bottom], axis=0)


@functools.partial(jax.jit, static_argnames=("k", "whiten"))
def _fit_covariance(x, key, *, k: int, whiten: bool) -> PCA:
    del key
    mean, xc = _centre(x)
    return _from_scatter(mean, _upper_scatter(xc), x.shape[0], k, whiten, upper_only=True)


@functools.partial(jax.jit, static_argnames=("k", "whiten"))
def _fit_full(x, key, *, k: int, whiten: bool) -> PCA:
    del key
    n = x.shape[0]
    mean, xc = _centre(x)
    _, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    total_var = jnp.sum(s**2) / (n - 1)
    return _assemble(mean, vt[:k], s[:k] ** 2 / (n - 1), total_var, n, whiten)


def _lu_normalize(q: jax.Array) -> jax.Array:
    """The permuted unit-lower factor ``P L`` of ``q = P L U``: spans q's range, well conditioned, much cheaper
    than QR on XLA:CPU for tall [m, l] blocks."""
    lu, _, perm = jax.lax.linalg.lu(q)
    l = jnp.tril(lu[:, : q.shape[1]], -1) + jnp.eye(q.shape[0], q.shape[1], dtype=q.dtype)
    return jnp.zeros_like(l).at[perm].set(l)


def randomized_n_iter(k: int, n: int, d: int) -> int:
    """scikit-learn's ``iterated_power='auto'``: 7 power iterations when k < 0.1 min(n, d), else 4."""
    return 7 if k < 0.1 * min(n, d) else 4


@functools.partial(jax.jit, static_argnames=("k", "whiten", "n_oversamples", "n_iter"))
def _fit_randomized(x, key, *, k: int, whiten: bool, n_oversamples: int = 10, n_iter: int | None = None) -> PCA:
    n, d = x.shape
    n_iter = randomized_n_iter(k, n, d) if n_iter is None else n_iter
    mean, xc = _centre(x)
    a = xc if n >= d else xc.T  # work on the tall orientation: a is [m, p], m >= p
    p = a.shape[1]
    l = min(k + n_oversamples, p)
    q = jax.random.normal(key, (p, l), dtype=x.dtype)

    def power(_, q):  # LU-normalised power iteration, as scikit-learn's power_iteration_normalizer="LU"
        return _lu_normalize(_dot(a.T, _lu_normalize(_dot(a, q))))

    q = jax.lax.fori_loop(0, n_iter, power, q)
    q, _ = jnp.linalg.qr(_dot(a, q))  # one orthonormalisation at the end
    ub, s, vtb = jnp.linalg.svd(_dot(q.T, a), full_matrices=False)  # [l, p]
    if n >= d:
        vt = vtb[:k]
    else:  # a = xc^T: right singular vectors of xc are q @ ub
        vt = _dot(q, ub[:, :k]).T
    total_var = jnp.sum(xc**2) / (n - 1)
    return _assemble(mean, vt, s[:k] ** 2 / (n - 1), total_var, n, whiten)


def choose_method(n: int, d: int, k: int) -> str:
    """scikit-learn's ``svd_solver='auto'`` rule for an [n, d] input keeping k components."""
    if d <= 1000 and n >= 10 * d:
        return "covariance"
    if max(n, d) <= 500:
        return "full"
    if 1 <= k < 0.8 * min(n, d):
        return "randomized"
    return "full"


_FITTERS: dict[str, Callable[..., PCA]] = {
    "covariance": _fit_covariance,
    "full": _fit_full,
    "randomized": _fit_randomized,
}


def _warn_if_ill_conditioned(p: PCA, method: str) -> None:
    """Warns when a kept component's variance is below what a float32 covariance fit can resolve."""
    if _is_traced(p.explained_variance, p.mean):
        return
    ev = np.asarray(p.explained_variance, np.float64)
    mean = np.asarray(p.mean, np.float64)
    top = ev[0] if ev.size else 0.0
    if method == "covariance" and p.mean.dtype == jnp.float32 and top > 0 and ev[-1] < _CONDITION_WARN * top:
        bad = int(np.argmax(ev < _CONDITION_WARN * top))
        warnings.warn(f"PCA: components {bad}..{len(ev) - 1} have less than {_CONDITION_WARN:g} of the largest "
                      f"variance ({ev[-1]:.3g} vs {top:.3g}); a float32 covariance fit does not resolve them "
                      f"(rank-deficient or badly conditioned data). Use method='full' for them, or keep fewer "
                      f"components.", RuntimeWarning, stacklevel=3)
    scale = math.sqrt(max(float(np.sum(ev)), 0.0))
    offset = float(np.max(np.abs(mean))) if mean.size else 0.0
    if p.mean.dtype == jnp.float32 and offset > 0 and scale < 1e-4 * offset:
        warnings.warn(f"PCA: the data's spread ({scale:.3g}) is below 1e-4 of its offset ({offset:.3g}); float32 "
                      f"centring loses most digits. Subtract a rough mean (or standardize) before fitting.",
                      RuntimeWarning, stacklevel=3)


def fit(x, n_components: int, *, whiten: bool = False, method: str = "auto", key: jax.Array | None = None,
        n_oversamples: int = 10, n_iter: int | None = None) -> PCA:
    """Fits a PCA keeping ``n_components`` directions of largest variance.

    ``X - mu = U S V^T``; components are the first k rows of ``V^T`` (sign: largest-|loading| positive),
    ``explained_variance = S^2 / (n - 1)``, ``explained_variance_ratio = explained_variance / sum_j var(X_j)``.
    Jit-able with ``n_components``, ``whiten``, ``method`` static (the finite-value check and the
    conditioning warning run only outside jit).

    Args:
      x: [n, d] data (integers are cast to float32).
      n_components: k, 1 <= k <= min(n, d).
      whiten: if True, `transform` divides each score by sqrt(explained_variance).
      method: "auto" | "covariance" | "full" | "randomized" (see the module docstring).
      key: PRNG key for "randomized" (default ``jax.random.PRNGKey(0)``).
      n_oversamples: extra random directions for "randomized" (scikit-learn's default 10).
      n_iter: power iterations for "randomized" (default: scikit-learn's 'auto', see `randomized_n_iter`).

    Returns:
      PCA with mean [d], components [k, d], explained_variance [k], explained_variance_ratio [k],
      singular_values [k].

    Reference: Halko, Martinsson & Tropp (2011); scikit-learn's PCA.
    """
    x = _check_x(x)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"x must have at least 2 samples to estimate a variance, got shape {tuple(x.shape)}")
    k = _check_k(n_components, n, d)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    chosen = choose_method(n, d, k) if method == "auto" else method
    key = jax.random.PRNGKey(0) if key is None else key
    options = (("n_oversamples", n_oversamples), ("n_iter", n_iter)) if chosen == "randomized" else ()
    p, bad = _fit_checked(x, key, method=chosen, k=k, whiten=bool(whiten), options=options)
    _raise_if_nonfinite(bad, x.shape)
    _warn_if_ill_conditioned(p, chosen)
    return p


@functools.partial(jax.jit, static_argnames=("method", "k", "whiten", "options"))
def _fit_checked(x, key, *, method: str, k: int, whiten: bool, options: tuple) -> tuple[PCA, jax.Array]:
    """One program: the fit by `method` and the count of non-finite values of x (checked after, on the host)."""
    x = _to_float(x)
    return _FITTERS[method](x, key, k=k, whiten=whiten, **dict(options)), _count_nonfinite(x)


@jax.jit
def transform(p: PCA, x: jax.Array) -> jax.Array:
    """Scores ``z = (x - mean) V_k^T`` (divided by sqrt(explained_variance) when whitened).

    Args:
      p: a fitted PCA with d features.
      x: [n, d].

    Returns:
      z: [n, k].
    """
    _check_features(p, x, "x")
    z = _dot(x - p.mean, p.components.T)
    if p.whiten:
        z = z / jnp.sqrt(jnp.where(p.explained_variance > 0, p.explained_variance, 1.0))
    return z


@jax.jit
def inverse_transform(p: PCA, z: jax.Array) -> jax.Array:
    """Reconstruction ``x_hat = z V_k + mean`` (z re-scaled by sqrt(explained_variance) when whitened).

    Args:
      p: a fitted PCA with k components.
      z: [n, k] scores.

    Returns:
      x_hat: [n, d].
    """
    k = p.components.shape[0]
    if z.ndim != 2 or z.shape[1] != k:
        raise ValueError(f"z must be [n, {k}] (n_components={k}), got shape {tuple(z.shape)}")
    if p.whiten:
        z = z * jnp.sqrt(p.explained_variance)
    return _dot(z, p.components) + p.mean


def _check_features(p: PCA, x, name: str) -> None:
    d = p.components.shape[1]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must be [n, {d}] (the PCA was fitted on {d} features), got shape {tuple(x.shape)}")


def n_components_for(p_or_variance: PCA | Any, threshold: float = 0.95) -> int:
    """Smallest k whose cumulative explained_variance_ratio reaches ``threshold``.

    ``k = min{k : sum_{i<k} ratio_i >= threshold}``. Fit with all components first
    (``fit(x, min(x.shape))``) so the ratios cover the whole variance.

    Args:
      p_or_variance: a fitted PCA, or a 1-D array of explained-variance ratios in decreasing order.
      threshold: fraction of the variance to keep, in (0, 1].

    Returns:
      k (a Python int).
    """
    ratio = p_or_variance.explained_variance_ratio if isinstance(p_or_variance, PCA) else p_or_variance
    ratio = np.asarray(ratio, np.float64)
    if ratio.ndim != 1 or ratio.size == 0:
        raise ValueError(f"p_or_variance must be a PCA or a non-empty 1-D array of ratios, got shape {ratio.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    cum = np.cumsum(ratio)
    # float32 ratios may sum to 1 - 1e-7: allow that much slack at the top.
    hit = np.nonzero(cum >= threshold - 1e-6)[0]
    if hit.size == 0:
        raise ValueError(f"the {ratio.size} components explain only {cum[-1]:.4f} of the variance, below "
                         f"threshold={threshold}; fit with more components (up to min(n_samples, n_features))")
    return int(hit[0]) + 1


@jax.jit
def covariance_stats(x: jax.Array) -> CovStats:
    """Count, mean and centred scatter of one batch, computed two-pass (centre first, then the product).

    Args:
      x: [b, d] batch (b >= 1).

    Returns:
      CovStats(n=b, mean [d], m2 [d, d] = (x - mean)^T (x - mean)).
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a non-empty 2-D batch [b, d], got shape {tuple(x.shape)}")
    x = x.astype(jnp.float32) if not jnp.issubdtype(x.dtype, jnp.floating) else x
    mean, xc = _centre(x)
    return CovStats(jnp.asarray(x.shape[0], x.dtype), mean, _dot(xc.T, xc))


@jax.jit
def merge_stats(a: CovStats, b: CovStats) -> CovStats:
    """Exact merge of two sets' statistics (Chan, Golub & LeVeque 1979).

    ``n = n_a + n_b``, ``mean = mean_a + delta n_b / n``, ``m2 = m2_a + m2_b + delta delta^T n_a n_b / n``.
    """
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + jnp.outer(delta, delta) * (a.n * b.n / n)
    return CovStats(n, mean, m2)


def fit_from_stats(stats: CovStats, n_components: int, *, whiten: bool = False) -> PCA:
    """PCA (the "covariance" method) from accumulated statistics: top-k of eigh(m2 / (n - 1))."""
    n = int(stats.n)
    d = stats.mean.shape[0]
    if n < 2:
        raise ValueError(f"the statistics cover {n} samples; PCA needs at least 2")
    k = _check_k(n_components, n, d)
    p = _fit_from_stats(stats.mean, stats.m2, n=n, k=k, whiten=bool(whiten))
    _warn_if_ill_conditioned(p, "covariance")
    return p


@functools.partial(jax.jit, static_argnames=("n", "k", "whiten"))
def _fit_from_stats(mean, m2, *, n: int, k: int, whiten: bool) -> PCA:
    return _from_scatter(mean, m2, n, k, whiten)


def fit_batches(batches: Iterable, n_components: int, *, whiten: bool = False) -> PCA:
    """Covariance PCA over batches streamed one at a time (same result as `fit(concatenated, method="covariance")`).

    Each batch's statistics are computed two-pass and merged exactly (`merge_stats`), so float32
    accuracy does not depend on the batch order or an offset in the data. Compiled programs: one per
    batch shape, and the last batch's merge shares one with the eigendecomposition (a single batch: one
    program in all); all are cached for the next call with the same shapes.

    Args:
      batches: an iterable of [b_i, d] arrays (all with the same d), e.g. a generator reading from disk.
      n_components: k, at most min(total n, d).
      whiten: see `fit`.

    Returns:
      PCA, as `fit`.
    """
    # One batch is held back, so that the last one is merged in the final program; each merged batch's
    # non-finite count is read one batch later, when it is ready, so the loop never waits for the device.
    stats, held, pending, n = None, None, None, 0
    for i, batch in enumerate(batches):
        batch = _check_x(batch, f"batch {i}")
        if batch.shape[0] == 0:
            continue
        if held is not None and batch.shape[1] != held[1].shape[1]:
            raise ValueError(f"batch {i} has {batch.shape[1]} features, earlier batches {held[1].shape[1]}")
        if held is not None:
            stats, bad = _accumulate(_empty_stats(held[1]) if stats is None else stats, held[1])
            if pending is not None:
                _raise_if_nonfinite(*pending)
            pending = (bad, held[1].shape, f"batch {held[0]}")
        held, n = (i, batch), n + batch.shape[0]
    if held is None:
        raise ValueError("batches is empty: fit_batches needs at least one non-empty [b, d] batch")
    if pending is not None:
        _raise_if_nonfinite(*pending)
    d = held[1].shape[1]
    if n < 2:
        raise ValueError(f"the statistics cover {n} samples; PCA needs at least 2")
    k = _check_k(n_components, n, d)
    p, bad = _accumulate_and_fit(_empty_stats(held[1]) if stats is None else stats, held[1], n=n, k=k,
                                 whiten=bool(whiten))
    _raise_if_nonfinite(bad, held[1].shape, f"batch {held[0]}")
    _warn_if_ill_conditioned(p, "covariance")
    return p


def _empty_stats(x) -> CovStats:
    """Statistics of no rows, in the float dtype x's statistics will have (merging into them is exact)."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else np.float32
    d = x.shape[1]
    return CovStats(np.zeros((), dtype), np.zeros((d,), dtype), np.zeros((d, d), dtype))


@jax.jit
def _accumulate(stats: CovStats, x) -> tuple[CovStats, jax.Array]:
    """``stats`` merged with x's statistics (x's alone when ``stats`` covers no rows), and x's non-finite count."""
    x = _to_float(x)
    own = covariance_stats(x)
    merged = merge_stats(stats, own)
    merged = jax.tree_util.tree_map(lambda m, o: jnp.where(stats.n > 0, m, o), merged, own)
    return merged, _count_nonfinite(x)


@functools.partial(jax.jit, static_argnames=("n", "k", "whiten"))
def _accumulate_and_fit(stats: CovStats, x, *, n: int, k: int, whiten: bool) -> tuple[PCA, jax.Array]:
    stats, bad = _accumulate(stats, x)
    return _from_scatter(stats.mean, stats.m2, n, k, whiten), bad


def sharded_covariance_stats(x: jax.Array, mesh: Mesh, *, axis: str = "data") -> CovStats:
    """Statistics of a batch sharded over ``mesh`` along ``axis``: each device reduces its rows, then ``psum``.

    Pass 1: ``mean = psum(sum x_local) / n``; pass 2: ``m2 = psum((x_local - mean)^T (x_local - mean))``.
    Only [d] and [d, d] partial sums cross devices.

    Args:
      x: [n, d], n divisible by the size of ``axis``.
      mesh: a `jax.sharding.Mesh` with an axis named ``axis``.

    Returns:
      CovStats, replicated.
    """
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    x = _check_x(x)
    size = mesh.shape[axis]
    if x.shape[0] % size:
        raise ValueError(f"x has {x.shape[0]} rows, not divisible by the {size} devices on mesh axis {axis!r}; "
                         f"drop or pad rows (padding changes the statistics)")
    stats, bad = _sharded_stats(mesh, axis)(x)
    _raise_if_nonfinite(bad, x.shape)
    return stats


@functools.lru_cache(maxsize=None)
def _sharded_stats(mesh: Mesh, axis: str):
    def local(xl):
        xl = _to_float(xl)
        n = jax.lax.psum(jnp.asarray(xl.shape[0], xl.dtype), axis)
        mean = jax.lax.psum(jnp.sum(xl, axis=0), axis) / n
        xc = xl - mean
        return CovStats(n, mean, jax.lax.psum(_dot(xc.T, xc), axis)), jax.lax.psum(_count_nonfinite(xl), axis)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=(CovStats(P(), P(), P()), P())))


def fit_sharded(x: jax.Array, n_components: int, *, mesh: Mesh, axis: str = "data", whiten: bool = False) -> PCA:
    """Covariance PCA of a batch sharded over a device mesh; equals the single-device `fit(method="covariance")`.

    Args:
      x: [n, d] (a host array or a jax.Array sharded along rows), n divisible by the size of ``axis``.
      n_components: k.
      mesh: mesh with a data axis named ``axis``.
      whiten: see `fit`.

    Returns:
      PCA, replicated on the mesh.
    """
    return fit_from_stats(sharded_covariance_stats(x, mesh, axis=axis), n_components, whiten=whiten)
