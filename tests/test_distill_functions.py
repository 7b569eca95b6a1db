"""Distillation over functions: teachers as `x -> logits` functions, students as (init_fn, apply_fn) pairs, `distill`."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import distill, models, train

N_CLASSES = 4


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, N_CLASSES, 16).astype(np.int32))
    teacher = models.SmallCNN(N_CLASSES)
    t_vars = teacher.init(jax.random.PRNGKey(9), x[:2])
    return x, y, teacher, t_vars


def test_as_teacher_brings_every_form_to_logits_and_features(setup):
    x, _, teacher, t_vars = setup
    want_logits, want_feats = teacher.apply(t_vars, x, return_features=True)
    forms = {
        "linen module": models.as_teacher(teacher, t_vars),
        "x -> (logits, features)": models.as_teacher(lambda z: teacher.apply(t_vars, z, return_features=True)),
        "(variables, x) -> (logits, features)": models.as_teacher(
            lambda v, z: teacher.apply(v, z, return_features=True), t_vars),
    }
    for name, t in forms.items():
        logits, feats = t.apply(t.variables, x)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6, err_msg=name)
        assert sorted(feats) == ["conv1", "conv2", "dense1"], name
        np.testing.assert_allclose(feats["conv2"], want_feats["conv2"], rtol=1e-5, atol=1e-6, err_msg=name)
    logits, feats = models.as_teacher(lambda z: teacher.apply(t_vars, z)).apply(None, x)  # logits only
    np.testing.assert_allclose(logits, want_logits, rtol=1e-6)
    assert feats == {}
    with pytest.raises(ValueError, match=r"teacher <lambda> must return logits \[batch, classes\] or \(logits, "
                                         r"\{name: features\}\); got dict"):
        models.as_teacher(lambda z: {"logits": z}).apply(None, x)
    with pytest.raises(ValueError, match="teacher must be a flax linen module, a function x -> logits .*; got int"):
        models.as_teacher(3)


class FunctionsGiveTheLinenLoss(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_function_teacher_and_pair_student_give_the_linen_loss_and_gradient(self):
        """kd + attention + hint (hint regressors included): a plain-function teacher, closed over or with its
        variables as the step argument, and an (init_fn, apply_fn) student give the loss and gradient of the
        linen modules themselves."""
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(8, 8, 8, 1)).astype(np.float32))
        batch = {"x": x, "y": jnp.asarray(rng.integers(0, N_CLASSES, 8).astype(np.int32))}
        teacher, student = models.SmallCNN(N_CLASSES), models.SmallCNN(N_CLASSES, conv_features=(8, 16))
        t_vars = teacher.init(jax.random.PRNGKey(9), x[:2])
        cfg, method, key = distill.MethodConfig(), "kd+0.5*attention+hint", jax.random.PRNGKey(1)

        def value_and_grad(loss_fn, params, teacher_arg):
            return self.variant(lambda p, t: jax.value_and_grad(
                lambda q: jnp.mean(loss_fn(q, {}, batch, t, None)[0]))(p))(params, teacher_arg)

        params = distill.init_trainable(student, method, cfg, key, x[:2], teacher, t_vars)
        want = value_and_grad(distill.make_loss_fn(student, "cnn", method, cfg, N_CLASSES, teacher), params, t_vars)

        pair = (lambda k, z: student.init(k, z)["params"],
                lambda p, z: student.apply({"params": p}, z, return_features=True))
        as_step_argument = models.as_teacher(lambda v, z: teacher.apply(v, z, return_features=True), t_vars)
        closed_over = lambda z: teacher.apply(t_vars, z, return_features=True)  # noqa: E731
        for t, t_arg in ((as_step_argument, t_vars), (closed_over, None)):
            fn_params = distill.init_trainable(pair, method, cfg, key, x[:2], t, None)
            chex.assert_trees_all_equal(fn_params, params)  # same keys: the same init, hint regressors included
            got = value_and_grad(distill.make_loss_fn(pair, None, method, cfg, N_CLASSES, t), fn_params, t_arg)
            chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
        assert float(want[0]) > 0 and float(jnp.max(jnp.abs(want[1]["aux"]["hint"]["conv2->conv2"]["proj"]["kernel"]))) > 0


def test_kind_comes_from_the_model_and_selects_the_tree_objective(setup):
    x, y, teacher, t_vars = setup
    tree = models.SoftDecisionTree(2, N_CLASSES)
    assert models.as_student(tree).kind == "tree" and models.as_student(models.Linear(N_CLASSES, 4)).kind == "linear"
    assert models.as_student((tree.init, tree.apply)).kind == "network"
    assert models.as_student((tree.init, tree.apply), kind="tree").kind == "tree"
    cfg = distill.MethodConfig(tree_balance=0.0)
    params = distill.init_trainable(tree, "kd", cfg, jax.random.PRNGKey(0), x[:2], teacher, t_vars)
    batch = {"x": x, "y": y}
    inferred = distill.make_loss_fn(tree, None, "kd", cfg, N_CLASSES, teacher)(params, {}, batch, t_vars, None)[0]
    as_network = distill.make_loss_fn(tree, "network", "kd", cfg, N_CLASSES, teacher)(params, {}, batch, t_vars, None)[0]
    # the tree objective by hand: alpha * soft_tree_kd_loss + (1 - alpha) * leaf cross entropy with the labels
    _, f = tree.apply({"params": params["model"]}, x, return_features=True)
    t_logits = teacher.apply(t_vars, x)
    soft = distill.losses.soft_tree_kd_loss(f["path_probs"], f["leaf_logits"], t_logits, temperature=cfg.temperature)
    hard = distill.losses.soft_tree_loss(f["path_probs"], f["leaf_logits"], jax.nn.one_hot(y, N_CLASSES))
    np.testing.assert_allclose(inferred, cfg.alpha * soft + (1 - cfg.alpha) * hard, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(inferred - as_network))) > 1e-3  # the network form differs: the kind matters


def test_distill_equals_a_hand_written_kd_loop():
    """`distill` with a pair student and a function teacher (cached once, as it is by default) ends at the params
    of a plain optax loop over the same batches, KD written out: alpha T^2 KL(t_T || s_T) + (1 - alpha) CE."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2, 2, 1)).astype(np.float32)
    w_teacher = rng.normal(size=(4, 3)).astype(np.float32)
    teacher = lambda z: 2.0 * z.reshape(z.shape[0], -1) @ w_teacher  # noqa: E731
    y = np.asarray(teacher(x)).argmax(-1).astype(np.int32)
    w0 = {"w": jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32) * 0.1), "b": jnp.zeros(3)}
    pair = (lambda key, z: w0, lambda p, z: z.reshape(z.shape[0], -1) @ p["w"] + p["b"])
    temperature, alpha, opt = 2.0, 0.7, optax.adam(0.05)
    got = distill.distill(pair, teacher, x, y, key=jax.random.PRNGKey(0), method="kd", temperature=temperature,
                          alpha=alpha, epochs=2, batch_size=8, optimizer=opt, seed=3)

    def kd(p, xb, yb):
        s, t = pair[1](p, xb) / temperature, teacher(xb) / temperature
        kl = jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)), -1)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(pair[1](p, xb)), yb[:, None], 1)[:, 0]
        return jnp.mean(alpha * temperature**2 * kl + (1 - alpha) * ce)

    params, opt_state = w0, opt.init(w0)
    for epoch in range(2):
        for idx in train.epoch_batch_indices(40, 8, seed=3, epoch=epoch):
            updates, opt_state = opt.update(jax.grad(kd)(params, x[idx], y[idx]), opt_state, params)
            params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(got, params, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(got["w"] - w0["w"]))) > 0.05


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Conv(4, (3, 3), use_bias=False)(x))
        return nn.Dense(N_CLASSES)(nn.relu(h).reshape(x.shape[0], -1))


