"""Tests for distill_jax.attr on analytic functions and a tiny random ReLU CNN."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import attr, metrics, models
from distill_jax.attr import _core
from distill_jax.models import _layers

B, H, W, C, K = 5, 6, 6, 2, 3


def _linear_model(key):
    """f_c(x) = sum(w_c * x): saliency = w_target, IG = w_target * (x - baseline) exactly."""
    w = jax.random.normal(key, (K, H, W, C))
    return w, lambda x: jnp.einsum("khwc,bhwc->bk", w, x)


def _quadratic_model(key):
    """f_c(x) = sum(a_c * x^2): IG_i = a_ci (x_i^2 - x'_i^2) in closed form."""
    a = jax.random.uniform(key, (K, H, W, C), minval=0.5, maxval=1.5)
    return a, lambda x: jnp.einsum("khwc,bhwc->bk", a, x**2)


def _cnn(key, width=8):
    """A small random ReLU CNN following the forward_fn(x, deltas=None) -> (logits, features) convention."""
    ks = jax.random.split(key, 5)
    p = {
        "conv1": (jax.random.normal(ks[0], (3, 3, C, width)) / 3.0, 0.3 * jax.random.normal(ks[1], (width,))),
        "conv2": (jax.random.normal(ks[2], (3, 3, width, width)) / (3.0 * width**0.5), 0.3 * jax.random.normal(ks[3], (width,))),
        "head": jax.random.normal(ks[4], (width, K)),
    }

    def conv(x, kb):
        y = jax.lax.conv_general_dilated(x, kb[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + kb[1]

    def forward_fn(x, deltas=None):
        deltas = deltas or {}
        feats = {}
        h = jax.nn.relu(conv(x, p["conv1"])) + deltas.get("conv1", 0.0)
        feats["conv1"] = h
        h = jax.nn.relu(conv(h, p["conv2"])) + deltas.get("conv2", 0.0)
        feats["conv2"] = h
        pooled = h.mean(axis=(1, 2)) + deltas.get("pooled", 0.0)
        feats["pooled"] = pooled
        return pooled @ p["head"], feats

    forward_fn.params = p  # for hand-computed expectations (Grad-CAM on conv2: the head after a global mean)
    return forward_fn, lambda x: forward_fn(x)[0]


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(1), (B, H, W, C))
    t = jnp.array([0, 1, 2, 0, 1])
    return x, t


def test_saliency_and_grad_x_input_linear(data):
    x, t = data
    w, f = _linear_model(jax.random.key(0))
    np.testing.assert_array_equal(attr.saliency(f, x, t, absolute=False), w[t])
    np.testing.assert_array_equal(attr.saliency(f, x, t), jnp.abs(w[t]))
    np.testing.assert_allclose(attr.grad_x_input(f, x, t), w[t] * x, rtol=1e-6)


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gauss_legendre"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_ig_linear_exact(data, method, chunk):
    x, t = data
    w, f = _linear_model(jax.random.key(0))
    base = jax.random.normal(jax.random.key(3), x.shape)
    np.testing.assert_allclose(attr.integrated_gradients(f, x, t, steps=16, method=method, chunk=chunk), w[t] * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        attr.integrated_gradients(f, x, t, baseline=base, steps=7, method=method, chunk=chunk), w[t] * (x - base), rtol=1e-5, atol=1e-5
    )
    blurred = _core.gaussian_blur(x, sigma=1.0)
    np.testing.assert_allclose(
        attr.integrated_gradients(f, x, t, baseline="blur", blur_sigma=1.0, steps=4, method=method), w[t] * (x - blurred), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gauss_legendre"])
def test_ig_quadratic_closed_form(data, method):
    x, t = data
    a, f = _quadratic_model(jax.random.key(2))
    base = 0.5 * jax.random.normal(jax.random.key(4), x.shape)
    amap, err = attr.integrated_gradients(f, x, t, baseline=base, steps=64, method=method, return_error=True)
    np.testing.assert_allclose(amap, a[t] * (x**2 - base**2), rtol=1e-4, atol=1e-5)
    assert float(err.max()) < 1e-4


def test_riemann_left_converges_slowly_on_quadratic(data):
    # the left rule is first order: its error shrinks about 4x from 8 to 32 steps on this integrand
    x, t = data
    a, f = _quadratic_model(jax.random.key(2))
    exact = a[t] * x**2
    e8 = jnp.abs(attr.integrated_gradients(f, x, t, steps=8, method="riemann_left") - exact).max()
    e32 = jnp.abs(attr.integrated_gradients(f, x, t, steps=32, method="riemann_left") - exact).max()
    assert 3.0 < float(e8 / e32) < 5.0


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gauss_legendre"])
def test_ig_completeness_relu_cnn(method):
    _, f = _cnn(jax.random.key(7))
    x = jax.random.uniform(jax.random.key(8), (4, H, W, C))
    t = jnp.argmax(f(x), axis=1)
    amap, err = attr.integrated_gradients(f, x, t, steps=128, method=method, return_error=True)
    assert float(err.max()) < 0.01
    np.testing.assert_allclose(metrics.ig_completeness_error(f, x, amap, t), err, rtol=1e-4, atol=1e-6)


def test_ig_chunks_agree_and_jit_matches():
    _, f = _cnn(jax.random.key(7))
    x = jax.random.uniform(jax.random.key(8), (3, H, W, C))
    t = jnp.array([0, 2, 1])
    ref = attr.integrated_gradients(f, x, t, steps=10)
    for chunk in (3, 10):
        np.testing.assert_allclose(attr.integrated_gradients(f, x, t, steps=10, chunk=chunk), ref, rtol=1e-4, atol=1e-6)
    jitted = jax.jit(functools.partial(attr.integrated_gradients, f, steps=10))(x, t)
    np.testing.assert_allclose(jitted, ref, rtol=1e-5, atol=1e-6)


def test_multiple_targets(data):
    x, _ = data
    _, f = _cnn(jax.random.key(7))
    tk = jnp.stack([jnp.zeros(B, jnp.int32), jnp.full(B, 2, jnp.int32)], axis=1)  # [B, 2]
    key = jax.random.key(3)
    options = {"integrated_gradients": {"steps": 8}, "blur_ig": {"steps": 8}, "guided_ig": {"steps": 6},
               "smoothgrad": {"key": key, "samples": 4}, "smoothgrad_squared": {"key": key, "samples": 4},
               "vargrad": {"key": key, "samples": 4}, "gradient_shap": {"key": key, "samples": 4}}
    # every gradient method of the registry, and occlusion (grad_cam, the perturbation methods: their own tests)
    for name in ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "smoothgrad",
                 "smoothgrad_squared", "vargrad", "gradient_shap", "guided_ig", "blur_ig"):
        kw = options.get(name, {})
        out = attr.attribute(name, f, x, tk, **kw)
        assert out.shape == (B, 2) + x.shape[1:]
        for j in range(2):
            np.testing.assert_allclose(out[:, j], attr.attribute(name, f, x, tk[:, j], **kw), rtol=1e-5, atol=1e-6)
    _, err = attr.integrated_gradients(f, x, tk, steps=8, return_error=True)
    assert err.shape == (B, 2)


def test_grad_cam_hand_computed(data):
    # logits = mean_hw(A) @ V with A = relu(x @ M) (a 1x1 conv): dlogit_t/dA = V[:, t] / (h w), so
    # Grad-CAM = relu(sum_c V[c, t] / (h w) * A_c), at input size already (identity resize).
    x, t = data
    m = jax.random.normal(jax.random.key(10), (C, 4))
    v = jax.random.normal(jax.random.key(11), (4, K))

    def forward_fn(x, deltas=None):
        a = jax.nn.relu(x @ m) + (deltas or {}).get("a", 0.0)
        return a.mean(axis=(1, 2)) @ v, {"a": a, "vec": a.mean(axis=(1, 2))}

    a = jax.nn.relu(x @ m)
    expected = jax.nn.relu(jnp.einsum("bhwc,cb->bhw", a, v[:, t] / (H * W)))
    cam = attr.grad_cam(forward_fn, x, t, layer="a")
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jit(functools.partial(attr.grad_cam, forward_fn, layer="a"))(x, t), cam, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="spatial"):
        attr.grad_cam(forward_fn, x, t, layer="vec")


def test_grad_cam_cnn_shapes_and_resize(data):
    x, t = data
    forward_fn, _ = _cnn(jax.random.key(7))
    cam = attr.grad_cam(forward_fn, x, t, layer="conv2")
    assert cam.shape == (B, H, W) and float(cam.min()) >= 0
    cam_k = attr.grad_cam(forward_fn, x, jnp.stack([t, t], 1), layer="conv1")
    assert cam_k.shape == (B, 2, H, W)
    np.testing.assert_allclose(cam_k[:, 0], cam_k[:, 1])
    with pytest.raises(ValueError, match=r"'nope'.*\['conv1', 'conv2', 'pooled'\]"):
        attr.grad_cam(forward_fn, x, t, layer="nope")
    # conv2 feeds the head through a global mean: alpha_c = head[c, t] / (h w), at input size (no resize)
    _, feats = forward_fn(x)
    head = forward_fn.params["head"]
    want = jax.nn.relu(jnp.einsum("bhwc,cb->bhw", feats["conv2"], head[:, t]) / (H * W))
    np.testing.assert_allclose(cam, want, rtol=1e-5, atol=1e-6)
    assert float(cam.max()) > 0
    np.testing.assert_allclose(cam_k[:, 0], attr.grad_cam(forward_fn, x, t, layer="conv1"), rtol=1e-6)


def _pooled_features_model(v):
    """Features A = 2x2 average pool of x ([b, 3, 3, C] for 6x6 inputs), logits = mean_hw(A) @ v.

    d logit_t / d A = v[:, t] / 9, so the Grad-CAM map before resizing is relu(sum_c v[c, t] / 9 * A_c).
    """

    def forward_fn(x, deltas=None):
        a = x.reshape(x.shape[0], H // 2, 2, W // 2, 2, C).mean((2, 4)) + (deltas or {}).get("a", 0.0)
        return a.mean(axis=(1, 2)) @ v, {"a": a}

    return forward_fn


def test_grad_cam_upsampling_hand_computed(data):
    """A 3x3 map resized to 6x6: bilinear with half-pixel centres (edge rows kept) and nearest (each cell 2x2)."""
    x, t = data
    v = jax.random.normal(jax.random.key(12), (C, K))
    forward_fn = _pooled_features_model(v)
    a = np.asarray(x, np.float64).reshape(B, 3, 2, 3, 2, C).mean((2, 4))
    small = np.maximum(np.einsum("bhwc,cb->bhw", a, np.asarray(v, np.float64)[:, np.asarray(t)]) / 9.0, 0.0)
    assert small.max() > 0 and small.min() == 0  # both sides of the ReLU occur
    # output pixel i samples the 3x3 grid at i / 2 - 1/4: weights (1), (3/4, 1/4), (1/4, 3/4), ..., (1)
    up = np.array([[1, 0, 0], [0.75, 0.25, 0], [0.25, 0.75, 0], [0, 0.75, 0.25], [0, 0.25, 0.75], [0, 0, 1]])
    bilinear = np.einsum("ih,bhw,jw->bij", up, small, up)
    np.testing.assert_allclose(attr.grad_cam(forward_fn, x, t, layer="a"), bilinear, rtol=1e-5, atol=1e-6)
    nearest = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(attr.grad_cam(forward_fn, x, t, layer="a", method="nearest"), nearest, rtol=1e-5,
                               atol=1e-6)


def test_occlusion_linear(data):
    x, t = data
    w, f = _linear_model(jax.random.key(0))
    # 1x1 patches: the drop is the pixel's contribution summed over channels, for every channel
    expected = jnp.broadcast_to(jnp.sum(w[t] * x, -1, keepdims=True), x.shape)
    np.testing.assert_allclose(attr.occlusion(f, x, t, patch=1, stride=1), expected, rtol=1e-4, atol=1e-5)
    # non-overlapping 3x3 patches: each pixel gets its window's total contribution
    contrib = jnp.sum(w[t] * x, -1).reshape(B, 2, 3, 2, 3).sum((2, 4))
    expected = jnp.broadcast_to(jnp.repeat(jnp.repeat(contrib, 3, 1), 3, 2)[..., None], x.shape)
    occ = attr.occlusion(f, x, t, patch=3, stride=3)
    np.testing.assert_allclose(occ, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.jit(functools.partial(attr.occlusion, f, patch=3, stride=3))(x, t), occ, rtol=1e-5, atol=1e-5)
    # overlapping windows (stride < patch, last window flush with the border): 4x4 windows start at rows and
    # columns 0 and 2 (range(0, 3, 3) plus the flush start 2); each pixel gets the mean drop of the windows
    # covering it, the drop of a window being its contribution sum(w_t * (x - value))
    for value in (0.0, 0.5):
        contrib = np.asarray(jnp.sum(w[t] * (x - value), -1), np.float64)  # [B, H, W]
        total, count = np.zeros((B, H, W)), np.zeros((H, W))
        for r0 in (0, 2):
            for c0 in (0, 2):
                total[:, r0 : r0 + 4, c0 : c0 + 4] += contrib[:, r0 : r0 + 4, c0 : c0 + 4].sum((1, 2))[:, None, None]
                count[r0 : r0 + 4, c0 : c0 + 4] += 1
        expected = np.broadcast_to((total / count)[..., None], x.shape)
        got = attr.occlusion(f, x, t, patch=4, stride=3, value=value)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_smoothgrad(data):
    x, t = data
    w, f = _linear_model(jax.random.key(0))
    sg = attr.smoothgrad(attr.saliency, f, x, t, key=jax.random.key(5), samples=5, chunk=2, absolute=False)
    np.testing.assert_allclose(sg, w[t], rtol=1e-6)  # the gradient of a linear model does not change with noise
    a, fq = _quadratic_model(jax.random.key(2))
    sgq = attr.attribute("smoothgrad", fq, x, t, method="saliency", key=jax.random.key(6), samples=8, noise=0.1, absolute=False)
    sgq_jit = jax.jit(lambda x, t: attr.smoothgrad(attr.saliency, fq, x, t, key=jax.random.key(6), samples=8, noise=0.1, absolute=False))(x, t)
    np.testing.assert_allclose(sgq, sgq_jit, rtol=1e-5, atol=1e-6)
    # E[2a(x + e)] = 2 a x: the mean over 8 samples is within a few noise standard deviations
    sigma = 0.1 * (x.reshape(B, -1).max(1) - x.reshape(B, -1).min(1))
    assert float(jnp.max(jnp.abs(sgq - 2 * a[t] * x) / (2 * a[t] * sigma[:, None, None, None]))) < 5 / np.sqrt(8) * 2
    forward_fn, fc = _cnn(jax.random.key(7))
    cam = attr.smoothgrad(attr.grad_cam, forward_fn, x, t, key=jax.random.key(0), samples=3, layer="conv1")
    assert cam.shape == (B, H, W)


def test_smoothgrad_without_noise_is_the_plain_method(data):
    """noise = 0: every sample is x, so the mean is the method itself (3 samples in chunks of 2: the padded
    fourth sample must get weight 0, or the result would be 4/3 of it)."""
    x, t = data
    forward_fn, f = _cnn(jax.random.key(7))
    for chunk in (1, 2):
        sal = attr.smoothgrad(attr.saliency, f, x, t, key=jax.random.key(0), samples=3, noise=0.0, chunk=chunk)
        np.testing.assert_allclose(sal, attr.saliency(f, x, t), rtol=1e-5, atol=1e-7)
        cam = attr.smoothgrad(attr.grad_cam, forward_fn, x, t, key=jax.random.key(0), samples=3, noise=0.0,
                                 chunk=chunk, layer="conv1")
        np.testing.assert_allclose(cam, attr.grad_cam(forward_fn, x, t, layer="conv1"), rtol=1e-5, atol=1e-7)
    assert float(cam.max()) > 0


def test_smoothgrad_of_grad_cam_on_a_linear_map(data):
    """Features = the input, head after the global mean, positive x and v: Grad-CAM is linear and positive,
    cam(x) = sum_c v[c, t] x_c / (H W), so SG-Grad-CAM = cam(x) + mean_s cam(e_s), whose noise part has
    standard deviation sigma ||v[:, t]|| / (H W sqrt(n)) with sigma = noise * (max x - min x)."""
    _, t = data
    x = jax.random.uniform(jax.random.key(13), (B, H, W, C), minval=1.0, maxval=2.0)
    v = jax.random.uniform(jax.random.key(14), (C, K), minval=0.5, maxval=1.5)

    def forward_fn(z, deltas=None):
        a = z + (deltas or {}).get("a", 0.0)
        return a.mean(axis=(1, 2)) @ v, {"a": a}

    plain = jnp.einsum("bhwc,cb->bhw", x, v[:, t]) / (H * W)
    np.testing.assert_allclose(attr.grad_cam(forward_fn, x, t, layer="a"), plain, rtol=1e-5)
    n = 16
    sg = attr.smoothgrad(attr.grad_cam, forward_fn, x, t, key=jax.random.key(15), samples=n, noise=0.05,
                            chunk=4, layer="a")
    sigma = 0.05 * (x.reshape(B, -1).max(1) - x.reshape(B, -1).min(1))
    std = sigma * jnp.linalg.norm(v[:, t], axis=0) / (H * W * np.sqrt(n))
    z = jnp.abs(sg - plain) / std[:, None, None]
    assert float(z.max()) < 5.0 and float(z.mean()) < 1.5 and float(z.mean()) > 0.2, (float(z.max()), float(z.mean()))


def test_bad_inputs(data):
    x, t = data
    _, f = _linear_model(jax.random.key(0))
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\)"):
        attr.saliency(f, x, t.at[0].set(3))
    with pytest.raises(ValueError, match="target"):
        attr.saliency(f, x, -t)
    with pytest.raises(ValueError, match="target must hold integer"):
        attr.saliency(f, x, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="target must have shape"):
        attr.saliency(f, x, t[:3])
    with pytest.raises(ValueError, match="baseline must have the shape"):
        attr.integrated_gradients(f, x, t, baseline=jnp.zeros((B, H, W)))
    with pytest.raises(ValueError, match="baseline must be"):
        attr.integrated_gradients(f, x, t, baseline="noise")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        attr.integrated_gradients(f, x, t, steps=0)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        attr.integrated_gradients(f, x, t, steps=1)
    with pytest.raises(ValueError, match="method must be one of"):
        attr.integrated_gradients(f, x, t, method="simpson")
    with pytest.raises(ValueError, match="name must be one of"):
        attr.attribute("deep_lift", f, x, t)
    with pytest.raises(ValueError, match="patch"):
        attr.occlusion(f, x, t, patch=0)
    # a one-example baseline broadcasts over the batch; steps=1 works for Gauss-Legendre (midpoint)
    w, _ = _linear_model(jax.random.key(0))
    np.testing.assert_allclose(
        attr.integrated_gradients(f, x, t, baseline=x[0], steps=1, method="gauss_legendre"), w[t] * (x - x[0]), rtol=1e-5, atol=1e-5
    )


def test_out_of_range_target_under_jit_gives_nan(data):
    x, t = data
    _, f = _linear_model(jax.random.key(0))
    out = jax.jit(functools.partial(attr.saliency, f))(x, t.at[1].set(9))
    assert bool(jnp.all(jnp.isnan(out[1]))) and bool(jnp.all(jnp.isfinite(out[jnp.array([0, 2, 3, 4])])))


def test_jit_matches_eager(data):
    x, t = data
    _, f = _cnn(jax.random.key(7))
    for fn in (attr.saliency, attr.grad_x_input):
        np.testing.assert_allclose(jax.jit(functools.partial(fn, f))(x, t), fn(f, x, t), rtol=1e-5, atol=1e-7)


def test_gaussian_blur_keeps_constant_images_constant_when_the_kernel_is_larger_than_the_image():
    """On 8x8 digits with sigma 5 the kernel (radius 15) is cut to 7 taps: they are renormalised (mass 1)."""
    x = jnp.full((2, 8, 8, 1), 0.7, jnp.float32)
    np.testing.assert_allclose(_core.gaussian_blur(x, sigma=5.0), x, rtol=1e-6)


def test_gaussian_blur_matches_scipy_where_the_kernel_fits():
    from scipy import ndimage

    x = np.random.default_rng(0).normal(size=(1, 20, 20, 2)).astype(np.float32)
    ours = np.asarray(_core.gaussian_blur(jnp.asarray(x), sigma=1.5))
    ref = ndimage.gaussian_filter(x.astype(np.float64), sigma=(0, 1.5, 1.5, 0), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Grad-CAM from a split model, [batch, K] targets, ig_completeness_error's argument order
# --------------------------------------------------------------------------------------------
def _split_small_cnn(size=8):
    """SmallCNN (8x8x1 inputs) as forward_fn and cut after conv2: features_fn -> conv2 [B, 4, 4, 32],
    head_fn = the rest of the network (2x2 max-pool, flatten, dense1 + ReLU, head), from the same params."""
    model = models.SmallCNN(num_classes=K)
    x = jax.random.uniform(jax.random.key(20), (4, size, size, 1))
    variables = model.init(jax.random.key(21), x)
    forward_fn = models.forward_with_features(model, variables)
    params = variables["params"]

    def features_fn(v):
        return forward_fn(v)[1]["conv2"]

    def head_fn(a):
        h = _layers.POOL_IMPLS[model.impl](a).reshape(a.shape[0], -1)
        h = nn.relu(nn.Dense(64).apply({"params": params["dense1"]}, h))
        return nn.Dense(K).apply({"params": params["head"]}, h)

    return forward_fn, (features_fn, head_fn), model.apply(variables, x), x


class SplitGradCamTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.forward_fn, self.pair, self.logits, self.x = _split_small_cnn()
        self.t = jnp.array([0, 2, 1, 1])
        self.tk = jnp.array([[0, 1, 2], [2, 2, 0], [1, 0, 1], [1, 2, 0]])  # [batch, K=3], a repeated class too

    def test_the_split_is_the_same_network(self):
        features_fn, head_fn = self.pair
        np.testing.assert_allclose(head_fn(features_fn(self.x)), self.logits, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pair_form_equals_forward_fn_and_layer(self):
        by_layer = self.variant(functools.partial(attr.grad_cam, self.forward_fn, layer="conv2"))
        by_pair = self.variant(functools.partial(attr.grad_cam, self.pair))
        want = by_layer(self.x, self.t)
        got = by_pair(self.x, self.t)
        assert got.shape == (4, 8, 8) and float(jnp.max(want)) > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_k_targets_equal_k_separate_calls_in_both_forms(self):
        for forward, kw in ((self.forward_fn, {"layer": "conv2"}), (self.pair, {})):
            cam = self.variant(functools.partial(attr.grad_cam, forward, **kw))
            out = cam(self.x, self.tk)
            chex.assert_shape(out, (4, 3, 8, 8))
            stacked = jnp.stack([cam(self.x, self.tk[:, k]) for k in range(3)], axis=1)
            np.testing.assert_allclose(out, stacked, rtol=1e-5, atol=1e-6)
            assert float(jnp.max(out)) > 0

    def test_pair_matches_the_hand_computed_map(self):
        """Features = relu(x @ m) (a 1x1 conv), head = spatial mean then v: alpha = v[:, t] / (h w) (see
        test_grad_cam_hand_computed), here without any dict or deltas."""
        x = jax.random.normal(jax.random.key(22), (B, H, W, C))
        t = jnp.array([0, 1, 2, 0, 1])
        m = jax.random.normal(jax.random.key(10), (C, 4))
        v = jax.random.normal(jax.random.key(11), (4, K))
        pair = (lambda z: jax.nn.relu(z @ m), lambda a: a.mean(axis=(1, 2)) @ v)
        want = jax.nn.relu(jnp.einsum("bhwc,cb->bhw", jax.nn.relu(x @ m), v[:, t] / (H * W)))
        np.testing.assert_allclose(attr.grad_cam(pair, x, t), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(attr.grad_cam(list(pair), x, t), want, rtol=1e-5, atol=1e-7)
        # smoothgrad and the registry pass the pair through as the forward
        np.testing.assert_allclose(attr.attribute("grad_cam", pair, x, t), want, rtol=1e-5, atol=1e-7)
        sg = attr.smoothgrad(attr.grad_cam, pair, x, t, key=jax.random.key(0), samples=2, noise=0.0)
        np.testing.assert_allclose(sg, want, rtol=1e-5, atol=1e-7)


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value), str(err.value)


def test_split_forward_bad_inputs_give_one_line_errors(data):
    x, t = data
    feats = lambda z: z.mean(axis=(1, 2))  # [B, C]: not a spatial map
    head = lambda a: a @ jnp.ones((a.shape[-1], K))
    _one_line_error(lambda: attr.grad_cam((feats, head), x, t),
                    rf"features_fn must be a spatial map \[batch, h, w, c\] for grad_cam; got shape \({B}, {C}\)")
    spatial = (lambda z: z, lambda a: a.mean(axis=(1, 2)) @ jnp.ones((C, K)))
    _one_line_error(lambda: attr.grad_cam(spatial, x, t, layer="a"), "layer must be None when forward is a")
    _one_line_error(lambda: attr.grad_cam(spatial + (head,), x, t), "pair")
    _one_line_error(lambda: attr.grad_cam((feats, 3), x, t), "pair")
    _one_line_error(lambda: attr.grad_cam(spatial[0], x, t), "layer must name a feature")
    _one_line_error(lambda: attr.grad_cam((lambda z: z, lambda a: a.sum(axis=(1, 2, 3))), x, t),
                    rf"head_fn must return logits \[batch, classes\] = \[{B}, C\]; got \({B},\)")
    _one_line_error(lambda: attr.grad_cam((lambda z: z[0], head), x, t), "features_fn must have the batch axis")
    _one_line_error(lambda: attr.grad_cam((lambda z: {"a": z}, head), x, t), "features_fn must return one array")
    _one_line_error(lambda: attr.grad_cam(spatial, x, t.at[0].set(K)), r"target values must lie in \[0, 3\)")
    _one_line_error(lambda: attr.grad_cam(spatial, x, jnp.zeros((B, 2, 2), jnp.int32)), "target must have shape")


class OcclusionTargetsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_k_targets_equal_k_separate_calls(self):
        x = jax.random.normal(jax.random.key(1), (B, H, W, C))
        _, f = _cnn(jax.random.key(7))
        tk = jnp.array([[0, 2], [1, 1], [2, 0], [0, 0], [1, 2]])
        occ = self.variant(functools.partial(attr.occlusion, f, patch=3, stride=2, value=0.5))
        out = occ(x, tk)
        chex.assert_shape(out, (B, 2, H, W, C))
        np.testing.assert_allclose(out, jnp.stack([occ(x, tk[:, k]) for k in range(2)], axis=1), rtol=1e-5, atol=1e-6)


def test_ig_completeness_error_argument_order_and_k_targets(data):
    """(apply_fn, x, attribution, target) as every metric. A linear model's exact IG has error 0, twice it 1."""
    x, t = data
    w, f = _linear_model(jax.random.key(0))
    exact = w[t] * x
    np.testing.assert_allclose(metrics.ig_completeness_error(f, x, exact, t), 0.0, atol=1e-5)
    np.testing.assert_allclose(metrics.ig_completeness_error(f, x, 2 * exact, t), 1.0, rtol=1e-4)
    tk = jnp.stack([t, (t + 1) % K], axis=1)
    amap = jnp.stack([exact, 3 * w[tk[:, 1]] * x], axis=1)  # [B, 2, H, W, C]: errors 0 and 2
    err = jax.jit(functools.partial(metrics.ig_completeness_error, f))(x, amap, tk)
    chex.assert_shape(err, (B, 2))
    stacked = jnp.stack([metrics.ig_completeness_error(f, x, amap[:, k], tk[:, k]) for k in range(2)], axis=1)
    np.testing.assert_allclose(err, stacked, rtol=1e-5, atol=1e-5)  # float32 sums in another order under jit
    np.testing.assert_allclose(err, jnp.broadcast_to(jnp.array([0.0, 2.0]), (B, 2)), rtol=1e-4, atol=1e-5)
    _one_line_error(lambda: metrics.ig_completeness_error(f, x, exact, tk), r"attribution must be \[batch, K, \.\.\.\]")
    _one_line_error(lambda: metrics.ig_completeness_error(f, x, exact[..., 0], t), "attribution must have the shape of x")
