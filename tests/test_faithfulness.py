"""Tests for distill_jax.faithfulness: closed forms on linear models, numpy references with the same draws."""
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.sparse import csc_matrix, lil_matrix
from scipy.sparse.linalg import spsolve
from scipy.stats import spearmanr

from distill_jax import metrics
from distill_jax.metrics import _faithfulness

B, H, W, C, K = 3, 6, 6, 2, 4
BASE = 0.3
KEY = jax.random.key


@pytest.fixture(autouse=True)
def _fast_threefry():
    """Non-partitionable threefry: with JAX's default (partitionable) threefry, every jitted function that
    draws takes seconds to compile on XLA:CPU. Both modes are vmap-consistent, which is all the chunk
    invariance needs; `test_chunks_with_default_prng` keeps the default mode covered."""
    with jax.threefry_partitionable(False):
        yield


def run(metric, apply_fn, *args, **options):
    """metric(apply_fn, *args, **options) under one jax.jit (eager calls compile every small op on its own)."""
    return jax.jit(partial(metric, apply_fn, **options))(*args)


def rand(seed, shape, kind="uniform"):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.random(shape) if kind == "uniform" else rng.standard_normal(shape), jnp.float32)


def linear(weights):
    bias = jnp.arange(K, dtype=jnp.float32)
    return lambda v: v.reshape(v.shape[0], -1) @ weights + bias


def nonlinear(weights):
    return lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ weights) + 0.5 * (v.reshape(v.shape[0], -1) @ weights) ** 2


def np_target(weights, v, t):
    """The target output of `nonlinear(weights)` in float64 numpy."""
    z = np.asarray(v, np.float64).reshape(len(t), -1) @ np.asarray(weights, np.float64)
    return (np.tanh(z) + 0.5 * z**2)[np.arange(len(t)), np.asarray(t)]


def exact_linear_attribution(x, weights, t, baseline):
    """A = w_target * (x - baseline): the exact contribution of each entry to the target logit."""
    return weights[:, t].T.reshape(x.shape) * (x - baseline)


@pytest.fixture(scope="module")
def setup():
    return rand(0, (B, H, W, C)), rand(1, (H * W * C, K), "normal"), jnp.array([0, 1, 3])


