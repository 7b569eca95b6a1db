"""bfloat16 compute with float32 parameters, optimizer state, losses and reported numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import data, distill, models, parallel, train
from distill_jax.app import _fit, _prepare, _settings, config


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (custom rules, scans, pjit calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _equations(inner)


def _dtypes_of(jaxpr, primitive: str) -> set:
    return {str(v.aval.dtype) for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == primitive for v in eqn.invars}


def test_bf16_model_computes_in_bf16_with_float32_parameters_and_logits():
    x = jnp.ones((2, 8, 8, 1))
    model = models.with_compute_dtype(models.SmallCNN(3), "bfloat16")
    variables = model.init(jax.random.PRNGKey(0), x)
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
    assert _dtypes_of(jaxpr, "conv_general_dilated") == {"bfloat16"}
    assert _dtypes_of(jaxpr, "dot_general") == {"bfloat16"}
    logits = model.apply(variables, x)
    assert logits.dtype == jnp.float32
    # the same variables in float32 give the same logits to bf16 rounding
    f32 = models.with_compute_dtype(model, "float32").apply(variables, x)
    np.testing.assert_allclose(logits, f32, rtol=0.05, atol=0.05)
    assert models.with_compute_dtype(models.SoftDecisionTree(2, 3), "bfloat16") == models.SoftDecisionTree(2, 3)
    with pytest.raises(ValueError, match="compute dtype 'float16' is not supported"):
        models.with_compute_dtype(model, "float16")


def test_bf16_training_converges_on_digits_with_float32_state():
    ds = data.load("digits", seed=0)
    x, y = ds.x_train.astype(np.float32), ds.y_train.astype(np.int32)
    mesh = parallel.make_mesh()
    cfg = distill.MethodConfig()
    accuracies = {}
    for dtype in ("float32", "bfloat16"):
        model = models.with_compute_dtype(models.SmallCNN(ds.num_classes), dtype)
        params = distill.init_trainable(model, "labels", cfg, jax.random.PRNGKey(0), jnp.asarray(x[:2]))
        opt = optax.adam(3e-3)
        state = train.create_state(params, opt, key=jax.random.PRNGKey(1))
        step = train.make_train_step(distill.make_loss_fn(model, "cnn", "labels", cfg, ds.num_classes), opt, mesh)
        state, history = train.fit(state, step, {"x": x, "y": y}, train.FitConfig(epochs=4, batch_size=64,
                                   show_progress=False), mesh=mesh)
        leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
        assert {l.dtype for l in leaves if jnp.issubdtype(l.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
        assert history[-1]["loss"] < 0.5 * history[0]["loss"], (dtype, history)
        logits = models.SmallCNN(ds.num_classes).apply({"params": state.params["model"]}, ds.x_test.astype(np.float32))
        accuracies[dtype] = float(np.mean(np.argmax(logits, -1) == ds.y_test))
    assert accuracies["bfloat16"] > 0.85 and abs(accuracies["bfloat16"] - accuracies["float32"]) < 0.05, accuracies


def test_pipeline_trains_in_bf16_and_reports_in_float32():
    c = config.apply_smoke(config.default_config())
    c.dtype = "bfloat16"
    c.train_limit = 256
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    model, _ = _settings.build_model("cnn", c, prep.num_classes, prep.pca)
    assert model.dtype == jnp.bfloat16
    teacher = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    assert teacher.model.dtype == jnp.float32 and teacher.test_logits.dtype == np.float32
    jaxpr = jax.make_jaxpr(lambda v: teacher.apply_fn(prep.inputs(prep.x_test[:2])))(teacher.variables)
    assert "bfloat16" not in str(jaxpr)  # what is evaluated and explained runs in float32
    c.dtype = "float16"
    with pytest.raises(ValueError, match="dtype='float16' is out of range"):
        config.validate(c)
