"""Wall time and peak resident memory of each stage of the main job at 5,000, 20,000 and 60,000 training images.

    python benchmarks/scale.py [--sizes 5000 20000 60000] [--epochs 1] [--out benchmarks/scale.md]

Each size runs `distill-jax run --config experiments/configs/fashion_mnist.py` in a fresh process
(so each peak is that run's own), on the first N images of Fashion-MNIST's training split (Debian's
`dataset-fashion-mnist` files; `--data-dir` for another copy) and the full 10,000-image test split,
with every default student and `--epochs` epochs per model. The stages and their peaks come from the
run's metrics.json (`timing_s`, `peak_rss_mb`: the process's peak resident memory once the stage has
finished, so each figure includes every stage before it). Prints a markdown table; `--out` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
CONFIG = os.path.join(ROOT, "experiments", "configs", "fashion_mnist.py")


def run_one(size: int, epochs: int, data_dir: str | None, workdir: str, extra: list[str]) -> dict:
    """Runs the job on `size` training images in a subprocess; returns its metrics.json plus the wall time."""
    cmd = [sys.executable, "-m", "distill_jax.app.cli", "run", "--config", CONFIG, "--workdir", workdir, "--no-progress",
           "--set", f"train_limit={size}", "--set", f"teacher.epochs={epochs}", "--set", f"student.epochs={epochs}"]
    if data_dir:
        cmd += ["--set", f"data_dir={data_dir}"]
    cmd += [arg for pair in extra for arg in ("--set", pair)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"size {size}: the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    metrics["wall_s"] = wall
    return metrics


def table(results: dict[int, dict]) -> str:
    """Stages as rows, sizes as columns: 'seconds s / peak MB'; accuracies of every model at the end."""
    sizes = sorted(results)
    stages = [k for k in results[sizes[0]]["timing_s"] if k != "total"]
    rows = [[stage] + [f"{results[n]['timing_s'].get(stage, float('nan')):.1f} s / "
                       f"{results[n]['peak_rss_mb'].get(stage, float('nan')):.0f} MB" for n in sizes]
            for stage in stages]
    rows.append(["whole process (wall, peak)"] + [f"{results[n]['wall_s']:.1f} s / "
                                                  f"{max(results[n]['peak_rss_mb'].values()):.0f} MB" for n in sizes])
    for model in results[sizes[0]]["models"]:
        rows.append([f"accuracy {model}"] + [f"{results[n]['models'][model]['accuracy']:.4f}" for n in sizes])
    return common.markdown_table(["stage"] + [f"{n:,} images" for n in sizes], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 60000])
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the teacher and of every student")
    parser.add_argument("--data-dir", help="directory with Fashion-MNIST's four IDX files (default: Debian's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results[size] = run_one(size, args.epochs, args.data_dir, os.path.join(tmp, str(size)), args.set)
            print(f"{size} images: {results[size]['wall_s']:.1f} s, peak {max(results[size]['peak_rss_mb'].values()):.0f} MB",
                  flush=True)
    first = results[min(results)]
    header = (f"Machine: {first['versions']['processor']}, {first['versions']['cpus']} cores, "
              f"backend {first['versions']['backend']}; jax {first['versions']['jax']}, flax {first['versions']['flax']}. "
              f"{args.epochs} epoch(s) per model; `seconds / peak RSS so far` per stage.")
    text = header + "\n\n" + table(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
