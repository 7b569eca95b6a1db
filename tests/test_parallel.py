"""Mesh, shardings, batch-size checks, padded evaluation, 1 vs 4 devices, distributed start-up arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import audit, distill, models, parallel, train


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


def test_initialize_distributed_twice_starts_the_runtime_once(monkeypatch):
    """A script that started jax.distributed, then the CLI asking again (with SLURM variables set): no second start."""
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    assert parallel.initialize_distributed() is True and len(calls) == 1
    assert parallel.initialize_distributed() is True and len(calls) == 1


def test_mesh_is_built_by_make_mesh_with_auto_axis():
    mesh = parallel.make_mesh()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert set(mesh.devices.flat) == set(jax.devices())


def test_initialize_distributed_rejects_a_coordinator_without_process_numbers(monkeypatch):
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="--coordinator needs --num-processes and --process-id"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="--coordinator needs"):
        parallel.initialize_distributed()


# --------------------------------------------------------------------------- placed once, sharded everywhere


def _no_implicit_transfers():
    """Every transfer must be explicit: device_put to the devices, device_get back (`jax.transfer_guard`)."""
    return jax.transfer_guard("disallow")


def test_training_with_a_live_teacher_on_4_devices_makes_no_implicit_transfer():
    """The teacher's host variables are placed on the mesh once by `fit`, not sent with every step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    teacher, student = models.SmallCNN(3), models.SmallCNN(3)
    t_vars = jax.device_get(teacher.init(jax.random.PRNGKey(5), jnp.asarray(x[:2])))  # host numpy, as from a checkpoint
    cfg = distill.MethodConfig()
    params = distill.init_trainable(student, "kd+attention", cfg, jax.random.PRNGKey(0), jnp.asarray(x[:2]),
                                    teacher, t_vars)
    loss_fn = distill.make_loss_fn(student, "cnn", "kd+attention", cfg, 3, teacher)
    opt = optax.adam(1e-2)
    mesh = parallel.make_mesh()
    state = train.create_state(params, opt, key=jax.random.PRNGKey(1))
    step = train.make_train_step(loss_fn, opt, mesh)
    with _no_implicit_transfers():
        state, history = train.fit(state, step, {"x": x, "y": y}, train.FitConfig(epochs=2, batch_size=8,
                                   show_progress=False), mesh=mesh, teacher=t_vars)
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    batch = parallel.shard_batch({"x": x[:8], "y": y[:8]}, mesh)
    with pytest.raises(Exception, match="host-to-device transfer"):  # the guard is live: a raw numpy teacher fails
        with _no_implicit_transfers():
            step(state, batch, t_vars)


def test_predict_places_host_variables_once():
    mesh = parallel.make_mesh()
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    with _no_implicit_transfers():
        logits = train.predict(train.make_predict_fn(lambda v, z: z @ v["w"], mesh), {"w": w}, x, batch_size=8,
                               mesh=mesh)
    np.testing.assert_allclose(logits, x @ w, rtol=1e-6)


def test_teacher_cache_splits_batches_over_the_local_devices_and_equals_one_device():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(19, 8, 8, 1)).astype(np.float32)  # 19: the last batch is padded to the devices
    y = rng.integers(0, 3, 19).astype(np.int32)
    teacher = models.SmallCNN(3)
    t_vars = jax.device_get(teacher.init(jax.random.PRNGKey(5), jnp.asarray(x[:2])))
    needs = distill.method_needs("kd+attention", distill.MethodConfig())
    mesh = parallel.local_mesh()
    with _no_implicit_transfers():
        sharded = distill.cache_teacher_outputs(teacher, t_vars, x, y, needs, batch_size=6, mesh=mesh)
    plain = distill.cache_teacher_outputs(teacher, t_vars, x, y, needs, batch_size=6)
    assert sorted(sharded) == sorted(plain)
    for k in plain:
        np.testing.assert_allclose(sharded[k], plain[k], rtol=1e-5, atol=1e-6)
    fn, placed, batch = distill.teacher_outputs_fn(teacher, t_vars, needs, lambda v: v, mesh, 6)
    assert batch == 8  # rounded up to a multiple of the 4 devices
    out = fn(placed, *jax.device_put((x[:8], y[:8]), parallel.data_sharding(mesh)))
    assert all(len(v.sharding.device_set) == 4 and v.sharding.spec == jax.sharding.PartitionSpec("data")
               for v in out.values())


def test_audit_kernels_run_split_over_the_devices_and_match_one_device():
    from distill_jax import models

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 8, 8, 1)).astype(np.float32))
    target = jnp.asarray(rng.integers(0, 3, 8).astype(np.int32))
    model = models.SmallCNN(3)
    variables = model.init(jax.random.PRNGKey(0), x[:2])
    mesh = parallel.local_mesh()
    xs, ts = parallel.place_batch((x, target), mesh)
    assert xs.sharding.spec == jax.sharding.PartitionSpec("data") and len(xs.sharding.device_set) == 4
    placed = parallel.replicate(variables, mesh)
    kw = dict(methods=("saliency", "integrated_gradients", "grad_cam"), ig_steps=4, smoothgrad_samples=2,
              key=jax.random.PRNGKey(0))
    sharded = audit.attribution_maps(model, placed, xs, ts, **kw)
    plain = audit.attribution_maps(model, variables, x, target, **kw)
    for method in plain:
        np.testing.assert_allclose(sharded[method], plain[method], rtol=1e-4, atol=1e-6)
    odd = parallel.place_batch(np.zeros((10, 3), np.float32), mesh)  # 10 rows on 4 devices: replicated
    assert odd.sharding.spec == jax.sharding.PartitionSpec()
