"""Per-backend choices of kernels and chunk sizes, and the matmul precision of reported numbers.

Everything in the library that picks an implementation or a chunk size for speed reads it here,
from `choices()`, which looks at `jax.default_backend()` when asked (never at import time: asking
would start XLA before `jax.distributed.initialize` could run):

- CPU: the values measured on XLA:CPU (2-core AMD EPYC; benchmarks/RESULTS.md, each field below
  says which section). XLA:CPU runs `lax.conv` about 2x slower inside loop bodies
  (jax-ml/jax#12868), so attributions swap in the patch (im2col) convolution, and samples or path
  points go through the network a few copies of the batch at a time. The convolution's filter gradient
  is computed as patch matrix products over groups of images (`conv_filter_grad_chunk`): XLA:CPU's own
  ran at under a tenth of the matmul peak.
- GPU and TPU (and any other accelerator): XLA's own convolution, and chunks as large as a memory
  budget allows, so that one step keeps the device busy. These were not measured (no accelerator
  was available); see docs/multi-device.md.

`HIGHEST` is the precision of every library matrix product whose result is reported (integrated
gradients' path sums, CKA, PCA, linear decompositions, the soft tree): on TPU (bf16 passes) and
A100/H100 (TF32) the default f32 precision keeps about three digits fewer; on CPU it changes nothing.

Tests and benchmarks force another backend's choices with `override("gpu")` (or a `Choices`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp

__all__ = [
    "CHOICES",
    "HIGHEST",
    "Choices",
    "current",
    "choices",
    "bytes_of",
    "override",
    "override_key",
]


HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Choices:
    """What one backend runs. Chunk counts are upper bounds: a chunk never exceeds the items it splits.

    Fields:
      name: the backend ("cpu", "gpu", "tpu", ...).
      attribution_impls: (model impl, impl to run attributions with) pairs for `models.for_attribution`;
        impls not listed run as they are.
      query_impls: (model impl, impl) pairs for `models.for_queries` (the audit's model queries).
      forward_impl: the impl `models.forward_only` runs a forward pass with (no backward).
      sample_chunk: perturbation samples per `lax.map`/`lax.scan` step when the caller gives no
        `chunk` and the size of a sample is unknown (or there is no budget).
      ig_path_chunk: integrated gradients' path points per scan step when there is no budget.
      ig_batch_chunk: integrated gradients' examples per group (None: the whole batch at once).
      occlusion_chunk: occlusion windows per `lax.map` step when there is no budget.
      chunk_budget_bytes: None for the fixed chunks above; otherwise a chunk holds as many copies of
        the batch as fit in this many bytes of perturbed inputs (activations take a model-dependent
        multiple of it), split into equal chunks.
      query_chunk: points per call of a model's compiled logits/gradients programs when the audit
        queries it at many points (`queries.ModelQueries`); with a budget, at most what fits in it.
      compiler_options: XLA compiler options of the programs the library jits itself
        (`compilation.jit`: train steps, predictions, the audit's model queries), as (name, value) pairs.
      run_once_compiler_options: added for programs a job runs only a few times (`compilation.run_once`).
      pca_split_scatter_from: PCA's covariance scatter X^T X is computed as two block rows (3/4 of
        the multiply-adds) from this many features on; None: one matrix product.
      conv_filter_grad_chunk: the `"lax_conv"` convolution's filter gradient is a sum of patch matrix
        products over groups of at least this many images (`models.conv3x3_filter_grad`); None: XLA's
        own convolution gradient.
    """

    name: str
    attribution_impls: tuple[tuple[str, str], ...]
    query_impls: tuple[tuple[str, str], ...]
    forward_impl: str
    sample_chunk: int
    ig_path_chunk: int
    ig_batch_chunk: int | None
    occlusion_chunk: int
    chunk_budget_bytes: int | None
    query_chunk: int
    compiler_options: tuple[tuple[str, object], ...]
    run_once_compiler_options: tuple[tuple[str, object], ...]
    pca_split_scatter_from: int | None
    conv_filter_grad_chunk: int | None

    def attribution_impl(self, impl: str) -> str:
        """The impl attributions run a model of impl `impl` with."""
        return dict(self.attribution_impls).get(impl, impl)

    def chunk(self, items: int, fixed: int, item_bytes: int | None = None) -> int:
        """How many of `items` to evaluate per step: `fixed`, or what the byte budget allows.

        With a budget and a known `item_bytes` (the bytes of the inputs one item sends through the
        network), c = budget // item_bytes, then evened out: ceil(items / ceil(items / c)), so the
        last chunk is not mostly padding. The result lies in [1, items].
        """
        items = max(1, int(items))
        if self.chunk_budget_bytes is None or item_bytes is None:
            return max(1, min(int(fixed), items))
        per_step = max(1, self.chunk_budget_bytes // max(1, int(item_bytes)))
        if per_step >= items:
            return items
        steps = -(-items // per_step)
        return -(-items // steps)


# XLA:CPU, measured (benchmarks/RESULTS.md):
_CPU = Choices(
    name="cpu",
    # "Integrated gradients - quiet machine": IG 64 steps x 16 images took 0.46-0.62 s with
    # `patches` against 1.08-1.14 s with `lax_conv` (lax.conv inside the scan, jax-ml/jax#12868).
    # Models built with "patches" or "lax" run as they are.
    attribution_impls=(("lax_conv", "patches"),),
    # No loop around the network in the queries: models run as built ("lax_conv" by default), whose input
    # gradients compiled in about half the time of the patch convolution's ("Audit queries").
    query_impls=(),
    # "Train step - quiet machine", forward only (the distillation teacher): `lax` 7.2-9.5k img/s,
    # `lax_conv` 5.6-10.0k, `patches` 1.7-6.2k.
    forward_impl="lax",
    # A few copies of the batch per step keep XLA's scratch small at no cost in speed ("Integrated
    # gradients - shared, loaded machine": memory table); 8 is the value the sampled methods and
    # metrics were written and tested with.
    sample_chunk=8,
    # One path point per scan step was the fastest and smallest (same section, "What made JAX fast").
    ig_path_chunk=1,
    # The whole batch: batch_chunk=4 cut the scratch from 27 MB to 8 MB at 1.2x the time (quiet machine).
    ig_batch_chunk=None,
    # One window per step, as before this module existed (not measured).
    occlusion_chunk=1,
    chunk_budget_bytes=None,
    # SeedCNN's input gradients ran at the same rate (within the noise of a shared machine) from 32 to 512
    # points per call on 8x8 digits, and fastest at 32 on 28x28 images ("Audit queries"); small chunks
    # also waste least on padding when a method asks for a handful of points.
    query_chunk=32,
    # XLA:CPU's older (non-MLIR) fusion emitters compiled the default job's train steps in 55-65 % of the
    # time at the same step time (SeedCNN 12-13 ms, SmallCNN KD 1.4-1.6 ms, soft tree 0.3 ms; "Start-up")
    compiler_options=(("xla_cpu_use_fusion_emitters", False),),
    # LLVM -O0 ("Start-up"): about a third of the compile time for random draws and initialisation
    run_once_compiler_options=(("xla_backend_optimization_level", 0),),
    # "PCA": the two-block-row scatter (XLA has no syrk) made the covariance fit of 10000x784 0.65x
    # scikit-learn's time; below 256 features the split is not worth its concatenate.
    pca_split_scatter_from=256,
    # "Train step: where XLA:CPU lost to PyTorch": XLA:CPU's own filter gradient of SeedCNN's 14x14x64->64
    # conv ran at 9 % of the matmul peak (7x PyTorch's time); patch products over groups of 32 images were
    # 3.2x faster and made the whole gradient 1.6-1.8x faster (groups of 8 were as fast in a pilot).
    conv_filter_grad_chunk=32,
)


# Accelerators, not measured: XLA's own convolution everywhere (the patch convolution moves about 9x
# more activation data), chunks from a byte budget. 32 MiB of perturbed inputs is 2,700 images of
# 32x32x3 per step; SeedCNN's forward activations alone are 37x its input (conv1's 64 channels at full
# resolution), with what the backward pass keeps 1-3 GB per step: room to spare on a 16 GB device.
_ACCELERATOR = dict(
    attribution_impls=(("patches", "lax_conv"),),
    query_impls=(("patches", "lax_conv"),),
    forward_impl="lax",
    sample_chunk=64,
    ig_path_chunk=64,
    ig_batch_chunk=None,
    occlusion_chunk=64,
    chunk_budget_bytes=32 << 20,
    query_chunk=4096,
    compiler_options=(),  # not measured: XLA's defaults
    run_once_compiler_options=(),
    pca_split_scatter_from=None,  # one product runs at the MXU's / cuBLAS's full rate
    conv_filter_grad_chunk=None,  # XLA's own convolution gradient (cuDNN's / the TPU's)
)


CHOICES: dict[str, Choices] = {
    "cpu": _CPU,
    "gpu": Choices(name="gpu", **_ACCELERATOR),
    "tpu": Choices(name="tpu", **_ACCELERATOR),
}


_overrides: list[str | Choices] = []


def current() -> str:
    """The backend whose choices apply: the innermost `override`, else `jax.default_backend()`."""
    if _overrides:
        top = _overrides[-1]
        return top.name if isinstance(top, Choices) else top
    return jax.default_backend()


def choices(name: str | None = None) -> Choices:
    """The choices for backend `name` (default: `current()`); unknown accelerators get the GPU choices.

    Args:
      name: None, or a backend name as `jax.default_backend()` returns it ("cpu", "gpu", "tpu", ...).
    Returns:
      a frozen `Choices`.
    """
    if name is None:
        if _overrides and isinstance(_overrides[-1], Choices):
            return _overrides[-1]
        name = current()
    if name in CHOICES:
        return CHOICES[name]
    return dataclasses.replace(CHOICES["gpu"], name=name)


def override_key() -> tuple:
    """What `override` blocks are open now, hashable: a cache of anything traced (`compilation.shared`) keys
    on it, so a program built under an override is not handed out outside it (or the reverse)."""
    return tuple(_overrides)


def bytes_of(x, copies: int = 1) -> int:
    """Bytes of `copies` copies of array `x` (from its shape and dtype, so tracers work too)."""
    size = 1
    for n in x.shape:
        size *= int(n)
    return size * jnp.dtype(x.dtype).itemsize * int(copies)


@contextlib.contextmanager
def override(which: str | Choices) -> Iterator[Choices]:
    """Within the block, `choices()` returns backend `which`'s choices (or `which` itself, a `Choices`).

    Only code traced inside the block sees it: functions already jitted keep the choices they were
    traced with.
    """
    if not isinstance(which, (str, Choices)):
        raise ValueError(f"which must be a backend name or a Choices; got {which!r}")
    _overrides.append(which)
    try:
        yield choices()
    finally:
        _overrides.pop()
