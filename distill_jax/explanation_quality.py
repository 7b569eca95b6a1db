"""Explanation quality beyond faithfulness: robustness, complexity and randomisation metrics.

Each metric returns one value per example ([batch]; the sMPRT curve is [batch, layers]) and follows
the definitions of Quantus 0.6 (Hedström et al. 2023, "Quantus: An Explainable AI Toolkit for
Responsible Evaluation of Neural Network Explanations and Beyond", JMLR); where a value differs
from Quantus the function's docstring says how and why.

Robustness (`avg_sensitivity`, `local_lipschitz`) and `random_logit` take `attr_fn(x, target) ->
maps [batch, ...]` (close over apply_fn and the method's options).
The complexity metrics (`sparseness`, `complexity`, `discrete_entropy`) read the attribution only.
The parameter-randomisation tests (`smooth_mprt`, `efficient_mprt`) take
`attr_fn(params, x, target) -> maps` and the parameters, like `metrics.randomization_check`.

Common differences from Quantus, valid for every function here:
- No attribution normalisation. Quantus divides maps by the largest |value| of the whole batch
  (`normalise_by_max`) in several metrics by default, which makes one example's score depend on the
  others; run Quantus with `normalise=False` (or normalise inside attr_fn) to compare values.
- Flattening is in this library's layout (NHWC). Quantus flattens channel-first maps; the two
  orders agree for maps with one channel or without a channel axis (the usual case).
- Randomness comes from `key` (jax.random), so values equal Quantus' only in distribution.
- Samples are evaluated `chunk` at a time (`lax.map` / `lax.scan`), so memory is bounded by
  `chunk` copies of the batch whatever `samples` is. The values do not depend on `chunk` with the
  default threefry keys; "rbg"/"unsafe_rbg" keys draw different noise under vmap, so with those
  the noise (not its distribution) changes with `chunk`.

Call the metrics that take an attr_fn inside `jax.jit` (params as an argument, e.g.
`jax.jit(lambda p, x, t, k: avg_sensitivity(partial(attr, p), x, t, key=k, radius=0.1))`):
eagerly, the sample loop is traced and compiled again on every call.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attribution_core import check_positive_int, check_x, sample_chunk, validate_target
from distill_jax import compilation
from distill_jax.param_randomization import as_dicts, check_layer_order, default_randomize, randomize_layer
from distill_jax.stats import flat_pair, pearson, spearman

__all__ = [
    "COMPLEXITY_MEASURES",
    "NORMS",
    "PERTURBATIONS",
    "SIMILARITIES",
    "avg_sensitivity",
    "complexity",
    "discrete_entropy",
    "efficient_mprt",
    "local_lipschitz",
    "max_sensitivity",
    "random_logit",
    "smooth_mprt",
    "sparseness",
    "ssim",
]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {value!r}")
    return float(value)


def _check_choice(value: Any, table: Mapping, name: str) -> Any:
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}; got {value!r}")
    return table[value]


def _check_batch_target(target: Any, batch: int) -> jax.Array:
    target = jnp.asarray(target)
    if target.ndim < 1 or target.shape[0] != batch or not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(f"target must be integer class indices [batch] with batch={batch}; "
                         f"got shape {target.shape} dtype {target.dtype}")
    return target


def _check_maps(out: Any, batch: int, what: str) -> None:
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) < 2 or shape[0] != batch:
        raise ValueError(f"{what} must return maps [batch, ...] with batch={batch}; got shape {shape}")


def _check_attribution_batch(attribution: Any, name: str = "attribution") -> jax.Array:
    a = jnp.asarray(attribution)
    if a.ndim < 2 or not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real array [batch, ...]; got shape {a.shape} dtype {a.dtype}")
    return a.reshape(a.shape[0], -1).astype(jnp.result_type(a.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# Loops over samples (memory bounded by `chunk` samples)
# --------------------------------------------------------------------------------------------
def _map_samples(fn: Callable, keys: jax.Array, chunk: int | None) -> jax.Array:
    """[fn(k) for k in keys] stacked on a new leading axis; `chunk` samples per `lax.map` step."""
    return jax.lax.map(fn, keys, batch_size=sample_chunk(chunk, keys.shape[0]))


def _sum_samples(fn: Callable, xs: Any, chunk: int | None) -> jax.Array:
    """sum_s fn(xs[s]) over the leading axis of the pytree xs, `chunk` samples per `lax.scan` step.

    Only the running sum is kept (the samples' outputs are never stacked); the samples left over
    after the whole chunks run as one more vmapped step.
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    size = sample_chunk(chunk, n)
    full, rest = divmod(n, size)
    take = lambda lo, hi: jax.tree_util.tree_map(lambda a: a[lo:hi], xs)
    step_sum = lambda part: jnp.sum(jax.vmap(fn)(part), axis=0)
    out = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: a[0], xs))
    total = jnp.zeros(out.shape, out.dtype)
    chunks = jax.tree_util.tree_map(lambda a: a.reshape((full, size) + a.shape[1:]), take(0, full * size))
    total, _ = jax.lax.scan(lambda acc, part: (acc + step_sum(part), None), total, chunks)
    if rest:
        total = total + step_sum(take(full * size, n))
    return total


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------
def _norm_l2(v: jax.Array) -> jax.Array:
    return jnp.linalg.norm(v, axis=1)


