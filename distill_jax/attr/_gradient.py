"""Attributions over any pure `apply_fn(x) -> logits`, computed for a whole batch in one call.

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring);
`ig_completeness_error` scores an attribution. Grad-CAM takes a `forward` in place of `apply_fn`
(see "Feature maps" below).

Every method takes `x` (NHWC images, or any [batch, ...] array) and `target` and returns an array
shaped like `x` (Grad-CAM: [batch, H, W]). `target` is either [batch] ints (one class per example)
or [batch, K] ints (K classes per example); with K targets the output gains a K axis right after
the batch axis ([batch, K, ...]), computed by `jax.vmap` over the targets (`per_target`), so column k
equals the call with target[:, k]. A metric given [batch, K] targets takes one attribution per
target, [batch, K, ...], and returns [batch, K] (`attr._core.per_target_scored`).

Feature maps (Grad-CAM here, TCAV in analysis.py) come from a `forward` in one of two forms,
turned into one by `split_forward`:
  - `forward_fn(x, deltas=None) -> (logits, features dict)` with `layer=` naming the feature (the
    convention of the models in distill_jax.models, `models.forward_with_features`; `deltas[layer]` is added
    to that feature inside the network);
  - a pair `(features_fn, head_fn)`: `features_fn(x) -> feature [batch, ...]` and
    `head_fn(feature) -> logits [batch, classes]`, i.e. any JAX model cut in two (linen, NNX,
    Equinox, plain jnp), no `layer` needed.

Batched gradients: the methods differentiate sum_b logits[b, target_b] with respect to the whole
batch, which equals the per-example gradients when examples do not interact inside `apply_fn`
(true for every model in `distill_jax.models` in inference mode; not for batch-norm in training mode).

Bad targets: with concrete (non-traced) targets a value outside [0, num_classes) raises
`ValueError`; the class count is read from `jax.eval_shape(apply_fn, x)`. Inside `jax.jit` the
values cannot be inspected at trace time, so the attribution of an example with an out-of-range
target is set to NaN instead.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend
from distill_jax._checks import check_int, check_key, check_number
from distill_jax.attr._core import (
    ApplyFn,
    attribution_inputs,
    completeness_error,
    in_groups,
    input_grad,
    per_target,
    resolve_baseline,
    sample_chunk,
)

# --------------------------------------------------------------------------------------------
# Argument checks and shared machinery
# --------------------------------------------------------------------------------------------


def _sum_in_chunks(term_fn: Callable, items: tuple[np.ndarray, ...], total: int, chunk: int, init):
    """sum_{i < total} term_fn(*items_i), `chunk` items per `lax.scan` step, keeping only the running sum.

    term_fn maps `chunk` items (each a [chunk, ...] array) to a pytree of [chunk, ...] terms. The
    items are padded to a multiple of `chunk` by repeating the last one; padded terms are dropped.
    """
    n = -(-total // chunk)
    pad = n * chunk - total
    stacked = tuple(jnp.asarray(np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode="edge")
                                .reshape((n, chunk) + a.shape[1:])) for a in items)
    valid = jnp.asarray((np.arange(n * chunk) < total).reshape(n, chunk))

    def body(acc, inp):
        chunk_items, keep = inp
        terms = term_fn(*chunk_items)

        def add(a, term):
            mask = keep.reshape((chunk,) + (1,) * (term.ndim - 1))
            return a + jnp.sum(jnp.where(mask, term, 0), axis=0)

        return jax.tree_util.tree_map(add, acc, terms), None

    acc, _ = jax.lax.scan(body, init, (stacked, valid))
    return acc


def _grads_of_copies(apply_fn: ApplyFn, z: jax.Array, t: jax.Array) -> jax.Array:
    """grad_z logit_t for copies z [c, batch, ...] of a batch, evaluated as one batch of c*batch examples."""
    c, b = z.shape[:2]
    g = input_grad(apply_fn, z.reshape((c * b,) + z.shape[2:]), jnp.tile(t, c))
    return g.reshape(z.shape)


def _expand(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _draw_samples(draw: Callable, key: jax.Array, ids: jax.Array):
    """draw(jax.random.fold_in(key, s)) for each sample s in `ids`, stacked on a leading axis.

    A `lax.map`, not a `vmap`: the "rbg" key types give different numbers when vmapped, and each
    sample must get the same numbers whatever chunk it falls in.
    """
    return jax.lax.map(lambda s: draw(jax.random.fold_in(key, s)), ids)


def _range_sigma(x: jax.Array, noise: float) -> jax.Array:
    """sigma_b = noise * (max x_b - min x_b), shaped to broadcast against x (as attr.smoothgrad)."""
    flat = x.reshape(x.shape[0], -1)
    return _expand(noise * (flat.max(axis=1) - flat.min(axis=1)), x.ndim)


def _standard_normal(key: jax.Array, x: jax.Array) -> jax.Array:
    # drawn flat and reshaped: XLA:CPU compiles the generator for a 1-D shape several times faster
    return jax.random.normal(key, (x.size,), x.dtype).reshape(x.shape)


def _gaussian_noise(key_s: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """The noise e_s ~ N(0, sigma_b^2) of one sample (key_s = jax.random.fold_in(key, s)), shaped like x."""
    return _standard_normal(key_s, x) * sigma


def _shap_draw(key_s: jax.Array, x: jax.Array, num_baselines: int, noise: float):
    """One expected-gradients sample for every example: (baseline index [batch], alpha [batch], noise like x).

    key_s splits into (k_uniform, k_noise); u = uniform(k_uniform, (2 * batch,)) gives the index
    floor(u[:batch] * m) and alpha = u[batch:]; the noise is noise * normal(k_noise, (x.size,)).
    (One uniform draw instead of randint + uniform: XLA:CPU compiles it about twice as fast.)
    """
    k_uniform, k_noise = jax.random.split(key_s)
    batch = x.shape[0]
    u = jax.random.uniform(k_uniform, (2 * batch,), x.dtype)
    index = jnp.minimum(jnp.floor(u[:batch] * num_baselines).astype(jnp.int32), num_baselines - 1)
    eps = _standard_normal(k_noise, x) * noise if noise > 0 else jnp.zeros_like(x)
    return index, u[batch:], eps


def _copy_bytes(x: jax.Array, target: jax.Array) -> int:
    """Bytes one sample sends through apply_fn: a copy of the batch per target (`per_target` vmaps over K)."""
    return backend.bytes_of(x, 1 if target.ndim == 1 else target.shape[1])


def _check_sampling(samples, noise, chunk, key, sample_bytes: int) -> tuple[int, float, int, jax.Array]:
    samples = check_int(samples, "samples")
    noise = check_number(noise, "noise", low=0.0)
    return samples, noise, sample_chunk(chunk, samples, sample_bytes=sample_bytes), check_key(key)


# --------------------------------------------------------------------------------------------
# Expected gradients (GradientSHAP)
# --------------------------------------------------------------------------------------------
def _check_baselines(baselines: Any, x: jax.Array) -> jax.Array:
    if baselines is None:
        return jnp.zeros((1,) + x.shape[1:], x.dtype)
    b = jnp.asarray(baselines)
    if b.shape == x.shape[1:]:
        b = b[None]
    if b.ndim != x.ndim or b.shape[1:] != x.shape[1:] or b.shape[0] < 1:
        raise ValueError(f"baselines must have shape [m, {', '.join(map(str, x.shape[1:]))}] (m >= 1 examples shaped "
                         f"like one example of x) or {tuple(x.shape[1:])}; got shape {tuple(b.shape)}")
    return b.astype(x.dtype)


def gradient_shap(
    apply_fn: ApplyFn,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    baselines: Any = None,
    samples: int = 32,
    noise: float = 0.0,
    chunk: int | None = None,
) -> jax.Array:
    """GradientSHAP / expected gradients: IG averaged over random baselines and random path points.

    A_b = (1/n) sum_s (x~_bs - r_bs) * grad f(r_bs + alpha_bs (x~_bs - r_bs)),   f = logit_target,
    r_bs drawn uniformly from `baselines`, alpha_bs ~ U(0, 1), x~_bs = x_b + e_bs, e_bs ~ N(0, noise^2)
    (absolute std, as Captum's `stdevs`), independently per example and sample. Since
    E_alpha[(x - r) . grad f(r + alpha (x - r))] = f(x) - f(r) for any differentiable f, completeness
    holds in expectation: E[sum_i A_bi] = E[f(x~_b)] - E[f(r)]; for a linear f it holds exactly for the
    drawn samples: sum_i A_bi = (1/n) sum_s (f(x~_bs) - f(r_bs)).

    Sample s is drawn from jax.random.fold_in(key, s) (see `_shap_draw`), so every `chunk` gives
    the same values.

    Args:
      apply_fn: pure x -> logits [batch, classes].
      x: [batch, ...]. target: [batch] or [batch, K].
      key: PRNG key (the only source of randomness).
      baselines: [m, ...] reference examples shaped like one example of x (a data sample, the
        "background"), or one example [...]; None means a single all-zeros baseline.
      samples: n >= 1 draws per example. noise: std of the Gaussian added to x (>= 0).
      chunk: samples per `lax.scan` step (None: the backend default of `sample_chunk`).
    Returns:
      like x (or [batch, K, ...]).
    References: Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions";
      Erion et al. 2021, "Improving performance of deep learning models with axiomatic attribution
      priors and expected gradients".
    """
    x, target, c = attribution_inputs(apply_fn, x, target)
    samples, noise, chunk, key = _check_sampling(samples, noise, chunk, key, _copy_bytes(x, target))
    refs = _check_baselines(baselines, x)

    def core(v, t):
        def terms(ids):
            index, alpha, eps = _draw_samples(lambda k: _shap_draw(k, v, refs.shape[0], noise), key, ids)
            start = refs[index]  # [chunk, batch, ...]
            diff = v[None] + eps - start
            return diff * _grads_of_copies(apply_fn, start + _expand(alpha, diff.ndim) * diff, t)

        return _sum_in_chunks(terms, (np.arange(samples),), samples, chunk, jnp.zeros_like(v)) / samples

    return per_target(core, x, target, c)


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
    x, target, c = attribution_inputs(apply_fn, x, target)

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
    x, target, c = attribution_inputs(apply_fn, x, target)
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
    scratch memory shrinks with the group size, for some more time (benchmarks/RESULTS.md).
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
    x, target, c = attribution_inputs(apply_fn, x, target)
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
        return attr, completeness_error(apply_fn, v, base, t, attr, eps)

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
