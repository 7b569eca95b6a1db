"""Checkpoints: bitwise round trip, keep-last-K, corrupt newest -> previous, architecture mismatch, NaN stop."""
import logging
import re
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import checkpoint, distill, models, parallel, train


def _state(seed=0, num_classes=3):
    model = models.SmallCNN(num_classes)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 6, 6, 1)), jnp.float32)
    params = distill.init_trainable(model, "labels", distill.MethodConfig(), jax.random.PRNGKey(seed), x)
    opt = optax.adam(1e-2)
    return train.create_state(params, opt, key=jax.random.PRNGKey(seed + 1)), opt, model


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(jax.device_get(a)), jax.tree_util.tree_leaves(jax.device_get(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(x) if _is_key(x) else x),
                                      np.asarray(jax.random.key_data(y) if _is_key(y) else y))


def _is_key(x):
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _with_step(state, step):
    return state.replace(step=jnp.asarray(step, jnp.int32),
                         params=jax.tree_util.tree_map(lambda p: p + step, state.params))


def test_save_and_restore_latest_round_trips_bitwise_and_keeps_the_last_k(tmp_path):
    state, _, _ = _state()
    manager = checkpoint.state_manager(str(tmp_path / "rel" / ".." / "state"), max_to_keep=2)
    assert os.path.isabs(str(manager.directory))
    for step in (3, 6, 9):
        checkpoint.save_state(manager, _with_step(state, step))
    checkpoint.save_state(manager, _with_step(state, 9))  # the same step twice: skipped, no error
    assert sorted(manager.all_steps()) == [6, 9]
    restored = checkpoint.restore_latest(manager, state)
    assert int(restored.step) == 9
    _leaves_equal(restored, _with_step(state, 9))


def test_restore_latest_is_none_without_checkpoints(tmp_path):
    state, _, _ = _state()
    assert checkpoint.restore_latest(checkpoint.state_manager(str(tmp_path)), state) is None


def _corrupt(step_dir):
    """Overwrites every array-data file of a saved step with garbage of the same size."""
    hit = 0
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
                continue
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(b"\x5a" * max(size, 8))
            hit += 1
    assert hit


def test_corrupt_newest_checkpoint_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    state, _, _ = _state()
    manager = checkpoint.state_manager(str(tmp_path), max_to_keep=3)
    for step in (5, 10):
        checkpoint.save_state(manager, _with_step(state, step))
    _corrupt(tmp_path / "10")
    fresh = checkpoint.state_manager(str(tmp_path), max_to_keep=3)  # a new process would open it anew
    with caplog.at_level(logging.WARNING, logger="distill_jax.checkpoint"):
        restored = checkpoint.restore_latest(fresh, state)
    assert int(restored.step) == 5
    _leaves_equal(restored, _with_step(state, 5))
    bad = [r.getMessage() for r in caplog.records if r.name == "distill_jax.checkpoint"]
    assert len(bad) == 1 and "checkpoint at step 10" in bad[0] and "unreadable" in bad[0], bad


def test_every_checkpoint_corrupt_gives_none_and_names_each_step(tmp_path, caplog):
    state, _, _ = _state()
    manager = checkpoint.state_manager(str(tmp_path), max_to_keep=3)
    for step in (1, 2):
        checkpoint.save_state(manager, _with_step(state, step))
        _corrupt(tmp_path / str(step))
    with caplog.at_level(logging.WARNING, logger="distill_jax.checkpoint"):
        assert checkpoint.restore_latest(checkpoint.state_manager(str(tmp_path)), state) is None
    text = caplog.text
    assert "step 2" in text and "step 1" in text


def test_load_variables_round_trip_and_architecture_mismatch_names_the_parameter(tmp_path):
    x = jnp.zeros((1, 8, 8, 1))
    small = models.SmallCNN(10).init(jax.random.PRNGKey(0), x)
    path = checkpoint.save_variables(str(tmp_path / "teacher"), jax.device_get(small))
    _leaves_equal(checkpoint.load_variables(path, small), small)
    # same names, other shapes: 3 classes instead of 10
    other_classes = models.SmallCNN(3).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=re.escape("another architecture: parameter ['params']['head']['bias'] has "
                                                   "shape (10,) there and (3,) in this model")):
        checkpoint.load_variables(path, other_classes)
    # another architecture altogether: its parameter names are not in the checkpoint
    seed_cnn = models.SeedCNN(10).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"another architecture: parameter \[.+\] is (missing from the checkpoint|"
                                         r"not in this model)"):
        checkpoint.load_variables(path, seed_cnn)
    with pytest.raises(FileNotFoundError, match="no saved model at"):
        checkpoint.load_variables(str(tmp_path / "nothing"), small)


def test_nan_stop_saves_the_state_just_before_the_bad_step(tmp_path):
    """The saved state equals an uninterrupted run of exactly `bad` steps, and resuming from it is clean."""
    state, opt, model = _state()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    x_bad = x.copy()
    x_bad[24:] = np.nan
    loss_fn = distill.make_loss_fn(model, "cnn", "labels", distill.MethodConfig(), 3)
    mesh = parallel.make_mesh()
    step = train.make_train_step(loss_fn, opt, mesh)
    manager = checkpoint.state_manager(str(tmp_path), max_to_keep=5)
    cfg = train.FitConfig(epochs=2, batch_size=8, show_progress=False)
    with pytest.raises(train.NonFiniteError, match=r"non-finite at step (\d+)") as err:
        train.fit(state, step, {"x": x_bad, "y": y}, cfg, mesh=mesh,
                  save=lambda s: checkpoint.save_state(manager, s))
    bad = int(err.value.args[0].split("non-finite at step ")[1].split(";")[0])
    saved = checkpoint.restore_latest(manager, state)
    assert int(saved.step) == bad and int(saved.first_bad_step) == -1
    # the same batches with finite rows, stopped after `bad` steps, give the same parameters
    good_order = [train.epoch_batch_indices(32, 8, seed=0, epoch=e) for e in range(2)]
    ref = parallel.replicate(state, mesh)
    for idx in np.concatenate(good_order)[:bad]:
        ref, _ = step(ref, parallel.shard_batch({"x": x_bad[idx], "y": y[idx]}, mesh), None)
    _leaves_equal(saved.params, ref.params)
    for leaf in jax.tree_util.tree_leaves(jax.device_get(saved.params)):
        assert np.isfinite(leaf).all()
