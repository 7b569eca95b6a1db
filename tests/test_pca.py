"""Tests for distill_jax.pca: parity with scikit-learn, invariants, streamed/sharded == one-shot, bad input."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA as SkPCA

from distill_jax.data import pca

SK_SOLVER = {"covariance": "covariance_eigh", "full": "full", "randomized": "full"}


def _spectrum_data(n=400, d=30, seed=0):
    """Data with a known, well-separated spectrum (std 10, 9, ..., then small noise) and an offset."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.concatenate([np.arange(10, 0, -1), np.full(d - 10, 0.1)])
    return (rng.normal(size=(n, d)) * scales @ q.T + 5.0).astype(np.float32)


def _digits():
    return load_digits().data.astype(np.float32)


def _assert_matches_sklearn(p, sk, x, *, k_check=None, rtol=1e-4):
    k = k_check or p.components.shape[0]
    # sign convention: largest-|loading| positive, like sklearn's svd_flip(u_based_decision=False)
    comps = np.asarray(p.components)[:k]
    np.testing.assert_array_less(0, comps[np.arange(k), np.abs(comps).argmax(1)])
    np.testing.assert_allclose(comps, sk.components_[:k], atol=2e-4)
    np.testing.assert_allclose(p.explained_variance[:k], sk.explained_variance_[:k], rtol=rtol)
    np.testing.assert_allclose(p.explained_variance_ratio[:k], sk.explained_variance_ratio_[:k], rtol=rtol)
    np.testing.assert_allclose(p.singular_values[:k], sk.singular_values_[:k], rtol=rtol)
    np.testing.assert_allclose(p.mean, sk.mean_, rtol=1e-5, atol=1e-5)
    scale = np.abs(sk.transform(x)).max()
    np.testing.assert_allclose(np.asarray(pca.transform(p, x))[:, :k], sk.transform(x)[:, :k], atol=1e-4 * scale)


@pytest.mark.parametrize("method", ["covariance", "full", "randomized"])
def test_parity_with_sklearn_random_data(method):
    x = _spectrum_data()
    p = pca.fit(x, 10, method=method, key=jax.random.PRNGKey(3))
    sk = SkPCA(10, svd_solver=SK_SOLVER[method]).fit(x.astype(np.float64))
    _assert_matches_sklearn(p, sk, x)


@pytest.mark.parametrize("method", ["covariance", "full", "randomized"])
def test_parity_with_sklearn_digits(method):
    x = _digits()
    p = pca.fit(x, 20, method=method, key=jax.random.PRNGKey(0))
    sk = SkPCA(20, svd_solver=SK_SOLVER[method]).fit(x.astype(np.float64))
    # digits' spectrum decays slowly: a randomized fit resolves its leading components exactly, not all 20
    _assert_matches_sklearn(p, sk, x, k_check=8 if method == "randomized" else None,
                            rtol=1e-3 if method == "randomized" else 1e-4)


def test_randomized_matches_sklearn_randomized_wide_data():
    # n < d exercises the transposed branch
    x = _spectrum_data(n=40, d=120, seed=2)
    p = pca.fit(x, 5, method="randomized", key=jax.random.PRNGKey(1))
    sk = SkPCA(5, svd_solver="randomized", random_state=0).fit(x.astype(np.float64))
    _assert_matches_sklearn(p, sk, x)


def test_auto_follows_sklearn_rule_and_agrees():
    assert pca.choose_method(10000, 784, 50) == "covariance"
    assert pca.choose_method(300, 200, 50) == "full"
    assert pca.choose_method(2000, 1500, 50) == "randomized"
    assert pca.choose_method(2000, 1500, 1400) == "full"
    x = _digits()
    a = pca.fit(x, 5)
    f = pca.fit(x, 5, method="full")
    np.testing.assert_allclose(a.components, f.components, atol=1e-4)


def test_whiten_and_inverse_transform():
    x = _spectrum_data()
    k = x.shape[1]
    p = pca.fit(x, k, whiten=True, method="full")
    z = np.asarray(pca.transform(p, x))
    np.testing.assert_allclose(np.cov(z.T), np.eye(k), atol=1e-3)  # whitened scores: identity covariance
    np.testing.assert_allclose(pca.inverse_transform(p, z), x, atol=1e-3)  # all components: exact round trip
    sk = SkPCA(k, whiten=True).fit(x.astype(np.float64))
    np.testing.assert_allclose(z, sk.transform(x), atol=1e-3)
    p5 = pca.fit(x, 5)
    recon = np.asarray(pca.inverse_transform(p5, pca.transform(p5, x)))
    sk5 = SkPCA(5).fit(x.astype(np.float64))
    np.testing.assert_allclose(recon, sk5.inverse_transform(sk5.transform(x)), atol=1e-3)


