"""The contract every attribution and attribution metric shares, and the helpers they build on.

Argument convention (one order everywhere; this is the one place it is spelled out, the
other modules point here). An attribution method is `method(apply_fn, x, target, *, options)` with
`apply_fn` any pure `x -> logits [batch, classes]`, `x` a float array [batch, ...] (NHWC images in
this library) and `target` [batch] ints or [batch, K] ints (K classes per example; the result gains
a K axis after the batch axis). A metric that scores an attribution is `metric(apply_fn, x,
attribution, target, *, options) -> [batch]`. Functions of two models take `(student..., teacher...)`:
the student's arguments first, then the teacher's, then labels (`losses.kd_loss(student_logits,
teacher_logits)`). Options and hyper-parameters are keyword-only.

This module holds the checks of those arguments (scalar options and PRNG keys are checked by
`distill_jax._checks`; one message per mistake, raised before JAX traces anything), the batched target-logit gradient, baselines (zeros, blur,
constants, arrays) and `in_groups`, the memory bound used by every method that evaluates many
perturbed copies of a batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend

ApplyFn = Callable[[jax.Array], jax.Array]


ForwardFn = Callable[..., tuple[jax.Array, dict]]


def is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


def validate_target(target: Any, batch: int, num_classes: int, *, name: str = "target") -> jax.Array:
    """Checks `target` ([batch] or [batch, K] ints in [0, num_classes)) and returns it as int32.

    Raises ValueError naming `name` for a wrong shape, a non-integer dtype, or (when the values are
    concrete) a value outside [0, num_classes). Traced values are only shape-checked.
    """
    target = jnp.asarray(target)
    if target.ndim not in (1, 2) or target.shape[0] != batch:
        raise ValueError(f"{name} must have shape [batch] or [batch, K] with batch={batch}; got shape {target.shape}")
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer class indices; got dtype {target.dtype}")
    if is_concrete(target) and target.size:
        values = np.asarray(target)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} values must lie in [0, {num_classes}) (the logits have {num_classes} classes); "
                f"got values in [{lo}, {hi}]"
            )
    return target.astype(jnp.int32)


def num_classes_of(apply_fn: ApplyFn, x: jax.Array) -> int:
    out = jax.eval_shape(apply_fn, x)
    if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"apply_fn must return logits [batch, classes] = [{x.shape[0]}, C]; got shape {out.shape}")
    return int(out.shape[1])


def check_x(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array [batch, ...]; got shape {x.shape} dtype {x.dtype}")
    return x


def attribution_inputs(apply_fn: ApplyFn, x, target) -> tuple[jax.Array, jax.Array, int]:
    """The opening every attribution method and metric shares: `x` checked ([batch, ...] floating),
    the number of classes read from `jax.eval_shape(apply_fn, x)`, `target` validated against it.

    Returns:
      `(x, target, num_classes)`: x as an array, target [batch] or [batch, K] int32, the class count.
    """
    x = check_x(x)
    num_classes = num_classes_of(apply_fn, x)
    return x, validate_target(target, x.shape[0], num_classes), num_classes


def mask_invalid(attr: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
    """NaN for examples whose (traced) target is out of range; the identity otherwise."""
    valid = (target >= 0) & (target < num_classes)
    return jnp.where(valid.reshape(valid.shape + (1,) * (attr.ndim - 1)), attr, jnp.nan)


def per_target(core: Callable, x: jax.Array, target: jax.Array, num_classes: int, **kw):
    """Runs `core(x, target_1d, **kw)` for [batch] targets, or vmaps it over the K axis of [batch, K]."""

    def one(t):
        out = core(x, t, **kw)
        if isinstance(out, tuple):
            return tuple(mask_invalid(o, t, num_classes) for o in out)
        return mask_invalid(out, t, num_classes)

    if target.ndim == 1:
        return one(target)
    return jax.vmap(one, in_axes=1, out_axes=1)(target)


def target_logits(apply_fn: ApplyFn, x: jax.Array, target: jax.Array) -> jax.Array:
    """logits[b, target_b] -> [batch] (targets are clipped into range; see `mask_invalid`)."""
    logits = apply_fn(x)
    t = jnp.clip(target, 0, logits.shape[1] - 1)
    return jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]


def input_grad(apply_fn: ApplyFn, x: jax.Array, target: jax.Array) -> jax.Array:
    return jax.grad(lambda v: jnp.sum(target_logits(apply_fn, v, target)))(x)


def gaussian_blur(x: jax.Array, *, sigma: float = 5.0, truncate: float = 3.0) -> jax.Array:
    """Separable Gaussian blur over the spatial axes of NHWC images (edges: reflect padding).

    k(t) ∝ exp(-t^2 / (2 sigma^2)), |t| <= r = min(ceil(truncate * sigma), size - 1), normalised over the
    taps applied (sum_t k(t) = 1, so a constant image stays constant even when the image is smaller than
    the kernel), applied along H then W per channel.

    Args:
      x: [batch, H, W, C] images. sigma: standard deviation in pixels (> 0).
    Returns:
      [batch, H, W, C] blurred images (the blurred-input baseline of Sturmfels et al. 2020,
      "Visualizing the Impact of Feature Attribution Baselines", Distill).
    """
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur needs NHWC images [batch, H, W, C]; got shape {x.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    radius = int(np.ceil(truncate * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k = jnp.asarray(k / k.sum(), x.dtype)

    def blur_axis(v, axis):
        size = v.shape[axis]
        r = min(radius, size - 1)
        pad = [(0, 0)] * v.ndim
        pad[axis] = (r, r)
        v = jnp.pad(v, pad, mode="reflect") if r > 0 else v
        kk = k[radius - r : radius + r + 1]
        kk = kk / jnp.sum(kk)  # an image smaller than the kernel keeps only part of it: renormalise
        # sum of shifted slices: cheap for the small kernels used here, and differentiable
        out = 0.0
        for i in range(2 * r + 1):
            out = out + kk[i] * jax.lax.slice_in_dim(v, i, i + size, axis=axis)
        return out

    return blur_axis(blur_axis(x, 1), 2)


def _baseline_zeros(x, **_):
    return jnp.zeros_like(x)


def _baseline_blur(x, *, blur_sigma: float = 5.0, **_):
    return gaussian_blur(x, sigma=blur_sigma)


BASELINES: dict[str, Callable[..., jax.Array]] = {"zeros": _baseline_zeros, "blur": _baseline_blur}


def resolve_baseline(x: jax.Array, baseline: Any, **kw) -> jax.Array:
    if baseline is None:
        return jnp.zeros_like(x)
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be None, an array like x, or one of {sorted(BASELINES)}; got {baseline!r}")
        return BASELINES[baseline](x, **kw)
    if isinstance(baseline, (int, float)):
        return jnp.full_like(x, baseline)
    b = jnp.asarray(baseline, x.dtype)
    if b.shape == x.shape[1:]:
        b = jnp.broadcast_to(b, x.shape)
    if b.shape != x.shape:
        raise ValueError(
            f"baseline must have the shape of x {x.shape} (or of one example {x.shape[1:]}); got shape {b.shape}"
        )
    return b


def in_groups(fn: Callable, group: int, *arrays: jax.Array) -> jax.Array:
    """fn(*arrays) computed `group` examples at a time (`lax.map`); the batch is zero-padded to a multiple."""
    batch = arrays[0].shape[0]
    if group >= batch:
        return fn(*arrays)
    n = -(-batch // group)
    pad = n * group - batch

    def split(a):
        a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))
        return a.reshape((n, group) + a.shape[1:])

    out = jax.lax.map(lambda args: fn(*args), tuple(split(a) for a in arrays))
    return out.reshape((n * group,) + out.shape[2:])[:batch]


def sample_chunk(chunk: int | None, samples: int, *, sample_bytes: int | None = None) -> int:
    """How many perturbation samples one `lax.map` step evaluates: `chunk`, or the backend's default.

    The default comes from `backend.choices()`: 8 on CPU (a few copies of the batch keep the scratch
    memory small at no cost in speed; benchmarks/RESULTS.md); on GPU/TPU as many samples as fit in its
    byte budget when `sample_bytes` is given, else 64 (accelerators need large batches to be busy).

    Args:
      chunk: None (the backend's default) or an int >= 1.
      samples: the total number of samples (the result never exceeds it).
      sample_bytes: bytes of the inputs one sample sends through the network (usually the batch's), or None.
    Returns:
      an int in [1, samples].
    Raises:
      ValueError: chunk is not None and not an integer >= 1.
    """
    if chunk is None:
        picked = backend.choices()
        return picked.chunk(samples, picked.sample_chunk, sample_bytes)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be None or an integer >= 1; got {chunk!r}")
    return max(1, min(int(chunk), int(samples)))






def check_attribution(attribution: Any, x: jax.Array, *, name: str = "attribution") -> jax.Array:
    """`attribution` as an array shaped like `x` (or like NHWC `x` without its channel axis, broadcast over it).

    Raises:
      ValueError: naming both shapes when they do not fit.
    """
    a = jnp.asarray(attribution)
    if a.shape == x.shape:
        return a.astype(x.dtype) if not jnp.issubdtype(a.dtype, jnp.floating) else a
    if x.ndim == 4 and a.shape == x.shape[:3]:
        return jnp.broadcast_to(a[..., None], x.shape).astype(jnp.result_type(a.dtype, jnp.float32))
    raise ValueError(f"{name} must have the shape of x {tuple(x.shape)} (or, for NHWC images, {tuple(x.shape[:3])}); "
                     f"got {tuple(a.shape)}")


def per_target_scored(score: Callable, x: jax.Array, attribution: Any, target: jax.Array, num_classes: int):
    """Runs a score of one attribution per target for [batch] or [batch, K] targets.

    [batch] targets: score(x, attribution, target); [batch, K] targets: the same for every column,
    score(x, attribution[:, k], target[:, k]), stacked on axis 1 (`jax.vmap` over the K axis of the
    attribution and the target; parts of `score` that depend on neither, e.g. f(x), run once). Both
    go through `attr._core.per_target`, which sets the result of an out-of-range (traced)
    target to NaN.

    Args:
      score: score(x, attribution_1, target_1d) -> an array [batch, ...] or a tuple of them.
      x: [batch, ...]. attribution: what `score` takes for [batch] targets; [batch, K, ...] for
        [batch, K] targets. target: validated [batch] or [batch, K] ints.
      num_classes: the number of logits.
    Returns:
      what score returns ([batch, ...]), with a K axis after the batch axis for [batch, K] targets.
    Raises:
      ValueError: a [batch, K] target whose attribution is not [batch, K, ...].
    """
    attribution = jnp.asarray(attribution)
    if target.ndim == 1:
        return per_target(lambda v, t: score(v, attribution, t), x, target, num_classes)
    if attribution.ndim < 2 or attribution.shape[:2] != target.shape:
        raise ValueError(f"attribution must be [batch, K, ...] with [batch, K] = {tuple(target.shape)} (one map per "
                         f"target of a [batch, K] target); got shape {tuple(attribution.shape)}")

    def column(a, t):
        return per_target(lambda v, tt: score(v, a, tt), x, t, num_classes)

    return jax.vmap(column, in_axes=(1, 1), out_axes=1)(attribution, target)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b in HIGHEST precision: every product here feeds a reported number (bf16 / TF32 passes would
    cost about three digits on TPU and A100/H100; on CPU it changes nothing)."""
    return jnp.matmul(a, b, precision=backend.HIGHEST)


def completeness_error(apply_fn, x, base, t, attr, eps):
    """|sum_i attr_bi - (f(x_b) - f(base_b))| / max(|f(x_b) - f(base_b)|, eps) with f = the logit of target t_b;
    x, base, attr: [batch, ...], t: [batch] -> [batch] (Sundararajan et al. 2017, Proposition 1)."""
    delta = target_logits(apply_fn, x, t) - target_logits(apply_fn, base, t)
    total = jnp.sum(attr.reshape(attr.shape[0], -1), axis=1)
    return jnp.abs(total - delta) / jnp.maximum(jnp.abs(delta), eps)