def _norm_linf(v: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(v), axis=1)


# Norms of flattened maps [batch, d] -> [batch]; "fro" and "l2" are the same on flattened maps (as in Quantus).
NORMS: dict[str, Callable[[jax.Array], jax.Array]] = {"fro": _norm_l2, "l2": _norm_l2, "linf": _norm_linf}


def _uniform_noise(key, shape, dtype, radius):
    return jax.random.uniform(key, shape, dtype, -radius, radius)


def _gaussian_noise(key, shape, dtype, radius):
    return radius * jax.random.normal(key, shape, dtype)


# Input perturbations u(key, shape, dtype, radius): U(-r, r) per value, or N(0, r^2) per value.
PERTURBATIONS: dict[str, Callable] = {"uniform": _uniform_noise, "gaussian": _gaussian_noise}


def _robustness_setup(attr_fn, x, target, samples, radius, perturbation):
    x = check_x(x)
    target = _check_batch_target(target, x.shape[0])
    check_positive_int(samples, "samples")
    _check_positive_float(radius, "radius")
    noise_fn = _check_choice(perturbation, PERTURBATIONS, "perturbation")
    _check_maps(jax.eval_shape(attr_fn, x, target), x.shape[0], "attr_fn(x, target)")
    return x, target, noise_fn


def avg_sensitivity(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    radius: float,
    samples: int = 10,
    normalize: bool = True,
    norm: str = "fro",
    perturbation: str = "uniform",
    chunk: int | None = None,
) -> jax.Array:
    """Average sensitivity of an explanation under small input noise (Monte Carlo).

    AVG-SENS_b = (1/S) sum_{s=1..S} ||A(x_b + u_s) - A(x_b)|| / ||A(x_b)||,  u_s ~ U(-r, r)^d
    (without the denominator when normalize=False). As Quantus `AvgSensitivity`
    (perturb_func=batch_uniform_noise, lower_bound=r, Frobenius norms of the flattened maps, mean
    over `nr_samples`); Quantus' default r is 0.2 and S is 200. The noise draws are those of
    `metrics.max_sensitivity` with the same key, so max_sensitivity is the max of the same terms.
    A zero map A(x_b) makes the ratio huge (the denominator is floored at the smallest float);
    Quantus gives inf there.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...] (close over apply_fn and options).
      x: [batch, ...] inputs. target: [batch] ints, passed to attr_fn as is.
      key: PRNG key for the noise. radius: r > 0 (half-width for "uniform", std for "gaussian").
      samples: S >= 1. normalize: divide by ||A(x_b)||. norm: a key of `NORMS` ("fro", "l2", "linf"),
        used in numerator and denominator. perturbation: a key of `PERTURBATIONS`.
      chunk: noise samples per `lax.map` step (None: the backend default, see `sample_chunk`).
    Returns:
      [batch] (lower = more robust).
    Reference: Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations".
    """
    return _sensitivities(attr_fn, x, target, key=key, radius=radius, samples=samples, normalize=normalize,
                          norm=norm, perturbation=perturbation, chunk=chunk).mean(axis=0)


