"""Poisson sampling for DP-SGD: the batches, their padding mask, the step on a padded batch, and the accounting."""
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from distill_jax import parallel, train
from distill_jax.distill import privacy

D = 16


def test_poisson_batches_include_each_example_with_probability_q():
    n, batch, cap = 500, 25, 60
    idx, mask = train.poisson_epoch_batches(n, batch, cap, seed=3, epoch=0)
    assert idx.shape == mask.shape == (n // batch, cap)
    sizes = mask.sum(1)
    for row, k in zip(idx, sizes.astype(int)):
        assert len(set(row[:k].tolist())) == k  # distinct examples within a step
        assert np.all(row[k:] == 0)  # padding repeats example 0, masked out
    assert np.all(mask == (np.arange(cap)[None] < sizes[:, None]))  # the mask covers the chosen rows only
    # over many epochs: batch sizes Binomial(n, q), every example chosen about q * steps times
    all_sizes, counts = [], np.zeros(n)
    for epoch in range(200):
        idx, mask = train.poisson_epoch_batches(n, batch, cap, seed=3, epoch=epoch)
        all_sizes += mask.sum(1).tolist()
        np.add.at(counts, idx[mask > 0], 1)
    q = batch / n
    assert np.mean(all_sizes) == pytest.approx(batch, rel=0.02)
    assert np.var(all_sizes) == pytest.approx(n * q * (1 - q), rel=0.1)
    assert counts.mean() == pytest.approx(q * 200 * (n // batch), rel=0.02)
    # deterministic in (seed, epoch); another epoch or seed draws other batches
    same = train.poisson_epoch_batches(n, batch, cap, seed=3, epoch=5)
    np.testing.assert_array_equal(same[0], train.poisson_epoch_batches(n, batch, cap, seed=3, epoch=5)[0])
    assert not np.array_equal(same[0], train.poisson_epoch_batches(n, batch, cap, seed=4, epoch=5)[0])


def test_a_batch_over_the_cap_is_truncated():
    idx, mask = train.poisson_epoch_batches(100, 50, 10, seed=0, epoch=0)  # ~50 sampled, cap 10
    assert np.all(mask.sum(1) == 10) and all(len(set(r.tolist())) == 10 for r in idx)


def test_the_cap_is_the_smallest_with_the_stated_overflow_bound():
    n, batch, steps, overflow = 60_000, 64, 14_000, 1e-9
    cap = train.poisson_batch_cap(n, batch, steps, overflow=overflow)
    q = batch / n
    assert steps * stats.binom.sf(cap, n, q) <= overflow < steps * stats.binom.sf(cap - 1, n, q)
    assert train.poisson_overflow_probability(n, batch, steps, cap) == pytest.approx(steps * stats.binom.sf(cap, n, q))
    assert train.poisson_batch_cap(n, batch, steps, overflow=overflow, multiple_of=8) % 8 == 0
    with pytest.raises(ValueError, match=r"^overflow must be in \(0, 1\)"):
        train.poisson_batch_cap(n, batch, steps, overflow=0.0)


def _least_squares(params, extra, batch, teacher, key):
    pred = batch["x"] @ params["w"] + params["b"]
    return 0.5 * (pred - batch["y"]) ** 2, {"residual": pred - batch["y"]}


def test_the_mask_keeps_the_sum_of_clipped_gradients_of_the_unpadded_batch():
    rng = np.random.default_rng(0)
    k, cap, expected_batch = 5, 12, 8
    x, y = rng.normal(size=(k, D)).astype(np.float32), rng.normal(size=k).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=D), jnp.float32), "b": jnp.zeros(())}
    # the padded batch: the k sampled rows, then copies of another example with mask 0
    pad_x = np.concatenate([x, np.repeat(rng.normal(size=(1, D)).astype(np.float32), cap - k, 0)])
    pad_y = np.concatenate([y, np.full(cap - k, 3.0, np.float32)])
    mask = (np.arange(cap) < k).astype(np.float32)
    clip = 0.5
    per_example = lambda p, b: _least_squares(p, None, b, None, None)[0]  # noqa: E731
    unpadded = train.per_example_gradients(per_example, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    padded = train.per_example_gradients(per_example, params, {"x": jnp.asarray(pad_x), "y": jnp.asarray(pad_y)})
    key = jax.random.PRNGKey(0)
    want = train.noisy_clipped_mean(unpadded, l2_clip=clip, noise_multiplier=0.0, key=key, denominator=expected_batch)
    got = train.noisy_clipped_mean(padded, l2_clip=clip, noise_multiplier=0.0, key=key, mask=jnp.asarray(mask),
                                   denominator=expected_batch)
    clipped, _ = train.clip_per_example(unpadded, l2_clip=clip)
    for name in ("w", "b"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(clipped[name]).sum(0) / expected_batch, rtol=1e-6)
    # the whole DP step on the padded batch: the same update, and its reported loss the mean over sampled rows
    optimizer = optax.sgd(1.0)
    dp = train.DPSGD(l2_clip=clip, noise_multiplier=0.0, expected_batch_size=expected_batch)
    state = train.create_state(params, optimizer, key=jax.random.PRNGKey(1))
    step = jax.jit(train.train_step_fn(_least_squares, optimizer, dp=dp))
    batch = {"x": jnp.asarray(pad_x), "y": jnp.asarray(pad_y), "mask": jnp.asarray(mask)}
    new, metrics = step(state, batch, None)
    np.testing.assert_allclose(np.asarray(new.params["w"]), np.asarray(params["w"] - want["w"]), rtol=1e-5, atol=1e-6)
    residual = x @ np.asarray(params["w"]) - y
    assert float(metrics["loss"]) == pytest.approx(np.mean(0.5 * residual**2), rel=1e-5)
    assert float(metrics["residual"]) == pytest.approx(np.mean(residual), rel=1e-4, abs=1e-6)


def test_fit_with_poisson_sampling_feeds_masked_batches_of_the_cap():
    seen = []

    def loss_fn(params, extra, batch, teacher, key):
        return jnp.zeros(batch["x"].shape[0]) + 0.0 * params["w"].sum(), {"rows": jnp.ones(batch["x"].shape[0])}

    def step(state, batch, teacher):
        seen.append({k: np.asarray(v) for k, v in batch.items()})
        return state.replace(step=state.step + 1), {"loss": jnp.zeros(())}

    n = 40
    data = {"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n)}
    state = train.create_state({"w": jnp.zeros(1)}, optax.sgd(0.1), key=jax.random.PRNGKey(0))
    cfg = train.FitConfig(epochs=2, batch_size=8, sampling="poisson", batch_cap=16, show_progress=False)
    train.fit(state, step, data, cfg, mesh=parallel.make_mesh())
    assert len(seen) == 2 * (n // 8)
    want = [train.poisson_epoch_batches(n, 8, 16, seed=0, epoch=e) for e in range(2)]
    for i, batch in enumerate(seen):
        idx, mask = want[i // 5][0][i % 5], want[i // 5][1][i % 5]
        np.testing.assert_array_equal(batch["mask"], mask)
        np.testing.assert_array_equal(batch["y"], idx)  # y = the example's index
    with pytest.raises(ValueError, match="sampling must be one of"):
        train.FitConfig(epochs=1, batch_size=8, sampling="uniform")


def test_poisson_epsilon_equals_dp_accountings_and_shuffling_is_accounted_without_amplification():
    steps, batch, n, z, delta = 15 * 937, 64, 60_000, 1.1, 1e-5
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(z)), steps))
    poisson = privacy.dp_sgd_epsilon(steps, batch_size=batch, n=n, noise_multiplier=z, delta=delta)
    assert poisson == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    # shuffled batches: one Gaussian(z) per epoch (an example is in one step of each), 15 epochs composed
    shuffled = privacy.dp_sgd_epsilon(steps, batch_size=batch, n=n, noise_multiplier=z, delta=delta, sampling="shuffle")
    per_epoch = dp_accounting.rdp.RdpAccountant()
    per_epoch.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 15))
    assert shuffled == pytest.approx(per_epoch.get_epsilon(delta), rel=1e-12)
    assert poisson == pytest.approx(0.72, abs=0.01) and shuffled == pytest.approx(21.9, abs=0.1)
    with pytest.raises(ValueError, match="sampling must be one of"):
        privacy.dp_sgd_epsilon(steps, batch_size=batch, n=n, noise_multiplier=z, delta=delta, sampling="uniform")


