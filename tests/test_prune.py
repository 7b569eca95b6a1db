"""Gradual magnitude pruning: schedule, masks, exact zeros, and training to a target sparsity."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax.distill import prune


def test_schedule_is_cubic_between_begin_and_end():
    s = lambda t: float(prune.sparsity_schedule(t, final_sparsity=0.8, begin_step=10, end_step=20))
    assert s(0) == 0.0 and s(10) == 0.0 and s(20) == pytest.approx(0.8) and s(100) == pytest.approx(0.8)
    assert s(15) == pytest.approx(0.8 * (1 - 0.5**3))


def test_mask_prunes_the_smallest_magnitudes():
    w = jnp.array([[0.1, -3.0], [2.0, -0.2]])
    np.testing.assert_array_equal(prune.magnitude_mask(w, 0.5), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(prune.magnitude_mask(w, 0.0), jnp.ones((2, 2)))


def test_training_reaches_the_target_sparsity_and_biases_are_left_alone():
    key = jax.random.PRNGKey(0)
    params = {"kernel": jax.random.normal(key, (20, 10)), "bias": jnp.ones(10)}
    opt = optax.chain(optax.sgd(0.01), prune.magnitude_pruning(final_sparsity=0.9, begin_step=0, end_step=5))
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(jax.tree_util.tree_map(jnp.ones_like, p), s, p))
    for _ in range(8):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert prune.sparsity(params) == pytest.approx(0.9, abs=0.01)
    assert float(jnp.sum(params["bias"] == 0)) == 0


@pytest.mark.parametrize("kw", [dict(final_sparsity=1.0, begin_step=0, end_step=1),
                                dict(final_sparsity=0.5, begin_step=5, end_step=1)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError, match="need"):
        prune.magnitude_pruning(**kw)


def test_sparsity_hand_computed_on_host_without_compiling():
    from distill_jax.compilation import CompileCounter

    params = {"conv": {"kernel": jnp.asarray(np.array([[[0.0, 1.0], [0.0, 2.0]]])), "bias": jnp.zeros(2)},
              "dense": {"kernel": np.array([[0.0, 3.0, 4.0]])}, "scale": 0.0}
    with CompileCounter() as compiles:
        got = prune.sparsity(params)
    assert got == pytest.approx(3 / 7)  # kernels only: 2 zeros of 4 and 1 of 3; biases and scalars skipped
    assert compiles.count == 0
    assert prune.sparsity({"bias": jnp.zeros(3)}) == 0.0
