"""Robust training (article section 5.3): PGD adversarial training and defensive distillation.

Adversarial training (Madry et al. 2018) replaces each batch by `metrics.pgd`'s adversarial examples
against the model being trained; defensive distillation (Papernot et al. 2016) is the `defensive` term.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import distill, models, parallel, robust, train
from distill_jax.app import _fit, _prepare, _settings, config
from distill_jax.distill import _terms, losses

N_CLASSES = 4


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, N_CLASSES, 16).astype(np.int32))
    return x, y


def _pgd_cfg(**kw):
    return distill.MethodConfig(adversarial="pgd", adversarial_epsilon=0.3, adversarial_steps=3, **kw)


# --------------------------------------------------------------------------- the adversarial view


def test_adversarial_view_is_metrics_pgd_with_the_same_key_and_budget(batch):
    x, y = batch
    model = models.MLP(N_CLASSES, hidden=(16,))
    variables = model.init(jax.random.PRNGKey(1), x[:2])
    apply_fn = models.apply_fn_of(model, variables)
    cfg, key = _pgd_cfg(), jax.random.PRNGKey(7)
    assert cfg.pgd_step_size == pytest.approx(2.5 * 0.3 / 3)  # Madry's step rule when adversarial_step_size = 0
    view = distill.adversarial_view(apply_fn, x, y, key=key, cfg=cfg)
    expected = robust.pgd(apply_fn, x, y, epsilon=0.3, step_size=0.25, steps=3, key=key)
    np.testing.assert_array_equal(view, expected)
    jitted = jax.jit(lambda v: distill.adversarial_view(apply_fn, v, y, key=key, cfg=cfg))(x)
    np.testing.assert_allclose(jitted, expected, atol=1e-6)
    # inside the L-inf ball, really moved, and stronger than the clean batch
    assert float(jnp.max(jnp.abs(view - x))) <= 0.3 + 1e-6 and float(jnp.max(jnp.abs(view - x))) > 0.29
    ce = lambda v: float(jnp.mean(losses.cross_entropy(apply_fn(v), y)))  # noqa: E731
    assert ce(view) > ce(x)
    # no gradient flows through the perturbation
    grad = jax.grad(lambda v: jnp.sum(distill.adversarial_view(apply_fn, v, y, key=key, cfg=cfg)))(x)
    np.testing.assert_array_equal(grad, 0.0)
    # "none" leaves the batch alone
    np.testing.assert_array_equal(distill.adversarial_view(apply_fn, x, y, key=key, cfg=distill.MethodConfig()), x)


def test_the_train_loss_is_the_loss_on_pgd_examples_against_the_current_student(batch):
    """`make_loss_fn` with adversarial="pgd": value and parameter gradient equal the labels loss at the fixed
    `metrics.pgd(student, x, y, key=fold_in(key, 2))` examples (the attack itself carries no parameter gradient)."""
    x, y = batch
    student = models.SmallCNN(N_CLASSES)
    cfg, key = _pgd_cfg(), jax.random.PRNGKey(3)
    params = distill.init_trainable(student, "labels", cfg, jax.random.PRNGKey(1), x[:2])
    loss_fn = distill.make_loss_fn(student, "cnn", "labels", cfg, N_CLASSES)
    attacked = models.for_attribution(student)
    x_adv = robust.pgd(lambda z: attacked.apply({"params": params["model"]}, z), x, y, epsilon=0.3,
                        step_size=0.25, steps=3, key=jax.random.fold_in(key, 2))

    def mean_loss(p):
        return jnp.mean(loss_fn(p, {}, {"x": x, "y": y}, None, key)[0])

    def reference(p):
        return jnp.mean(losses.cross_entropy(student.apply({"params": p["model"]}, x_adv), y))

    np.testing.assert_allclose(mean_loss(params), reference(params), rtol=1e-5)
    got, want = jax.grad(mean_loss)(params), jax.grad(reference)(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    clean = jnp.mean(losses.cross_entropy(student.apply({"params": params["model"]}, x), y))
    assert float(reference(params)) > float(clean)


def test_teacher_sees_the_adversarial_view_and_cached_outputs_are_refused(batch):
    """A student identical to the teacher has fm loss 0 only if the teacher reads the student's adversarial view."""
    x, y = batch
    teacher = models.SmallCNN(N_CLASSES)
    t_vars = teacher.init(jax.random.PRNGKey(9), x[:2])
    cfg = _pgd_cfg()
    assert cfg.changes_inputs and not distill.MethodConfig().changes_inputs  # turns the teacher cache off
    loss_fn = distill.make_loss_fn(teacher, "cnn", "fm", cfg, N_CLASSES, teacher)
    params = {"model": t_vars["params"], "aux": {}}
    same, _ = loss_fn(params, {}, {"x": x, "y": y}, t_vars, jax.random.PRNGKey(3))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="adversarial training changes the inputs every step"):
        loss_fn(params, {}, {"x": x, "y": y, "teacher_logits": teacher.apply(t_vars, x)}, t_vars, jax.random.PRNGKey(3))


