"""Tests for distill_jax.analysis: exact decompositions, CKA invariants, CAV/TCAV, tree usage."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import analysis, attr, models


def _orthonormal_rows(key, k, d):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (d, k)))
    return q.T  # [k, d]


def test_linear_contributions_sum_to_logits():
    k, d, c, b = 5, 12, 3, 4
    keys = jax.random.split(jax.random.key(0), 5)
    comps = _orthonormal_rows(keys[0], k, d)
    mean = jax.random.normal(keys[1], (d,))
    x = jax.random.normal(keys[2], (b, 3, 4))
    w = jax.random.normal(keys[3], (k, c))
    bias = jax.random.normal(keys[4], (c,))
    z = (x.reshape(b, -1) - mean) @ comps.T
    logits = z @ w + bias
    out = analysis.linear_contributions(w, bias, z, comps, x=x, mean=mean)
    assert out["components"].shape == (b, c, k) and out["pixels"].shape == (b, c, d)
    np.testing.assert_allclose(out["components"][1, 2, 3], w[3, 2] * z[1, 3], rtol=1e-6)
    np.testing.assert_allclose(out["components"].sum(-1) + bias, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["pixels"].sum(-1) + bias, logits, rtol=1e-5, atol=1e-5)
    # without x, the projection z @ P stands in for x - mean: exact for orthonormal P too
    out2 = analysis.linear_contributions(w, bias, z, comps)
    np.testing.assert_allclose(out2["pixels"].sum(-1) + bias, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(analysis.linear_contributions)(w, bias, z, comps)["pixels"], out2["pixels"], rtol=1e-6, atol=1e-6)
    assert "pixels" not in analysis.linear_contributions(w, bias, z)
    with pytest.raises(ValueError, match="z must be"):
        analysis.linear_contributions(w, bias, z[:, :2])
    with pytest.raises(ValueError, match="bias"):
        analysis.linear_contributions(w, bias[:2], z)


def test_class_templates():
    w = jnp.array([[1.0, 0.0], [2.0, -1.0]])  # [k=2, C=2]
    comps = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # [k=2, d=3]
    np.testing.assert_allclose(analysis.class_templates(w, comps), [[1.0, 2.0, 2.0], [0.0, -1.0, -1.0]])
    with pytest.raises(ValueError, match="share k"):
        analysis.class_templates(w, comps[:1])


def _cka_numpy(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    return np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))


@pytest.mark.parametrize("n,p,q", [(20, 8, 6), (10, 30, 40)])  # feature form and Gram form
def test_linear_cka_invariants(n, p, q):
    ka, kb, kq = jax.random.split(jax.random.key(1), 3)
    a = jax.random.normal(ka, (n, p))
    b = a[:, : min(p, q)] @ jax.random.normal(kb, (min(p, q), q)) + 0.5 * jax.random.normal(kq, (n, q))
    np.testing.assert_allclose(analysis.linear_cka(a, a), 1.0, rtol=1e-5)
    ref = analysis.linear_cka(a, b)
    np.testing.assert_allclose(ref, _cka_numpy(a, b), rtol=1e-4)
    qmat, _ = jnp.linalg.qr(jax.random.normal(kq, (p, p)))
    np.testing.assert_allclose(analysis.linear_cka(a @ qmat, b), ref, rtol=1e-4)
    np.testing.assert_allclose(analysis.linear_cka(3.7 * a, 0.2 * b), ref, rtol=1e-4)
    np.testing.assert_allclose(analysis.linear_cka(a + 5.0, b), ref, rtol=1e-4)  # centred
    np.testing.assert_allclose(jax.jit(analysis.linear_cka)(a, b), ref, rtol=1e-5)
    assert 0.0 < float(ref) < 1.0


def test_linear_cka_bad_shapes():
    with pytest.raises(ValueError, match="same number"):
        analysis.linear_cka(jnp.ones((4, 2)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match=r"\[n, features\]"):
        analysis.linear_cka(jnp.ones((4,)), jnp.ones((4, 2)))


def test_cka_matrix():
    keys = jax.random.split(jax.random.key(2), 3)
    fa = {"conv1": jax.random.normal(keys[0], (16, 4, 4, 3)), "dense": jax.random.normal(keys[1], (16, 7))}
    fb = {"h": jax.random.normal(keys[2], (16, 5)), "conv1_copy": fa["conv1"]}
    names_a, names_b, m = analysis.cka_matrix(fa, fb)
    assert names_a == ["conv1", "dense"] and names_b == ["h", "conv1_copy"] and m.shape == (2, 2)
    np.testing.assert_allclose(m[0, 1], 1.0, rtol=1e-5)
    np.testing.assert_allclose(m[1, 0], analysis.linear_cka(fa["dense"], fb["h"]), rtol=1e-4)
    np.testing.assert_allclose(m[0, 0], analysis.linear_cka(fa["conv1"].reshape(16, -1), fb["h"]), rtol=1e-4)
    with pytest.raises(ValueError, match="same n"):
        analysis.cka_matrix(fa, {"h": jnp.ones((8, 3))})


def _concept_model():
    """features h = x_flat @ M; logits = h @ V. The concept direction in h is u = M^T d."""
    d_in, d_h = 12, 6
    m = jax.random.normal(jax.random.key(3), (d_in, d_h))
    v = jax.random.normal(jax.random.key(4), (d_h, 2))

    def forward_fn(x, deltas=None):
        h = x.reshape(x.shape[0], -1) @ m + (deltas or {}).get("h", 0.0)
        return h @ v, {"h": h}

    return forward_fn, m, v


@pytest.mark.parametrize("method", ["logistic", "mean_difference"])
def test_cav_and_tcav(method):
    forward_fn, m, v = _concept_model()
    direction = jax.random.normal(jax.random.key(5), (12,))
    random_x = 0.3 * jax.random.normal(jax.random.key(6), (40, 3, 4))
    concept_x = 0.3 * jax.random.normal(jax.random.key(7), (30, 3, 4)) + direction.reshape(3, 4)
    cav = attr.concept_activation_vector(forward_fn, concept_x, random_x, layer="h", key=jax.random.key(8), method=method)
    assert cav.shape == (6,)
    np.testing.assert_allclose(jnp.linalg.norm(cav), 1.0, rtol=1e-5)
    u = direction @ m
    assert float(cav @ u / jnp.linalg.norm(u)) > 0.9
    # the directional derivative of logit c along cav is V[:, c] . cav for every example
    x = jax.random.normal(jax.random.key(9), (10, 3, 4))
    expected = (v.T @ cav > 0).astype(jnp.float32)
    for c in (0, 1):
        score, derivs = attr.tcav_score(forward_fn, x, jnp.full(10, c), cav, layer="h", return_derivatives=True)
        np.testing.assert_allclose(derivs, jnp.full(10, v[:, c] @ cav), rtol=1e-5)
        assert float(score) == float(expected[c])


def test_cav_bad_inputs():
    forward_fn, _, _ = _concept_model()
    x = jnp.ones((4, 3, 4))
    with pytest.raises(ValueError, match="concept_x"):
        attr.concept_activation_vector(forward_fn, jnp.ones((0, 3, 4)), x, layer="h", key=jax.random.key(0))
    with pytest.raises(ValueError, match="random_x"):
        attr.concept_activation_vector(forward_fn, x, jnp.ones((0, 3, 4)), layer="h", key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'z'.*\['h'\]"):
        attr.concept_activation_vector(forward_fn, x, x, layer="z", key=jax.random.key(0))
    with pytest.raises(ValueError, match="cav must have"):
        attr.tcav_score(forward_fn, x, jnp.zeros(4, jnp.int32), jnp.ones(5), layer="h")
    with pytest.raises(ValueError, match="target values"):
        attr.tcav_score(forward_fn, x, jnp.full(4, 2), jnp.ones(6), layer="h")


def _concept_pair():
    """The same model as `_concept_model`, cut in two without any dict or deltas."""
    _, m, v = _concept_model()
    return (lambda x: x.reshape(x.shape[0], -1) @ m, lambda h: h @ v)


@pytest.mark.parametrize("method", ["logistic", "mean_difference"])
def test_cav_and_tcav_pair_form_equal_forward_fn_form(method):
    forward_fn, _, v = _concept_model()
    pair = _concept_pair()
    direction = jax.random.normal(jax.random.key(5), (12,))
    random_x = 0.3 * jax.random.normal(jax.random.key(6), (40, 3, 4))
    concept_x = 0.3 * jax.random.normal(jax.random.key(7), (30, 3, 4)) + direction.reshape(3, 4)
    kw = dict(key=jax.random.key(8), method=method, **({"steps": 50} if method == "logistic" else {}))
    want = attr.concept_activation_vector(forward_fn, concept_x, random_x, layer="h", **kw)
    got = attr.concept_activation_vector(pair, concept_x, random_x, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    x = jax.random.normal(jax.random.key(9), (10, 3, 4))
    t = jnp.array([0, 1] * 5)
    cav = v[:, 0] / jnp.linalg.norm(v[:, 0])  # derivative |V[:, 0]| > 0 for class 0; V[:, 1] . cav for class 1
    score_f, derivs_f = attr.tcav_score(forward_fn, x, t, cav, layer="h", return_derivatives=True)
    score_p, derivs_p = attr.tcav_score(pair, x, t, cav, return_derivatives=True)
    np.testing.assert_allclose(derivs_p, derivs_f, rtol=1e-5, atol=1e-6)
    expected = float(jnp.mean((v[:, t].T @ cav) > 0))
    assert float(score_p) == float(score_f) == expected and expected >= 0.5
    jitted = jax.jit(lambda v, tt: attr.tcav_score(pair, v, tt, cav, return_derivatives=True))(x, t)
    np.testing.assert_allclose(jitted[1], derivs_f, rtol=1e-5, atol=1e-6)


def test_tcav_on_a_linen_model_split_at_dense1():
    """SmallCNN by its feature dict (forward_fn + layer="dense1") and cut by hand after dense1
    (features_fn -> dense1 [B, 64], head_fn = its `head` Dense): the same derivatives and CAV."""
    model = models.SmallCNN(num_classes=3)
    x = jax.random.uniform(jax.random.key(11), (6, 8, 8, 1))
    variables = model.init(jax.random.key(12), x)
    forward_fn = models.forward_with_features(model, variables)
    pair = (lambda v: forward_fn(v)[1]["dense1"], lambda h: nn.Dense(3).apply({"params": variables["params"]["head"]}, h))
    np.testing.assert_allclose(pair[1](pair[0](x)), model.apply(variables, x), rtol=1e-5, atol=1e-6)
    t = jnp.array([0, 1, 2, 0, 1, 2])
    cav = attr.concept_activation_vector(forward_fn, x[:3], x[3:], layer="dense1", key=jax.random.key(0),
                                             method="mean_difference")
    np.testing.assert_allclose(attr.concept_activation_vector(pair, x[:3], x[3:], key=jax.random.key(0),
                                                                  method="mean_difference"), cav, rtol=1e-5, atol=1e-6)
    _, want = attr.tcav_score(forward_fn, x, t, cav, layer="dense1", return_derivatives=True)
    _, got = attr.tcav_score(pair, x, t, cav, return_derivatives=True)
    assert float(jnp.max(jnp.abs(want))) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_tcav_pair_bad_inputs():
    pair = _concept_pair()
    forward_fn, _, _ = _concept_model()
    x = jnp.ones((4, 3, 4))
    for call, match in [
        (lambda: attr.tcav_score(pair, x, jnp.zeros(4, jnp.int32), jnp.ones(6), layer="h"), "layer must be None"),
        (lambda: attr.tcav_score(forward_fn, x, jnp.zeros(4, jnp.int32), jnp.ones(6)), "layer must name"),
        (lambda: attr.tcav_score(pair, x, jnp.zeros(4, jnp.int32), jnp.ones(5)), r"cav must have .*features_fn"),
        (lambda: attr.tcav_score(pair, x, jnp.zeros((4, 2), jnp.int32), jnp.ones(6)), r"target must be \[batch\]"),
        (lambda: attr.concept_activation_vector((pair[0],), x, x, key=jax.random.key(0)), "pair"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_tree_usage_hand_computed():
    path_probs = jnp.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.5, 0.3, 0.1, 0.1]])
    labels = jnp.array([0, 0, 2, 1])
    out = analysis.tree_usage(path_probs, labels, 3)
    np.testing.assert_allclose(out["soft"], [[0.45, 0.35, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(out["hard"], [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(out["counts"], [2, 1, 1])
    empty = analysis.tree_usage(path_probs, labels, 4)  # class 3 has no examples: zeros, not NaN
    np.testing.assert_allclose(empty["soft"][3], 0.0)
    jitted = jax.jit(analysis.tree_usage, static_argnums=2)(path_probs, labels, 3)
    np.testing.assert_allclose(jitted["soft"], out["soft"], rtol=1e-6)
    hard = analysis.tree_usage(path_probs, labels, 3, hard_leaf=jnp.array([3, 3, 3, 3]))["hard"]
    np.testing.assert_allclose(hard[:, 3], 1.0)
    with pytest.raises(ValueError, match="labels"):
        analysis.tree_usage(path_probs, labels.at[0].set(5), 3)


def test_node_filters():
    kernel = jnp.arange(24.0).reshape(12, 2)
    filt = analysis.node_filters(kernel, (3, 4, 1))
    assert filt.shape == (2, 3, 4, 1)
    np.testing.assert_array_equal(filt[1].reshape(-1), kernel[:, 1])
    with pytest.raises(ValueError, match="kernel"):
        analysis.node_filters(kernel, (3, 3, 1))


def test_cka_matrix_equals_the_direct_numpy_formula():
    # CKA(A, B) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F), Kc = H A A^T H, in float64 from host inputs
    rng = np.random.default_rng(5)
    fa = {"conv": rng.normal(size=(12, 3, 3, 2)).astype(np.float32), "dense": rng.normal(size=(12, 5)).astype(np.float32)}
    fb = {"h": rng.normal(size=(12, 4)).astype(np.float32) + 3.0}

    def gram(v):
        v = np.asarray(v, np.float64).reshape(len(v), -1)
        v = v - v.mean(0)
        return v @ v.T

    _, _, m = analysis.cka_matrix(fa, fb)
    for i, a in enumerate(fa.values()):
        k, l = gram(a), gram(fb["h"])
        np.testing.assert_allclose(m[i, 0], np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l)), rtol=1e-5)


def test_each_call_is_one_compiled_program_and_a_repeat_none():
    """Host (numpy) inputs of a shape no other test uses: one program per public call, none when repeated."""
    from distill_jax.compilation import CompileCounter

    rng = np.random.default_rng(6)
    k, d, c, b = 3, 10, 4, 7
    w, bias = rng.normal(size=(k, c)).astype(np.float32), rng.normal(size=c).astype(np.float32)
    comps, mean = rng.normal(size=(k, d)).astype(np.float32), rng.normal(size=d).astype(np.float32)
    x = rng.normal(size=(b, 2, 5)).astype(np.float32)
    z = rng.normal(size=(b, k)).astype(np.float32)
    probs = rng.dirichlet(np.ones(8), size=b).astype(np.float32)
    labels = rng.integers(0, c, b)
    calls = {
        "linear_contributions": lambda: analysis.linear_contributions(w, bias, z, comps, x=x, mean=mean),
        "class_templates": lambda: analysis.class_templates(w, comps),
        "linear_cka": lambda: analysis.linear_cka(x.reshape(b, -1), z),
        "cka_matrix": lambda: analysis.cka_matrix({"x": x, "z": z}, {"p": probs}),
        "tree_usage": lambda: analysis.tree_usage(probs, labels, c),
        "node_filters": lambda: analysis.node_filters(comps.T, (2, 5, 1)),
    }
    for name, call in calls.items():
        with CompileCounter() as first:
            jax.block_until_ready(call())
        with CompileCounter() as again:
            jax.block_until_ready(call())
        assert (first.count, again.count) == (1, 0), name
    out = calls["linear_contributions"]()  # the host path gives the same numbers
    np.testing.assert_allclose(out["pixels"].sum(-1) + bias, (x.reshape(b, -1) - mean) @ (w.T @ comps).T + bias,
                               rtol=1e-4, atol=1e-4)
