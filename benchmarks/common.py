"""Shared helpers for the benchmarks: interleaved timing, the matmul peak, allocator and machine facts.

Every benchmark here compares implementations *in one process, interleaved*: each repetition
runs every case once (round-robin), and a case's figure is the median over repetitions, so
the noise of a shared machine hits every case alike. Trust ratios more than absolute figures.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from distill_jax.app import _metadata


# Substrings of /proc/self/maps that identify a preloaded or linked allocator.
ALLOCATORS = {"tcmalloc": "libtcmalloc", "jemalloc": "libjemalloc", "mimalloc": "libmimalloc"}


def detect_allocator() -> str:
    """Name of the malloc this process uses, read from /proc/self/maps (`glibc` when none is mapped)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown (no /proc/self/maps)"
    found = [name for name, lib in ALLOCATORS.items() if lib in maps]
    return "+".join(found) if found else "glibc"


def tcmalloc_path() -> str | None:
    """Path of an installed libtcmalloc_minimal (Debian: `apt-get install libtcmalloc-minimal4`), or None."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def device_description() -> str:
    """JAX backend, device kind and count, and the host CPU model with its core count."""
    d = jax.devices()[0]
    return f"{jax.default_backend()} ({d.device_kind}) x{jax.device_count()}; host {_metadata.cpu_model()}, {os.cpu_count()} cores"


def block(tree) -> None:
    """Waits until every array in `tree` is computed (jax arrays; other leaves are ignored)."""
    jax.block_until_ready(tree)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Runs `fn` once; returns (seconds, its result). `fn` must block until its work is done."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleave(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each case over `repeats` round-robin repetitions (each call must block).

    Each repetition runs every case once, in a rotated order, so slow phases of a shared
    machine spread over all cases instead of landing on one.
    """
    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timed(cases[name])[0])
    return {n: statistics.median(s) for n, s in samples.items()}


def matmul_case(n: int = 2048) -> tuple[Callable[[], None], float]:
    """A jitted float32 [n, n] @ [n, n] (already compiled) and its FLOP count 2 n^3.

    Timing it among the other cases gives the machine's achievable float32 matmul peak
    under the same load (the denominator of "fraction of peak").
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    block(mm(a, b))

    def run():
        block(mm(a, b))

    return run, 2.0 * n**3


def versions(*modules: str) -> str:
    """`name version` for each importable module, comma separated (missing ones are skipped)."""
    out = []
    for name in modules:
        try:
            mod = __import__(name)
        except ImportError:
            continue
        out.append(f"{name} {getattr(mod, '__version__', '?')}")
    return ", ".join(out)


def append_to(path: str | None, text: str) -> None:
    """Appends `text` (after a blank line) to the markdown file `path`; nothing when `path` is None or empty."""
    if path:
        with open(path, "a") as f:
            f.write("\n" + text)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def torch_convnet(params: dict, shape, conv: Sequence[int], dense: Sequence[int], num_classes: int):
    """A `models.ConvNet` (SmallCNN, SeedCNN) in torch.nn (NCHW) holding the Flax `params`.

    Conv kernels HWIO -> OIHW; the first dense kernel's rows permuted from Flax's (h, w, c) flatten
    order to PyTorch's (c, h, w); SAME max-pooling as `ceil_mode=True`.
    """
    import torch
    from torch import nn

    h, w, c = shape
    layers: list = []
    for i, width in enumerate(conv, start=1):
        layer = nn.Conv2d(c, width, 3, padding=1)
        layer.weight.data = torch.from_numpy(np.asarray(params[f"conv{i}"]["kernel"]).transpose(3, 2, 0, 1).copy())
        layer.bias.data = torch.from_numpy(np.asarray(params[f"conv{i}"]["bias"]).copy())
        layers += [layer, nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True)]  # ceil_mode: SAME pooling
        h, w, c = -(-h // 2), -(-w // 2), width
    layers.append(nn.Flatten())
    d = h * w * c
    names = [f"dense{i}" for i in range(1, len(dense) + 1)] + ["head"]
    for j, (name, width) in enumerate(zip(names, (*dense, num_classes))):
        kernel = np.asarray(params[name]["kernel"])
        if j == 0:  # Flax flattens (h, w, c), PyTorch (c, h, w): permute the rows
            kernel = kernel.reshape(h, w, c, width).transpose(2, 0, 1, 3).reshape(d, width)
        layer = nn.Linear(d, width)
        layer.weight.data = torch.from_numpy(kernel.T.copy())
        layer.bias.data = torch.from_numpy(np.asarray(params[name]["bias"]).copy())
        layers.append(layer)
        if name != "head":
            layers.append(nn.ReLU())
        d = width
    return nn.Sequential(*layers).eval()
