"""Checkpoints: bitwise round trip, keep-last-K, corrupt or mismatched checkpoints refused untouched, NaN stop."""
import os
import re

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


def _snapshot(directory):
    """Every file under `directory` with its bytes: what must stay as it was after a refused resume or save."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_corrupt_newest_checkpoint_is_refused_naming_its_step_and_nothing_changes(tmp_path):
    state, _, _ = _state()
    manager = checkpoint.state_manager(str(tmp_path), max_to_keep=3)
    for step in (5, 10):
        checkpoint.save_state(manager, _with_step(state, step))
    _corrupt(tmp_path / "10")
    before = _snapshot(tmp_path)
    fresh = checkpoint.state_manager(str(tmp_path), max_to_keep=3)  # a new process would open it anew
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"checkpoint at step 10 in .* cannot be read .*nothing was "
                                                           r"changed: move .*10 away to resume from step 5") as err:
        checkpoint.restore_latest(fresh, state)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before
    # once the user moves the damaged step away, the previous one restores bitwise
    os.rename(tmp_path / "10", tmp_path.parent / "moved_away_10")
    restored = checkpoint.restore_latest(checkpoint.state_manager(str(tmp_path), max_to_keep=3), state)
    assert int(restored.step) == 5
    _leaves_equal(restored, _with_step(state, 5))


def test_a_single_corrupt_checkpoint_is_refused_too(tmp_path):
    state, _, _ = _state()
    checkpoint.save_state(checkpoint.state_manager(str(tmp_path)), _with_step(state, 3))
    _corrupt(tmp_path / "3")
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"step 3 .* move .*3 away to train this model again"):
        checkpoint.restore_latest(checkpoint.state_manager(str(tmp_path)), state)


def test_resume_with_another_configuration_names_the_differing_parameters_and_changes_nothing(tmp_path):
    """A checkpoint of a 3-class model restored into a 5-class one: refused, never a silent fresh start."""
    state, _, _ = _state(num_classes=3)
    manager = checkpoint.state_manager(str(tmp_path))
    checkpoint.save_state(manager, _with_step(state, 4))
    before = _snapshot(tmp_path)
    other, _, _ = _state(num_classes=5)
    with pytest.raises(checkpoint.CheckpointMismatch) as err:
        checkpoint.restore_latest(checkpoint.state_manager(str(tmp_path)), other)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert f"the checkpoint in {tmp_path} (step 4) was saved by another configuration" in message
    # the model's own parameters come first, with both shapes, then a count of the rest (optimizer moments)
    assert message.index("['params']['model']['head']['bias'] has shape (3,) there and (5,) in this model") < \
        message.index("['params']['model']['head']['kernel'] has shape")
    assert re.search(r"; and \d+ more\. Nothing was changed: resume with the configuration it was saved with, or run "
                     r"this one in another --workdir", message), message
    assert _snapshot(tmp_path) == before


def test_restore_names_a_parameter_the_checkpoint_lacks(tmp_path):
    state, _, _ = _state()
    checkpoint.save_state(checkpoint.state_manager(str(tmp_path)), state)
    grown = state.replace(params={"model": {**state.params["model"], "extra": {"w": jnp.zeros(2)}}})
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=re.escape("parameter ['params']['model']['extra']['w'] is missing from the checkpoint")):
        checkpoint.restore_latest(checkpoint.state_manager(str(tmp_path)), grown)


def test_saving_over_a_step_that_holds_another_run_is_refused(tmp_path):
    """Before: the save was skipped silently, so the old run's state stayed under the new run's step."""
    state, _, _ = _state()
    manager = checkpoint.state_manager(str(tmp_path))
    checkpoint.save_state(manager, _with_step(state, 7))
    checkpoint.save_state(manager, _with_step(state, 7))  # the very same state again: nothing to do
    before = _snapshot(tmp_path)
    other_run, _, _ = _state(seed=1)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"step 7 in .* already holds another train state "
                                                            r"\(\['params'\].*differs\)"):
        checkpoint.save_state(manager, _with_step(other_run, 7))
    assert _snapshot(tmp_path) == before


def test_a_file_where_the_checkpoint_directory_should_be_is_refused(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointCorrupt, match="checkpoint directory .*state cannot be used"):
        checkpoint.state_manager(str(blocker))
    assert blocker.read_text() == "not a directory"


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
    _corrupt(path)
    with pytest.raises(checkpoint.CheckpointCorrupt, match="the model saved at .* cannot be read"):
        checkpoint.load_variables(path, small)


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
