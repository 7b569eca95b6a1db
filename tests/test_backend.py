"""Tests for distill_jax.backend: per-backend choices, the code that follows them, HIGHEST precision in jaxprs."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import Mesh

from distill_jax import analysis, attr, backend, metrics, models
from distill_jax.attr._core import sample_chunk
from distill_jax.data import pca

HIGHEST = jax.lax.Precision.HIGHEST
B, H, W, C, K = 3, 6, 6, 2, 4


# --------------------------------------------------------------------------------------------
# jaxpr helpers
# --------------------------------------------------------------------------------------------
def _sub_jaxprs(value):
    if isinstance(value, ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def all_eqns(jaxpr):
    """Every equation of a (closed) jaxpr and of the jaxprs nested in it (scan, while, cond, pjit, shard_map...)."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from all_eqns(sub)


def _is_highest(precision) -> bool:
    if isinstance(precision, tuple):
        return len(precision) > 0 and all(p == HIGHEST for p in precision)
    return precision == HIGHEST


def jaxpr_of(fn, *args):
    """fn's jaxpr, traced afresh: make_jaxpr caches traces per function object, and a trace made under
    one `backend.override` must not answer for another."""
    return jax.make_jaxpr(lambda *a: fn(*a))(*args)


def products(fn, *args):
    """(primitive name, precision) of every dot_general / conv_general_dilated in fn's jaxpr."""
    names = ("dot_general", "conv_general_dilated")
    return [(e.primitive.name, e.params.get("precision")) for e in all_eqns(jaxpr_of(fn, *args))
            if e.primitive.name in names]


def assert_all_highest(fn, *args, at_least: int = 1):
    found = products(fn, *args)
    assert len(found) >= at_least, f"expected >= {at_least} matrix products, found {found}"
    low = [f for f in found if not _is_highest(f[1])]
    assert not low, f"{len(low)} of {len(found)} products are not HIGHEST: {low}"


def scan_lengths(fn, *args):
    return [e.params["length"] for e in all_eqns(jaxpr_of(fn, *args)) if e.primitive.name == "scan"]


# --------------------------------------------------------------------------------------------
# models with HIGHEST products only, so any default-precision product in a jaxpr is the library's
# --------------------------------------------------------------------------------------------
def _linear_images(key):
    """f_c(x) = <w_c, x> + c_c on [batch, H, W, C] images, products in HIGHEST precision; IG = w_t * (x - x')."""
    w = jax.random.normal(key, (H * W * C, K))
    c = jnp.arange(K, dtype=jnp.float32)
    return w, lambda x: jnp.matmul(x.reshape(x.shape[0], -1), w, precision=HIGHEST) + c


@pytest.fixture(scope="module")
def images():
    x = jax.random.normal(jax.random.key(1), (B, H, W, C))
    t = jnp.array([0, 3, 1])
    w, f = _linear_images(jax.random.key(2))
    return x, t, w, f


# --------------------------------------------------------------------------------------------
# the choices
# --------------------------------------------------------------------------------------------
def test_cpu_choices_are_the_measured_ones():
    c = backend.choices("cpu")
    assert c.name == "cpu"
    assert c.attribution_impl("lax_conv") == "patches"
    assert c.attribution_impl("patches") == "patches" and c.attribution_impl("lax") == "lax"
    assert c.query_impls == ()  # the audit's queries run the network at top level: as built
    assert c.forward_impl == "lax"
    assert (c.sample_chunk, c.ig_path_chunk, c.ig_batch_chunk, c.occlusion_chunk) == (8, 1, None, 1)
    assert c.chunk_budget_bytes is None
    assert c.pca_split_scatter_from == 256


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_accelerator_choices_use_native_conv_and_budgeted_chunks(name):
    c = backend.choices(name)
    assert c.name == name
    assert c.attribution_impl("patches") == "lax_conv"
    assert dict(c.query_impls) == {"patches": "lax_conv"}
    assert c.attribution_impl("lax_conv") == "lax_conv" and c.attribution_impl("lax") == "lax"
    assert c.forward_impl == "lax"
    assert c.ig_batch_chunk is None
    assert c.chunk_budget_bytes == 32 << 20
    assert c.pca_split_scatter_from is None
    assert c.sample_chunk == 64