def test_distill_a_batchnorm_student_returns_its_trained_statistics(setup):
    x, y, teacher, t_vars = setup
    student = models.as_student(BatchNormNet(), mutable=("batch_stats",), train_kwargs={"train": True})
    got = distill.distill(student, teacher, x, y, teacher_variables=t_vars, key=jax.random.PRNGKey(0),
                          method="kd", epochs=2, batch_size=8, learning_rate=1e-2)
    assert sorted(got) == ["batch_stats", "params"]
    init = BatchNormNet().init(jax.random.PRNGKey(0), x[:2])
    chex.assert_trees_all_equal_shapes(got, init)
    assert float(jnp.max(jnp.abs(got["batch_stats"]["BatchNorm_0"]["var"] - 1.0))) > 0.01
    logits = BatchNormNet().apply(got, x)  # evaluation mode, with the trained statistics
    assert logits.shape == (16, N_CLASSES) and bool(jnp.all(jnp.isfinite(logits)))


def test_bad_models_and_arguments_are_refused_in_one_line(setup):
    x, y, teacher, t_vars = setup
    cases = [
        (lambda: models.as_student(3), "student must be a flax linen module, a pair (init_fn, apply_fn) of "
                                        "functions or a distill.Student; got int"),
        (lambda: models.as_student((len,)), "got tuple"),
        (lambda: models.as_student((lambda k, z: {}, lambda p, z: z), mutable=("batch_stats",)),
         "mutable=('batch_stats',) is for linen modules"),
        (lambda: distill.distill(models.SoftDecisionTree(2, N_CLASSES), teacher, x, y, key=jax.random.PRNGKey(0)),
         "teacher is a linen module (SmallCNN): pass its variables as teacher_variables="),
        (lambda: distill.distill(models.SoftDecisionTree(2, N_CLASSES), teacher, x, y[:3], teacher_variables=t_vars,
                                 key=jax.random.PRNGKey(0)), "x and y must hold the same number of examples"),
        (lambda: distill.distill(models.SoftDecisionTree(2, N_CLASSES), None, x, y, key=jax.random.PRNGKey(0)),
         "method 'kd' needs a teacher"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_linear_student_distils_over_the_pca_it_is_given(setup):
    x, y, teacher, t_vars = setup
    from distill_jax.data import pca

    flat = x.reshape(len(x), -1)
    fitted = pca.fit(flat, 5)
    linear = models.Linear(N_CLASSES, n_components=5)
    out = distill.distill(linear, teacher, x, y, teacher_variables=t_vars, key=jax.random.PRNGKey(0), epochs=2,
                          batch_size=8, collections=models.set_pca({}, fitted))
    np.testing.assert_array_equal(out["pca"]["components"], fitted.components)  # kept, not trained
    z = (flat - fitted.mean) @ fitted.components.T
    np.testing.assert_allclose(linear.apply(out, x), z @ out["params"]["linear"]["kernel"]
                               + out["params"]["linear"]["bias"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="has no collection 'stats'"):
        distill.distill(linear, None, x, y, method="labels", key=jax.random.PRNGKey(0), epochs=1, batch_size=8,
                        collections={"stats": {}})
    with pytest.raises(ValueError, match=r"collections\['pca'\]: shapes"):
        distill.distill(linear, None, x, y, method="labels", key=jax.random.PRNGKey(0), epochs=1, batch_size=8,
                        collections=models.set_pca({}, pca.fit(flat, 3)))
