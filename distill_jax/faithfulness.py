"""Faithfulness of attributions: does the model's output move the way the attribution says it should?

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring): every
metric here is `metric(apply_fn, x, attribution, target, *, options)`.

Every metric here returns one value per example. `apply_fn` is any pure `x -> logits [batch, classes]`;
unless a metric says otherwise the model output it reads is the target logit f(x) = logits[b, target_b]
(Quantus reads "the model output as given", i.e. logits unless its `softmax=True`).

Targets: [batch] ints (one class per example, attribution shaped as below), or [batch, K] ints (K
classes per example) with one attribution per target, [batch, K, ...]; the result then gains a K axis
after the batch axis ([batch] -> [batch, K], [batch, n] -> [batch, K, n]), and column k is exactly the
call with (attribution[:, k], target[:, k]) -- the same draws from `key` for every k
(`attribution_core.per_target_scored`, which `metrics.deletion_auc` and `explain.ig_completeness_error` use too).

Features. The metrics that remove or perturb "features" take `patch`:
  - `patch=None`: every entry of x is one feature (NHWC: one pixel of one channel). The attribution
    is used as given: shaped like x, or a [batch, H, W] map broadcast over the channels (the entry
    (h, w, c) then carries A[h, w]) -- this is what Quantus does with `a_batch`.
  - `patch=p` (int, NHWC only): p x p pixel squares with all their channels are one feature; its
    attribution is the sum of A over the square and the channels. The squares tile the image as in
    Quantus: when p does not divide H, the grid is shifted by floor((p - H mod p) / 2) rows so the
    partial squares sit at both borders (the same for W).

Baselines (`baseline=` wherever features are "removed"): a float, an array like x (or like one
example), "zeros", "blur", or the per-example constants of Quantus: "black" (min of x_b), "white"
(max of x_b), "mean" (mean of x_b).

Memory: each metric evaluates its perturbed copies of the batch with `jax.lax.map(..., batch_size=
sample_chunk(chunk, n))`, i.e. `chunk` copies of the batch at a time (default: 8 on CPU, 64 on
accelerators); every chunk size gives the same values (up to float rounding). Randomness comes
only from `key`; the documented draw order lets a caller reproduce the perturbations. Chunk
invariance needs a vmap-consistent key type: JAX's default threefry keys are, "rbg" keys are not.

Bad targets: concrete targets outside [0, num_classes) raise ValueError; inside `jax.jit` the score
of such an example is NaN.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attribution_core import (
    BASELINES, ApplyFn, check_attribution, check_key, check_positive_int, check_x, num_classes_of,
    per_target_scored, resolve_baseline, sample_chunk, target_logits, validate_target,
)
from distill_jax.stats import pearson, spearman

__all__ = [
    "ORDERS",
    "ROAD_SCORES",
    "faithfulness_correlation",
    "infidelity",
    "monotonicity",
    "noisy_linear_imputation",
    "region_perturbation",
    "road",
    "sensitivity_n",
]


# --------------------------------------------------------------------------------------------
# Shared checks and helpers
# --------------------------------------------------------------------------------------------
def _prepare(apply_fn: ApplyFn, x: Any, target: Any):
    """Checked (x, target [batch] or [batch, K] int32, number of classes)."""
    x = check_x(x)
    num_classes = num_classes_of(apply_fn, x)
    return x, validate_target(target, x.shape[0], num_classes), num_classes


def _need_nhwc(x: jax.Array, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} needs NHWC images x [batch, H, W, C]; got shape {tuple(x.shape)}")


def _check_nonnegative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    return float(value)


def _scored(score: Callable, x: jax.Array, attribution: Any, target: jax.Array, num_classes: int):
    """`per_target_scored(score, ...)` with the attribution checked once (`check_attribution`), so `score`
    receives `a` shaped like x: [batch, ...] per target, from [batch, ...] or, for [batch, K] targets,
    [batch, K, ...] (a [batch, (K,) H, W] map of NHWC x is broadcast over the channels)."""
    a = jnp.asarray(attribution)
    if target.ndim == 1:
        a = check_attribution(a, x)
    elif a.ndim >= 2 and a.shape[:2] == target.shape:  # any other shape: per_target_scored names the mismatch
        a = jax.vmap(lambda column: check_attribution(column, x), in_axes=1, out_axes=1)(a)
    return per_target_scored(score, x, a, target, num_classes)


_PER_EXAMPLE_BASELINES: dict[str, Callable[..., jax.Array]] = {"black": jnp.min, "white": jnp.max, "mean": jnp.mean}


def _replacement(x: jax.Array, baseline: Any) -> jax.Array:
    """The values removed entries are set to, shaped like x (see the module docstring)."""
    if isinstance(baseline, str):
        if baseline in _PER_EXAMPLE_BASELINES:
            axes = tuple(range(1, x.ndim))
            return jnp.broadcast_to(_PER_EXAMPLE_BASELINES[baseline](x, axis=axes, keepdims=True), x.shape)
        if baseline not in BASELINES:
            names = sorted(set(BASELINES) | set(_PER_EXAMPLE_BASELINES))
            raise ValueError(f"baseline must be a float, an array like x, or one of {names}; got {baseline!r}")
        if baseline == "blur":
            _need_nhwc(x, 'baseline="blur"')
    return resolve_baseline(x, baseline)


def _pad_before(size: int, patch: int) -> int:
    """Rows (or columns) of padding before the image when p x p squares tile it (Quantus' get_padding_size)."""
    rest = size % patch
    return 0 if rest == 0 else (patch - rest) // 2


def _feature_ids(x_shape: tuple[int, ...], patch: int | None) -> tuple[np.ndarray, int]:
    """An int id per entry of one example (shape x_shape[1:]) and the number of features."""
    if patch is None:
        n = int(np.prod(x_shape[1:]))
        return np.arange(n).reshape(x_shape[1:]), n
    _, height, width, channels = x_shape
    rows = (np.arange(height) + _pad_before(height, patch)) // patch
    cols = (np.arange(width) + _pad_before(width, patch)) // patch
    n_rows, n_cols = -(-height // patch), -(-width // patch)
    ids = rows[:, None] * n_cols + cols[None, :]
    return np.broadcast_to(ids[:, :, None], (height, width, channels)).copy(), n_rows * n_cols


def _check_patch(patch: Any, x: jax.Array, *, allow_none: bool) -> int | None:
    if patch is None and allow_none:
        return None
    patch = check_positive_int(patch, "patch")
    _need_nhwc(x, f"patch={patch}")
    if patch > min(x.shape[1:3]):
        raise ValueError(f"patch must be at most the image side {min(x.shape[1:3])}; got {patch}")
    return patch


class _Features:
    """A partition of each example's entries into `n` features (ids from `_feature_ids`)."""

    def __init__(self, x_shape: tuple[int, ...], patch: int | None):
        ids, self.n = _feature_ids(x_shape, patch)
        self.shape = tuple(x_shape)
        self.ids = jnp.asarray(ids.reshape(-1), jnp.int32)

    def sums(self, values: jax.Array) -> jax.Array:
        """[batch, ...] like x -> [batch, n]: the sum of `values` over each feature."""
        flat = values.reshape(values.shape[0], -1)
        return jax.vmap(lambda v: jax.ops.segment_sum(v, self.ids, num_segments=self.n))(flat)

    def mask(self, selected: jax.Array) -> jax.Array:
        """[batch, n] bool -> [batch, ...] like x: True on the entries of the selected features."""
        return jnp.take(selected, self.ids, axis=1).reshape((selected.shape[0],) + self.shape[1:])


def _random_subset(key: jax.Array, batch: int, n_features: int, size: jax.Array | int, max_size: int) -> jax.Array:
    """[batch, n_features] bool with `size` True per row, uniform without replacement.

    Each row draws u ~ U(0, 1)^n_features and keeps the `size` largest u; the subsets of different
    sizes drawn from one key are nested (common random numbers for the sensitivity-n sweep).
    """
    u = jax.random.uniform(key, (batch, n_features))
    _, idx = jax.lax.top_k(u, max_size)
    keep = jnp.broadcast_to(jnp.arange(max_size) < size, idx.shape)
    return jnp.zeros((batch, n_features), bool).at[jnp.arange(batch)[:, None], idx].set(keep)


def _feature_ranks(scores: jax.Array, order: str) -> jax.Array:
    """Rank 0 = the first feature to remove; ties keep index order (stable sort). [batch, n] -> [batch, n]."""
    first = jnp.argsort(ORDERS[order](scores), axis=1, stable=True)
    return jnp.argsort(first, axis=1, stable=True)


ORDERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "most_relevant_first": lambda s: -s,  # MoRF (Quantus "morf")
    "least_relevant_first": lambda s: s,  # LeRF (Quantus "lerf")
}


def _check_order(order: Any) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}; got {order!r}")
    return order


