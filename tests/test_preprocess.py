"""Tests for distill_jax.preprocess: hand-computed statistics, round trips, zero variance, jit == eager."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.data import preprocess


def test_standardize_per_channel_hand_computed():
    # channel 0 holds 0,2 / 4,6 -> mean 3, std sqrt(5); channel 1 is constant 7 -> mean 7, std replaced by 1.
    x = np.zeros((2, 1, 2, 2), np.float32)
    x[..., 0] = [[[0, 2]], [[4, 6]]]
    x[..., 1] = 7.0
    s = preprocess.standardize_fit(x)
    assert s.mean.shape == (1, 1, 2)
    np.testing.assert_allclose(s.mean.ravel(), [3.0, 7.0], rtol=1e-6)
    np.testing.assert_allclose(s.std.ravel(), [np.sqrt(5.0), 1.0], rtol=1e-6)
    z = np.asarray(preprocess.apply(s, x))
    np.testing.assert_allclose(z[..., 0].ravel(), (np.array([0, 2, 4, 6]) - 3) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_array_equal(z[..., 1], 0.0)


def test_standardize_per_feature_matches_numpy_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (50, 4, 4, 1)).astype(np.float32)
    s = preprocess.standardize_fit(x, axis=0)
    assert s.mean.shape == (4, 4, 1)
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.std, x.std(0), rtol=1e-5)
    z = np.asarray(preprocess.apply(s, x))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(preprocess.invert(s, z), x, rtol=1e-5, atol=1e-5)


def test_zero_variance_offset_stays_finite():
    # A constant feature with a large offset: float32 rounding leaves a tiny nonzero "std" that must not blow up.
    x = np.full((1000, 3), 1234.567, np.float32)
    x[:, 0] = np.arange(1000)
    for fit in (preprocess.standardize_fit, preprocess.minmax_fit):
        z = np.asarray(preprocess.apply(fit(x), x))
        assert np.all(np.isfinite(z))
        # the float32 mean of 1000 copies is a few ulps off 1234.567, so "0" is a few ulps of the offset
        np.testing.assert_allclose(z[:, 1:], 0.0, atol=1e-3)


def test_minmax_hand_computed_and_inverse():
    x = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]], np.float32)
    m = preprocess.minmax_fit(x)
    np.testing.assert_allclose(m.min, [0.0, 5.0])
    np.testing.assert_allclose(m.scale, [4.0, 1.0])
    z = np.asarray(preprocess.apply(m, x))
    np.testing.assert_allclose(z, [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(preprocess.invert(m, z), x)


def test_jit_equals_eager_and_scalers_are_pytrees():
    x = np.random.default_rng(1).uniform(size=(8, 3, 3, 2)).astype(np.float32)
    s = preprocess.standardize_fit(x)
    assert len(jax.tree_util.tree_leaves(s)) == 2
    with jax.disable_jit():
        eager = np.asarray(preprocess.apply(s, x))
    np.testing.assert_allclose(jax.jit(preprocess.apply)(s, x), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda x: preprocess.standardize_fit(x).std)(x), s.std, rtol=1e-6)


def test_bad_inputs():
    x = np.ones((4, 3), np.float32)
    s = preprocess.standardize_fit(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(ValueError, match="does not match"):
        preprocess.apply(s, np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        preprocess.standardize_fit(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="batch axis 0"):
        preprocess.standardize_fit(x, axis=1)
    with pytest.raises(ValueError, match="scaler must be one of"):
        preprocess.apply({"mean": jnp.zeros(3)}, x)


def test_fit_is_one_compiled_program_from_host_integers():
    """uint8 host images (a shape no other test uses): one program per fit, none when repeated; same numbers as
    fitting their float32 values."""
    from distill_jax.compilation import CompileCounter

    x = np.random.default_rng(2).integers(0, 256, (6, 3, 5, 2)).astype(np.uint8)
    for fit in (preprocess.standardize_fit, preprocess.minmax_fit):
        with CompileCounter() as first:
            s = jax.block_until_ready(fit(x))
        with CompileCounter() as again:
            jax.block_until_ready(fit(x))
        assert (first.count, again.count) == (1, 0), fit.__name__
        ref = fit(x.astype(np.float32))
        for got, want in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    s = preprocess.standardize_fit(x, axis=(0, 1, 2))
    np.testing.assert_allclose(s.mean.ravel(), x.reshape(-1, 2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.std.ravel(), x.reshape(-1, 2).std(0), rtol=1e-5)
    with pytest.raises(ValueError, match="NaN or inf"):
        preprocess.minmax_fit(np.array([[1.0, np.inf], [2.0, 3.0]], np.float32))
