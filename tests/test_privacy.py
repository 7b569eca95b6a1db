"""PATE (GNMax, Confident GNMax, vmapped teacher ensembles), DP-SGD, and their epsilons via dp_accounting."""
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

from distill_jax import models, parallel, train
from distill_jax.distill import losses, privacy

# --------------------------------------------------------------------------- GNMax


def test_teacher_votes_counts_each_teachers_argmax():
    logits = jnp.array([
        [[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]],   # teacher 0 votes 0, 2
        [[0.0, 3.0, 0.0], [1.0, 1.0, 0.0]],   # teacher 1 votes 1, 0 (tie -> lowest class)
        [[9.0, 0.0, 0.0], [0.0, 0.0, 1.0]],   # teacher 2 votes 0, 2
    ])
    np.testing.assert_array_equal(privacy.teacher_votes(logits), [[2, 1, 0], [1, 0, 2]])
    with pytest.raises(ValueError, match=r"^logits must be \[teachers, batch, classes\]; got shape \(2, 3\)$"):
        privacy.teacher_votes(jnp.zeros((2, 3)))


def test_gnmax_with_sigma_zero_is_the_plain_argmax_ties_to_lowest_class():
    votes = jnp.array([[3, 7, 0], [5, 5, 1], [0, 2, 2], [4, 0, 0]])
    labels = privacy.gnmax(votes, sigma=0, key=jax.random.key(0))
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])
    assert labels.dtype == jnp.int32
    rng = np.random.default_rng(0)
    many = rng.integers(0, 50, size=(500, 10))
    np.testing.assert_array_equal(privacy.gnmax(many, sigma=0.0, key=jax.random.key(1)), many.argmax(-1))


@pytest.mark.parametrize("sigma,d", [(2.0, 2.0), (5.0, 3.0)])
def test_gnmax_flip_rate_matches_gaussian_noise_of_std_sigma(sigma, d):
    # votes [0, d]: class 0 wins iff n0 - n1 > d with n0 - n1 ~ N(0, 2 sigma^2), so P(flip) = Phi(-d / (sigma sqrt 2))
    b = 40_000
    votes = jnp.tile(jnp.array([[0.0, d]]), (b, 1))
    labels = jax.jit(lambda v, k: privacy.gnmax(v, sigma=sigma, key=k))(votes, jax.random.key(3))
    flip_rate = float(jnp.mean(labels == 0))
    expected = norm.cdf(-d / (sigma * math.sqrt(2)))
    assert abs(flip_rate - expected) < 0.01, (flip_rate, expected)  # binomial std ~0.0024


def test_gnmax_is_deterministic_in_its_key_and_accepts_raw_keys():
    votes = jnp.tile(jnp.array([[5.0, 5.0, 5.0]]), (64, 1))
    a = privacy.gnmax(votes, sigma=1.0, key=jax.random.key(7))
    np.testing.assert_array_equal(a, privacy.gnmax(votes, sigma=1.0, key=jax.random.key(7)))
    assert len(set(np.asarray(a).tolist())) == 3  # noise spreads equal votes over all classes
    raw = privacy.gnmax(votes, sigma=1.0, key=jax.random.PRNGKey(7))
    assert raw.shape == (64,)


@pytest.mark.parametrize("kwargs,message", [
    (dict(votes=jnp.zeros((2, 3)), sigma=-1.0, key=jax.random.key(0)), r"^sigma must be >= 0; got -1\.0$"),
    (dict(votes=jnp.zeros((3,)), sigma=1.0, key=jax.random.key(0)),
     r"^votes must be \[batch, classes\]; got shape \(3,\)$"),
    (dict(votes=jnp.zeros((2, 3)), sigma=1.0, key=0), r"^key must be a PRNG key .*; got int"),
])
def test_gnmax_bad_arguments_give_one_line_errors(kwargs, message):
    votes = kwargs.pop("votes")
    with pytest.raises(ValueError, match=message) as err:
        privacy.gnmax(votes, **kwargs)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- Confident GNMax


def test_confident_gnmax_answers_nothing_above_an_unreachable_threshold():
    votes = jnp.array([[10, 0, 0], [3, 4, 3], [0, 0, 10]])
    labels, answered = privacy.confident_gnmax(votes, threshold=1e6, sigma_threshold=5.0, sigma=1.0,
                                               key=jax.random.key(0))
    assert not bool(answered.any())
    np.testing.assert_array_equal(labels, [-1, -1, -1])


