"""Train-step speed: distill_jax (JAX/Flax) against the same networks in PyTorch, interleaved in one run.

    python benchmarks/train_step.py                       # full: batch 32 and 256, 32x32x3 and 28x28x1
    python benchmarks/train_step.py --batch 256 --shape 32x32x3 --repeats 10
    python benchmarks/train_step.py --quick               # seconds: tiny shapes, 1 repeat, no torch.compile
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/train_step.py

Two steps, each at every (input shape, batch):
  seed     SeedCNN train step: forward, backward, SGD momentum 0.9, cross entropy
           (`distill.make_loss_fn(..., "labels")` + `train.make_train_step`, what `distill-jax` runs).
  distill  SeedCNN teacher forward under stop_gradient + SmallCNN student train step, Hinton KD
           (method "kd": alpha * T^2 KL + (1 - alpha) CE, T = 4, alpha = 0.9), SGD momentum 0.9.
Variants: `jax lax_conv` / `jax patches` / `jax lax` (models.SeedCNN impl; `jax lax_conv-xla-grad` is
`lax_conv` with XLA's own filter gradient instead of the backend's `conv_filter_grad_chunk`; the teacher forward of the
distill step always runs as `impl="lax"`, see `models.forward_only`), `torch eager` (NCHW), `torch channels_last`,
`torch compile` (torch.compile of the models; skipped with a note when a compile exceeds
--compile-budget). Every variant starts from the same weights and images, and the first-step
losses are printed side by side: they agree to float32 rounding, so every variant computes the
same step. Each timing sample runs max(1, 256 // batch) steps; the figure is the median over
round-robin repetitions, with a jitted float32 matmul timed in the same round-robin as the peak.

FLOPs are counted analytically (2 per multiply-add of the conv and dense layers; a training
step is 3x its forward; the distill step is the teacher's forward + 3x the student's forward).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
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
from distill_jax import backend, parallel
from distill_jax import distill
from distill_jax import models
from distill_jax import train

NUM_CLASSES = 10
LEARNING_RATE = 0.01
MOMENTUM = 0.9
TEMPERATURE = 4.0
ALPHA = 0.9
REFERENCE_BATCH = 256  # a timing sample covers about this many images

ARCHS = {  # conv widths, dense widths: must match models.SeedCNN / models.SmallCNN
    "seed": (tuple(models.SeedCNN.conv_features), tuple(models.SeedCNN.dense_features)),
    "small": (tuple(models.SmallCNN.conv_features), tuple(models.SmallCNN.dense_features)),
}
# "lax_conv-xla-grad": the lax_conv model with XLA's own filter gradient (the backend's grouped patch
# products switched off), to measure that choice in the same run
JAX_IMPLS = ("lax_conv", "lax_conv-xla-grad", "patches", "lax")
XLA_GRAD = "-xla-grad"
TORCH_MODES = ("eager", "channels_last", "compile")
BASELINES = ("torch eager", "torch channels_last")


# --------------------------------------------------------------------------- FLOPs


def forward_macs(arch: str, shape: tuple[int, int, int], num_classes: int = NUM_CLASSES) -> int:
    """Multiply-adds of one image's forward pass: 3x3 SAME convs, 2x2 SAME pools, dense layers.

    conv: h * w * 9 * c_in * c_out; dense: d_in * d_out; pooling halves h, w (rounding up).
    """
    conv, dense = ARCHS[arch]
    h, w, c = shape
    macs = 0
    for width in conv:
        macs += h * w * 9 * c * width
        h, w, c = -(-h // 2), -(-w // 2), width
    d = h * w * c
    for width in (*dense, num_classes):
        macs += d * width
        d = width
    return macs


def step_flops(step: str, shape: tuple[int, int, int]) -> float:
    """FLOPs per image of one train step (2 per multiply-add; backward = 2x forward)."""
    if step == "seed":
        return 2.0 * 3 * forward_macs("seed", shape)
    return 2.0 * (forward_macs("seed", shape) + 3 * forward_macs("small", shape))


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    """One variant of one step, ready to time: `run()` does `inner` steps and blocks."""

    name: str
    run: Callable[[], None]
    first_step_s: float  # wall time of the first step: tracing + compilation + one step
    first_loss: float


def make_inputs(shape, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    return x, y


def init_params(shape, seed: int = 0) -> dict:
    """Parameters of both networks, shared by every variant (impl does not change params).

    Shapes come from `jax.eval_shape(net.init)`; kernels are drawn N(0, 1/fan_in) in numpy,
    biases 0 (the training step's cost does not depend on the values, and compiling Flax's
    truncated-normal init costs seconds per network on a small CPU).
    """
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if len(leaf.shape) == 1:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(fan_in))

    def init(net):
        shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)["params"]
        return jax.tree_util.tree_map(fill, shapes)

    return {"seed": init(models.SeedCNN(NUM_CLASSES)), "small": init(models.SmallCNN(NUM_CLASSES))}


def jax_case(step: str, impl: str, x: np.ndarray, y: np.ndarray, params: dict, inner: int, *,
             dtype: str = "float32", mesh=None) -> Case:
    """The library's jitted train step (`train.make_train_step`) for `step` and `impl`, computing in `dtype`,
    on `mesh` (default: one device)."""
    if impl.endswith(XLA_GRAD):
        own_grad = dataclasses.replace(backend.choices(), conv_filter_grad_chunk=None)
        with backend.override(own_grad):  # the step is traced on its first call, inside jax_case
            case = jax_case(step, impl[: -len(XLA_GRAD)], x, y, params, inner, dtype=dtype, mesh=mesh)
        return dataclasses.replace(case, name=f"jax {impl}")
    mesh = parallel.make_mesh(jax.devices()[:1]) if mesh is None else mesh
    optimizer = train.make_optimizer("sgd", learning_rate=LEARNING_RATE, total_steps=1, momentum=MOMENTUM)
    cfg = distill.MethodConfig(temperature=TEMPERATURE, alpha=ALPHA)
    teacher_net = models.with_compute_dtype(models.SeedCNN(NUM_CLASSES, impl=impl), dtype)
    if step == "seed":
        loss_fn = distill.make_loss_fn(teacher_net, "seed_cnn", "labels", cfg, NUM_CLASSES)
        trainable, teacher = {"model": params["seed"], "aux": {}}, None
    else:
        student = models.with_compute_dtype(models.SmallCNN(NUM_CLASSES, impl=impl), dtype)
        loss_fn = distill.make_loss_fn(student, "cnn", "kd", cfg, NUM_CLASSES, teacher=teacher_net)
        trainable, teacher = {"model": params["small"], "aux": {}}, {"params": params["seed"]}
    step_fn = train.make_train_step(loss_fn, optimizer, mesh)
    state = parallel.replicate(train.create_state(trainable, optimizer, key=jax.random.PRNGKey(0)), mesh)
    batch = parallel.shard_batch({"x": x, "y": y}, mesh)
    teacher = parallel.replicate(teacher, mesh)
    holder = {"state": state}

    def one():
        holder["state"], metrics = step_fn(holder["state"], batch, teacher)
        return metrics

    t0 = time.perf_counter()
    metrics = one()
    common.block((holder["state"], metrics))
    first = time.perf_counter() - t0

    def run():
        for _ in range(inner):
            out = one()
        common.block((holder["state"], out))

    return Case(f"jax {impl}", run, first, float(metrics["loss"]))


# --------------------------------------------------------------------------- PyTorch


def _torch_net(arch: str, shape, params):
    """The same ConvNet in torch.nn, with the Flax parameters copied in (flatten order fixed up)."""
    import torch
    from torch import nn

    conv, dense = ARCHS[arch]
    h, w, c = shape
    layers: list = []
    for i, width in enumerate(conv, start=1):
        layer = nn.Conv2d(c, width, 3, padding=1)
        p = params[f"conv{i}"]
        layer.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
        layer.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
        layers += [layer, nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True)]  # ceil_mode = SAME pooling
        h, w, c = -(-h // 2), -(-w // 2), width
    layers.append(nn.Flatten())
    d, flat_hwc = h * w * c, (h, w, c)
    names = [f"dense{i}" for i in range(1, len(dense) + 1)] + ["head"]
    for j, (name, width) in enumerate(zip(names, (*dense, NUM_CLASSES))):
        layer = nn.Linear(d, width)
        kernel = np.asarray(params[name]["kernel"])
        if j == 0:  # Flax flattens NHWC (h, w, c); torch flattens NCHW (c, h, w)
            kernel = kernel.reshape(*flat_hwc, width).transpose(2, 0, 1, 3).reshape(d, width)
        layer.weight.data = torch.from_numpy(kernel.T.copy())
        layer.bias.data = torch.from_numpy(np.asarray(params[name]["bias"]).copy())
        layers.append(layer)
        if name != "head":
            layers.append(nn.ReLU())
        d = width
    return nn.Sequential(*layers)


def torch_case(step: str, mode: str, x: np.ndarray, y: np.ndarray, params: dict, inner: int) -> Case:
    """The same step in PyTorch: eager NCHW, channels_last, or torch.compile'd models."""
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    arch = "seed" if step == "seed" else "small"
    model = _torch_net(arch, x.shape[1:], params[arch])
    teacher = _torch_net("seed", x.shape[1:], params["seed"]).eval() if step == "distill" else None
    if mode == "channels_last":
        xt = xt.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    fwd, t_fwd = model, teacher
    if mode == "compile":
        torch._dynamo.reset()  # fresh guards: otherwise earlier groups' graphs count towards the recompile limit
        fwd = torch.compile(model, dynamic=False)
        t_fwd = torch.compile(teacher, dynamic=False) if teacher is not None else None

    def loss_of(logits):
        if step == "seed":
            return F.cross_entropy(logits, yt)
        with torch.no_grad():
            t_logits = t_fwd(xt)
        kl = F.kl_div(F.log_softmax(logits / TEMPERATURE, -1), F.log_softmax(t_logits / TEMPERATURE, -1),
                      reduction="none", log_target=True).sum(-1)
        return (ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * F.cross_entropy(logits, yt, reduction="none")).mean()

    def one():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(fwd(xt))
        loss.backward()
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    loss = one().item()
    first = time.perf_counter() - t0

    def run():
        for _ in range(inner):
            one()

    return Case(f"torch {mode}", run, first, loss)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Row:
    step: str
    shape: tuple[int, int, int]
    batch: int
    variant: str
    step_s: float
    images_per_s: float
    gflops: float
    peak_fraction: float
    first_step_s: float
    first_loss: float
    ratios: dict[str, float]


