"""Concept attributions: concept activation vectors and TCAV scores (Kim et al. 2018) over a
layer of any model split into `(features_fn, head_fn)` or given as a `forward`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax.attr._core import _dot, validate_target
from distill_jax.attr._layer import Forward, layer_grad, split_forward


# --------------------------------------------------------------------------------------------
# Concept activation vectors (TCAV)
# --------------------------------------------------------------------------------------------
def _layer_features(forward: Forward, x: jax.Array, layer: str | None) -> jax.Array:
    """The feature map [n, ...] that `forward` (either form of `attr.split_forward`) gives for x."""
    return split_forward(forward, x, layer=layer).run(x)[1]


def _cav_mean_difference(pos, neg, *, key, **_):
    return pos.mean(0) - neg.mean(0)


def _cav_logistic(pos, neg, *, key, steps: int = 300, learning_rate: float = 0.05, l2: float = 1e-4, **_):
    feats = jnp.concatenate([pos, neg])
    labels = jnp.concatenate([jnp.ones(pos.shape[0]), jnp.zeros(neg.shape[0])])
    centre = feats.mean(0)
    scale = jnp.maximum(jnp.std(feats), 1e-12)  # one scalar: changes conditioning, not the direction
    feats = (feats - centre) / scale
    # balance the two sets so a larger random set does not dominate
    sample_w = jnp.where(labels > 0, 0.5 / pos.shape[0], 0.5 / neg.shape[0])
    params = {"w": 1e-3 * jax.random.normal(key, (feats.shape[1],)), "b": jnp.zeros(())}
    opt = optax.adam(learning_rate)

    def loss(p):
        logit = _dot(feats, p["w"]) + p["b"]
        return jnp.sum(sample_w * optax.sigmoid_binary_cross_entropy(logit, labels)) + l2 * jnp.sum(p["w"] ** 2)

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params["w"]


CAV_METHODS: dict[str, Callable] = {"logistic": _cav_logistic, "mean_difference": _cav_mean_difference}


def concept_activation_vector(
    forward: Forward,
    concept_x: jax.Array,
    random_x: jax.Array,
    *,
    layer: str | None = None,
    key: jax.Array,
    method: str = "logistic",
    **method_kw,
) -> jax.Array:
    """Concept activation vector: the unit normal of a linear boundary between concept and random activations.

    "logistic": v = w / ||w||, w from L2-regularised logistic regression (concept = 1, random = 0,
                both sets weighted equally) trained `steps` (300) Adam steps in jnp.
    "mean_difference": v = (mean a(concept) - mean a(random)) / ||...|| (closed form).

    Args:
      forward: forward_fn(x, deltas=None) -> (logits, features) with `layer`, or a pair
        (features_fn, head_fn) with features_fn(x) -> [n, ...] (then `layer` is None).
      concept_x: [n_c, ...] images showing the concept (n_c >= 1). random_x: [n_r, ...] (n_r >= 1).
      layer: feature name (forward_fn only). key: PRNG key (initialises the logistic weights; the loss is convex, so
        the result barely depends on it). method: a key of CAV_METHODS.
    Returns:
      unit vector shaped like one example's feature at `layer` (e.g. [h, w, c]).
    Reference: Kim et al. 2018, "Interpretability Beyond Feature Attribution: TCAV".
    """
    concept_x, random_x = jnp.asarray(concept_x), jnp.asarray(random_x)
    if concept_x.ndim < 2 or concept_x.shape[0] == 0:
        raise ValueError(f"concept_x must be a non-empty batch [n, ...]; got shape {concept_x.shape}")
    if random_x.ndim < 2 or random_x.shape[0] == 0:
        raise ValueError(f"random_x must be a non-empty batch [n, ...]; got shape {random_x.shape}")
    if concept_x.shape[1:] != random_x.shape[1:]:
        raise ValueError(f"concept_x and random_x must have the same example shape; got {concept_x.shape} and {random_x.shape}")
    if method not in CAV_METHODS:
        raise ValueError(f"method must be one of {sorted(CAV_METHODS)}; got {method!r}")
    pos = _layer_features(forward, concept_x, layer)
    neg = _layer_features(forward, random_x, layer)
    shape = pos.shape[1:]
    w = CAV_METHODS[method](pos.reshape(pos.shape[0], -1), neg.reshape(neg.shape[0], -1), key=key, **method_kw)
    return (w / jnp.maximum(jnp.linalg.norm(w), 1e-12)).reshape(shape)


def tcav_score(
    forward: Forward,
    x: jax.Array,
    target: jax.Array,
    cav: jax.Array,
    *,
    layer: str | None = None,
    return_derivatives: bool = False,
):
    """TCAV score: the fraction of examples whose target logit increases along the concept direction.

    S_b = grad_{a_l} logit_target(x_b) . v_C;   TCAV = |{b : S_b > 0}| / batch.

    Args:
      forward: forward_fn(x, deltas=None) -> (logits, features) with `layer`, or a pair
        (features_fn, head_fn) (then `layer` is None). x: [batch, ...].
      target: [batch] ints. cav: shaped like one example's feature (or flattened).
      layer: feature name (forward_fn only).
    Returns:
      scalar in [0, 1]; with return_derivatives, (score, S [batch]).
    Reference: Kim et al. 2018.
    """
    x = jnp.asarray(x)
    split = split_forward(forward, x, layer=layer)
    fshape = split.feature.shape
    target = validate_target(target, x.shape[0], int(split.logits.shape[1]))
    if target.ndim != 1:
        raise ValueError(f"target must be [batch] for tcav_score; got shape {target.shape}")
    cav = jnp.asarray(cav)
    if cav.size != int(np.prod(fshape[1:])):
        raise ValueError(f"cav must have the shape of one example's feature ({split.name}) {fshape[1:]}; got {cav.shape}")
    grads, _ = layer_grad(split, x, target)
    derivs = _dot(grads.reshape(x.shape[0], -1), cav.reshape(-1))
    score = jnp.mean((derivs > 0).astype(jnp.float32))
    return (score, derivs) if return_derivatives else score
