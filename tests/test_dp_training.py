"""DP-SGD as a training option: the step applies clipped, noised per-example gradients; runs report epsilon."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import parallel, train
from distill_jax.app import _audit, _fit, _page, _prepare, config
from distill_jax.distill import privacy

D = 64


def _least_squares(params, extra, batch, teacher, key):
    """Per-example 0.5 * (x . w + b - y)^2, the library's loss signature."""
    pred = batch["x"] @ params["w"] + params["b"]
    return 0.5 * (pred - batch["y"]) ** 2, {"accuracy": jnp.zeros_like(pred)}


def _setup(n=8):
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(n, D)), jnp.float32), "y": jnp.asarray(rng.normal(size=n), jnp.float32)}
    params = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    return batch, params


def _step(params, batch, dp, lr=0.1, key=0):
    optimizer = optax.sgd(lr)
    state = train.create_state(params, optimizer, key=jax.random.PRNGKey(key))
    new, _ = jax.jit(train.train_step_fn(_least_squares, optimizer, dp=dp))(state, batch, None)
    return new.params


def test_noiseless_dp_step_applies_the_mean_of_clipped_per_example_gradients():
    batch, params = _setup()
    clip = 0.05
    new = _step(params, batch, train.DPSGD(l2_clip=clip, noise_multiplier=0.0))
    # at w = 0, b = 0 example i's gradient is (-y_i x_i, -y_i); clipped to norm `clip`
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    g = np.concatenate([-y[:, None] * x, -y[:, None]], axis=1)
    g *= np.minimum(1.0, clip / np.linalg.norm(g, axis=1, keepdims=True))
    expected = -0.1 * g.mean(0)
    np.testing.assert_allclose(np.asarray(new["w"]), expected[:D], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(new["b"]), expected[D], rtol=1e-5, atol=1e-7)
    # a huge clip is the plain gradient of the mean loss
    plain = _step(params, batch, None)
    huge = _step(params, batch, train.DPSGD(l2_clip=1e6, noise_multiplier=0.0))
    np.testing.assert_allclose(np.asarray(huge["w"]), np.asarray(plain["w"]), rtol=1e-5, atol=1e-7)


def _noisy_view_loss(params, extra, batch, teacher, key):
    """Per-example (x + noise(key)) . w: its gradient is the example's random view (as augmentation draws one)."""
    view = batch["x"] + jax.random.normal(key, batch["x"].shape)
    return view @ params["w"], {"view_sum": view.sum(axis=1)}


def _noisy_view_step(w, dp, lr=0.1, n=8):
    optimizer = optax.sgd(lr)
    state = train.create_state({"w": w}, optimizer, key=jax.random.PRNGKey(0))
    new, metrics = jax.jit(train.train_step_fn(_noisy_view_loss, optimizer, dp=dp))(state, {"x": jnp.zeros((n, D))},
                                                                                     None)
    return np.asarray(new.params["w"]), metrics


def test_dp_examples_of_a_batch_get_their_own_random_view():
    clip, lr = 1e-3, 0.1
    w, _ = _noisy_view_step(jnp.zeros(D), train.DPSGD(l2_clip=clip, noise_multiplier=0.0), lr=lr)
    # every clipped per-example gradient (the view) has norm `clip`: one shared draw would make the
    # update's norm exactly lr * clip; 8 independent directions in 64 dims give about lr * clip / sqrt(8)
    assert np.linalg.norm(w) < 0.6 * lr * clip


def test_dp_reported_loss_and_aux_are_the_means_over_the_pass_that_gives_the_gradient():
    w0, lr = jnp.linspace(-1.0, 1.0, D), 0.1
    w, metrics = _noisy_view_step(w0, train.DPSGD(l2_clip=1e6, noise_multiplier=0.0), lr=lr)
    mean_view = (np.asarray(w0) - w) / lr  # the unclipped update is the mean of the per-example views
    # loss_i = view_i . w0, so the mean loss is mean_view . w0 only if both come from the same draws
    np.testing.assert_allclose(float(metrics["loss"]), mean_view @ np.asarray(w0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["view_sum"]), mean_view.sum(), rtol=1e-4, atol=1e-5)


def test_dp_noise_has_the_stated_scale():
    batch, params = _setup(n=8)
    params = {"w": jnp.zeros(4096), "b": jnp.zeros(())}
    batch = {"x": jnp.zeros((8, 4096)), "y": jnp.zeros(8)}  # zero gradients: the update is the noise alone
    z, clip, lr = 1.5, 2.0, 0.1
    new = _step(params, batch, train.DPSGD(l2_clip=clip, noise_multiplier=z))
    assert float(np.std(np.asarray(new["w"]))) == pytest.approx(lr * z * clip / 8, rel=0.05)
    other = _step(params, batch, train.DPSGD(l2_clip=clip, noise_multiplier=z), key=1)
    assert not np.allclose(np.asarray(new["w"]), np.asarray(other["w"]))  # the noise follows the state's key