def test_orthonormal_components_and_ratios():
    x = _digits()
    p = pca.fit(x, 64, method="full")
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(64), atol=1e-4)
    np.testing.assert_allclose(float(p.explained_variance_ratio.sum()), 1.0, atol=1e-5)
    assert np.all(np.diff(np.asarray(p.explained_variance)) <= 1e-6)


def test_n_components_for():
    assert pca.n_components_for(np.array([0.5, 0.3, 0.15, 0.05]), 0.95) == 3
    assert pca.n_components_for(np.array([0.5, 0.3, 0.15, 0.05]), 0.5) == 1
    assert pca.n_components_for(np.array([0.5, 0.3, 0.15, 0.05]), 1.0) == 4
    p = pca.fit(_digits(), 64, method="full")
    sk = SkPCA(0.95, svd_solver="full").fit(_digits())
    assert pca.n_components_for(p, 0.95) == sk.n_components_
    with pytest.raises(ValueError, match="explain only"):
        pca.n_components_for(np.array([0.5, 0.3]), 0.95)
    with pytest.raises(ValueError, match="threshold"):
        pca.n_components_for(p, 1.5)


@pytest.mark.parametrize("method", ["covariance", "full", "randomized"])
def test_rank_deficient(method):
    # rank 3 in 12 dimensions: three nonzero variances, the rest ~0, reconstruction exact
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 12)) + 1.0).astype(np.float32)
    sk = SkPCA(3, svd_solver="full").fit(x.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # covariance warns about the unresolved null space
        p6 = pca.fit(x, 6, method=method, key=jax.random.PRNGKey(0))
    ev = np.asarray(p6.explained_variance)
    np.testing.assert_allclose(ev[:3], sk.explained_variance_, rtol=1e-4)
    assert np.all(ev[3:] <= 1e-4 * ev[0])
    p3 = pca.fit(x, 3, method=method, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(p3.components, sk.components_, atol=1e-4)
    np.testing.assert_allclose(pca.inverse_transform(p3, pca.transform(p3, x)), x, atol=1e-3)


def test_covariance_warns_on_unresolved_components():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 12))).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="does not resolve"):
        pca.fit(x, 6, method="covariance")


def test_warns_on_offset_dominated_data():
    x = (1e6 + np.random.default_rng(0).normal(size=(100, 5))).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="offset"):
        pca.fit(x, 2, method="full")


