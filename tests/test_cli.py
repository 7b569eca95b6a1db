"""The `distill-jax` command end to end: the smoke pipeline, its outputs, re-explaining, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distill_jax import cli

STUDENTS = ["cnn-labels", "cnn-kd", "tree-labels", "tree-kd", "linear-labels", "linear-kd", "cnn-kd+attention"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    code = cli.main(["run", "--smoke", "--workdir", workdir, "--no-progress"])
    assert code == 0
    with open(os.path.join(workdir, "metrics.json")) as f:
        return workdir, json.load(f)


def test_smoke_run_writes_metrics_with_the_documented_layout(smoke_run):
    _, m = smoke_run
    assert m["dataset"] == "digits"
    assert set(m) >= {"dataset", "config", "models", "explanations", "timing_s", "peak_rss_mb", "versions"}
    assert set(m["peak_rss_mb"]) >= {"data", "teacher", *STUDENTS, "explain", "report"}
    assert 0 < m["peak_rss_mb"]["data"] <= m["peak_rss_mb"]["report"]
    assert set(m["models"]) == {"teacher", *STUDENTS}
    assert 0.0 <= m["models"]["teacher"]["accuracy"] <= 1.0 and m["models"]["teacher"]["params"] > 300_000
    for name in STUDENTS:
        s = m["models"][name]
        assert {"accuracy", "agreement", "kl", "method", "params"} <= set(s)
        assert 0 <= s["agreement"] <= 1 and s["kl"] >= 0
        assert s["method"] == name.split("-", 1)[1]
    for name in ["teacher", *STUDENTS]:
        assert m["explanations"][name]["ig_completeness_error"] >= 0
    assert m["config"]["teacher"]["epochs"] == 1  # the smoke budget


def test_smoke_run_writes_figures_report_and_checkpoints(smoke_run):
    workdir, _ = smoke_run
    for fig in ("saliency.png", "integrated_gradients.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(workdir, "figures", fig)) > 1000
    html = open(os.path.join(workdir, "report.html")).read()
    assert "<table>" in html and 'src="figures/saliency.png"' in html and "cnn-kd" in html
    for name in ["teacher", *STUDENTS]:
        assert os.path.isdir(os.path.join(workdir, "checkpoints", name, "final"))


def test_explain_recomputes_from_checkpoints(smoke_run, capsys):
    workdir, before = smoke_run
    assert cli.main(["explain", "--workdir", workdir]) == 0
    after = json.load(open(os.path.join(workdir, "metrics.json")))
    assert after["models"] == before["models"]
    for name in before["explanations"]:
        assert after["explanations"][name]["ig_completeness_error"] == pytest.approx(
            before["explanations"][name]["ig_completeness_error"], rel=1e-3, abs=1e-6)


BAD = [
    (["--dataset", "imagenet-please"], "imagenet-please"),
    (["--set", "method.temperature=0"], "method.temperature=0"),
    (["--set", "method.alpha=1.5"], "method.alpha=1.5"),
    (["--set", "tree.depth=0"], "tree.depth=0"),
    (["--set", "teacher.batch_size=0"], "teacher.batch_size=0"),
    (["--set", "student.batch_size=-3"], "student.batch_size=-3"),
    (["--set", "no.such=1"], "no group 'no'"),
    (["--config", "/nonexistent/config.py"], "does not exist"),
    (["--dataset", "idx:/nonexistent/dir"], "train-images-idx3-ubyte"),
    (["--dataset", "fashion_mnist", "--set", "data_dir=/nonexistent/dir"], "apt-get install dataset-fashion-mnist"),
    (["--set", "train_limit=-1"], "train_limit=-1"),
    (["--set", "method.cache_limit_mb=-1"], "method.cache_limit_mb=-1"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_input_exits_2_with_one_line(extra, needle, tmp_path, capsys):
    code = cli.main(["run", "--smoke", "--workdir", str(tmp_path), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("distill-jax: error:") and needle in err[0], err


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = cli.main(["run", "--smoke", "--workdir", str(blocker / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not writable" in err[0]


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "distill_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_real_process_exit_status_and_no_traceback(tmp_path):
    proc = _cli("run", "--smoke", "--workdir", str(tmp_path), "--dataset", "nope:x")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "nope:x" in err


def test_ctrl_c_exits_cleanly_and_keeps_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    proc = _cli("run", "--workdir", str(workdir), "--no-progress", "--set", "checkpoint_every=5",
                "--set", "teacher.epochs=200")
    state_dir = workdir / "checkpoints" / "teacher" / "state"
    deadline = time.time() + 240
    while time.time() < deadline and not (state_dir.is_dir() and any(p.name.isdigit() for p in state_dir.iterdir())):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    steps = sorted(int(p.name) for p in state_dir.iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 5  # checkpoints written before the interrupt are kept