# --------------------------------------------------------------------------------------------
# Faithfulness correlation and sensitivity-n
# --------------------------------------------------------------------------------------------
def faithfulness_correlation(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    subset_size: int = 224,
    samples: int = 100,
    baseline: Any = 0.0,
    patch: int | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """Faithfulness correlation: Pearson correlation over random subsets between attribution mass and output drop.

    rho_b = pearson_s( sum_{i in S_s} A_bi ,  f(x_b) - f(x_b with S_s set to the baseline) ),
    S_s uniform subsets of `subset_size` features without replacement (one per sample and example),
    f = target logit.

    Draws: sample s uses jax.random.split(key, samples)[s]; example b keeps the `subset_size` features
    with the largest u_b, u ~ U(0, 1)^[batch, features] from that key.

    Differences from Quantus 0.6 `FaithfulnessCorrelation` (defaults nr_runs=100, subset_size=224):
    the default baseline is 0.0 (Quantus: "black" = min of x_b; pass baseline="black" to match);
    Quantus normalises A by its max |A| first, which leaves the correlation unchanged; a constant
    series gives 0 here (Quantus/scipy: NaN); `patch` (None = Quantus' entry-wise features) is an
    addition. With the same subsets the values agree; the random subsets differ, so compare means.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...] inputs. attribution: like x, or [batch, H, W] for NHWC x ([batch, K, ...] for
        [batch, K] targets). target: [batch] or [batch, K] ints (module docstring).
      key: PRNG key. subset_size: features removed per sample, 1 <= subset_size <= features.
      samples: number of random subsets (>= 2). baseline: see the module docstring.
      patch: None (entries of x) or p (p x p pixel squares, all channels; NHWC).
      chunk: samples evaluated together (None: backend default).
    Returns:
      [batch] correlations in [-1, 1] ([batch, K] for [batch, K] targets).
    Reference: Bhatt, Weller & Moura 2020, "Evaluating and Aggregating Feature-based Model
    Explanations" (IJCAI).
    """
    x, target, num_classes = _prepare(apply_fn, x, target)
    key = check_key(key)
    samples = check_positive_int(samples, "samples")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to compute a correlation; got {samples}")
    features = _Features(x.shape, _check_patch(patch, x, allow_none=True))
    subset_size = check_positive_int(subset_size, "subset_size")
    if subset_size > features.n:
        raise ValueError(f"subset_size must be at most the number of features {features.n}; got {subset_size}")
    base = _replacement(x, baseline)
    keys = jax.random.split(key, samples)

    def score_one(v, a, t):
        atts, deltas = _subset_drops(apply_fn, v, a, t, base, features, keys, jnp.full((samples,), subset_size),
                                     subset_size, sample_chunk(chunk, samples))
        return pearson(atts.T, deltas.T)

    return _scored(score_one, x, attribution, target, num_classes)


def _subset_drops(apply_fn, x, a, target, base, features, keys, sizes, max_size, batch_size):
    """For each (key, size): (sum of A over a random subset, f(x) - f(x with it removed)), each [n, batch]."""
    scores = features.sums(a)
    full = target_logits(apply_fn, x, target)

    def one(args):
        k, size = args
        selected = _random_subset(k, x.shape[0], features.n, size, max_size)
        removed = jnp.where(features.mask(selected), base, x)
        return jnp.sum(jnp.where(selected, scores, 0.0), axis=1), full - target_logits(apply_fn, removed, target)

    return jax.lax.map(one, (keys, sizes), batch_size=batch_size)


def sensitivity_n(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    n: int | Sequence[int],
    samples: int = 100,
    baseline: Any = 0.0,
    patch: int | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """Sensitivity-n: Pearson correlation between the attribution of n removed features and the output drop.

    r_b(n) = pearson_s( sum_{i in S_s} A_bi ,  f(x_b) - f(x_b with S_s set to the baseline) ),
    |S_s| = n uniform without replacement, f = target logit. An attribution satisfies
    sensitivity-n when r(n) = 1 (exact for any linear model and A = w * (x - baseline)).

    A sweep over n: pass a tuple; sample s then draws one u ~ U(0, 1)^[batch, features] from
    jax.random.split(key, samples)[s] and S_s(n) keeps the n features with the largest u, so the
    subsets of the sizes are nested (common random numbers) and `n=k` equals `n=(..., k, ...)[:, j]`.

    Differences from Quantus 0.6 `SensitivityN`: Quantus removes features cumulatively in the order
    of decreasing attribution (one ordering, no random subsets) and correlates, for each n, across the
    examples of the batch (one value per n, not per example); this follows Ancona et al. (random
    subsets, correlation per example over `samples`). Constant series give 0 (scipy: NaN).

    Args:
      x, attribution, target, key, baseline, patch, chunk: as `faithfulness_correlation`.
      n: an int or a tuple of ints, each 1 <= n <= features. samples: subsets per n (>= 2).
    Returns:
      [batch] for an int n; [batch, len(n)] for a tuple ([batch, K] / [batch, K, len(n)] for [batch, K] targets).
    Reference: Ancona, Ceolini, Öztireli & Gross 2018, "Towards better understanding of
    gradient-based attribution methods for Deep Neural Networks" (ICLR).
    """
    x, target, num_classes = _prepare(apply_fn, x, target)
    key = check_key(key)
    samples = check_positive_int(samples, "samples")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to compute a correlation; got {samples}")
    features = _Features(x.shape, _check_patch(patch, x, allow_none=True))
    single = isinstance(n, (int, np.integer)) and not isinstance(n, bool)
    sizes = (n,) if single else tuple(n) if isinstance(n, (tuple, list)) else None
    if not sizes or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= features.n
                        for v in sizes):
        raise ValueError(f"n must be an int or a non-empty tuple of ints in [1, {features.n}] (the number of "
                         f"features); got {n!r}")
    base = _replacement(x, baseline)
    keys = jnp.repeat(jax.random.split(key, samples), len(sizes), axis=0)  # pair (s, j) -> row s * len(n) + j
    size_of_pair = jnp.tile(jnp.asarray(sizes, jnp.int32), samples)
    batch = x.shape[0]

    def score_one(v, a, t):
        atts, deltas = _subset_drops(apply_fn, v, a, t, base, features, keys, size_of_pair, max(sizes),
                                     sample_chunk(chunk, samples * len(sizes)))
        atts = atts.reshape(samples, len(sizes), batch).transpose(2, 1, 0).reshape(batch * len(sizes), samples)
        deltas = deltas.reshape(samples, len(sizes), batch).transpose(2, 1, 0).reshape(batch * len(sizes), samples)
        r = pearson(atts, deltas).reshape(batch, len(sizes))
        return r[:, 0] if single else r

    return _scored(score_one, x, attribution, target, num_classes)


# --------------------------------------------------------------------------------------------
# Infidelity
# --------------------------------------------------------------------------------------------
def infidelity(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 10,
    noise: float = 0.1,
    normalize: bool = False,
    chunk: int | None = None,
) -> jax.Array:
    """Infidelity: expected squared error between I . A and the output change under a Gaussian perturbation I.

    INFD_b = E_I[ (I . A_b - (f(x_b) - f(x_b - I)))^2 ],  I ~ N(0, noise^2) on every entry of x,
    f = target logit, estimated with `samples` draws. With normalize=True, A is first scaled by the
    optimal beta_b = E[(I . A_b) d_b] / E[(I . A_b)^2] (0 when the denominator is 0), as Captum's
    `infidelity(normalize=True)`. 0 for a linear model and its exact gradient A = w.

    Draws: I_s = noise * jax.random.normal(jax.random.split(key, samples)[s], x.shape, x.dtype).

    Differences from Quantus 0.6 `Infidelity`: Quantus perturbs by replacing non-overlapping
    square patches (default 4x4) with a baseline ("black") and takes the MSE over the patches; this
    follows Yeh et al. and Captum (Gaussian perturbations, I . A over all entries). The values are
    not comparable with Quantus' default; they are with Captum given the same draws.

    Args:
      x: [batch, ...]. attribution: like x, or [batch, H, W] (broadcast over channels); [batch, K, ...]
        for [batch, K] targets. target: [batch] or [batch, K].
      key: PRNG key. samples: >= 1. noise: standard deviation sigma >= 0 (in input units).
      normalize: apply the optimal scaling beta. chunk: samples evaluated together.
    Returns:
      [batch] >= 0 ([batch, K] for [batch, K] targets).
    Reference: Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, "On the (In)fidelity and Sensitivity
    of Explanations" (NeurIPS).
    """
    x, target, num_classes = _prepare(apply_fn, x, target)
    key = check_key(key)
    samples = check_positive_int(samples, "samples")
    noise = _check_nonnegative(noise, "noise")

    def score_one(v, a, t):
        full = target_logits(apply_fn, v, t)
        a_flat = a.reshape(v.shape[0], -1)

        def one(k):
            perturbation = noise * jax.random.normal(k, v.shape, v.dtype)
            explained = jnp.sum(perturbation.reshape(a_flat.shape) * a_flat, axis=1)
            return explained, full - target_logits(apply_fn, v - perturbation, t)

        explained, delta = jax.lax.map(one, jax.random.split(key, samples), batch_size=sample_chunk(chunk, samples))
        if normalize:
            num, den = jnp.mean(explained * delta, axis=0), jnp.mean(explained**2, axis=0)
            explained = explained * (num / jnp.where(den > 0, den, 1.0))
        return jnp.mean((explained - delta) ** 2, axis=0)

    return _scored(score_one, x, attribution, target, num_classes)


# --------------------------------------------------------------------------------------------
# Monotonicity
# --------------------------------------------------------------------------------------------
def monotonicity(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array | None = None,
    samples: int = 100,
    baseline: Any = 0.0,
    uniform_range: tuple[float, float] = (0.0, 1.0),
    patch: int | None = 1,
    absolute: bool = True,
    chunk: int | None = None,
) -> jax.Array:
    """Monotonicity correlation: Spearman correlation between |A| of each feature and the output change it causes.

    rho_b = spearman_i( |sum_{j in F_i} A_bj| ,  mean_s (f(x_b) - f(x_b with F_i set to v_bs))^2 ),
    one term per feature F_i (its attribution is the sum of A over its entries), f = target logit.
    v_bs is the baseline (deterministic: one forward pass per feature, `samples` is ignored) or, with
    baseline="uniform", one value per (example, sample) drawn from U(uniform_range), the same for
    every entry of the feature. For a linear model and a
    deterministic baseline the output change is (sum_{j in F_i} w_j (x_j - b_j))^2, so
    A = w * (x - b) gives rho = 1.

    Cost: features x samples forward passes of the batch (features = (H/p) (W/p) for patch=p),
    `chunk` of them at a time. Draws (uniform): pair (feature i, sample s) uses
    jax.random.split(key, features * samples)[i * samples + s], value jax.random.uniform(., (batch,)).

    Differences from Quantus 0.6 `MonotonicityCorrelation` (abs=True, nr_samples=100,
    perturb_baseline="uniform", features_in_step=1): the default baseline is 0.0 (pass
    baseline="uniform" to match Quantus); Quantus' features are single entries of x (patch=None
    here; equal to patch=1 for one-channel images); its features_in_step > 1 groups features by
    attribution order, `patch` here groups them spatially; Quantus takes |A| per entry before
    summing a group, here the magnitude of the feature's sum (the same for single entries); Quantus
    scales the squared change by 1 / f(x_b)^2, which does not change the rank correlation; constant
    series give 0 (scipy: NaN).

    Args:
      x: [batch, H, W, C] (any [batch, ...] with patch=None). attribution: like x or [batch, H, W].
      target: [batch] or [batch, K] (attribution [batch, K, ...]). key: PRNG key (needed for
        baseline="uniform" only). samples: >= 1.
      baseline: see the module docstring, or "uniform". uniform_range: (low, high) for "uniform".
      patch: None (entries of x), p (p x p pixel squares, all channels). Default 1: pixels.
      absolute: rank |A_i| (Quantus' abs=True) or the signed A_i. chunk: forward passes evaluated together.
    Returns:
      [batch] Spearman correlations in [-1, 1] ([batch, K] for [batch, K] targets).
    Reference: Nguyen & Martinez 2020, "On quantitative aspects of model interpretability" (arXiv:2007.07584).
    """
    x, target, num_classes = _prepare(apply_fn, x, target)
    samples = check_positive_int(samples, "samples")
    features = _Features(x.shape, _check_patch(patch, x, allow_none=True))
    uniform = isinstance(baseline, str) and baseline == "uniform"
    if uniform:
        key = check_key(key, "key (needed for baseline='uniform')")
        low, high = (float(v) for v in uniform_range)
        if not low < high:
            raise ValueError(f"uniform_range must be (low, high) with low < high; got {uniform_range!r}")
        base = None
    else:
        base = _replacement(x, baseline)
        samples = 1
    pairs = features.n * samples
    feature_of_pair = jnp.repeat(jnp.arange(features.n), samples)
    keys = jax.random.split(key, pairs) if uniform else jnp.zeros((pairs,), jnp.uint32)

    def score_one(v, a, t):
        full = target_logits(apply_fn, v, t)

        def one(args):
            i, k = args
            where = (features.ids == i).reshape((1,) + v.shape[1:])
            if uniform:
                value = jax.random.uniform(k, (v.shape[0],), v.dtype, low, high).reshape((-1,) + (1,) * (v.ndim - 1))
            else:
                value = base
            return (full - target_logits(apply_fn, jnp.where(where, value, v), t)) ** 2

        change = jax.lax.map(one, (feature_of_pair, keys), batch_size=sample_chunk(chunk, pairs))
        change = change.reshape(features.n, samples, v.shape[0]).mean(axis=1).T  # [batch, features]
        scores = features.sums(a)
        return spearman(jnp.abs(scores) if absolute else scores, change)

    return _scored(score_one, x, attribution, target, num_classes)


# --------------------------------------------------------------------------------------------
# ROAD: remove and debias with noisy linear imputation
# --------------------------------------------------------------------------------------------
# (dy, dx) -> weight of the neighbour: 1/6 for the 4 direct, 1/12 for the 4 diagonal ones (Rong et al.)
_NLI_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, 0), 1 / 6), ((1, 0), 1 / 6), ((0, -1), 1 / 6), ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((1, 1), 1 / 12),
)