def test_adversarial_training_raises_pgd_accuracy_on_digits():
    """An MLP teacher trained on PGD examples (eps 0.5 standardized units) resists PGD far better than one trained
    on clean images (seen: PGD accuracy 0.01 against 0.33 after 6 epochs, clean accuracy 0.97 and 0.94)."""
    c = config.apply_smoke(config.default_config())
    c.teacher.kind, c.teacher.epochs, c.teacher.learning_rate = "mlp", 6, 3e-3
    c.teacher.adversarial_epsilon = 0.5
    config.validate(c)
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    x, y = prep.inputs(prep.x_test), jnp.asarray(prep.y_test)
    scores = {}
    for adversarial in ("none", "pgd"):
        c.teacher.adversarial = adversarial
        config.check_choices(c)
        trained = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
        clean = train.accuracy_from_logits(trained.test_logits, prep.y_test)
        under_attack = float(robust.adversarial_accuracy(trained.apply_fn, x, y, attack="pgd", epsilon=0.5,
                                                         step_size=0.125, steps=10, key=jax.random.PRNGKey(0)))
        scores[adversarial] = (clean, under_attack)
    assert scores["none"][0] > 0.9 and scores["pgd"][0] > 0.85, scores  # both learned the task
    assert scores["pgd"][1] > scores["none"][1] + 0.15, scores


# --------------------------------------------------------------------------- settings


def test_student_adversarial_keys_are_overridable_per_kind():
    c = config.default_config()
    c.student.adversarial_steps = 7
    c.mlp.adversarial = "pgd"  # a config file may add any student key to a kind's group
    c.mlp.adversarial_epsilon = 0.1
    config.validate(c)
    mlp = _settings.method_config(c, group=_settings.student_budget("mlp", c))
    cnn = _settings.method_config(c, group=_settings.student_budget("cnn", c))
    assert (mlp.adversarial, mlp.adversarial_epsilon, mlp.adversarial_steps) == ("pgd", 0.1, 7)
    assert (cnn.adversarial, cnn.adversarial_epsilon, cnn.adversarial_steps) == ("none", 0.25, 7)
    assert _settings.method_config(c).adversarial == "none"  # no group: no adversarial training
    teacher = _settings.method_config(c, group=c.teacher)
    assert teacher.adversarial == "none" and teacher.pgd_step_size == pytest.approx(2.5 * 0.25 / 5)


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key,value,match", [
    ("teacher.adversarial_epsilon", -0.1, r"teacher.adversarial_epsilon=-0.1 is out of range: must be >= 0"),
    ("student.adversarial_steps", 0, r"student.adversarial_steps=0 is out of range: must be an integer >= 1"),
    ("student.adversarial_step_size", -1.0, r"student.adversarial_step_size=-1.0 is out of range"),
])
def test_bad_numbers_are_refused_by_validate(key, value, match):
    c = config.default_config()
    group, leaf = key.split(".")
    c[group][leaf] = value
    _one_line_error(lambda: config.validate(c), match)


@pytest.mark.parametrize("leaf,value,allowed", [
    ("dp_noise_multiplier", -1.0, "must be >= 0 (0 = no DP-SGD)"),
    ("dp_l2_clip", 0.0, "must be > 0"),
    ("dp_delta", 1.0, "must be in (0, 1)"),
    ("adversarial_epsilon", "big", "must be >= 0 (standardized input units)"),
    ("adversarial_steps", 2.5, "must be an integer >= 1"),
    ("adversarial_step_size", -0.5, "must be >= 0 (0 = 2.5 * epsilon / steps)"),
])
def test_training_extras_of_a_student_kind_group_are_validated(leaf, value, allowed):
    c = config.default_config()
    c.mlp[leaf] = value  # a kind's group overrides the student's keys; it is checked the same way
    with pytest.raises(ValueError) as info:
        config.validate(c)
    assert str(info.value) == f"config value mlp.{leaf}={value!r} is out of range: {allowed}"
    fine = config.default_config()
    fine.mlp[leaf] = fine.student[leaf]
    config.validate(fine)  # the student's own value is allowed there