def run_group(step: str, shape, batch: int, *, variants: Sequence[str], repeats: int, matmul_n: int,
              compile_budget: float, state: dict, log=print) -> list[Row]:
    """Builds every variant for one (step, shape, batch), times them round-robin, returns one row each."""
    x, y = make_inputs(shape, batch)
    params = init_params(shape)
    inner = max(1, REFERENCE_BATCH // batch)
    cases: list[Case] = []
    for v in variants:
        framework, mode = v.split(" ", 1)
        if v == "torch compile" and state.get("compile_skipped"):
            continue
        build = jax_case if framework == "jax" else torch_case
        t0 = time.perf_counter()
        try:
            case = build(step, mode, x, y, params, inner)
        except Exception as exc:  # torch.compile may lack a compiler or fail on this platform
            if v != "torch compile":
                raise
            state["compile_skipped"] = f"torch.compile failed ({type(exc).__name__}: {str(exc)[:120]})"
            log(f"  note: {state['compile_skipped']}; skipping it from here on")
            continue
        if v == "torch compile" and time.perf_counter() - t0 > compile_budget:
            state["compile_skipped"] = (f"torch.compile took {time.perf_counter() - t0:.0f} s for one step "
                                        f"(> --compile-budget {compile_budget:.0f} s)")
            log(f"  note: {state['compile_skipped']}; timed here, skipped from here on")
        cases.append(case)
    mm_run, mm_flops = common.matmul_case(matmul_n)
    timed = {c.name: c.run for c in cases}
    timed["matmul"] = mm_run
    medians = common.interleave(timed, repeats)
    peak = mm_flops / medians.pop("matmul")
    state.setdefault("peaks", []).append(peak)
    flops = step_flops(step, shape)
    rows = []
    for c in cases:
        step_s = medians[c.name] / inner
        rows.append(Row(step, tuple(shape), batch, c.name, step_s, batch / step_s, batch * flops / step_s / 1e9,
                        batch * flops / step_s / peak, c.first_step_s, c.first_loss, {}))
    by_name = {r.variant: r for r in rows}
    for r in rows:
        r.ratios = {b: r.images_per_s / by_name[b].images_per_s for b in BASELINES if b in by_name}
    return rows


def format_rows(rows: Sequence[Row]) -> str:
    header = ["step", "input", "batch", "variant", "img/s", "GFLOP/s", "% peak",
              "x torch eager", "x channels_last", "first step s", "first loss"]
    out = []
    for r in rows:
        ratio = lambda b: f"{r.ratios[b]:.2f}" if b in r.ratios else "-"  # noqa: E731
        out.append([r.step, "x".join(map(str, r.shape)), r.batch, r.variant, f"{r.images_per_s:.0f}",
                    f"{r.gflops:.1f}", f"{100 * r.peak_fraction:.0f}%", ratio("torch eager"),
                    ratio("torch channels_last"), f"{r.first_step_s:.2f}", f"{r.first_loss:.5f}"])
    return common.markdown_table(header, out)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: write HxWxC, e.g. 32x32x3") from None
    if min(h, w, c) < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: every size must be >= 1")
    return h, w, c


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def enable_compilation_cache(path: str) -> None:
    """Persistent XLA compilation cache in `path`: a second run with the same shapes skips compilation."""
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache every program
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


FULL_DEFAULTS = {"batch": [32, 256], "shape": [(32, 32, 3), (28, 28, 1)], "repeats": 7}
QUICK_DEFAULTS = {"batch": [8], "shape": [(16, 16, 3)], "repeats": 1, "matmul_n": 256}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 32 256")
    p.add_argument("--shape", type=parse_shape, nargs="+", default=None, help="default: 32x32x3 28x28x1")
    p.add_argument("--steps", nargs="+", choices=("seed", "distill"), default=["seed", "distill"])
    p.add_argument("--repeats", type=int, default=None, help="round-robin repetitions per group (default 7)")
    p.add_argument("--impl", nargs="+", choices=JAX_IMPLS, default=list(JAX_IMPLS), help="models.SeedCNN impls")
    p.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-budget", type=float, default=90.0,
                   help="seconds; after a torch.compile first step slower than this, torch.compile is skipped")
    p.add_argument("--matmul-n", type=int, default=None, help="peak matmul size (default 2048 on CPU, 8192 else)")
    p.add_argument("--compilation-cache", metavar="DIR", default=None, help="persistent JAX compilation cache")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: defaults become batch 8, 16x16x3, 1 repeat, no torch.compile")
    args = p.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.no_compile = args.no_compile or args.quick
    if args.repeats < 1 or min(args.batch) < 1:
        p.error(f"--repeats and --batch must be >= 1; got repeats={args.repeats}, batch={args.batch}")
    return args


