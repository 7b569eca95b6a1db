"""The soft tree's leaf step under Adam when a term reads the leaves at temperature T.

`losses.soft_tree_kd_loss` (the `kd` and `fm` terms of a tree student) reads `leaf_logits / T`. The leaf
logits are free parameters, and Adam moves each by about its learning rate per step whatever the size of
its gradient, so what the loss reads moves T times slower than at T = 1, while the routing, which T does
not touch, moves as fast as ever: the routing hardens onto leaves that still hold nearly uniform class
distributions, and the tree underfits (benchmarks/RESULTS.md, "Why soft-tree KD got worse", has the
measurements). With plain SGD the T^2 factor of Hinton's loss makes the
step on `leaf_logits / T` independent of T (d/dz T^2 KL(p_T || softmax(z/T)) = T P (softmax(z/T) - p_T)),
and Adam throws that factor away. Scaling the leaf updates by T restores it: Adam on the parametrisation
`leaf_logits = T * theta`, with the leaves read at T = 1 unchanged.
"""
from __future__ import annotations

import jax
import optax

from distill_jax import compilation
from distill_jax.distill._method import MethodConfig, parse_method
from distill_jax.distill._terms import TERMS

# optimizers whose step does not scale with the gradient (per-parameter normalised)
SCALE_INVARIANT_OPTIMIZERS = ("adam",)


def tree_leaf_step_scale(student_kind: str, method: str, cfg: MethodConfig, optimizer) -> float:
    """`cfg.temperature` for a soft tree trained by Adam with a term that reads its leaves at T, else 1.

    Args:
      student_kind: "tree", "linear", "cnn", ... (only "tree" has leaves).
      method: the distillation method, e.g. "kd" or "0.5*kd+fm".
      cfg: the method's hyper-parameters (its temperature).
      optimizer: a `train.OPTIMIZERS` name; anything else (an optax transformation) gets 1.
    """
    if student_kind != "tree" or not isinstance(optimizer, str) or optimizer not in SCALE_INVARIANT_OPTIMIZERS:
        return 1.0
    if not any(TERMS[name].tree_leaves_at_temperature for name, _ in parse_method(method)):
        return 1.0
    return float(cfg.temperature)


@compilation.shared
def tree_leaf_step(scale: float) -> optax.GradientTransformation | None:
    """Multiplies the updates of every parameter named `leaf_logits` by `scale`; chain it after the optimizer
    (and before pruning). None when `scale` is 1. The same scale gives the same transformation (so the same
    optimizer and compiled step)."""
    if scale == 1.0:
        return None

    def leaf_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(getattr(k, "key", None) == "leaf_logits" for k in path), params)

    return optax.masked(optax.scale(scale), leaf_mask)
