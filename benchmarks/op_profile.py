"""Where the SeedCNN train step's time goes, op by op: XLA:CPU against PyTorch (oneDNN), one run, same host.

    python benchmarks/op_profile.py                          # batch 256, 32x32x3 and 28x28x1
    python benchmarks/op_profile.py --shape 28x28x1 --repeats 5 --out benchmarks/RESULTS.md

Every op of the train step is timed on its own, at the shapes the step gives it, for each conv layer i of
SeedCNN (convs 64, 64, 128, 128, 3x3 SAME; ReLU; 2x2 SAME max-pool) and the dense head:
  conv fwd           y = conv(x, w)
  conv input grad    dx = conv_transpose(dy, w)     (the vjp of conv in x)
  conv filter grad   dw = correlate(x, dy)          (the vjp of conv in w)
  relu+pool fwd      p = maxpool(relu(y))
  relu+pool bwd      the vjp of maxpool(relu(.)) at y
(the dense layers, under 1 % of the step's FLOPs, are in the whole step only).
Variants, each op jitted alone:
  jax XLA       `lax.conv_general_dilated` (NHWC/HWIO) and its `jax.vjp` (XLA's own gradients); ReLU then
                `reduce_window` max-pool and its vjp (select-and-scatter).
  jax library   what `models.SeedCNN` (impl "lax_conv") runs on this backend: `models.conv3x3_xla`, whose
                filter gradient on CPU is patch products over groups of images (`backend.choices()
                .conv_filter_grad_chunk`); the pool as the max of four strided views, before the ReLU.
  torch         `F.conv2d` / `torch.nn.grad.conv2d_input` / `conv2d_weight`, ReLU + `max_pool2d`, NCHW
                (eager) and channels_last.
The first layer's input gradient is timed but left out of the sums: a train step takes no gradient in the
images. The whole-step rows run `benchmarks/train_step.py`'s cases: "jax library" is the library's step,
"jax XLA" the same step with XLA's own filter gradient (`lax_conv-xla-grad`; its pooling is the library's).
The cases run round-robin (`common.interleave`) with a jitted float32 matmul between them, whose rate is the
peak; FLOPs are 2 per multiply-add (convs: 2 h w 9 c_in c_out per image per direction). The last rows time the
whole step (`benchmarks/train_step.py`'s cases) so that the sum of the ops can be compared with it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.train_step import jax_case, make_inputs, parse_shape, step_flops, torch_case  # noqa: E402
from benchmarks.train_step import init_params as step_params  # noqa: E402
from distill_jax import models  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def layer_shapes(shape: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """(h, w, c_in, c_out) of each SeedCNN conv for one input shape (SAME pooling halves h, w rounding up)."""
    h, w, c = shape
    out = []
    for width in models.SeedCNN.conv_features:
        out.append((h, w, c, width))
        h, w, c = -(-h // 2), -(-w // 2), width
    return out


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)


def _relu_pool(y):
    return jax.lax.reduce_window(jax.nn.relu(y), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")


def _library_relu_pool(y):
    return jax.nn.relu(models.max_pool_slices(y))  # what ConvNet runs when no features are asked for


def jax_ops(batch: int, h: int, w: int, cin: int, cout: int, *, library: bool) -> dict[str, Callable[[], None]]:
    """Each op of one conv layer, jitted alone and compiled, as blocking calls: XLA's own ops, or (`library`)
    the ones `models.SeedCNN` runs on this backend."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin), dtype=np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), dtype=np.float32) / np.sqrt(9 * cin))
    dy = jnp.asarray(rng.standard_normal((batch, h, w, cout), dtype=np.float32))
    y = _conv(x, k)
    dp = jnp.asarray(rng.standard_normal(_relu_pool(y).shape, dtype=np.float32))
    conv = models.conv3x3_xla if library else _conv
    relu_pool = _library_relu_pool if library else _relu_pool
    fns = {
        "conv fwd": (jax.jit(conv), (x, k)),
        "conv input grad": (jax.jit(lambda k, g: jax.vjp(lambda z: conv(z, k), x)[1](g)[0]), (k, dy)),
        "conv filter grad": (jax.jit(lambda x, g: jax.vjp(lambda kk: conv(x, kk), k)[1](g)[0]), (x, dy)),
        "relu+pool fwd": (jax.jit(relu_pool), (y,)),
        "relu+pool bwd": (jax.jit(lambda y, g: jax.vjp(relu_pool, y)[1](g)[0]), (y, dp)),
    }
    out = {}
    for name, (fn, args) in fns.items():
        jax.block_until_ready(fn(*args))
        out[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    return out


def torch_ops(batch: int, h: int, w: int, cin: int, cout: int, *, channels_last: bool) -> dict[str, Callable[[], None]]:
    """The same ops in PyTorch (NCHW, or channels_last memory format)."""
    import torch
    import torch.nn.functional as F

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, h, w, generator=g).contiguous(memory_format=fmt)
    k = (torch.randn(cout, cin, 3, 3, generator=g) / np.sqrt(9 * cin)).contiguous(memory_format=fmt)
    dy = torch.randn(batch, cout, h, w, generator=g).contiguous(memory_format=fmt)
    y = F.conv2d(x, k, padding=1)
    pool = lambda t: F.max_pool2d(F.relu(t), 2, 2, ceil_mode=True)  # noqa: E731
    dp = torch.randn(pool(y).shape, generator=g).contiguous(memory_format=fmt)
    yr = y.detach().requires_grad_(True)

    def relu_pool_bwd():
        (grad,) = torch.autograd.grad(pool(yr), yr, dp)
        return grad

    with torch.no_grad():
        ops = {
            "conv fwd": lambda: F.conv2d(x, k, padding=1),
            "conv input grad": lambda: torch.nn.grad.conv2d_input(x.shape, k, dy, padding=1),
            "conv filter grad": lambda: torch.nn.grad.conv2d_weight(x, k.shape, dy, padding=1),
            "relu+pool fwd": lambda: pool(y),
        }
    ops = {n: (lambda f=f: _no_grad(f)) for n, f in ops.items()}
    ops["relu+pool bwd"] = relu_pool_bwd
    for f in ops.values():
        f()
    return ops


