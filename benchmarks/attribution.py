"""Integrated gradients: `distill_jax.attr` against Captum, same SeedCNN weights in Flax and PyTorch.

    python benchmarks/attribution.py                      # 16 images 32x32x3, 64 steps, 5 repeats
    python benchmarks/attribution.py --repeats 9 --ibs 16 64 256 1024
    python benchmarks/attribution.py --quick              # seconds: tiny shapes, 1 repeat
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/attribution.py
    python benchmarks/attribution.py --torch-threads 1    # PyTorch single-threaded (see RESULTS.md: load)

What it does, in one process:
1. Builds SeedCNN (10 classes) once with random weights (kernels N(0, 2/fan_in), biases N(0, 0.1^2))
   and copies them into the same network in PyTorch: conv kernels [3, 3, in, out] -> [out, in, 3, 3];
   dense1's rows permuted from Flax's (h, w, c) flatten order to PyTorch's (c, h, w);
   `MaxPool2d(2, ceil_mode=True)` is SAME pooling. Stops unless both give the same logits (1e-4).
2. Variants: `jax` (`explain.integrated_gradients` on `models.SeedCNN(impl=--impl)`, jitted with the
   params as an argument, the whole batch per path step), `jax batch_chunk=G` (groups of G examples,
   less scratch), `captum default` (`IntegratedGradients.attribute`, internal_batch_size=None: all
   steps x batch in one batch), `captum ibs=N` for each --ibs. Both sides use the Gauss-Legendre rule
   (Captum's default method; `method="gauss_legendre"` here), so the attributions are the same sum.
   (Captum's "riemann_trapezoid" weights sum to (n-1)/n, not 1 - halved 1/n end weights - so its
   trapezoid attributions are 1/n smaller than the textbook rule's, 1.6% at 64 steps.)
3. Checks every attribution against `jax`: max |A - A_jax| / max |A_jax|.
4. Times all variants interleaved round-robin (`common.interleave`, medians) and reports the time
   ratio to Captum's default and to Captum's fastest setting in this run.
5. Memory: each variant runs again in a fresh subprocess (`--probe`): set up, one warm call
   (compilation for JAX), free memory handed back to the OS (glibc `malloc_trim(0)`, tcmalloc
   `MallocExtension_ReleaseFreeMemory`), the peak-RSS mark reset (`5` > /proc/self/clear_refs), one
   call; "peak MB" is VmHWM after it minus VmRSS before it: the memory one warm call needs on top of
   the model and inputs, whatever the allocator. JAX also reports XLA's scratch size
   (`compiled.memory_analysis().temp_size_in_bytes`).

Allocator: both frameworks share the process's malloc (header line; the probes inherit LD_PRELOAD).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from distill_jax import attr
from distill_jax import models
from distill_jax.models import _layers

NUM_CLASSES = 10
CONV = (64, 64, 128, 128)
DENSE = (512,)


# --------------------------------------------------------------------------- shared set-up


def make_inputs(shape, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal NHWC images and random targets (fixed seed: every variant sees the same)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *shape), dtype=np.float32), rng.integers(0, NUM_CLASSES, batch).astype(np.int32)


def init_params(shape, seed: int = 0) -> dict:
    """SeedCNN params: kernels N(0, 2/fan_in), biases N(0, 0.1^2) (non-zero, so no ReLU sits exactly at 0)."""
    rng = np.random.default_rng(seed + 1)
    shapes = jax.eval_shape(models.SeedCNN(NUM_CLASSES).init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, *shape), jnp.float32))["params"]

    def fill(leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape, dtype=np.float32))
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) * np.sqrt(2.0 / fan_in))

    return jax.tree_util.tree_map(fill, shapes)


def torch_seed_cnn(params: dict, shape):
    """SeedCNN in torch.nn (NCHW) holding the Flax `params` (layouts and flatten order converted)."""
    return common.torch_convnet(params, shape, CONV, DENSE, NUM_CLASSES)


def torch_available() -> bool:
    try:
        import captum  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class Variant:
    name: str
    run: Callable[[], np.ndarray]  # blocks; returns the attribution as NHWC numpy
    first_call_s: float
    scratch_mb: float | None = None  # XLA temp buffers (JAX only)


def jax_variant(params, x, t, *, steps: int, impl: str, batch_chunk: int | None) -> Variant:
    """`explain.integrated_gradients` jitted with params as an argument (not baked in as constants)."""
    net = models.SeedCNN(NUM_CLASSES, impl=impl)

    def ig(p, xx, tt):
        return attr.integrated_gradients(functools.partial(net.apply, {"params": p}), xx, tt, steps=steps,
                                            method="gauss_legendre", batch_chunk=batch_chunk)

    t0 = time.perf_counter()
    compiled = jax.jit(ig).lower(params, x, t).compile()
    out = compiled(params, x, t)
    common.block(out)
    first = time.perf_counter() - t0
    scratch = compiled.memory_analysis()
    scratch_mb = scratch.temp_size_in_bytes / 2**20 if scratch is not None else None
    name = "jax" if batch_chunk is None else f"jax batch_chunk={batch_chunk}"

    def run():
        out = compiled(params, x, t)
        common.block(out)
        return np.asarray(out)

    return Variant(name, run, first, scratch_mb)


def captum_variant(params, x, t, *, steps: int, ibs: int | None) -> Variant:
    """Captum's IntegratedGradients on the PyTorch copy (Gauss-Legendre, its default method)."""
    import torch
    from captum.attr import IntegratedGradients

    net = torch_seed_cnn(params, x.shape[1:])
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tt = torch.from_numpy(t.astype(np.int64))
    ig = IntegratedGradients(net)

    def run():
        a = ig.attribute(xt, target=tt, n_steps=steps, method="gausslegendre", internal_batch_size=ibs)
        return a.detach().numpy().transpose(0, 2, 3, 1)

    t0 = time.perf_counter()
    run()
    return Variant("captum default" if ibs is None else f"captum ibs={ibs}", run, time.perf_counter() - t0)


