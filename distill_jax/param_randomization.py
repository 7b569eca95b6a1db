"""Model-parameter randomisation for sanity checks: paths into nested parameter dicts, and randomising one layer.

Shared by `metrics.randomization_check` (cascading MPRT) and `explanation_quality.smooth_mprt` /
`efficient_mprt`. A layer is named by its path in the parameter tree ("conv4" or "params/conv4");
the order of layers always comes from the caller (the model's own layer order), never from dict
order: after jit, `device_get` or orbax, dicts are sorted, so "dense10" would precede "dense2".
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from distill_jax import compilation


@compilation.run_once  # one program per leaf shape (eagerly: a std, a normal, a where and a product, each compiled)
def default_randomize(key: jax.Array, leaf: jax.Array) -> jax.Array:
    """N(0, s^2) with s the leaf's own standard deviation (0.01 for constant leaves such as zero biases)."""
    std = jnp.std(leaf)
    scale = jnp.where(std > 0, std, 0.01)
    return (jax.random.normal(key, leaf.shape, jnp.result_type(leaf)) * scale).astype(leaf.dtype)


def get_path(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            names = list(node) if isinstance(node, Mapping) else []
            raise ValueError(f"layer_order entry {path!r}: no {part!r} in the params; available names: {names}")
        node = node[part]
    return node


def set_path(tree: Mapping, path: str, value: Any) -> dict:
    head, _, rest = path.partition("/")
    return {**tree, head: set_path(tree[head], rest, value) if rest else value}


def check_layer_order(params: Any, layer_order: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layer_order, str) or len(layer_order) == 0:
        raise ValueError(f"layer_order must be a non-empty sequence of parameter names; got {layer_order!r}")
    if len(set(layer_order)) != len(layer_order):
        raise ValueError(f"layer_order must not repeat a name; got {list(layer_order)}")
    for name in layer_order:
        get_path(params, name)
    return tuple(layer_order)


def as_dicts(tree: Any) -> Any:
    """Nested Mappings (e.g. flax FrozenDict) as plain dicts, so randomised copies share the tree structure."""
    return {k: as_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def randomize_layer(params: dict, key: jax.Array, *, name: str, randomize: Callable) -> dict:
    """params with every leaf of the subtree `name` replaced by randomize(key_i, leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(get_path(params, name))
    keys = jax.random.split(key, max(len(leaves), 1))
    new_leaves = []
    for k, leaf in zip(keys, leaves):
        new_leaf = randomize(k, leaf)
        if jnp.shape(new_leaf) != jnp.shape(leaf) or jnp.result_type(new_leaf) != jnp.result_type(leaf):
            raise ValueError(f"randomize must return a leaf of the same shape and dtype; for {name!r} it turned "
                             f"{jnp.shape(leaf)} {jnp.result_type(leaf)} into {jnp.shape(new_leaf)} "
                             f"{jnp.result_type(new_leaf)}")
        new_leaves.append(jnp.asarray(new_leaf, jnp.result_type(leaf)))
    return set_path(params, name, jax.tree_util.tree_unflatten(treedef, new_leaves))