# 2 x 2 patches of the 6 x 6 images: patch id of every pixel
PATCH2_IDS = (np.arange(H) // 2)[:, None] * 3 + (np.arange(W) // 2)[None, :]


# --------------------------------------------------------------------------------------------
# Closed forms on a linear model, jit and non-jit
# --------------------------------------------------------------------------------------------
class ClosedFormTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.w, self.t = rand(0, (B, H, W, C)), rand(1, (H * W * C, K), "normal"), jnp.array([0, 1, 3])
        self.f = linear(self.w)
        self.a = exact_linear_attribution(self.x, self.w, self.t, BASE)

    @chex.variants(with_jit=True, without_jit=True)
    def test_faithfulness_correlation_is_one(self):
        fn = self.variant(partial(metrics.faithfulness_correlation, self.f, key=KEY(3), subset_size=5, samples=8,
                                  baseline=BASE, patch=2))
        np.testing.assert_allclose(fn(self.x, self.a, self.t), np.ones(B), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sensitivity_n_is_one_for_every_n(self):
        fn = self.variant(partial(metrics.sensitivity_n, self.f, key=KEY(4), n=(1, 7, 40), samples=8, baseline=BASE))
        r = fn(self.x, self.a, self.t)
        assert r.shape == (B, 3)
        np.testing.assert_allclose(r, np.ones((B, 3)), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_infidelity_of_exact_gradient_is_zero(self):
        grad = self.w[:, self.t].T.reshape(self.x.shape)
        fn = self.variant(partial(metrics.infidelity, self.f, key=KEY(5), samples=8, noise=0.2))
        np.testing.assert_allclose(fn(self.x, grad, self.t), np.zeros(B), atol=1e-9)
        assert bool(jnp.all(fn(self.x, 2 * grad, self.t) > 1e-3))  # a wrong scale is penalised

    @chex.variants(with_jit=True, without_jit=True)
    def test_monotonicity_is_one(self):
        fn = self.variant(partial(metrics.monotonicity, self.f, baseline=BASE, patch=2, chunk=3))
        np.testing.assert_allclose(fn(self.x, self.a, self.t), np.ones(B), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_region_perturbation_hand_computed(self):
        # 4x4 one-channel image, 2x2 patches with sums 1 (top left), 4 (top right), 2, 3; f = sum of pixels
        x = jnp.asarray(np.kron(np.array([[1.0, 4.0], [2.0, 3.0]]) / 4, np.ones((2, 2))))[None, :, :, None]
        f = lambda v: jnp.stack([v.reshape(v.shape[0], -1).sum(1), jnp.zeros(v.shape[0])], axis=1)
        t = jnp.zeros(1, jnp.int32)
        aopc, curve = self.variant(partial(metrics.region_perturbation, f, patch=2))(x, x, t)
        np.testing.assert_allclose(curve, [[0, 4, 7, 9, 10]], rtol=1e-6)
        np.testing.assert_allclose(aopc, [6.0], rtol=1e-6)
        aopc, curve = self.variant(partial(metrics.region_perturbation, f, patch=2, order="least_relevant_first",
                                           steps=2))(x, x, t)
        np.testing.assert_allclose(curve, [[0, 1, 3]], rtol=1e-6)
        np.testing.assert_allclose(aopc, [4 / 3], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_road_matches_spsolve_reference(self):
        f = nonlinear(self.w)
        attr = rand(6, self.x.shape, "normal")
        percentages = (0.0, 0.25, 0.5, 0.9)
        fn = self.variant(partial(metrics.road, f, percentages=percentages, noise=0.0, score="probability", chunk=2))
        probs = np.asarray(fn(self.x, attr, self.t))
        imputed = road_reference_images(self.x, attr, percentages)
        for j in range(len(percentages)):
            logits = np.asarray(f(jnp.asarray(imputed[j], jnp.float32)), np.float64)
            p = np.exp(logits - logits.max(1, keepdims=True))
            np.testing.assert_allclose(probs[:, j], (p / p.sum(1, keepdims=True))[np.arange(B), self.t], atol=1e-4)


def road_reference_images(x, attr, percentages):
    """[len(percentages), B, H, W, C]: the top floor(q H W) pixels (stable order) imputed with spsolve."""
    x_np, pixel = np.asarray(x, np.float64), np.asarray(attr).sum(-1).reshape(B, -1)
    out = np.repeat(x_np[None], len(percentages), axis=0)
    for j, q in enumerate(percentages):
        k = int(np.floor(H * W * q + 1e-9))
        for b in range(B):
            removed = np.zeros(H * W, bool)
            removed[np.argsort(-pixel[b], kind="stable")[:k]] = True
            for c in range(C):
                out[j, b, :, :, c] = spsolve_imputation(x_np[b, :, :, c], removed.reshape(H, W))
    return out


def spsolve_imputation(img, removed):
    """The sparse system of Rong et al. for one channel: deg_p v_p - sum_n w_n v_n = 0 on removed pixels."""
    height, width = img.shape
    idx = np.flatnonzero(removed.ravel())
    var = {p: i for i, p in enumerate(idx)}
    weights = {(-1, 0): 1 / 6, (1, 0): 1 / 6, (0, -1): 1 / 6, (0, 1): 1 / 6,
               (-1, -1): 1 / 12, (-1, 1): 1 / 12, (1, -1): 1 / 12, (1, 1): 1 / 12}
    a, rhs = lil_matrix((len(idx), len(idx))), np.zeros(len(idx))
    for i, p in enumerate(idx):
        h, w = divmod(p, width)
        for (dy, dx), wt in weights.items():
            hh, ww = h + dy, w + dx
            if 0 <= hh < height and 0 <= ww < width:
                a[i, i] += wt
                if removed[hh, ww]:
                    a[i, var[hh * width + ww]] -= wt
                else:
                    rhs[i] += wt * img[hh, ww]
    out = img.copy().ravel()
    if len(idx):
        out[idx] = spsolve(csc_matrix(a), rhs)
    return out.reshape(height, width)


# --------------------------------------------------------------------------------------------
# Faithfulness correlation and sensitivity-n: numpy references with the same subsets
# --------------------------------------------------------------------------------------------
def test_random_subset_has_exact_size_and_nested_sizes():
    draw = jax.jit(lambda k, size: _faithfulness._random_subset(k, 400, 10, size, 5))
    small, big = np.asarray(draw(KEY(7), 3)), np.asarray(draw(KEY(7), 5))
    np.testing.assert_array_equal(small.sum(1), [3] * 400)
    np.testing.assert_array_equal(big.sum(1), [5] * 400)
    assert np.all(big | ~small)  # each 3-subset lies inside the 5-subset drawn from the same key
    counts = big.sum(0)
    assert counts.min() > 150 and counts.max() < 250  # each of 10 features in about half of the subsets


@partial(jax.jit, static_argnames=("samples", "n_features", "max_size"))
def draw_subsets(key, size, *, samples, n_features, max_size):
    """The subsets the metrics draw: [samples, B, n_features] bool."""
    return jax.vmap(lambda k: _faithfulness._random_subset(k, B, n_features, size, max_size))(jax.random.split(key, samples))


def subset_reference(x, attr, weights, t, key, samples, size, max_size, ids, n_features, baseline):
    """(sum of A over the subset, drop of the target output) [B, samples], in float64 numpy loops."""
    x_np, a_np = np.asarray(x, np.float64), np.asarray(attr, np.float64)
    full = np_target(weights, x_np, t)
    atts, drops = np.zeros((B, samples)), np.zeros((B, samples))
    chosen_all = draw_subsets(key, size, samples=samples, n_features=n_features, max_size=max_size)
    for s, chosen in enumerate(np.asarray(chosen_all)):
        perturbed = x_np.copy()
        for b in range(B):
            in_subset = chosen[b][ids]
            perturbed[b][in_subset] = baseline[b]
            atts[b, s] = a_np[b][in_subset].sum()
        drops[:, s] = full - np_target(weights, perturbed, t)
    return atts, drops


def test_faithfulness_correlation_matches_numpy_for_every_chunk(setup):
    x, weights, t = setup
    f = nonlinear(weights)
    attr = rand(8, x.shape, "normal")
    key, samples, size = KEY(9), 12, 7
    ids = np.arange(H * W * C).reshape(H, W, C)  # patch=None: every entry is a feature
    black = np.asarray(x).reshape(B, -1).min(1)
    atts, drops = subset_reference(x, attr, weights, t, key, samples, size, size, ids, H * W * C, black)
    want = [np.corrcoef(atts[b], drops[b])[0, 1] for b in range(B)]
    for chunk in (1, None):  # None: 8 on CPU, one full chunk and a remainder of 4
        got = run(metrics.faithfulness_correlation, f, x, attr, t, key=key, subset_size=size, samples=samples,
                                         baseline="black", chunk=chunk)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_sensitivity_n_matches_numpy_and_single_n(setup):
    x, weights, t = setup
    f = nonlinear(weights)
    attr = rand(10, x.shape, "normal")
    key, samples, sizes = KEY(11), 8, (2, 5)
    got = run(metrics.sensitivity_n, f, x, attr, t, key=key, n=sizes, samples=samples, patch=2, chunk=3)
    single = run(metrics.sensitivity_n, f, x, attr, t, key=key, n=5, samples=samples, patch=2, chunk=1)
    np.testing.assert_allclose(single, got[:, 1], atol=1e-6)
    for j, n in enumerate(sizes):
        atts, drops = subset_reference(x, attr, weights, t, key, samples, n, max(sizes), PATCH2_IDS, 9, np.zeros(B))
        want = [np.corrcoef(atts[b], drops[b])[0, 1] for b in range(B)]
        np.testing.assert_allclose(got[:, j], want, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Infidelity and monotonicity: numpy references with the same draws
# --------------------------------------------------------------------------------------------
def test_infidelity_matches_numpy_for_every_chunk(setup):
    x, weights, t = setup
    f = nonlinear(weights)
    attr = rand(12, x.shape, "normal")
    key, samples, noise = KEY(13), 10, 0.05
    x_np, a_np = np.asarray(x, np.float64), np.asarray(attr, np.float64)
    full = np_target(weights, x_np, t)
    explained, drops = np.zeros((B, samples)), np.zeros((B, samples))
    draws = jax.jit(lambda k: jax.vmap(lambda kk: jax.random.normal(kk, x.shape, x.dtype))(
        jax.random.split(k, samples)))
    for s, pert in enumerate(noise * np.asarray(draws(key), np.float64)):
        drops[:, s] = full - np_target(weights, x_np - pert, t)
        for b in range(B):
            explained[b, s] = np.sum(pert[b] * a_np[b])
    want = np.mean((explained - drops) ** 2, 1)
    beta = (np.mean(explained * drops, 1) / np.mean(explained**2, 1))[:, None]
    want_normalized = np.mean((beta * explained - drops) ** 2, 1)
    for chunk in (1, None):  # None: 8 on CPU, one full chunk and a remainder of 2
        got = run(metrics.infidelity, f, x, attr, t, key=key, samples=samples, noise=noise, chunk=chunk)
        np.testing.assert_allclose(got, want, rtol=2e-3)
    got = run(metrics.infidelity, f, x, attr, t, key=key, samples=samples, noise=noise, normalize=True, chunk=3)
    np.testing.assert_allclose(got, want_normalized, rtol=2e-3)
    assert np.all(want_normalized <= want)  # the optimal scale can only help


def test_monotonicity_uniform_matches_numpy_for_every_chunk(setup):
    x, weights, t = setup
    f = nonlinear(weights)
    attr = rand(14, x.shape, "normal")
    key, samples, lo, hi = KEY(15), 2, -1.0, 2.0
    x_np, a_np = np.asarray(x, np.float64), np.asarray(attr, np.float64)
    full = np_target(weights, x_np, t)
    values = np.asarray(jax.jit(lambda k: jax.vmap(lambda kk: jax.random.uniform(kk, (B,), jnp.float32, lo, hi))(
        jax.random.split(k, 9 * samples)))(key), np.float64)
    change, scores = np.zeros((B, 9)), np.zeros((B, 9))
    for i in range(9):
        for s in range(samples):
            value = values[i * samples + s]
            perturbed = x_np.copy()
            for b in range(B):
                perturbed[b][PATCH2_IDS == i] = value[b]
            change[:, i] += (full - np_target(weights, perturbed, t)) ** 2 / samples
        for b in range(B):
            scores[b, i] = abs(a_np[b][PATCH2_IDS == i].sum())
    want = [spearmanr(scores[b], change[b])[0] for b in range(B)]
    for chunk in (1, None):  # 18 pairs; None: 8 on CPU, two full chunks and a remainder
        got = run(metrics.monotonicity, f, x, attr, t, key=key, samples=samples, baseline="uniform", uniform_range=(lo, hi),
                             patch=2, chunk=chunk)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_monotonicity_entries_pixels_signed_and_black_baseline(setup):
    x, weights, t = setup
    f = linear(weights)
    black = x.min(axis=(1, 2, 3), keepdims=True)
    a = exact_linear_attribution(x, weights, t, black)
    np.testing.assert_allclose(run(metrics.monotonicity, f, x, a, t, baseline="black", patch=None), np.ones(B), atol=1e-6)
    signed = run(metrics.monotonicity, f, x, a, t, baseline="black", absolute=False)
    pixel = np.asarray(a).sum(-1).reshape(B, -1)
    want = [spearmanr(pixel[b], pixel[b] ** 2)[0] for b in range(B)]
    np.testing.assert_allclose(signed, want, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Noisy linear imputation
# --------------------------------------------------------------------------------------------
IMPUTE_SHAPE = (2, 7, 9, 2)
impute_clean = jax.jit(partial(metrics.noisy_linear_imputation, noise=0.0))  # shared: one compile for the tests below


def test_imputation_keeps_known_pixels_and_adds_noise_only_on_removed():
    x = rand(16, IMPUTE_SHAPE)
    removed = rand(17, IMPUTE_SHAPE[:3]) < 0.6
    key = KEY(17)
    clean = impute_clean(x, removed)
    noisy = jax.jit(partial(metrics.noisy_linear_imputation, key=key, noise=0.1))(x, removed)
    known = ~np.asarray(removed)[..., None].repeat(IMPUTE_SHAPE[3], -1)
    np.testing.assert_array_equal(np.asarray(clean)[known], np.asarray(x)[known])
    np.testing.assert_array_equal(np.asarray(noisy)[known], np.asarray(x)[known])
    draws = 0.1 * np.asarray(jax.random.normal(key, x.shape, x.dtype))
    np.testing.assert_allclose(np.asarray(noisy - clean)[~known], draws[~known], atol=1e-6)


def test_imputation_reproduces_a_linear_ramp():
    rows, cols = np.meshgrid(np.arange(7.0), np.arange(9.0), indexing="ij")
    ramp = np.stack([0.5 * rows - 0.2 * cols + 1.0, -rows + 2 * cols], -1).astype(np.float32)
    ramp = np.stack([ramp, 3 - ramp])
    removed = np.zeros(IMPUTE_SHAPE[:3], bool)
    removed[:, 1:-1, 1:-1] = np.random.default_rng(0).random((2, 5, 7)) < 0.8  # the border stays known
    removed[0, 2:5, 3:8] = True
    out = impute_clean(jnp.asarray(ramp), jnp.asarray(removed))
    np.testing.assert_allclose(out, ramp, atol=1e-4)


def test_imputation_matches_spsolve():
    x = np.asarray(rand(18, IMPUTE_SHAPE, "normal"))
    removed = np.asarray(rand(19, IMPUTE_SHAPE[:3]) < 0.7)  # border pixels included
    out = np.asarray(impute_clean(jnp.asarray(x), jnp.asarray(removed)))
    for b in range(2):
        for c in range(2):
            np.testing.assert_allclose(out[b, :, :, c], spsolve_imputation(x[b, :, :, c].astype(np.float64),
                                                                           removed[b]), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Chunking: every chunk size gives the same values
# --------------------------------------------------------------------------------------------
def test_road_and_region_chunks_give_identical_values(setup):
    x, weights, t = setup
    f = nonlinear(weights)
    attr = rand(20, x.shape, "normal")
    for fn, opts in [
        (metrics.road, dict(key=KEY(25), percentages=(0.2, 0.5, 0.8), score="probability")),
        (metrics.region_perturbation, dict(patch=3)),
    ]:
        results = [jax.jit(partial(fn, f, chunk=chunk, **opts))(x, attr, t) for chunk in (1, None)]
        for other in results[1:]:
            # logit drops of up to ~10 summed in another order: float32 rounding is ~1e-6 absolute
            chex.assert_trees_all_close(results[0], other, rtol=1e-6, atol=1e-5)


def test_chunks_with_default_prng(setup):
    x, weights, t = setup
    f = nonlinear(weights)
    attr = rand(21, x.shape, "normal")
    with jax.threefry_partitionable(True):
        one, batched = (run(metrics.infidelity, f, x, attr, t, key=KEY(22), samples=3, chunk=chunk) for chunk in (1, None))
    np.testing.assert_allclose(one, batched, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# ROAD and region perturbation details
# --------------------------------------------------------------------------------------------
def test_road_counts_and_orders():
    # only pixel (2, 3) matters and every other pixel is 0.01: removing it (any imputation gives 0.01)
    # flips the class; MoRF removes it first, LeRF last
    attr = jnp.zeros((B, H, W)).at[:, 2, 3].set(1.0)
    mask = jnp.zeros((H, W, C)).at[2, 3, :].set(1.0)
    g = lambda v: jnp.stack([jnp.sum(mask * v, axis=(1, 2, 3)) - 0.1, jnp.zeros(v.shape[0])], axis=1)
    xs = jnp.full((B, H, W, C), 0.01).at[:, 2, 3, :].set(1.0)
    t0 = jnp.zeros(B, jnp.int32)
    morf = run(metrics.road, g, xs, attr, t0, percentages=(0.0, 1 / 36, 0.5), noise=0.0)
    lerf = run(metrics.road, g, xs, attr, t0, percentages=(0.0, 0.5, 35 / 36), noise=0.0, order="least_relevant_first")
    np.testing.assert_array_equal(morf, np.tile([1.0, 0.0, 0.0], (B, 1)))
    np.testing.assert_array_equal(lerf, np.tile([1.0, 1.0, 1.0], (B, 1)))


def test_patch_tiling_follows_quantus_padding():
    # H = 6, p = 4: Quantus pads (1, 1), so rows 0..2 are patch row 0 and rows 3..5 patch row 1
    ids, n = _faithfulness._feature_ids((1, 6, 5, 2), 4)
    assert n == 4
    np.testing.assert_array_equal(ids[:, :, 0], [[0, 0, 0, 1, 1]] * 3 + [[2, 2, 2, 3, 3]] * 3)
    np.testing.assert_array_equal(ids[..., 0], ids[..., 1])


def test_region_perturbation_linear_patches_and_black_baseline(setup):
    x, weights, t = setup
    f = linear(weights)
    black = jnp.broadcast_to(x.min(axis=(1, 2, 3), keepdims=True), x.shape)
    a = exact_linear_attribution(x, weights, t, black)
    aopc, curve = run(metrics.region_perturbation, f, x, a, t, patch=3, baseline="black")
    contrib = np.asarray(a).reshape(B, 2, 3, 2, 3, C).sum(axis=(2, 4, 5)).reshape(B, 4)
    drops = np.concatenate([np.zeros((B, 1)), np.cumsum(-np.sort(-contrib, axis=1), axis=1)], axis=1)
    np.testing.assert_allclose(curve, drops, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aopc, drops.mean(1), rtol=1e-4, atol=1e-5)
    _, curve_array = run(metrics.region_perturbation, f, x, a, t, patch=3, baseline=black)
    np.testing.assert_allclose(curve_array, curve, rtol=1e-6)


def test_invalid_traced_target_gives_nan(setup):
    x, weights, _ = setup
    fn = jax.jit(partial(metrics.region_perturbation, linear(weights), patch=3))
    aopc, _ = fn(x, x, jnp.array([0, 7, 1]))
    assert np.isnan(aopc[1]) and not np.isnan(aopc[0])


# --------------------------------------------------------------------------------------------
# [batch, K] targets: one attribution per target, exactly the K separate calls
# --------------------------------------------------------------------------------------------
MULTI_TARGET_CASES = {
    "faithfulness_correlation": (metrics.faithfulness_correlation, dict(key=KEY(40), subset_size=6, samples=5)),
    "sensitivity_n": (metrics.sensitivity_n, dict(key=KEY(41), n=(2, 9), samples=4, patch=2)),
    "infidelity": (metrics.infidelity, dict(key=KEY(42), samples=3, normalize=True)),
    "monotonicity": (metrics.monotonicity, dict(key=KEY(43), samples=2, baseline="uniform", patch=3)),
    "road": (metrics.road, dict(key=KEY(44), percentages=(0.1, 0.5), score="probability", max_iter=20)),
    "region_perturbation": (metrics.region_perturbation, dict(patch=3, steps=3)),
}


@pytest.mark.parametrize("name", sorted(MULTI_TARGET_CASES))
def test_k_targets_equal_k_separate_calls(setup, name):
    """target [B, K] with attribution [B, K, ...] -> [B, K, ...] whose column k is the call with
    (attribution[:, k], target[:, k]) and the same key (values compared, under one jit each)."""
    x, weights, t = setup
    metric, options = MULTI_TARGET_CASES[name]
    fn = jax.jit(partial(metric, nonlinear(weights), **options))
    tk = jnp.stack([t, (t + 1) % K], axis=1)  # [B, 2]
    maps = jnp.stack([rand(50, x.shape, "normal"), rand(51, x.shape[:3], "normal")[..., None] * x], axis=1)
    out = fn(x, maps, tk)
    columns = [fn(x, maps[:, k], tk[:, k]) for k in range(2)]
    stacked = jax.tree.map(lambda *cols: jnp.stack(cols, axis=1), *columns)
    chex.assert_trees_all_equal_shapes(out, stacked)
    chex.assert_trees_all_close(out, stacked, rtol=1e-5, atol=5e-5)  # batched vs one-target programs: float32 rounding
    first = jax.tree.leaves(out)[0]
    assert first.shape[:2] == (B, 2) and bool(jnp.all(jnp.isfinite(first)))
    assert float(jnp.max(jnp.abs(first[:, 0] - first[:, 1]))) > 1e-4  # the two columns really differ


@pytest.mark.parametrize("name", sorted(MULTI_TARGET_CASES))
def test_k_targets_channelless_maps_equal_maps_broadcast_over_channels(setup, name):
    """[B, K, H, W] maps are checked once and scored as the same maps repeated over the C channels."""
    x, weights, t = setup
    metric, options = MULTI_TARGET_CASES[name]
    fn = partial(metric, nonlinear(weights), **options)
    tk = jnp.stack([t, (t + 1) % K], axis=1)
    maps = rand(52, (B, 2, H, W), "normal")
    full = jnp.broadcast_to(maps[..., None], (B, 2, H, W, C))
    chex.assert_trees_all_close(fn(x, maps, tk), fn(x, full, tk), rtol=1e-5, atol=1e-6)


def test_k_targets_traced_out_of_range_entry_is_nan(setup):
    x, weights, t = setup
    tk = jnp.stack([t, (t + 1) % K], axis=1).at[2, 1].set(K)
    out = jax.jit(partial(metrics.infidelity, linear(weights), key=KEY(0), samples=2))(x, jnp.stack([x, x], 1), tk)
    assert bool(jnp.isnan(out[2, 1])) and int(jnp.isnan(out).sum()) == 1


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def test_invalid_arguments_raise(setup):
    x, weights, t = setup
    f, k = linear(weights), KEY(0)
    a = x
    cases = [
        (lambda: metrics.faithfulness_correlation(f, x, a, t, key=k, subset_size=1000), "subset_size"),
        (lambda: metrics.faithfulness_correlation(f, x, a, t, key=k, samples=1, subset_size=4), "samples"),
        (lambda: metrics.faithfulness_correlation(f, x, a, t, key=None, subset_size=4), "key"),
        (lambda: metrics.faithfulness_correlation(f, x, a, t, key=k, subset_size=4, baseline="grey"), "baseline"),
        (lambda: metrics.faithfulness_correlation(f, x, a[:, :2], t, key=k, subset_size=4), "attribution"),
        (lambda: metrics.faithfulness_correlation(f, x, a, t[:2], key=k, subset_size=4), "target"),
        (lambda: metrics.faithfulness_correlation(f, x, a, jnp.stack([t, t], 1), key=k, subset_size=4),
         r"attribution must be \[batch, K, \.\.\.\] with \[batch, K\] = \(3, 2\)"),
        (lambda: metrics.infidelity(f, x, jnp.stack([a, a], 1)[..., :1], jnp.stack([t, t], 1), key=k), "attribution"),
        (lambda: metrics.road(f, x, a, t[:, None, None], key=k), "target must have shape"),
        (lambda: metrics.faithfulness_correlation(f, x, a, t + 5, key=k, subset_size=4), "target"),
        (lambda: metrics.faithfulness_correlation(f, x, a, t, key=k, subset_size=4, chunk=0), "chunk"),
        (lambda: metrics.sensitivity_n(f, x, a, t, key=k, n=0), "n"),
        (lambda: metrics.sensitivity_n(f, x, a, t, key=k, n=(2, 1000)), "n"),
        (lambda: metrics.sensitivity_n(f, x, a, t, key=k, n=()), "n"),
        (lambda: metrics.sensitivity_n(f, x, a, t, key=k, n=3, patch=9), "patch"),
        (lambda: metrics.infidelity(f, x, a, t, key=k, noise=-1.0), "noise"),
        (lambda: metrics.infidelity(f, x, a, t, key=k, samples=0), "samples"),
        (lambda: metrics.monotonicity(f, x, a, t, baseline="uniform"), "key"),
        (lambda: metrics.monotonicity(f, x, a, t, key=k, baseline="uniform", uniform_range=(1.0, 0.0)), "uniform_range"),
        (lambda: metrics.monotonicity(f, x.reshape(B, -1), a.reshape(B, -1), t, patch=2), "NHWC"),
        (lambda: metrics.road(f, x, a, t, key=k, percentages=(0.5, 1.0)), "percentages"),
        (lambda: metrics.road(f, x, a, t, key=k, order="morf"), "order"),
        (lambda: metrics.road(f, x, a, t, key=k, score="logit"), "score"),
        (lambda: metrics.road(f, x, a, t, noise=0.1), "key"),
        (lambda: metrics.road(f, x, a, t, key=k, max_iter=0), "max_iter"),
        (lambda: metrics.noisy_linear_imputation(x, jnp.zeros((B, H, W + 1), bool), noise=0.0), "removed"),
        (lambda: metrics.region_perturbation(f, x, a, t, patch=2, steps=10), "steps"),
        (lambda: metrics.region_perturbation(f, x, a, t, patch=0), "patch"),
        (lambda: metrics.region_perturbation(f, x, a, t, patch=None), "patch"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