def test_confident_gnmax_with_zero_threshold_answers_everything_like_gnmax():
    votes = jnp.asarray(np.random.default_rng(1).integers(0, 20, size=(256, 5)))
    key = jax.random.key(4)
    labels, answered = privacy.confident_gnmax(votes, threshold=0, sigma_threshold=0, sigma=3.0, key=key)
    assert bool(answered.all())
    expected = privacy.gnmax(votes, sigma=3.0, key=jax.random.split(key)[1])  # the documented key split
    np.testing.assert_array_equal(labels, expected)
    assert int(jnp.sum(labels != votes.argmax(-1))) > 0  # sigma=3 noise changed some answers


def test_confident_gnmax_answer_rate_matches_threshold_noise_of_std_sigma_threshold():
    # top vote 10, threshold 13: answered iff 10 + N(0, s1^2) >= 13, so P(answer) = Phi(-3 / s1)
    s1, b = 4.0, 40_000
    votes = jnp.tile(jnp.array([[10, 2, 0]]), (b, 1))
    _, answered = privacy.confident_gnmax(votes, threshold=13, sigma_threshold=s1, sigma=1.0, key=jax.random.key(9))
    assert abs(float(answered.mean()) - norm.cdf(-3 / s1)) < 0.01  # binomial std ~0.0022


def test_confident_gnmax_threshold_is_on_the_top_vote():
    votes = jnp.array([[8, 1, 1], [4, 3, 3], [1, 1, 8], [5, 5, 0]])
    labels, answered = privacy.confident_gnmax(votes, threshold=5, sigma_threshold=0, sigma=0,
                                               key=jax.random.key(0))
    np.testing.assert_array_equal(answered, [True, False, True, True])
    np.testing.assert_array_equal(labels, [0, -1, 2, 0])


# --------------------------------------------------------------------------- epsilons


def test_gnmax_epsilon_equals_a_direct_dp_accounting_computation():
    q, sigma, delta = 200, 40.0, 1e-5
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier=sigma / math.sqrt(2)), q)
    direct = accountant.get_epsilon(delta)
    assert privacy.gnmax_epsilon(q, sigma=sigma, delta=delta) == pytest.approx(direct, rel=1e-12)
    # and the closed form of PATE 2018 Prop. 8: q GNMax answers are (lambda, q lambda / sigma^2)-RDP
    orders = np.array(dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    closed, _ = dp_accounting.rdp.compute_epsilon(orders, q * orders / sigma**2, delta)
    assert privacy.gnmax_epsilon(q, sigma=sigma, delta=delta) == pytest.approx(closed, rel=1e-9)
    # below the classical conversion eps <= min_lambda q lambda / sigma^2 + log(1/delta) / (lambda - 1)
    classical = np.min(q * orders / sigma**2 + math.log(1 / delta) / (orders - 1))
    assert direct <= classical


def test_gnmax_epsilon_grows_with_queries_and_shrinks_with_sigma():
    eps = [privacy.gnmax_epsilon(q, sigma=20.0, delta=1e-5) for q in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(eps, eps[1:])), eps
    eps = [privacy.gnmax_epsilon(100, sigma=s, delta=1e-5) for s in (5.0, 20.0, 80.0)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert privacy.gnmax_epsilon(100, sigma=20.0, delta=1e-3) < privacy.gnmax_epsilon(100, sigma=20.0, delta=1e-6)


@pytest.mark.parametrize("num_queries,sigma,delta,message", [
    (0, 1.0, 1e-5, r"^num_queries must be an integer >= 1; got 0$"),
    (2.5, 1.0, 1e-5, r"^num_queries must be an integer >= 1; got 2\.5$"),
    (10, 0.0, 1e-5, r"^sigma must be > 0; got 0\.0$"),
    (10, -2.0, 1e-5, r"^sigma must be > 0; got -2\.0$"),
    (10, 1.0, 0.0, r"^delta must be in \(0, 1\); got 0\.0$"),
    (10, 1.0, 1.5, r"^delta must be in \(0, 1\); got 1\.5$"),
])
def test_gnmax_epsilon_bad_arguments_give_one_line_errors(num_queries, sigma, delta, message):
    with pytest.raises(ValueError, match=message):
        privacy.gnmax_epsilon(num_queries, sigma=sigma, delta=delta)


def test_dp_sgd_epsilon_equals_a_direct_dp_accounting_computation():
    steps, batch_size, n, z, delta = 1000, 256, 60_000, 1.1, 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(batch_size / n, dp_accounting.GaussianDpEvent(z)), steps)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    eps = privacy.dp_sgd_epsilon(steps, batch_size=batch_size, n=n, noise_multiplier=z, delta=delta)
    assert eps == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    assert 0.1 < eps < 2.0  # subsampling amplifies: the same 1000 full-batch steps cost far more
    assert privacy.dp_sgd_epsilon(4 * steps, batch_size=batch_size, n=n, noise_multiplier=z, delta=delta) > eps
    assert privacy.dp_sgd_epsilon(steps, batch_size=batch_size, n=n, noise_multiplier=2 * z, delta=delta) < eps


def test_dp_sgd_epsilon_full_batch_is_a_gaussian_of_sensitivity_one():
    # q = 1: a step is Gaussian(z) of sensitivity 1, i.e. a GNMax query with sigma = z sqrt(2)
    full = privacy.dp_sgd_epsilon(50, batch_size=100, n=100, noise_multiplier=3.0, delta=1e-5)
    assert full == pytest.approx(privacy.gnmax_epsilon(50, sigma=3.0 * math.sqrt(2), delta=1e-5), rel=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0), r"^steps must be an integer >= 1; got 0$"),
    (dict(batch_size=200), r"^batch_size must be <= n \(100\); got 200$"),
    (dict(noise_multiplier=0.0), r"^noise_multiplier must be > 0; got 0\.0$"),
    (dict(delta=1.0), r"^delta must be in \(0, 1\); got 1\.0$"),
])
def test_dp_sgd_epsilon_bad_arguments_give_one_line_errors(kwargs, message):
    args = dict(steps=10, batch_size=10, n=100, noise_multiplier=1.0, delta=1e-5) | kwargs
    steps = args.pop("steps")
    with pytest.raises(ValueError, match=message):
        privacy.dp_sgd_epsilon(steps, **args)


