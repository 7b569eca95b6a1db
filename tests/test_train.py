"""Train steps: sharded == single device, no retracing, NaN guard, batch-size errors, deterministic order."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import distill, models, parallel, train


def _setup(num_classes=3, n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    model = models.SmallCNN(num_classes)
    cfg = distill.MethodConfig()
    params = distill.init_trainable(model, "labels", cfg, jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    loss_fn = distill.make_loss_fn(model, "cnn", "labels", cfg, num_classes)
    opt = optax.sgd(0.1, momentum=0.9)
    return x, y, model, params, loss_fn, opt


def test_sharded_step_equals_single_device_step():
    x, y, _, params, loss_fn, opt = _setup()
    batch = {"x": x[:8], "y": y[:8]}
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        mesh = parallel.make_mesh(devices)
        state = train.create_state(params, opt, key=jax.random.PRNGKey(1))
        step = train.make_train_step(loss_fn, opt, mesh)
        for _ in range(3):
            state, m = step(state, parallel.shard_batch(batch, mesh), None)
        results.append((float(m["loss"]), jax.device_get(state.params)))
    assert len(jax.devices()) >= 4
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_jitted_and_unjitted_steps_apply_the_hand_computed_sgd_momentum_update():
    """Two steps of SGD with momentum 0.9, lr 0.1: p1 = p0 - lr*g0, p2 = p1 - lr*(g1 + 0.9*g0).

    The gradients g come from jax.grad of the batch-mean loss alone (no optax), so a step that
    skipped, scaled or mis-signed the update would fail here (the loss is computed before the update).
    """
    x, y, _, params, loss_fn, opt = _setup()
    batch = {"x": jnp.asarray(x[:8]), "y": jnp.asarray(y[:8])}
    key = jax.random.PRNGKey(1)
    lr, momentum = 0.1, 0.9

    def grad_at(p, step):
        step_key = jax.random.fold_in(key, step)
        return jax.grad(lambda q: jnp.mean(loss_fn(q, {}, batch, None, step_key)[0]))(p)

    g0 = grad_at(params, 0)
    p1 = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, g0)
    g1 = grad_at(p1, 1)
    p2 = jax.tree_util.tree_map(lambda p, a, b: p - lr * (b + momentum * a), p1, g0, g1)
    expected_loss0 = float(jnp.mean(loss_fn(params, {}, batch, None, jax.random.fold_in(key, 0))[0]))

    mesh = parallel.make_mesh(jax.devices()[:1])
    for step in (train.train_step_fn(loss_fn, opt), train.make_train_step(loss_fn, opt, mesh)):
        state = train.create_state(params, opt, key=key)
        state, m0 = step(state, batch, None)
        np.testing.assert_allclose(float(m0["loss"]), expected_loss0, rtol=1e-6)
        for want, got in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(jax.device_get(state.params))):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        state, _ = step(state, batch, None)
        assert int(state.step) == 2
        for want, got in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(jax.device_get(state.params))):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert any(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree_util.tree_leaves(g0))  # the update is not ~0


def test_step_compiles_once_across_steps():
    x, y, _, params, loss_fn, opt = _setup()
    traces = []

    def counting_loss(*args):
        traces.append(1)
        return loss_fn(*args)

    mesh = parallel.make_mesh()
    step = train.make_train_step(counting_loss, opt, mesh)
    state = train.create_state(params, opt, key=jax.random.PRNGKey(1))
    cfg = train.FitConfig(epochs=2, batch_size=8, show_progress=False)
    state, hist = train.fit(state, step, {"x": x, "y": y}, cfg, mesh=mesh)
    assert int(state.step) == 8 and len(hist) == 2
    assert len(traces) == 1


def test_nan_guard_keeps_last_good_params_and_names_the_step():
    x, y, _, params, loss_fn, opt = _setup()
    x = x.copy()
    x[20:] = np.nan  # batches drawing these rows make the loss NaN
    mesh = parallel.make_mesh()
    state = train.create_state(params, opt, key=jax.random.PRNGKey(1))
    step = train.make_train_step(loss_fn, opt, mesh)
    saved = []
    with pytest.raises(train.NonFiniteError, match=r"non-finite at step \d+"):
        train.fit(state, step, {"x": x, "y": y}, train.FitConfig(epochs=1, batch_size=8, show_progress=False),
                  mesh=mesh, save=saved.append)
    assert saved and all(np.isfinite(l).all() for l in jax.tree_util.tree_leaves(jax.device_get(saved[-1].params)))


def test_batch_size_must_divide_device_count():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of the 4 devices in the mesh; try 4 or 8"):
        parallel.check_batch_size(6, mesh)
    parallel.check_batch_size(8, mesh)


def test_epoch_order_is_deterministic_and_covers_distinct_examples():
    a = train.epoch_batch_indices(10, 3, seed=1, epoch=2)
    b = train.epoch_batch_indices(10, 3, seed=1, epoch=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 3) and len(set(a.ravel())) == 9
    assert not np.array_equal(a, train.epoch_batch_indices(10, 3, seed=1, epoch=3))
    with pytest.raises(ValueError, match="batch_size must be in"):
        train.epoch_batch_indices(10, 11, seed=0, epoch=0)


def test_resumed_fit_ends_bitwise_where_an_uninterrupted_fit_ends():
    x, y, _, params, loss_fn, opt = _setup()
    mesh = parallel.make_mesh()
    step = train.make_train_step(loss_fn, opt, mesh)
    data = {"x": x, "y": y}
    full, _ = train.fit(train.create_state(params, opt, key=jax.random.PRNGKey(1)), step, data,
                        train.FitConfig(epochs=3, batch_size=8, show_progress=False), mesh=mesh)
    saved = []
    part, _ = train.fit(train.create_state(params, opt, key=jax.random.PRNGKey(1)), step, data,
                        train.FitConfig(epochs=3, batch_size=8, show_progress=False, checkpoint_every=5),
                        mesh=mesh, save=lambda s: saved.append(jax.device_get(s)))
    mid = saved[0]  # the state after step 5, mid-epoch 2
    assert int(mid.step) == 5
    resumed, _ = train.fit(jax.device_put(mid), step, data,
                           train.FitConfig(epochs=3, batch_size=8, show_progress=False), mesh=mesh)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(full.params)),
                    jax.tree_util.tree_leaves(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(a, b)


def test_make_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="optimizer 'lion' is not known"):
        train.make_optimizer("lion", learning_rate=0.1, total_steps=10)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        train.make_optimizer("sgd", learning_rate=0.0, total_steps=10)
