"""Inner-product analysis: exact linear decompositions, CKA, concept vectors, soft-tree usage.

Each public function checks shapes on the host and runs one jitted program (cached per shape, so a
repeated call compiles nothing); inside a traced function it is inlined like any jnp code.

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring);
`cka_matrix(feats_a, feats_b)` is symmetric in its two models. TCAV follows the attribution order
with `forward` for `apply_fn`: `tcav_score(forward, x, target, cav, *, layer=None)`.

TCAV reads a feature map from a `forward` in either form of `attr.split_forward`:
`forward_fn(x, deltas=None) -> (logits, features dict)` with `layer=` naming the feature
(`deltas[layer]` is added to it inside the network, so d logits / d feature is a gradient w.r.t. a
zero delta), or a pair `(features_fn, head_fn)` with features_fn(x) -> [batch, ...] and
head_fn(features) -> logits [batch, classes] (any JAX model cut in two; no `layer`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend, compilation
from distill_jax.attr._core import _dot, validate_target

__all__ = [
    "linear_contributions",
    "class_templates",
    "linear_cka",
    "cka_matrix",
    "tree_usage",
    "node_filters",
]

def _as_array(v):
    """``v`` if it is an array (numpy, jax, a tracer), else ``np.asarray(v)``. Host arrays go to the device as
    arguments of one jitted program: ``jnp.asarray`` and eager ops on them would each compile a program."""
    return v if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v)


# --------------------------------------------------------------------------------------------
# Linear student on PCA components
# --------------------------------------------------------------------------------------------
def linear_contributions(
    weights: jax.Array,
    bias: jax.Array,
    z: jax.Array,
    components: jax.Array | None = None,
    *,
    x: jax.Array | None = None,
    mean: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Exact decomposition of a linear model's logits over its inputs (and over pixels via PCA).

    logit_bc = sum_j w_jc z_bj + b_c                                  (per component j)
             = sum_i T_ci (x_bi - mean_i) + b_c,   T = W^T P  ([C, d]) (per pixel i)

    with z = (x - mean) @ P^T for PCA components P [k, d]. Pixel contributions are
    T_ci (x_bi - mean_i). If `x` is given they are exact for any P; without `x`, (x - mean) is
    replaced by its projection z @ P, which is exact when P has orthonormal rows (PCA).

    Args:
      weights: [k, C] (the `linear` kernel). bias: [C]. z: [batch, k].
      components: [k, d] PCA components, or None for component contributions only.
      x: optional [batch, ...] inputs with d values each; mean: [d] PCA mean (zeros if None).
    Returns:
      dict with "components" [batch, C, k] (w_jc z_bj), "bias" [C], "logits" [batch, C]
      (their sum plus bias), and given `components`, "pixels" [batch, C, d] whose sum over d plus
      bias is the logits too.
    Reference: the inner-product reading of linear models; PCA as in Jolliffe 2002.
    """
    weights, bias, z = _as_array(weights), _as_array(bias), _as_array(z)
    components, x, mean = (None if v is None else _as_array(v) for v in (components, x, mean))
    shape = jnp.shape
    if len(shape(weights)) != 2:
        raise ValueError(f"weights must be [k, classes]; got shape {shape(weights)}")
    k, num_classes = shape(weights)
    if shape(bias) != (num_classes,):
        raise ValueError(f"bias must be [classes] = [{num_classes}]; got shape {shape(bias)}")
    if len(shape(z)) != 2 or shape(z)[1] != k:
        raise ValueError(f"z must be [batch, k] = [batch, {k}]; got shape {shape(z)}")
    if components is not None:
        if len(shape(components)) != 2 or shape(components)[0] != k:
            raise ValueError(f"components must be [k, d] with k={k}; got shape {shape(components)}")
        d = shape(components)[1]
        if x is not None and int(np.prod(shape(x))) != shape(z)[0] * d:
            raise ValueError(f"x must hold d={d} values per example; got shape {shape(x)}")
        if x is not None and mean is not None and shape(mean) != (d,):
            raise ValueError(f"mean must be [d] = [{d}]; got shape {shape(mean)}")
    else:
        x = None  # only pixel contributions read x and mean
    return _linear_contributions(weights, bias, z, components, x, None if x is None else mean)