def test_a_shuffled_dp_teacher_reports_the_bound_without_amplification():
    from distill_jax.app import _fit, _prepare, config

    c = config.apply_smoke(config.default_config())
    c.teacher.kind = "mlp"
    c.teacher.dp_noise_multiplier = 1.1
    c.teacher.dp_sampling = "shuffle"
    config.validate(c)
    prep = _prepare.prepare_data(c)
    teacher = _fit.train_teacher(prep, c, parallel.make_mesh(), None, show_progress=False)
    p = teacher.settings["privacy"]
    n = len(prep.y_train)
    steps = train.total_steps(n, c.teacher.batch_size, c.teacher.epochs)
    assert p["sampling"] == "shuffle" and "batch_cap" not in p and p["epochs"] == c.teacher.epochs
    want = privacy.dp_sgd_epsilon(steps, batch_size=c.teacher.batch_size, n=n, noise_multiplier=1.1, delta=1e-5,
                                  sampling="shuffle")
    assert p["epsilon"] == pytest.approx(want, rel=1e-3)
    assert p["epsilon"] > privacy.dp_sgd_epsilon(steps, batch_size=c.teacher.batch_size, n=n, noise_multiplier=1.1,
                                                 delta=1e-5)
    assert math.isfinite(p["epsilon"])