def test_a_dp_teacher_reports_the_accountants_epsilon_in_metrics_and_report():
    c = config.apply_smoke(config.default_config())
    c.teacher.kind = "mlp"
    c.teacher.dp_noise_multiplier = 1.1
    c.teacher.dp_l2_clip = 1.0
    prep = _prepare.prepare_data(c)
    teacher = _fit.train_teacher(prep, c, parallel.make_mesh(), None, show_progress=False)
    p = teacher.settings["privacy"]
    steps = train.total_steps(len(prep.y_train), c.teacher.batch_size, c.teacher.epochs)
    expected = privacy.dp_sgd_epsilon(steps, batch_size=c.teacher.batch_size, n=len(prep.y_train),
                                      noise_multiplier=1.1, delta=1e-5)
    assert p["epsilon"] == pytest.approx(expected, rel=1e-3) and p["delta"] == 1e-5 and p["steps"] == steps
    # the sampling that ran is the one accounted: Poisson at q = B / n, padded to a cap that is rarely exceeded
    n, batch = len(prep.y_train), c.teacher.batch_size
    assert p["sampling"] == "poisson" and p["sampling_rate"] == batch / n
    assert p["batch_cap"] == train.poisson_batch_cap(n, batch, steps) and p["truncation_probability"] <= 1e-9
    assert p["delta_with_truncation"] == pytest.approx(1e-5 + (1 + np.exp(p["epsilon"])) * p["truncation_probability"])
    metrics = _audit.model_metrics(teacher, None, prep)
    assert metrics["privacy"]["mechanism"] == "DP-SGD"
    assert f"epsilon {expected:.2f} (delta 1e-05, poisson sampling)" in _fit.privacy_summary(teacher)
    header, rows = _page.model_rows({"models": {"teacher": metrics}})
    assert header[-1] == "privacy (epsilon, delta)"
    assert rows[0][-1] == f"DP-SGD epsilon {expected:.2f} (delta 1e-05, poisson sampling)"
    plain = {"models": {"teacher": {k: v for k, v in metrics.items() if k != "privacy"}}}
    assert "privacy (epsilon, delta)" not in _page.model_rows(plain)[0]  # no column without a private model


@pytest.mark.parametrize("key,value,needle", [("dp_delta", 1.0, "teacher.dp_delta"),
                                              ("dp_noise_multiplier", -1.0, "teacher.dp_noise_multiplier"),
                                              ("dp_l2_clip", 0.0, "teacher.dp_l2_clip"),
                                              ("dp_sampling", "uniform", "teacher.dp_sampling")])
def test_bad_dp_settings_are_refused(key, value, needle):
    c = config.default_config()
    c.teacher[key] = value
    with pytest.raises(ValueError, match=needle):
        config.validate(c)


def test_dp_with_batch_statistics_is_refused():
    def loss_fn(params, extra, batch, teacher, key):
        return jnp.zeros(batch["x"].shape[0]) + params["w"].sum(), {"mutable": {"batch_stats": {"m": jnp.ones(2)}}}

    optimizer = optax.sgd(0.1)
    state = train.create_state({"w": jnp.ones(2)}, optimizer, key=jax.random.PRNGKey(0),
                               extra={"batch_stats": {"m": jnp.zeros(2)}})
    step = train.train_step_fn(loss_fn, optimizer, dp=train.DPSGD(l2_clip=1.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="mix the examples of a batch"):
        step(state, {"x": jnp.ones((4, 2)), "y": jnp.zeros(4)}, None)


def test_mixup_with_dp_sgd_is_refused_in_one_line():
    from distill_jax.app import config

    c = config.default_config()
    c.method.mixup, c.tree = 0.5, {**c.tree, "dp_noise_multiplier": 1.0}
    with pytest.raises(ValueError, match=r"method.mixup=0.5 .*\(tree.dp_noise_multiplier > 0\)"):
        config.validate(c)
    c.tree.dp_noise_multiplier = 0.0
    config.validate(c)  # mixup alone is fine


def test_a_dp_soft_tree_with_the_balance_penalty_and_auto_under_dp_are_refused_in_one_line():
    from distill_jax.app import config

    c = config.default_config()
    c.students = "tree-kd,cnn-kd"
    c.tree = {**c.tree, "dp_noise_multiplier": 1.0}
    with pytest.raises(ValueError, match=r"method.tree_balance=0.1 .*DP-SGD soft tree 'tree-kd' \(tree.dp_noise_multiplier"):
        config.validate(c)
    c.method.tree_balance = 0.0
    config.validate(c)  # a private tree without the batch-level penalty trains
    c.method.temperature = "auto"
    with pytest.raises(ValueError, match=r"method.temperature='auto' is out of range: not for the DP-SGD student 'tree-kd'.*set numbers"):
        config.validate(c)
    c.tree.dp_noise_multiplier = 0.0
    config.validate(c)  # auto without DP is fine
    c.student.dp_noise_multiplier = 1.0  # the cnn student is private through `student` (the tree keeps its own 0)
    with pytest.raises(ValueError, match=r"DP-SGD student 'cnn-kd' \(student.dp_noise_multiplier"):
        config.validate(c)