def _neighbour_sum(z: jax.Array) -> jax.Array:
    """sum_n w_n z[h + dy_n, w + dx_n] over the in-image neighbours (zero outside), [B, H, W, C]."""
    height, width = z.shape[1:3]
    padded = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)))
    total = jnp.zeros_like(z)
    for (dy, dx), w in _NLI_WEIGHTS:
        total = total + w * padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width, :]
    return total


def _solve_imputation(x: jax.Array, removed: jax.Array, max_iter: int, tol: float) -> jax.Array:
    """Conjugate gradients, one system per (example, channel), on the masked Laplacian system.

    Unknowns u (zero on known pixels) solve  m * (deg * u - N(m * u)) + (1 - m) * u = m * N((1 - m) * x),
    with N the weighted neighbour sum and deg = N(1): symmetric positive definite whenever every
    region of removed pixels touches a known pixel. Each system stops when its residual falls below
    tol * |rhs| (the loop runs until all have, at most max_iter steps).
    """
    m = removed.astype(x.dtype)[..., None]
    deg = _neighbour_sum(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype))

    def operator(u):
        return m * (deg * u - _neighbour_sum(m * u)) + (1 - m) * u

    def dot(a, b):
        return jnp.sum(a * b, axis=(1, 2), keepdims=True)

    rhs = m * _neighbour_sum((1 - m) * x)
    stop = (tol**2) * dot(rhs, rhs)

    def not_done(state):
        i, _, _, _, rr = state
        return (i < max_iter) & jnp.any(rr > stop)

    def step(state):
        i, u, r, p, rr = state
        active = rr > stop
        ap = operator(p)
        pap = dot(p, ap)
        alpha = jnp.where(active & (pap > 0), rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        u, r = u + alpha * p, r - alpha * ap
        rr_new = dot(r, r)
        beta = rr_new / jnp.where(rr > 0, rr, 1.0)
        p = jnp.where(active, r + beta * p, p)
        return i + 1, u, r, p, jnp.where(active, rr_new, rr)

    init = (0, jnp.zeros_like(x), rhs, rhs, dot(rhs, rhs))
    _, u, _, _, _ = jax.lax.while_loop(not_done, step, init)
    return u


def noisy_linear_imputation(
    x: jax.Array,
    removed: jax.Array,
    *,
    key: jax.Array | None = None,
    noise: float = 0.01,
    max_iter: int | None = None,
    tol: float = 1e-6,
) -> jax.Array:
    """Noisy linear imputation: each removed pixel becomes the weighted mean of its 8 neighbours, plus noise.

    For every removed pixel p and channel:  v_p = sum_{n in N(p)} w_n v_n / sum_{n in N(p)} w_n
    (w = 1/6 for the 4 direct, 1/12 for the 4 diagonal neighbours inside the image; known pixels
    fixed), i.e. the sparse linear system of Rong et al., solved per (example, channel) by
    conjugate gradients; then v_p += noise * N(0, 1). Known pixels are returned unchanged.

    Draws: the noise is noise * jax.random.normal(key, x.shape, x.dtype) on the removed pixels.

    Args:
      x: [batch, H, W, C]. removed: [batch, H, W] bool (True = impute; all channels of the pixel).
      key: PRNG key (needed when noise > 0). noise: standard deviation >= 0.
      max_iter: conjugate-gradient steps at most (None: 4 (H + W) + 50); tol: relative residual.
    Returns:
      [batch, H, W, C]. A region of removed pixels with no known neighbour (all pixels removed)
      is filled with 0 before the noise (the system is singular there).
    Reference: Rong, Leemann, Borisov, Kasneci & Kasneci 2022, "A Consistent and Efficient
    Evaluation Strategy for Attribution Methods" (ICML).
    """
    x = check_x(x)
    _need_nhwc(x, "noisy_linear_imputation")
    removed = jnp.asarray(removed)
    if removed.shape != x.shape[:3]:
        raise ValueError(f"removed must be a [batch, H, W] mask {tuple(x.shape[:3])}; got {tuple(removed.shape)}")
    noise = _check_nonnegative(noise, "noise")
    if noise > 0:
        key = check_key(key, "key (needed when noise > 0)")
    max_iter = 4 * (x.shape[1] + x.shape[2]) + 50 if max_iter is None else check_positive_int(max_iter, "max_iter")
    return _impute(x, removed.astype(bool), key, noise, max_iter, float(tol))


def _impute(x, removed, key, noise, max_iter, tol):
    u = _solve_imputation(x, removed, max_iter, tol)
    if noise > 0:
        u = u + noise * jax.random.normal(key, x.shape, x.dtype)
    return jnp.where(removed[..., None], u, x)


def _road_correct(logits, target):
    return (jnp.argmax(logits, axis=-1) == target).astype(logits.dtype)


def _road_probability(logits, target):
    return jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), target[:, None], axis=1)[:, 0]


