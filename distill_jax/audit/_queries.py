"""A trained model asked for its logits or input gradients at many points, through two compiled programs.

The audit scores every attribution method of every model on one small test sample, and each method
needs the model at points of its own: integrated gradients' path, SmoothGrad's noisy copies, the
deletion and insertion curves, the attack steps. Jitting each method as one program put a copy of the
network into XLA once per (model, method, metric): about 50 programs and a minute of compilation on
the default job. Here a model has two programs whatever is asked of it,

    logits(z)        z [N, ...] -> [N, classes]
    gradients(z, t)  d logit_t(z) / dz, or d CE(softmax f(z), t) / dz   -> [N, ...]

run on chunks of a fixed size (the last one zero-padded), so every method, every call and every model
of the same architecture share them. The points and everything computed from the answers are host
arrays (`batched_explain` does that arithmetic in numpy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from distill_jax import backend, compilation, parallel
from distill_jax.models._layers import for_queries


@functools.lru_cache(maxsize=None)  # linen modules hash by their fields: two programs per architecture
def _programs(model: nn.Module):
    """(logits, gradients) jitted for `model` as `models.for_queries` runs it; variables are an argument."""
    model = for_queries(model)

    def logits(variables, z):
        return model.apply(variables, z).astype(jnp.float32)

    def gradients(variables, z, t, cross_entropy):
        def total(u):
            out = logits(variables, u)
            picked = jnp.take_along_axis(out, t[:, None], axis=1)[:, 0]
            loss = optax.softmax_cross_entropy_with_integer_labels(out, t)
            # one program for both objectives: `cross_entropy` is 0.0 or 1.0 at run time
            return jnp.sum((1.0 - cross_entropy) * picked + cross_entropy * loss)

        return jax.grad(total)(z)

    return compilation.jit(logits), compilation.jit(gradients)


@dataclasses.dataclass(frozen=True)
class ModelQueries:
    """`model` with `variables`, evaluated at host arrays of points in chunks of `chunk_size()`.

    Fields:
      model: a linen module whose `apply(variables, z)` returns logits [N, classes].
      variables: its variables (already placed on `mesh`'s devices when a mesh is given).
      mesh: None (the default device) or a single-process mesh whose devices split every chunk.
    """

    model: nn.Module
    variables: Any
    mesh: Mesh | None = None

    def chunk_size(self, example_shape: tuple[int, ...]) -> int:
        """Points per program call: `backend.choices().query_chunk` (on accelerators as many as the byte
        budget allows), rounded up to a multiple of the mesh's devices."""
        picked = backend.choices()
        item_bytes = int(np.prod(example_shape)) * 4
        size = picked.chunk(picked.query_chunk, picked.query_chunk, item_bytes)
        devices = 1 if self.mesh is None else self.mesh.shape[parallel.DATA_AXIS]
        return -(-size // devices) * devices

    def logits(self, z: np.ndarray) -> np.ndarray:
        """Logits at the points `z` [N, ...] -> [N, classes] (float32)."""
        return self._run(_programs(self.model)[0], np.asarray(z, np.float32))

    def gradients(self, z: np.ndarray, target: np.ndarray, *, cross_entropy: bool = False) -> np.ndarray:
        """Input gradients at `z` [N, ...]: of logit_target (default) or of the cross-entropy with labels
        `target` [N] (`cross_entropy=True`, the attacks' objective). Returns [N, ...] like z."""
        weight = np.float32(1.0 if cross_entropy else 0.0)
        fn = _programs(self.model)[1]
        return self._run(lambda v, zz, tt: fn(v, zz, tt, weight), np.asarray(z, np.float32),
                         np.asarray(target, np.int32))

    def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
        n = len(arrays[0])
        size = self.chunk_size(arrays[0].shape[1:])
        padded = [parallel.pad_to_multiple(a, size)[0] for a in arrays]
        out = []
        for lo in range(0, len(padded[0]), size):
            part = tuple(a[lo:lo + size] for a in padded)
            if self.mesh is not None:
                part = parallel.place_batch(part, self.mesh)
            out.append(np.asarray(fn(self.variables, *part)))
        return np.concatenate(out)[:n]
