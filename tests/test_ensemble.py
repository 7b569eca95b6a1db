"""A teacher made of several networks (`teacher.ensemble`): the prediction is the mean of the members' logits,
the members start from different initialisations and each trains as it would alone, K = 1 is the plain teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import distill, models, parallel, train
from distill_jax.app import _fit, _prepare, _settings, config

B, CLASSES = 8, 3


def _members(variables, k):
    return jax.tree_util.tree_map(lambda a: a[k], variables["params"]["members"]["network"])


@pytest.fixture(scope="module")
def ensemble():
    x = jax.random.normal(jax.random.PRNGKey(1), (B, 8, 8, 1))
    model = models.Ensemble(models.SmallCNN(num_classes=CLASSES), members=3)
    return model, model.init(jax.random.PRNGKey(0), x), x


def test_logits_are_the_mean_of_the_members_run_alone(ensemble):
    model, variables, x = ensemble
    single = models.SmallCNN(num_classes=CLASSES)
    alone = [single.apply({"params": _members(variables, k)}, x) for k in range(3)]
    np.testing.assert_allclose(model.apply(variables, x), np.mean(alone, axis=0), rtol=1e-5, atol=1e-6)
    logits, feats = model.apply(variables, x, return_features=True)
    np.testing.assert_allclose(feats["member_logits"], np.stack(alone), rtol=1e-5, atol=1e-6)
    assert feats["conv1"].shape == (B, 8, 8, 16)  # features averaged over the members, as one network's


def test_members_start_from_different_initialisations(ensemble):
    _, variables, _ = ensemble
    k0, k1 = _members(variables, 0)["conv1"]["kernel"], _members(variables, 1)["conv1"]["kernel"]
    assert float(jnp.max(jnp.abs(k0 - k1))) > 1e-2


def test_one_ensemble_step_is_each_members_own_step(ensemble):
    model, variables, x = ensemble
    y = jnp.arange(B) % CLASSES
    mesh = parallel.make_mesh()
    optimizer = train.make_optimizer("adam", learning_rate=1e-2, total_steps=10)

    def one_step(net, params):
        loss_fn = distill.make_loss_fn(net, None, "labels", distill.MethodConfig(), CLASSES)
        state = train.create_state({"model": params, "aux": {}}, optimizer, key=jax.random.PRNGKey(2))
        state, _ = train.make_train_step(loss_fn, optimizer, mesh)(state, {"x": x, "y": y}, None)
        return state.params["model"]

    together = one_step(model, variables["params"])
    single_init = lambda k: _members(variables, k)  # noqa: E731
    single = models.SmallCNN(num_classes=CLASSES)
    for k in range(3):
        alone = one_step(single, _members(variables, k))
        member = _members({"params": together}, k)
        assert float(np.max(np.abs(member["head"]["kernel"] - single_init(k)["head"]["kernel"]))) > 1e-4  # it moved
        for a, b in zip(jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_ensemble_of_one_is_the_plain_teacher_bitwise():
    c = config.default_config()
    config.apply_smoke(c)
    c.teacher.kind, c.teacher.epochs = "cnn", 1
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    model, _ = _settings.build_model("cnn", c, prep.num_classes, prep.pca, ensemble=1)
    assert type(model) is models.SmallCNN
    plain = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    c.teacher.ensemble = 1
    again = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain.variables, again.variables)
    c.teacher.ensemble = 2
    two = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    assert isinstance(two.model, models.Ensemble)
    k0, k1 = (_members(two.variables, k)["conv1"]["kernel"] for k in range(2))
    assert float(np.max(np.abs(k0 - k1))) > 1e-2  # the trained members differ


def test_ensemble_needs_a_network_teacher():
    c = config.default_config()
    c.teacher.kind, c.teacher.ensemble = "tree", 3
    with pytest.raises(ValueError, match="teacher.ensemble=3 is out of range: needs a network teacher"):
        config.validate(c)
    c.teacher.kind, c.teacher.ensemble = "seed_cnn", 0
    with pytest.raises(ValueError, match="teacher.ensemble=0 is out of range"):
        config.validate(c)