# --------------------------------------------------------------------------- ensembles


def test_ensemble_shards_are_disjoint_cover_and_balanced():
    shards = privacy.ensemble_shards(103, 10, seed=0)
    assert len(shards) == 10
    sizes = sorted(len(s) for s in shards)
    assert sizes == [10] * 7 + [11] * 3
    allidx = np.concatenate(shards)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(103))  # disjoint and covering
    again = privacy.ensemble_shards(103, 10, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, privacy.ensemble_shards(103, 10, seed=1)))
    assert [len(s) for s in privacy.ensemble_shards(5, 5, seed=0)] == [1] * 5


def test_more_teachers_than_examples_is_an_error():
    with pytest.raises(ValueError, match=r"^more teachers \(8\) than examples \(5\)$"):
        privacy.ensemble_shards(5, 8, seed=0)


def test_ensemble_batches_stay_inside_each_teachers_shard():
    shards = privacy.ensemble_shards(50, 3, seed=2)
    idx = privacy.ensemble_batch_indices(shards, batch_size=4, steps=9, seed=0)
    assert idx.shape == (9, 3, 4)
    for t, shard in enumerate(shards):
        assert np.isin(idx[:, t], shard).all()
        first_epoch = idx[: len(shard) // 4, t].ravel()
        assert len(np.unique(first_epoch)) == len(first_epoch)  # no repeats within an epoch
    with pytest.raises(ValueError, match=r"^batch_size must be <= the smallest shard \(16 examples\); got 17$"):
        privacy.ensemble_batch_indices(shards, batch_size=17, steps=1, seed=0)


def _toy_problem(n=96, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 3
    y = rng.integers(0, classes, size=n)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    model = models.MLP(classes, hidden=(16,))

    def init_fn(key):
        return model.init(key, jnp.zeros((1, d)))["params"]

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    def loss_fn(params, batch):
        return losses.cross_entropy(apply_fn(params, batch["x"]), batch["y"])

    return {"x": x, "y": y.astype(np.int32)}, init_fn, apply_fn, loss_fn


def test_vmapped_ensemble_equals_teachers_trained_one_by_one():
    data, init_fn, apply_fn, loss_fn = _toy_problem()
    optimizer = optax.sgd(0.1, momentum=0.9)
    T, bs, steps, seed = 3, 8, 5, 0
    ens = privacy.train_ensemble(init_fn, loss_fn, optimizer, data, num_teachers=T, batch_size=bs,
                                 steps=steps, seed=seed)
    idx = privacy.ensemble_batch_indices(ens.shards, batch_size=bs, steps=steps, seed=seed)
    keys = jax.random.split(jax.random.key(seed), T)
    one_step = privacy.teacher_step_fn(loss_fn, optimizer)  # un-jitted, one teacher
    for t in range(T):
        params = init_fn(keys[t])
        opt_state = optimizer.init(params)
        ref_losses = []
        for s in range(steps):
            params, opt_state, loss = one_step(params, opt_state, {k: v[idx[s, t]] for k, v in data.items()})
            ref_losses.append(float(loss))
        mine = jax.tree_util.tree_map(lambda a: a[t], ens.params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), mine, params)
        np.testing.assert_allclose(ens.losses[:, t], ref_losses, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ens.params["head"]["kernel"][0], ens.params["head"]["kernel"][1])  # distinct teachers

    # logits of the stacked teachers = each teacher's own logits; votes count them
    logits = privacy.ensemble_logits(apply_fn, ens.params, data["x"][:10])
    assert logits.shape == (T, 10, 3)
    np.testing.assert_allclose(logits[1], apply_fn(jax.tree_util.tree_map(lambda a: a[1], ens.params),
                                                    data["x"][:10]), atol=1e-5)
    np.testing.assert_array_equal(privacy.teacher_votes(logits).sum(-1), [T] * 10)


def test_ensemble_on_a_mesh_equals_the_single_device_ensemble():
    data, init_fn, apply_fn, loss_fn = _toy_problem()
    mesh = parallel.make_mesh()  # 4 fake CPU devices (conftest)
    kw = dict(num_teachers=4, batch_size=8, steps=30, seed=1)
    single = privacy.train_ensemble(init_fn, loss_fn, optax.sgd(0.1), data, **kw)
    sharded = privacy.train_ensemble(init_fn, loss_fn, optax.sgd(0.1), data, mesh=mesh, **kw)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                           sharded.params, single.params)
    logits = privacy.ensemble_logits(apply_fn, sharded.params, data["x"], mesh=mesh)
    assert logits.sharding.spec == jax.sharding.PartitionSpec(None, "data")
    np.testing.assert_allclose(logits, privacy.ensemble_logits(apply_fn, single.params, data["x"]), atol=1e-5)
    # the teachers learned: training loss fell, and the noiseless vote labels most of the data correctly
    assert single.losses[-5:].mean() < 0.5 * single.losses[:5].mean()
    labels = privacy.gnmax(privacy.teacher_votes(logits), sigma=0, key=jax.random.key(0))
    assert float(np.mean(np.asarray(labels) == data["y"])) > 0.9
    with pytest.raises(ValueError, match=r"^batch_size=6 must be a positive multiple of the 4 devices"):
        privacy.train_ensemble(init_fn, loss_fn, optax.sgd(0.1), data, mesh=mesh,
                               **(kw | dict(batch_size=6)))


