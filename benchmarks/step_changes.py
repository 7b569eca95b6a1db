"""Each change to the SeedCNN train step measured alone: the gradient of the loss with one change switched off.

    python benchmarks/step_changes.py                        # batch 256, 28x28x1 and 32x32x3, 9 rounds
    python benchmarks/step_changes.py --out benchmarks/RESULTS.md
    python benchmarks/step_changes.py --batch 8 --shape 8x8x1 --repeats 1   # seconds: checks the script

The timed program is `jax.grad` of the mean cross entropy of `models.SeedCNN` (impl "lax_conv") at batch 256,
jitted, from the same weights and images. Variants:
  library                 what the library runs on this backend
  XLA filter gradient     the convolutions' filter gradient from XLA's own convolution
                          (`backend.Choices.conv_filter_grad_chunk=None`) instead of grouped patch products
  ReLU before the pool    the network asked for its features (`return_features=True`, the features then
                          dropped): it applies the ReLU to the unpooled output, as the article writes it
  neither                 both changes off: the step as it was before them
The variants run round-robin (`common.interleave`) with a jitted float32 matmul, whose rate is the peak; every
variant's gradient is compared with the library's (they agree to float32 rounding: same step).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.train_step import NUM_CLASSES, make_inputs, parse_shape, step_flops  # noqa: E402
from distill_jax import backend, models  # noqa: E402

VARIANTS = {  # name -> (XLA's filter gradient, ReLU before the pool)
    "library": (False, False),
    "XLA filter gradient": (True, False),
    "ReLU before the pool": (False, True),
    "neither": (True, True),
}


def gradient_program(shape, batch: int, *, xla_filter_grad: bool, relu_first: bool):
    """(run, gradient): a compiled blocking call of the loss gradient for one variant, and its value."""
    x, y = (jnp.asarray(a) for a in make_inputs(shape, batch))
    model = models.SeedCNN(NUM_CLASSES)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]

    def loss(p):
        out = model.apply({"params": p}, x, return_features=relu_first)
        logits = out[0] if relu_first else out
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad = jax.jit(jax.grad(loss))
    chosen = backend.choices()
    if xla_filter_grad:
        chosen = dataclasses.replace(chosen, conv_filter_grad_chunk=None)
    with backend.override(chosen):  # traced (and compiled) here, on the first call
        value = jax.block_until_ready(grad(params))
    return (lambda: jax.block_until_ready(grad(params))), value


def measure(shape, batch: int, repeats: int) -> list[list[str]]:
    """Rows: variant, ms per gradient, share of the matmul peak, speed relative to the library."""
    programs = {name: gradient_program(shape, batch, xla_filter_grad=a, relu_first=b)
                for name, (a, b) in VARIANTS.items()}
    reference = programs["library"][1]
    for name, (_, value) in programs.items():
        for u, v in zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(reference)):
            scale = float(jnp.max(jnp.abs(v))) or 1.0
            if float(jnp.max(jnp.abs(u - v))) > 1e-4 * scale:
                raise AssertionError(f"{name}: its gradient differs from the library's")
    run_matmul, mm_flops = common.matmul_case(2048)
    cases = {name: run for name, (run, _) in programs.items()}
    cases["matmul"] = run_matmul
    times = common.interleave(cases, repeats)
    peak = mm_flops / times.pop("matmul")
    flops = batch * step_flops("seed", shape)
    return [[name, f"{1e3 * t:.1f}", f"{100 * flops / t / peak:.0f}%", f"{times['library'] / t:.2f}"]
            for name, t in times.items()] + [["matmul peak", f"{peak / 1e9:.0f} GFLOP/s", "", ""]]


def main(argv=None, log=print) -> list[list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs="+", default=["28x28x1", "32x32x3"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=None, help="markdown file to append the tables to")
    args = p.parse_args(argv)
    text, all_rows = [], []
    for s in args.shape:
        rows = measure(parse_shape(s), args.batch, args.repeats)
        all_rows += rows
        text.append(f"SeedCNN loss gradient, input {s}, batch {args.batch}, median of {args.repeats} rounds\n\n"
                    + common.markdown_table(["variant", "ms", "share of peak", "speed vs library"], rows))
    note = f"{common.device_description()}; {common.versions('jax', 'jaxlib')}; allocator {common.detect_allocator()}"
    log("\n\n".join(text) + "\n\n" + note)
    common.append_to(args.out, "\n\n".join(text) + "\n\n" + note + "\n")
    return all_rows


if __name__ == "__main__":
    main()
