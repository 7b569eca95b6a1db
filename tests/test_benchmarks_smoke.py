"""Smoke tests for benchmarks/train_step.py and benchmarks/common.py: the benchmark runs and every
variant computes the same step (no timing assertions)."""
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, train_step  # noqa: E402  (benchmarks/ is a plain folder, not installed)

TINY = ["--quick", "--batch", "4", "--shape", "8x8x1", "--steps", "seed", "distill"]


def _check_rows(rows, variants, steps=("seed", "distill")):
    assert [(r.step, r.variant) for r in rows] == [(s, v) for s in steps for v in variants]
    for r in rows:
        assert r.batch == 4 and r.shape == (8, 8, 1)
        assert r.images_per_s > 0 and r.gflops > 0 and r.peak_fraction > 0 and r.first_step_s > 0
        assert math.isfinite(r.first_loss)
    for step in steps:
        losses = [r.first_loss for r in rows if r.step == step]
        # same weights and images: every variant computes the same first step
        assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0]))


def test_quick_run_jax_only():
    lines = []
    rows = train_step.main(TINY + ["--frameworks", "jax", "--impl", "patches"], log=lines.append)
    _check_rows(rows, ["jax patches"])
    text = "\n".join(lines)
    assert "allocator" in text and "| step | input |" in text
    assert rows[0].ratios == {}  # no torch baseline in this run


def test_quick_run_with_torch_eager_and_channels_last():
    pytest.importorskip("torch")
    rows = train_step.main(TINY + ["--steps", "seed", "--impl", "lax"], log=lambda *_: None)
    _check_rows(rows, ["jax lax", "torch eager", "torch channels_last"], steps=("seed",))
    eager = next(r for r in rows if r.variant == "torch eager")
    assert eager.ratios["torch eager"] == 1.0


def test_forward_macs_matches_hand_count():
    # SeedCNN on 32x32x3: convs 32*32*9*3*64 + 16*16*9*64*64 + 8*8*9*64*128 + 4*4*9*128*128,
    # dense 2*2*128*512 + 512*10 = 18,551,808 multiply-adds (PERF-NOTES: 18.55 M).
    assert train_step.forward_macs("seed", (32, 32, 3)) == 18_551_808
    # SAME pooling rounds up: 28 -> 14 -> 7 -> 4 -> 2 for 28x28x1.
    expected = 28 * 28 * 9 * 1 * 64 + 14 * 14 * 9 * 64 * 64 + 7 * 7 * 9 * 64 * 128 + 4 * 4 * 9 * 128 * 128
    expected += 2 * 2 * 128 * 512 + 512 * 10
    assert train_step.forward_macs("seed", (28, 28, 1)) == expected
    # SmallCNN 8x8x1: 8*8*9*16 + 4*4*9*16*32 + 2*2*32*64 + 64*10
    assert train_step.forward_macs("small", (8, 8, 1)) == 9216 + 73728 + 8192 + 640
    assert train_step.step_flops("seed", (8, 8, 1)) == 6 * train_step.forward_macs("seed", (8, 8, 1))
    assert train_step.step_flops("distill", (8, 8, 1)) == 2 * (
        train_step.forward_macs("seed", (8, 8, 1)) + 3 * train_step.forward_macs("small", (8, 8, 1)))


def test_shape_and_argument_errors():
    assert train_step.parse_shape("28x28x1") == (28, 28, 1)
    with pytest.raises(Exception, match="HxWxC"):
        train_step.parse_shape("28x28")
    with pytest.raises(SystemExit):
        train_step.parse_args(["--repeats", "0"])
    args = train_step.parse_args(["--quick", "--batch", "2"])
    assert args.batch == [2] and args.repeats == 1 and args.no_compile


def test_common_helpers():
    assert common.detect_allocator() in {"glibc", "tcmalloc", "jemalloc", "mimalloc"} or "+" in common.detect_allocator()
    calls = []
    medians = common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert sorted(medians) == ["a", "b"] and all(v >= 0 for v in medians.values())
    assert calls == ["a", "b", "b", "a", "a", "b"]  # rotated order each repetition
    run, flops = common.matmul_case(8)
    run()
    assert flops == 2 * 8**3
    assert "| x | y |" in common.markdown_table(["x", "y"], [[1, 2]])
    assert jnp.isfinite(jnp.asarray(0.0))


def test_scale_table_lists_every_stage_and_size():
    from benchmarks import scale

    def run(seconds, peak):
        return {"timing_s": {"data": seconds, "teacher": 2 * seconds, "total": 3 * seconds},
                "peak_rss_mb": {"data": peak, "teacher": 2 * peak}, "wall_s": 4 * seconds,
                "models": {"teacher": {"accuracy": 0.5}}}

    text = scale.table({5000: run(1.0, 100.0), 60000: run(10.0, 300.0)})
    lines = text.splitlines()
    assert lines[0] == "| stage | 5,000 images | 60,000 images |"
    assert "| teacher | 2.0 s / 200 MB | 20.0 s / 600 MB |" in lines
    assert "| whole process (wall, peak) | 4.0 s / 200 MB | 40.0 s / 600 MB |" in lines
    assert not any(line.startswith("| total") for line in lines)


def test_queries_benchmark_runs_every_chunk_and_option_set():
    from benchmarks import queries

    text = queries.main(["--sides", "8", "--chunks", "16", "32", "--points", "64", "--repeats", "1"])
    assert "8x8, chunk 16" in text and "8x8, chunk 32" in text
    for label in queries.OPTION_SETS:  # both programs under every option set
        assert text.count(f"| {label} |") == 2


def test_op_profile_times_every_op_of_every_layer_for_xla_and_the_library():
    from benchmarks import op_profile

    lines = []
    op_profile.main(["--shape", "8x8x1", "--batch", "4", "--repeats", "1", "--no-torch"], log=lines.append)
    text = "\n".join(lines)
    assert "| layer | op | jax XLA ms (share of peak) | jax library ms (share of peak) |" in text
    for i in range(1, 5):
        for op in ("conv fwd", "conv filter grad", "relu+pool bwd"):
            assert f"| conv{i} " in text and f"| {op} |" in text
    assert "conv input grad (not in a train step)" in text and "| whole step |" in text


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="Fashion-MNIST not installed")
def test_epoch_benchmark_runs_the_librarys_fit_loop():
    from benchmarks import epoch

    rows = epoch.main(["--images", "512", "--quick"], log=lambda *_: None)
    jax_row = next(r for r in rows if r["variant"] == "jax fit")
    assert jax_row["images_per_s"] > 0 and 0 < jax_row["share_of_peak"] < 1.5
    assert jax_row["compile_s"] >= 0
