"""Real processes running `distill-jax run`: interrupt + resume, determinism, 1 vs 4 devices, two processes.

Every run goes through `distill_jax.app.cli.main` in a fresh interpreter. A small driver wraps it to
print, per process, a checksum of the final parameters of every model (`CHECKSUM name process
step sha`) and every report file written (`WROTE process path`); with `TRAIN_ONLY=1` it skips the
explanation stage (which none of these checks needs) to keep the tests fast. Runs share a JAX
persistent compilation cache, so only the first run of each device layout compiles.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r'''
import hashlib, os, sys
import jax
import numpy as np
from distill_jax import train
from distill_jax.app import _metadata, cli, job

_fit = train.fit


def fit(*args, **kwargs):
    state, history = _fit(*args, **kwargs)
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    digest = hashlib.sha256(b"".join(np.asarray(l).tobytes() for l in leaves)).hexdigest()[:16]
    print(f"CHECKSUM {args[3].desc} {jax.process_index()} {int(state.step)} {digest}", flush=True)
    return state, history


_write_json = _metadata.write_json


def write_json(path, obj):
    print(f"WROTE {jax.process_index()} {os.path.basename(path)}", flush=True)
    return _write_json(path, obj)


train.fit, _metadata.write_json = fit, write_json
if os.environ.get("TRAIN_ONLY") == "1":
    job.explain_and_report = lambda result, *a, **k: result
sys.exit(cli.main(sys.argv[1:]))
'''

SMALL = ["--smoke", "--no-progress", "--set", "students=cnn-labels", "--set", "teacher.kind=cnn",
         "--set", "teacher.epochs=3", "--set", "checkpoint_every=7", "--set", "keep_checkpoints=3"]
CHEAP_EXPLAIN = ["--set", "explain.methods=('saliency',)", "--set", "explain.num_images=2",
                 "--set", "robustness.num_images=8", "--set", "robustness.pgd_steps=1", "--set", "analysis_images=8"]
STEPS_PER_EPOCH = 22  # digits: 1437 training images // batch 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    driver = base / "driver.py"
    driver.write_text(DRIVER)
    return {"driver": str(driver), "cache": str(base / "jax_cache")}


def _start(env, workdir, *args, devices=2, train_only=True, **extra_env):
    e = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         # fast compiles, as in conftest.py
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
         "JAX_COMPILATION_CACHE_DIR": env["cache"], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "TRAIN_ONLY": "1" if train_only else "0",
         "TF_CPP_MIN_LOG_LEVEL": "3", **extra_env}
    return subprocess.Popen([sys.executable, env["driver"], "run", "--workdir", str(workdir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)


def _finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


def _checksums(out):
    """{(model, process): (step, sha)} from the driver's CHECKSUM lines."""
    found = {}
    for line in out.splitlines():
        if line.startswith("CHECKSUM "):
            _, name, proc, step, sha = line.split()
            found[(name, int(proc))] = (int(step), sha)
    return found