def main(argv=None, log=print) -> list[Row]:
    args = parse_args(argv)
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    variants = [f"jax {impl}" for impl in args.impl] if "jax" in args.frameworks else []
    if "torch" in args.frameworks:
        if torch_available():
            variants += [f"torch {m}" for m in TORCH_MODES if not (m == "compile" and args.no_compile)]
        else:
            log("note: torch is not importable; PyTorch variants skipped (pip install torch==2.13.0)")
    matmul_n = args.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
    log(f"# train step benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    log(f"device: {common.device_description()}")
    log(f"versions: python {sys.version.split()[0]}, {common.versions('jax', 'jaxlib', 'flax', 'optax', 'torch')}")
    torch_threads = ""
    if any(v.startswith("torch") for v in variants):
        import torch

        torch_threads = f"; torch intra-op threads {torch.get_num_threads()}"
    alloc = common.detect_allocator()
    log(f"allocator (both frameworks share this process's malloc): {alloc}{torch_threads}")
    tc = common.tcmalloc_path()
    if alloc == "glibc" and tc:
        log(f"  tcmalloc is installed: rerun with LD_PRELOAD={tc} to compare under it")
    log(f"variants: {', '.join(variants)}; repeats {args.repeats}; peak = jitted {matmul_n}^3 float32 matmul")
    log(f"load average at start: {_load()} (other processes on the machine skew absolute figures)")
    state: dict = {}
    rows: list[Row] = []
    t_start = time.perf_counter()
    for step in args.steps:
        for shape in args.shape:
            for batch in args.batch:
                group = run_group(step, shape, batch, variants=variants, repeats=args.repeats, matmul_n=matmul_n,
                                  compile_budget=args.compile_budget, state=state, log=log)
                for r in group:
                    log(f"  {step:8s} {'x'.join(map(str, shape)):9s} b={batch:<4d} {r.variant:20s} "
                        f"{r.images_per_s:8.0f} img/s {100 * r.peak_fraction:4.0f}% peak  "
                        f"first step {r.first_step_s:6.2f} s  loss {r.first_loss:.5f}")
                losses = [r.first_loss for r in group]
                log(f"  first-step losses agree to {max(losses) - min(losses):.1e}")
                rows += group
    peaks = state.get("peaks", [])
    log(f"\nmatmul peak: median {np.median(peaks) / 1e9:.0f} GFLOP/s over {len(peaks)} groups "
        f"(min {min(peaks) / 1e9:.0f}, max {max(peaks) / 1e9:.0f}); total {time.perf_counter() - t_start:.0f} s")
    log(f"load average at end: {_load()}")
    if state.get("compile_skipped"):
        log(f"note: {state['compile_skipped']}")
    log("\n" + format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
