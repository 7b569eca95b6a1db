"""Layers and their implementations per backend: the 3x3 convolution (XLA's convolution or
patches and a matmul) and 2x2 max pooling, chosen in `distill_jax.backend`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax import backend

Features = dict[str, jax.Array]


def _patches(x: jax.Array) -> jax.Array:
    """[batch, h, w, c] -> [batch, h, w, 9 c]: the 3x3 SAME neighbourhood of every pixel, (dy, dx, c) order."""
    _, h, w, _ = x.shape
    x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([x_pad[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)], axis=-1)


def conv3x3_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 SAME convolution as one matrix product over shifted-slice patches.

    y[n, i, j, :] = sum_{dy, dx, c} x_pad[n, i + dy, j + dx, c] * kernel[dy, dx, c, :]

    Args:
      x: [batch, h, w, c_in].
      kernel: [3, 3, c_in, c_out] (the `nn.Conv` layout).
    Returns:
      [batch, h, w, c_out].
    """
    return _patches(x) @ kernel.reshape(9 * x.shape[-1], -1)


def conv3x3_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reference 3x3 SAME convolution (`lax.conv_general_dilated`); same shapes as `conv3x3_patches`."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def chunk_size(batch: int, target: int) -> int:
    """The smallest divisor of `batch` that is at least `target` (`batch` itself when none is smaller)."""
    return next(c for c in range(max(1, min(target, batch)), batch + 1) if batch % c == 0)


