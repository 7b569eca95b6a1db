"""Mesh, shardings, batch-size checks, padded evaluation, 1 vs 4 devices, distributed start-up arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import distill, models, parallel, train


def test_mesh_has_one_data_axis_over_every_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count() == 4


@pytest.mark.parametrize("size,message", [
    (6, "batch_size=6 must be a positive multiple of the 4 devices in the mesh; try 4 or 8"),
    (3, "batch_size=3 must be a positive multiple of the 4 devices in the mesh; try 4 or 8"),
    (0, "batch_size=0 must be a positive multiple of the 4 devices in the mesh; try 4 or 8"),
    (13, "batch_size=13 must be a positive multiple of the 4 devices in the mesh; try 12 or 16"),
])
def test_batch_size_errors_say_which_sizes_work(size, message):
    with pytest.raises(ValueError) as err:
        parallel.check_batch_size(size, parallel.make_mesh())
    assert str(err.value) == message


def test_batch_size_error_names_the_argument():
    with pytest.raises(ValueError, match=r"^eval batch_size=5 must be"):
        parallel.check_batch_size(5, parallel.make_mesh(), what="eval batch_size")
    parallel.check_batch_size(5, parallel.make_mesh(jax.devices()[:1]))  # one device: anything >= 1


def test_shard_batch_splits_rows_over_devices_and_gather_restores_them():
    mesh = parallel.make_mesh()
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    sharded = parallel.shard_batch({"x": x}, mesh)["x"]
    assert sharded.sharding.spec == jax.sharding.PartitionSpec("data")
    assert [s.data.shape for s in sharded.addressable_shards] == [(2, 3)] * 4
    np.testing.assert_array_equal(np.asarray(sharded.addressable_shards[1].data), x[2:4])
    np.testing.assert_array_equal(parallel.gather(sharded), x)


def test_replicate_copy_survives_a_donating_step():
    mesh = parallel.make_mesh()
    tree = {"a": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
    donate = jax.jit(lambda t: jax.tree_util.tree_map(lambda v: v + 1, t), donate_argnums=0,
                     in_shardings=parallel.replicated(mesh), out_shardings=parallel.replicated(mesh))
    out = donate(parallel.replicate(tree, mesh, copy=True))
    assert not any(v.is_deleted() for v in tree.values())
    np.testing.assert_array_equal(out["a"], 2.0)
    assert all(s.data.shape == (3,) for s in out["a"].addressable_shards) and len(out["a"].addressable_shards) == 4


def test_any_process_with_one_process_is_the_flag():
    assert parallel.any_process(True) is True and parallel.any_process(False) is False
    assert parallel.broadcast_from_main({"a": 1}) == {"a": 1}
    assert parallel.local_batch_size(64) == 64 and parallel.is_main_process()


def test_predict_covers_every_example_exactly_once_with_a_padded_last_batch():
    """10 examples, global batch 8 on 4 devices: one full batch and one padded to 8; jitted == plain apply."""
    w = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 10

    def apply_fn(variables, x):
        return x @ variables["w"]

    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    mesh = parallel.make_mesh()
    logits = train.predict(train.make_predict_fn(apply_fn, mesh), {"w": w}, x, batch_size=8, mesh=mesh)
    assert logits.shape == (10, 4)
    np.testing.assert_allclose(logits, apply_fn({"w": w}, x), rtol=1e-6)
    with pytest.raises(ValueError, match="eval batch_size=6 must be a positive multiple of the 4 devices"):
        train.predict(train.make_predict_fn(apply_fn, mesh), {"w": w}, x, batch_size=6, mesh=mesh)


def test_one_and_four_devices_give_the_same_losses_within_1e5():
    """Two epochs of `fit` with an identical data order: per-epoch losses and parameters agree."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)
    model = models.SmallCNN(3)
    cfg = distill.MethodConfig()
    params = distill.init_trainable(model, "labels", cfg, jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    loss_fn = distill.make_loss_fn(model, "cnn", "labels", cfg, 3)
    opt = optax.adam(1e-2)
    out = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        mesh = parallel.make_mesh(devices)
        state = train.create_state(params, opt, key=jax.random.PRNGKey(1))
        state, history = train.fit(state, train.make_train_step(loss_fn, opt, mesh), {"x": x, "y": y},
                                   train.FitConfig(epochs=2, batch_size=16, show_progress=False), mesh=mesh)
        out.append(([h["loss"] for h in history], jax.device_get(state.params)))
    (loss1, p1), (loss4, p4) = out
    np.testing.assert_allclose(loss1, loss4, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_initialize_distributed_needs_nothing_on_one_machine(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False


def test_initialize_distributed_rejects_a_coordinator_without_process_numbers(monkeypatch):
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="--coordinator needs --num-processes and --process-id"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="--coordinator needs"):
        parallel.initialize_distributed()