def test_a_dp_student_of_a_non_private_teacher_says_its_epsilon_covers_its_own_steps_only():
    from distill_jax.app import _fit, _page, _prepare, config

    c = config.apply_smoke(config.default_config())
    c.teacher.kind = "mlp"
    c.student.dp_noise_multiplier = 1.0
    c.students = "linear-labels,linear-kd"
    c.method.temperature, c.method.alpha = 2.0, 0.5
    config.validate(c)
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    teacher = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    kd = _fit.train_student("linear-kd", "linear", "kd", prep, teacher, c, mesh, None, show_progress=False)
    labels = _fit.train_student("linear-labels", "linear", "labels", prep, teacher, c, mesh, None, show_progress=False)
    assert kd.settings["privacy"]["teacher_private"] is False
    assert "bounds nothing about them" in kd.settings["privacy"]["covers"]
    assert "its own steps only: the teacher is not private" in _fit.privacy_summary(kd)
    assert _page.privacy_text({"privacy": kd.settings["privacy"]}) == _fit.privacy_summary(kd)[2:]
    # a labels student reads no teacher: its epsilon covers its whole training
    assert "teacher_private" not in labels.settings["privacy"]
    assert labels.settings["privacy"]["covers"] == "the whole training of this model"
    assert "teacher is not private" not in _fit.privacy_summary(labels)


def test_a_batch_cap_the_devices_cannot_split_is_refused_in_one_line():
    mesh = parallel.make_mesh()
    if mesh.devices.size == 1:
        pytest.skip("needs several devices (the suite's fake CPU devices)")
    state = train.create_state({"w": jnp.zeros(1)}, optax.sgd(0.1), key=jax.random.PRNGKey(0))
    cfg = train.FitConfig(epochs=1, batch_size=8, sampling="poisson", batch_cap=mesh.devices.size * 4 + 1,
                          show_progress=False, desc="dp model")
    with pytest.raises(ValueError, match="dp model: batch_cap"):
        train.fit(state, lambda st, b, t: (st, {}), {"x": np.zeros((40, 1)), "y": np.zeros(40)}, cfg, mesh=mesh)