def build(name: str, params, x, t, args) -> Variant:
    """The variant called `name` (see `variant_names`)."""
    if name == "jax":
        return jax_variant(params, x, t, steps=args.steps, impl=args.impl, batch_chunk=None)
    if name.startswith("jax batch_chunk="):
        return jax_variant(params, x, t, steps=args.steps, impl=args.impl, batch_chunk=int(name.split("=")[1]))
    if name == "captum default":
        return captum_variant(params, x, t, steps=args.steps, ibs=None)
    if name.startswith("captum ibs="):
        return captum_variant(params, x, t, steps=args.steps, ibs=int(name.split("=")[1]))
    raise ValueError(f"unknown variant {name!r}")


def variant_names(args, with_torch: bool) -> list[str]:
    names = ["jax"] + [f"jax batch_chunk={g}" for g in args.batch_chunk]
    if with_torch:
        names += ["captum default"] + [f"captum ibs={n}" for n in args.ibs]
    return names


def check_logits(params, x, atol: float = 1e-4) -> float:
    """Max |logits_flax - logits_torch| for the same weights; raises if above `atol`."""
    import torch

    flax_logits = np.asarray(models.SeedCNN(NUM_CLASSES).apply({"params": params}, x))
    with torch.no_grad():
        torch_logits = torch_seed_cnn(params, x.shape[1:])(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    err = float(np.abs(flax_logits - torch_logits).max())
    if not err <= atol:
        raise RuntimeError(f"Flax and PyTorch SeedCNN logits differ by {err:.3g} > {atol}: the weight copy is wrong")
    return err


# --------------------------------------------------------------------------- memory probe


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def release_free_memory() -> None:
    """Hands the allocator's free memory back to the OS (tcmalloc or glibc), so RSS is live memory."""
    gc.collect()
    if "tcmalloc" in common.detect_allocator():
        lib = ctypes.CDLL(common.tcmalloc_path() or "libtcmalloc_minimal.so.4")
        lib.MallocExtension_ReleaseFreeMemory()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def probe(name: str, args) -> dict:
    """Peak RSS a warm call of variant `name` adds (see the module docstring), in MB."""
    x, t = make_inputs(args.shape, args.batch)
    params = init_params(args.shape)
    rss0 = _proc_status_kb("VmRSS")
    v = build(name, params, x, t, args)  # includes one call (compilation for JAX)
    first_peak = _proc_status_kb("VmHWM") - rss0
    release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_kb("VmRSS")
    v.run()
    peak = _proc_status_kb("VmHWM") - before
    return {"variant": name, "peak_mb": peak / 1024, "first_call_peak_mb": first_peak / 1024}


def probe_in_subprocess(name: str, argv: Sequence[str]) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--probe", name]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    sys.stderr.write(f"memory probe for {name!r} failed:\n{out.stderr[-2000:]}\n")
    return None


# --------------------------------------------------------------------------- main


@dataclasses.dataclass
class Row:
    variant: str
    seconds: float
    first_call_s: float
    rel_diff: float  # max |A - A_jax| / max |A_jax|
    scratch_mb: float | None = None
    peak_mb: float | None = None
    ratios: dict = dataclasses.field(default_factory=dict)  # "captum default"/"captum best" -> time ratio


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 32x32x3; got {text!r}") from None
    return h, w, c


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="images (default 16)")
    p.add_argument("--steps", type=int, default=None, help="IG path steps (default 64)")
    p.add_argument("--shape", type=parse_shape, default=None, help="HxWxC (default 32x32x3)")
    p.add_argument("--repeats", type=int, default=None, help="round-robin repetitions (default 5)")
    p.add_argument("--ibs", type=int, nargs="*", default=None, help="Captum internal_batch_size values (default 16 64 256)")
    p.add_argument("--batch-chunk", type=int, nargs="*", default=None,
                   help="extra JAX variants with batch_chunk=G (default 4)")
    p.add_argument("--impl", choices=sorted(_layers.CONV_IMPLS), default="patches",
                   help="SeedCNN impl (default patches: what distill_jax runs attributions with, models.for_attribution)")
    p.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N) for the Captum variants (default: torch's own choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4, 16x16x3, 8 steps, 1 repeat")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quick = {"batch": 4, "steps": 8, "shape": (16, 16, 3), "repeats": 1, "ibs": [4], "batch_chunk": [2]}
    full = {"batch": 16, "steps": 64, "shape": (32, 32, 3), "repeats": 5, "ibs": [16, 64, 256], "batch_chunk": [4]}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def _forward_argv(a: argparse.Namespace) -> list[str]:
    """The options a probe subprocess needs to build the same inputs and variants."""
    argv = ["--batch", str(a.batch), "--steps", str(a.steps), "--shape", "x".join(map(str, a.shape)), "--impl", a.impl]
    return argv + (["--torch-threads", str(a.torch_threads)] if a.torch_threads else [])


def _set_torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def with_torch_requested(args) -> bool:
    return "torch" in args.frameworks and torch_available() and (args.probe is None or args.probe.startswith("captum"))


def format_rows(rows: Sequence[Row]) -> str:
    header = ["variant", "median s", "time / captum default", "time / captum best", "peak MB", "XLA scratch MB",
              "max abs diff / max attr", "first call s"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    return common.markdown_table(header, [
        [r.variant, f"{r.seconds:.3f}", fmt(r.ratios.get("captum default"), ".2f"), fmt(r.ratios.get("captum best"), ".2f"),
         fmt(r.peak_mb, ".1f"), fmt(r.scratch_mb, ".1f"), f"{r.rel_diff:.1e}", f"{r.first_call_s:.2f}"] for r in rows])


def main(argv=None, log=print) -> list[Row]:
    args = parse_args(argv)
    if with_torch_requested(args):
        _set_torch_threads(args.torch_threads)
    if args.probe:
        print("PROBE " + json.dumps(probe(args.probe, args)), flush=True)
        return []
    with_torch = "torch" in args.frameworks and torch_available()
    if "torch" in args.frameworks and not with_torch:
        log("note: torch or captum is not importable; Captum variants skipped "
            "(pip install torch==2.13.0 captum)")
    log(f"integrated gradients, {args.steps} steps (Gauss-Legendre), batch {args.batch}, "
        f"{'x'.join(map(str, args.shape))}, SeedCNN impl={args.impl}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    log(f"machine: {common.device_description()}; load average {os.getloadavg()[0]:.1f}")
    log(f"versions: python {sys.version.split()[0]}, {common.versions('jax', 'jaxlib', 'flax', 'torch', 'captum')}")
    threads = ""
    if with_torch:
        import torch

        threads = f"; torch intra-op threads {torch.get_num_threads()}"
    log(f"allocator (both frameworks share this process's malloc): {common.detect_allocator()}{threads}")

    x, t = make_inputs(args.shape, args.batch)
    params = init_params(args.shape)
    if with_torch:
        log(f"logits Flax vs PyTorch, same weights: max abs diff {check_logits(params, x):.2e} (limit 1e-4)")

    variants = [build(n, params, x, t, args) for n in variant_names(args, with_torch)]
    attrs = {v.name: v.run() for v in variants}
    ref = attrs["jax"]
    scale = float(np.abs(ref).max())
    seconds = common.interleave({v.name: v.run for v in variants}, args.repeats)
    rows = [Row(v.name, seconds[v.name], v.first_call_s, float(np.abs(attrs[v.name] - ref).max()) / scale, v.scratch_mb)
            for v in variants]
    captum = [r for r in rows if r.variant.startswith("captum")]
    if captum:
        default = next(r for r in captum if r.variant == "captum default")
        best = min(captum, key=lambda r: r.seconds)
        log(f"captum best setting in this run: {best.variant} ({best.seconds:.3f} s)")
        for r in rows:
            r.ratios = {"captum default": r.seconds / default.seconds, "captum best": r.seconds / best.seconds}
    if not args.no_memory:
        for r in rows:
            res = probe_in_subprocess(r.variant, _forward_argv(args))
            r.peak_mb = None if res is None else res["peak_mb"]
    log(format_rows(rows))
    log(f"load average after the run {os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