def test_choices_follow_jax_default_backend(monkeypatch):
    for name in ("cpu", "gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda name=name: name)
        assert backend.current() == name
        assert backend.choices() is backend.CHOICES[name]
    monkeypatch.setattr(jax, "default_backend", lambda: "METAL")
    other = backend.choices()
    assert other.name == "METAL"
    assert dataclasses.replace(other, name="gpu") == backend.CHOICES["gpu"]


def test_override_nests_and_restores():
    before = backend.current()
    custom = dataclasses.replace(backend.CHOICES["cpu"], name="custom", sample_chunk=3)
    with backend.override("tpu") as outer:
        assert outer is backend.CHOICES["tpu"] and backend.current() == "tpu"
        with backend.override(custom):
            assert backend.choices() is custom and backend.current() == "custom"
        assert backend.choices() is backend.CHOICES["tpu"]
    assert backend.current() == before
    with pytest.raises(ValueError, match="which"):
        with backend.override(3):
            pass


def test_choices_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.CHOICES["cpu"].sample_chunk = 2


def test_chunk_fixed_and_budgeted_closed_forms():
    cpu = backend.choices("cpu")
    assert cpu.chunk(20, 8, item_bytes=10**9) == 8  # no budget: the fixed value
    assert cpu.chunk(5, 8) == 5 and cpu.chunk(0, 8) == 1
    budget = dataclasses.replace(cpu, chunk_budget_bytes=100)
    assert budget.chunk(10, 7) == 7  # size unknown: the fixed value
    # 100 // 30 = 3 per step -> ceil(10 / 3) = 4 steps -> ceil(10 / 4) = 3 per step
    assert budget.chunk(10, 7, item_bytes=30) == 3
    # 100 // 40 = 2 -> 5 steps of 2
    assert budget.chunk(10, 7, item_bytes=40) == 2
    # 100 // 1 = 100 >= 64: everything in one step
    assert budget.chunk(64, 7, item_bytes=1) == 64
    # 100 // 2 = 50 -> 2 steps -> 32 each (not 50 + 14)
    assert budget.chunk(64, 7, item_bytes=2) == 32
    assert budget.chunk(10, 7, item_bytes=10**6) == 1


def test_bytes_of_reads_shape_and_dtype():
    assert backend.bytes_of(jnp.zeros((3, 4), jnp.float32)) == 48
    assert backend.bytes_of(jax.ShapeDtypeStruct((2, 5), jnp.float16), copies=3) == 60


# --------------------------------------------------------------------------------------------
# code that follows the choices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, start, expected", [
    ("cpu", "lax_conv", "patches"), ("cpu", "patches", "patches"), ("cpu", "lax", "lax"),
    ("gpu", "lax_conv", "lax_conv"), ("gpu", "patches", "lax_conv"), ("gpu", "lax", "lax"),
    ("tpu", "patches", "lax_conv"),
])
def test_for_attribution_follows_the_backend(monkeypatch, name, start, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: name)
    model = models.SmallCNN(10, impl=start)
    twin = models.for_attribution(model)
    assert twin.impl == expected
    assert (twin is model) == (start == expected)
    mlp = models.MLP(10)
    assert models.for_attribution(mlp) is mlp and models.forward_only(mlp) is mlp


