"""Layer attributions: Grad-CAM (Selvaraju et al. 2017) and gradients at an inner layer, over a
model given as `forward_fn(x, deltas) -> (logits, features)` or as a pair `(features_fn, head_fn)`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from distill_jax.attr._core import ForwardFn, check_x, per_target, validate_target

# --------------------------------------------------------------------------------------------
# Feature maps: one form for forward_fn + layer and for (features_fn, head_fn)
# --------------------------------------------------------------------------------------------
Forward = Union[ForwardFn, Sequence[Callable]]


class LayerForward(NamedTuple):
    """A model cut at one feature map (what `split_forward` returns).

    run(x, delta=None) -> (logits [batch, classes], feature [batch, ...]); `delta` (shaped like the
    feature) is added to the feature inside the network, so d logits / d feature = d logits / d delta
    at delta = 0. `logits` and `feature` are their shapes for the x given to `split_forward`; `name`
    says where the feature comes from, for messages ("layer 'conv2'" or "features_fn").
    """

    run: Callable[..., tuple[jax.Array, jax.Array]]
    logits: jax.ShapeDtypeStruct
    feature: jax.ShapeDtypeStruct
    name: str


def _feature_shapes(forward_fn: ForwardFn, x: jax.Array) -> tuple[jax.ShapeDtypeStruct, dict]:
    out = jax.eval_shape(lambda v: forward_fn(v), x)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise ValueError("forward_fn must return (logits, features dict); see the model convention in distill_jax.attr")
    return out


def check_layer(features: dict, layer: str, *, name: str = "layer") -> None:
    """Raises ValueError listing the available feature names when `layer` is not one of them."""
    if layer not in features:
        raise ValueError(f"{name} {layer!r} is not a feature of this model; it has {list(features)}")


def _run_pair(features_fn: Callable, head_fn: Callable) -> Callable:
    def run(x, delta=None):
        feature = features_fn(x)
        feature = feature if delta is None else feature + delta
        return head_fn(feature), feature

    return run


def _run_layer(forward_fn: ForwardFn, layer: str) -> Callable:
    def run(x, delta=None):
        logits, feats = forward_fn(x) if delta is None else forward_fn(x, {layer: delta})
        return logits, feats[layer]

    return run


def split_forward(forward: Forward, x: jax.Array, *, layer: str | None = None) -> LayerForward:
    """Brings both forms of `forward` (module docstring) to one: a model cut at one feature map.

    forward_fn + layer: run(x, delta) = forward_fn(x, {layer: delta}) -> (logits, features[layer]).
    (features_fn, head_fn): run(x, delta) = (head_fn(features_fn(x) + delta), features_fn(x) + delta).
    A linen model gives the first form with `models.forward_with_features(model, variables)`; any model
    gives the second by splitting its apply into the part up to the feature map and the rest.

    Args:
      forward: forward_fn(x, deltas=None) -> (logits, features dict), or a pair (features_fn, head_fn)
        with features_fn(x) -> [batch, ...] and head_fn(feature) -> logits [batch, classes].
      x: [batch, ...] inputs (only their shape is used: `jax.eval_shape`).
      layer: the feature name for forward_fn; must be None for a pair.
    Returns:
      LayerForward(run, logits shape, feature shape, name).
    Raises:
      ValueError (one line) for a pair that is not two callables, a missing or unknown `layer`, a
      `layer` given with a pair, a feature without the batch axis first, or logits not [batch, classes].
    """
    batch = x.shape[0]
    if isinstance(forward, (tuple, list)):
        if len(forward) != 2 or not all(callable(f) for f in forward):
            kinds = ", ".join(type(f).__name__ for f in forward)
            raise ValueError(f"forward must be forward_fn or a pair (features_fn, head_fn) of callables; got a "
                             f"{type(forward).__name__} of {len(forward)} ({kinds})")
        if layer is not None:
            raise ValueError(f"layer must be None when forward is a (features_fn, head_fn) pair (features_fn picks "
                             f"the feature map); got {layer!r}")
        run, name = _run_pair(*forward), "features_fn"
        feature = jax.eval_shape(forward[0], x)
        if not isinstance(feature, jax.ShapeDtypeStruct):
            raise ValueError(f"features_fn must return one array [batch, ...]; got {jax.tree.structure(feature)}")
        logits = jax.eval_shape(forward[1], feature)
        where = "head_fn"
    elif callable(forward):
        if not isinstance(layer, str):
            raise ValueError(f"layer must name a feature of forward_fn (a str); got {layer!r} (or pass forward as "
                             f"a pair (features_fn, head_fn))")
        logits, feats = _feature_shapes(forward, x)
        check_layer(feats, layer)
        run, name, feature, where = _run_layer(forward, layer), f"layer {layer!r}", feats[layer], "forward_fn"
    else:
        raise ValueError(f"forward must be forward_fn or a pair (features_fn, head_fn) of callables; "
                         f"got {type(forward).__name__}")
    if len(feature.shape) < 1 or feature.shape[0] != batch:
        raise ValueError(f"{name} must have the batch axis first, [batch={batch}, ...]; got shape {feature.shape}")
    if not isinstance(logits, jax.ShapeDtypeStruct) or len(logits.shape) != 2 or logits.shape[0] != batch:
        got = logits.shape if isinstance(logits, jax.ShapeDtypeStruct) else jax.tree.structure(logits)
        raise ValueError(f"{where} must return logits [batch, classes] = [{batch}, C]; got {got}")
    return LayerForward(run, logits, feature, name)


def layer_grad(split: LayerForward, x: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(d sum_b logits[b, target_b] / d feature, feature), both [batch, ...] (targets clipped into range)."""

    def f(delta):
        logits, feature = split.run(x, delta)
        t = jnp.clip(target, 0, logits.shape[1] - 1)
        return jnp.sum(jnp.take_along_axis(logits, t[:, None], axis=1)), feature

    return jax.grad(f, has_aux=True)(jnp.zeros(split.feature.shape, split.feature.dtype))


