"""TrainState.extra with mutable collections (BatchNorm) and `fit` over iterables of batches."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import distill, models, parallel, train

N_CLASSES = 3


class BatchNormNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> dense; `train` switches BatchNorm to batch statistics (and updates them)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), use_bias=False)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
        return nn.Dense(N_CLASSES)(nn.relu(h).reshape(x.shape[0], -1))


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 2.0, size=(n, 6, 6, 1)).astype(np.float32)  # mean 1.5, var 4: the statistics move
    y = rng.integers(0, N_CLASSES, n).astype(np.int32)
    return x, y


def _bn_student():
    return models.as_student(BatchNormNet(), mutable=("batch_stats",), train_kwargs={"train": True})


def _hand_written_loop(variables, opt, batches):
    """The textbook optax loop for a BatchNorm model: new batch_stats from `mutable=`, CE mean, one update per batch."""
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = opt.init(params)
    model = BatchNormNet()

    def loss(p, s, xb, yb):
        logits, new = model.apply({"params": p, "batch_stats": s}, xb, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new["batch_stats"]

    for xb, yb in batches:
        (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, xb, yb)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, stats


class MutableCollections(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_batchnorm_statistics_equal_a_hand_written_optax_loop(self):
        x, y = _data()
        batches = [(jnp.asarray(x[i : i + 8]), jnp.asarray(y[i : i + 8])) for i in (0, 8, 16)]
        key, opt, cfg = jax.random.PRNGKey(0), optax.sgd(0.05, momentum=0.9), distill.MethodConfig()
        params, collections = distill.init_student(_bn_student(), "labels", cfg, key, jnp.asarray(x[:2]))
        assert sorted(collections) == ["batch_stats"]
        step = self.variant(train.train_step_fn(distill.make_loss_fn(_bn_student(), None, "labels", cfg, N_CLASSES),
                                                opt))
        state = train.create_state(params, opt, key=jax.random.PRNGKey(1), extra=collections)
        for xb, yb in batches:
            state, metrics = step(state, {"x": xb, "y": yb}, None)
        assert "mutable" not in metrics and int(state.step) == 3

        # the same init as init_student's (its model key is the first half of `key`)
        variables = BatchNormNet().init(jax.random.split(key)[0], jnp.asarray(x[:2]), train=True)
        want_params, want_stats = _hand_written_loop(variables, opt, batches)
        chex.assert_trees_all_close(state.extra["batch_stats"], want_stats, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(state.params["model"], want_params, rtol=1e-5, atol=1e-6)
        # the statistics really moved from their init (mean 0, var 1) towards the data's (1.5, 4)
        bn = state.extra["batch_stats"]["BatchNorm_0"]
        assert float(jnp.min(jnp.abs(bn["mean"]))) > 0.05 and float(jnp.max(jnp.abs(bn["var"] - 1))) > 0.05


def test_pca_collection_stays_untouched_and_nan_step_keeps_batch_stats():
    x, y = _data()
    cfg, opt = distill.MethodConfig(), optax.sgd(0.1)
    comps = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (36, 4)))[0].T
    extra = {"pca": {"mean": jnp.full(36, 0.5), "components": comps}}
    student = models.Linear(N_CLASSES, n_components=4)
    params = distill.init_trainable(student, "labels", cfg, jax.random.PRNGKey(0), x[:2], extra=extra)
    step = jax.jit(train.train_step_fn(distill.make_loss_fn(student, "linear", "labels", cfg, N_CLASSES), opt))
    state = train.create_state(params, opt, key=jax.random.PRNGKey(1), extra=extra)
    for _ in range(2):
        state, _ = step(state, {"x": x, "y": y}, None)
    chex.assert_trees_all_equal(jax.device_get(state.extra), jax.device_get(extra))
    assert float(jnp.max(jnp.abs(state.params["model"]["linear"]["kernel"] - params["model"]["linear"]["kernel"]))) > 0

    # a non-finite step leaves the BatchNorm statistics (and everything else) as they were
    params, collections = distill.init_student(_bn_student(), "labels", cfg, jax.random.PRNGKey(0), x[:2])
    step = jax.jit(train.train_step_fn(distill.make_loss_fn(_bn_student(), None, "labels", cfg, N_CLASSES), opt))
    state = train.create_state(params, opt, key=jax.random.PRNGKey(1), extra=collections)
    state, _ = step(state, {"x": x[:8], "y": y[:8]}, None)
    before = jax.device_get(state.extra)
    state, _ = step(state, {"x": np.full_like(x[:8], np.nan), "y": y[:8]}, None)
    assert int(state.first_bad_step) == 1 and int(state.step) == 1
    chex.assert_trees_all_equal(jax.device_get(state.extra), before)


def test_a_mutable_collection_the_state_lacks_is_refused():
    def loss_fn(params, extra, batch, teacher, key):
        return jnp.sum(params["w"] * batch["x"], -1), {"mutable": {"batch_stats": {"mean": jnp.zeros(2)}}}

    opt = optax.sgd(0.1)
    state = train.create_state({"w": jnp.ones(2)}, opt, key=jax.random.PRNGKey(0), extra={"pca": {"mean": jnp.zeros(2)}})
    with pytest.raises(ValueError, match=r"mutable collection\(s\) \['batch_stats'\] that state.extra lacks \(it has "
                                         r"\['pca'\]\)"):
        train.train_step_fn(loss_fn, opt)(state, {"x": jnp.ones((4, 2)), "y": jnp.zeros(4, jnp.int32)}, None)
    state = train.create_state({"w": jnp.ones(2)}, opt, key=jax.random.PRNGKey(0),
                               extra={"batch_stats": {"mean": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="mutable collection 'batch_stats' shaped"):
        train.train_step_fn(loss_fn, opt)(state, {"x": jnp.ones((4, 2)), "y": jnp.zeros(4, jnp.int32)}, None)


# --------------------------------------------------------------------------- fit over iterables


@pytest.fixture(scope="module")
def small_run():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, N_CLASSES, 32).astype(np.int32)
    model, cfg = models.SmallCNN(N_CLASSES), distill.MethodConfig()
    params = distill.init_trainable(model, "labels", cfg, jax.random.PRNGKey(0), jnp.asarray(x[:2]))
    opt = optax.sgd(0.1, momentum=0.9)
    mesh = parallel.make_mesh()  # 4 fake CPU devices: every batch is sharded as in the array path
    step = train.make_train_step(distill.make_loss_fn(model, "cnn", "labels", cfg, N_CLASSES), opt, mesh)
    fresh = lambda: train.create_state(params, opt, key=jax.random.PRNGKey(1))  # noqa: E731
    return x, y, mesh, step, fresh


def _same_batches(x, y, seed=0):
    """epoch -> the batches the array path draws (a stand-in for a data source read through an index sampler)."""
    return lambda epoch: ({"x": x[i], "y": y[i]} for i in train.epoch_batch_indices(len(y), 8, seed=seed, epoch=epoch))


def test_fit_over_an_iterable_ends_where_fit_over_arrays_ends(small_run):
    x, y, mesh, step, fresh = small_run
    cfg = train.FitConfig(epochs=2, batch_size=8, show_progress=False)
    arrays, hist_a = train.fit(fresh(), step, {"x": x, "y": y}, cfg, mesh=mesh)
    stream, hist_s = train.fit(fresh(), step, _same_batches(x, y), cfg, mesh=mesh)
    chex.assert_trees_all_equal(jax.device_get(stream.params), jax.device_get(arrays.params))
    assert [h["loss"] for h in hist_s] == [h["loss"] for h in hist_a] and len(hist_s) == 2
    # a re-iterable (here a list: the same order every epoch) and a one-shot generator for one epoch
    epoch0 = list(_same_batches(x, y)(0))
    once, _ = train.fit(fresh(), step, iter(epoch0), train.FitConfig(epochs=1, batch_size=8, show_progress=False),
                        mesh=mesh)
    listed, _ = train.fit(fresh(), step, epoch0, train.FitConfig(epochs=1, batch_size=8, show_progress=False),
                          mesh=mesh)
    arrays1, _ = train.fit(fresh(), step, {"x": x, "y": y}, train.FitConfig(epochs=1, batch_size=8,
                                                                            show_progress=False), mesh=mesh)
    for run in (once, listed):
        chex.assert_trees_all_equal(jax.device_get(run.params), jax.device_get(arrays1.params))
    assert float(jnp.max(jnp.abs(arrays1.params["model"]["head"]["bias"]))) > 0  # training moved the params


def test_resumed_fit_over_a_stream_ends_where_the_uninterrupted_one_ends(small_run):
    x, y, mesh, step, fresh = small_run
    cfg = train.FitConfig(epochs=2, batch_size=8, show_progress=False, checkpoint_every=5)
    saved = []
    full, _ = train.fit(fresh(), step, _same_batches(x, y), cfg, mesh=mesh,
                        save=lambda s: saved.append(jax.device_get(s)))
    mid = saved[0]
    assert int(mid.step) == 5  # mid-epoch 2: the first 5 batches are read and dropped
    resumed, hist = train.fit(jax.device_put(mid), step, _same_batches(x, y), cfg, mesh=mesh)
    chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(full.params))
    assert [h["epoch"] for h in hist] == [2]


def test_bad_streams_are_refused(small_run):
    x, y, mesh, step, fresh = small_run
    cfg = train.FitConfig(epochs=2, batch_size=8, show_progress=False)
    with pytest.raises(ValueError, match="data is a one-shot iterator, which can feed one epoch, not epochs=2"):
        train.fit(fresh(), step, iter([{"x": x[:8], "y": y[:8]}]), cfg, mesh=mesh)
    with pytest.raises(ValueError, match=r"batch 1 of epoch 0 has \{'x': 5, 'y': 5\} examples; every batch must be "
                                         r"a dict with 'x' and 'y' of 8 examples"):
        train.fit(fresh(), step, [{"x": x[:8], "y": y[:8]}, {"x": x[8:13], "y": y[8:13]}], cfg, mesh=mesh)
    with pytest.raises(ValueError, match="data gave no batches in epoch 0"):
        train.fit(fresh(), step, [], cfg, mesh=mesh)


def test_create_state_is_one_program_of_fresh_copies_equal_to_optimizer_init():
    from distill_jax.compilation import CompileCounter

    rng = np.random.default_rng(4)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3)).astype(np.float32)),
                        "bias": rng.normal(size=3).astype(np.float32)},  # a host leaf too
              "scale": jnp.asarray(rng.normal(size=(7,)).astype(np.float32))}
    extra = {"pca": {"mean": jnp.asarray(rng.normal(size=(5,)).astype(np.float32))}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(0.1, 10), weight_decay=0.1))
    key = jax.random.PRNGKey(3)
    with CompileCounter() as first:
        state = jax.block_until_ready(train.create_state(params, opt, key=key, extra=extra))
    with CompileCounter() as again:
        train.create_state(params, opt, key=key, extra=extra)
    assert (first.count, again.count) == (1, 0)
    assert int(state.step) == 0 and int(state.first_bad_step) == -1 and state.step.dtype == jnp.int32
    assert state.key is key
    chex.assert_trees_all_equal(state.params, params)
    chex.assert_trees_all_equal(state.extra, extra)
    chex.assert_trees_all_equal(state.opt_state, opt.init(params))
    for new, old in zip(jax.tree_util.tree_leaves((state.params, state.extra)), jax.tree_util.tree_leaves((params, extra))):
        assert isinstance(new, jax.Array)
        if isinstance(old, jax.Array):  # a donating train step must not delete the caller's arrays
            assert new.unsafe_buffer_pointer() != old.unsafe_buffer_pointer()
    assert train.create_state(params, opt, key=key).extra == {}