# --------------------------------------------------------------------------- DP-SGD


def _least_squares(n=8, d=3, seed=0):
    """loss_i = 0.5 (x_i . w + b - y_i)^2; grad_i = r_i (x_i, 1), ||grad_i|| = |r_i| sqrt(||x_i||^2 + 1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=n).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=d), jnp.float32), "b": jnp.float32(0.3)}

    def loss_fn(params, batch):
        return 0.5 * (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2

    r = x @ np.asarray(params["w"]) + float(params["b"]) - y
    per_example = np.concatenate([r[:, None] * x, r[:, None]], axis=1)  # [n, d + 1]: (grad w, grad b)
    return loss_fn, params, {"x": x, "y": y}, per_example


def test_dp_sgd_with_a_tiny_clip_averages_gradients_rescaled_to_the_clip_norm():
    loss_fn, params, batch, g = _least_squares()
    c = 1e-3
    out = train.dp_sgd_gradients(loss_fn, params, batch, l2_clip=c, noise_multiplier=0.0, key=jax.random.key(0))
    expected = np.mean(c * g / np.linalg.norm(g, axis=1, keepdims=True), axis=0)  # norm over w and b together
    np.testing.assert_allclose(out["w"], expected[:-1], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out["b"], expected[-1], rtol=1e-5, atol=1e-9)
    # same numbers as optax's DP aggregate on the per-example gradients
    per = train.per_example_gradients(loss_fn, params, batch)
    agg = optax.contrib.differentially_private_aggregate(l2_norm_clip=c, noise_multiplier=0.0, key=jax.random.key(0))
    ref, _ = agg.update(per, agg.init(params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), out, ref)


def test_dp_sgd_with_a_huge_clip_is_the_mean_gradient_jitted_and_not():
    loss_fn, params, batch, g = _least_squares()
    plain = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    np.testing.assert_allclose(plain["w"], g[:, :-1].mean(0), rtol=1e-5)
    eager = train.dp_sgd_gradients(loss_fn, params, batch, l2_clip=1e6, noise_multiplier=0.0, key=jax.random.key(0))
    jitted = jax.jit(lambda p, b, k: train.dp_sgd_gradients(loss_fn, p, b, l2_clip=1e6, noise_multiplier=0.0,
                                                              key=k))(params, batch, jax.random.key(0))
    for out in (eager, jitted):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out, plain)


def test_per_example_value_and_grad_returns_losses_aux_and_gradients_of_one_pass():
    loss_fn, params, batch, g = _least_squares()
    with_aux = lambda p, b, k: (loss_fn(p, b), {"residual": b["x"] @ p["w"] + p["b"] - b["y"]})
    (losses, aux), grads = train.per_example_value_and_grad(with_aux, params, batch)
    r = g[:, -1]  # d loss_i / d b = r_i
    np.testing.assert_allclose(aux["residual"], r, rtol=1e-5)
    np.testing.assert_allclose(losses, 0.5 * r**2, rtol=1e-5)
    np.testing.assert_allclose(grads["w"], g[:, :-1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["b"], g[:, -1], rtol=1e-5, atol=1e-7)


def test_per_example_value_and_grad_gives_every_example_its_own_key():
    n, d = 6, 5
    x = jnp.ones((n, d))  # identical examples: only the random view tells them apart
    w = jnp.linspace(-1.0, 1.0, d)
    key = jax.random.key(3)

    def noisy_view_loss(params, batch, key):  # loss = (x + noise(key)) . w, so the gradient is the view
        view = batch["x"] + jax.random.normal(key, batch["x"].shape)
        return view @ params, {"view0": view[:, 0]}

    (losses, aux), grads = jax.jit(lambda p, b, k: train.per_example_value_and_grad(noisy_view_loss, p, b, key=k))(
        w, {"x": x}, key)
    views = np.stack([1.0 + np.asarray(jax.random.normal(jax.random.fold_in(key, i), (1, d)))[0] for i in range(n)])
    np.testing.assert_allclose(grads, views, rtol=1e-5)
    np.testing.assert_allclose(losses, views @ np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["view0"], views[:, 0], rtol=1e-5)
    assert len({tuple(np.round(v, 5)) for v in views}) == n  # one draw per example, none shared


def test_clip_per_example_bounds_norms_and_keeps_small_gradients():
    grads = {"a": jnp.array([[3.0, 0.0], [0.3, 0.0], [0.0, 0.0]]), "b": jnp.array([4.0, 0.4, 0.0])}
    clipped, norms = train.clip_per_example(grads, l2_clip=1.0)
    np.testing.assert_allclose(norms, [5.0, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["a"], [[0.6, 0.0], [0.3, 0.0], [0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8, 0.4, 0.0], rtol=1e-6)


def test_dp_sgd_noise_has_std_noise_multiplier_times_clip_over_batch():
    b, c, z, size = 4, 2.0, 1.5, 200_000
    params = {"w": jnp.zeros(size), "v": jnp.zeros(3)}

    def loss_fn(params, batch):  # gradient 0 for every example: the output is the noise alone
        return 0.0 * (jnp.sum(params["w"]) + jnp.sum(params["v"])) * batch["x"][:, 0]

    out = train.dp_sgd_gradients(loss_fn, params, {"x": jnp.ones((b, 1))}, l2_clip=c, noise_multiplier=z,
                                   key=jax.random.key(5))
    w = np.asarray(out["w"])
    assert abs(w.std() / (z * c / b) - 1) < 0.01  # std estimate's relative error ~0.0016
    assert abs(w.mean()) < 5 * (z * c / b) / math.sqrt(size)
    again = train.dp_sgd_gradients(loss_fn, params, {"x": jnp.ones((b, 1))}, l2_clip=c, noise_multiplier=z,
                                     key=jax.random.key(6))
    assert not np.allclose(again["w"], w)


@pytest.mark.parametrize("kwargs,message", [
    (dict(l2_clip=0.0), r"^l2_clip must be > 0; got 0\.0$"),
    (dict(noise_multiplier=-1.0), r"^noise_multiplier must be >= 0; got -1\.0$"),
    (dict(key=3), r"^key must be a PRNG key"),
])
def test_dp_sgd_bad_arguments_give_one_line_errors(kwargs, message):
    loss_fn, params, batch, _ = _least_squares()
    args = dict(l2_clip=1.0, noise_multiplier=1.0, key=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        train.dp_sgd_gradients(loss_fn, params, batch, **args)
