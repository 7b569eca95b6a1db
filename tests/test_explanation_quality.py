"""Tests for distill_jax.explanation_quality: robustness, complexity and randomisation metrics.

Every value is checked against a closed form or a plain-numpy (loop) reference; the noise of the
Monte Carlo metrics is redrawn here with the documented jax.random calls, so the references use the
very same perturbations.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from scipy.stats import entropy as scipy_entropy
from scipy.stats import pearsonr, spearmanr

from distill_jax import metrics
from distill_jax.metrics import _randomisation

B, H, W, C = 3, 4, 4, 1
D = H * W * C
R = 0.1


def normal(seed, shape):
    """Test data from numpy (jax.random would compile a generator for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def uniform(seed, shape, lo=0.0, hi=1.0):
    return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=shape), jnp.float32)


def fast_key(seed):
    """An rbg key: its noise compiles about 3x faster than threefry's, for the tests whose expected value does
    not depend on the noise drawn (rbg draws differ under vmap, so chunk sizes change its noise)."""
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def x():
    return uniform(0, (B, H, W, C), 0.5, 1.0)


@pytest.fixture(scope="module")
def target():
    return jnp.array([0, 1, 2], jnp.int32)


def identity_attr(v, t):
    return v


def uniform_noise(key, samples, shape, r=R):
    keys = jax.random.split(key, samples)
    return [np.asarray(jax.random.uniform(k, shape, jnp.float32, -r, r), np.float64) for k in keys]


def gaussian_noise(key, samples, shape, r=R):
    return [np.asarray(r * jax.random.normal(k, shape, jnp.float32), np.float64) 
            for k in jax.random.split(key, samples)]


def flat(a):
    a = np.asarray(a, np.float64)
    return a.reshape(a.shape[0], -1)


# --------------------------------------------------------------------------------------------
# avg_sensitivity
# --------------------------------------------------------------------------------------------
def test_avg_sensitivity_identity_is_mean_noise_ratio(x, target):
    key, samples = jax.random.key(3), 4
    got = metrics.avg_sensitivity(identity_attr, x, target, key=key, radius=R, samples=samples)
    xs = flat(x)
    ref = np.zeros(B)
    for u in uniform_noise(key, samples, x.shape):
        for b in range(B):
            ref[b] += np.sqrt(np.sum(flat(u)[b] ** 2)) / np.sqrt(np.sum(xs[b] ** 2)) / samples
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # unnormalised L-inf: mean_s max_i |u_si|
    linf = metrics.avg_sensitivity(identity_attr, x, target, key=key, radius=R, samples=samples, norm="linf",
                              normalize=False)
    ref_inf = np.mean([np.abs(flat(u)).max(1) for u in uniform_noise(key, samples, x.shape)], axis=0)
    np.testing.assert_allclose(linf, ref_inf, rtol=1e-5)


def test_avg_sensitivity_constant_map_is_zero_and_chunks_agree(x, target):
    const = lambda v, t: jnp.ones_like(v)
    np.testing.assert_array_equal(metrics.avg_sensitivity(const, x, target, key=fast_key(1), radius=R, samples=4),
                                  np.zeros(B))
    quad = lambda v, t: v**2 * (1.0 + t[:, None, None, None])
    # chunk=None is the backend default (8 on CPU: all 4 samples in one step); other chunk sizes in
    # test_local_lipschitz_linear_map_matches_numpy_and_spectral_bound
    key = jax.random.key(1)
    vals = [metrics.avg_sensitivity(quad, x, target, key=key, radius=R, samples=4, chunk=c) for c in (1, None)]
    for v in vals[1:]:
        np.testing.assert_allclose(v, vals[0], rtol=1e-6)
    assert float(jnp.min(vals[0])) > 0