def max_sensitivity(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    radius: float,
    samples: int = 10,
    normalize: bool = True,
    chunk: int | None = None,
) -> jax.Array:
    """Max-sensitivity of an explanation under small uniform input noise (Monte Carlo).

    SENS_b = max_{s} ||A(x_b + u_s) - A(x_b)||_2 / ||A(x_b)||_2,  u_s ~ U(-r, r)^d
    (without the denominator when normalize=False): the max over the same terms whose mean is
    `avg_sensitivity` with the same key.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...] (close over apply_fn and options).
      x: [batch, ...]; target: [batch]; key: PRNG key; radius: r > 0; samples: >= 1;
      chunk: noise samples per `lax.map` step (None: the backend default, see `sample_chunk`).
    Returns:
      [batch].
    Reference: Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations".
    """
    return _sensitivities(attr_fn, x, target, key=key, radius=radius, samples=samples, normalize=normalize,
                          norm="l2", perturbation="uniform", chunk=chunk).max(axis=0)


def _sensitivities(attr_fn, x, target, *, key, radius, samples, normalize, norm, perturbation, chunk) -> jax.Array:
    """[samples, batch]: ||A(x + u_s) - A(x)|| (/ ||A(x)|| when normalize), u_s from `PERTURBATIONS[perturbation]`."""
    x, target, noise_fn = _robustness_setup(attr_fn, x, target, samples, radius, perturbation)
    norm_fn = _check_choice(norm, NORMS, "norm")
    ref = attr_fn(x, target).reshape(x.shape[0], -1)

    def one(k):
        noisy = x + noise_fn(k, x.shape, x.dtype, radius)
        return norm_fn(attr_fn(noisy, target).reshape(ref.shape) - ref)

    dist = _map_samples(one, jax.random.split(key, samples), chunk)
    if not normalize:
        return dist
    den = norm_fn(ref)
    return dist / jnp.maximum(den, jnp.finfo(den.dtype).tiny)


def local_lipschitz(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    radius: float,
    samples: int = 10,
    perturbation: str = "gaussian",
    chunk: int | None = None,
) -> jax.Array:
    """Local Lipschitz estimate of an explanation: the largest change of the map per unit of input change.

    LLE_b = max_{s=1..S} ||A(x_b + u_s) - A(x_b)||_2 / (||u_s||_2 + 1e-10),  u_s ~ N(0, r^2 I)
    As Quantus `LocalLipschitzEstimate` (batch_gaussian_noise with perturb_std=r, Euclidean
    distances in numerator and denominator, the same 1e-10, max over `nr_samples`); Quantus'
    default r is 0.1 and S is 200, and it normalises the maps by the batch max by default
    (normalise=True): pass normalise=False there to compare. The paper maximises over a ball with
    an optimiser; this (like Quantus) is the Monte Carlo lower bound of that maximum.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...].
      x: [batch, ...]. target: [batch] ints, passed to attr_fn as is.
      key: PRNG key. radius: r > 0 (std for "gaussian", half-width for "uniform").
      samples: S >= 1. perturbation: a key of `PERTURBATIONS` (default "gaussian", as Quantus).
      chunk: noise samples per `lax.map` step (None: the backend default).
    Returns:
      [batch] (lower = more robust; exactly L for A(x) = L x).
    Reference: Alvarez-Melis & Jaakkola 2018, "On the Robustness of Interpretability Methods".
    """
    x, target, noise_fn = _robustness_setup(attr_fn, x, target, samples, radius, perturbation)
    ref = attr_fn(x, target).reshape(x.shape[0], -1)

    def one(k):
        u = noise_fn(k, x.shape, x.dtype, radius)
        change = _norm_l2(attr_fn(x + u, target).reshape(ref.shape) - ref)
        return change / (_norm_l2(u.reshape(x.shape[0], -1)) + 1e-10)

    return _map_samples(one, jax.random.split(key, samples), chunk).max(axis=0)


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
    return _gini(_check_attribution_batch(attribution), _check_positive_float(eps, "eps", allow_zero=True))


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
    return _histogram_entropy(_check_attribution_batch(attribution), check_positive_int(n_bins, "n_bins"))


