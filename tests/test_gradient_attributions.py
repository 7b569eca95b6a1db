"""Tests for distill_jax.gradient_attributions: closed forms on linear and quadratic models, and plain
numpy re-implementations (loops, numpy gradients of a tanh MLP) of each algorithm."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import attr, metrics
from distill_jax._checks import check_key
from distill_jax.attr import _gradient, _paths
from distill_jax.attr._core import gaussian_blur
from distill_jax.distill import privacy

B, H, W, C, K = 3, 8, 8, 1, 3
D = H * W * C


# --------------------------------------------------------------------------------------------
# Models with known gradients
# --------------------------------------------------------------------------------------------
def linear_model(seed=0):
    """logits = x.reshape(b, -1) @ Wm + c: grad of logit_t is Wm[:, t] everywhere."""
    kw, kc = jax.random.split(jax.random.key(seed))
    wm, c = jax.random.normal(kw, (D, K)), jax.random.normal(kc, (K,))
    return np.asarray(wm, np.float64), lambda v: v.reshape(v.shape[0], -1) @ wm + c


def weights_of(wm, t):
    """The per-example gradient Wm[:, t_b] of the linear model, shaped like x."""
    return wm[:, np.asarray(t)].T.reshape(len(t), H, W, C)


SCALES = np.array([1.0, 2.0, -0.5])


def quadratic_model(v):
    """logit_k = SCALES_k * sum(x^2) / 2: grad of logit_t is SCALES_t * x."""
    return 0.5 * jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)[:, None] * jnp.asarray(SCALES, v.dtype)


def tanh_mlp(seed=1, hidden=16):
    """logits = tanh(x W1 + b1) W2 + b2, with a numpy (float64) input gradient."""
    k = jax.random.split(jax.random.key(seed), 4)
    w1 = jax.random.normal(k[0], (D, hidden)) / np.sqrt(D) * 2
    b1 = 0.3 * jax.random.normal(k[1], (hidden,))
    w2 = jax.random.normal(k[2], (hidden, K))
    b2 = jax.random.normal(k[3], (K,))
    n = [np.asarray(a, np.float64) for a in (w1, b1, w2, b2)]

    def apply_fn(v):
        return jnp.tanh(v.reshape(v.shape[0], -1) @ w1 + b1) @ w2 + b2

    def np_logit(v, t):  # v: one example, any shape
        return float(np.tanh(v.reshape(-1) @ n[0] + n[1]) @ n[2][:, t] + n[3][t])

    def np_grad(v, t):
        h = np.tanh(v.reshape(-1) @ n[0] + n[1])
        return (n[0] @ ((1 - h**2) * n[2][:, t])).reshape(v.shape)

    return apply_fn, np_logit, np_grad


def images(seed=2, batch=B):
    return jax.random.uniform(jax.random.key(seed), (batch, H, W, C), minval=-1.0, maxval=1.0)


T = jnp.array([0, 2, 1], jnp.int32)


def fast_key(seed):
    """An "rbg" key: XLA:CPU compiles its generator about 3x faster than threefry's (test time only;
    the tests of the documented draws and the jit/eager tests use default keys)."""
    return jax.random.key(seed, impl="rbg")


def flat_sum(a):
    return np.asarray(a, np.float64).reshape(a.shape[0], -1).sum(axis=1)


def range_sigma(x, noise):
    flat = np.asarray(x).reshape(x.shape[0], -1)
    return (noise * (flat.max(axis=1) - flat.min(axis=1))).reshape(-1, 1, 1, 1)


def noise_draws(key, x, sigma, samples):
    """The documented noise: e_s = sigma_b * normal(fold_in(key, s), (x.size,)).reshape(x.shape)."""
    flat = [jax.random.normal(jax.random.fold_in(key, s), (x.size,), x.dtype) for s in range(samples)]
    return [np.asarray(z, np.float64).reshape(x.shape) * sigma for z in flat]


# --------------------------------------------------------------------------------------------
# gradient_shap
# --------------------------------------------------------------------------------------------
def shap_draws(key, x, m, noise, samples):
    draws = [_gradient._shap_draw(jax.random.fold_in(key, s), x, m, noise) for s in range(samples)]
    return [(np.asarray(i), np.asarray(a, np.float64), np.asarray(e, np.float64)) for i, a, e in draws]


def test_gradient_shap_linear_many_samples_matches_mean_over_baselines():
    wm, f = linear_model()
    x = images()
    refs = jax.random.normal(jax.random.key(6), (5, H, W, C))
    samples = 2048
    amap = attr.gradient_shap(f, x, T, key=jax.random.key(7), baselines=refs, samples=samples)
    f_refs = np.asarray(f(refs))[:, np.asarray(T)]  # [m, B]
    expected = np.asarray(f(x))[np.arange(B), T] - f_refs.mean(axis=0)
    # the draw of baselines is the only randomness: 5 standard errors of the mean of f(r)
    tol = 5 * f_refs.std(axis=0) / np.sqrt(samples)
    assert np.all(np.abs(flat_sum(amap) - expected) <= tol)


def test_gradient_shap_quadratic_with_noise_matches_numpy_loop():
    x, key = images(), jax.random.key(8)
    refs = np.asarray(jax.random.normal(jax.random.key(9), (4, H, W, C)), np.float64)
    samples, noise = 5, 0.3
    amap = attr.gradient_shap(quadratic_model, x, T, key=key, baselines=refs, samples=samples, noise=noise, chunk=2)
    xn, scale = np.asarray(x, np.float64), SCALES[np.asarray(T)].reshape(-1, 1, 1, 1)
    expected = np.zeros_like(xn)
    for idx, alpha, eps in shap_draws(key, x, 4, noise, samples):
        assert eps.std() > 0.2  # the noise is really there
        for b in range(B):
            r = refs[idx[b]]
            diff = xn[b] + eps[b] - r
            expected[b] += diff * scale[b] * (r + alpha[b] * diff)  # grad of SCALES_t * |z|^2 / 2
    np.testing.assert_allclose(amap, expected / samples, rtol=1e-4, atol=1e-5)


def test_gradient_shap_chunks_agree_and_k_targets():
    f, _, _ = tanh_mlp()
    x, key = images(), fast_key(10)
    refs = jax.random.normal(jax.random.key(11), (3, H, W, C))
    run = functools.partial(attr.gradient_shap, f, key=key, baselines=refs, samples=5, noise=0.1)
    tk = jnp.stack([T, (T + 1) % K], axis=1)
    both = run(x, tk, chunk=None)  # 5 = samples on CPU
    assert both.shape == (B, 2, H, W, C)
    np.testing.assert_allclose(both[:, 0], run(x, T, chunk=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[:, 1], run(x, tk[:, 1], chunk=2), rtol=1e-5, atol=1e-6)  # padded last chunk
    assert not np.allclose(both[:, 0], both[:, 1])


def test_gradient_shap_invalid_arguments():
    _, f = linear_model()
    x, key = images(), jax.random.key(0)
    with pytest.raises(ValueError, match="baselines"):
        attr.gradient_shap(f, x, T, key=key, baselines=jnp.zeros((2, H, W)))
    with pytest.raises(ValueError, match="samples"):
        attr.gradient_shap(f, x, T, key=key, samples=0)
    with pytest.raises(ValueError, match="noise"):
        attr.gradient_shap(f, x, T, key=key, noise=-0.1)
    with pytest.raises(ValueError, match="chunk"):
        attr.gradient_shap(f, x, T, key=key, chunk=0)
    with pytest.raises(ValueError, match="key"):
        attr.gradient_shap(f, x, T, key=None)
    with pytest.raises(ValueError, match="target"):
        attr.gradient_shap(f, x, jnp.array([0, 1, K]), key=key)


# --------------------------------------------------------------------------------------------
# vargrad and smoothgrad_squared
# --------------------------------------------------------------------------------------------
def test_vargrad_and_smoothgrad_squared_linear_closed_form():
    wm, f = linear_model()
    x, key = images(), fast_key(12)
    np.testing.assert_array_equal(attr.vargrad(f, x, T, key=key, samples=7, chunk=3), np.zeros(x.shape))
    sg2 = attr.smoothgrad_squared(f, x, T, key=key, samples=7, chunk=3)
    np.testing.assert_allclose(sg2, weights_of(wm, T) ** 2, rtol=1e-5)


def test_vargrad_quadratic_many_samples_is_noise_variance():
    x, samples, noise = images(), 512, 0.1
    var = attr.vargrad(quadratic_model, x, T, key=jax.random.key(14), samples=samples, noise=noise)
    expected = (SCALES[np.asarray(T)].reshape(-1, 1, 1, 1) * range_sigma(x, noise)) ** 2 * np.ones(x.shape)
    ratio = np.asarray(var) / expected  # each ~ chi2_{n-1} / n: mean (n-1)/n, std sqrt(2/n)
    sd = np.sqrt(2 / samples)
    assert np.all(np.abs(ratio - 1) < 5 * sd)
    assert abs(ratio.mean() - (samples - 1) / samples) < 5 * sd / np.sqrt(ratio.size)


def test_noisy_gradient_methods_chunks_agree():
    f, _, _ = tanh_mlp()
    x, key = images(), fast_key(15)
    # vargrad: 1 vs 2 (a padded last chunk); smoothgrad_squared: 1 vs None (5 = samples on CPU)
    for method, chunk in ((attr.vargrad, 2), (attr.smoothgrad_squared, None)):
        ref = method(f, x, T, key=key, samples=5, chunk=1)
        assert float(jnp.abs(ref).max()) > 0
        np.testing.assert_allclose(method(f, x, T, key=key, samples=5, chunk=chunk), ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", [attr.vargrad, attr.smoothgrad_squared])
def test_noisy_gradient_methods_invalid_arguments(method):
    _, f = linear_model()
    x, key = images(), jax.random.key(0)
    with pytest.raises(ValueError, match="samples"):
        method(f, x, T, key=key, samples=2.5)
    with pytest.raises(ValueError, match="noise"):
        method(f, x, T, key=key, noise=float("nan"))
    with pytest.raises(ValueError, match="chunk"):
        method(f, x, T, key=key, chunk=-1)
    with pytest.raises(ValueError, match="key"):
        method(f, x, T, key=jnp.zeros((2, 2), jnp.uint32))
    with pytest.raises(ValueError, match="x must"):
        method(f, jnp.zeros(5), T, key=key)


# --------------------------------------------------------------------------------------------
# guided_ig
# --------------------------------------------------------------------------------------------
def numpy_guided_ig(x, base, grad, *, steps, fraction, max_dist):
    """A line-by-line numpy (float64) port of PAIR saliency's guided_ig_impl for one example."""
    x, base = np.asarray(x, np.float64), np.asarray(base, np.float64)
    cur, amap = base.copy(), np.zeros_like(x)
    diff = x - base
    l1_total = np.abs(diff).sum()
    tol = _paths._GUIDED_IG_RTOL * l1_total

    def on_line(alpha):
        return x.copy() if alpha >= 1 else base + alpha * diff

    for k in range(steps):
        g = grad(cur)
        alpha = (k + 1.0) / steps
        a_min, a_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        x_min, x_max = on_line(a_min), on_line(a_max)
        l1_target = l1_total * (1 - alpha)
        gamma = np.inf
        while gamma > 1.0:
            old = cur.copy()
            with np.errstate(divide="ignore", invalid="ignore"):
                position = np.where(diff != 0, (cur - base) / diff, a_max)
            cur[position < a_min] = x_min[position < a_min]
            l1_now = np.abs(cur - x).sum()
            if abs(l1_now - l1_target) <= tol:
                amap += (cur - old) * g
                break
            absg = np.abs(g)
            absg[cur == x_max] = np.inf
            threshold = np.quantile(absg, fraction, method="lower")
            chosen = (absg <= threshold) & (absg != np.inf)
            l1_chosen = (np.abs(cur - x_max) * chosen).sum()
            gamma = (l1_now - l1_target) / l1_chosen if l1_chosen > 0 else np.inf
            if gamma > 1.0:
                cur[chosen] = x_max[chosen]
            else:
                cur[chosen] = (cur + gamma * (x_max - cur))[chosen]
            amap += (cur - old) * g
            if l1_chosen == 0:
                break
    return amap


