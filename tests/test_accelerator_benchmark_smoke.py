"""Smoke test of benchmarks/accelerator.py on CPU: every case runs on the 4 fake devices and the report is appended."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import accelerator  # noqa: E402


def test_peak_table_matches_device_kinds_by_prefix():
    assert accelerator.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert accelerator.peak_tflops("TPU v4", "bfloat16") == 275.0
    assert accelerator.peak_tflops("cpu", "float32") is None  # no MFU rather than a guess


def test_quick_run_measures_every_case_and_appends_the_report(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    lines = []
    rows, report = accelerator.main(["--quick", "--no-job", "--append", str(results)], log=lines.append)
    assert [(r.case, r.dtype) for r in rows] == [
        ("teacher step", "float32"), ("teacher step", "bfloat16"), ("distill step", "float32"),
        ("distill step", "bfloat16"), ("integrated gradients (4 steps)", "float32")]
    assert all(r.images_per_s > 0 and r.first_s > 0 and r.batch == 8 and r.mfu is None for r in rows)
    text = results.read_text()
    assert text.startswith("# earlier results\n") and report in text and "cpu (cpu) x4" in report
    assert "| teacher step | bfloat16 | 8 |" in report and "Main job wall time: not run." in report
