"""Time to the first result: wall time and XLA compilations of `distill-jax run`, cold and warm cache.

    python benchmarks/startup.py                          # the smoke run and the default job, cold then warm
    python benchmarks/startup.py --jobs smoke --append benchmarks/RESULTS.md
    python benchmarks/startup.py --jobs smoke --set students=linear-labels   # a tiny job (the slow test)
    python benchmarks/startup.py --jobs smoke --programs --no-cache --devices 4  # every program, by stage

Each run is a fresh Python process (nothing compiled in memory) running `distill-jax run` on the bundled
digits inside `compilation.CompileCounter`: "cold" with an empty persistent compilation cache, "warm" a
second time with the cache the cold run filled. JAX reports a program loaded from the persistent cache
through the same compile event, so the count is the same cold and warm (programs the job needs); the
seconds show what the cache saves (a load takes milliseconds, a compilation up to seconds).

`--no-cache`: one cold run with the persistent cache off (DISTILL_JAX_COMPILATION_CACHE=off), nothing written.
`--devices N`: the child sees N XLA:CPU devices (`--xla_force_host_platform_device_count=N`, as the tests' 4).
`--programs`: also list every XLA program by stage (data, teacher, each student, metrics, audit, report) and
name (JAX's `fun_name`: `jit(step)`, `jit(_predict)`, `jit(add)` for an eager operation, ...), with its count
and compile seconds. A stage is the `job` function running when the program compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

# runs in the child process: the CLI inside a compile counter, one JSON line at the end; every program's
# (stage, name, seconds), the stage being the `job` function that was running
CHILD = """
import functools, json, sys, time
t0 = time.perf_counter()
import jax, jax.monitoring
from distill_jax.app import cli, job
from distill_jax.compilation import BACKEND_COMPILE_EVENT, CompileCounter
stage, programs = ["startup"], []

def listen(event, duration, fun_name="?", **_):
    if event == BACKEND_COMPILE_EVENT:
        programs.append((stage[0], fun_name, duration))

def staged(fn, name=None, after=None):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stage[0] = name or args[0]
        try:
            return fn(*args, **kwargs)
        finally:
            stage[0] = after or stage[0]
    return wrapper

job.prepare_data = staged(job.prepare_data, "data")
job.train_teacher = staged(job.train_teacher, "teacher")
job.train_student = staged(job.train_student)  # its first argument is the student's name
job.model_metrics = staged(job.model_metrics, "metrics")
job.distillation_comparisons = staged(job.distillation_comparisons, "metrics")
job.audit_models = staged(job.audit_models, "audit", after="report")
jax.monitoring.register_event_duration_secs_listener(listen)
with CompileCounter() as compiles:
    code = cli.main(sys.argv[1:])
print("STARTUP " + json.dumps({"code": code, "wall_s": time.perf_counter() - t0, "compiles": compiles.count,
                               "compile_s": compiles.seconds, "devices": jax.device_count(), "programs": programs}))
"""


def run_once(cli_args: list[str], cache_dir: str | None, devices: int | None = None, keep: str | None = None) -> dict:
    """One `distill-jax run` in a fresh process with `cache_dir` as its persistent cache (None: none) on `devices`
    XLA:CPU devices (None: the environment's), its outputs in `keep` (None: a temporary folder); its measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = keep or tmp
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("DISTILL_JAX_COMPILATION_CACHE", None)
        cache_args = ["--compilation-cache", cache_dir] if cache_dir else ["--no-compilation-cache"]
        if devices:
            env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                         if not f.startswith("--xla_force_host_platform_device_count")]
                                        + [f"--xla_force_host_platform_device_count={devices}"])
        proc = subprocess.run([sys.executable, "-c", CHILD, "run", "--workdir", workdir, "--no-progress",
                               *cache_args, *cli_args],
                              capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"distill-jax run {' '.join(cli_args)} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1][len("STARTUP "):])
    if out["code"] != 0:
        raise RuntimeError(f"distill-jax run exited with {out['code']}:\n{proc.stderr[-2000:]}")
    return out


def measure(job: str, extra: list[str], *, cache: bool = True, devices: int | None = None,
            keep: str | None = None) -> list[dict]:
    """Cold then warm measurements of one job (`smoke` or `default`); `cache=False`: one run, the cache off, its
    outputs (metrics.json, checkpoints) kept in `keep/<job>` when given."""
    args = (["--smoke"] if job == "smoke" else []) + extra
    if not cache:
        return [{"job": job, "cache": "off", **run_once(args, None, devices, keep and os.path.join(keep, job))}]
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_once(args, cache_dir, devices)
        warm = run_once(args, cache_dir, devices)
    return [{"job": job, "cache": "cold", **cold}, {"job": job, "cache": "warm", **warm}]


def program_table(row: dict) -> str:
    """Every program of one run by stage and name: count and compile seconds, stages in run order."""
    groups: dict[tuple[str, str], list[float]] = {}
    for stage, name, seconds in row["programs"]:
        groups.setdefault((stage, name), []).append(seconds)
    stages = {}
    for (stage, _), secs in groups.items():
        stages.setdefault(stage, [0, 0.0])
        stages[stage][0] += len(secs)
        stages[stage][1] += sum(secs)
    rows = [[stage, name, len(secs), f"{sum(secs):.2f}"] for (stage, name), secs in groups.items()]
    summary = [[stage, "(all)", n, f"{s:.2f}"] for stage, (n, s) in stages.items()]
    return common.markdown_table(["stage", "program", "count", "compile (s)"], summary + rows)


def format_report(rows: list[dict], argv: list[str]) -> str:
    table = common.markdown_table(
        ["job", "cache", "devices", "wall (s)", "XLA programs (compiled or loaded)", "compile or load (s)", "share of wall"],
        [[r["job"], r["cache"], r["devices"], f"{r['wall_s']:.1f}", r["compiles"], f"{r['compile_s']:.1f}",
          f"{100 * r['compile_s'] / r['wall_s']:.0f}%"] for r in rows])
    return "\n".join([f"### Start-up: {common.device_description()}", "",
                      f"Command: `python benchmarks/startup.py {' '.join(argv)}`; "
                      f"{common.versions('jax', 'jaxlib', 'flax')}.", "", table, ""])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", choices=("smoke", "default"), default=["smoke", "default"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to distill-jax run")
    p.add_argument("--append", metavar="RESULTS_MD", help="append the table to this markdown file")
    p.add_argument("--no-cache", action="store_true", help="one cold run per job with the persistent cache off")
    p.add_argument("--devices", type=int, metavar="N", help="N XLA:CPU devices in the child (default: the environment's)")
    p.add_argument("--programs", action="store_true", help="list every program by stage and name")
    p.add_argument("--keep", metavar="DIR", help="with --no-cache: keep each job's outputs in DIR/<job>")
    return p.parse_args(argv)


def main(argv=None, log=print) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    extra = [a for kv in args.set for a in ("--set", kv)]
    rows = [row for job in args.jobs for row in measure(job, extra, cache=not args.no_cache, devices=args.devices,
                                                          keep=args.keep)]
    report = format_report(rows, argv)
    if args.programs:
        report += "".join(f"\nPrograms of {r['job']} ({r['cache']} cache):\n\n{program_table(r)}\n" for r in rows)
    log(report)
    common.append_to(args.append, report)
    return rows


if __name__ == "__main__":
    main()