def test_bad_choices_are_refused_by_check_choices():
    c = config.default_config()
    c.teacher.adversarial = "fgsm"
    _one_line_error(lambda: config.check_choices(c),
                    r"config value teacher.adversarial 'fgsm' is not known; use one of \['none', 'pgd'\]")
    c = config.default_config()
    c.teacher.kind, c.teacher.adversarial = "tree", "pgd"
    _one_line_error(lambda: config.check_choices(c), r"teacher.adversarial='pgd': adversarial training is supported "
                    r"for \['seed_cnn', 'cnn', 'mlp'\] models, not 'tree'")
    c = config.default_config()
    c.student.adversarial = "pgd"  # the default students include trees and linear models
    _one_line_error(lambda: config.check_choices(c), r"student 'tree-labels': student.adversarial='pgd': .* not 'tree'")
    c.students = "cnn-kd,mlp-fm"
    config.check_choices(c)  # networks only: accepted
    c.method.mixup = 0.4
    _one_line_error(lambda: config.check_choices(c), "mixup makes images whose labels are undefined")
    c.students = "mlp-fm"
    _one_line_error(lambda: config.check_choices(c), r"student 'mlp-fm': student.adversarial='pgd': the attack "
                    r"maximizes the cross entropy with the labels, but mixup")


def test_bad_settings_are_refused_by_the_library():
    for kw, match in [({"adversarial": "fgsm"}, r"adversarial 'fgsm' is not known"),
                      ({"adversarial_epsilon": -1.0}, "adversarial_epsilon must be >= 0"),
                      ({"adversarial_steps": 0}, "adversarial_steps must be an integer >= 1"),
                      ({"adversarial_steps": 2.5}, "adversarial_steps must be an integer >= 1"),
                      ({"adversarial_step_size": -0.1}, "adversarial_step_size must be >= 0")]:
        _one_line_error(lambda: distill.MethodConfig(**kw), match)
    for kind, student in (("tree", models.SoftDecisionTree(2, N_CLASSES)),
                          ("linear", models.Linear(N_CLASSES, n_components=4))):
        _one_line_error(lambda: distill.make_loss_fn(student, kind, "labels", _pgd_cfg(), N_CLASSES),
                        f"adversarial='pgd': adversarial training is supported .* not '{kind}'")
    with pytest.raises(ValueError, match="needs the model"):
        distill.training_view(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), _pgd_cfg())


# --------------------------------------------------------------------------- defensive distillation


S = np.array([[2.0, -1.0, 0.5, 0.0], [0.3, 0.3, 4.0, -2.0]], np.float32)
T_LOGITS = np.array([[1.0, 0.0, -1.0, 3.0], [-0.5, 2.0, 1.0, 0.0]], np.float32)


def _hand_defensive(s, t, temp):
    """-sum_c softmax(t/T)_c log softmax(s/T)_c in float64 numpy."""
    s, t = np.asarray(s, np.float64) / temp, np.asarray(t, np.float64) / temp
    p_t = np.exp(t - t.max(-1, keepdims=True))
    p_t /= p_t.sum(-1, keepdims=True)
    log_p_s = s - s.max(-1, keepdims=True) - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
    return -(p_t * log_p_s).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 20.0, 100.0])
def test_defensive_loss_is_the_soft_cross_entropy_at_temperature(temperature):
    got = losses.defensive_distillation_loss(jnp.asarray(S), jnp.asarray(T_LOGITS), temperature=temperature)
    np.testing.assert_allclose(got, _hand_defensive(S, T_LOGITS, temperature), rtol=1e-5)
    # no T^2 factor: it is kd_loss / T^2 (the KL) plus the entropy of the teacher's softmax at T
    p_t = jax.nn.softmax(jnp.asarray(T_LOGITS) / temperature)
    entropy = -jnp.sum(p_t * jnp.log(p_t), -1)
    kl = losses.kd_loss(jnp.asarray(S), jnp.asarray(T_LOGITS), temperature=temperature) / temperature**2
    np.testing.assert_allclose(got, kl + entropy, rtol=1e-5)