def test_guided_ig_linear_is_ig_exactly():
    wm, f = linear_model()
    x = images()
    base = 0.5 * jax.random.normal(jax.random.key(16), x.shape)
    for max_dist in (1.0, 0.1):
        amap = attr.guided_ig(f, x, T, baseline=base, steps=12, fraction=0.2, max_dist=max_dist)
        np.testing.assert_allclose(amap, (np.asarray(x) - np.asarray(base)) * weights_of(wm, T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_dist, fraction", [(1.0, 0.1), (0.05, 0.25)])
def test_guided_ig_matches_numpy_reference(max_dist, fraction):
    f, _, np_grad = tanh_mlp()
    x = images()
    base = jnp.full(x.shape, -0.2)
    steps = 16
    amap = np.asarray(attr.guided_ig(f, x, T, baseline=-0.2, steps=steps, fraction=fraction, max_dist=max_dist))
    for b in range(B):
        ref = numpy_guided_ig(x[b], base[b], lambda v: np_grad(v, int(T[b])), steps=steps, fraction=fraction,
                              max_dist=max_dist)
        np.testing.assert_allclose(amap[b], ref, rtol=1e-3, atol=2e-5)


def test_guided_ig_max_dist_zero_is_left_riemann_ig():
    f, _, np_grad = tanh_mlp()
    x, steps = images(), 8
    amap = attr.guided_ig(f, x, T, steps=steps, max_dist=0.0)
    xn = np.asarray(x, np.float64)
    for b in range(B):
        mean_grad = np.mean([np_grad(k / steps * xn[b], int(T[b])) for k in range(steps)], axis=0)
        np.testing.assert_allclose(amap[b], xn[b] * mean_grad, rtol=1e-4, atol=1e-6)
        # the unbounded guided path really differs from the straight line
        guided = numpy_guided_ig(xn[b], np.zeros_like(xn[b]), lambda v: np_grad(v, int(T[b])), steps=steps,
                                 fraction=0.1, max_dist=1.0)
        assert np.abs(guided - np.asarray(amap[b])).max() > 1e-2


def test_guided_ig_completeness_tanh_mlp():
    # sum_i A_i is a left Riemann sum of the path integral of grad f, which equals f(x) - f(x'): its error
    # shrinks like 1/steps (the path itself changes with steps, so compare over the batch)
    f, np_logit, _ = tanh_mlp()
    x = images()
    delta = np.array([np_logit(x[b], int(T[b])) - np_logit(np.zeros(x.shape[1:]), int(T[b])) for b in range(B)])
    err = {n: np.abs(flat_sum(attr.guided_ig(f, x, T, steps=n)) - delta) for n in (64, 256)}
    assert err[256].sum() < 0.4 * err[64].sum(), err
    assert np.all(err[256] < 0.02 * np.abs(delta).max()), (err, delta)


def test_guided_ig_k_targets_and_identical_input():
    f, _, np_grad = tanh_mlp()
    x = images()
    tk = np.stack([np.asarray(T), (np.asarray(T) + 2) % K], axis=1)
    both = np.asarray(attr.guided_ig(f, x, jnp.asarray(tk), steps=6, fraction=0.25))
    assert both.shape == (B, 2, H, W, C)
    for b in range(B):
        for j in range(2):
            ref = numpy_guided_ig(x[b], np.zeros(x.shape[1:]), lambda v: np_grad(v, int(tk[b, j])), steps=6,
                                  fraction=0.25, max_dist=1.0)
            np.testing.assert_allclose(both[b, j], ref, rtol=1e-3, atol=2e-5)
    np.testing.assert_array_equal(attr.guided_ig(f, x, T, baseline=x, steps=4), np.zeros(x.shape))


def test_guided_ig_invalid_arguments():
    _, f = linear_model()
    x = images()
    with pytest.raises(ValueError, match="fraction"):
        attr.guided_ig(f, x, T, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        attr.guided_ig(f, x, T, fraction=1.5)
    with pytest.raises(ValueError, match="max_dist"):
        attr.guided_ig(f, x, T, max_dist=-0.1)
    with pytest.raises(ValueError, match="steps"):
        attr.guided_ig(f, x, T, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        attr.guided_ig(f, x, T, baseline=jnp.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# blur_ig
# --------------------------------------------------------------------------------------------
def numpy_blur(img, sigma, radius):
    """One NHWC image [H, W, C] blurred: kernel exp(-t^2/2s^2) over |t| <= r = min(radius, size - 1), normalised
    over those taps, with mirror (reflect) padding, H then W; sigma = 0 is the identity."""
    if sigma == 0:
        return np.array(img, np.float64)
    out = np.array(img, np.float64)
    for axis in (0, 1):
        size = out.shape[axis]
        r = min(radius, size - 1)
        taps = np.arange(-radius, radius + 1)
        k = np.exp(-(taps**2) / (2.0 * sigma**2)) * (np.abs(taps) <= r)
        k /= k.sum()
        src = np.moveaxis(out, axis, 0)
        res = np.zeros_like(src)
        for i in range(size):
            for t in range(-r, r + 1):
                j = abs(i + t)
                j = 2 * (size - 1) - j if j >= size else j
                res[i] += k[t + radius] * src[j]
        out = np.moveaxis(res, 0, axis)
    return out


def numpy_blur_ig(img, grad, *, max_sigma, steps, grad_step, sqrt):
    """PAIR saliency's BlurIG.GetMask loop with the blur above and the path ending at max_sigma."""
    u = np.arange(steps + 1) / steps
    sigmas = max_sigma * (np.sqrt(u) if sqrt else u)
    radius = int(np.ceil(3 * max_sigma))
    total = np.zeros(img.shape)
    for i in range(steps):
        step_x = numpy_blur(img, sigmas[i], radius)
        derivative = (numpy_blur(img, sigmas[i] + grad_step, radius) - step_x) / grad_step
        total += (sigmas[i + 1] - sigmas[i]) * derivative * grad(step_x)
    return -total


@functools.lru_cache(maxsize=None)
def _jitted_blur(sigma):
    return jax.jit(functools.partial(gaussian_blur, sigma=sigma))


def blurred(x, sigma):
    """attribution_core.gaussian_blur, jitted once per sigma (eagerly it compiles one slice per kernel tap)."""
    return _jitted_blur(float(sigma))(x)


def test_blur_path_endpoint_is_gaussian_blur():
    x = images()
    sigmas = np.array([0.0, 0.4, 1.5, 2.0], np.float32)
    radius = int(np.ceil(3 * sigmas.max()))
    ours = jax.jit(_paths._blur, static_argnums=2)(x, jnp.asarray(sigmas), radius)
    np.testing.assert_allclose(ours[0], x, atol=1e-7)
    np.testing.assert_allclose(ours[-1], blurred(x, 2.0), rtol=1e-5, atol=1e-6)
    for i in (1, 2, 3):
        np.testing.assert_allclose(ours[i, 1], numpy_blur(x[1], sigmas[i], radius), rtol=1e-5, atol=1e-6)


def test_blur_ig_linear_telescopes_exactly():
    wm, f = linear_model()
    x, max_sigma, steps = images(), 2.0, 8
    amap = attr.blur_ig(f, x, T, max_sigma=max_sigma, steps=steps, grad_step=max_sigma / steps)
    np.testing.assert_allclose(amap, weights_of(wm, T) * (np.asarray(x) - np.asarray(blurred(x, max_sigma))),
                               rtol=1e-3, atol=1e-5)
    expected = np.asarray(f(x) - f(blurred(x, max_sigma)))[np.arange(B), T]
    np.testing.assert_allclose(flat_sum(amap), expected, rtol=1e-4, atol=1e-4)


def test_blur_ig_linear_completeness_within_derived_bound():
    # g(s) = w . B(x, s). Step i adds ds * (g(s_i + h) - g(s_i)) / h in place of g(s_{i+1}) - g(s_i); by Taylor
    # each differs by at most ds * (h + ds) * M / 2, M = max |g''| on [0, max_sigma + h], so
    # |sum A - (f(x) - f(B(x, max_sigma)))| <= max_sigma * (h + ds) * M / 2.
    wm, f = linear_model()
    x, max_sigma, steps, h = images(), 2.0, 16, 0.01
    amap = attr.blur_ig(f, x, T, max_sigma=max_sigma, steps=steps, grad_step=h)
    radius, ds = int(np.ceil(3 * max_sigma)), max_sigma / steps
    grid = np.linspace(0.0, max_sigma + h + 0.02, 200)
    for b in range(B):
        w_b = weights_of(wm, T)[b]
        g = np.array([np.sum(w_b * numpy_blur(x[b], s, radius)) for s in grid])
        m = np.abs(np.diff(g, 2)).max() / (grid[1] - grid[0]) ** 2
        exact = g[0] - np.sum(w_b * numpy_blur(x[b], max_sigma, radius))
        err = abs(flat_sum(amap)[b] - exact)
        bound = max_sigma * (h + ds) * m / 2
        assert err <= 1.05 * bound + 1e-4, (err, bound)
        assert err > 1e-4  # h != ds really leaves an error


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_matches_numpy_loop(sqrt):
    f, _, np_grad = tanh_mlp()
    x = images()
    kw = dict(max_sigma=3.0, steps=6, grad_step=0.05, sqrt=sqrt)
    amap = np.asarray(attr.blur_ig(f, x, T, chunk=4, **kw))
    for b in range(B):
        ref = numpy_blur_ig(np.asarray(x[b]), lambda v: np_grad(v, int(T[b])), **kw)
        np.testing.assert_allclose(amap[b], ref, rtol=2e-3, atol=2e-5)


def test_blur_ig_chunks_agree():
    f, _, _ = tanh_mlp()
    x = images()
    run = functools.partial(attr.blur_ig, f, x, T, max_sigma=2.0, steps=5)
    # 1 vs None (5 = steps on CPU); test_blur_ig_matches_numpy_loop runs a padded last chunk
    np.testing.assert_allclose(run(chunk=None), run(chunk=1), rtol=1e-4, atol=1e-6)


def test_blur_ig_invalid_arguments():
    _, f = linear_model()
    x = images()
    with pytest.raises(ValueError, match="NHWC"):
        attr.blur_ig(lambda v: v.reshape(v.shape[0], -1)[:, :K], x.reshape(B, -1), T)
    with pytest.raises(ValueError, match="max_sigma"):
        attr.blur_ig(f, x, T, max_sigma=0.0)
    with pytest.raises(ValueError, match="grad_step"):
        attr.blur_ig(f, x, T, grad_step=-0.01)
    with pytest.raises(ValueError, match="steps"):
        attr.blur_ig(f, x, T, steps=0)
    with pytest.raises(ValueError, match="sqrt"):
        attr.blur_ig(f, x, T, sqrt="yes")
    with pytest.raises(ValueError, match="chunk"):
        attr.blur_ig(f, x, T, chunk=0)


# --------------------------------------------------------------------------------------------
# jit and eager give the same values
# --------------------------------------------------------------------------------------------
class JitMatchesEager(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.f, _, self.np_grad = tanh_mlp()
        self.wm, self.linear = linear_model()
        self.x = images()

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_shap(self):
        fn = self.variant(functools.partial(attr.gradient_shap, self.linear, samples=4, chunk=3))
        key, refs = jax.random.key(20), jax.random.normal(jax.random.key(21), (3, H, W, C))
        draws = shap_draws(key, self.x, 3, 0.0, 4)
        mean_ref = np.mean([np.asarray(refs)[idx] for idx, _, _ in draws], axis=0)
        amap = fn(self.x, T, key=key, baselines=refs)
        np.testing.assert_allclose(amap, (np.asarray(self.x) - mean_ref) * weights_of(self.wm, T), rtol=1e-5, atol=1e-5)
        # completeness with the drawn baselines: sum A_b = f(x_b) - mean_s f(r_bs)
        f_refs = np.asarray(self.linear(refs))  # [m, K]
        f_drawn = np.mean([f_refs[i, T] for i, _, _ in draws], axis=0)
        expected = np.asarray(self.linear(self.x))[np.arange(B), T] - f_drawn
        np.testing.assert_allclose(flat_sum(amap), expected, rtol=1e-4, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_vargrad_and_smoothgrad_squared(self):
        key, samples, noise = jax.random.key(22), 4, 0.15
        grads = np.stack([SCALES[np.asarray(T)].reshape(-1, 1, 1, 1) * (np.asarray(self.x, np.float64) + e)
                          for e in noise_draws(key, self.x, range_sigma(self.x, noise), samples)])
        var = self.variant(functools.partial(attr.vargrad, quadratic_model, samples=samples, noise=noise))
        np.testing.assert_allclose(var(self.x, T, key=key), grads.var(axis=0), rtol=1e-3, atol=1e-6)
        sg2 = self.variant(functools.partial(attr.smoothgrad_squared, quadratic_model, samples=samples, noise=noise))
        np.testing.assert_allclose(sg2(self.x, T, key=key), (grads**2).mean(axis=0), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_guided_ig(self):
        fn = self.variant(functools.partial(attr.guided_ig, self.f, steps=8, fraction=0.25))
        amap = np.asarray(fn(self.x, T))
        for b in range(B):
            ref = numpy_guided_ig(self.x[b], np.zeros(self.x.shape[1:]), lambda v: self.np_grad(v, int(T[b])),
                                  steps=8, fraction=0.25, max_dist=1.0)
            np.testing.assert_allclose(amap[b], ref, rtol=1e-3, atol=2e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_blur_ig(self):
        fn = self.variant(functools.partial(attr.blur_ig, self.linear, max_sigma=2.0, steps=4, grad_step=2.0 / 4))
        expected = weights_of(self.wm, T) * (np.asarray(self.x) - np.asarray(blurred(self.x, 2.0)))
        np.testing.assert_allclose(fn(self.x, T), expected, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------
# attribution_core.check_key: the one PRNG-key check of attributions, metrics and privacy
# --------------------------------------------------------------------------------------------
def test_check_key_accepts_one_key_and_names_what_came_otherwise():

    typed, raw = jax.random.key(0), jax.random.PRNGKey(0)
    np.testing.assert_array_equal(jax.random.key_data(check_key(typed)), jax.random.key_data(typed))
    np.testing.assert_array_equal(check_key(np.asarray(raw)), raw)  # a host copy of a raw key becomes a jax array
    np.testing.assert_array_equal(jax.jit(check_key)(raw), raw)  # traced keys are checked by dtype and shape
    assert check_key(jnp.zeros(4, jnp.uint32)).shape == (4,)  # a raw "rbg" key
    head = r"must be a PRNG key \(jax\.random\.key\(seed\) or jax\.random\.PRNGKey\(seed\)\); got "
    several = jax.random.split(typed, 3)  # several keys are not one
    for bad, got in [(None, "None and shape ()"), (3, "None and shape ()"),
                     (jnp.zeros((2, 2), jnp.uint32), "uint32 and shape (2, 2)"),
                     (jnp.zeros(2, jnp.float32), "float32 and shape (2,)"), (several, "key<fry> and shape (3,)")]:
        got = f"{type(bad).__name__} with dtype {got}"
        with pytest.raises(ValueError, match="^key " + head + re.escape(got) + "$"):
            check_key(bad)
    with pytest.raises(ValueError, match=r"^key \(needed when noise > 0\) must be a PRNG key"):
        check_key(None, "key (needed when noise > 0)")


def test_every_module_that_draws_refuses_a_bad_key_with_the_same_message():
    from distill_jax import attr

    f = lambda v: v.reshape(v.shape[0], -1)[:, :K]
    x, t = jnp.ones((2, 4, 4, 1)), jnp.array([0, 1])
    calls = [lambda: privacy.gnmax(jnp.ones((2, 3)), sigma=1.0, key=5),
             lambda: metrics.infidelity(f, x, x, t, key=5),
             lambda: attr.vargrad(f, x, t, key=5),
             lambda: attr.lime(f, x, t, key=5)]
    for call in calls:
        with pytest.raises(ValueError, match=r"^key must be a PRNG key \(.*\); got int with dtype None and shape \(\)$"):
            call()
