"""Attributions over any pure `apply_fn(x) -> logits`, computed for a whole batch in one call.

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring);
`ig_completeness_error` scores an attribution. Grad-CAM takes a `forward` in place of `apply_fn`
(see "Feature maps" below).

Every method takes `x` (NHWC images, or any [batch, ...] array) and `target` and returns an array
shaped like `x` (Grad-CAM: [batch, H, W]). `target` is either [batch] ints (one class per example)
or [batch, K] ints (K classes per example); with K targets the output gains a K axis right after
the batch axis ([batch, K, ...]), computed by `jax.vmap` over the targets (`per_target`), so column k
equals the call with target[:, k]. A metric given [batch, K] targets takes one attribution per
target, [batch, K, ...], and returns [batch, K] (`attribution_core.per_target_scored`).

Feature maps (Grad-CAM here, TCAV in analysis.py) come from a `forward` in one of two forms,
turned into one by `split_forward`:
  - `forward_fn(x, deltas=None) -> (logits, features dict)` with `layer=` naming the feature (the
    convention of the models in models.py, `models.forward_with_features`; `deltas[layer]` is added
    to that feature inside the network);
  - a pair `(features_fn, head_fn)`: `features_fn(x) -> feature [batch, ...]` and
    `head_fn(feature) -> logits [batch, classes]`, i.e. any JAX model cut in two (linen, NNX,
    Equinox, plain jnp), no `layer` needed.

Batched gradients: the methods differentiate sum_b logits[b, target_b] with respect to the whole
batch, which equals the per-example gradients when examples do not interact inside `apply_fn`
(true for every model in `models.py` in inference mode; not for batch-norm in training mode).

Bad targets: with concrete (non-traced) targets a value outside [0, num_classes) raises
`ValueError`; the class count is read from `jax.eval_shape(apply_fn, x)`. Inside `jax.jit` the
values cannot be inspected at trace time, so the attribution of an example with an out-of-range
target is set to NaN instead.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend
from distill_jax.attribution_core import (  # noqa: F401 - gaussian_blur, validate_target, BASELINES are public here
    BASELINES, ApplyFn, ForwardFn, check_x, gaussian_blur, in_groups, input_grad, num_classes_of,
    per_target, per_target_scored, resolve_baseline, target_logits, validate_target,
)
# methods kept in modules of their own, re-exported: `explain.<method>` is the public name
from distill_jax.gradient_attributions import blur_ig, gradient_shap, guided_ig, smoothgrad_squared, vargrad
from distill_jax.perturbation_attributions import feature_ablation, kernel_shap, lime, rise

__all__ = [
    "METHODS",
    "IG_RULES",
    "LayerForward",
    "attribute",
    "blur_ig",
    "feature_ablation",
    "gaussian_blur",
    "gradient_shap",
    "guided_ig",
    "kernel_shap",
    "lime",
    "rise",
    "smoothgrad_squared",
    "vargrad",
    "grad_cam",
    "grad_x_input",
    "integrated_gradients",
    "ig_completeness_error",
    "layer_grad",
    "occlusion",
    "occlusion_masks",
    "path_rule",
    "saliency",
    "smoothgrad",
    "split_forward",
    "validate_target",
]


# --------------------------------------------------------------------------------------------
# Gradient methods
# --------------------------------------------------------------------------------------------
def saliency(apply_fn: ApplyFn, x: jax.Array, target: jax.Array, *, absolute: bool = True) -> jax.Array:
    """Gradient saliency map.

    S(x) = d logit_target(x) / dx   (|S| when `absolute`).

    Args:
      apply_fn: pure function x -> logits [batch, classes].
      x: [batch, ...] inputs. target: [batch] or [batch, K] class indices.
      absolute: return the absolute value (Simonyan et al.) or the signed gradient.
    Returns:
      like x ([batch, K, ...] for [batch, K] targets).
    Reference: Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks".
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)

    def core(v, t):
        g = input_grad(apply_fn, v, t)
        return jnp.abs(g) if absolute else g

    return per_target(core, x, target, c)