def test_defensive_loss_gradient_vanishes_when_the_student_matches_the_teacher():
    t = jnp.asarray(T_LOGITS)
    for temperature in (1.0, 20.0):
        loss = lambda s: jnp.sum(losses.defensive_distillation_loss(s, t, temperature=temperature))  # noqa: E731
        np.testing.assert_allclose(jax.grad(loss)(t), 0.0, atol=1e-7)
        np.testing.assert_allclose(jax.grad(loss)(t + 3.0), 0.0, atol=1e-6)  # a shift per example changes nothing
        # elsewhere the gradient is (softmax(s/T) - softmax(t/T)) / T
        s = jnp.asarray(S)
        want = (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)) / temperature
        np.testing.assert_allclose(jax.grad(loss)(s), want, rtol=1e-5, atol=1e-8)
        assert float(jnp.max(jnp.abs(want))) > 1e-4
    with pytest.raises(ValueError, match="defensive_distillation_loss: temperature=0.0"):
        losses.defensive_distillation_loss(S, T_LOGITS, temperature=0.0)


def test_defensive_term_reads_the_teacher_at_the_method_temperature_and_no_labels(batch):
    x, y = batch
    teacher = models.SmallCNN(N_CLASSES)
    t_vars = teacher.init(jax.random.PRNGKey(9), x[:2])
    needs = distill.method_needs("defensive", distill.MethodConfig())
    assert needs.teacher_logits and not _terms.TERMS["defensive"].reads_labels
    for kind, student in (("mlp", models.MLP(N_CLASSES, hidden=(16,))), ("tree", models.SoftDecisionTree(2, N_CLASSES))):
        cfg = distill.MethodConfig(temperature=20.0, tree_balance=0.0)
        params = distill.init_trainable(student, "defensive", cfg, jax.random.PRNGKey(1), x[:2], teacher, t_vars)
        loss_fn = distill.make_loss_fn(student, kind, "defensive", cfg, N_CLASSES, teacher)
        got, _ = loss_fn(params, {}, {"x": x, "y": y}, t_vars, jax.random.PRNGKey(0))
        other, _ = loss_fn(params, {}, {"x": x, "y": (y + 1) % N_CLASSES}, t_vars, jax.random.PRNGKey(0))
        np.testing.assert_array_equal(got, other)  # labels unread
        t_logits = np.asarray(teacher.apply(t_vars, x))
        logits, feats = student.apply({"params": params["model"]}, x, return_features=True)
        if kind == "tree":  # path-weighted cross entropy of the leaves read at T
            p_t = np.asarray(jax.nn.softmax(jnp.asarray(t_logits) / 20.0))
            log_q = np.asarray(jax.nn.log_softmax(feats["leaf_logits"] / 20.0))
            want = np.sum(np.asarray(feats["path_probs"]) * (-p_t @ log_q.T), axis=-1)
        else:
            want = _hand_defensive(logits, t_logits, 20.0)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_labels_term_at_a_training_temperature_is_the_cross_entropy_of_logits_over_t(batch):
    x, y = batch
    model = models.MLP(N_CLASSES, hidden=(8,))
    variables = model.init(jax.random.PRNGKey(0), x)
    params = {"model": variables["params"], "aux": {}}
    logits = model.apply(variables, x)
    for t in (1.0, 20.0):
        cfg = distill.MethodConfig(label_temperature=t)
        loss, _ = distill.make_loss_fn(model, "mlp", "labels", cfg, N_CLASSES)(params, {}, {"x": x, "y": y}, None,
                                                                               jax.random.PRNGKey(1))
        expected = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / t)), np.asarray(y)[:, None], 1)[:, 0]
        np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label_temperature must be > 0"):
        distill.MethodConfig(label_temperature=0.0)


def test_a_teacher_trained_at_temperature_t_has_larger_logits():
    """Papernot et al.'s defensive teacher: trained at T, used at T = 1, its logits grow with T."""
    c = config.apply_smoke(config.default_config())
    c.teacher.kind, c.teacher.epochs, c.teacher.learning_rate = "mlp", 6, 3e-3
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    spread = {}
    for t in (1.0, 20.0):
        c.teacher.train_temperature = t
        teacher = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
        logits = np.asarray(teacher.test_logits)
        spread[t] = float(np.mean(logits.max(1) - logits.min(1)))
        assert train.accuracy_from_logits(logits, prep.y_test) > 0.8
    assert spread[20.0] > 5 * spread[1.0]
    c.teacher.train_temperature = 0.0
    with pytest.raises(ValueError, match="teacher.train_temperature"):
        config.validate(c)
