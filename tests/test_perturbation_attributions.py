"""Tests for distill_jax.perturbation_attributions against closed forms and plain-numpy references."""
import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import pairwise_distances

from distill_jax import attr
from distill_jax.attr import _perturbation

B, H, W, C, K = 3, 5, 5, 2, 3
D = H * W * C


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(D, K)).astype(np.float32),
        "c": rng.normal(size=(K,)).astype(np.float32),
        "w1": (rng.normal(size=(D, 6)) / 3).astype(np.float32),
        "w2": rng.normal(size=(6, K)).astype(np.float32),
    }


P = _params()


def linear(x):
    """f(x) = x.reshape(b, -1) @ w + c: removing a set S of elements changes logit t by sum_S w_t (x - x')."""
    return x.reshape(x.shape[0], -1) @ P["w"][: int(np.prod(x.shape[1:]))] + P["c"]


def mlp(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ P["w1"][: int(np.prod(x.shape[1:]))]) @ P["w2"]


def mlp_np(x):
    x = np.asarray(x, np.float64)
    return np.tanh(x.reshape(x.shape[0], -1) @ P["w1"][: int(np.prod(x.shape[1:]))]) @ P["w2"]


def softmax_np(v):
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def patch_of(h, w, ph, pw, width):
    """Reference patch numbering by loops: row-major over a grid of ceil-divided patches."""
    return (h // ph) * math.ceil(width / pw) + (w // pw)


def patch_values(amap, ph, pw):
    """The value of every patch, read at its top-left pixel (channel 0): [batch, M]."""
    _, height, width, _ = amap.shape
    return np.stack([amap[:, i, j, 0] for i in range(0, height, ph) for j in range(0, width, pw)], axis=1)


def linear_patch_contributions(x, base, t, ph, pw):
    """sum over patch j and channels of w_t * (x - x'), per example, by loops: [batch, M]."""
    batch, height, width, chans = x.shape
    wt = P["w"][: height * width * chans].reshape(height, width, chans, K)
    m = math.ceil(height / ph) * math.ceil(width / pw)
    out = np.zeros((batch, m))
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                out[b, patch_of(h, w, ph, pw, width)] += np.sum(wt[h, w, :, t[b]] * (x[b, h, w] - base[b, h, w]))
    return out


def jitted(method, model, x, **options):
    """run(target, chunk=...) -> method(model, x, target, chunk=chunk, **options), compiled per chunk."""
    def run(target, chunk=None):
        return jax.jit(lambda t: method(model, x, t, chunk=chunk, **options))(target)

    return run


@pytest.fixture(scope="module")
def data():
    x = np.asarray(jax.random.normal(jax.random.key(1), (B, H, W, C)))
    base = np.asarray(jax.random.normal(jax.random.key(2), (B, H, W, C)))
    return x, base, np.array([0, 2, 1])


# --------------------------------------------------------------------------------------------
# Feature grid
# --------------------------------------------------------------------------------------------
def test_feature_ids_grid_with_smaller_last_patch():
    ids, m = attr.feature_ids((1, 5, 5, 3), (2, 3))
    assert m == 3 * 2 and ids.shape == (5, 5, 1)
    expected = np.array([[patch_of(h, w, 2, 3, 5) for w in range(5)] for h in range(5)])
    np.testing.assert_array_equal(ids[..., 0], expected)
    assert np.sum(ids == 5) == 1 * 2  # last row of patches has 1 row, last column 2 columns
    flat_ids, m_flat = attr.feature_ids((4, 7), 3)
    np.testing.assert_array_equal(flat_ids, np.arange(7))
    assert m_flat == 7


# --------------------------------------------------------------------------------------------
# Feature ablation
# --------------------------------------------------------------------------------------------
class FeatureAblationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_linear_closed_form_every_pixel_gets_the_patch_drop(self):
        x = np.asarray(jax.random.normal(jax.random.key(1), (B, H, W, C)))
        base = np.asarray(jax.random.normal(jax.random.key(2), (B, H, W, C)))
        t2 = np.array([[0, 1], [2, 2], [1, 0]])  # [batch, K=2] targets: one map per target
        fn = self.variant(functools.partial(attr.feature_ablation, linear, patch=2, baseline=base))
        amap = np.asarray(fn(x, t2))
        assert amap.shape == (B, 2, H, W, C)
        for k in range(2):
            contrib = linear_patch_contributions(x, base, t2[:, k], 2, 2)
            expected = np.zeros_like(x)
            for h in range(H):
                for w in range(W):
                    expected[:, h, w, :] = contrib[:, patch_of(h, w, 2, 2, W)][:, None]
            np.testing.assert_allclose(amap[:, k], expected, rtol=1e-4, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mlp_against_numpy_loops(self):
        x = np.asarray(jax.random.normal(jax.random.key(1), (B, H, W, C)))
        t = np.array([1, 0, 2])
        amap = np.asarray(self.variant(functools.partial(attr.feature_ablation, mlp, patch=(3, 2), baseline=0.5))(x, t))
        full = mlp_np(x)[np.arange(B), t]
        for h in range(H):
            for w in range(W):
                ablated = x.copy()
                p = patch_of(h, w, 3, 2, W)
                for hh in range(H):
                    for ww in range(W):
                        if patch_of(hh, ww, 3, 2, W) == p:
                            ablated[:, hh, ww, :] = 0.5
                drop = full - mlp_np(ablated)[np.arange(B), t]
                np.testing.assert_allclose(amap[:, h, w, :], np.repeat(drop[:, None], C, 1), rtol=1e-4, atol=1e-5)


def test_feature_ablation_flat_inputs_each_feature_alone():
    x = np.asarray(jax.random.normal(jax.random.key(3), (B, 7)))
    t = np.array([2, 0, 1])
    amap = attr.feature_ablation(linear, x, t, baseline=1.0)
    np.testing.assert_allclose(amap, (x - 1.0) * P["w"][:7, t].T, rtol=1e-5, atol=1e-5)


def test_feature_ablation_same_values_for_every_chunk(data):
    x, base, t = data
    run = jitted(attr.feature_ablation, mlp, x, patch=2, baseline=base)
    ref = run(t, chunk=None)  # 9 features: 8 per lax.map step on CPU, then a remainder of 1
    for chunk in (1, 9):
        np.testing.assert_allclose(run(t, chunk=chunk), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# RISE
# --------------------------------------------------------------------------------------------
def bilinear_np(grid, out_h, out_w):
    """Half-pixel-centre bilinear upsampling with edge clamping, by loops (skimage order=1 'reflect')."""
    def axis_weights(n_in, n_out):
        mat = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            mat[o, i0] += 1 - (src - i0)
            mat[o, i1] += src - i0
        return mat

    return axis_weights(grid.shape[0], out_h) @ grid @ axis_weights(grid.shape[1], out_w).T


def test_rise_masks_are_upsampled_shifted_grids():
    cells, hw, n = 3, (7, 8), 2000
    masks = np.asarray(attr.rise_masks(jax.random.key(4), n, cells, 0.3, hw))
    grids, shifts = map(np.asarray, _perturbation._rise_grids(jax.random.key(4), n, cells, 0.3, hw))
    ch, cw = math.ceil(7 / cells), math.ceil(8 / cells)
    assert set(np.unique(grids)) == {0.0, 1.0} and abs(grids.mean() - 0.3) < 0.02
    assert shifts.min() == 0 and shifts[:, 0].max() == ch - 1 and shifts[:, 1].max() == cw - 1
    for g, s, m in zip(grids[:5], shifts[:5], masks[:5]):
        up = bilinear_np(g, (cells + 1) * ch, (cells + 1) * cw)
        np.testing.assert_allclose(m, up[s[0] : s[0] + 7, s[1] : s[1] + 8], atol=1e-6)
    assert masks.min() >= 0 and masks.max() <= 1 and abs(masks.mean() - 0.3) < 0.02
    np.testing.assert_array_equal(attr.rise_masks(jax.random.key(5), 3, cells, 1.0, hw), np.ones((3, 7, 8)))


def rise_np(x, t, masks, p_keep):
    sal = np.zeros(x.shape[:3])
    for m in masks:
        probs = softmax_np(mlp_np(x * m[None, :, :, None]))[np.arange(x.shape[0]), t]
        sal += probs[:, None, None] * m[None]
    return np.repeat((sal / (len(masks) * p_keep))[..., None], x.shape[3], axis=3)


class RiseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_numpy_with_the_same_masks(self):
        x = np.asarray(jax.random.normal(jax.random.key(1), (B, H, W, C)))
        t2 = np.array([[0, 1], [2, 2], [1, 0]])  # [batch, K=2] targets
        key = jax.random.key(7)
        fn = self.variant(functools.partial(attr.rise, mlp, key=key, masks=20, cells=2, p_keep=0.4, chunk=6))
        masks = np.asarray(attr.rise_masks(key, 20, 2, 0.4, (H, W)))
        amap = np.asarray(fn(x, t2))
        for k in range(2):
            np.testing.assert_allclose(amap[:, k], rise_np(x, t2[:, k], masks, 0.4), rtol=1e-4, atol=1e-5)


def test_rise_same_values_for_every_chunk(data):
    x, _, t = data
    run = jitted(attr.rise, mlp, x, key=jax.random.key(8), masks=11, cells=3)
    ref = run(t)  # 8 masks per scan step on CPU: a last step with 3 real masks and 5 of weight 0
    for chunk in (1, 11):
        np.testing.assert_allclose(run(t, chunk=chunk), ref, rtol=1e-5, atol=1e-6)


def test_rise_is_highest_where_the_model_looks():
    def top_left_model(v):  # class 0 grows with the top-left 3x3 corner only
        s = jnp.sum(v[:, :3, :3, :], axis=(1, 2, 3))
        return jnp.stack([0.5 * s, jnp.zeros_like(s)], axis=1)

    x = jnp.ones((1, 9, 9, 1))
    sal = np.asarray(attr.rise(top_left_model, x, jnp.array([0]), key=jax.random.key(9), masks=300, cells=3))[0, :, :, 0]
    region = np.zeros((9, 9), bool)
    region[:3, :3] = True
    assert region[np.unravel_index(np.argmax(sal), sal.shape)]
    assert sal[region].mean() > sal[~region].mean() + 0.05
    assert sal[5:, 5:].max() < sal[region].min()


# --------------------------------------------------------------------------------------------
# KernelSHAP
# --------------------------------------------------------------------------------------------
X4 = np.asarray(jax.random.normal(jax.random.key(10), (B, 4, 4, C)))  # patch 2 -> M = 4 features
BASE4 = np.asarray(jax.random.normal(jax.random.key(11), (B, 4, 4, C)))


def shapley_np(x, base, t, ph, pw):
    """Exact Shapley values of v(S) = mlp(x on S, base elsewhere)[t] by the subset formula, by loops."""
    ids, m = attr.feature_ids(x.shape, (ph, pw))
    ids = np.broadcast_to(ids, x.shape[1:])

    def v(subset):
        keep = np.isin(ids, list(subset))[None]
        return mlp_np(np.where(keep, x, base))[np.arange(x.shape[0]), t]

    phi = np.zeros((x.shape[0], m))
    for j in range(m):
        others = [i for i in range(m) if i != j]
        for size in range(m):
            weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
            for s in itertools.combinations(others, size):
                phi[:, j] += weight * (v(s + (j,)) - v(s))
    return phi


class KernelShapTest(chex.TestCase):
    @chex.variants(with_jit=True)
    def test_exact_mode_gives_the_shapley_values_of_a_nonlinear_model(self):
        t = np.array([0, 2, 1])
        fn = self.variant(functools.partial(attr.kernel_shap, mlp, patch=2, baseline=BASE4, exact=True, ridge=0.0))
        phi = patch_values(np.asarray(fn(X4, t)), 2, 2)
        np.testing.assert_allclose(phi, shapley_np(X4, BASE4, t, 2, 2), rtol=1e-4, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sampled_linear_model_recovers_patch_sums(self):
        t2 = np.array([[1, 0], [1, 2], [0, 0]])  # [batch, K=2] targets
        fn = self.variant(
            functools.partial(attr.kernel_shap, linear, key=jax.random.key(12), samples=32, patch=2, baseline=BASE4)
        )
        amap = np.asarray(fn(X4, t2))
        for k in range(2):
            expected = linear_patch_contributions(X4, BASE4, t2[:, k], 2, 2)
            np.testing.assert_allclose(patch_values(amap[:, k], 2, 2), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(amap[:, :, :2, :2, :], np.broadcast_to(amap[:, :, :1, :1, :1], (B, 2, 2, 2, C)))


def test_kernel_shap_efficiency_and_convergence_on_a_nonlinear_model():
    t = np.array([2, 0, 1])
    amap = attr.kernel_shap(mlp, X4, t, key=jax.random.key(13), samples=3000, patch=2, baseline=BASE4)
    phi = patch_values(np.asarray(amap), 2, 2)
    delta = mlp_np(X4)[np.arange(B), t] - mlp_np(BASE4)[np.arange(B), t]
    np.testing.assert_allclose(phi.sum(axis=1), delta, rtol=1e-4, atol=1e-5)  # efficiency, exact by the constraint
    exact = shapley_np(X4, BASE4, t, 2, 2)
    assert np.max(np.abs(phi - exact)) < 0.05 * np.max(np.abs(exact))  # the sampled objective approaches pi's


def test_kernel_shap_coalitions_follow_the_shapley_kernel():
    m = 5
    z = np.asarray(attr.kernel_shap_coalitions(jax.random.key(14), 4000, m))
    sizes = z.sum(axis=1).astype(int)
    assert sizes.min() >= 1 and sizes.max() <= m - 1 and set(np.unique(z)) == {0.0, 1.0}
    s = np.arange(1, m)
    expected = (m - 1) / (s * (m - s))
    expected = expected / expected.sum()
    observed = np.bincount(sizes, minlength=m)[1:m] / len(sizes)
    np.testing.assert_allclose(observed, expected, atol=0.03)
    ones_at = z[sizes == 1].argmax(axis=1)  # uniform among the subsets of one size
    assert np.bincount(ones_at, minlength=m).min() > 0.5 * len(ones_at) / m


def test_kernel_shap_same_values_for_every_chunk():
    t = np.array([0, 1, 2])
    run = jitted(attr.kernel_shap, mlp, X4, key=jax.random.key(15), samples=13, patch=2, baseline=BASE4)
    ref = run(t)
    for chunk in (1, 13):
        np.testing.assert_allclose(run(t, chunk=chunk), ref, rtol=1e-5, atol=1e-5)


def test_kernel_shap_single_feature_is_the_whole_difference():
    t = np.array([0, 1, 2])
    amap = np.asarray(attr.kernel_shap(mlp, X4, t, key=jax.random.key(0), patch=4, baseline=BASE4))
    delta = mlp_np(X4)[np.arange(B), t] - mlp_np(BASE4)[np.arange(B), t]
    np.testing.assert_allclose(amap, np.broadcast_to(delta[:, None, None, None], X4.shape), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# LIME
# --------------------------------------------------------------------------------------------
def lime_sklearn(model_cls, x, base, t, z, ids, kernel_width, **kw):
    """LIME by hand: perturb with numpy, weights from sklearn's cosine distance, sklearn's regression."""
    ids = np.broadcast_to(ids, x.shape[1:])
    y = np.stack([mlp_np(np.where(zi[ids][None] > 0, x, base))[np.arange(x.shape[0]), t] for zi in z])
    d = pairwise_distances(z, np.ones((1, z.shape[1])), metric="cosine")[:, 0]
    weights = np.exp(-(d**2) / kernel_width**2)
    return np.stack([model_cls(**kw).fit(z, y[:, b], sample_weight=weights).coef_ for b in range(x.shape[0])])


class LimeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_linear_model_coefficients_are_the_patch_contributions(self):
        x = np.asarray(jax.random.normal(jax.random.key(1), (B, H, W, C)))
        base = np.asarray(jax.random.normal(jax.random.key(2), (B, H, W, C)))
        t2 = np.array([[2, 0], [0, 0], [1, 2]])  # [batch, K=2] targets
        fn = self.variant(
            functools.partial(attr.lime, linear, key=jax.random.key(16), samples=40, patch=2, baseline=base, ridge=0.0)
        )
        amap = np.asarray(fn(x, t2))
        for k in range(2):
            expected = linear_patch_contributions(x, base, t2[:, k], 2, 2)
            np.testing.assert_allclose(patch_values(amap[:, k], 2, 2), expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True)
    def test_nonlinear_model_matches_sklearn_on_the_same_coalitions(self):
        t = np.array([0, 2, 1])
        key = jax.random.key(17)
        z = np.asarray(attr.lime_coalitions(key, 30, 4))
        ids = attr.feature_ids(X4.shape, 2)[0]
        for ridge, model_cls, kw in ((0.0, LinearRegression, {}), (0.5, Ridge, {"alpha": 0.5})):
            options = dict(key=key, samples=30, patch=2, baseline=BASE4, ridge=ridge, kernel_width=0.4)
            fn = self.variant(functools.partial(attr.lime, mlp, **options))
            expected = lime_sklearn(model_cls, X4, BASE4, t, z, ids, 0.4, **kw)
            np.testing.assert_allclose(patch_values(np.asarray(fn(X4, t)), 2, 2), expected, rtol=1e-3, atol=1e-4)


def test_lime_coalitions_start_with_the_input():
    z = np.asarray(attr.lime_coalitions(jax.random.key(18), 500, 6))
    np.testing.assert_array_equal(z[0], np.ones(6))
    assert set(np.unique(z)) == {0.0, 1.0} and abs(z[1:].mean() - 0.5) < 0.05


def test_lime_same_values_for_every_chunk(data):
    x, base, t = data
    run = jitted(attr.lime, mlp, x, key=jax.random.key(19), samples=12, patch=3, baseline=base)
    ref = run(t)
    for chunk in (1, 12):
        np.testing.assert_allclose(run(t, chunk=chunk), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# [batch, K] targets
# --------------------------------------------------------------------------------------------
MULTI = {
    "feature_ablation": functools.partial(attr.feature_ablation, mlp, patch=2, baseline=0.5),
    "rise": functools.partial(attr.rise, mlp, key=jax.random.key(3), masks=6, cells=2),
    "kernel_shap": functools.partial(attr.kernel_shap, mlp, key=jax.random.key(4), samples=12, patch=3),
    "lime": functools.partial(attr.lime, mlp, key=jax.random.key(5), samples=12, patch=3),
}


@pytest.mark.parametrize("name", sorted(MULTI))
def test_k_targets_equal_k_separate_calls(data, name):
    """[batch, K] targets read from the same forward passes give exactly the K calls with target[:, k]."""
    x, _, _ = data
    fn = jax.jit(MULTI[name])
    tk = np.array([[0, 1, 2], [2, 2, 0], [1, 0, 1]])
    out = fn(x, tk)
    chex.assert_shape(out, (B, 3, H, W, C))
    stacked = jnp.stack([fn(x, tk[:, k]) for k in range(3)], axis=1)
    np.testing.assert_allclose(out, stacked, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, 0] - out[:, 2]))) > 1e-4


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
KEY = jax.random.key(0)
METHODS = {
    "feature_ablation": functools.partial(attr.feature_ablation, linear),
    "rise": functools.partial(attr.rise, linear, key=KEY, masks=4),
    "kernel_shap": functools.partial(attr.kernel_shap, linear, key=KEY, samples=4),
    "lime": functools.partial(attr.lime, linear, key=KEY, samples=4),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shared_argument_errors(data, name):
    x, _, t = data
    fn = METHODS[name]
    with pytest.raises(ValueError, match="target"):
        fn(x, np.array([0, 1, K]))
    with pytest.raises(ValueError, match="target"):
        fn(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="chunk"):
        fn(x, t, chunk=0)
    with pytest.raises(ValueError, match="^x "):
        fn(np.zeros((B, H, W, C), np.int32), t)
    if name != "rise":
        with pytest.raises(ValueError, match="patch"):
            fn(x, t, patch=0)
        with pytest.raises(ValueError, match="patch"):
            fn(x, t, patch=(2, H + 1))
        with pytest.raises(ValueError, match="baseline"):
            fn(x, t, baseline=np.zeros((2, 2)))
    if name != "feature_ablation":
        with pytest.raises(ValueError, match="key"):
            fn(x, t, key=None)
        with pytest.raises(ValueError, match="masks" if name == "rise" else "samples"):
            fn(x, t, **{"masks" if name == "rise" else "samples": 0})


def test_method_specific_errors(data):
    x, _, t = data
    with pytest.raises(ValueError, match="x must be NHWC"):
        attr.rise(linear, x.reshape(B, -1), t, key=KEY)
    with pytest.raises(ValueError, match="cells"):
        attr.rise(linear, x, t, key=KEY, cells=0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="p_keep"):
            attr.rise(linear, x, t, key=KEY, p_keep=bad)
    with pytest.raises(ValueError, match="exact"):
        attr.kernel_shap(linear, x, t, patch=1, exact=True)
    with pytest.raises(ValueError, match="ridge"):
        attr.kernel_shap(linear, x, t, key=KEY, ridge=-1.0)
    with pytest.raises(ValueError, match="kernel_width"):
        attr.lime(linear, x, t, key=KEY, kernel_width=0.0)
    with pytest.raises(ValueError, match="features"):
        attr.kernel_shap_coalitions(KEY, 4, 1)


def test_traced_out_of_range_target_gives_nan(data):
    x, base, _ = data
    fn = jax.jit(functools.partial(attr.lime, linear, key=KEY, samples=8, patch=2, baseline=base))
    out = np.asarray(fn(x, jnp.array([0, K, 1])))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