@compilation.run_once
def _linear_contributions(weights, bias, z, components, x, mean) -> dict[str, jax.Array]:
    per_component = z[:, None, :] * weights.T[None, :, :]
    out = {"components": per_component, "bias": jnp.asarray(bias), "logits": per_component.sum(-1) + bias}
    if components is None:
        return out
    if x is None:
        centred = _dot(z, components)
    else:
        centred = x.reshape(z.shape[0], -1) - (0.0 if mean is None else mean)
    out["pixels"] = centred[:, None, :] * _class_templates(weights, components)[None, :, :]
    return out


def class_templates(weights: jax.Array, components: jax.Array) -> jax.Array:
    """Each class's weight vector in pixel space: T = W^T P.

    Args:
      weights: [k, C]; components: [k, d].
    Returns:
      [C, d] (reshape d to the image shape to view it), so logit_c = T_c . (x - mean) + b_c.
    """
    weights, components = _as_array(weights), _as_array(components)
    ws, cs = jnp.shape(weights), jnp.shape(components)
    if len(ws) != 2 or len(cs) != 2 or ws[0] != cs[0]:
        raise ValueError(f"weights [k, C] and components [k, d] must share k; got {ws} and {cs}")
    return _class_templates(weights, components)


@compilation.run_once
def _class_templates(weights, components):
    return _dot(weights.T, components)


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------
def _centred_gram(a: jax.Array) -> jax.Array:
    a = a - a.mean(axis=0, keepdims=True)
    return _dot(a, a.T)


def _cka_from_grams(k: jax.Array, l: jax.Array) -> jax.Array:
    # k, l are centred gram matrices; <Kc, Lc>_F / (||Kc||_F ||Lc||_F)
    return jnp.vdot(k, l, precision=backend.HIGHEST) / (jnp.linalg.norm(k) * jnp.linalg.norm(l))


def _check_pair(a, b, name_a="a", name_b="b"):
    sa, sb = jnp.shape(a), jnp.shape(b)
    if len(sa) != 2 or len(sb) != 2:
        raise ValueError(f"{name_a} and {name_b} must be [n, features]; got shapes {sa} and {sb}")
    if sa[0] != sb[0] or sa[0] < 2:
        raise ValueError(f"{name_a} and {name_b} need the same number n >= 2 of rows; got {sa[0]} and {sb[0]}")


def linear_cka(a: jax.Array, b: jax.Array) -> jax.Array:
    """Linear centred kernel alignment between two representations of the same n examples.

    CKA(A, B) = ||B_c^T A_c||_F^2 / (||A_c^T A_c||_F ||B_c^T B_c||_F),  A_c, B_c column-centred.

    Computed in whichever of the feature form or the (equal) n x n Gram form is cheaper.
    It is 1 for identical inputs and invariant to orthogonal transforms and isotropic scaling.

    Args:
      a: [n, p]; b: [n, q].
    Returns:
      scalar in [0, 1].
    Reference: Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited".
    """
    a, b = _as_array(a), _as_array(b)
    _check_pair(a, b)
    return _linear_cka(a, b)


@compilation.run_once
def _linear_cka(a, b):
    n = a.shape[0]
    if n <= min(a.shape[1], b.shape[1]):
        return _cka_from_grams(_centred_gram(a), _centred_gram(b))
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    return jnp.sum(_dot(b.T, a) ** 2) / (jnp.linalg.norm(_dot(a.T, a)) * jnp.linalg.norm(_dot(b.T, b)))


def cka_matrix(feats_a: dict, feats_b: dict) -> tuple[list[str], list[str], jax.Array]:
    """Linear CKA between every feature of one model and every feature of another.

    Each feature [n, ...] is flattened to [n, prod(...)]; each centred n x n Gram matrix is built once.

    Args:
      feats_a, feats_b: dicts name -> [n, ...] (e.g. teacher and student features of the same inputs).
    Returns:
      (names_a, names_b, matrix [len(names_a), len(names_b)]), names in dict order.
    Reference: Kornblith et al. 2019.
    """
    if not feats_a or not feats_b:
        raise ValueError(f"feats_a and feats_b must be non-empty dicts; got {len(feats_a)} and {len(feats_b)} entries")
    sizes = {jnp.shape(v)[0] for v in list(feats_a.values()) + list(feats_b.values())}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"every feature in feats_a and feats_b must have the same n >= 2 rows; got row counts {sorted(sizes)}")
    return list(feats_a), list(feats_b), _cka_matrix(tuple(map(_as_array, feats_a.values())),
                                                     tuple(map(_as_array, feats_b.values())))


