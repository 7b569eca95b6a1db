"""Models: shapes, named features, deltas, the fast conv/pool paths against lax, the soft tree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import models
from distill_jax.models import _layers


def _init(model, x, key=0):
    return model.init(jax.random.PRNGKey(key), x)


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 28, 28, 1), (2, 32, 32, 3), (1, 9, 7, 3)])
def test_seed_cnn_any_input_size(shape):
    x = jnp.ones(shape)
    model = models.SeedCNN(num_classes=10)
    v = _init(model, x)
    logits, feats = model.apply(v, x, return_features=True)
    assert logits.shape == (shape[0], 10)
    assert [k for k in feats] == ["conv1", "conv2", "conv3", "conv4", "dense1"]
    assert feats["conv1"].shape == shape[:3] + (64,)
    assert feats["conv4"].shape[-1] == 128 and feats["dense1"].shape == (shape[0], 512)
    # the article's architecture: 64-64-128-128 convs, dense 512
    p = v["params"]
    assert [p[f"conv{i}"]["kernel"].shape[-1] for i in range(1, 5)] == [64, 64, 128, 128]
    assert p["dense1"]["kernel"].shape[-1] == 512


def test_patch_conv_matches_lax_in_float64():
    with jax.enable_x64(True):
        key1, key2 = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(key1, (2, 7, 6, 5), jnp.float64)
        k = jax.random.normal(key2, (3, 3, 5, 4), jnp.float64)
        np.testing.assert_allclose(models.conv3x3_patches(x, k), models.conv3x3_lax(x, k), rtol=1e-12, atol=1e-12)
        f = lambda fn: jax.grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), argnums=(0, 1))(x, k)
        for a, b in zip(f(models.conv3x3_patches), f(models.conv3x3_lax)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("batch,chunk", [(6, 2), (5, 2), (7, 32)])  # groups of 2, of 5 (5 is prime), one group
def test_grouped_filter_gradient_equals_xlas_in_float64(batch, chunk):
    with jax.enable_x64(True):
        key1, key2 = jax.random.split(jax.random.PRNGKey(3))
        x = jax.random.normal(key1, (batch, 7, 6, 5), jnp.float64)
        k = jax.random.normal(key2, (3, 3, 5, 4), jnp.float64)
        loss = lambda conv: jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1))(x, k)
        grouped = lambda x, k: _layers.conv3x3_grouped_filter_grad(x, k, chunk)
        np.testing.assert_allclose(grouped(x, k), models.conv3x3_lax(x, k), rtol=1e-12, atol=1e-12)
        for a, b in zip(loss(grouped), loss(models.conv3x3_lax)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
        # the gradient of an input gradient (saliency matching differentiates through the backward)
        saliency = lambda conv: jax.grad(lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, k))))(x) ** 2))(k)
        np.testing.assert_allclose(saliency(grouped), saliency(models.conv3x3_lax), rtol=1e-11, atol=1e-11)


def test_chunk_size_is_the_smallest_divisor_at_least_the_target():
    from distill_jax.models._layers import chunk_size

    assert [chunk_size(n, 32) for n in (256, 100, 37, 8)] == [32, 50, 37, 8]


def test_the_lax_conv_impl_takes_its_filter_gradient_from_the_backend():
    import dataclasses

    from distill_jax import backend

    x = jax.random.normal(jax.random.PRNGKey(4), (4, 6, 6, 3))
    k = jax.random.normal(jax.random.PRNGKey(5), (3, 3, 3, 2))

    def primitives(conv):
        jaxpr = jax.make_jaxpr(jax.grad(lambda k: jnp.sum(conv(x, k))))(k)
        return {str(e.primitive) for e in jaxpr.jaxpr.eqns}

    with backend.override(dataclasses.replace(backend.choices("cpu"), conv_filter_grad_chunk=2)):
        assert "scan" in primitives(models.conv3x3_xla)  # the loop over groups of images
    with backend.override("gpu"):  # XLA's own gradient: convolutions only
        assert "scan" not in primitives(models.conv3x3_xla)


def test_pooling_before_the_relu_gives_the_same_logits_and_gradients_as_after():
    # without features asked for, ConvNet pools first (cheaper); with them it keeps the ReLU's unpooled output
    x = jax.random.normal(jax.random.PRNGKey(6), (3, 13, 12, 2))
    model = models.SeedCNN(10)
    v = _init(model, x)

    def grads(features):
        def loss(p):
            out = model.apply({"params": p}, x, return_features=features)
            return jnp.sum(jax.nn.log_softmax(out[0] if features else out)[:, 1])

        return jax.value_and_grad(loss)(v["params"])

    (a, ga), (b, gb) = grads(False), grads(True)
    np.testing.assert_array_equal(a, b)
    for u, w in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-7)


def test_slice_pool_matches_reduce_window():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 9, 3))  # odd sizes: SAME padding
    np.testing.assert_array_equal(models.max_pool_slices(x), models.max_pool_lax(x))
    g1 = jax.grad(lambda x: jnp.sum(models.max_pool_slices(x) ** 2))(x)
    g2 = jax.grad(lambda x: jnp.sum(models.max_pool_lax(x) ** 2))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-6)  # no ties in random normals


def test_slice_pool_splits_the_gradient_of_two_equal_maxima():
    x = jnp.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(models.max_pool_slices(x)))(x)
    np.testing.assert_array_equal(g.reshape(2, 2), [[0.0, 0.5], [0.5, 0.0]])


@pytest.mark.parametrize("impl", ["lax_conv", "patches"])
def test_seed_cnn_impls_agree_on_outputs_and_gradients(impl):
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 12, 12, 3))
    fast, ref = models.SeedCNN(10, impl=impl), models.SeedCNN(10, impl="lax")
    v = _init(fast, x)
    np.testing.assert_allclose(fast.apply(v, x), ref.apply(v, x), rtol=1e-4, atol=1e-5)
    loss = lambda m: jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(m.apply({"params": p}, x))[:, 0]))(v["params"])
    for a, b in zip(jax.tree_util.tree_leaves(loss(fast)), jax.tree_util.tree_leaves(loss(ref))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_default_impl_is_the_fast_one():
    assert models.SeedCNN(10).impl == models.SmallCNN(10).impl == "lax_conv"


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl='bogus'.*patches"):
        _init(models.SeedCNN(10, impl="bogus"), jnp.ones((1, 8, 8, 1)))


def test_deltas_shift_a_feature_and_give_its_gradient():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    model = models.SmallCNN(5)
    v = _init(model, x)
    fwd = models.forward_with_features(model, v)
    _, feats = fwd(x)
    zero = {"conv2": jnp.zeros_like(feats["conv2"])}
    np.testing.assert_allclose(fwd(x, zero)[0], fwd(x)[0])
    g = jax.grad(lambda d: fwd(x, {"conv2": d})[0][:, 1].sum())(zero["conv2"])
    assert g.shape == feats["conv2"].shape and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError, match="no feature.*'nope'.*conv1"):
        fwd(x, {"nope": jnp.zeros(())})


def test_linear_over_pca_is_exactly_affine_in_components():
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 4, 4, 1))
    model = models.Linear(num_classes=3, n_components=5)
    v = _init(model, x)
    mean = jnp.linspace(0, 1, 16)
    comps = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(5), (16, 5)))[0].T
    v = {**v, "pca": {"mean": mean, "components": comps}}
    logits, feats = model.apply(v, x, return_features=True)
    z = (x.reshape(3, -1) - mean) @ comps.T
    np.testing.assert_allclose(feats["pca"], z, rtol=1e-5, atol=1e-6)
    w, b = v["params"]["linear"]["kernel"], v["params"]["linear"]["bias"]
    np.testing.assert_allclose(logits, z @ w + b, rtol=1e-5, atol=1e-6)


def test_soft_tree_path_probabilities_sum_to_one_and_match_product_of_routings():
    depth = 3
    x = jax.random.normal(jax.random.PRNGKey(6), (5, 4, 4, 1))
    model = models.SoftDecisionTree(depth=depth, num_classes=4)
    v = _init(model, x)
    _, f = model.apply(v, x, return_features=True)
    np.testing.assert_allclose(f["path_probs"].sum(-1), 1.0, rtol=1e-6)
    p = f["routing"]
    # leaf 5 = path right (node 0), left (node 2), right (node 5)
    np.testing.assert_allclose(f["path_probs"][:, 5], p[:, 0] * (1 - p[:, 2]) * p[:, 5], rtol=1e-6)
    np.testing.assert_allclose(f["node_reach"][:, 4], p[:, 0] * 0 + (1 - p[:, 0]) * p[:, 1], rtol=1e-6)


def test_hard_and_soft_tree_predictions_agree_on_a_confident_tree():
    depth = 2
    routing = jnp.array([[0.99, 0.5, 0.02], [0.01, 0.97, 0.5]])  # example 0 -> leaf 2, example 1 -> leaf 1
    leaf_logits = jnp.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    leaf, cls = models.tree_hard_predict(routing, leaf_logits, depth)
    np.testing.assert_array_equal(leaf, [2, 1])
    _, path = models.path_probabilities(routing, depth)
    soft = jnp.argmax(path @ jax.nn.softmax(leaf_logits), -1)
    np.testing.assert_array_equal(cls, soft)
    np.testing.assert_array_equal(cls, [2, 1])


def test_tree_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        _init(models.SoftDecisionTree(depth=0, num_classes=3), jnp.ones((1, 2, 2, 1)))


def test_build_registry():
    assert isinstance(models.build("cnn", 3), models.SmallCNN)
    with pytest.raises(ValueError, match="kind 'resnet' is not known"):
        models.build("resnet", 3)


def test_jitted_equals_unjitted():
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 1))
    model = models.SeedCNN(10)
    v = _init(model, x)
    np.testing.assert_allclose(jax.jit(model.apply)(v, x), model.apply(v, x), rtol=1e-5, atol=1e-6)


def test_for_attribution_keeps_parameters_and_outputs():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    model = models.SmallCNN(10)
    v = _init(model, x)
    twin = models.for_attribution(model)
    assert twin.impl == "patches"
    np.testing.assert_allclose(twin.apply(v, x), model.apply(v, x), rtol=1e-5, atol=1e-5)
    mlp = models.MLP(10)
    assert models.for_attribution(mlp) is mlp


def test_layer_order_follows_the_forward_pass_not_dict_order():
    """After device_get/orbax the params dict is sorted; the order must come from the model itself."""
    import flax.linen as nn

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            for i in range(1, 12):  # dense1 ... dense11: sorted order puts dense10 and dense11 before dense2
                x = nn.relu(nn.Dense(4, name=f"dense{i}")(x))
            return nn.Dense(3, name="head")(x)

    x = jnp.zeros((1, 4, 4, 1))
    variables = Deep().init(jax.random.PRNGKey(0), x)
    shuffled = {"params": dict(sorted(variables["params"].items()))}
    assert list(shuffled["params"])[:3] == ["dense1", "dense10", "dense11"]
    assert models.layer_order(Deep(), shuffled, x) == [f"dense{i}" for i in range(1, 12)] + ["head"]
    seed = models.SeedCNN(10)
    assert models.layer_order(seed, seed.init(jax.random.PRNGKey(0), x), x) == [
        "conv1", "conv2", "conv3", "conv4", "dense1", "head"]


def test_tree_hard_predict_is_one_program_and_traceable():
    from distill_jax.compilation import CompileCounter

    depth = 3
    rng = np.random.default_rng(3)
    routing = rng.uniform(size=(5, 2**depth - 1)).astype(np.float32)
    leaf_logits = rng.normal(size=(2**depth, 6)).astype(np.float32)
    with CompileCounter() as first:
        leaf, cls = models.tree_hard_predict(routing, leaf_logits, depth)
    with CompileCounter() as again:
        models.tree_hard_predict(routing + 0.01, leaf_logits, depth)
    assert (first.count, again.count) == (1, 0)
    want = []  # the greedy walk by hand: left child 2i+1, right 2i+2
    for r in routing:
        node = 0
        for _ in range(depth):
            node = 2 * node + 1 + int(r[node] > 0.5)
        want.append(node - (2**depth - 1))
    np.testing.assert_array_equal(leaf, want)
    np.testing.assert_array_equal(cls, np.argmax(leaf_logits[want], -1))
    jitted = jax.jit(lambda r: models.tree_hard_predict(r, leaf_logits, depth))(routing)
    np.testing.assert_array_equal(jitted[0], want)


def test_queries_run_the_network_as_built_on_cpu_and_with_xla_convolutions_elsewhere():
    from distill_jax import backend, models

    model = models.SeedCNN(num_classes=10, impl="patches")
    with backend.override("cpu"):
        assert models.for_queries(model).impl == "patches" and models.for_queries(model.clone(impl="lax_conv")).impl == "lax_conv"
    with backend.override("gpu"):
        assert models.for_queries(model).impl == "lax_conv"
    linear = models.Linear(num_classes=10, n_components=4)
    assert models.for_queries(linear) is linear  # no impl: as it is