@partial(jax.jit, static_argnames="n_bins")
def _histogram_entropy(a: jax.Array, n_bins: int) -> jax.Array:
    bins = jax.vmap(lambda v: _histogram_bins(v, n_bins))(a)
    counts = jax.vmap(lambda b: jnp.bincount(b, length=n_bins))(bins)
    return _entropy(counts.astype(a.dtype) / a.shape[1])


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
    win_size = check_positive_int(win_size, "win_size")
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
# Random logit
# --------------------------------------------------------------------------------------------
def _off_target(key: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
    """A class drawn uniformly from the num_classes - 1 classes other than target_b, per example."""
    r = jax.random.randint(key, target.shape, 0, num_classes - 1, dtype=target.dtype)
    return r + (r >= target).astype(target.dtype)


def random_logit(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    num_classes: int,
    similarity: str = "ssim",
) -> jax.Array:
    """Random-logit test: similarity of the explanation of the target and of a random other class.

    RL_b = sim(A(x_b, y_b), A(x_b, c_b)),  c_b ~ Uniform({0..num_classes-1} minus {y_b}).
    As Quantus `RandomLogit` (similarity_func=ssim over the flattened maps by default; abs=False).
    Quantus normalises both batches of maps by their batch max by default (normalise=True), which
    changes SSIM; run it with normalise=False to compare. Quantus' spearman/pearson give NaN for a
    constant map where `distill_jax.stats` gives 0.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...] (must accept any class as target).
      x: [batch, ...]. target: [batch] ints in [0, num_classes).
      key: PRNG key for the other classes. num_classes: >= 2.
      similarity: a key of `SIMILARITIES` ("ssim", "spearman", "pearson").
    Returns:
      [batch] (lower = the explanation depends more on the class explained).
    Reference: Sixt, Granz & Landgraf 2020, "When Explanations Lie: Why Many Modified BP
    Attributions Fail" (ICML).
    """
    x = check_x(x)
    num_classes = check_positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (a class other than the target is needed); got {num_classes}")
    target = validate_target(target, x.shape[0], num_classes)
    if target.ndim != 1:
        raise ValueError(f"target must be [batch] here; got shape {target.shape}")
    sim_fn = _check_choice(similarity, SIMILARITIES, "similarity")
    _check_maps(jax.eval_shape(attr_fn, x, target), x.shape[0], "attr_fn(x, target)")
    return sim_fn(attr_fn(x, target), attr_fn(x, _off_target(key, target, num_classes)))


# --------------------------------------------------------------------------------------------
# Model-parameter randomisation: smooth MPRT and efficient MPRT
# --------------------------------------------------------------------------------------------
def _layer_keys(key: jax.Array, layer_order: Sequence[str]) -> jax.Array:
    """One key per layer, as `metrics.randomization_check` draws them."""
    return jax.random.split(key, len(layer_order))


def _fully_randomized(params: dict, layer_order: Sequence[str], key: jax.Array, randomize: Callable) -> dict:
    for name, k in zip(layer_order, _layer_keys(key, layer_order)):
        params = randomize_layer(params, k, name=name, randomize=randomize)
    return params


def _mprt_setup(attr_fn, params, layer_order, x, target):
    x = check_x(x)
    params = as_dicts(params)
    target = _check_batch_target(target, x.shape[0])
    layer_order = check_layer_order(params, layer_order)
    _check_maps(jax.eval_shape(attr_fn, params, x, target), x.shape[0], "attr_fn(params, x, target)")
    return params, x, target, layer_order


def smooth_mprt(
    attr_fn: Callable,
    params: Any,
    layer_order: Sequence[str],
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 50,
    noise: float = 0.1,
    similarity: str = "spearman",
    absolute: bool = True,
    randomize: Callable[[jax.Array, jax.Array], jax.Array] = default_randomize,
    chunk: int | None = None,
) -> jax.Array:
    """Smooth model-parameter randomisation test (sMPRT): MPRT on noise-averaged explanations.

    Denoised map:  Ā_theta(x_b) = (1/S) sum_{s=1..S} A_theta(x_b + e_s),  e_s ~ N(0, sigma_b^2),
    sigma_b = noise * (max x_b - min x_b), and e_S = 0 (the last sample is the clean input, as Quantus).
    theta_i = the trained params with layer_order[0..i] randomised (cascading, in the given order):
    sMPRT_{b,i} = sim(|Ā_theta(x_b)|, |Ā_theta_i(x_b)|)  (without |.| when absolute=False).
    The same noise draws serve every model (common random numbers), so a layer that does not change
    the attribution keeps similarity 1 at any noise level. The models run one after another in one
    `lax.scan` (the attribution is traced once; one copy of the params is alive), and each model's
    samples run `chunk` at a time.

    `layer_order` is the randomisation order, as in `metrics.randomization_check`: list the output
    layer first for the top-down cascade of Adebayo et al., or the input layer first for Quantus'
    default (layer_order="bottom_up"), which Hedström et al. recommend. Name the model's parameter
    subtrees explicitly ("/" for nested names): do not derive the order from the params dict,
    whose keys jit and checkpointing sort alphabetically ("dense10" before "dense2").

    Differences from Quantus `SmoothMPRT`: layers are randomised by `randomize` (default: normal with
    the leaf's std) where Quantus calls torch's reset_parameters; maps are not normalised (the
    correlations are scale-invariant; Quantus' batch-wide second-moment normalisation would only
    change SSIM); Quantus also reports the similarity of two independently smoothed maps of the
    trained model ("original"), which is 1 here by construction and therefore not returned.

    Args:
      attr_fn: attr_fn(params, x, target) -> maps [batch, ...] (params are an argument, not closed over).
      params: (nested) dict of parameters. layer_order: subtree names in randomisation order.
      x: [batch, ...]. target: [batch] ints, passed to attr_fn as is.
      key: PRNG key (split into the new weights' key and the input noise key).
      samples: S >= 1 (Quantus' default 50; S = 1 is plain MPRT). noise: >= 0, fraction of each
        example's value range (Quantus' default 0.1).
      similarity: a key of `SIMILARITIES` (default "spearman", as Quantus).
      absolute: compare |maps| (Quantus' default abs=True). randomize: (key, leaf) -> new leaf.
      chunk: noise samples per `lax.scan` step (None: the backend default).
    Returns:
      [batch, len(layer_order)] similarities (lower = the explanation depends more on the weights).
    Reference: Hedström et al. 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
    Parameter Randomisation Test" (XAI in Action workshop, NeurIPS); Adebayo et al. 2018,
    "Sanity Checks for Saliency Maps".
    """
    params, x, target, layer_order = _mprt_setup(attr_fn, params, layer_order, x, target)
    samples = check_positive_int(samples, "samples")
    _check_positive_float(noise, "noise", allow_zero=True)
    sim_fn = _check_choice(similarity, SIMILARITIES, "similarity")
    layer_key, noise_key = jax.random.split(key)
    flat = x.reshape(x.shape[0], -1)
    sigma = (noise * (flat.max(axis=1) - flat.min(axis=1))).reshape((-1,) + (1,) * (x.ndim - 1))
    noisy = jnp.arange(samples) < samples - 1
    noise_keys = jax.random.split(noise_key, samples)

    def smoothed(p):
        def one(inp):
            k, use_noise = inp
            eps = jnp.where(use_noise, jax.random.normal(k, x.shape, x.dtype) * sigma, 0.0)
            return attr_fn(p, x + eps, target)

        mean = _sum_samples(one, (noise_keys, noisy), chunk) / samples
        return jnp.abs(mean) if absolute else mean

    # One scan over the models: step 0 keeps the trained params (its map becomes the reference),
    # step i randomises layer_order[i - 1] on top of the previous step's params. The attribution is
    # traced once and only one copy of the params is alive.
    branches = [lambda p, k: p] + [partial(randomize_layer, name=n, randomize=randomize) for n in layer_order]
    layer_keys = _layer_keys(layer_key, layer_order)
    steps = (jnp.arange(len(branches)), jnp.concatenate([layer_keys[:1], layer_keys]))
    out = jax.eval_shape(attr_fn, params, x, target)

    def step(carry, inp):
        p, reference = carry
        i, k = inp
        p = jax.lax.switch(i, branches, p, k)
        current = smoothed(p)
        reference = jnp.where(i == 0, current, reference)
        return (p, reference), sim_fn(reference, current)

    init = (params, jnp.zeros(out.shape, out.dtype))
    _, similarities = jax.lax.scan(step, init, steps)  # [1 + layers, batch]; row 0 compares the reference to itself
    return similarities[1:].T


def _complexity_entropy(a: jax.Array, n_bins: int) -> jax.Array:
    return complexity(a)


# Complexity of a map [batch, ...] -> [batch] for eMPRT, called as fn(maps, n_bins).
COMPLEXITY_MEASURES: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "discrete_entropy": lambda a, n_bins: discrete_entropy(a, n_bins=n_bins),
    "entropy": _complexity_entropy,
}