def _no_grad(f):
    import torch

    with torch.no_grad():
        return f()


def op_flops(op: str, batch: int, h: int, w: int, cin: int, cout: int) -> float:
    """FLOPs of one op (convs only; pooling and ReLU are counted as 0: memory-bound)."""
    return 2.0 * batch * h * w * 9 * cin * cout if op.startswith("conv") else 0.0


def profile(shape, batch: int, repeats: int, with_torch: bool) -> list[list[str]]:
    """Rows: layer, op, then per variant ms and share of the matmul peak; the whole steps last."""
    run_matmul, mm_flops = common.matmul_case(2048)
    rows, totals = [], {}
    for i, (h, w, cin, cout) in enumerate(layer_shapes(shape), start=1):
        variants = {"jax XLA": jax_ops(batch, h, w, cin, cout, library=False),
                    "jax library": jax_ops(batch, h, w, cin, cout, library=True)}
        if with_torch:
            variants["torch eager"] = torch_ops(batch, h, w, cin, cout, channels_last=False)
            variants["torch channels_last"] = torch_ops(batch, h, w, cin, cout, channels_last=True)
        cases = {f"{v}|{op}": f for v, ops in variants.items() for op, f in ops.items()}
        cases["matmul"] = run_matmul
        times = common.interleave(cases, repeats)
        peak = mm_flops / times["matmul"]
        for op in variants["jax XLA"]:
            flops = op_flops(op, batch, h, w, cin, cout)
            in_step = not (i == 1 and op == "conv input grad")
            cells = []
            for v in variants:
                t = times[f"{v}|{op}"]
                totals[v] = totals.get(v, 0.0) + (t if in_step else 0.0)
                cells.append(f"{1e3 * t:.2f}" + (f" ({100 * flops / t / peak:.0f}%)" if flops else ""))
            rows.append([f"conv{i} {h}x{w}x{cin}->{cout}", op if in_step else f"{op} (not in a train step)", *cells])
    x, y = make_inputs(shape, batch)
    params = step_params(shape)
    whole = {"jax XLA": jax_case("seed", "lax_conv-xla-grad", x, y, params, 1),
             "jax library": jax_case("seed", "lax_conv", x, y, params, 1)}
    if with_torch:
        whole["torch eager"] = torch_case("seed", "eager", x, y, params, 1)
        whole["torch channels_last"] = torch_case("seed", "channels_last", x, y, params, 1)
    cases = {v: c.run for v, c in whole.items()}
    cases["matmul"] = run_matmul
    times = common.interleave(cases, repeats)
    peak = mm_flops / times["matmul"]
    rows.append(["all convs", "sum of the ops above (in a train step)", *[f"{1e3 * totals[v]:.1f}" for v in whole]])
    rows.append(["whole step", "forward, backward, SGD (train_step.py)",
                 *[f"{1e3 * times[v]:.1f} ({100 * step_flops('seed', shape) * batch / times[v] / peak:.0f}%)"
                   for v in whole]])
    rows.append(["matmul peak", f"{peak / 1e9:.0f} GFLOP/s", *[""] * len(whole)])
    return rows, list(whole)


def main(argv=None, log=print) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs="+", default=["32x32x3", "28x28x1"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
        with_torch = not args.no_torch
    except ImportError:
        with_torch = False
    text = []
    for s in args.shape:
        shape = parse_shape(s)
        rows, variants = profile(shape, args.batch, args.repeats, with_torch)
        header = ["layer", "op", *[f"{v} ms (share of peak)" for v in variants]]
        text.append(f"SeedCNN train step ops, input {s}, batch {args.batch}, median of {args.repeats}\n\n"
                    + common.markdown_table(header, rows))
    note = f"{common.device_description()}; {common.versions('jax', 'jaxlib', 'torch')}"
    log("\n\n".join(text) + "\n\n" + note)
    common.append_to(args.out, "\n\n".join(text) + "\n\n" + note + "\n")


if __name__ == "__main__":
    main()