def test_for_attribution_on_gpu_keeps_parameters_and_outputs():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    model = models.SmallCNN(10, impl="patches")
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    with backend.override("gpu"):
        twin = models.for_attribution(model)
    assert twin.impl == "lax_conv"
    np.testing.assert_allclose(jax.jit(twin.apply)(v, x), jax.jit(model.apply)(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cpu", "gpu", "tpu"])
def test_forward_only_follows_the_backend(name):
    with backend.override(name):
        for start in ("lax_conv", "patches", "lax"):
            assert models.forward_only(models.SeedCNN(10, impl=start)).impl == backend.choices().forward_impl == "lax"
    # the model reads the impl from backend.py, not from a constant of its own
    with backend.override(dataclasses.replace(backend.CHOICES["gpu"], forward_impl="lax_conv")):
        model = models.SeedCNN(10, impl="lax")
        assert models.forward_only(model).impl == "lax_conv"
    with backend.override(dataclasses.replace(backend.CHOICES["cpu"], attribution_impls=(("lax", "patches"),))):
        assert models.for_attribution(models.SeedCNN(10, impl="lax")).impl == "patches"


def test_sample_chunk_follows_the_backend(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert sample_chunk(None, 100) == 8 and sample_chunk(None, 5) == 5
    assert sample_chunk(None, 100, sample_bytes=1) == 8  # no budget on CPU
    assert sample_chunk(3, 100) == 3  # an explicit chunk wins on every backend
    for name in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda name=name: name)
        assert sample_chunk(None, 100) == 64  # size unknown
        assert sample_chunk(None, 100, sample_bytes=1024) == 100  # 32 MiB holds all 100 copies
        # 32 MiB // 1 MiB = 32 per step -> 4 steps of 25
        assert sample_chunk(None, 100, sample_bytes=1 << 20) == 25
        assert sample_chunk(3, 100, sample_bytes=1) == 3
    with backend.override(dataclasses.replace(backend.CHOICES["cpu"], sample_chunk=2)):
        assert sample_chunk(None, 100) == 2
    with pytest.raises(ValueError, match="chunk"):
        sample_chunk(0, 5)


def test_ig_defaults_follow_the_backend(images):
    x, t, w, f = images
    steps = 16
    exact = np.asarray(w.T[t].reshape(x.shape) * x)
    run = lambda: attr.integrated_gradients(f, x, t, steps=steps, method="gauss_legendre")
    with backend.override("cpu"):
        assert scan_lengths(run) == [steps]  # one path point per scan step
        on_cpu = run()
    with backend.override("gpu"):
        assert scan_lengths(run) == [1]  # all 16 points x 3 small images fit the budget: one step
        on_gpu = run()
    tight = dataclasses.replace(backend.CHOICES["gpu"], chunk_budget_bytes=backend.bytes_of(x) * 5)
    with backend.override(tight):
        assert scan_lengths(run) == [4]  # 5 points fit -> 4 steps of 4
        # K targets per example: K copies of the work per point -> 5 // 2 = 2 points per step -> 8 steps
        t2 = jnp.stack([t, (t + 1) % K], axis=1)
        assert scan_lengths(lambda: attr.integrated_gradients(f, x, t2, steps=steps)) == [8]
        on_tight = run()
    for got in (on_cpu, on_gpu, on_tight):
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
    with backend.override(dataclasses.replace(backend.CHOICES["cpu"], ig_batch_chunk=1)):
        # groups of one example: lax.map (a scan of length B) around the path scan
        assert sorted(scan_lengths(run)) == [B, steps]
        np.testing.assert_allclose(run(), exact, rtol=1e-5, atol=1e-6)


def test_occlusion_default_follows_the_backend(images):
    x, t, _, f = images
    run = lambda: attr.occlusion(f, x, t, patch=2, stride=2)  # 3 x 3 = 9 windows
    with backend.override("cpu"):
        assert scan_lengths(run) == [9]  # one window per step
        on_cpu = run()
    with backend.override("gpu"):
        assert scan_lengths(run) == [1]
        on_gpu = run()
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        attr.occlusion(f, x, t, chunk=0)


def test_blur_ig_and_gradient_shap_pass_their_batch_size_to_the_budget(images):
    x, t, _, f = images
    tight = dataclasses.replace(backend.CHOICES["gpu"], chunk_budget_bytes=backend.bytes_of(x) * 2)
    with backend.override(tight):
        # 2 copies of the batch per step: 6 blur levels -> 3 steps
        assert scan_lengths(lambda: attr.blur_ig(f, x, t, steps=6, max_sigma=1.0)) == [3]
        shap = lambda: attr.gradient_shap(f, x, t, key=jax.random.key(0), samples=5)
        assert 3 in scan_lengths(shap)  # 5 samples, 2 per step -> 3 steps


@pytest.mark.parametrize("name, dots", [("cpu", 2), ("gpu", 1)])
def test_pca_scatter_split_follows_the_backend(name, dots):
    xc = jax.random.normal(jax.random.key(0), (20, 256))
    with backend.override(name):
        assert len(products(pca._upper_scatter, xc)) == dots
        got = np.asarray(pca._upper_scatter(xc))
    ref = np.asarray(xc, np.float64).T @ np.asarray(xc, np.float64)
    np.testing.assert_allclose(np.triu(got), np.triu(ref), rtol=1e-5, atol=1e-4)
    small = xc[:, :255]
    with backend.override(name):
        assert len(products(pca._upper_scatter, small)) == 1


# --------------------------------------------------------------------------------------------
# HIGHEST precision on every product that feeds a reported number
# --------------------------------------------------------------------------------------------
def test_the_jaxpr_check_can_fail():
    a = jnp.ones((3, 3))
    with pytest.raises(AssertionError, match="not HIGHEST"):
        assert_all_highest(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=2)[0], a)
    with pytest.raises(AssertionError, match="expected"):
        assert_all_highest(lambda a: a + 1, a)
    assert_all_highest(lambda a: jax.lax.cond(True, lambda: jnp.matmul(a, a, precision=HIGHEST), lambda: a), a)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_ig_and_occlusion_products_are_highest(images, name):
    x, t, _, f = images
    t2 = jnp.stack([t, (t + 1) % K], axis=1)
    with backend.override(name):
        assert_all_highest(lambda v: attr.integrated_gradients(f, v, t, steps=4, return_error=True), x, at_least=4)
        assert_all_highest(lambda v: attr.integrated_gradients(f, v, t2, steps=3, chunk=2, batch_chunk=2), x)
        assert_all_highest(lambda v: metrics.ig_completeness_error(f, v, v, t), x)
        assert_all_highest(lambda v: attr.occlusion(f, v, t, patch=3, stride=3), x)
        assert_all_highest(lambda v: attr.blur_ig(f, v, t, steps=2, max_sigma=1.0), x)


def test_analysis_products_are_highest():
    rng = np.random.default_rng(4)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    wide, narrow = normal(5, 12), normal(30, 3)
    assert_all_highest(analysis.linear_cka, wide, normal(5, 7))  # Gram form
    assert_all_highest(analysis.linear_cka, narrow, normal(30, 4))  # feature form
    assert_all_highest(lambda a, b: analysis.cka_matrix({"a": a}, {"b": b, "c": b * 2})[2], wide, wide)
    k, classes, d = 4, 3, 12
    weights, z = normal(k, classes), normal(5, k)
    comps = np.linalg.qr(normal(d, k))[0].T
    bias = np.zeros(classes, np.float32)
    assert_all_highest(lambda w, z, p: analysis.linear_contributions(w, bias, z, p), weights, z, comps)
    assert_all_highest(lambda w, z, p: analysis.linear_contributions(w, bias, z, p, x=normal(5, d)), weights, z, comps)
    assert_all_highest(analysis.class_templates, weights, comps)
    probs = np.full((6, 4), 0.25, np.float32)
    assert_all_highest(lambda p: analysis.tree_usage(p, np.array([0, 1, 2, 0, 1, 2]), 3), probs)

    proj = normal(d, classes)

    def forward_fn(x, deltas=None):
        h = x.reshape(x.shape[0], -1) + (deltas or {}).get("h", 0.0)
        return jnp.matmul(h, proj, precision=HIGHEST), {"h": h}

    xs = normal(4, 2, 6)
    assert_all_highest(lambda v: attr.tcav_score(forward_fn, v, np.array([0, 1, 2, 0]), np.ones(d), layer="h"), xs)
    key = jax.random.key(0)
    assert_all_highest(lambda a, b: attr.concept_activation_vector(forward_fn, a, b, layer="h", key=key, steps=2),
                       xs, xs + 1)


def test_pca_products_are_highest():
    x256 = jax.ShapeDtypeStruct((600, 256), jnp.float32)  # traced only: covariance with the split scatter
    x = jax.random.normal(jax.random.key(0), (40, 12))
    for name in ("cpu", "gpu"):
        with backend.override(name):
            assert_all_highest(lambda v: pca._fit_covariance(v, None, k=3, whiten=False), x256, at_least=1)
    for method in ("covariance", "randomized"):
        assert_all_highest(lambda v, m=method: pca.fit(v, 3, method=m), x)
    assert_all_highest(lambda v: pca.fit(v.T, 3, method="randomized"), x)  # the wide orientation
    fitted = pca.fit(x, 3)
    for whiten in (False, True):
        p = fitted.replace(whiten=whiten)
        assert_all_highest(lambda v: pca.transform(p, v), x)
        assert_all_highest(lambda z: pca.inverse_transform(p, z), jnp.ones((5, 3)))
    assert_all_highest(pca.covariance_stats, x)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    assert_all_highest(lambda v: pca.sharded_covariance_stats(v, mesh), x)


def test_soft_tree_products_are_highest():
    x = jax.ShapeDtypeStruct((4, 5, 5, 1), jnp.float32)
    tree = models.SoftDecisionTree(depth=3, num_classes=4)
    v = jax.eval_shape(tree.init, jax.random.PRNGKey(0), x)  # shapes only: nothing runs
    assert_all_highest(tree.apply, v, x, at_least=2)
    # and the gradient it is trained with
    assert_all_highest(jax.grad(lambda p, x: tree.apply(p, x).sum()), v, x, at_least=2)


# --------------------------------------------------------------------------------------------
# jit and eager agree under either backend's choices (chex variants)
# --------------------------------------------------------------------------------------------
class ChoicesUnderJit(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ig_same_values_under_cpu_and_gpu_choices(self):
        x = jax.random.normal(jax.random.key(1), (B, H, W, C))
        t = jnp.array([0, 3, 1])
        w, f = _linear_images(jax.random.key(2))
        exact = np.asarray(w.T[t].reshape(x.shape) * x)
        for name in ("cpu", "gpu"):
            with backend.override(name):
                fn = self.variant(functools.partial(attr.integrated_gradients, f, steps=8, method="gauss_legendre"))
                np.testing.assert_allclose(fn(x, t), exact, rtol=1e-5, atol=1e-6)