def test_avg_sensitivity_bad_arguments(x, target):
    key = jax.random.key(0)
    f = functools.partial(metrics.avg_sensitivity, identity_attr, x, target, key=key)
    with pytest.raises(ValueError, match="radius"):
        f(radius=0.0)
    with pytest.raises(ValueError, match="samples"):
        f(radius=R, samples=0)
    with pytest.raises(ValueError, match="norm"):
        f(radius=R, norm="l3")
    with pytest.raises(ValueError, match="perturbation"):
        f(radius=R, perturbation="salt")
    with pytest.raises(ValueError, match="chunk"):
        f(radius=R, chunk=0)
    with pytest.raises(ValueError, match="target"):
        metrics.avg_sensitivity(identity_attr, x, target[:2], key=key, radius=R)
    with pytest.raises(ValueError, match="attr_fn"):
        metrics.avg_sensitivity(lambda v, t: v.sum(), x, target, key=key, radius=R)
    with pytest.raises(ValueError, match="x must"):
        metrics.avg_sensitivity(identity_attr, jnp.ones(3), target, key=key, radius=R)


# --------------------------------------------------------------------------------------------
# local_lipschitz
# --------------------------------------------------------------------------------------------
def test_local_lipschitz_of_scaled_identity_is_the_scale(x, target):
    # Gaussian noise (the default) with A(x) = -2 x: see JitMatchesEager.test_local_lipschitz
    got = metrics.local_lipschitz(lambda v, t: 3.0 * v, x, target, key=fast_key(2), radius=R, perturbation="uniform")
    np.testing.assert_allclose(got, np.full(B, 3.0), rtol=1e-5)


def test_local_lipschitz_linear_map_matches_numpy_and_spectral_bound(x, target):
    m = np.asarray(normal(4, (D, D)), np.float64)
    attr = lambda v, t: (v.reshape(v.shape[0], -1) @ jnp.asarray(m, jnp.float32).T).reshape(v.shape)
    key, samples = jax.random.key(5), 6
    got = metrics.local_lipschitz(attr, x, target, key=key, radius=R, samples=samples)
    ref = np.full(B, -np.inf)
    for u in gaussian_noise(key, samples, x.shape):
        for b in range(B):
            ub = flat(u)[b]
            ref[b] = max(ref[b], np.linalg.norm(m @ ub) / (np.linalg.norm(ub) + 1e-10))
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert np.all(np.asarray(got) <= np.linalg.norm(m, 2) * (1 + 1e-5))
    # chunk=2: three lax.map steps of 2 (the call above: chunk=None, all 6 at once on CPU)
    np.testing.assert_allclose(metrics.local_lipschitz(attr, x, target, key=key, radius=R, samples=samples, chunk=2),
                               got, rtol=1e-6)


def test_local_lipschitz_bad_arguments(x, target):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="radius"):
        metrics.local_lipschitz(identity_attr, x, target, key=key, radius=-1.0)
    with pytest.raises(ValueError, match="samples"):
        metrics.local_lipschitz(identity_attr, x, target, key=key, radius=R, samples=2.5)
    with pytest.raises(ValueError, match="perturbation"):
        metrics.local_lipschitz(identity_attr, x, target, key=key, radius=R, perturbation=None)


# --------------------------------------------------------------------------------------------
# sparseness, complexity, discrete_entropy
# --------------------------------------------------------------------------------------------
def quantus_sparseness(a, eps=1e-7):
    """Quantus 0.6 Sparseness.evaluate_batch (abs already taken), in numpy."""
    a = np.abs(np.asarray(a, np.float64)).reshape(len(a), -1) + eps
    n = a.shape[1]
    a = np.sort(a, axis=-1)
    idx = np.arange(1, n + 1)
    return ((2 * idx - n - 1) * a).sum(-1) / (n * a.sum(-1))


def quantus_complexity(a):
    a = np.abs(np.asarray(a, np.float64)).reshape(len(a), -1)
    a = a / a.sum(-1, keepdims=True)
    return -(a * np.log(a + 1e-12)).sum(-1)


