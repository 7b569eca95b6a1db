"""Readable students: a linear model over PCA components and the soft decision tree of Frosst &
Hinton (2017), with its path probabilities and hard (argmax-path) prediction.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax import backend, compilation
from distill_jax.models._layers import Features, _output, _with_delta


class Linear(nn.Module):
    """A linear classifier over PCA components of the flattened input.

    logits = W^T z + b,  z = (flatten(x) - mean) @ components^T

    The PCA (`mean` [d], `components` [k, d]) lives in the non-trainable variable collection
    `"pca"`; fill it with `set_pca(variables, pca_state)` after `init`. Parameters: `linear`
    (`kernel` [k, classes], `bias` [classes]). Features: `pca` (the components z, [batch, k]).
    """

    num_classes: int
    n_components: int

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        flat = x.reshape(x.shape[0], -1)
        mean = self.variable("pca", "mean", jnp.zeros, (flat.shape[-1],), jnp.float32)
        comps = self.variable(
            "pca", "components", lambda: jnp.eye(self.n_components, flat.shape[-1], dtype=jnp.float32)
        )
        features: Features = {}
        z = _with_delta("pca", jnp.matmul(flat - mean.value, comps.value.T, precision=backend.HIGHEST), deltas, features)
        logits = nn.Dense(self.num_classes, name="linear")(z)
        return _output(logits, features, deltas, return_features, type(self).__name__)


def set_pca(variables: dict, pca_state: Any) -> dict:
    """Returns `variables` with the `"pca"` collection set from a fitted `pca.PCA` (mean, components)."""
    return {**variables, "pca": {"mean": pca_state.mean, "components": pca_state.components}}


class SoftDecisionTree(nn.Module):
    """Soft binary decision tree (Frosst & Hinton 2017, "Distilling a Neural Network Into a Soft Decision Tree").

    Inner node i (breadth-first; children 2i+1 left, 2i+2 right) routes an example right with
    probability p_i(x) = sigmoid(beta * (x . w_i + b_i)), beta a learned inverse temperature
    (softplus-parameterised, starts at 1). The probability of reaching leaf l is the product of
    the routing probabilities on its path; leaf l holds a learned class distribution
    softmax(leaf_logits[l]). Output logits are the log of the path-weighted mixture
    log sum_l P_l(x) softmax(leaf_logits[l]), so softmax(logits) is the soft prediction.

    Features: `routing` [batch, 2^depth - 1] (p_i), `node_reach` [batch, 2^depth - 1]
    (probability of reaching node i), `path_probs` [batch, 2^depth] (sums to 1), `leaf_logits`
    [2^depth, classes] (broadcast-free: the same for every example).
    """

    depth: int
    num_classes: int

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        if self.depth < 1:
            raise ValueError(f"SoftDecisionTree depth must be >= 1; got depth={self.depth}")
        flat = x.reshape(x.shape[0], -1)
        n_inner, n_leaves = 2**self.depth - 1, 2**self.depth
        # x . w_i + b_i for every inner node; HIGHEST precision (as the leaf mixture below): the tree is
        # cheap, and its outputs are reported (accuracy, fidelity, leaf usage)
        decisions = nn.Dense(n_inner, precision=backend.HIGHEST, name="nodes")(flat)
        beta = nn.softplus(self.param("inverse_temperature", nn.initializers.constant(0.5413), ()))
        leaf_logits = self.param("leaf_logits", nn.initializers.normal(0.1), (n_leaves, self.num_classes))
        features: Features = {}
        routing = _with_delta("routing", nn.sigmoid(beta * decisions), deltas, features)
        node_reach, path_probs = path_probabilities(routing, self.depth)
        features.update(node_reach=node_reach, path_probs=path_probs, leaf_logits=leaf_logits)
        mixture = jnp.matmul(path_probs, jax.nn.softmax(leaf_logits, axis=-1), precision=backend.HIGHEST)
        logits = jnp.log(jnp.maximum(mixture, jnp.finfo(mixture.dtype).tiny))
        return _output(logits, features, deltas, return_features, type(self).__name__)


def path_probabilities(routing: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Probabilities of reaching every inner node and every leaf of a complete binary tree.

    reach(root) = 1; reach(2i+1) = reach(i) * (1 - p_i); reach(2i+2) = reach(i) * p_i.

    Args:
      routing: [batch, 2^depth - 1] right-routing probabilities p_i, breadth-first.
      depth: tree depth (>= 1).
    Returns:
      (node_reach [batch, 2^depth - 1], path_probs [batch, 2^depth]); each row of path_probs sums to 1.
    """
    level = jnp.ones((routing.shape[0], 1), routing.dtype)
    reach_levels = []
    for d in range(depth):
        reach_levels.append(level)
        p = routing[:, 2**d - 1 : 2 ** (d + 1) - 1]
        level = jnp.stack([level * (1 - p), level * p], axis=-1).reshape(routing.shape[0], -1)
    return jnp.concatenate(reach_levels, axis=-1), level


@compilation.run_once(static_argnames="depth")
def tree_hard_predict(routing: jax.Array, leaf_logits: jax.Array, depth: int) -> jax.Array:
    """Class predicted by following the most probable branch at every node to a single leaf.

    node_0 = 0;  node_{t+1} = 2 node_t + 1 + [p_{node_t} > 0.5];  leaf = node_depth - (2^depth - 1).
    Jitted (depth static): one compiled program per shape, not one per step of the walk.

    Args:
      routing: [batch, 2^depth - 1]; leaf_logits: [2^depth, classes].
    Returns:
      (leaf [batch] int32, class [batch] int32).
    """
    node = jnp.zeros((routing.shape[0],), jnp.int32)
    for _ in range(depth):
        go_right = jnp.take_along_axis(routing, node[:, None], axis=1)[:, 0] > 0.5
        node = 2 * node + 1 + go_right.astype(jnp.int32)
    leaf = node - (2**depth - 1)
    return leaf, jnp.argmax(leaf_logits[leaf], axis=-1).astype(jnp.int32)
