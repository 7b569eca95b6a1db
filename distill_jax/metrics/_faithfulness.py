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
(`attr._core.per_target_scored`, which `metrics.deletion_auc` and `metrics.ig_completeness_error` use too).

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

from distill_jax._checks import check_int, check_key, check_number
from distill_jax.attr._core import (
    BASELINES,
    ApplyFn,
    attribution_inputs,
    check_attribution,
    per_target_scored,
    resolve_baseline,
    sample_chunk,
    target_logits,
)
from distill_jax.metrics._similarity import pearson


# --------------------------------------------------------------------------------------------
# Shared checks and helpers
# --------------------------------------------------------------------------------------------
def _prepare(apply_fn: ApplyFn, x: Any, target: Any):
    """Checked (x, target [batch] or [batch, K] int32, number of classes)."""
    return attribution_inputs(apply_fn, x, target)


def _need_nhwc(x: jax.Array, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} needs NHWC images x [batch, H, W, C]; got shape {tuple(x.shape)}")




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
    patch = check_int(patch, "patch")
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
    samples = check_int(samples, "samples")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to compute a correlation; got {samples}")
    features = _Features(x.shape, _check_patch(patch, x, allow_none=True))
    subset_size = check_int(subset_size, "subset_size")
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
    samples = check_int(samples, "samples")
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
    samples = check_int(samples, "samples")
    noise = check_number(noise, "noise", low=0)

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