# --------------------------------------------------------------------------------------------
# Grad-CAM and occlusion
# --------------------------------------------------------------------------------------------
def grad_cam(
    forward: Forward, x: jax.Array, target: jax.Array, *, layer: str | None = None, method: str = "bilinear"
) -> jax.Array:
    """Grad-CAM on a feature map, resized to the input.

    alpha_bc = mean_{h,w} d logit_target / d A_bhwc;  L_b = ReLU(sum_c alpha_bc A_bhwc), resized to H x W.

    The gradient w.r.t. the feature map A is the gradient w.r.t. a zero delta added to it (`split_forward`).

    Args:
      forward: forward_fn(x, deltas=None) -> (logits [batch, classes], features dict) with `layer`, or a
        pair (features_fn, head_fn): features_fn(x) -> A [batch, h, w, c], head_fn(A) -> logits [batch, classes].
      x: [batch, H, W, C]. target: [batch] or [batch, K].
      layer: a feature name with shape [batch, h, w, c] (forward_fn only; None for a pair).
      method: `jax.image.resize` method.
    Returns:
      [batch, H, W] (or [batch, K, H, W]; column k equals the call with target[:, k]).
    Reference: Selvaraju et al. 2017, "Grad-CAM".
    """
    x = check_x(x)
    if x.ndim != 4:
        raise ValueError(f"grad_cam needs NHWC images x [batch, H, W, C]; got shape {x.shape}")
    split = split_forward(forward, x, layer=layer)
    if len(split.feature.shape) != 4:
        raise ValueError(f"{split.name} must be a spatial map [batch, h, w, c] for grad_cam; got shape {split.feature.shape}")
    c = int(split.logits.shape[1])
    target = validate_target(target, x.shape[0], c)

    def core(v, t):
        grads, feat = layer_grad(split, v, t)
        alpha = jnp.mean(grads, axis=(1, 2), keepdims=True)
        cam = jax.nn.relu(jnp.sum(alpha * feat, axis=-1))
        return jax.image.resize(cam, (v.shape[0],) + v.shape[1:3], method=method)

    return per_target(core, x, target, c)
