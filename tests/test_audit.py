"""Direct value tests of distill_jax.audit on tiny models (8x8x1 inputs): each result against the library
function it wraps, called by hand, or against a closed form (linear student, soft-tree usage)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import analysis, attr, audit, metrics, models
from distill_jax.audit import _evaluators

N, K = 6, 3
IMAGE = (8, 8, 1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N,) + IMAGE).astype(np.float32))
    t = jnp.asarray(np.array([0, 1, 2, 0, 1, 2], np.int32))
    return x, t


@pytest.fixture(scope="module")
def cnn(batch):
    model = models.SmallCNN(K)
    return model, model.init(jax.random.PRNGKey(1), batch[0][:2])


@pytest.fixture(scope="module")
def linear():
    """A Linear student over 4 orthonormal components with a non-zero PCA mean."""
    model = models.Linear(K, n_components=4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(2), jnp.zeros((1,) + IMAGE))
    assert shapes["params"]["linear"]["kernel"].shape == (4, K)  # the layout filled in below
    comps = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (64, 4)))[0].T  # [4, 64], orthonormal rows
    mean = 0.1 * jax.random.normal(jax.random.PRNGKey(4), (64,))
    params = {"linear": {"kernel": jax.random.normal(jax.random.PRNGKey(5), (4, K)),
                         "bias": jnp.array([0.5, -0.25, 1.0])}}
    return model, {"params": params, "pca": {"mean": mean, "components": comps}}


def test_linear_student_is_the_exact_component_decomposition(linear, batch):
    """contrib[b, c, j] = W[j, c] z[b, j], z = (x - mean) P^T; sum_j contrib + b = logits = T_c . (x - mean) + b_c."""
    model, variables = linear
    x, _ = batch
    out = audit.linear_student(variables, x, IMAGE)
    w = np.asarray(variables["params"]["linear"]["kernel"], np.float64)
    b = np.asarray(variables["params"]["linear"]["bias"], np.float64)
    comps = np.asarray(variables["pca"]["components"], np.float64)
    centred = np.asarray(x, np.float64).reshape(N, -1) - np.asarray(variables["pca"]["mean"], np.float64)
    z = centred @ comps.T
    np.testing.assert_allclose(out["component_contributions"], z[:, None, :] * w.T[None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["logits"], z @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"], model.apply(variables, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["component_contributions"].sum(-1) + b, out["logits"], rtol=1e-5, atol=1e-5)
    templates = out["templates"]
    assert templates.shape == (K,) + IMAGE
    np.testing.assert_allclose(templates.reshape(K, -1), w.T @ comps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(centred @ templates.reshape(K, -1).T + b, out["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["bias"], b.astype(np.float32))
    np.testing.assert_allclose(out["z"], z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["centred"], centred, rtol=1e-6, atol=1e-6)


def test_features_of_equals_the_models_features_and_drops_non_batch_entries(cnn, batch):
    x, _ = batch
    model, variables = cnn
    feats = audit.features_of(model, variables, x)
    _, want = model.apply(variables, x, return_features=True)
    assert sorted(feats) == ["conv1", "conv2", "dense1"]
    for name in feats:
        np.testing.assert_allclose(feats[name], want[name], rtol=1e-4, atol=1e-5)
    # a soft tree's leaf_logits [leaves, classes] is not per example: left out (4 leaves != 6 images)
    tree = models.SoftDecisionTree(2, K)
    t_vars = tree.init(jax.random.PRNGKey(6), x[:2])
    t_feats = audit.features_of(tree, t_vars, x)
    _, t_want = tree.apply(t_vars, x, return_features=True)
    assert sorted(t_feats) == ["node_reach", "path_probs", "routing"]
    for name in t_feats:
        np.testing.assert_allclose(t_feats[name], t_want[name], rtol=1e-5, atol=1e-6)


def test_cka_is_linear_cka_of_every_layer_pair(cnn, batch):
    x, _ = batch
    model, variables = cnn
    feats = audit.features_of(model, variables, x)
    out = audit.cka_scores(feats, {"dense1": feats["dense1"]})
    assert out["teacher_layers"] == ["conv1", "conv2", "dense1"] and out["student_layers"] == ["dense1"]
    flat = lambda a: jnp.asarray(a).reshape(len(a), -1)  # noqa: E731
    want = [[float(analysis.linear_cka(flat(feats[t]), flat(feats["dense1"])))] for t in out["teacher_layers"]]
    np.testing.assert_allclose(out["matrix"], want, rtol=1e-5)
    assert out["matrix"][2][0] == pytest.approx(1.0, abs=1e-5)  # a layer against itself


def test_spatial_layer_picks_the_deepest_map_of_at_least_4x4(cnn, linear, batch):
    x, _ = batch
    assert audit.spatial_layer(*cnn, x[:1]) == "conv2"  # conv1 8x8, conv2 4x4: both qualify, conv2 is deeper
    wide = models.ConvNet(K, conv_features=(4, 4, 4), dense_features=())
    w_vars = wide.init(jax.random.PRNGKey(7), x[:1])
    assert audit.spatial_layer(wide, w_vars, x[:1]) == "conv2"  # conv3 is 2x2
    assert audit.spatial_layer(*linear, x[:1]) is None


def test_attribution_maps_equal_the_explain_functions_called_directly(cnn, batch):
    x, t = batch
    model, variables = cnn
    key = jax.random.PRNGKey(8)
    maps = audit.attribution_maps(model, variables, x, t, methods=_evaluators.ATTRIBUTION_METHODS, ig_steps=4,
                                  smoothgrad_samples=2, key=key)
    f = functools.partial(model.apply, variables)
    cam = attr.grad_cam(models.forward_with_features(model, variables), x, t, layer="conv2")
    want = {
        "saliency": attr.saliency(f, x, t),
        "grad_x_input": attr.grad_x_input(f, x, t),
        "integrated_gradients": attr.integrated_gradients(f, x, t, steps=4),
        "smoothgrad": attr.smoothgrad(attr.saliency, f, x, t, key=key, samples=2),
        "grad_cam": jnp.broadcast_to(cam[..., None], x.shape),  # the map of conv2, broadcast over channels
        "occlusion": attr.occlusion(f, x, t, patch=2, stride=1),  # patch = min(8, 8) // 4, stride = patch // 2
    }
    assert sorted(maps) == sorted(want)
    for name, value in want.items():
        assert maps[name].shape == x.shape, name
        np.testing.assert_allclose(maps[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
    assert float(np.abs(maps["grad_cam"]).max()) > 0


def test_attribution_maps_skip_grad_cam_without_a_spatial_layer_and_refuse_unknown_methods(linear, batch):
    x, t = batch
    model, variables = linear
    maps = audit.attribution_maps(model, variables, x, t, methods=("grad_cam", "saliency"), ig_steps=2,
                                  smoothgrad_samples=1, key=jax.random.PRNGKey(0))
    assert list(maps) == ["saliency"]
    # a linear model's saliency is |template of the target class| (the model's input gradient)
    templates = audit.linear_student(variables, x, IMAGE)["templates"]
    np.testing.assert_allclose(maps["saliency"], np.abs(templates[np.asarray(t)]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'lrp' is not known"):
        audit.attribution_maps(model, variables, x, t, methods=("lrp",), ig_steps=2, smoothgrad_samples=1,
                               key=jax.random.PRNGKey(0))


def test_ig_completeness_is_the_mean_relative_error(cnn, batch):
    """mean_b |sum A_b - (f_t(x_b) - f_t(0))| / |f_t(x_b) - f_t(0)| for any map A (here IG and 2 x IG)."""
    x, t = batch
    model, variables = cnn
    f = functools.partial(model.apply, variables)
    ig = np.asarray(attr.integrated_gradients(f, x, t, steps=8))
    rows = np.arange(N)
    delta = np.asarray(f(x), np.float64)[rows, t] - np.asarray(f(jnp.zeros_like(x)), np.float64)[rows, t]
    for scale in (1.0, 2.0):
        total = scale * ig.reshape(N, -1).astype(np.float64).sum(1)
        want = np.mean(np.abs(total - delta) / np.abs(delta))
        assert audit.ig_completeness(model, variables, x, t, scale * ig) == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_faithfulness_scores_are_the_metrics_means(linear, batch):
    x, t = batch
    model, variables = linear
    f = functools.partial(model.apply, variables)
    m = np.asarray(jax.random.normal(jax.random.PRNGKey(9), x.shape))
    other = np.asarray(jax.random.normal(jax.random.PRNGKey(10), x.shape))
    scores, curves = audit.faithfulness_scores(model, variables, x, t, {"a": m}, {"a": other}, steps=4)
    d_auc, d_curve = metrics.deletion_auc(f, x, m, t, steps=4, return_curve=True)
    i_auc, i_curve = metrics.insertion_auc(f, x, m, t, steps=4, return_curve=True)
    s = scores["a"]
    assert s["deletion_auc"] == pytest.approx(float(jnp.mean(d_auc)), rel=1e-5)
    assert s["insertion_auc"] == pytest.approx(float(jnp.mean(i_auc)), rel=1e-5)
    a, b = np.abs(m).sum(-1), np.abs(other).sum(-1)
    assert s["spearman_vs_teacher"] == pytest.approx(float(jnp.mean(metrics.spearman(a, b))), rel=1e-5, abs=1e-6)
    assert s["top10_overlap_vs_teacher"] == pytest.approx(float(jnp.mean(metrics.top_k_overlap(a, b, k=6))))
    np.testing.assert_allclose(curves["a"]["deletion"], np.asarray(d_curve).mean(0), rtol=1e-5)
    np.testing.assert_allclose(curves["a"]["insertion"], np.asarray(i_curve).mean(0), rtol=1e-5)
    same, _ = audit.faithfulness_scores(model, variables, x, t, {"a": m}, {"a": -m}, steps=4)  # |map| agrees with itself
    assert same["a"]["spearman_vs_teacher"] == pytest.approx(1.0) and same["a"]["top10_overlap_vs_teacher"] == 1.0
    alone, _ = audit.faithfulness_scores(model, variables, x, t, {"a": m}, None, steps=4)
    assert sorted(alone["a"]) == ["deletion_auc", "insertion_auc"]


def test_tree_student_usage_and_read_outs_by_hand(batch):
    """Greedy leaves followed by hand from the node decisions; usage rows are shares (sum 1), empty classes 0."""
    x, _ = batch
    x = jnp.concatenate([x, -x])  # 12 images
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 2], np.int32)
    tree = models.SoftDecisionTree(2, 4)
    variables = tree.init(jax.random.PRNGKey(11), x[:2])
    out = audit.tree_student(tree, variables, x, labels, 4, IMAGE)  # class 3 has no examples
    p = variables["params"]
    kernel, bias = np.asarray(p["nodes"]["kernel"], np.float64), np.asarray(p["nodes"]["bias"], np.float64)
    beta = np.log1p(np.exp(float(p["inverse_temperature"])))
    routing = 1 / (1 + np.exp(-beta * (np.asarray(x, np.float64).reshape(12, -1) @ kernel + bias)))
    leaf = []
    for r in routing:
        node = 0
        for _ in range(2):
            node = 2 * node + 1 + int(r[node] > 0.5)
        leaf.append(node - 3)
    hard = np.zeros((4, 4))
    for c, l in zip(labels, leaf):
        hard[c, l] += 1
    hard[:3] /= np.bincount(labels)[:, None]
    np.testing.assert_allclose(out["usage"]["hard"], hard, atol=1e-6)
    np.testing.assert_allclose(out["usage"]["hard"].sum(1), [1, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(out["usage"]["soft"].sum(1), [1, 1, 1, 0], atol=1e-5)
    np.testing.assert_array_equal(out["usage"]["counts"], [4, 4, 4, 0])
    # soft usage: the class mean of the leaf probabilities (products of routing probabilities along each path)
    r = routing
    path = np.stack([(1 - r[:, 0]) * (1 - r[:, 1]), (1 - r[:, 0]) * r[:, 1],
                     r[:, 0] * (1 - r[:, 2]), r[:, 0] * r[:, 2]], 1)
    soft = np.stack([path[labels == c].mean(0) for c in range(3)] + [np.zeros(4)])
    np.testing.assert_allclose(out["usage"]["soft"], soft, rtol=1e-4, atol=1e-6)
    leaf_logits = np.asarray(p["leaf_logits"], np.float64)
    want_leaf = np.exp(leaf_logits) / np.exp(leaf_logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(out["leaf_probs"], want_leaf, rtol=1e-5)
    np.testing.assert_allclose(out["filters"], kernel.T.reshape((3,) + IMAGE), rtol=1e-6)
    assert out["depth"] == 2
