"""The teacher cache: the teacher's outputs (logits, features) that the terms read, computed
once over the training set and held on the host.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import compilation, parallel
from distill_jax.distill._method import Needs
from distill_jax.distill.losses._features import attention_energy_map, input_saliency
from distill_jax.models._adapters import as_teacher


def teacher_outputs(teacher, teacher_vars, x: jax.Array, labels: jax.Array, needs: Needs) -> dict:
    """The teacher outputs a method needs, under stop_gradient.

    `teacher`: anything `as_teacher` takes (a linen module, a function `x -> logits`, a `Teacher`);
    `teacher_vars` is passed to its `(variables, x)` form (None for a function that closes over them).
    Returns a dict with `teacher_logits` [B, C], `teacher_feat/<layer>` feature maps,
    `teacher_attention/<layer>` attention energy maps [B, H, W] and `teacher_saliency`,
    each present only when needed.
    """
    out = {}
    teacher = as_teacher(teacher)
    if needs.teacher_forward:
        logits, feats = teacher.forward(teacher_vars, x)
        if needs.teacher_logits:
            out["teacher_logits"] = logits
        out.update({f"teacher_feat/{l}": feats[l] for l in needs.teacher_layers})
        out.update({f"teacher_attention/{l}": attention_energy_map(feats[l], p=needs.attention_p)
                    for l in needs.teacher_attention})
    if needs.teacher_saliency:
        out["teacher_saliency"] = input_saliency(lambda z: teacher.apply(teacher_vars, z)[0], x, labels)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def _identity(x):
    return x


def teacher_cache_shapes(teacher, teacher_vars, sample_x: jax.Array, needs: Needs, *,
                         inputs: Callable[[jax.Array], jax.Array] = _identity) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of one example's cached outputs (no computation): key -> ShapeDtypeStruct without the batch axis."""
    out = jax.eval_shape(lambda v, xb: teacher_outputs(teacher, v, inputs(xb), jnp.zeros(xb.shape[:1], jnp.int32), needs),
                         teacher_vars, sample_x[:1])
    return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in out.items()}


def teacher_cache_bytes(teacher, teacher_vars, sample_x: jax.Array, needs: Needs, n: int, *,
                        inputs: Callable[[jax.Array], jax.Array] = _identity) -> int:
    """Host memory `cache_teacher_outputs` would take for `n` examples, in bytes."""
    shapes = teacher_cache_shapes(teacher, teacher_vars, sample_x, needs, inputs=inputs)
    return n * sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in shapes.values())


def cache_teacher_outputs(teacher, teacher_vars, x: np.ndarray, labels: np.ndarray, needs: Needs,
                          *, batch_size: int = 256, inputs: Callable[[jax.Array], jax.Array] = _identity,
                          mesh=None) -> dict[str, np.ndarray]:
    """Runs the frozen teacher once over `x` and returns its outputs as host arrays (same keys as `teacher_outputs`).

    The outputs are written into arrays allocated once at their final size, so the peak host memory
    is the cache itself plus one batch (`teacher_cache_bytes` says how much beforehand).

    Args:
      teacher, teacher_vars: as for `teacher_outputs`.
      x: [n, ...] host images as stored (e.g. uint8); `inputs` maps a batch of them to the teacher's
        input on the device (e.g. standardization), inside the jitted call.
      labels: [n] ints (saliency targets).
      mesh: a single-process mesh (e.g. `parallel.local_mesh()`) to split every batch over its devices,
        the teacher's variables placed on it once; None runs on the default device.
    Returns:
      key -> [n, ...] numpy array.

    The jitted teacher pass is kept for the next call with the same teacher, needs, inputs, mesh and batch
    size (students of one run share one compiled program instead of one each).
    """
    n = len(x)
    if n == 0:
        return {}
    shapes = teacher_cache_shapes(teacher, teacher_vars, x[:1], needs, inputs=inputs)  # shapes only: no transfer
    out = {k: np.empty((n,) + s.shape, s.dtype) for k, s in shapes.items()}
    if _hashable((teacher, needs, inputs, mesh)):
        fn, batch_size = _cached_teacher_outputs_fn(teacher, needs, inputs, mesh, batch_size)
        teacher_vars = teacher_vars if mesh is None else parallel.replicate(teacher_vars, mesh)
    else:  # e.g. a module with a list field: a program of its own
        fn, teacher_vars, batch_size = teacher_outputs_fn(teacher, teacher_vars, needs, inputs, mesh, batch_size)
    multiple = batch_size if mesh is not None else 1  # a sharded batch keeps its size: the last one is padded
    for i in range(0, n, batch_size):
        xb, pad = parallel.pad_to_multiple(x[i : i + batch_size], multiple)
        yb, _ = parallel.pad_to_multiple(labels[i : i + batch_size], multiple)
        if mesh is not None:
            xb, yb = jax.device_put((xb, yb), parallel.data_sharding(mesh))
        chunk = jax.device_get(fn(teacher_vars, xb, yb))
        for k, v in chunk.items():
            out[k][i : i + len(v) - pad] = v[: len(v) - pad]
    return out


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=4)  # small: each entry keeps its teacher module and `inputs` (and what they hold) alive
def _cached_teacher_outputs_fn(teacher, needs: Needs, inputs: Callable, mesh, batch_size: int):
    """`teacher_outputs_fn`'s jitted function and batch size, one per (teacher, needs, inputs, mesh, batch size)."""
    fn, _, batch_size = teacher_outputs_fn(teacher, None, needs, inputs, mesh, batch_size)
    return fn, batch_size


def teacher_outputs_fn(teacher, teacher_vars, needs: Needs, inputs: Callable, mesh, batch_size: int):
    """The jitted `(variables, x, labels) -> teacher_outputs`, the variables to pass it, and the batch size.

    With a mesh: batches split over its `data` axis (the batch size rounded up to a multiple of its
    devices), the variables replicated on it once; without one: plain jit on the default device.
    """
    def run(v, xb, yb):
        return teacher_outputs(teacher, v, inputs(xb), yb, needs)

    if mesh is None:
        return compilation.jit(run), teacher_vars, batch_size
    devices = mesh.shape[parallel.DATA_AXIS]
    batch_size = -(-batch_size // devices) * devices
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(run, in_shardings=(repl, data, data), out_shardings=data), parallel.replicate(teacher_vars, mesh), \
        batch_size
