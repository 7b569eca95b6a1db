"""The audit's model queries: gradient throughput per chunk size, and compile time per XLA option set.

    python benchmarks/queries.py                       # SeedCNN on 8x8x1 (digits) and 28x28x1 (Fashion-MNIST)
    python benchmarks/queries.py --append benchmarks/RESULTS.md

Part 1 times `queries.ModelQueries.gradients` on 1,024 points per call for several chunk sizes (the
points per compiled-program call, `backend.Choices.query_chunk`), interleaved (`common.interleave`).
Part 2 compiles the same gradient program and a SmallCNN train step (Hinton KD, adam) under each set
of XLA compile options the library chooses from (`backend.Choices.compiler_options` /
`run_once_compiler_options`), and times a call of each, so compile time and run time are side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from distill_jax import backend
from distill_jax import audit
from distill_jax import distill
from distill_jax import models
from distill_jax import train
from distill_jax.audit import _queries

OPTION_SETS = {
    "XLA defaults": {},
    "non-MLIR fusion emitters": {"xla_cpu_use_fusion_emitters": False},
    "LLVM -O0": {"xla_backend_optimization_level": 0},
}


def chunk_cases(side: int, chunks: list[int], points: int) -> dict:
    model = models.SeedCNN(num_classes=10)
    x = np.random.RandomState(0).randn(points, side, side, 1).astype(np.float32)
    t = np.arange(points) % 10
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    cases = {}
    for chunk in chunks:
        picked = dataclasses.replace(backend.choices(), query_chunk=chunk)
        q = audit.ModelQueries(model, variables)

        def run(q=q, picked=picked):
            with backend.override(picked):
                q.gradients(x, t)

        run()  # compile outside the timing
        cases[f"{side}x{side}, chunk {chunk}"] = run
    return cases


def step_program(side: int):
    """A SmallCNN KD train step, its arguments."""
    teacher, student = models.SeedCNN(num_classes=10), models.SmallCNN(num_classes=10)
    x = np.random.RandomState(1).randn(64, side, side, 1).astype(np.float32)
    batch = {"x": x, "y": np.arange(64) % 10}
    t_vars = teacher.init(jax.random.PRNGKey(0), x[:1])
    batch["teacher_logits"] = np.asarray(teacher.apply(t_vars, x))
    cfg = distill.MethodConfig()
    params = distill.init_trainable(student, "kd", cfg, jax.random.PRNGKey(1), x[:2], teacher, t_vars)
    opt = train.make_optimizer("adam", learning_rate=1e-3, total_steps=1000, momentum=0.9, weight_decay=0.0,
                               schedule="cosine")
    state = train.create_state(params, opt, key=jax.random.PRNGKey(2))
    loss = distill.make_loss_fn(student, "cnn", "kd", cfg, 10, teacher)
    return train.train_step_fn(loss, opt), (state, batch, t_vars)


def gradient_program(side: int):
    model = models.for_queries(models.SeedCNN(num_classes=10))
    x = np.random.RandomState(2).randn(32, side, side, 1).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    logits_fn, grads_fn = _queries._programs(models.SeedCNN(num_classes=10))
    return grads_fn._fun, (variables, x, np.arange(32) % 10, np.float32(0.0))


def compile_rows(side: int, repeats: int) -> list[list[str]]:
    rows = []
    for name, build in (("SeedCNN input gradients, 32 points", gradient_program),
                        ("SmallCNN KD train step, batch 64", step_program)):
        fn, args = build(side)
        for label, options in OPTION_SETS.items():
            fresh = lambda *a, fn=fn: fn(*a)  # a new function each time: nothing reused from jit's caches
            lowered = jax.jit(fresh, compiler_options=options or None).lower(*args)
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            common.block(compiled(*args))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                common.block(compiled(*args))
                times.append(time.perf_counter() - t0)
            rows.append([f"{side}x{side}", name, label, f"{compile_s:.2f}", f"{1000 * float(np.median(times)):.2f}"])
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[8, 28])
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--append", help="append the markdown to this file")
    args = p.parse_args(argv)
    chunk_rows = []
    for side in args.sides:
        medians = common.interleave(chunk_cases(side, args.chunks, args.points), args.repeats)
        chunk_rows += [[case, f"{s * 1000:.0f}", f"{args.points / s:.0f}"] for case, s in medians.items()]
    compile_table = [row for side in args.sides for row in compile_rows(side, args.repeats)]
    text = "\n".join([
        f"### Audit queries: {common.device_description()}", "",
        f"Command: `python benchmarks/queries.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"{common.versions('jax', 'jaxlib', 'flax')}.", "",
        f"SeedCNN input gradients at {args.points} points, by points per program call (medians of {args.repeats}):", "",
        common.markdown_table(["input, chunk", "ms per call", "gradients/s"], chunk_rows), "",
        "Compile time and run time under each option set:", "",
        common.markdown_table(["input", "program", "XLA options", "compile (s)", "run (ms, median)"], compile_table),
        ""])
    print(text)
    common.append_to(args.append, text)
    return text


if __name__ == "__main__":
    main()