def grad_x_input(apply_fn: ApplyFn, x: jax.Array, target: jax.Array) -> jax.Array:
    """Gradient times input.

    A(x) = x * d logit_target(x) / dx

    Args/Returns: as `saliency`.
    Reference: Shrikumar et al. 2016, "Not Just a Black Box".
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    return per_target(lambda v, t: v * input_grad(apply_fn, v, t), x, target, c)


# --- integrated gradients --------------------------------------------------------------------
def _rule_trapezoid(steps: int):
    if steps < 2:
        raise ValueError(f"steps must be >= 2 for method='riemann_trapezoid'; got {steps}")
    a = np.linspace(0.0, 1.0, steps)
    w = np.full(steps, 1.0 / (steps - 1))
    w[0] = w[-1] = 0.5 / (steps - 1)
    return a, w


def _rule_gauss_legendre(steps: int):
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1.0) / 2.0, weights / 2.0


def _rule_riemann(offset: float):
    def rule(steps: int):
        return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)

    return rule


IG_RULES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "riemann_trapezoid": _rule_trapezoid,  # `steps` points incl. both ends (as Captum)
    "gauss_legendre": _rule_gauss_legendre,  # exact for polynomial integrands of degree 2*steps-1
    "riemann_left": _rule_riemann(0.0),
    "riemann_right": _rule_riemann(1.0),
    "riemann_middle": _rule_riemann(0.5),
}


def path_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes alpha_i in [0, 1] and weights w_i (sum 1) for integrating over the IG path."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if method not in IG_RULES:
        raise ValueError(f"method must be one of {sorted(IG_RULES)}; got {method!r}")
    return IG_RULES[method](int(steps))


def integrated_gradients(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    baseline: Any = None,
    steps: int = 64,
    method: str = "riemann_trapezoid",
    chunk: int | None = None,
    batch_chunk: int | None = None,
    return_error: bool = False,
    blur_sigma: float = 5.0,
    eps: float = 1e-9,
):
    """Integrated gradients, accumulated over the path so memory does not grow with `steps`.

    IG_i(x) = (x_i - x'_i) * int_0^1 d f(x' + a (x - x')) / d x_i da
            ~ (x_i - x'_i) * sum_s w_s grad_i f(x' + a_s (x - x')),   f = logit_target.

    The `steps` path points are visited `chunk` at a time by `lax.scan` (the `chunk` points of one
    scan step go through `apply_fn` as one batch of chunk*batch examples); only the running sum is
    kept, in HIGHEST matmul precision. The defaults come from `backend.choices()`: on CPU one point
    per step (the fastest and smallest there) and the whole batch; on GPU/TPU as many points per
    step as the backend's byte budget allows, and the whole batch. With `batch_chunk`, the examples
    are further split into groups of `batch_chunk` that run one after another (`lax.map`), so the
    scratch memory shrinks with the group size; on a 2-core CPU, groups of 4 cut XLA's scratch for
    SeedCNN (16 images) from 27 MB to 8 MB at 1.2x the time (benchmarks/RESULTS.md).
    Call it inside `jax.jit` with the params as an argument, e.g.
    `jax.jit(lambda p, x, t: integrated_gradients(partial(model.apply, p), x, t))`: called eagerly,
    the scan is traced and compiled again on every call (seconds), and closed-over params would be
    baked into the compiled code as constants.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...]. target: [batch] or [batch, K].
      baseline: None (zeros), "zeros", "blur" (Gaussian-blurred x, sigma `blur_sigma`), a float,
        or an array shaped like x or like one example.
      steps: number of gradient evaluations (>= 1; >= 2 for riemann_trapezoid).
      method: a key of `IG_RULES` ("riemann_trapezoid" as Captum, "gauss_legendre", "riemann_*").
      chunk: path points per scan step (>= 1; None: the backend's default). Padding points get weight 0.
      batch_chunk: None (the backend's default: the whole batch at once) or examples per group
        (>= 1); the batch is padded to a multiple of it with zero inputs whose results are dropped.
        Needs examples that do not interact inside `apply_fn` (see the module docstring).
      return_error: also return the completeness error
        |sum_i IG_i - (f(x) - f(x'))| / max(|f(x) - f(x')|, eps), [batch] (or [batch, K]).
    Returns:
      attributions like x (or [batch, K, ...]); with return_error, (attributions, error).
    Reference: Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks".
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be None or an integer >= 1; got {chunk!r}")
    if batch_chunk is not None and (not isinstance(batch_chunk, (int, np.integer)) or batch_chunk < 1):
        raise ValueError(f"batch_chunk must be None or an integer >= 1; got {batch_chunk!r}")
    alphas, weights = path_rule(method, steps)
    picked = backend.choices()
    if batch_chunk is None:
        batch_chunk = picked.ig_batch_chunk
    group = x.shape[0] if batch_chunk is None else min(int(batch_chunk), x.shape[0])
    if chunk is None:  # one path point sends `group` examples through apply_fn for each target
        point_bytes = backend.bytes_of(x) // max(1, x.shape[0]) * group * _targets_per_example(target)
        chunk = picked.chunk(len(alphas), picked.ig_path_chunk, point_bytes)
    chunk = min(int(chunk), len(alphas))
    n_chunks = -(-len(alphas) // chunk)
    pad = n_chunks * chunk - len(alphas)
    alphas = jnp.asarray(np.pad(alphas, (0, pad)).reshape(n_chunks, chunk), x.dtype)
    weights = jnp.asarray(np.pad(weights, (0, pad)).reshape(n_chunks, chunk), x.dtype)
    base = resolve_baseline(x, baseline, blur_sigma=blur_sigma)

    def core(v, t):
        diff = v - base
        acc = in_groups(lambda b, d, tt: _ig_path_sum(apply_fn, b, d, tt, alphas, weights), group, base, diff, t)
        attr = diff * acc
        if not return_error:
            return attr
        return attr, _completeness(apply_fn, v, base, t, attr, eps)

    return per_target(core, x, target, c)


def _ig_path_sum(apply_fn, base, diff, t, alphas, weights):
    """sum_s w_s grad f(base + a_s diff) for [n_chunks, chunk] nodes/weights, one scan step per chunk."""
    chunk = alphas.shape[1]
    tiled_t = jnp.tile(t, chunk)
    shape = (chunk, 1) + (1,) * (diff.ndim - 1)

    def body(acc, aw):
        a, w = aw
        path = (base[None] + a.reshape(shape) * diff[None]).reshape((chunk * diff.shape[0],) + diff.shape[1:])
        g = input_grad(apply_fn, path, tiled_t).reshape((chunk,) + diff.shape)
        return acc + jnp.tensordot(w, g, axes=1, precision=backend.HIGHEST), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(diff), (alphas, weights))
    return acc


def _targets_per_example(target: jax.Array) -> int:
    """K for [batch, K] targets (`per_target` vmaps over them, K copies of the work), 1 for [batch]."""
    return 1 if target.ndim == 1 else int(target.shape[1])


def _completeness(apply_fn, x, base, t, attr, eps):
    delta = target_logits(apply_fn, x, t) - target_logits(apply_fn, base, t)
    total = jnp.sum(attr.reshape(attr.shape[0], -1), axis=1)
    return jnp.abs(total - delta) / jnp.maximum(jnp.abs(delta), eps)


def ig_completeness_error(
    apply_fn: ApplyFn,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    baseline: Any = None,
    blur_sigma: float = 5.0,
    eps: float = 1e-9,
) -> jax.Array:
    """Relative completeness error of a path attribution.

    err_b = |sum_i A_bi - (f(x_b) - f(x'_b))| / max(|f(x_b) - f(x'_b)|, eps),   f = logit_target.

    Args:
      apply_fn: pure x -> logits [batch, classes]. x: [batch, ...].
      attribution: like x for [batch] targets ([batch, K, ...] for [batch, K] targets).
      target: [batch] or [batch, K] class indices.
      baseline, blur_sigma: the baseline x' (as `integrated_gradients`). eps: floor of the denominator.
    Returns:
      [batch] (or [batch, K]).
    Reference: Sundararajan et al. 2017 (the completeness axiom).
    """
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    base = resolve_baseline(x, baseline, blur_sigma=blur_sigma)

    def score(v, a, t):
        if a.shape != v.shape:
            raise ValueError(f"attribution must have the shape of x {tuple(v.shape)} (one map per target); "
                             f"got {tuple(a.shape)}")
        return _completeness(apply_fn, v, base, t, a, eps)

    return per_target_scored(score, x, jnp.asarray(attribution), target, c)


# --------------------------------------------------------------------------------------------
# SmoothGrad
# --------------------------------------------------------------------------------------------
def smoothgrad(
    method_fn: Callable,
    apply_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 16,
    noise: float = 0.15,
    chunk: int = 1,
    **method_kw,
) -> jax.Array:
    """SmoothGrad around any attribution method.

    SG(x) = (1/n) sum_{s=1..n} M(x + e_s),  e_s ~ N(0, sigma_b^2),  sigma_b = noise * (max x_b - min x_b).

    Samples are processed `chunk` at a time by `lax.scan` (each chunk as one batch of chunk*batch
    examples), so memory does not grow with `samples`.

    Args:
      method_fn: e.g. `saliency`, `integrated_gradients`, or `grad_cam` (then `apply_fn` is its
        `forward`: forward_fn with `layer=` in `method_kw`, or a (features_fn, head_fn) pair);
        called as method_fn(apply_fn, x, target, **method_kw).
      key: PRNG key for the noise. samples: n >= 1. noise: fraction of each example's value range.
    Returns:
      what method_fn returns for x (like x, [batch, K, ...], or [batch, H, W] for grad_cam).
    Reference: Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise".
    """
    x = check_x(x)
    if not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0 (a fraction of the input range); got {noise}")
    target = jnp.asarray(target)
    chunk = min(int(chunk), int(samples))
    n_chunks = -(-samples // chunk)
    batch = x.shape[0]
    flat = x.reshape(batch, -1)
    sigma = (noise * (flat.max(axis=1) - flat.min(axis=1))).reshape((batch,) + (1,) * (x.ndim - 1))
    counts = jnp.asarray(np.minimum(chunk, samples - chunk * np.arange(n_chunks)), x.dtype)  # real samples per chunk
    keys = jax.random.split(key, n_chunks)
    big_target = jnp.concatenate([target] * chunk, axis=0)
    # a traced mask of "real" samples: padding samples in the last chunk get weight 0
    sample_valid = jnp.arange(chunk)[None, :] < counts[:, None]

    def body(acc, inp):
        k, valid = inp
        eps = jax.random.normal(k, (chunk,) + x.shape, x.dtype) * sigma[None]
        noisy = (x[None] + eps).reshape((chunk * batch,) + x.shape[1:])
        out = method_fn(apply_fn, noisy, big_target, **method_kw)
        out = out.reshape((chunk, batch) + out.shape[1:])
        w = valid.astype(out.dtype).reshape((chunk,) + (1,) * (out.ndim - 1))
        return acc + jnp.sum(w * out, axis=0), None

    out_shape = jax.eval_shape(lambda v: method_fn(apply_fn, v, target, **method_kw), x)
    acc, _ = jax.lax.scan(body, jnp.zeros(out_shape.shape, out_shape.dtype), (keys, sample_valid))
    return acc / samples


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
        raise ValueError("forward_fn must return (logits, features dict); see the model convention in explain.py")
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


def _pair(v, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(pair) != 2 or any((not isinstance(p, (int, np.integer))) or p < 1 for p in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints; got {v!r}")
    return int(pair[0]), int(pair[1])


def _window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:  # make sure the last rows/columns are covered too
        starts.append(size - patch)
    return np.asarray(starts)


def occlusion_masks(image_hw: tuple[int, int], patch: int | tuple[int, int], stride: int | tuple[int, int]) -> np.ndarray:
    """The windows of `occlusion`: [P, H, W] bool, True inside window p.

    Windows of size `patch` start every `stride` rows/columns, plus a last one flush with the border.
    """
    (ph, pw), (sh, sw) = _pair(patch, "patch"), _pair(stride, "stride")
    height, width = image_hw
    if ph > height or pw > width:
        raise ValueError(f"patch {(ph, pw)} must fit in the image {(height, width)}")
    ys, xs = _window_starts(height, ph, sh), _window_starts(width, pw, sw)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    rows, cols = np.arange(height), np.arange(width)
    return ((rows[None, :, None] >= yy.reshape(-1, 1, 1)) & (rows[None, :, None] < yy.reshape(-1, 1, 1) + ph)) & (
        (cols[None, None, :] >= xx.reshape(-1, 1, 1)) & (cols[None, None, :] < xx.reshape(-1, 1, 1) + pw)
    )


def occlusion(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    patch: int | tuple[int, int] = 4,
    stride: int | tuple[int, int] = 2,
    value: float = 0.0,
    chunk: int | None = None,
) -> jax.Array:
    """Occlusion sensitivity: how much the target logit drops when a patch is replaced by `value`.

    A_bhw = mean over windows P covering (h, w) of [f(x_b) - f(x_b with P set to value)], same for every channel.

    Windows of size `patch` slide with `stride` (plus a last window flush with the border). The
    windows are evaluated by `lax.map` over window positions, each on the whole batch, `chunk`
    windows at a time (default from `backend.choices()`: one on CPU; on GPU/TPU as many as its byte
    budget allows).

    Args:
      x: [batch, H, W, C]. target: [batch] or [batch, K]. patch, stride: int or (h, w).
      chunk: windows per `lax.map` step (>= 1), or None for the backend's default.
    Returns:
      like x (or [batch, K, H, W, C]).
    Reference: Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks".
    """
    x = check_x(x)
    if x.ndim != 4:
        raise ValueError(f"occlusion needs NHWC images x [batch, H, W, C]; got shape {x.shape}")
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    (ph, pw), (sh, sw) = _pair(patch, "patch"), _pair(stride, "stride")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be None or an integer >= 1; got {chunk!r}")
    masks = occlusion_masks(x.shape[1:3], (ph, pw), (sh, sw))
    masks_j = jnp.asarray(masks, x.dtype)  # [P, H, W]
    count = jnp.asarray(masks.sum(axis=0), x.dtype)  # every pixel is covered at least once
    if chunk is None:  # one window sends the batch through apply_fn once per target
        picked = backend.choices()
        chunk = picked.chunk(len(masks), picked.occlusion_chunk, backend.bytes_of(x, _targets_per_example(target)))
    windows_per_step = None if chunk == 1 else min(int(chunk), len(masks))  # None: lax.map's plain scan

    def core(v, t):
        full = target_logits(apply_fn, v, t)

        def drop(m):
            m4 = m[None, :, :, None]
            return full - target_logits(apply_fn, v * (1 - m4) + value * m4, t)

        diffs = jax.lax.map(drop, masks_j, batch_size=windows_per_step)  # [P, batch]
        heat = jnp.einsum("pb,phw->bhw", diffs, masks_j, precision=backend.HIGHEST) / count
        return jnp.broadcast_to(heat[..., None], v.shape)

    return per_target(core, x, target, c)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

def _smoothgrad_by_name(apply_fn, x, target, *, method: str | Callable = "saliency", **kw):
    fn = METHODS[method] if isinstance(method, str) else method
    return smoothgrad(fn, apply_fn, x, target, **kw)


METHODS: dict[str, Callable[..., Any]] = {
    "saliency": saliency,
    "grad_x_input": grad_x_input,
    "integrated_gradients": integrated_gradients,
    "grad_cam": grad_cam,  # takes forward (forward_fn with layer=, or (features_fn, head_fn)) instead of apply_fn
    "occlusion": occlusion,
    "smoothgrad": _smoothgrad_by_name,  # method= a METHODS name or function; key= required
    "smoothgrad_squared": smoothgrad_squared,  # key= required
    "vargrad": vargrad,  # key= required
    "gradient_shap": gradient_shap,  # key= required; baselines= a [m, ...] distribution (default: zeros)
    "guided_ig": guided_ig,
    "blur_ig": blur_ig,  # NHWC images only
    "feature_ablation": feature_ablation,
    "rise": rise,  # key= required
    "kernel_shap": kernel_shap,  # key= required unless exact=True
    "lime": lime,  # key= required
}


def attribute(name: str, apply_fn: Callable, x: jax.Array, target: jax.Array, **kw) -> Any:
    """Runs the attribution method `name` (a key of `METHODS`) with keyword options `kw`."""
    if name not in METHODS:
        raise ValueError(f"name must be one of {sorted(METHODS)}; got {name!r}")
    return METHODS[name](apply_fn, x, target, **kw)
