"""One epoch of the Fashion-MNIST teacher: the library's fit loop against PyTorch over in-memory tensors, one run.

    python benchmarks/epoch.py                          # 60,000 images, batch 128, Adam 1e-3
    python benchmarks/epoch.py --images 2048 --quick    # seconds: checks the script
    python benchmarks/epoch.py --out benchmarks/RESULTS.md

Variants, each one whole epoch from the same initial weights on the same standardized images:
  jax fit              `distill.distill(models.SeedCNN(10), None, x, y, method="labels", epochs=1,
                       batch_size=128, optimizer="adam", learning_rate=1e-3)`: what `distill-jax` runs for the
                       teacher (jitted step, `train.fit`'s shuffled batches, ragged tail dropped). Its XLA compile
                       seconds (`compilation.CompileCounter`) are reported and subtracted ("steady").
  jax fit, XLA's filter gradient   the same with XLA's own convolution filter gradient (the backend's grouped
                       patch products switched off), to measure that choice.
  torch eager          the same network (`common.torch_convnet`), `torch.optim.Adam(lr=1e-3)`, NCHW, a plain loop
                       over a random permutation in batches of 128 of tensors already in memory (no DataLoader).
  torch channels_last  the same with the images and the model in channels_last memory format.
The variants run round-robin (`--repeats` rounds, each variant once per round, the order rotated) and a jitted
float32 matmul is timed between them: its best rate is the machine's peak, the denominator of "share of peak".
FLOPs per image: 3x the forward's (2 per multiply-add of the convs and dense layers; benchmarks/train_step.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.train_step import NUM_CLASSES, step_flops  # noqa: E402
from distill_jax import backend, data, distill, models  # noqa: E402
from distill_jax.compilation import CompileCounter  # noqa: E402
from distill_jax.data import preprocess  # noqa: E402

BATCH, LEARNING_RATE = 128, 1e-3


def fashion_images(limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` Fashion-MNIST training images, standardized as the job does ([n, 28, 28, 1] float32)."""
    ds = data.load("fashion_mnist")
    x, y = ds.x_train[:limit], ds.y_train[:limit]
    return np.asarray(preprocess.apply(preprocess.standardize_fit(x), x), np.float32), np.asarray(y, np.int32)


def jax_epoch(x: np.ndarray, y: np.ndarray, seed: int, *, xla_filter_grad: bool = False) -> dict:
    """One epoch of the library's fit loop: wall seconds and compile seconds. `xla_filter_grad`: with XLA's own
    convolution filter gradient instead of the backend's (`backend.Choices.conv_filter_grad_chunk`)."""
    if xla_filter_grad:
        with backend.override(dataclasses.replace(backend.choices(), conv_filter_grad_chunk=None)):
            return jax_epoch(x, y, seed)
    with CompileCounter() as compiles:
        t0 = time.perf_counter()
        variables = distill.distill(models.SeedCNN(NUM_CLASSES), None, x, y, key=jax.random.PRNGKey(seed),
                                    method="labels", epochs=1, batch_size=BATCH, optimizer="adam",
                                    learning_rate=LEARNING_RATE, seed=seed)
        jax.block_until_ready(variables)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "compile_seconds": compiles.seconds}


def torch_epoch(x: np.ndarray, y: np.ndarray, params: dict, seed: int, *, channels_last: bool) -> dict:
    """One epoch of the same network and optimizer in PyTorch over in-memory tensors."""
    import torch
    import torch.nn.functional as F

    model = common.torch_convnet(params, x.shape[1:], models.SeedCNN.conv_features, models.SeedCNN.dense_features,
                                 NUM_CLASSES)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    if channels_last:
        xt, model = xt.contiguous(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    t0 = time.perf_counter()
    for start in range(0, len(x) - BATCH + 1, BATCH):  # the ragged tail dropped, as train.fit does
        idx = order[start : start + BATCH]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
    return {"seconds": time.perf_counter() - t0, "compile_seconds": 0.0}


def peak_flops(run_matmul, flops: float, samples: int = 5) -> float:
    """The best of `samples` timed matmuls, in FLOP/s."""
    return max(flops / common.timed(run_matmul)[0] for _ in range(samples))


def main(argv=None, log=print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=60_000)
    p.add_argument("--repeats", type=int, default=1, help="rounds; every variant runs once per round")
    p.add_argument("--quick", action="store_true", help="no PyTorch channels_last; for checking the script")
    p.add_argument("--out", default=None, help="markdown file to append the table to")
    args = p.parse_args(argv)
    x, y = fashion_images(args.images)
    params = models.SeedCNN(NUM_CLASSES).init(jax.random.PRNGKey(0), x[:1])["params"]
    variants = {"jax fit": lambda r: jax_epoch(x, y, r)}
    if not args.quick:
        variants["jax fit, XLA's filter gradient"] = lambda r: jax_epoch(x, y, r, xla_filter_grad=True)
    try:
        import torch

        torch.manual_seed(0)
        variants["torch eager"] = lambda r: torch_epoch(x, y, params, r, channels_last=False)
        if not args.quick:
            variants["torch channels_last"] = lambda r: torch_epoch(x, y, params, r, channels_last=True)
    except ImportError:
        log("torch is not installed (pip install torch==2.13.0): the JAX epoch alone")
    run_matmul, mm_flops = common.matmul_case(2048)
    samples: dict[str, list[dict]] = {n: [] for n in variants}
    peaks = [peak_flops(run_matmul, mm_flops)]
    names = list(variants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(variants[name](r))
            peaks.append(peak_flops(run_matmul, mm_flops))
            log(f"round {r}: {name} {samples[name][-1]['seconds']:.1f} s")
    peak = max(peaks)
    steps = len(x) // BATCH
    per_image = step_flops("seed", x.shape[1:])
    rows = []
    for name, runs in samples.items():
        wall = statistics.median(s["seconds"] for s in runs)
        steady = statistics.median(s["seconds"] - s["compile_seconds"] for s in runs)
        rate = steps * BATCH / steady
        rows.append({"variant": name, "epoch_s": round(wall, 1), "compile_s": round(wall - steady, 1),
                     "images_per_s": round(rate), "share_of_peak": rate * per_image / peak})
    header = ["variant", "epoch (s)", "of which compiling (s)", "img/s (steady)", "share of matmul peak"]
    table = common.markdown_table(header, [[r["variant"], r["epoch_s"], r["compile_s"], r["images_per_s"],
                                            f"{100 * r['share_of_peak']:.0f}%"] for r in rows])
    note = (f"SeedCNN teacher, one epoch of {steps * BATCH:,} Fashion-MNIST images (28x28x1), batch {BATCH}, Adam "
            f"{LEARNING_RATE:g}; median of {args.repeats} round(s); matmul peak {peak / 1e9:.0f} GFLOP/s; "
            f"{common.device_description()}; {common.versions('jax', 'flax', 'torch')}; "
            f"{os.environ.get('XLA_FLAGS', 'XLA_FLAGS unset')}")
    log(table + "\n\n" + note)
    common.append_to(args.out, table + "\n\n" + note + "\n")
    return rows


if __name__ == "__main__":
    main()
