"""Label-preserving augmentation (shifts, flips) and mixup (Zhang et al. 2018), on device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def augment(key: jax.Array, x: jax.Array, *, max_shift: int = 0, flip: bool = False) -> jax.Array:
    """Random translation by up to ``max_shift`` pixels (zero fill) and optional horizontal flip, per example.

    ``out[b, i, j] = x[b, i - dy_b, j - dx_b]`` (0 outside), ``dy_b, dx_b ~ U{-max_shift..max_shift}``; then,
    with ``flip``, each image is mirrored left-right with probability 1/2. Pure jnp: jit it inside the train step.

    Args:
      key: PRNG key.
      x: [batch, h, w, c] images.
      max_shift: largest shift in pixels (static, >= 0).
      flip: also flip horizontally at random.

    Returns:
      [batch, h, w, c], same dtype.

    Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015 (jittered MNIST).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images [batch, h, w, c], got shape {tuple(x.shape)}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    b, h, w, c = x.shape
    shift_key, flip_key = jax.random.split(key)
    if max_shift:
        s = int(max_shift)
        shifts = jax.random.randint(shift_key, (b, 2), -s, s + 1)
        padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))

        def crop(img, d):
            return jax.lax.dynamic_slice(img, (s - d[0], s - d[1], 0), (h, w, c))

        x = jax.vmap(crop)(padded, shifts)
    if flip:
        do = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def mixup(key: jax.Array, x: jax.Array, *, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Mixes every image with the next one in the batch: ``out[b] = lam_b x[b] + (1 - lam_b) x[(b + 1) % B]``.

    ``lam_b ~ Beta(alpha, alpha)`` per example (alpha = 1: uniform on [0, 1]; small alpha: mostly near 0 or
    1). The partner is the batch rolled by one, so no second permutation key is needed (batches are shuffled).
    Pure jnp: jit it inside the train step.

    Args:
      key: PRNG key.
      x: [batch, ...] floating.
      alpha: Beta concentration > 0 (static).
    Returns:
      (mixed [batch, ...], lam [batch]).

    Reference: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018; used for function matching
    by Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022.
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha!r}")
    lam = jax.random.beta(key, alpha, alpha, (x.shape[0],), dtype=jnp.float32)
    weight = lam.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return weight * x + (1 - weight) * jnp.roll(x, -1, axis=0), lam


# Label-preserving perturbations of model inputs (standardized images, unit variance per channel), each with a
# fixed strength: the views on which local fidelity compares a student with its teacher.
def _noise(key, x):
    return x + 0.3 * jax.random.normal(key, x.shape, x.dtype)


def _contrast(key, x):
    factor = jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype, 0.6, 1.4)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + factor * (x - mean)


def _brightness(key, x):
    return x + jax.random.uniform(key, (x.shape[0], 1, 1, 1), x.dtype, -0.5, 0.5)


def _cutout(key, x):
    h, w = x.shape[1:3]
    side_h, side_w = max(1, h // 3), max(1, w // 3)
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (x.shape[0], 1, 1, 1), 0, h - side_h + 1)
    left = jax.random.randint(kx, (x.shape[0], 1, 1, 1), 0, w - side_w + 1)
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    inside = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
    return jnp.where(inside, 0.0, x)  # 0 = the training images' mean after standardization


PERTURBATIONS = {"noise": _noise, "contrast": _contrast, "brightness": _brightness, "cutout": _cutout}


def perturb(key: jax.Array, x: jax.Array, kind: str) -> jax.Array:
    """A label-preserving perturbation of standardized images x [batch, h, w, c], one draw per image.

    Kinds (strengths in standardized units): "noise" x + 0.3 N(0, 1) per pixel; "contrast" m + f (x - m) with m
    the image mean and f ~ U[0.6, 1.4]; "brightness" x + U[-0.5, 0.5]; "cutout" a square of a third of the height
    and width at a uniform position set to 0 (DeVries & Taylor 2017).

    Returns:
      [batch, h, w, c], same dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images [batch, h, w, c], got shape {tuple(x.shape)}")
    if kind not in PERTURBATIONS:
        raise ValueError(f"kind must be one of {sorted(PERTURBATIONS)}; got {kind!r}")
    return PERTURBATIONS[kind](key, jnp.asarray(x))


def perturb_some(key: jax.Array, x: jax.Array, kinds: tuple[str, ...], fraction: float) -> jax.Array:
    """Each image of x [batch, h, w, c] replaced, with probability `fraction`, by one perturbation of a kind drawn
    uniformly from `kinds` (`perturb`'s kinds and strengths); the others kept.

    Keys: which images `fold_in(key, 0)`, which kind `fold_in(key, 1)`, kind i's draw `fold_in(key, 2 + i)` (each
    kind is drawn for the whole batch, then selected per image: one compiled program whatever the choice).
    Returns:
      [batch, h, w, c], same dtype.
    """
    if not kinds:
        raise ValueError("kinds must name at least one perturbation")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction!r}")
    x = jnp.asarray(x)
    chosen = jax.random.bernoulli(jax.random.fold_in(key, 0), fraction, (x.shape[0],))
    which = jax.random.randint(jax.random.fold_in(key, 1), (x.shape[0],), 0, len(kinds))
    out = x
    for i, kind in enumerate(kinds):
        view = perturb(jax.random.fold_in(key, 2 + i), x, kind)
        out = jnp.where((chosen & (which == i))[:, None, None, None], view, out)
    return out