def test_sparseness_closed_forms():
    n = 8
    uniform = jnp.full((2, n), 0.3)
    one_hot = jnp.zeros((2, n)).at[0, 3].set(2.0).at[1, 0].set(-5.0)
    np.testing.assert_allclose(metrics.sparseness(uniform), [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(metrics.sparseness(one_hot), [1 - 1 / n] * 2, rtol=1e-6)
    # sorted |a| = [1, 2, 3, 4]: (-3*1 - 1*2 + 1*3 + 3*4) / (4 * 10) = 0.25
    # sorted |a| = [0, 0, 1, 3]: (1*1 + 3*3) / (4 * 4) = 0.625
    hand = jnp.array([[4.0, -2.0, 1.0, 3.0], [-3.0, 1.0, 0.0, 0.0]])
    np.testing.assert_allclose(metrics.sparseness(hand), [0.25, 0.625], rtol=1e-6)
    assert float(metrics.sparseness(jnp.zeros((1, 5)))[0]) == 0.0
    assert float(quantus_sparseness(np.zeros((1, 5)))[0]) == pytest.approx(0.0, abs=1e-9)


def test_sparseness_matches_quantus_formula():
    a = normal(7, (5, 6, 6, 3))
    np.testing.assert_allclose(metrics.sparseness(a), quantus_sparseness(a, eps=0.0), rtol=1e-5)
    np.testing.assert_allclose(metrics.sparseness(a, eps=1e-7), quantus_sparseness(a), rtol=1e-5)


def test_complexity_closed_forms_and_quantus_formula():
    n = 10
    np.testing.assert_allclose(metrics.complexity(jnp.full((2, n), -0.7)), [np.log(n)] * 2, rtol=1e-6)
    np.testing.assert_allclose(metrics.complexity(jnp.zeros((1, n)).at[0, 4].set(3.0)), [0.0], atol=1e-7)
    # p = [1/4, 1/4, 1/2]: H = 1.5 ln 2
    np.testing.assert_allclose(metrics.complexity(jnp.array([[1.0, -1.0, 2.0]])), [1.5 * np.log(2)], rtol=1e-6)
    assert float(metrics.complexity(jnp.zeros((1, 4)))[0]) == 0.0
    a = normal(8, (4, 5, 5, 2))
    np.testing.assert_allclose(metrics.complexity(a), quantus_complexity(a), rtol=1e-5)


def test_discrete_entropy_matches_numpy_histogram():
    # [0, 0, 1, 1] in 2 bins: counts [2, 2] -> ln 2; [0, 0, 0, 3] in 4 bins: counts [3, 0, 0, 1]
    hand = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(metrics.discrete_entropy(hand, n_bins=2), [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(metrics.discrete_entropy(jnp.array([[0.0, 0.0, 0.0, 3.0]]), n_bins=4),
                               [scipy_entropy([3, 0, 0, 1])], rtol=1e-6)
    assert float(metrics.discrete_entropy(jnp.full((1, 9), 2.5))[0]) == 0.0
    a = normal(9, (4, 7, 7, 3))
    for n_bins in (1, 5, 100):
        ref = [scipy_entropy(np.histogram(np.asarray(v).ravel(), bins=n_bins)[0]) for v in a]
        np.testing.assert_allclose(metrics.discrete_entropy(a, n_bins=n_bins), ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.discrete_entropy(a, n_bins=0)


def test_complexity_metrics_bad_arguments():
    for fn in (metrics.sparseness, metrics.complexity, metrics.discrete_entropy):
        with pytest.raises(ValueError, match="attribution"):
            fn(jnp.ones(5))
    with pytest.raises(ValueError, match="eps"):
        metrics.sparseness(jnp.ones((2, 3)), eps=-1.0)


# --------------------------------------------------------------------------------------------
# ssim and random_logit
# --------------------------------------------------------------------------------------------
def numpy_ssim(a, b, win_size=7):
    """skimage.metrics.structural_similarity(a, b, data_range=max - min) on 1-D float64 arrays, by hand."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    data_range = max(a.max(), b.max()) - min(a.min(), b.min())
    f = lambda v: uniform_filter(v, size=win_size)
    ux, uy = f(a), f(b)
    cov_norm = win_size / (win_size - 1)
    vx, vy, vxy = (cov_norm * (f(a * a) - ux * ux), cov_norm * (f(b * b) - uy * uy), cov_norm * (f(a * b) - ux * uy))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return s[pad : len(s) - pad].mean()


def test_ssim_matches_numpy_reference():
    a = normal(10, (4, 5, 5, 1))
    b = 0.6 * a + 0.4 * normal(11, a.shape) + 0.3
    got = metrics.ssim(a, b)
    ref = [numpy_ssim(np.asarray(u).ravel(), np.asarray(v).ravel()) for u, v in zip(a, b)]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    got5 = metrics.ssim(a, b, win_size=5)
    ref5 = [numpy_ssim(np.asarray(u).ravel(), np.asarray(v).ravel(), 5) for u, v in zip(a, b)]
    np.testing.assert_allclose(got5, ref5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics.ssim(a, a), np.ones(4), rtol=1e-6)
    np.testing.assert_allclose(metrics.ssim(jnp.full((2, 9), 0.5), jnp.full((2, 9), 0.5)), [1.0, 1.0])
    with pytest.raises(ValueError, match="win_size"):
        metrics.ssim(a, b, win_size=4)
    with pytest.raises(ValueError, match="win_size"):
        metrics.ssim(a[:, :1, :1], b[:, :1, :1])


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = uniform(12, (3, 6, 6))
    b = a**2 - 0.2 * uniform(13, a.shape)
    for u, v, got in zip(a, b, metrics.ssim(a, b)):
        u, v = np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel()
        rng = float(np.abs(max(u.max(), v.max()) - min(u.min(), v.min())))
        # exactly Quantus' ssim(a, b): skimage with win_size=None and that data_range
        ref = metrics.structural_similarity(im1=u, im2=v, win_size=None, data_range=rng)
        assert float(got) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_random_logit_class_independent_map_is_one(x, target):
    key = jax.random.key(12)
    for similarity in ("ssim", "spearman", "pearson"):
        got = metrics.random_logit(lambda v, t: v**2, x, target, key=key, num_classes=5, similarity=similarity)
        np.testing.assert_allclose(got, np.ones(B), rtol=1e-6)


def test_random_logit_other_class_is_uniform_and_never_the_target():
    target = jnp.array([0, 3, 4, 2], jnp.int32)
    keys = jax.random.split(jax.random.key(13), 400)
    draws = np.asarray(jax.vmap(lambda k: _randomisation._off_target(k, target, 5))(keys))
    assert np.all(draws != np.asarray(target)[None])
    assert np.all((draws >= 0) & (draws < 5))
    for b, t in enumerate(np.asarray(target)):
        counts = np.bincount(draws[:, b], minlength=5)
        assert counts[t] == 0 and np.all(np.delete(counts, t) > 60)  # about 100 each


def test_random_logit_two_classes_matches_numpy(x):
    # with two classes the other class is 1 - target: the value is deterministic
    w = np.asarray(normal(14, (2, H, W, C)), np.float64)
    attr = lambda v, t: v * jnp.asarray(w, jnp.float32)[t]
    target = jnp.array([0, 1, 1], jnp.int32)
    xs = np.asarray(x, np.float64)
    maps = lambda t: [(xs[b] * w[t[b]]).ravel() for b in range(B)]
    same, other = maps(np.asarray(target)), maps(1 - np.asarray(target))
    refs = {
        "ssim": [numpy_ssim(u, v) for u, v in zip(same, other)],
        "spearman": [spearmanr(u, v)[0] for u, v in zip(same, other)],
        "pearson": [pearsonr(u, v)[0] for u, v in zip(same, other)],
    }
    for similarity, ref in refs.items():
        got = metrics.random_logit(attr, x, target, key=jax.random.key(0), num_classes=2, similarity=similarity)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_random_logit_bad_arguments(x, target):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.random_logit(identity_attr, x, jnp.zeros(B, jnp.int32), key=key, num_classes=1)
    with pytest.raises(ValueError, match="target"):
        metrics.random_logit(identity_attr, x, target, key=key, num_classes=2)
    with pytest.raises(ValueError, match="similarity"):
        metrics.random_logit(identity_attr, x, target, key=key, num_classes=5, similarity="kendall")
    with pytest.raises(ValueError, match="target"):
        metrics.random_logit(identity_attr, x, jnp.zeros((B, 2, 2), jnp.int32), key=key, num_classes=5)


# --------------------------------------------------------------------------------------------
# sMPRT and eMPRT on a tiny 2-layer MLP
# --------------------------------------------------------------------------------------------
HIDDEN, CLASSES = 6, 3


def mlp_params(seed):
    return {
        "dense1": {"w": normal(seed, (D, HIDDEN)) / 2, "b": jnp.full((HIDDEN,), 0.1)},
        "dense2": {"w": normal(seed + 1, (HIDDEN, CLASSES)), "b": normal(seed + 2, (CLASSES,))},
    }


def mlp_apply(params, v):
    h = jax.nn.relu(v.reshape(v.shape[0], -1) @ params["dense1"]["w"] + params["dense1"]["b"])
    return h @ params["dense2"]["w"] + params["dense2"]["b"]


def grad_x_input(params, v, t):
    g = jax.grad(lambda u: jnp.sum(jnp.take_along_axis(mlp_apply(params, u), t[:, None], 1)))(v)
    return g * v


def numpy_grad_x_input(params, v, t):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    v = np.asarray(v, np.float64)
    out = np.zeros_like(v)
    for b in range(len(v)):
        z = v[b].ravel() @ p["dense1"]["w"] + p["dense1"]["b"]
        g = p["dense1"]["w"] @ ((z > 0) * p["dense2"]["w"][:, t[b]])
        out[b] = g.reshape(v.shape[1:]) * v[b]
    return out


def flip_randomize(key, leaf):
    """A key-free 'randomisation' the numpy reference can repeat: reverse and shift the weights."""
    return -jnp.flip(leaf) + 0.3


def numpy_flip(leaf):
    return -np.flip(np.asarray(leaf, np.float64)) + 0.3


def numpy_smooth_mprt_zero_noise(params, order, x, target):
    """Spearman of |grad x input| of the trained MLP and after flip-randomising each of `order` in turn."""
    t = np.asarray(target)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    trained = np.abs(numpy_grad_x_input(p, x, t)).reshape(B, -1)
    out = []
    for name in order:
        layer, _, leaf = name.partition("/")
        if leaf:
            p[layer] = {**p[layer], leaf: numpy_flip(p[layer][leaf])}
        else:
            p[layer] = {k: numpy_flip(v) for k, v in p[layer].items()}
        rand = np.abs(numpy_grad_x_input(p, x, t)).reshape(B, -1)
        out.append([spearmanr(trained[b], rand[b])[0] for b in range(B)])
    return np.array(out).T


MLP_ORDER = ["dense2/b", "dense2/w", "dense1"]


def test_smooth_mprt_output_bias_keeps_similarity_one_under_noise(x, target):
    # the output bias does not move the input gradient, and the noise draws are shared by all models;
    # the zero-noise values against numpy are in JitMatchesEager.test_smooth_and_efficient_mprt
    params = mlp_params(20)
    got = metrics.smooth_mprt(grad_x_input, params, MLP_ORDER, x, target, key=fast_key(21), samples=4, noise=0.2)
    assert got.shape == (B, 3)
    np.testing.assert_allclose(got[:, 0], np.ones(B), rtol=1e-6)
    assert np.all(np.asarray(got[:, 1:]) < 0.999)


def test_smooth_mprt_averages_the_documented_noise(x, target):
    w = normal(22, (H, W, C))
    params = {"scale": {"w": w}}
    attr = lambda p, v, t: v * p["scale"]["w"]
    key, samples, noise = jax.random.key(23), 5, 0.3
    got = metrics.smooth_mprt(attr, params, ["scale"], x, target, key=key, samples=samples, noise=noise,
                         similarity="pearson", randomize=flip_randomize)
    _, noise_key = jax.random.split(key)
    xs = np.asarray(x, np.float64)
    sigma = noise * (xs.reshape(B, -1).max(1) - xs.reshape(B, -1).min(1))
    mean_x = np.zeros_like(xs)
    for s, k in enumerate(jax.random.split(noise_key, samples)):
        eps = np.asarray(jax.random.normal(k, x.shape, jnp.float32), np.float64) * sigma[:, None, None, None]
        mean_x += (xs + (eps if s < samples - 1 else 0.0)) / samples  # the last sample is the clean input
    orig = np.abs(mean_x * np.asarray(w, np.float64)).reshape(B, -1)
    rand = np.abs(mean_x * numpy_flip(w)).reshape(B, -1)
    np.testing.assert_allclose(got[:, 0], [pearsonr(orig[b], rand[b])[0] for b in range(B)], rtol=1e-4, atol=1e-5)
    # chunk=2: two scan steps of 2 and a remainder of 1 (the call above: chunk=None, all 5 at once on CPU)
    np.testing.assert_allclose(
        metrics.smooth_mprt(attr, params, ["scale"], x, target, key=key, samples=samples, noise=noise,
                       similarity="pearson", randomize=flip_randomize, chunk=2), got, rtol=1e-5)


def test_smooth_mprt_bad_arguments(x, target):
    params, key = mlp_params(0), jax.random.key(1)
    f = functools.partial(metrics.smooth_mprt, grad_x_input, params)
    with pytest.raises(ValueError, match="layer_order"):
        f([], x, target, key=key)
    with pytest.raises(ValueError, match="layer_order"):
        f(["dense3"], x, target, key=key)
    with pytest.raises(ValueError, match="layer_order"):
        f(["dense1/kernel"], x, target, key=key)
    with pytest.raises(ValueError, match="layer_order"):
        f(["dense1", "dense1"], x, target, key=key)
    with pytest.raises(ValueError, match="samples"):
        f(["dense1"], x, target, key=key, samples=0)
    with pytest.raises(ValueError, match="noise"):
        f(["dense1"], x, target, key=key, noise=-0.1)
    with pytest.raises(ValueError, match="similarity"):
        f(["dense1"], x, target, key=key, similarity="kendall")
    with pytest.raises(ValueError, match="target"):
        f(["dense1"], x, target[:1], key=key)


def test_efficient_mprt_hand_made_maps(x):
    params = {"head": {"w": jnp.array([0.0] * 7 + [3.0])}}
    attr = lambda p, v, t: jnp.broadcast_to(p["head"]["w"], (v.shape[0], 8))
    spread = lambda key, leaf: jnp.linspace(0.0, 1.0, 8)
    t = jnp.zeros(B, jnp.int32)
    # original: counts [7, 0, 0, 1] in 4 bins; randomised 0, 1/7, ..., 1: counts [2, 2, 2, 2] -> ln 4
    h0 = -(7 / 8 * np.log(7 / 8) + 1 / 8 * np.log(1 / 8))
    got = metrics.efficient_mprt(attr, params, ["head"], x, t, key=jax.random.key(0), n_bins=4, randomize=spread)
    np.testing.assert_allclose(got, np.full(B, (np.log(4) - h0) / h0), rtol=1e-5)
    # flax's FrozenDict params work too
    frozen = pytest.importorskip("flax.core").FrozenDict(params)
    got_frozen = metrics.efficient_mprt(attr, frozen, ["head"], x, t, key=jax.random.key(0), n_bins=4, randomize=spread)
    np.testing.assert_allclose(got_frozen, got, rtol=1e-6)
    # measure="entropy": p = [1, 1, 2] / 4 -> 1.5 ln 2; randomised p_i = i / 28
    params2 = {"head": {"w": jnp.array([1.0, -1.0, 2.0] + [0.0] * 5)}}
    p = np.arange(8) / 28.0
    h_rand = -np.sum(p[1:] * np.log(p[1:]))
    got2 = metrics.efficient_mprt(attr, params2, ["head"], x, t, key=jax.random.key(0), measure="entropy", randomize=spread)
    np.testing.assert_allclose(got2, np.full(B, (h_rand - 1.5 * np.log(2)) / (1.5 * np.log(2))), rtol=1e-5)


def test_efficient_mprt_default_randomisation_and_bad_arguments(x, target):
    # the values against numpy (flip randomisation) are in JitMatchesEager.test_smooth_and_efficient_mprt
    params = mlp_params(24)
    # 16 values per map: with the default 100 bins every value would sit in its own bin before and after
    default = metrics.efficient_mprt(grad_x_input, params, ["dense2", "dense1"], x, target, key=jax.random.key(1), n_bins=4)
    assert np.all(np.isfinite(np.asarray(default))) and np.all(np.asarray(default) != 0)
    with pytest.raises(ValueError, match="measure"):
        metrics.efficient_mprt(grad_x_input, params, ["dense1"], x, target, key=jax.random.key(1), measure="gini")
    with pytest.raises(ValueError, match="n_bins"):
        metrics.efficient_mprt(grad_x_input, params, ["dense1"], x, target, key=jax.random.key(1), n_bins=0)
    with pytest.raises(ValueError, match="randomize"):
        metrics.efficient_mprt(grad_x_input, params, ["dense1"], x, target, key=jax.random.key(1),
                          randomize=lambda k, leaf: leaf[:1])


# --------------------------------------------------------------------------------------------
# jit and eager give the same values
# --------------------------------------------------------------------------------------------
class JitMatchesEager(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.x = uniform(30, (B, H, W, C), 0.5, 1.0)
        self.t = jnp.array([0, 1, 2], jnp.int32)
        self.params = mlp_params(31)

    @chex.variants(with_jit=True, without_jit=True)
    def test_avg_sensitivity(self):
        fn = self.variant(lambda v, t, k: metrics.avg_sensitivity(identity_attr, v, t, key=k, radius=R, samples=4, chunk=2))
        key = jax.random.key(32)
        ref = np.mean([np.linalg.norm(flat(u), axis=1) for u in uniform_noise(key, 4, self.x.shape)], axis=0)
        np.testing.assert_allclose(fn(self.x, self.t, key), ref / np.linalg.norm(flat(self.x), axis=1), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_local_lipschitz(self):
        fn = self.variant(lambda v, t, k: metrics.local_lipschitz(lambda a, b: -2.0 * a, v, t, key=k, radius=R, samples=3))
        np.testing.assert_allclose(fn(self.x, self.t, fast_key(33)), np.full(B, 2.0), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_complexity_metrics(self):
        a = jnp.array([[4.0, -2.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
        np.testing.assert_allclose(self.variant(metrics.sparseness)(a), [0.25, 0.0], atol=1e-6)
        np.testing.assert_allclose(self.variant(metrics.complexity)(a), [quantus_complexity(a)[0], np.log(4)], rtol=1e-5)
        de = self.variant(functools.partial(metrics.discrete_entropy, n_bins=4))
        np.testing.assert_allclose(de(a), [scipy_entropy(np.histogram(np.asarray(a[0]), 4)[0]), 0.0], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_logit(self):
        w = normal(34, (2, H, W, C))
        attr = lambda v, t: v * w[t]
        fn = self.variant(lambda v, t, k: metrics.random_logit(attr, v, t, key=k, num_classes=2))
        t = jnp.array([1, 0, 1], jnp.int32)
        expected = metrics.ssim(attr(self.x, t), attr(self.x, 1 - t))
        np.testing.assert_allclose(fn(self.x, t, jax.random.key(35)), expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_smooth_and_efficient_mprt(self):
        smooth = self.variant(lambda p, v, t, k: metrics.smooth_mprt(grad_x_input, p, MLP_ORDER, v, t, key=k, samples=2,
                                                                noise=0.0, randomize=flip_randomize))
        got = smooth(self.params, self.x, self.t, jax.random.key(36))
        np.testing.assert_allclose(got, numpy_smooth_mprt_zero_noise(self.params, MLP_ORDER, self.x, self.t),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[:, 0], np.ones(B), rtol=1e-6)
        eff = self.variant(lambda p, v, t, k: metrics.efficient_mprt(grad_x_input, p, MLP_ORDER, v, t, key=k,
                                                                randomize=flip_randomize, n_bins=10))
        p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), self.params)
        h = lambda m: np.array([scipy_entropy(np.histogram(v.ravel(), bins=10)[0]) for v in m])
        tt = np.asarray(self.t)
        h0 = h(numpy_grad_x_input(p, self.x, tt))
        h1 = h(numpy_grad_x_input(jax.tree_util.tree_map(numpy_flip, p), self.x, tt))
        np.testing.assert_allclose(eff(self.params, self.x, self.t, jax.random.key(37)), (h1 - h0) / h0,
                                   rtol=1e-4, atol=1e-6)