@compilation.run_once
def _cka_matrix(feats_a: tuple, feats_b: tuple) -> jax.Array:
    """[len(feats_a), len(feats_b)] CKA from the flattened Gram matrices (one program for the whole matrix)."""
    ka = jnp.stack([_centred_gram(v.reshape(v.shape[0], -1)) for v in feats_a]).reshape(len(feats_a), -1)
    kb = jnp.stack([_centred_gram(v.reshape(v.shape[0], -1)) for v in feats_b]).reshape(len(feats_b), -1)
    return _dot(ka, kb.T) / (jnp.linalg.norm(ka, axis=1)[:, None] * jnp.linalg.norm(kb, axis=1)[None, :])


# --------------------------------------------------------------------------------------------
# Soft decision tree
# --------------------------------------------------------------------------------------------
def tree_usage(
    path_probs: jax.Array, labels: jax.Array, num_classes: int, *, hard_leaf: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-class leaf usage of a soft decision tree.

    soft_cl = mean_{b: y_b = c} P_l(x_b);   hard_cl = |{b : y_b = c, leaf_b = l}| / |{b : y_b = c}|

    Args:
      path_probs: [batch, L] leaf probabilities (rows sum to 1). labels: [batch] ints in [0, num_classes).
      hard_leaf: [batch] leaf reached by the greedy path (`models.tree_hard_predict`); defaults to
        argmax_l P_l(x_b).
    Returns:
      dict "soft" [C, L], "hard" [C, L] (rows of classes without examples are 0), "counts" [C].
    Reference: Frosst & Hinton 2017, "Distilling a Neural Network Into a Soft Decision Tree".
    """
    path_probs = _as_array(path_probs)
    if len(jnp.shape(path_probs)) != 2:
        raise ValueError(f"path_probs must be [batch, leaves]; got shape {jnp.shape(path_probs)}")
    if isinstance(labels, np.ndarray):  # device_put moves it as is; jnp.asarray would compile a program per shape
        labels = jax.device_put(labels)
    labels = validate_target(labels, jnp.shape(path_probs)[0], num_classes, name="labels")
    if labels.ndim != 1:
        raise ValueError(f"labels must be [batch]; got shape {labels.shape}")
    return _tree_usage(path_probs, labels, hard_leaf, num_classes=num_classes)


@compilation.run_once(static_argnames="num_classes")
def _tree_usage(path_probs, labels, hard_leaf, *, num_classes: int) -> dict[str, jax.Array]:
    n_leaves = path_probs.shape[1]
    if hard_leaf is None:
        hard_leaf = jnp.argmax(path_probs, axis=1)
    onehot_y = jax.nn.one_hot(labels, num_classes, dtype=path_probs.dtype)  # [B, C]
    counts = onehot_y.sum(0)
    denom = jnp.maximum(counts, 1.0)[:, None]
    soft = _dot(onehot_y.T, path_probs) / denom
    hard = _dot(onehot_y.T, jax.nn.one_hot(hard_leaf, n_leaves, dtype=path_probs.dtype)) / denom
    return {"soft": soft, "hard": hard, "counts": counts}


def node_filters(kernel: jax.Array, image_shape: tuple[int, ...]) -> jax.Array:
    """A soft tree's inner-node weight vectors as images: kernel [d, nodes] -> [nodes, *image_shape]."""
    kernel = _as_array(kernel)
    shape, image_shape = jnp.shape(kernel), tuple(image_shape)
    if len(shape) != 2 or shape[0] != int(np.prod(image_shape)):
        raise ValueError(f"kernel must be [prod(image_shape)={int(np.prod(image_shape))}, nodes]; got shape {shape}")
    return _node_filters(kernel, image_shape)


@compilation.run_once(static_argnums=1)
def _node_filters(kernel, image_shape: tuple[int, ...]) -> jax.Array:
    return kernel.T.reshape((kernel.shape[1],) + image_shape)
