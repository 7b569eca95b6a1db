"""One prepared script for a GPU or TPU machine: training throughput and MFU, attribution speed, the main job.

    python benchmarks/accelerator.py --append benchmarks/RESULTS.md     # on the accelerator machine
    python benchmarks/accelerator.py --quick                            # seconds on a CPU: the smoke check

What it measures, on every device of the machine (the library's mesh, batches split over `data`):
  teacher step   SeedCNN train step (labels, SGD momentum), float32 and bfloat16 compute
                 (`--set dtype=bfloat16`'s path: `models.with_compute_dtype`)
  distill step   SeedCNN teacher forward + SmallCNN student step with Hinton KD, float32 and bfloat16
  IG             integrated gradients of the SeedCNN (`audit.attribution_maps`, 64 steps), images/s
  main job       `distill-jax run` on the bundled digits (default config; `--quick`: `--smoke`), wall time

Images/s are medians over `--repeats` timed samples after a warm-up. MFU = (analytic FLOPs per image x
images/s) / (peak FLOP/s of the device for that dtype x devices), with the peaks of `PEAK_TFLOPS`
(vendor dense figures, no sparsity); a device not in the table gets no MFU rather than a guess.
The first call of each case (trace + compile + one step) is reported as `first (s)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks import common, train_step  # noqa: E402
from distill_jax import parallel
from distill_jax import audit
from distill_jax import models
from distill_jax.app import cli

# Dense peak TFLOP/s per device by (device_kind prefix, compute dtype): vendor data sheets, no sparsity.
# float32 on NVIDIA tensor-core parts is the non-tensor-core rate (the library keeps HIGHEST precision
# where numbers are reported; training matmuls may use TF32, which would make this MFU an overestimate).
PEAK_TFLOPS = {
    ("NVIDIA H200", "bfloat16"): 989.0, ("NVIDIA H200", "float32"): 67.0,
    ("NVIDIA H100", "bfloat16"): 989.0, ("NVIDIA H100", "float32"): 67.0,
    ("NVIDIA A100", "bfloat16"): 312.0, ("NVIDIA A100", "float32"): 19.5,
    ("NVIDIA L4", "bfloat16"): 121.0, ("NVIDIA L4", "float32"): 30.3,
    ("Tesla T4", "bfloat16"): 65.0, ("Tesla T4", "float32"): 8.1,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v6 lite", "bfloat16"): 918.0, ("TPU v6e", "bfloat16"): 918.0,
}
DTYPES = ("float32", "bfloat16")


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The table's peak for a device kind (matched by prefix) and dtype, or None when unknown."""
    for (prefix, dt), value in PEAK_TFLOPS.items():
        if device_kind.startswith(prefix) and dt == dtype:
            return value
    return None


@dataclasses.dataclass
class Row:
    case: str
    dtype: str
    batch: int
    images_per_s: float
    first_s: float
    mfu: float | None  # fraction of peak, or None


def _median_images_per_s(run, images: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        samples.append(images / (time.perf_counter() - t0))
    return statistics.median(samples)


def train_case(step: str, dtype: str, shape, batch: int, params: dict, mesh, inner: int) -> train_step.Case:
    """The library's sharded train step in `dtype` (`train_step.jax_case` on `mesh`): `run()` does `inner` steps."""
    x, y = train_step.make_inputs(shape, batch)
    return train_step.jax_case("seed" if step == "teacher" else "distill", "lax_conv", x, y, params, inner,
                               dtype=dtype, mesh=mesh)


def ig_case(shape, batch: int, params: dict, mesh, ig_steps: int):
    model = models.SeedCNN(train_step.NUM_CLASSES)
    x, y = train_step.make_inputs(shape, batch)
    xs, ys = parallel.place_batch((x, y), mesh)
    variables = parallel.replicate({"params": params["seed"]}, mesh)

    def run():
        common.block(audit.attribution_maps(model, variables, xs, ys, methods=("integrated_gradients",),
                                            ig_steps=ig_steps, smoothgrad_samples=1, key=jax.random.PRNGKey(0)))

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def main_job_seconds(quick: bool) -> float:
    """Wall time of `distill-jax run` on digits (the default job; `--smoke` when quick), in a fresh workdir."""

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        code = cli.main(["run", "--workdir", workdir, "--no-progress", *(["--smoke"] if quick else [])])
        seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"distill-jax run exited with {code}")
    return seconds


def measure(args) -> tuple[list[Row], float | None]:
    mesh = parallel.make_mesh()
    devices = jax.device_count()
    shape = train_step.parse_shape(args.shape)
    batch = max(args.batch // devices, 1) * devices
    params = train_step.init_params(shape)
    kind = jax.devices()[0].device_kind
    rows = []
    for step in ("teacher", "distill"):
        flops = train_step.step_flops("seed" if step == "teacher" else "distill", shape)
        for dtype in DTYPES:
            case = train_case(step, dtype, shape, batch, params, mesh, args.inner)
            ips = _median_images_per_s(case.run, batch * args.inner, args.repeats)
            peak = peak_tflops(kind, dtype)
            mfu = flops * ips / (peak * 1e12 * devices) if peak else None
            rows.append(Row(f"{step} step", dtype, batch, ips, case.first_step_s, mfu))
    run, first = ig_case(shape, batch, params, mesh, args.ig_steps)
    rows.append(Row(f"integrated gradients ({args.ig_steps} steps)", "float32", batch,
                    _median_images_per_s(run, batch, args.repeats), first, None))
    job = None if args.no_job else main_job_seconds(args.quick)
    return rows, job


def format_report(rows: list[Row], job: float | None, args) -> str:
    header = ["case", "compute dtype", "global batch", "images/s", "first (s)", "MFU"]
    table = common.markdown_table(header, [
        [r.case, r.dtype, r.batch, f"{r.images_per_s:,.0f}", f"{r.first_s:.1f}",
         "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"] for r in rows])
    when = datetime.date.today().isoformat()
    job_text = "not run" if job is None else f"{job:.1f} s ({'--smoke' if args.quick else 'default config'}, digits)"
    return "\n".join([
        f"### Accelerator run ({when}): {common.device_description()}",
        "",
        f"Command: `python benchmarks/accelerator.py {' '.join(sys.argv[1:])}`; input {args.shape}, "
        f"{args.repeats} samples of {args.inner} steps; {common.versions('jax', 'jaxlib', 'flax', 'optax')}.",
        "",
        table,
        "",
        f"Main job wall time: {job_text}.",
        "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="32x32x3", help="input HxWxC (default: CIFAR-10's)")
    p.add_argument("--batch", type=int, default=256, help="global batch (rounded down to a multiple of the devices)")
    p.add_argument("--inner", type=int, default=20, help="steps per timed sample")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per case (median)")
    p.add_argument("--ig-steps", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny sizes and the --smoke job: a CPU smoke check")
    p.add_argument("--no-job", action="store_true", help="skip the main job's wall time")
    p.add_argument("--append", metavar="RESULTS_MD", help="append the report to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.batch, args.inner, args.repeats, args.ig_steps = "8x8x1", 8, 1, 1, 4
    return args


def main(argv=None, log=print) -> tuple[list[Row], str]:
    args = parse_args(argv)
    rows, job = measure(args)
    report = format_report(rows, job, args)
    log(report)
    common.append_to(args.append, report)
    return rows, report


if __name__ == "__main__":
    main()
