"""Gradual magnitude pruning (Zhu & Gupta 2017) as an optax gradient transformation.

Target sparsity at step t (updated every `frequency` steps between `begin_step` and `end_step`):

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3,   clipped to [s_i, s_f]

At each update the weights with the smallest magnitude in every prunable leaf (kernels: arrays
with ndim >= 2) are set to exactly zero, so the fraction of zeros in each kernel follows s_t,
and a pruned weight stays zero unless its magnitude would rank it back among the kept ones.
Chain it after the optimizer: `optax.chain(optax.adam(lr), prune.magnitude_pruning(...))`, or
pass it as `extra` to `train.make_optimizer`.

Reference: M. Zhu, S. Gupta, "To prune, or not to prune: exploring the efficacy of pruning for
model compression", 2017.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import compilation

__all__ = [
    "PruningState",
    "sparsity_schedule",
    "magnitude_mask",
    "magnitude_pruning",
    "sparsity",
]


class PruningState(NamedTuple):
    count: jax.Array  # updates applied so far


def sparsity_schedule(step, *, final_sparsity: float, begin_step: int, end_step: int,
                      initial_sparsity: float = 0.0) -> jax.Array:
    """Zhu & Gupta's cubic sparsity schedule s_t (0 before `begin_step`)."""
    span = max(end_step - begin_step, 1)
    progress = jnp.clip((step - begin_step) / span, 0.0, 1.0)
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3
    return jnp.where(step < begin_step, 0.0, s)


def _is_prunable(leaf) -> bool:
    return getattr(leaf, "ndim", 0) >= 2


def magnitude_mask(weights: jax.Array, sparsity) -> jax.Array:
    """Mask (1 keep / 0 prune) that zeroes the fraction `sparsity` of `weights` with the smallest |w|.

    Ties at the threshold are kept, so the achieved sparsity can be slightly below the target.
    """
    flat = jnp.abs(weights).ravel()
    k = jnp.floor(sparsity * flat.size).astype(jnp.int32)  # number to prune
    threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
    return (jnp.abs(weights) > threshold).astype(weights.dtype)


@compilation.shared
def magnitude_pruning(*, final_sparsity: float, begin_step: int, end_step: int, frequency: int = 1,
                      initial_sparsity: float = 0.0) -> optax.GradientTransformation:
    """Gradual magnitude pruning of every kernel (ndim >= 2) towards `final_sparsity`.

    The same arguments give the same transformation (so the same optimizer and compiled step).

    Raises:
      ValueError: a sparsity outside [0, 1), end before begin, or frequency < 1.
    """
    if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
        raise ValueError(f"need 0 <= initial_sparsity <= final_sparsity < 1; got initial_sparsity={initial_sparsity}, "
                         f"final_sparsity={final_sparsity}")
    if end_step < begin_step or frequency < 1:
        raise ValueError(f"need begin_step <= end_step and frequency >= 1; got begin_step={begin_step}, "
                         f"end_step={end_step}, frequency={frequency}")

    def init(params):
        del params
        return PruningState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params):
        if params is None:
            raise ValueError("magnitude_pruning needs params: call optimizer.update(grads, state, params)")
        # The sparsity steps only every `frequency` updates; between those the same target holds.
        step = (state.count // frequency) * frequency
        s = sparsity_schedule(step, final_sparsity=final_sparsity, begin_step=begin_step, end_step=end_step,
                              initial_sparsity=initial_sparsity)

        def prune_leaf(u, p):
            if not _is_prunable(p):
                return u
            new = p + u
            return new * magnitude_mask(new, s) - p

        return jax.tree_util.tree_map(prune_leaf, updates, params), PruningState(state.count + 1)

    return optax.GradientTransformation(init, update)


def sparsity(params) -> float:
    """Fraction of exactly-zero entries over all prunable leaves (kernels) of `params`."""
    leaves = [l for l in jax.tree_util.tree_leaves(params) if _is_prunable(l)]
    total = sum(l.size for l in leaves)
    # Host bookkeeping in numpy: one transfer of all kernels, no compiled program per leaf shape.
    zeros = sum(int(np.count_nonzero(l == 0)) for l in jax.device_get(leaves))
    return zeros / total if total else 0.0