def conv3x3_filter_grad(x: jax.Array, grad_y: jax.Array, chunk: int) -> jax.Array:
    """The filter gradient of `conv3x3_lax`, as patch matrix products summed over groups of images.

    dkernel[dy, dx, c, o] = sum_{n, i, j} x_pad[n, i + dy, j + dx, c] * grad_y[n, i, j, o]
                          = sum over groups G of  patches(x_G)^T @ grad_y_G

    Each group holds `chunk_size(batch, chunk)` images, so one group's patches ([group h w, 9 c_in])
    stay small; the sum runs in at least float32 whatever the compute dtype. Group g takes images g,
    g + s, g + 2s, ... (s groups): an image-sharded batch keeps every device busy in every group.

    Args:
      x: [batch, h, w, c_in]; grad_y: [batch, h, w, c_out]; chunk: images per group at least.
    Returns:
      [3, 3, c_in, c_out], in x's dtype.
    """
    batch, h, w, c_in = x.shape
    c_out = grad_y.shape[-1]
    groups = batch // chunk_size(batch, chunk)
    sum_dtype = jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 products are summed in float32

    def interleave(a):  # [batch, ...] -> [groups, batch / groups, ...], group g = images g, g + groups, ...
        return jnp.swapaxes(a.reshape(batch // groups, groups, *a.shape[1:]), 0, 1)

    def add_group(total, group):
        x_g, grad_g = group
        p = _patches(x_g).reshape(-1, 9 * c_in)
        return total + jnp.matmul(p.T, grad_g.reshape(-1, c_out), preferred_element_type=sum_dtype), None

    total = jnp.zeros((9 * c_in, c_out), sum_dtype)
    total, _ = jax.lax.scan(add_group, total, (interleave(x), interleave(grad_y)))
    return total.reshape(3, 3, c_in, c_out).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_grouped_filter_grad(x: jax.Array, kernel: jax.Array, chunk: int) -> jax.Array:
    """`conv3x3_lax` whose backward computes the filter gradient with `conv3x3_filter_grad` (groups of
    `chunk` images) and the input gradient as XLA's convolution of grad_y with the flipped kernel:

        dx = conv3x3(grad_y, kernel[::-1, ::-1].swap(c_in, c_out))

    Same values as `conv3x3_lax` and its gradients to float32 rounding. Reverse mode only (a custom
    VJP: `jax.jvp` is not defined); its backward is itself differentiable, so gradients of input
    gradients (saliency matching) work. XLA:CPU ran the 14x14x64->64 filter gradient of SeedCNN
    3.2x faster this way at batch 256, and SeedCNN's whole gradient 1.6-1.8x faster
    (benchmarks/RESULTS.md, "Train step: where XLA:CPU lost to PyTorch").
    """
    return conv3x3_lax(x, kernel)


def _grouped_fwd(x, kernel, chunk):
    return conv3x3_lax(x, kernel), (x, kernel)


def _grouped_bwd(chunk, residuals, grad_y):
    x, kernel = residuals
    grad_x = conv3x3_lax(grad_y, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    return grad_x, conv3x3_filter_grad(x, grad_y, chunk)


conv3x3_grouped_filter_grad.defvjp(_grouped_fwd, _grouped_bwd)


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The `"lax_conv"` impl: XLA's convolution, with the filter gradient the backend runs fastest
    (`backend.choices().conv_filter_grad_chunk`: grouped patch products on CPU, XLA's own elsewhere)."""
    chunk = backend.choices().conv_filter_grad_chunk
    return conv3x3_lax(x, kernel) if chunk is None else conv3x3_grouped_filter_grad(x, kernel, chunk)


def max_pool_slices(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, SAME padding, as the max of the four strided views of each window.

    y = max(max(x[2i, 2j], x[2i, 2j+1]), max(x[2i+1, 2j], x[2i+1, 2j+1]))

    Same values and shapes as `max_pool_lax`. Its backward is elementwise selects and strided pads,
    which XLA:CPU runs faster than that of a reshape to [n, h/2, 2, w/2, 2, c] + max or
    `reduce_window`'s select-and-scatter (benchmarks/RESULTS.md has the measurements). Equal maxima share the gradient pairwise (two get half each), where
    `reduce_window` gives it all to the first; after a ReLU, ties are at 0 and get no gradient anyway.

    Args:
      x: [batch, h, w, c].
    Returns:
      [batch, ceil(h/2), ceil(w/2), c].
    """
    _, h, w, _ = x.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
    top = jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2])
    bottom = jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2])
    return jnp.maximum(top, bottom)


def max_pool_lax(x: jax.Array) -> jax.Array:
    """Reference 2x2 SAME max-pool (`reduce_window`)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


CONV_IMPLS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "lax_conv": conv3x3_xla,
    "patches": conv3x3_patches,
    "lax": conv3x3_lax,
}


POOL_IMPLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "lax_conv": max_pool_slices,
    "patches": max_pool_slices,
    "lax": max_pool_lax,
}


def forward_only(model: nn.Module) -> nn.Module:
    """The same network for a pass with no backward, as the backend's `forward_impl` (`backend.choices()`).

    The impls differ in what their *backward* pass costs; a forward pass alone runs fastest through
    XLA's convolution + `reduce_window` pool, `impl="lax"`, on XLA:CPU (benchmarks/RESULTS.md,
    distillation step), and that is XLA's own convolution on GPU/TPU as well.
    Parameters are shared, outputs equal to float32 rounding. Models without `impl` are returned as they are.
    """
    impl = getattr(model, "impl", None)
    wanted = backend.choices().forward_impl
    return model if impl is None or impl == wanted else model.clone(impl=wanted)


def for_attribution(model: nn.Module) -> nn.Module:
    """The same network (same parameters, outputs equal to float32 rounding) with the backend's attribution impl.

    Attributions run the network inside loops (integrated gradients' scan over path points,
    SmoothGrad's samples, PGD's steps, deletion curves). On CPU a `"lax_conv"` model runs as
    `"patches"`: XLA:CPU ran `lax.conv` inside a loop body about 2x slower than at the top level (an
    open XLA:CPU issue, jax-ml/jax#12868; far worse when weight gradients are taken in the loop),
    while the patch convolution's matrix products kept their speed (benchmarks/RESULTS.md).
    On GPU/TPU a `"patches"` model runs as `"lax_conv"`, XLA's own convolution (the patches move
    nine times the activation data of a 3x3 convolution). The mapping is `backend.choices().attribution_impls`; other
    impls and models without `impl` are returned as they are.
    """
    return _run_as(model, backend.choices().attribution_impls)


def for_queries(model: nn.Module) -> nn.Module:
    """The same network with the impl `queries.ModelQueries` runs it with: `backend.choices().query_impls`.

    The queries call the network at the top level of a program (no loop around it), where XLA:CPU's
    own convolution compiled in about half the time of the patch convolution; on GPU/TPU a
    `"patches"` model runs as `"lax_conv"`, as for attributions.
    """
    return _run_as(model, backend.choices().query_impls)


def _run_as(model: nn.Module, impls: tuple[tuple[str, str], ...]) -> nn.Module:
    """`model` with its impl replaced as the (from, to) pairs say (unchanged when none applies or it has no impl)."""
    impl = getattr(model, "impl", None)
    wanted = dict(impls).get(impl, impl)
    return model if impl is None or wanted == impl else model.clone(impl=wanted)


def _check_impl(impl: str) -> None:
    if impl not in CONV_IMPLS:
        raise ValueError(f"impl={impl!r} is not known; use one of {sorted(CONV_IMPLS)}")


class Conv3x3(nn.Module):
    """3x3 SAME convolution with bias; parameters `kernel` [3, 3, c_in, c_out] and `bias` [c_out]."""

    features: int
    impl: str = "lax_conv"
    dtype: Any = jnp.float32  # compute dtype; the parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return CONV_IMPLS[self.impl](x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def _with_delta(name: str, value: jax.Array, deltas: Features | None, features: Features) -> jax.Array:
    """Adds `deltas[name]` (if given) to `value`, records it under `name`, and returns it."""
    if deltas is not None and name in deltas:
        value = value + deltas[name]
    features[name] = value
    return value


def _check_images(x: jax.Array, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects images [batch, h, w, c]; got x with shape {x.shape}")


def _check_deltas(deltas: Features | None, features: Features, model: str) -> None:
    unknown = sorted(set(deltas or {}) - set(features))
    if unknown:
        raise ValueError(f"{model} has no feature(s) {unknown} for deltas; it has {sorted(features)}")


def _output(logits: jax.Array, features: Features, deltas: Features | None, return_features: bool, model: str):
    _check_deltas(deltas, features, model)
    return (logits, features) if return_features else logits
