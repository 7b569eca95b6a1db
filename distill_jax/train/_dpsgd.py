"""DP-SGD's mechanism: per-example gradients, clipping to an L2 norm and Gaussian noise on their
sum (Abadi et al. 2016, Algorithm 1). The accounting is in `distill_jax.distill.privacy`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from distill_jax._checks import check_int, check_key, check_number

LossFn = Callable[[Any, Any], jax.Array]  # (params, batch) -> per-example losses [batch]


def per_example_value_and_grad(loss_fn: Callable, params, batch, *, key: jax.Array | None = None):
    """Every example's loss, aux and gradient from one pass (`jax.vmap(jax.value_and_grad(..., has_aux=True))`).

    (l_i, aux_i), g_i = value_and_grad(loss_fn, has_aux=True)(params, batch[i:i+1], k_i),  k_i = fold_in(key, i)

    Each example is passed as a batch of one, so `loss_fn` sees its usual shapes, and gets its own key,
    so a loss that draws randomness (augmentation, a PGD start) makes an independent draw per example, as
    it would across a full batch. (Anything that mixes examples, e.g. mixup, sees only the one example.)
    `key=None` passes None to `loss_fn`.

    Args:
      loss_fn: (params, batch, key) -> (losses [batch], aux: pytree whose leaves have a leading [batch] axis).
      params: parameter pytree.
      batch: pytree of arrays with a leading [B] axis.
      key: PRNG key, or None for a loss that draws nothing.
    Returns:
      ((losses [B], aux with leaves [B, ...]), gradients with leaves [B, *param_shape]).
    """
    if key is not None:
        check_key(key)

    def one(params, example, k):
        losses, aux = loss_fn(params, jax.tree_util.tree_map(lambda a: a[None], example), k)
        return losses[0], jax.tree_util.tree_map(lambda a: a[0], aux)

    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    keys = None if key is None else jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(size))
    return jax.vmap(jax.value_and_grad(one, has_aux=True), in_axes=(None, 0, 0))(params, batch, keys)


def per_example_gradients(loss_fn: LossFn, params, batch):
    """Gradient of every example's loss: leaves [batch, *param_shape].

    g_i = grad_params loss_fn(params, batch[i:i+1])[0]   (`per_example_value_and_grad`, gradients only).
    """
    _, grads = per_example_value_and_grad(lambda p, b, k: (loss_fn(p, b), {}), params, batch)
    return grads


def clip_per_example(grads, *, l2_clip) -> tuple[Any, jax.Array]:
    """Scales each example's gradient (over the whole parameter tree) to L2 norm <= l2_clip.

    g_i <- g_i * min(1, C / ||g_i||_2),  ||g_i||_2^2 = sum over every leaf of g_i's squares

    Args:
      grads: per-example gradients, leaves [batch, ...].
      l2_clip: C > 0.
    Returns:
      (clipped grads, same structure; norms [batch] before clipping).

    Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1.
    """
    check_number(l2_clip, "l2_clip", low=0, low_open=True)
    leaves = jax.tree_util.tree_leaves(grads)
    sq = sum(jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in leaves)
    norms = jnp.sqrt(sq)
    scale = jnp.where(norms > l2_clip, l2_clip / jnp.where(norms > 0, norms, 1.0), 1.0)
    clipped = jax.tree_util.tree_map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads)
    return clipped, norms


def noisy_clipped_mean(grads, *, l2_clip, noise_multiplier, key: jax.Array, mask: jax.Array | None = None,
                       denominator: int | None = None):
    """DP-SGD's aggregate of per-example gradients: clipped, summed, Gaussian noise added, over the batch size.

    g = (sum_i m_i clip(g_i, C) + N(0, (z * C)^2 I)) / D,   clip(g, C) = g * min(1, C / ||g||_2)

    with the norm over the whole parameter tree, z = noise_multiplier, m_i the mask (1 without one) and
    D = `denominator`, or the number of rows B when None. With Poisson sampling (a padded batch and its
    mask) D is the expected batch size q * n, a constant, as in Abadi et al.'s analysis. Without a mask,
    the same values as `optax.contrib.differentially_private_aggregate`; here the key is an argument
    instead of optimizer state.

    Args:
      grads: per-example gradients, leaves [B, *param_shape] (e.g. from `per_example_value_and_grad`).
      l2_clip: C > 0.
      noise_multiplier: z >= 0 (z = 0: no noise, only clipping).
      key: PRNG key for the noise.
      mask: optional [B] 0/1 weights (padding rows 0).
      denominator: optional D >= 1 (default B).
    Returns:
      gradient pytree, leaves [*param_shape].

    Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1.
    """
    check_number(l2_clip, "l2_clip", low=0, low_open=True)
    z = check_number(noise_multiplier, "noise_multiplier", low=0, traced_ok=True)
    check_key(key)
    clipped, _ = clip_per_example(grads, l2_clip=l2_clip)
    leaves, treedef = jax.tree_util.tree_flatten(clipped)
    size = leaves[0].shape[0] if denominator is None else check_int(denominator, "denominator")
    if mask is not None:
        leaves = [g * mask.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype) for g in leaves]
    summed = [jnp.sum(g, axis=0) for g in leaves]
    if z != 0:
        keys = jax.random.split(key, len(summed))
        std = noise_multiplier * l2_clip
        summed = [s + std * jax.random.normal(k, s.shape, s.dtype) for s, k in zip(summed, keys)]
    return jax.tree_util.tree_unflatten(treedef, [s / size for s in summed])


def dp_sgd_gradients(loss_fn: LossFn, params, batch, *, l2_clip, noise_multiplier, key: jax.Array):
    """The DP-SGD gradient of a batch: `noisy_clipped_mean` of its per-example gradients.

    g = (sum_i clip(g_i, C) + N(0, (z * C)^2 I)) / B,   g_i = grad_params loss_fn(params, batch[i:i+1])[0]

    Args:
      loss_fn: (params, batch) -> [batch] per-example losses.
      params: parameter pytree.
      batch: pytree of arrays with a leading [B] axis.
      l2_clip, noise_multiplier, key: see `noisy_clipped_mean`.
    Returns:
      gradient pytree, the structure of `params`.

    Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1.
    """
    return noisy_clipped_mean(per_example_gradients(loss_fn, params, batch), l2_clip=l2_clip,
                              noise_multiplier=noise_multiplier, key=key)
