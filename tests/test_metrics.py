"""Tests for distill_jax.metrics: fidelity, deletion/insertion, rank agreement, sanity checks, robustness."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from distill_jax import attr, metrics, robust
from distill_jax.attr import _core
from distill_jax.metrics import _similarity

B, H, W, C = 6, 6, 6, 2


def test_accuracy_agreement_kl():
    logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 1, 1, 1])
    assert float(metrics.accuracy(logits, labels)) == 0.75
    assert float(metrics.accuracy(logits, labels, mask=jnp.array([1, 1, 1, 0]))) == pytest.approx(2 / 3)
    assert float(jax.jit(metrics.accuracy)(logits, labels)) == 0.75
    student = jnp.array([[0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(metrics.agreement(student, logits)) == 0.75
    assert float(metrics.mean_kl(logits, logits)) == pytest.approx(0.0, abs=1e-7)
    # KL([1/2, 1/2] || [e/(1+e), 1/(1+e)]) for the first row only
    p, q = np.array([0.5, 0.5]), np.array([np.e, 1.0]) / (1 + np.e)
    kl = metrics.mean_kl(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2)))
    assert float(kl) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy(logits, labels[:2])


def _known_pixels_model():
    """p(class 0) = sigmoid(2 (sum_{important} x - 2)); only the pixels in `mask` matter."""
    mask = jnp.zeros((H, W, C)).at[1:3, 2:5, :].set(1.0)  # 6 important pixels (12 values)

    def apply_fn(x):
        s = jnp.sum(mask * x, axis=(1, 2, 3)) - 2.0
        return jnp.stack([s, -s], axis=1)

    return mask, apply_fn


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(0), (B, H, W, C), minval=0.5, maxval=1.0)


def test_deletion_and_insertion_rank_true_attribution_first(images):
    mask, f = _known_pixels_model()
    x, t = images, jnp.zeros(B, jnp.int32)
    true_attr = attr.grad_x_input(f, x, t)
    rand_attr = jax.random.uniform(jax.random.key(1), x.shape)
    del_true, curve = metrics.deletion_auc(f, x, true_attr, t, steps=12, return_curve=True)
    del_rand = metrics.deletion_auc(f, x, rand_attr, t, steps=12)
    assert curve.shape == (B, 13)
    assert bool(jnp.all(del_true < del_rand))
    ins_true = metrics.insertion_auc(f, x, true_attr, t, steps=12, baseline="zeros")
    ins_rand = metrics.insertion_auc(f, x, rand_attr, t, steps=12, baseline="zeros")
    assert bool(jnp.all(ins_true > ins_rand))
    # [batch, H, W] maps work too (blurred and constant baselines: test_constant_and_blur_baselines_hand_computed)
    np.testing.assert_allclose(metrics.deletion_auc(f, x, true_attr.sum(-1), t, steps=12), del_true, rtol=1e-6)


def test_deletion_curve_hand_computed(images):
    mask, f = _known_pixels_model()
    x, t = images, jnp.zeros(B, jnp.int32)
    amap = attr.grad_x_input(f, x, t)
    p = lambda img: jax.nn.softmax(f(img))[:, 0]
    # steps = 6 over 36 pixels: 6 pixels per step, so step 1 removes exactly the important ones
    auc, curve = metrics.deletion_auc(f, x, amap, t, steps=6, return_curve=True)
    np.testing.assert_allclose(curve[:, 0], p(x), rtol=1e-6)
    np.testing.assert_allclose(curve[:, 1:], jnp.broadcast_to(p(jnp.zeros_like(x))[:, None], (B, 6)), rtol=1e-6)
    np.testing.assert_allclose(auc, (p(x) + curve[:, 1]) / 2 / 6 + 5 * curve[:, 1] / 6, rtol=1e-5)
    auc_i, curve_i = metrics.insertion_auc(f, x, amap, t, steps=6, baseline="zeros", return_curve=True)
    np.testing.assert_allclose(curve_i[:, 1:], jnp.broadcast_to(p(x)[:, None], (B, 6)), rtol=1e-6)
    jitted = jax.jit(functools.partial(metrics.deletion_auc, f, steps=6, chunk=3))(x, amap, t)
    np.testing.assert_allclose(jitted, auc, rtol=1e-6)


def _linear_sum_model(w):
    """s(x) = sum(w * x), logits [s, -s]: p(class 0) = sigmoid(2 s)."""

    def apply_fn(x):
        s = jnp.sum(w * x, axis=(1, 2, 3))
        return jnp.stack([s, -s], axis=1)

    return apply_fn


def _hand_curve(w, x, score, base, steps, insert):
    """p(class 0) at s = 0..steps, the top round(s * H*W / steps) pixels of `score` swapped (numpy, float64)."""
    w, x, base = (np.asarray(v, np.float64) for v in (w, x, base))
    order = np.argsort(-np.asarray(score).reshape(len(x), -1), axis=1, kind="stable")
    curve = np.zeros((len(x), steps + 1))
    for s in range(steps + 1):
        k = int(np.round(s * H * W / steps))
        for b in range(len(x)):
            changed = np.zeros(H * W, bool)
            changed[order[b, :k]] = True
            changed = changed.reshape(H, W)[..., None]
            img = np.where(changed, x[b], base[b]) if insert else np.where(changed, base[b], x[b])
            curve[b, s] = 1.0 / (1.0 + np.exp(-2.0 * np.sum(w * img)))
    return curve


def test_constant_and_blur_baselines_hand_computed(images):
    """Deletion to a constant 0.5 and insertion from a blurred image, against curves computed by hand.

    steps = 4 over 36 pixels: 0, 9, 18, 27, 36 pixels swapped (all channels); AUC = trapezoid on [0, 1].
    The blurred baseline is checked against scipy's Gaussian filter (mirror edges, truncate 3).
    """
    from scipy import ndimage

    w = 0.3 * jax.random.normal(jax.random.key(11), (H, W, C))
    f = _linear_sum_model(w)
    x, t = images, jnp.zeros(B, jnp.int32)
    score = jax.random.uniform(jax.random.key(12), (B, H, W))  # distinct values: a known order
    auc, curve = metrics.deletion_auc(f, x, score, t, steps=4, baseline=0.5, return_curve=True)
    want = _hand_curve(w, x, score, np.full(x.shape, 0.5), 4, insert=False)
    np.testing.assert_allclose(curve, want, rtol=1e-5)
    np.testing.assert_allclose(curve[:, -1], 1 / (1 + np.exp(-2 * 0.5 * float(jnp.sum(w)))), rtol=1e-5)  # all 0.5
    np.testing.assert_allclose(auc, (want[:, 1:] + want[:, :-1]).sum(1) / 2 / 4, rtol=1e-5)

    blurred = ndimage.gaussian_filter(np.asarray(x, np.float64), sigma=(0, 1.0, 1.0, 0), mode="mirror", truncate=3.0)
    auc_i, curve_i = metrics.insertion_auc(f, x, score, t, steps=4, baseline="blur", blur_sigma=1.0, return_curve=True)
    want_i = _hand_curve(w, x, score, blurred, 4, insert=True)
    np.testing.assert_allclose(curve_i, want_i, rtol=1e-5)
    p0 = lambda img: jax.nn.softmax(f(img))[:, 0]  # noqa: E731
    np.testing.assert_allclose(curve_i[:, 0], p0(_core.gaussian_blur(x, sigma=1.0)), rtol=1e-6)  # starts blurred
    np.testing.assert_allclose(curve_i[:, -1], p0(x), rtol=1e-6)  # ends at x
    np.testing.assert_allclose(auc_i, (want_i[:, 1:] + want_i[:, :-1]).sum(1) / 2 / 4, rtol=1e-5)

    # a constant image is its own blur: every pixel swapped changes nothing, the curve is flat at p(x)
    const = jnp.full((2, H, W, C), 0.7)
    for sigma in (1.0, 5.0):  # 5.0: the kernel (radius 15) is larger than the 6x6 image
        _, flat = metrics.insertion_auc(f, const, score[:2], t[:2], steps=4, baseline="blur", blur_sigma=sigma,
                                        return_curve=True)
        np.testing.assert_allclose(flat, jnp.broadcast_to(p0(const)[:, None], (2, 5)), rtol=1e-6)


def test_deletion_bad_inputs(images):
    _, f = _known_pixels_model()
    x, t = images, jnp.zeros(B, jnp.int32)
    with pytest.raises(ValueError, match="steps"):
        metrics.deletion_auc(f, x, x, t, steps=0)
    with pytest.raises(ValueError, match="attribution"):
        metrics.deletion_auc(f, x, x[:, :3], t)
    with pytest.raises(ValueError, match="target values"):
        metrics.insertion_auc(f, x, x, t + 2)
    with pytest.raises(ValueError, match="baseline"):
        metrics.insertion_auc(f, x, x, t, baseline="noise")


def _three_class_model():
    """logit_c = sum(w_c * x) with a different pixel weighting per class: the curves differ per target."""
    w = 0.5 * jax.random.normal(jax.random.key(30), (3, H, W, C))
    return lambda v: jnp.einsum("chwk,bhwk->bc", w, v)


class MultiTargetDeletionTest(chex.TestCase):
    """A [batch, K] target with one map per target, [batch, K, ...], gives exactly the K separate calls."""

    def setUp(self):
        super().setUp()
        self.f = _three_class_model()
        self.x = jax.random.uniform(jax.random.key(31), (B, H, W, C), minval=0.5, maxval=1.0)
        self.tk = jnp.array([[0, 1, 2], [2, 2, 0], [1, 0, 1], [0, 0, 0], [2, 1, 0], [1, 2, 2]])  # [B, K=3]
        self.maps = jax.random.normal(jax.random.key(32), (B, 3, H, W, C))  # a different map per target

    @chex.variants(with_jit=True, without_jit=True)
    def test_deletion_auc_k_targets_equal_separate_calls(self):
        fn = self.variant(functools.partial(metrics.deletion_auc, self.f, steps=5, chunk=2, return_curve=True))
        for maps in (self.maps, self.maps.sum(-1)):  # like x, or without the channel axis
            auc, curve = fn(self.x, maps, self.tk)
            chex.assert_shape((auc, curve), ((B, 3), (B, 3, 6)))
            for k in range(3):
                auc_k, curve_k = fn(self.x, maps[:, k], self.tk[:, k])
                np.testing.assert_allclose(auc[:, k], auc_k, rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(curve[:, k], curve_k, rtol=1e-6, atol=1e-7)
            assert float(jnp.std(auc)) > 1e-3  # the columns really differ

    @chex.variants(with_jit=True, without_jit=True)
    def test_insertion_auc_k_targets_equal_separate_calls(self):
        fn = self.variant(functools.partial(metrics.insertion_auc, self.f, steps=4, baseline="zeros"))
        auc = fn(self.x, self.maps, self.tk)
        chex.assert_shape(auc, (B, 3))
        stacked = jnp.stack([fn(self.x, self.maps[:, k], self.tk[:, k]) for k in range(3)], axis=1)
        np.testing.assert_allclose(auc, stacked, rtol=1e-6, atol=1e-7)

    def test_out_of_range_traced_target_gives_nan_for_its_entry_only(self):
        auc = jax.jit(functools.partial(metrics.deletion_auc, self.f, steps=3))(self.x, self.maps, self.tk.at[1, 2].set(3))
        assert bool(jnp.isnan(auc[1, 2])) and int(jnp.isnan(auc).sum()) == 1

    def test_bad_shapes_give_one_line_errors(self):
        for call, match in [
            (lambda: metrics.deletion_auc(self.f, self.x, self.maps[:, 0], self.tk), r"attribution must be \[batch, K"),
            (lambda: metrics.insertion_auc(self.f, self.x, self.maps[:, :2], self.tk), r"\[batch, K\] = \(6, 3\)"),
            (lambda: metrics.deletion_auc(self.f, self.x, self.maps[..., :1], self.tk), "attribution must have the shape"),
            (lambda: metrics.deletion_auc(self.f, self.x, self.maps, self.tk[..., None]), "target must have shape"),
        ]:
            with pytest.raises(ValueError, match=match) as err:
                call()
            assert "\n" not in str(err.value)


def test_spearman_and_top_k():
    a = jax.random.normal(jax.random.key(2), (4, 5, 5))
    b = a + 0.5 * jax.random.normal(jax.random.key(3), a.shape)
    np.testing.assert_allclose(metrics.spearman(a, a), 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.spearman(a, -a), -1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.spearman(a, jnp.exp(a)), 1.0, rtol=1e-6)  # monotone transform
    ties = jnp.round(b * 2) / 2  # many ties: average ranks, as scipy
    expected = [spearmanr(np.ravel(a[i]), np.ravel(ties[i]))[0] for i in range(4)]
    np.testing.assert_allclose(metrics.spearman(a, ties), expected, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(metrics.spearman)(a, ties), expected, rtol=1e-5)
    np.testing.assert_allclose(metrics.spearman(a, jnp.zeros_like(a)), 0.0)
    x = jnp.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    y = jnp.array([[5.0, 1.0, 3.0, 4.0, 2.0]])
    np.testing.assert_allclose(metrics.top_k_overlap(x, y, k=2), [0.5])  # {0,1} vs {0,3}
    np.testing.assert_allclose(metrics.top_k_overlap(x, y, k=5), [1.0])
    with pytest.raises(ValueError, match="k must be"):
        metrics.top_k_overlap(x, y, k=6)
    with pytest.raises(ValueError, match="same shape"):
        metrics.spearman(x, y[:, :3])


def _mlp(key, sizes=(H * W * C, 32, 32, 3)):
    keys = jax.random.split(key, len(sizes) - 1)
    names = [f"dense{i}" for i in range(len(sizes) - 2)] + ["head"]
    return {
        n: {"kernel": jax.random.normal(k, (i, o)) / np.sqrt(i), "bias": 0.1 * jnp.ones(o)}
        for n, k, i, o in zip(names, keys, sizes[:-1], sizes[1:])
    }


def _mlp_apply(params, x):
    h = x.reshape(x.shape[0], -1)
    for name in ("dense0", "dense1"):
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def test_randomization_check_lowers_rank_correlation(images):
    params = _mlp(jax.random.key(4))
    t = jnp.array([0, 1, 2, 0, 1, 2])

    def attr_fn(p, x, target):
        return attr.saliency(functools.partial(_mlp_apply, p["params"]), x, target)

    result = metrics.randomization_check(attr_fn, {"params": params}, ["params/head", "params/dense1", "params/dense0"], images, t, key=jax.random.key(5))
    layers, rhos = zip(*result)
    assert layers == ("params/head", "params/dense1", "params/dense0")
    assert all(r < 0.8 for r in rhos) and rhos[-1] < 0.3
    # no randomisation, no change: the identity "randomiser" keeps rho = 1
    same = metrics.randomization_check(attr_fn, {"params": params}, ["params/head"], images, t, key=jax.random.key(5), randomize=lambda k, leaf: leaf)
    assert same[0][1] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"'conv9'.*\['dense0', 'dense1', 'head'\]"):
        metrics.randomization_check(attr_fn, {"params": params}, ["params/conv9"], images, t, key=jax.random.key(5))


def _linear_classifier():
    """Two classes separated along the first feature: logits = [x0, -x0] with |x0| >= 0.2 margin."""

    def apply_fn(x):
        s = x.reshape(x.shape[0], -1)[:, 0]
        return jnp.stack([s, -s], axis=1)

    k1, k2 = jax.random.split(jax.random.key(6))
    labels = jax.random.bernoulli(k1, 0.5, (32,)).astype(jnp.int32)
    x = jax.random.uniform(k2, (32, 4), minval=0.2, maxval=0.4) * jnp.where(labels == 0, 1.0, -1.0)[:, None]
    return apply_fn, x, labels


def test_fgsm_and_pgd_lower_accuracy():
    f, x, y = _linear_classifier()
    assert float(metrics.accuracy(f(x), y)) == 1.0
    # an L-inf step of 0.1 cannot cross the 0.2 margin; 0.5 flips every example
    assert float(robust.adversarial_accuracy(f, x, y, attack="fgsm", epsilon=0.1)) == 1.0
    assert float(robust.adversarial_accuracy(f, x, y, attack="fgsm", epsilon=0.5)) == 0.0
    x_adv = robust.fgsm(f, x, y, epsilon=0.5, clip=(-0.3, 0.3))
    assert float(jnp.abs(x_adv).max()) <= 0.3 + 1e-7
    np.testing.assert_allclose(jax.jit(functools.partial(robust.fgsm, f, epsilon=0.5))(x, y), robust.fgsm(f, x, y, epsilon=0.5))
    x_pgd = robust.pgd(f, x, y, epsilon=0.5, step_size=0.1, steps=10, key=jax.random.key(7))
    assert float(jnp.abs(x_pgd - x).max()) <= 0.5 + 1e-6
    assert float(metrics.accuracy(f(x_pgd), y)) == 0.0
    assert float(robust.adversarial_accuracy(f, x, y, attack="pgd", epsilon=0.1, step_size=0.05, steps=5, key=jax.random.key(7))) == 1.0
    with pytest.raises(ValueError, match="attack"):
        robust.adversarial_accuracy(f, x, y, attack="cw", epsilon=0.1)
    with pytest.raises(ValueError, match="labels"):
        robust.fgsm(f, x, y + 2, epsilon=0.1)


def test_max_sensitivity_and_completeness():
    w = jax.random.normal(jax.random.key(8), (3, 4))
    f = lambda x: x @ w.T
    x = jax.random.normal(jax.random.key(9), (5, 4))
    t = jnp.array([0, 1, 2, 0, 1])
    sal = lambda v, tt: attr.saliency(f, v, tt, absolute=False)
    np.testing.assert_allclose(metrics.max_sensitivity(sal, x, t, key=jax.random.key(0), radius=0.1, samples=4), 0.0, atol=1e-7)
    # grad x input of a linear model changes by w * u: at most r ||w_t|| / ||w_t * x||
    gxi = lambda v, tt: attr.grad_x_input(f, v, tt)
    sens = metrics.max_sensitivity(gxi, x, t, key=jax.random.key(0), radius=0.1, samples=4)
    bound = 0.1 * jnp.linalg.norm(w[t], axis=1) / jnp.linalg.norm(w[t] * x, axis=1)
    assert bool(jnp.all(sens > 0)) and bool(jnp.all(sens <= bound + 1e-6))
    jitted = jax.jit(lambda v, tt: metrics.max_sensitivity(gxi, v, tt, key=jax.random.key(0), radius=0.1, samples=4))(x, t)
    np.testing.assert_allclose(jitted, sens, rtol=1e-5)
    with pytest.raises(ValueError, match="radius"):
        metrics.max_sensitivity(gxi, x, t, key=jax.random.key(0), radius=0.0)
    # completeness: IG of a linear model is exact, a wrong attribution is not
    ig = attr.integrated_gradients(f, x, t, steps=4)
    np.testing.assert_allclose(metrics.ig_completeness_error(f, x, ig, t), 0.0, atol=1e-5)
    assert bool(jnp.all(metrics.ig_completeness_error(f, x, 2 * ig, t) > 0.99))


def test_pearson_and_spearman_match_scipy_on_host_arrays():
    from scipy.stats import pearsonr

    from distill_jax import metrics

    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 4, 6)).astype(np.float32)
    b = (a + rng.normal(size=a.shape)).astype(np.float32)
    b[0] = np.round(b[0])  # ties
    flat_a, flat_b = a.reshape(3, -1), b.reshape(3, -1)
    np.testing.assert_allclose(metrics.spearman(a, b), [spearmanr(u, v)[0] for u, v in zip(flat_a, flat_b)], rtol=1e-5)
    np.testing.assert_allclose(metrics.pearson(a, b), [pearsonr(u, v)[0] for u, v in zip(flat_a, flat_b)], rtol=1e-5)
    np.testing.assert_allclose(_similarity.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0.0, 2.5, 1.0])


def test_mean_kl_at_a_temperature_hand_computed():
    s, t = np.array([[1.0, 0.0, -1.0]], np.float32), np.array([[0.0, 2.0, 0.0]], np.float32)
    p = np.exp(t / 2) / np.exp(t / 2).sum()
    q = np.exp(s / 2) / np.exp(s / 2).sum()
    assert float(metrics.mean_kl(s, t, temperature=2.0)) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-5)
    assert float(jax.jit(metrics.mean_kl)(jnp.asarray(s), jnp.asarray(t), temperature=2.0)) == pytest.approx(
        float(np.sum(p * np.log(p / q))), rel=1e-5)


def test_map_and_logit_metrics_are_one_compiled_program_per_call():
    """Host inputs of shapes no other test uses: one program per call, none when repeated with new values."""
    from distill_jax import metrics
    from distill_jax.compilation import CompileCounter

    rng = np.random.default_rng(8)
    logits = [rng.normal(size=(9, 5)).astype(np.float32) for _ in range(4)]
    maps = [rng.normal(size=(3, 7, 5)).astype(np.float32) for _ in range(4)]
    calls = {
        "agreement": lambda u, v: metrics.agreement(u, v),
        "mean_kl": lambda u, v: metrics.mean_kl(u, v, temperature=1.5),
        "top_k_overlap": lambda u, v: metrics.top_k_overlap(u, v, k=4),
        "spearman": lambda u, v: metrics.spearman(u, v),
        "pearson": lambda u, v: metrics.pearson(u, v),
    }
    for name, call in calls.items():
        u = logits if name in ("agreement", "mean_kl") else maps
        with CompileCounter() as first:
            jax.block_until_ready(call(u[0], u[1]))
        with CompileCounter() as again:
            jax.block_until_ready(call(u[2], u[3]))
        assert (first.count, again.count) == (1, 0), name
