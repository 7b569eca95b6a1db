"""Tests for distill_jax.losses: numpy float64 references, hand-computed examples,
invariants, analytic gradients, finite differences, jit vs un-jit, and bad input."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from distill_jax.distill import losses

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- numpy references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_kd(s, t, T):
    """T^2 * sum_c p_t (log p_t - log p_s), straight from the formula, float64."""
    log_pt = np_log_softmax(np.asarray(t, np.float64) / T)
    log_ps = np_log_softmax(np.asarray(s, np.float64) / T)
    return T**2 * np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)


def logits(b=5, c=7, scale=3.0):
    return (scale * RNG.standard_normal((b, c))).astype(np.float32)


# --------------------------------------------------------------------------- loss-based


def test_cross_entropy_matches_numpy():
    z = logits()
    y = np.array([0, 3, 6, 2, 2], np.int32)
    expected = -np_log_softmax(z)[np.arange(5), y]
    np.testing.assert_allclose(losses.cross_entropy(z, y), expected, rtol=1e-5)
    one_hot = np.eye(7, dtype=np.float32)[y]
    np.testing.assert_allclose(losses.soft_cross_entropy(z, one_hot), expected, rtol=1e-5)
    q = np_softmax(logits()).astype(np.float32)
    np.testing.assert_allclose(
        losses.soft_cross_entropy(z, q), -(q * np_log_softmax(z)).sum(-1), rtol=1e-5
    )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0, 100.0])
def test_kd_loss_matches_numpy_float64(temperature):
    s, t = logits(6, 10), logits(6, 10)
    with jax.enable_x64(True):
        got = losses.kd_loss(s.astype(np.float64), t.astype(np.float64), temperature=temperature)
        assert got.dtype == jnp.float64 and got.shape == (6,)
        np.testing.assert_allclose(got, np_kd(s, t, temperature), rtol=1e-10, atol=1e-12)
    got32 = losses.kd_loss(s, t, temperature=temperature)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, np_kd(s, t, temperature), rtol=2e-4, atol=1e-5)


def test_kd_loss_zero_exactly_for_per_example_shift():
    # Dyadic logits, shifts and temperatures: every operation is exact up to the final
    # log-sum-exp, which sees identical inputs, so the loss is exactly 0.0.
    t = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 0.25, -1.5, 2.0]], np.float32)
    s = t + np.array([[8.0], [-0.5]], np.float32)
    for temperature in (0.5, 1.0, 2.0, 64.0):
        np.testing.assert_array_equal(losses.kd_loss(s, t, temperature=temperature), 0.0)
    # Arbitrary shifts in float64: 0 up to rounding; any other perturbation: > 0.
    with jax.enable_x64(True):
        t64 = RNG.standard_normal((8, 10)) * 5
        s64 = t64 + RNG.standard_normal((8, 1)) * 100
        for temperature in (0.5, 1.0, 20.0, 100.0):
            assert np.max(np.abs(losses.kd_loss(s64, t64, temperature=temperature))) < 1e-9
            bumped = s64.copy()
            bumped[:, 3] += 0.01  # not a constant shift in any row
            assert np.all(losses.kd_loss(bumped, t64, temperature=temperature) > 0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 20.0, 100.0])
def test_kd_loss_gradient_is_T_times_softmax_difference(temperature):
    s, t = logits(4, 6), logits(4, 6)
    with jax.enable_x64(True):
        grad = jax.grad(lambda z: losses.kd_loss(z, t.astype(np.float64),
                                                 temperature=temperature).sum())(
            s.astype(np.float64)
        )
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    expected = temperature * (np_softmax(s64 / temperature) - np_softmax(t64 / temperature))
    np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 20.0, 100.0])
def test_kd_loss_finite_at_logits_1e4(temperature):
    s = np.array([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, 1e4, 1e4], [1e4, 1e4, 1e4, -1e4]],
                 np.float32)
    t = np.array([[-1e4, 1e4, 0.0, -5e3], [1e4, -1e4, -1e4, 1e4], [1e4, 1e4, 1e4, -1e4]],
                 np.float32)
    f = functools.partial(losses.kd_loss, temperature=temperature)
    value = f(s, t)
    grad_s, grad_t = jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(s, t)
    for arr in (value, grad_s, grad_t):
        assert np.all(np.isfinite(arr))
    np.testing.assert_allclose(value, np_kd(s, t, temperature), rtol=1e-5, atol=1e-3)
    assert value[2] == 0.0  # identical rows
    d = functools.partial(losses.distillation_loss, temperature=temperature, alpha=0.5)
    y = np.array([0, 1, 2], np.int32)
    assert np.all(np.isfinite(d(s, t, y)))
    assert np.all(np.isfinite(jax.grad(lambda a: d(a, t, y).sum())(s)))


def test_distillation_loss_mixes_kd_and_ce():
    s, t = logits(), logits()
    y = np.array([1, 0, 4, 6, 2], np.int32)
    kd = np_kd(s, t, 3.0)
    ce = -np_log_softmax(s)[np.arange(5), y]
    for alpha in (0.0, 0.3, 1.0):
        got = losses.distillation_loss(s, t, y, temperature=3.0, alpha=alpha)
        np.testing.assert_allclose(got, alpha * kd + (1 - alpha) * ce, rtol=1e-4, atol=1e-6)


def test_logit_matching_loss_is_mean_squared_error():
    s = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    t = np.array([[1.0, 0.0, 0.0], [1.0, -1.0, 2.0]], np.float32)
    np.testing.assert_allclose(losses.logit_matching_loss(s, t), [13 / 3, 2.0], rtol=1e-6)


# --------------------------------------------------------------------------- model-based


def test_hint_loss_same_shape_and_vectors():
    a = RNG.standard_normal((3, 4, 4, 5)).astype(np.float32)
    b = RNG.standard_normal((3, 4, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        losses.hint_loss(a, b), ((a - b) ** 2).reshape(3, -1).mean(-1), rtol=1e-5
    )
    v = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    w = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(losses.hint_loss(v, w), [2.0, 5.0], rtol=1e-6)


def test_hint_loss_pools_the_larger_grid():
    # teacher 4x4x1 pooled by 2x2 averages to 2x2: [[1.5, 3.5], [5.5, 7.5]] ... by hand:
    teacher = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    # 2x2 averages of [[0,1,2,3],[4,5,6,7],[8,9,10,11],[12,13,14,15]]
    pooled = np.array([[2.5, 4.5], [10.5, 12.5]], np.float32)
    student = np.zeros((1, 2, 2, 1), np.float32)
    np.testing.assert_allclose(losses.hint_loss(student, teacher), [np.mean(pooled**2)], rtol=1e-6)
    np.testing.assert_allclose(losses.hint_loss(pooled[None, :, :, None], teacher), [0.0])
    # larger in one axis each way: student 4x2, teacher 2x4 -> both pooled to 2x2.
    s = np.ones((1, 4, 2, 1), np.float32)
    t = np.full((1, 2, 4, 1), 3.0, np.float32)
    np.testing.assert_allclose(losses.hint_loss(s, t), [4.0])
    # the symmetric case gives the same value
    np.testing.assert_allclose(losses.hint_loss(teacher, student), [np.mean(pooled**2)], rtol=1e-6)


def test_soft_tree_loss_hand_computed():
    # leaf 0 holds [1/2, 1/2], leaf 1 holds [3/4, 1/4].
    leaf_logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]], np.float32)
    path = np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)
    target = np.array([[1.0, 0.0], [0.2, 0.8]], np.float32)
    expected = [
        0.25 * math.log(2) + 0.75 * -math.log(0.75),
        1.0 * math.log(2),
    ]
    got = losses.soft_tree_loss(path, leaf_logits, target)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_soft_tree_kd_loss_is_the_path_weighted_kd_loss_of_each_leaf():
    """T^2 * sum_l P_l KL(softmax(t/T) || softmax(leaf_l/T)) = sum_l P_l * kd_loss(leaf_l, t; T)."""
    rng = np.random.default_rng(0)
    path = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
    leaf_logits = rng.normal(size=(4, 5)).astype(np.float32) * 3
    teacher = rng.normal(size=(3, 5)).astype(np.float32) * 3
    for t in (1.0, 4.0):
        per_leaf = np.stack([losses.kd_loss(np.broadcast_to(leaf, teacher.shape), teacher, temperature=t)
                             for leaf in leaf_logits], axis=1)  # [B, L]
        expected = np.sum(path * per_leaf, axis=1)
        got = losses.soft_tree_kd_loss(path, leaf_logits, teacher, temperature=t)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # zero when every leaf holds the teacher's distribution (one leaf, same logits up to a shift)
    same = losses.soft_tree_kd_loss(np.ones((1, 1), np.float32), teacher[:1] + 2.0, teacher[:1], temperature=4.0)
    np.testing.assert_allclose(same, [0.0], atol=1e-5)


def test_tree_balance_penalty_hand_computed():
    # depth-2 tree: 3 inner nodes (0 root; 1 left child, 2 right child, depth 1).
    routing = np.array([[0.5, 0.2, 0.9], [0.5, 0.6, 0.1]], np.float32)
    reach = np.array([[1.0, 0.5, 0.5], [1.0, 0.5, 0.5]], np.float32)
    # a_0 = 0.5, a_1 = (0.5*0.2 + 0.5*0.6) / 1 = 0.4, a_2 = (0.45 + 0.05) / 1 = 0.5
    per = lambda a: -0.5 * (math.log(a) + math.log(1 - a))  # noqa: E731
    expected = 0.1 * (per(0.5) + 0.5 * per(0.4) + 0.5 * per(0.5))
    got = losses.tree_balance_penalty(reach, routing, strength=0.1)
    assert got.shape == ()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # unequal reach weights the average: a_0 = (3*0.9 + 1*0.1) / 4 = 0.7
    got = losses.tree_balance_penalty(np.array([[3.0], [1.0]], np.float32),
                                      np.array([[0.9], [0.1]], np.float32), strength=2.0)
    np.testing.assert_allclose(got, 2.0 * per(0.7), rtol=1e-6)
    # minimum at perfect balance: strength * log 2 * sum_i 2^-depth(i); depths 0,1,1,2,2,2,2
    n = 7
    balanced = losses.tree_balance_penalty(np.ones((4, n), np.float32),
                                           np.full((4, n), 0.5, np.float32), strength=1.0)
    np.testing.assert_allclose(balanced, math.log(2) * (1 + 2 * 0.5 + 4 * 0.25), rtol=1e-6)


def test_tree_balance_penalty_finite_at_extremes():
    routing = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], np.float32)
    reach = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], np.float32)  # node 1 never reached
    f = lambda r, p: losses.tree_balance_penalty(r, p, strength=1.0)  # noqa: E731
    value = f(reach, routing)
    grads = jax.grad(f, argnums=(0, 1))(reach, routing)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    # nodes 0 and 2: 1 - a_i = 0 is clipped to 1e-6; node 1 unreached counts as balanced
    pinned = -0.5 * math.log(1e-6)
    np.testing.assert_allclose(value, pinned + 0.5 * math.log(2) + 0.5 * pinned, rtol=1e-4)


# --------------------------------------------------------------------------- mask-based


def test_attention_map_hand_computed_and_unit_norm():
    f = np.zeros((1, 2, 2, 2), np.float32)
    f[0, 0, 0] = [3.0, 4.0]   # energy 25 (p=2), 7 (p=1)
    f[0, 1, 1] = [0.0, -5.0]  # energy 25 (p=2), 5 (p=1)
    np.testing.assert_allclose(
        losses.attention_map(f), [[1 / math.sqrt(2), 0, 0, 1 / math.sqrt(2)]], rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.attention_map(f, p=1), [[7 / math.sqrt(74), 0, 0, 5 / math.sqrt(74)]], rtol=1e-6
    )
    feats = RNG.standard_normal((6, 5, 3, 4)).astype(np.float32)
    for p in (1, 2, 3.5, 4):
        q = losses.attention_map(feats, p=p)
        assert q.shape == (6, 15)
        np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-6)
    # all-zero layer: zero map, finite gradient
    zeros = np.zeros((2, 3, 3, 2), np.float32)
    np.testing.assert_array_equal(losses.attention_map(zeros), 0.0)
    g = jax.grad(lambda a: losses.attention_map(a).sum())(zeros)
    assert np.all(np.isfinite(g))


def test_attention_transfer_loss_same_resolution():
    t = RNG.standard_normal((3, 4, 4, 8)).astype(np.float32)
    s = RNG.standard_normal((3, 4, 4, 2)).astype(np.float32)  # channels may differ
    qs, qt = losses.attention_map(s), losses.attention_map(t)
    np.testing.assert_allclose(
        losses.attention_transfer_loss(s, t), ((qs - qt) ** 2).sum(-1), rtol=1e-5
    )
    # invariant to positive scaling of either side; zero against itself
    np.testing.assert_allclose(
        losses.attention_transfer_loss(7.0 * s, 0.1 * t), losses.attention_transfer_loss(s, t),
        rtol=1e-4,
    )
    np.testing.assert_allclose(losses.attention_transfer_loss(t, t), 0.0, atol=1e-12)


def test_attention_transfer_loss_different_resolutions():
    # teacher 4x4 single channel; its energy a^2 average-pooled 2x2 is the student's grid.
    t = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    energy = (t[0, :, :, 0] ** 2).reshape(2, 2, 2, 2).mean(axis=(1, 3))  # [2, 2]
    s_match = np.sqrt(energy)[None, :, :, None]  # its own energy is exactly `energy`
    np.testing.assert_allclose(losses.attention_transfer_loss(s_match, t), [0.0], atol=1e-12)
    np.testing.assert_allclose(losses.attention_transfer_loss(t, s_match), [0.0], atol=1e-12)
    s_flat = np.ones((1, 2, 2, 3), np.float32)
    q_t = energy.ravel() / np.linalg.norm(energy)
    expected = np.sum((np.full(4, 0.5) - q_t) ** 2)
    np.testing.assert_allclose(losses.attention_transfer_loss(s_flat, t), [expected], rtol=1e-5)
    # 8x8 student against 2x2 teacher (factor 4), random values: equals manual pooling
    s8 = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    t2 = RNG.standard_normal((2, 2, 2, 5)).astype(np.float32)
    e_s = (s8**2).sum(-1).reshape(2, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(2, 4)
    e_t = (t2**2).sum(-1).reshape(2, 4)
    manual = ((e_s / np.linalg.norm(e_s, axis=1, keepdims=True)
               - e_t / np.linalg.norm(e_t, axis=1, keepdims=True)) ** 2).sum(-1)
    np.testing.assert_allclose(losses.attention_transfer_loss(s8, t2), manual, rtol=1e-5)


# tiny 2-layer model: x [B, 4, 4, 2] -> 32 -> hidden 8 -> 3 classes
ACTIVATIONS = {"softplus": jax.nn.softplus, "relu": jax.nn.relu, "tanh": jnp.tanh}


def tiny_params(seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return {
        "w1": (r.standard_normal((32, 8)) / 4).astype(dtype),
        "b1": (r.standard_normal(8) * 0.1).astype(dtype),
        "w2": (r.standard_normal((8, 3)) / 2).astype(dtype),
        "b2": np.zeros(3, dtype),
    }


def tiny_apply(params, x, activation="softplus"):
    h = ACTIVATIONS[activation](x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def tiny_batch(dtype=np.float32):
    x = np.random.default_rng(1).standard_normal((3, 4, 4, 2)).astype(dtype)
    return x, np.array([0, 2, 1], np.int32)


def test_input_saliency_of_linear_model_is_weight_magnitude():
    w = RNG.standard_normal((32, 3)).astype(np.float32)
    apply_fn = lambda x: x.reshape(x.shape[0], -1) @ w  # noqa: E731
    x, y = tiny_batch()
    sal = losses.input_saliency(apply_fn, x, y)
    expected = np.abs(w[:, y].T.reshape(3, 4, 4, 2)).sum(-1)
    assert sal.shape == (3, 4, 4)
    np.testing.assert_allclose(sal, expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(losses.input_saliency, static_argnums=0)(apply_fn, x, y),
                               expected, rtol=1e-6)


def _saliency_objective(activation):
    x, y = tiny_batch()
    teacher = tiny_params(seed=5)
    t_sal = losses.input_saliency(functools.partial(tiny_apply, teacher, activation="tanh"), x, y)

    def objective(params):
        student = functools.partial(tiny_apply, params, activation=activation)
        return losses.saliency_matching_loss(student, x, y, t_sal)

    return objective


@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_saliency_matching_jit_and_finite_grads(activation):
    objective = _saliency_objective(activation)
    params = tiny_params()
    value = objective(params)
    assert value.shape == (3,) and np.all((value >= 0) & (value <= 2 + 1e-6))
    grad_fn = jax.grad(lambda p: objective(p).mean())
    g = grad_fn(params)
    g_jit = jax.jit(grad_fn)(params)
    for k in params:
        assert np.all(np.isfinite(g[k])), k
        np.testing.assert_allclose(g_jit[k], g[k], rtol=1e-4, atol=1e-6)
    assert any(np.any(g[k] != 0) for k in ("w1", "b1", "w2"))
    np.testing.assert_allclose(jax.jit(objective)(params), value, rtol=1e-5, atol=1e-7)
    # a student with the teacher's own saliency map scores 0
    x, y = tiny_batch()
    student = functools.partial(tiny_apply, params, activation=activation)
    self_map = losses.input_saliency(student, x, y)
    np.testing.assert_allclose(
        losses.saliency_matching_loss(student, x, y, self_map), 0.0, atol=1e-6
    )


def test_saliency_matching_check_grads_float64():
    with jax.enable_x64(True):
        x, y = tiny_batch(np.float64)
        params = tiny_params(dtype=np.float64)
        t_sal = losses.input_saliency(
            functools.partial(tiny_apply, tiny_params(5, np.float64), activation="tanh"), x, y
        )

        def f(w1, w2):
            p = dict(params, w1=w1, w2=w2)
            return losses.saliency_matching_loss(
                functools.partial(tiny_apply, p, activation="softplus"), x, y, t_sal
            )

        check_grads(f, (params["w1"], params["w2"]), order=1, modes=("rev",))


# --------------------------------------------------------------------------- every loss: grads, jit


def _cases(dtype):
    r = np.random.default_rng(3)
    n = lambda *shape: r.standard_normal(shape).astype(dtype)  # noqa: E731
    probs = lambda b, c: np_softmax(n(b, c)).astype(dtype)  # noqa: E731
    labels = np.array([1, 0, 3, 2], np.int32)
    reach = np.concatenate([np.ones((4, 1)), r.uniform(0.2, 0.8, (4, 2))], 1).astype(dtype)
    base = n(4, 5)
    return {
        "cross_entropy": (losses.cross_entropy, (n(4, 5),), (labels,)),
        "soft_cross_entropy": (losses.soft_cross_entropy, (n(4, 5), probs(4, 5)), ()),
        "kd_loss": (functools.partial(losses.kd_loss, temperature=2.5), (n(4, 5), n(4, 5)), ()),
        # rows 0-1: (t - s) / T spans < 1 (log1p/expm1 branch); rows 2-3: direct branch
        "kd_loss_mixed_branches": (
            functools.partial(losses.kd_loss, temperature=2.0),
            (base, (base + 1.0 + n(4, 5) * np.array([[0.1], [0.2], [3.0], [3.0]])).astype(dtype)),
            (),
        ),
        "distillation_loss": (
            lambda s, t, y: losses.distillation_loss(s, t, y, temperature=4.0, alpha=0.7),
            (n(4, 5), n(4, 5)), (labels,),
        ),
        "logit_matching_loss": (losses.logit_matching_loss, (n(4, 5), n(4, 5)), ()),
        "hint_loss": (losses.hint_loss, (n(4, 4, 4, 3), n(4, 2, 2, 3)), ()),
        "hint_loss_vectors": (losses.hint_loss, (n(4, 6), n(4, 6)), ()),
        "soft_tree_loss": (losses.soft_tree_loss, (probs(4, 4), n(4, 3), probs(4, 3)), ()),
        "soft_tree_kd_loss": (functools.partial(losses.soft_tree_kd_loss, temperature=3.0),
                              (probs(4, 4), n(4, 3), n(4, 3)), ()),
        "tree_balance_penalty": (
            functools.partial(losses.tree_balance_penalty, strength=0.3),
            (reach, r.uniform(0.1, 0.9, (4, 3)).astype(dtype)), (),
        ),
        "attention_map": (losses.attention_map, (n(4, 3, 3, 2) + 0.5,), ()),
        "attention_map_p1": (functools.partial(losses.attention_map, p=1), (n(4, 3, 3, 2),), ()),
        "attention_transfer_loss": (
            losses.attention_transfer_loss, (n(4, 2, 2, 3), n(4, 4, 4, 5)), (),
        ),
    }


CASE_NAMES = list(_cases(np.float32))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_check_grads_float64(name):
    with jax.enable_x64(True):
        fn, diff_args, fixed = _cases(np.float64)[name]
        check_grads(lambda *a: fn(*a, *fixed), diff_args, order=1, modes=("rev",))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jit_matches_unjit(name):
    fn, diff_args, fixed = _cases(np.float32)[name]
    eager = fn(*diff_args, *fixed)
    jitted = jax.jit(fn)(*diff_args, *fixed)
    assert eager.shape == jitted.shape
    if name not in ("tree_balance_penalty", "attention_map", "attention_map_p1"):
        assert eager.shape == (4,)  # one value per example
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_traced_hyperparameters_are_accepted():
    s, t = logits(3, 4), logits(3, 4)
    y = np.array([0, 1, 2], np.int32)
    f = jax.jit(lambda temp, a: losses.distillation_loss(s, t, y, temperature=temp, alpha=a))
    np.testing.assert_allclose(
        f(2.0, 0.25), losses.distillation_loss(s, t, y, temperature=2.0, alpha=0.25), rtol=1e-5
    )


# --------------------------------------------------------------------------- bad input


def _apply_linear(x):
    return x.reshape(x.shape[0], -1) @ jnp.ones((x[0].size, 3), x.dtype)


_L = np.zeros((4, 5), np.float32)
_Y = np.zeros(4, np.int32)
_X = np.zeros((4, 6, 6, 2), np.float32)
BAD = {
    "kd_T0": (lambda: losses.kd_loss(_L, _L, temperature=0.0), r"kd_loss: temperature=0\.0.*> 0"),
    "kd_Tneg": (lambda: losses.kd_loss(_L, _L, temperature=-1), r"temperature=-1\.0"),
    "kd_Tnan": (lambda: losses.kd_loss(_L, _L, temperature=float("nan")), r"temperature=nan"),
    "kd_T_vector": (lambda: losses.kd_loss(_L, _L, temperature=np.ones(2)),
                    r"temperature has shape \(2,\); expected a scalar"),
    "kd_shapes": (lambda: losses.kd_loss(_L, np.zeros((4, 6), np.float32), temperature=1.0),
                  r"student_logits has shape \(4, 5\) but teacher_logits has shape \(4, 6\).*"
                  r"\[batch, classes\]"),
    "kd_rank": (lambda: losses.kd_loss(np.zeros(5, np.float32), _L, temperature=1.0),
                r"student_logits has shape \(5,\) \(rank 1\); expected \[batch, classes\]"),
    "kd_int_logits": (lambda: losses.kd_loss(_L.astype(np.int32), _L, temperature=1.0),
                      r"student_logits has dtype int32; expected a floating dtype"),
    "alpha_high": (lambda: losses.distillation_loss(_L, _L, _Y, temperature=1.0, alpha=1.5),
                   r"distillation_loss: alpha=1\.5; expected a value in \[0, 1\]"),
    "alpha_low": (lambda: losses.distillation_loss(_L, _L, _Y, temperature=1.0, alpha=-0.1),
                  r"alpha=-0\.1"),
    "distill_T": (lambda: losses.distillation_loss(_L, _L, _Y, temperature=0, alpha=0.5),
                  r"distillation_loss: temperature=0\.0"),
    "ce_float_labels": (lambda: losses.cross_entropy(_L, _Y.astype(np.float32)),
                        r"labels has dtype float32; expected an integer dtype"),
    "ce_label_batch": (lambda: losses.cross_entropy(_L, np.zeros(3, np.int32)),
                       r"labels has shape \(3,\) but logits has shape \(4, 5\)"),
    "soft_ce_shapes": (lambda: losses.soft_cross_entropy(_L, np.zeros((4, 4), np.float32)),
                       r"logits has shape \(4, 5\) but target_probs has shape \(4, 4\)"),
    "logit_match": (lambda: losses.logit_matching_loss(_L, np.zeros((3, 5), np.float32)),
                    r"logit_matching_loss: student_logits has shape \(4, 5\) but teacher_logits"),
    "hint_channels": (lambda: losses.hint_loss(np.zeros((2, 4, 4, 3), np.float32),
                                               np.zeros((2, 4, 4, 5), np.float32)),
                      r"hint_loss: student_regressed has shape \(2, 4, 4, 3\) but teacher_feature "
                      r"has shape \(2, 4, 4, 5\).*regressor"),
    "hint_not_divisible": (lambda: losses.hint_loss(np.zeros((2, 6, 6, 3), np.float32),
                                                    np.zeros((2, 4, 4, 3), np.float32)),
                           r"student_regressed has shape \(2, 6, 6, 3\) and teacher_feature has "
                           r"shape \(2, 4, 4, 3\).*integer multiple"),
    "hint_rank_mix": (lambda: losses.hint_loss(np.zeros((2, 48), np.float32),
                                               np.zeros((2, 4, 4, 3), np.float32)),
                      r"same rank"),
    "hint_rank3": (lambda: losses.hint_loss(np.zeros((2, 4, 4), np.float32),
                                            np.zeros((2, 4, 4), np.float32)),
                   r"student_regressed has shape \(2, 4, 4\) \(rank 3\); expected "
                   r"\[batch, H, W, C\] or \[batch, D\]"),
    "tree_leaves": (lambda: losses.soft_tree_loss(np.zeros((2, 4), np.float32),
                                                  np.zeros((8, 3), np.float32),
                                                  np.zeros((2, 3), np.float32)),
                    r"path_probs has shape \(2, 4\) but leaf_logits has shape \(8, 3\)"),
    "tree_targets": (lambda: losses.soft_tree_loss(np.zeros((2, 4), np.float32),
                                                   np.zeros((4, 3), np.float32),
                                                   np.zeros((2, 5), np.float32)),
                     r"target_probs has shape \(2, 5\).*expected target_probs \[batch, classes\]"
                     r" = \(2, 3\)"),
    "balance_shapes": (lambda: losses.tree_balance_penalty(np.zeros((2, 3), np.float32),
                                                           np.zeros((2, 7), np.float32),
                                                           strength=1.0),
                       r"node_reach has shape \(2, 3\) but routing has shape \(2, 7\)"),
    "balance_strength": (lambda: losses.tree_balance_penalty(np.zeros((2, 3), np.float32),
                                                             np.zeros((2, 3), np.float32),
                                                             strength=-1.0),
                         r"strength=-1\.0; expected a finite value >= 0"),
    "att_rank": (lambda: losses.attention_map(np.zeros((2, 4, 4), np.float32)),
                 r"attention_map: features has shape \(2, 4, 4\) \(rank 3\); expected "
                 r"\[batch, H, W, C\]"),
    "att_p": (lambda: losses.attention_map(_X, p=0.5), r"p=0\.5; expected a finite exponent >= 1"),
    "at_not_divisible": (lambda: losses.attention_transfer_loss(
        np.zeros((2, 3, 3, 4), np.float32), np.zeros((2, 4, 4, 4), np.float32)),
        r"student_features has shape \(2, 3, 3, 4\) and teacher_features has shape "
        r"\(2, 4, 4, 4\).*integer multiple"),
    "at_batch": (lambda: losses.attention_transfer_loss(
        np.zeros((2, 4, 4, 4), np.float32), np.zeros((3, 4, 4, 4), np.float32)),
        r"student_features has shape \(2, 4, 4, 4\) but teacher_features has shape "
        r"\(3, 4, 4, 4\); the batch sizes must be equal"),
    "sal_target": (lambda: losses.input_saliency(_apply_linear, _X, np.zeros(3, np.int32)),
                   r"input_saliency: target has shape \(3,\) but x has shape \(4, 6, 6, 2\)"),
    "sal_x_rank": (lambda: losses.input_saliency(_apply_linear, np.zeros((4, 72), np.float32), _Y),
                   r"x has shape \(4, 72\) \(rank 2\); expected \[batch, H, W, C\] images"),
    "sal_bad_apply": (lambda: losses.input_saliency(lambda x: x.sum(axis=(1, 2, 3)), _X, _Y),
                      r"apply_fn\(x\) returned shape \(4,\) for x of shape \(4, 6, 6, 2\); "
                      r"expected logits \[batch, classes\]"),
    "sal_match_teacher": (lambda: losses.saliency_matching_loss(
        _apply_linear, _X, _Y, np.zeros((4, 6, 6, 2), np.float32)),
        r"saliency_matching_loss: teacher_saliency has shape \(4, 6, 6, 2\) \(rank 4\); "
        r"expected \[batch, H, W\]"),
    "sal_match_grid": (lambda: losses.saliency_matching_loss(
        _apply_linear, _X, _Y, np.zeros((4, 3, 3), np.float32)),
        r"teacher_saliency has shape \(4, 3, 3\) but x has shape \(4, 6, 6, 2\); expected "
        r"teacher_saliency \[batch, H, W\] = \(4, 6, 6\)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error(name):
    call, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_bad_input_raises_under_jit_too():
    with pytest.raises(ValueError, match=r"kd_loss: student_logits has shape \(4, 5\)"):
        f = jax.jit(functools.partial(losses.kd_loss, temperature=1.0))
        f(_L, np.zeros((4, 3), np.float32))
