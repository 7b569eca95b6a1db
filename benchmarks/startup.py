"""Time to the first result: wall time and XLA compilations of `distill-jax run`, cold and warm cache.

    python benchmarks/startup.py                          # the smoke run and the default job, cold then warm
    python benchmarks/startup.py --jobs smoke --append benchmarks/RESULTS.md
    python benchmarks/startup.py --jobs smoke --set students=linear-labels   # a tiny job (the slow test)

Each run is a fresh Python process (nothing compiled in memory) running `distill-jax run` on the bundled
digits inside `compilation.CompileCounter`: "cold" with an empty persistent compilation cache, "warm" a
second time with the cache the cold run filled. JAX reports a program loaded from the persistent cache
through the same compile event, so the count is the same cold and warm (programs the job needs); the
seconds show what the cache saves (a load takes milliseconds, a compilation up to seconds).
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

# runs in the child process: the CLI inside a compile counter, one JSON line at the end
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from distill_jax.app import cli
from distill_jax.compilation import CompileCounter
with CompileCounter() as compiles:
    code = cli.main(sys.argv[1:])
print("STARTUP " + json.dumps({"code": code, "wall_s": time.perf_counter() - t0, "compiles": compiles.count,
                               "compile_s": compiles.seconds}))
"""


def run_once(cli_args: list[str], cache_dir: str) -> dict:
    """One `distill-jax run` in a fresh process with `cache_dir` as its persistent cache; its measurements."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("DISTILL_JAX_COMPILATION_CACHE", None)
        proc = subprocess.run([sys.executable, "-c", CHILD, "run", "--workdir", workdir, "--no-progress",
                               "--compilation-cache", cache_dir, *cli_args],
                              capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"distill-jax run {' '.join(cli_args)} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1][len("STARTUP "):])
    if out["code"] != 0:
        raise RuntimeError(f"distill-jax run exited with {out['code']}:\n{proc.stderr[-2000:]}")
    return out


def measure(job: str, extra: list[str]) -> list[dict]:
    """Cold then warm measurements of one job (`smoke` or `default`)."""
    args = (["--smoke"] if job == "smoke" else []) + extra
    with tempfile.TemporaryDirectory() as cache:
        cold = run_once(args, cache)
        warm = run_once(args, cache)
    return [{"job": job, "cache": "cold", **cold}, {"job": job, "cache": "warm", **warm}]


def format_report(rows: list[dict], argv: list[str]) -> str:
    table = common.markdown_table(
        ["job", "cache", "wall (s)", "XLA programs (compiled or loaded)", "compile or load (s)", "share of wall"],
        [[r["job"], r["cache"], f"{r['wall_s']:.1f}", r["compiles"], f"{r['compile_s']:.1f}",
          f"{100 * r['compile_s'] / r['wall_s']:.0f}%"] for r in rows])
    return "\n".join([f"### Start-up: {common.device_description()}", "",
                      f"Command: `python benchmarks/startup.py {' '.join(argv)}`; "
                      f"{common.versions('jax', 'jaxlib', 'flax')}.", "", table, ""])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", choices=("smoke", "default"), default=["smoke", "default"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to distill-jax run")
    p.add_argument("--append", metavar="RESULTS_MD", help="append the table to this markdown file")
    return p.parse_args(argv)


def main(argv=None, log=print) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    extra = [a for kv in args.set for a in ("--set", kv)]
    rows = [row for job in args.jobs for row in measure(job, extra)]
    report = format_report(rows, argv)
    log(report)
    common.append_to(args.append, report)
    return rows


if __name__ == "__main__":
    main()
