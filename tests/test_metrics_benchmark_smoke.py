"""Smoke tests for benchmarks/metrics.py (tiny sizes, no timing assertions).

The project venv has no torch/quantus/captum: there the benchmark runs our side only, and the
comparisons with Quantus and Captum are skipped (they run where those libraries are installed).
"""
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402  (benchmarks/ is a plain folder, not installed)
from benchmarks import metrics as bench
from distill_jax import models

# one metric of each kind, cheap to compile: random subsets, a deterministic curve, ssim of two maps, complexity
FAST = ["faithfulness_correlation", "region_perturbation", "random_logit_shared", "sparseness", "complexity"]


def _run(argv):
    lines = []
    rows = bench.main(argv, log=lines.append)
    return rows, "\n".join(lines)


def _check_jax_rows(rows, text, builders):
    assert len(rows) == len(builders)
    assert "| metric | our value | reference value | max abs diff | ours s | theirs s | theirs / ours |" in text
    assert "machine:" in text and "versions:" in text and "command: python benchmarks/metrics.py" in text
    for r in rows:
        assert math.isfinite(r.ours_value) and r.ours_s > 0
        assert r.ref_value is None and r.theirs_s is None and r.agrees is None  # no reference side
        assert f"| {r.metric} | " in text


def test_quick_run_jax_only(monkeypatch):
    monkeypatch.setattr(bench, "reference_available", lambda: False)  # as in the project venv: no torch
    rows, text = _run(["--quick", "--metrics", *FAST])
    assert "note: torch, quantus or captum is not importable" in text
    _check_jax_rows(rows, text, FAST)
    by_name = {r.metric: r for r in rows}
    assert -1 <= by_name["faithfulness_correlation"].ours_value <= 1
    assert 0 <= by_name["sparseness"].ours_value < 1
    assert 0 <= by_name["complexity"].ours_value <= math.log(64) + 1e-6  # 64 pixels per map


@pytest.mark.slow
def test_quick_run_every_metric_jax_only():
    rows, text = _run(["--quick", "--frameworks", "jax"])
    _check_jax_rows(rows, text, list(bench.BUILDERS))


def test_quantus_off_classes_follow_quantus_masking():
    """The classes RandomLogit explains, rebuilt the way Quantus 0.6 builds them (mask the target, index)."""
    target = np.array([0, 9, 3, 3, 5, 1, 8, 0])
    np.random.seed(42)
    r = np.random.randint(0, 9, target.shape[0])
    expected = [[c for c in range(10) if c != t][i] for t, i in zip(target, r)]
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    off = bench.quantus_off_classes(target, 10)
    np.testing.assert_array_equal(off, expected)
    assert np.all(off != target)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # the global numpy stream is left alone


def test_sequential_noise_adds_the_next_draw_on_the_indexed_entries():
    noise = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # [samples, batch, features]
    perturb = bench.SequentialNoise(noise)
    arr = np.ones((2, 3), np.float32)
    everything = np.tile(np.arange(3), (2, 1))
    np.testing.assert_array_equal(perturb(arr, everything), arr + noise[0])
    out = perturb(arr, np.array([[0], [2]]))  # second call: draw 1, only the listed entries
    np.testing.assert_array_equal(out, [[1 + noise[1, 0, 0], 1, 1], [1, 1, 1 + noise[1, 1, 2]]])


def test_compare_exact_rank_swap_and_monte_carlo():
    ranked = bench.Metric("m", "ref", None, None, "exact", ranked=64)  # one adjacent swap: 12 / (64 * 65) = 2.9e-3
    row = bench.compare(ranked, np.array([0.5, 0.3]), np.array([0.5, 0.3 + 2e-3]), [])
    assert row.agrees and "1/2 images within tol" in row.agreement and "rank swap" in row.agreement
    assert not bench.compare(ranked, np.array([0.5, 0.3]), np.array([0.5, 0.3 + 5e-3]), []).agrees
    exact = bench.Metric("e", "ref", None, None, "exact")  # tol 1e-4 * max(1, max |ref|)
    assert bench.compare(exact, np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-4]), []).agrees
    row = bench.compare(exact, np.array([1.0, 2.0]), np.array([1.0, 2.01]), [])
    assert not row.agrees and row.max_abs_diff == pytest.approx(0.01) and "1/2 images within tol" in row.agreement
    mc = bench.Metric("mc", "ref", None, None, "mc")  # sd of the means 0.02: tol 4 sqrt(2) 0.02 = 0.113
    row = bench.compare(mc, np.array([0.2, 0.4]), np.array([0.25, 0.45]), [0.30, 0.32, 0.28])
    assert row.agrees and row.max_abs_diff == pytest.approx(0.05) and row.ref_value == pytest.approx(0.35)
    assert not bench.compare(mc, np.array([0.2, 0.4]), np.array([0.5, 0.6]), [0.30, 0.32, 0.28]).agrees


def test_bad_percentages_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--percentages", "0", "50"])


def test_torch_copy_of_an_odd_sized_convnet_gives_the_same_logits():
    torch = pytest.importorskip("torch")
    shape = (7, 5, 1)  # odd: ceil_mode pooling must match SAME pooling; the flatten permutation is non-trivial
    net = models.SmallCNN(10)
    x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    params = bench.train_params(net, x, np.zeros(3, np.int32), steps=0)
    copy = common.torch_convnet(params, shape, net.conv_features, net.dense_features, 10)
    with torch.no_grad():
        theirs = copy(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(theirs, np.asarray(net.apply({"params": params}, jnp.asarray(x))), atol=1e-5)


def _check_agreement(rows):
    for r in rows:
        assert r.ref_value is not None and r.agrees, (r.metric, r.ours_value, r.ref_value, r.max_abs_diff, r.agreement)


def test_quick_run_agrees_with_quantus_and_captum_on_shared_draws():
    for name in ("torch", "quantus", "captum"):
        pytest.importorskip(name)
    rows, _ = _run(["--quick", "--metrics", "monotonicity_uniform", "road", "infidelity", "avg_sensitivity"])
    _check_agreement(rows)
    assert all(r.theirs_s > 0 for r in rows)


@pytest.mark.slow
def test_quick_run_every_metric_agrees_with_quantus_and_captum():
    for name in ("torch", "quantus", "captum"):
        pytest.importorskip(name)
    rows, _ = _run(["--quick", "--faith-runs", "20", "--mc-keys", "6"])  # steadier Monte-Carlo tolerances
    assert len(rows) == len(bench.BUILDERS) and rows[0].metric == "saliency map"
    _check_agreement(rows)