ROAD_SCORES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "correct": _road_correct,  # 1 if argmax = target (Quantus): the batch mean is ROAD's accuracy curve
    "probability": _road_probability,  # softmax probability of the target class
}


def road(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array | None = None,
    percentages: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    order: str = "most_relevant_first",
    noise: float = 0.01,
    score: str = "correct",
    max_iter: int | None = None,
    tol: float = 1e-6,
    chunk: int | None = None,
) -> jax.Array:
    """ROAD: remove the top (or bottom) fraction of pixels, impute them by noisy linear imputation, re-classify.

    For each fraction q: the k = floor(q * H * W) pixels ranked first by the attribution (summed
    over channels; `order`) are replaced by `noisy_linear_imputation` (noise std `noise`), and
    score_bq = [argmax f(x~_bq) = target_b] (score="correct", as Quantus) or
    softmax(f(x~_bq))[target_b] (score="probability"). The mean over the batch of "correct" is
    ROAD's accuracy curve (MoRF: low is faithful; LeRF: high is faithful).

    Draws: fraction j uses the noise key jax.random.split(key, len(percentages))[j].

    Differences from Quantus 0.6 `ROAD`: percentages are fractions in [0, 1) here (Quantus: percent,
    default 1, 3, ..., 99); Quantus ranks the entries of the attribution broadcast to x, which for
    C > 1 channels does not index pixels correctly: here a pixel (all channels) is the unit, equal
    to Quantus for one-channel images; Quantus solves the system exactly (spsolve), here conjugate
    gradients to a relative residual `tol`; `order` and `score="probability"` are additions
    (Quantus: most relevant first, correct/incorrect only).

    Args:
      x: [batch, H, W, C]. attribution: like x or [batch, H, W] ([batch, K, ...] for [batch, K] targets).
      target: [batch] or [batch, K]. key: PRNG key (needed when noise > 0).
      percentages: fractions in [0, 1) (static floats).
      order: a key of `ORDERS`. noise: imputation noise std >= 0. score: a key of `ROAD_SCORES`.
      max_iter, tol: conjugate-gradient limits (see `noisy_linear_imputation`).
      chunk: fractions evaluated together.
    Returns:
      [batch, len(percentages)] ([batch, K, len(percentages)] for [batch, K] targets).
    Reference: Rong, Leemann, Borisov, Kasneci & Kasneci 2022, "A Consistent and Efficient
    Evaluation Strategy for Attribution Methods" (ICML).
    """
    x, target, num_classes = _prepare(apply_fn, x, target)
    _need_nhwc(x, "road")
    order = _check_order(order)
    if score not in ROAD_SCORES:
        raise ValueError(f"score must be one of {sorted(ROAD_SCORES)}; got {score!r}")
    fractions = tuple(percentages) if isinstance(percentages, (tuple, list)) else ()
    if not fractions or any(isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating))
                            or not 0 <= q < 1 for q in fractions):
        raise ValueError(f"percentages must be a non-empty tuple of fractions in [0, 1); got {percentages!r}")
    percentages = fractions
    noise = _check_nonnegative(noise, "noise")
    if noise > 0:
        key = check_key(key, "key (needed when noise > 0)")
    max_iter = 4 * (x.shape[1] + x.shape[2]) + 50 if max_iter is None else check_positive_int(max_iter, "max_iter")
    batch, height, width, _ = x.shape
    counts = jnp.asarray([int(np.floor(height * width * float(q) + 1e-9)) for q in percentages], jnp.int32)
    score_fn = ROAD_SCORES[score]
    keys = jax.random.split(key, len(percentages)) if noise > 0 else jnp.zeros(len(percentages), jnp.uint32)

    def score_one(v, a, t):
        ranks = _feature_ranks(a.sum(-1).reshape(batch, -1), order).reshape(batch, height, width)

        def one(args):
            k, noise_key = args
            imputed = _impute(v, ranks < k, noise_key, noise, max_iter, float(tol))
            return score_fn(apply_fn(imputed), t)

        return jax.lax.map(one, (counts, keys), batch_size=sample_chunk(chunk, len(percentages))).T

    return _scored(score_one, x, attribution, target, num_classes)