def test_float32_accuracy_with_offset():
    # a large offset would ruin an uncentred X^T X in float32 (catastrophic cancellation); centring first does not
    x = _spectrum_data() + 300.0
    p = pca.fit(x, 10, method="covariance")
    sk = SkPCA(10, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(p.explained_variance, sk.explained_variance_, rtol=1e-3)


@pytest.mark.parametrize("method", ["covariance", "full", "randomized"])
def test_jit_equals_eager(method):
    x = jnp.asarray(_spectrum_data(n=100, d=12))
    fit = jax.jit(pca.fit, static_argnames=("n_components", "method", "whiten"))
    pj = fit(x, 4, method=method, whiten=True)
    with jax.disable_jit():
        pe = pca.fit(x, 4, method=method, whiten=True)
        ze = pca.transform(pe, x)
    np.testing.assert_allclose(pj.components, pe.components, atol=1e-4)
    np.testing.assert_allclose(pj.explained_variance, pe.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(pca.transform(pj, x), ze, atol=1e-3)
    assert pj.whiten and pj.n_samples == 100


def test_streamed_fit_equals_one_shot():
    x = _spectrum_data(n=503) + 100.0
    one = pca.fit(x, 8, method="covariance")
    batches = (x[i:i + 64] for i in range(0, len(x), 64))  # ragged last batch, a generator (single pass)
    streamed = pca.fit_batches(batches, 8)
    np.testing.assert_allclose(streamed.components, one.components, atol=1e-4)
    np.testing.assert_allclose(streamed.explained_variance, one.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(streamed.explained_variance_ratio, one.explained_variance_ratio, rtol=1e-4)
    np.testing.assert_allclose(streamed.mean, one.mean, rtol=1e-6)
    assert streamed.n_samples == one.n_samples == 503


def test_merge_stats_hand_computed():
    a = pca.covariance_stats(jnp.array([[0.0], [2.0]]))
    b = pca.covariance_stats(jnp.array([[4.0]]))
    m = pca.merge_stats(a, b)  # 0, 2, 4: mean 2, scatter 8
    assert float(m.n) == 3
    np.testing.assert_allclose(m.mean, [2.0])
    np.testing.assert_allclose(m.m2, [[8.0]])


def test_sharded_fit_equals_single_device():
    assert jax.device_count() >= 4, "tests/conftest.py fakes 4 CPU devices"
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    x = _spectrum_data(n=400)
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    sharded = pca.fit_sharded(xs, 10, mesh=mesh)
    single = pca.fit(x, 10, method="covariance")
    np.testing.assert_allclose(sharded.components, single.components, atol=1e-5)
    np.testing.assert_allclose(sharded.explained_variance, single.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(sharded.mean, single.mean, rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        pca.fit_sharded(x[:401 - 4], 10, mesh=mesh)


def test_bad_inputs():
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"n_components=0 must be in \[1, min"):
        pca.fit(x, 0)
    with pytest.raises(ValueError, match=r"n_components=6 must be in \[1, min\(n_samples, n_features\)\] = \[1, 5\]"):
        pca.fit(x, 6)
    with pytest.raises(ValueError, match="must be an int"):
        pca.fit(x, 0.9)
    with pytest.raises(ValueError, match="2-D"):
        pca.fit(x.reshape(20, 5, 1), 2)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        pca.fit(bad, 2)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        pca.fit_batches([bad], 2)
    with pytest.raises(ValueError, match="method"):
        pca.fit(x, 2, method="svd")
    with pytest.raises(ValueError, match="empty"):
        pca.fit_batches([], 2)
    p = pca.fit(x, 2)
    with pytest.raises(ValueError, match="fitted on 5 features"):
        pca.transform(p, np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"z must be \[n, 2\]"):
        pca.inverse_transform(p, np.ones((3, 3), np.float32))


def test_covariance_blocked_scatter_path_matches_full():
    # d >= 256 takes the upper-triangle (3/4 multiply-adds) scatter; it must equal the plain SVD fit
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1200, 300)) * np.linspace(3, 0.1, 300)).astype(np.float32)
    c = pca.fit(x, 12, method="covariance")
    f = pca.fit(x, 12, method="full")
    np.testing.assert_allclose(c.components, f.components, atol=1e-4)
    np.testing.assert_allclose(c.explained_variance, f.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(c.explained_variance_ratio, f.explained_variance_ratio, rtol=1e-4)


def test_fits_compile_one_program_per_call_and_none_when_repeated():
    """Host data of shapes no other test uses: `fit` is one program; `fit_batches` one for a single batch,
    and one per batch shape plus the last batch's merge-and-fit for a stream."""
    from distill_jax.compilation import CompileCounter

    x = _spectrum_data(n=61, d=12)
    for call, programs in [
        (lambda: pca.fit(x, 3, method="covariance"), 1),
        (lambda: pca.fit(x.astype(np.int32), 3, method="full"), 1),
        (lambda: pca.fit_batches([x], 3), 1),
        (lambda: pca.fit_batches((x[i:i + 20] for i in range(0, 61, 20)), 3), 2),  # 20, 20, 20 | 1
    ]:
        with CompileCounter() as first:
            jax.block_until_ready(call())
        with CompileCounter() as again:
            jax.block_until_ready(call())
        assert (first.count, again.count) == (programs, 0)
    one = pca.fit(x, 3, method="covariance")
    for streamed in (pca.fit_batches([x], 3), pca.fit_batches((x[i:i + 20] for i in range(0, 61, 20)), 3)):
        np.testing.assert_allclose(streamed.components, one.components, atol=1e-5)
        np.testing.assert_allclose(streamed.explained_variance, one.explained_variance, rtol=1e-5)
        np.testing.assert_allclose(streamed.mean, one.mean, rtol=1e-6, atol=1e-6)


def test_fit_batches_names_the_batch_with_non_finite_values():
    x = _spectrum_data(n=60, d=11)
    bad = x.copy()
    bad[25, 1] = np.nan
    for i in range(3):  # the bad batch first, in the middle, last
        batches = [x[:20], x[20:40], x[40:]]
        batches[i] = bad[20:40]
        with pytest.raises(ValueError, match=f"batch {i} has 1 non-finite"):
            pca.fit_batches(batches, 2)
    with pytest.raises(ValueError, match="at least 2"):
        pca.fit_batches([x[:1], x[:0]], 1)
    with pytest.raises(ValueError, match="batch 1 has 4 features, earlier batches 11"):
        pca.fit_batches([x, x[:, :4]], 2)