def _steps(workdir, model="teacher"):
    d = os.path.join(workdir, "checkpoints", model, "state")
    return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def _wait_for(predicate, proc, timeout=240, poll=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before the expected checkpoint\n{proc.communicate()[1][-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail("the expected checkpoint never appeared")


def _final_params(workdir, model):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(workdir, "checkpoints", model, "final"))
    import jax  # noqa: PLC0415

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted run: its workdir and checksums."""
    workdir = tmp_path_factory.mktemp("reference")
    code, out, err = _finish(_start(env, workdir, *SMALL))
    assert code == 0, err[-3000:]
    sums = _checksums(out)
    assert sums[("teacher", 0)][0] == 3 * STEPS_PER_EPOCH and sums[("cnn-labels", 0)][0] == STEPS_PER_EPOCH
    return str(workdir), sums


def test_sigterm_then_kill9_then_resume_ends_bitwise_where_an_uninterrupted_run_ends(env, reference, tmp_path):
    ref_dir, ref_sums = reference
    workdir = str(tmp_path / "run")
    # 1. SIGTERM once the first periodic checkpoint exists: the step in flight finishes, a checkpoint
    #    of it is written, and the command exits 130 without a traceback.
    proc = _start(env, workdir, *SMALL)
    _wait_for(lambda: 7 in _steps(workdir), proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 130, err[-3000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    stopped_at = max(_steps(workdir))
    assert 7 < stopped_at < 3 * STEPS_PER_EPOCH
    # 2. --resume, then kill -9 between two periodic checkpoints (no chance to save anything).
    proc = _start(env, workdir, *SMALL, "--resume")
    _wait_for(lambda: any(s > stopped_at and s % 7 == 0 for s in _steps(workdir)), proc)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = _finish(proc)
    assert code == -signal.SIGKILL
    # 3. --resume to the end.
    code, out, err = _finish(_start(env, workdir, *SMALL, "--resume"))
    assert code == 0, err[-3000:]
    assert _checksums(out) == ref_sums
    for model in ("teacher", "cnn-labels"):
        for a, b in zip(_final_params(workdir, model), _final_params(ref_dir, model), strict=True):
            np.testing.assert_array_equal(a, b)
    # history.json keeps the epochs finished before each interruption (loss means of a resumed epoch
    # cover only its resumed part; the test accuracy after the last epoch is the same)
    with open(os.path.join(ref_dir, "history.json")) as a, open(os.path.join(workdir, "history.json")) as b:
        ref_history, history = json.load(a), json.load(b)
    for model in ("teacher", "cnn-labels"):
        assert [e["epoch"] for e in history[model]] == [e["epoch"] for e in ref_history[model]]
        assert history[model][-1]["test_accuracy"] == ref_history[model][-1]["test_accuracy"]


def test_same_seed_gives_the_same_history_and_parameters(env, reference, tmp_path):
    ref_dir, ref_sums = reference
    code, out, err = _finish(_start(env, tmp_path, *SMALL))
    assert code == 0, err[-3000:]
    assert _checksums(out) == ref_sums
    with open(os.path.join(ref_dir, "history.json")) as a, open(tmp_path / "history.json") as b:
        assert json.load(a) == json.load(b)


def _without_timing(metrics):
    metrics = dict(metrics)
    metrics.pop("timing_s")
    for m in metrics["models"].values():
        m.pop("train_seconds", None)
    return metrics


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_json_apart_from_timing(env, tmp_path):
    runs = []
    for name in ("a", "b"):
        code, _, err = _finish(_start(env, tmp_path / name, *SMALL, *CHEAP_EXPLAIN, train_only=False))
        assert code == 0, err[-3000:]
        with open(tmp_path / name / "metrics.json") as f:
            runs.append(_without_timing(json.load(f)))
    assert runs[0] == runs[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["train", "full"])
def test_two_processes_on_loopback_agree_and_survive_a_sigterm_on_one_of_them(env, tmp_path, full):
    """2 processes x 2 CPU devices: a SIGTERM to process 1 alone stops both at the same step with a
    collective checkpoint; `--resume` restores it on both and they finish with equal parameters;
    only process 0 writes history.json (and, with the explanation stage, metrics.json and the report)."""
    workdir = str(tmp_path / "run")
    args = [*SMALL, "--set", "teacher.epochs=2", *CHEAP_EXPLAIN]

    started = []

    def start_both(*more, train_only=True):
        port = _free_port()
        started.extend(_start(env, workdir, *args, *more, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                              "2", "--process-id", str(i), train_only=train_only) for i in range(2))
        return started[-2:]

    try:
        _two_process_checks(env, workdir, start_both, full)
    finally:  # a failed check must not leave a partner process waiting for its coordinator
        for p in started:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _two_process_checks(env, workdir, start_both, full):
    procs = start_both()
    _wait_for(lambda: 7 in _steps(workdir), procs[1])
    procs[1].send_signal(signal.SIGTERM)
    results = [_finish(p, timeout=240) for p in procs]
    for code, _, err in results:
        assert code == 130 and "Traceback" not in err, err[-3000:]
    assert "interrupted by SIGTERM" in results[1][2]
    assert "interrupted by a signal on another process" in results[0][2]
    stopped_at = max(_steps(workdir))
    assert stopped_at % 10 == 0 or stopped_at == 2 * STEPS_PER_EPOCH  # they agree every 10 steps and at the end

    procs = start_both("--resume", train_only=not full)
    results = [_finish(p, timeout=400) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    sums = [_checksums(out) for _, out, _ in results]
    assert sums[0][("teacher", 0)] == sums[1][("teacher", 1)]
    assert sums[0][("cnn-labels", 0)] == sums[1][("cnn-labels", 1)]
    assert sums[0][("teacher", 0)][0] == 2 * STEPS_PER_EPOCH  # each process: 718 images // local batch 32
    wrote = [line for _, out, _ in results for line in out.splitlines() if line.startswith("WROTE")]
    if not full:  # history.json is rewritten as each model finishes, by process 0 only
        assert set(wrote) == {"WROTE 0 history.json"}, wrote
        return
    assert set(wrote) == {"WROTE 0 history.json", "WROTE 0 metrics.json"}, wrote
    assert os.path.getsize(os.path.join(workdir, "report.html")) > 1000
    with open(os.path.join(workdir, "metrics.json")) as f:
        versions = json.load(f)["versions"]
    assert versions["processes"] == 2 and versions["devices"] == 4