# --------------------------------------------------------------------------------------------
# Region perturbation (pixel flipping over patches) and AOPC
# --------------------------------------------------------------------------------------------
def region_perturbation(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    patch: int = 4,
    steps: int | None = None,
    order: str = "most_relevant_first",
    baseline: Any = 0.0,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Region perturbation: remove p x p patches in order of relevance; AOPC = mean output drop.

    Patches tile the image (module docstring), relevance R_j = sum of A over patch j and its
    channels; after removing the k patches ranked first (`order`, stable on ties) by setting them to
    the baseline: curve_bk = f(x_b) - f(x_b^(k)), k = 0..steps (curve_b0 = 0),
    AOPC_b = 1 / (steps + 1) sum_{k=0}^{steps} curve_bk, f = target logit.

    Differences from Quantus 0.6 `RegionPerturbation` (patch_size=8, regions_evaluation=100,
    perturb_baseline="black"): the default baseline is 0.0 (pass baseline="black" to match);
    Quantus returns curve[:, 1:] (no k = 0 term) and leaves the AOPC to the caller; steps=None
    removes every patch (Quantus: min(100, patches)).

    Args:
      x: [batch, H, W, C]. attribution: like x or [batch, H, W] ([batch, K, ...] for [batch, K] targets).
      target: [batch] or [batch, K]. patch: side p >= 1.
      steps: patches removed in all, 1 <= steps <= patches (None: all).
      order: a key of `ORDERS`. baseline: see the module docstring. chunk: curve points evaluated together.
    Returns:
      (aopc [batch], curve [batch, steps + 1]); for [batch, K] targets (aopc [batch, K], curve
      [batch, K, steps + 1]).
    Reference: Samek, Binder, Montavon, Lapuschkin & Müller 2017, "Evaluating the visualization of
    what a deep neural network has learned" (IEEE TNNLS).
    """
    x, target, num_classes = _prepare(apply_fn, x, target)
    features = _Features(x.shape, _check_patch(patch, x, allow_none=False))
    order = _check_order(order)
    steps = features.n if steps is None else check_positive_int(steps, "steps")
    if steps > features.n:
        raise ValueError(f"steps must be at most the number of patches {features.n}; got {steps}")
    base = _replacement(x, baseline)

    def score_one(v, a, t):
        ranks = _feature_ranks(features.sums(a), order)
        full = target_logits(apply_fn, v, t)

        def drop_after(k):
            return full - target_logits(apply_fn, jnp.where(features.mask(ranks < k), base, v), t)

        curve = jax.lax.map(drop_after, jnp.arange(steps + 1), batch_size=sample_chunk(chunk, steps + 1)).T
        return curve.mean(axis=1), curve

    return _scored(score_one, x, attribution, target, num_classes)