def efficient_mprt(
    attr_fn: Callable,
    params: Any,
    layer_order: Sequence[str],
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    measure: str = "discrete_entropy",
    n_bins: int = 100,
    absolute: bool = False,
    randomize: Callable[[jax.Array, jax.Array], jax.Array] = default_randomize,
) -> jax.Array:
    """Efficient model-parameter randomisation test (eMPRT): relative rise in explanation complexity.

    eMPRT_b = (H(A_rand(x_b)) - H(A_theta(x_b))) / H(A_theta(x_b))
    with A_rand the explanation of the model whose layer_order layers are all randomised and H the
    histogram entropy `discrete_entropy` with n_bins bins (measure="discrete_entropy") or the
    `complexity` entropy of |A| (measure="entropy"). As Quantus `EfficientMPRT` (its
    complexity_func=discrete_entropy, n_bins=100 when no binning rule is given, skip_layers=True,
    abs=False, normalise=False; its score list is (b - a) / a of the last and the original
    complexities). A map of zero complexity gives inf or NaN, as in Quantus.

    Layers are randomised by `randomize` (Quantus: torch's reset_parameters), in layer_order with
    the keys of `metrics.randomization_check` for the same key; the final model does not depend on
    the order.

    Args:
      attr_fn: attr_fn(params, x, target) -> maps [batch, ...].
      params: (nested) dict of parameters. layer_order: the subtree names to randomise ("/" nests).
      x: [batch, ...]. target: [batch] ints. key: PRNG key for the new weights.
      measure: a key of `COMPLEXITY_MEASURES`. n_bins: >= 1 (discrete_entropy only).
      absolute: score |maps|. randomize: (key, leaf) -> new leaf.
    Returns:
      [batch] (higher = the explanation of a random model is more complex: the method passes).
    Reference: Hedström et al. 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
    Parameter Randomisation Test" (XAI in Action workshop, NeurIPS).
    """
    params, x, target, layer_order = _mprt_setup(attr_fn, params, layer_order, x, target)
    measure_fn = _check_choice(measure, COMPLEXITY_MEASURES, "measure")
    n_bins = check_positive_int(n_bins, "n_bins")
    models = [params, _fully_randomized(params, layer_order, key, randomize)]

    def score(i):
        a = attr_fn(jax.lax.switch(i, [lambda m=m: m for m in models]), x, target)
        return measure_fn(jnp.abs(a) if absolute else a, n_bins)

    original, randomized = jax.lax.map(score, jnp.arange(2))  # one trace of attr_fn for both models
    return (randomized - original) / original
