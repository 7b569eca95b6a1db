"""Losses on inner features and input gradients: FitNets hints (Romero et al. 2015), attention
transfer (Zagoruyko & Komodakis 2017) and saliency matching.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from distill_jax.distill.losses._common import (
    _average_pool,
    _check_floating,
    _check_rank,
    _common_grid,
    _concrete_scalar,
    _fail,
    _l2_normalize,
)


def hint_loss(student_regressed: jax.Array, teacher_feature: jax.Array) -> jax.Array:
    """FitNets hint loss: mean squared error of a regressed student feature to a teacher feature.

    Formula: ``(1 / (h w C)) * ||pool(r(s)) - pool(t)||_2^2`` per example, where ``r`` is
    the learned regressor (it lives in ``distill_jax.models`` and has already been applied, so
    the channel counts match) and ``pool`` average-pools whichever grid is larger, per
    axis, down to the smaller ``h x w`` grid (identity when the grids agree). For
    vector features ``[batch, D]`` it is ``(1 / D) * ||r(s) - t||^2``.

    Args:
      student_regressed: ``[batch, H1, W1, C]`` or ``[batch, D]`` floating.
      teacher_feature: ``[batch, H2, W2, C]`` or ``[batch, D]`` floating, same rank;
        each of ``max(H1, H2) / min(H1, H2)`` and ``max(W1, W2) / min(W1, W2)`` must be
        an integer.

    Returns:
      ``[batch]`` losses.

    Reference: Romero et al. (2015), "FitNets: Hints for Thin Deep Nets", ICLR.
    """
    fn = "hint_loss"
    for name, x in (("student_regressed", student_regressed), ("teacher_feature", teacher_feature)):
        _check_rank(fn, name, x, (2, 4), "[batch, H, W, C] or [batch, D]")
        _check_floating(fn, name, x)
    s_shape, t_shape = jnp.shape(student_regressed), jnp.shape(teacher_feature)
    if len(s_shape) != len(t_shape):
        raise _fail(
            fn,
            f"student_regressed has shape {tuple(s_shape)} but teacher_feature has shape "
            f"{tuple(t_shape)}; expected the same rank ([batch, H, W, C] or [batch, D] each)",
        )
    if s_shape[0] != t_shape[0] or s_shape[-1] != t_shape[-1]:
        raise _fail(
            fn,
            f"student_regressed has shape {tuple(s_shape)} but teacher_feature has shape "
            f"{tuple(t_shape)}; batch and channel (last) sizes must be equal (apply the "
            "student's hint regressor to map its channels to the teacher's)",
        )
    if len(s_shape) == 4:
        h, w = _common_grid(fn, "student_regressed", s_shape, "teacher_feature", t_shape)
        student_regressed = _average_pool(student_regressed, h, w)
        teacher_feature = _average_pool(teacher_feature, h, w)
    diff = student_regressed - teacher_feature
    return jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def _attention_energy(features: jax.Array, p) -> jax.Array:
    """sum_c |A_c|^p on the native grid: [batch, H, W, C] -> [batch, H, W]."""
    return jnp.sum(jnp.abs(features) ** p, axis=-1)


def _check_p(fn: str, p) -> None:
    value = _concrete_scalar(fn, "p", p)
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise _fail(
            fn, f"p={value!r}; expected a finite exponent >= 1 (p < 1 gives an "
            "unbounded gradient at zero activations; the paper uses p = 2)"
        )


def attention_map(features: jax.Array, *, p=2) -> jax.Array:
    """Activation-based spatial attention map of one layer, flattened and L2-normalised.

    Formula: ``Q = vec(sum_c |A_c|^p)``, returned as ``Q / max(||Q||_2, 1e-12)`` (like
    ``torch.nn.functional.normalize``; an all-zero layer gives an all-zero map with a
    finite gradient).

    Args:
      features: ``[batch, H, W, C]`` floating activations.
      p: exponent ``>= 1`` (keyword-only; the paper's default is 2).

    Returns:
      ``[batch, H * W]``, each row of unit L2 norm (or zero).

    Reference: Zagoruyko & Komodakis (2017), "Paying More Attention to Attention",
    ICLR, section 3.1 (F^p_sum).
    """
    fn = "attention_map"
    _check_rank(fn, "features", features, (4,), "[batch, H, W, C]")
    _check_floating(fn, "features", features)
    _check_p(fn, p)
    energy = _attention_energy(features, p)
    return _l2_normalize(energy.reshape(energy.shape[0], -1))


def attention_transfer_loss(
    student_features: jax.Array, teacher_features: jax.Array, *, p=2
) -> jax.Array:
    """Attention transfer between one student layer and one teacher layer, per example.

    Formula: ``|| Q_s / ||Q_s|| - Q_t / ||Q_t|| ||_2^2`` with ``Q = vec(sum_c |A_c|^p)``.

    Choices (documented because the paper leaves them open):

    * Resolutions may differ: the un-normalised energy maps ``sum_c |A_c|^p`` are
      computed on each layer's own grid, then the larger is average-pooled (per axis) to
      the smaller grid, then both are normalised. Pooling the maps rather than the
      features keeps activation energy that pooling signed features would cancel.
      The larger height and width must each be integer multiples of the smaller.
    * Channel counts may differ (they are summed away).
    * The **squared** L2 distance is used (value in [0, 2] since both maps are
      non-negative unit vectors). The paper's equation writes the plain norm, whose
      gradient is undefined at a perfect match; its code,
      ``(at(x) - at(y)).pow(2).mean()``, is this loss divided by ``h * w`` and averaged
      over the batch (then weighted by ``beta / 2``).

    Args:
      student_features: ``[batch, H1, W1, C1]`` floating.
      teacher_features: ``[batch, H2, W2, C2]`` floating.
      p: exponent ``>= 1`` (keyword-only; paper default 2).

    Returns:
      ``[batch]`` losses.

    Reference: Zagoruyko & Komodakis (2017), "Paying More Attention to Attention",
    ICLR, equation 2; code at github.com/szagoruyko/attention-transfer.
    """
    fn = "attention_transfer_loss"
    for name, x in (("student_features", student_features), ("teacher_features", teacher_features)):
        _check_rank(fn, name, x, (4,), "[batch, H, W, C]")
        _check_floating(fn, name, x)
    s_shape, t_shape = jnp.shape(student_features), jnp.shape(teacher_features)
    if s_shape[0] != t_shape[0]:
        raise _fail(
            fn, f"student_features has shape {tuple(s_shape)} but teacher_features has shape "
            f"{tuple(t_shape)}; the batch sizes must be equal"
        )
    _check_p(fn, p)
    _common_grid(fn, "student_features", s_shape, "teacher_features", t_shape)
    return attention_transfer_from_maps(attention_energy_map(student_features, p=p),
                                        attention_energy_map(teacher_features, p=p))


def attention_energy_map(features: jax.Array, *, p=2) -> jax.Array:
    """One layer's attention energy on its own grid, scaled to unit L2 norm: what a teacher cache keeps.

    Formula: ``E = sum_c |A_c|^p`` (shape ``[batch, H, W]``), returned as ``E / max(||E||_2, 1e-12)``.
    Average pooling is linear, so pooling this map to a coarser grid and normalising again gives the
    same map as pooling ``E`` itself: a layer's ``[batch, H, W]`` map stands in for its
    ``[batch, H, W, C]`` features in `attention_transfer_from_maps` at a ``C``-th of the memory.

    Args:
      features: ``[batch, H, W, C]`` floating activations.
      p: exponent ``>= 1`` (keyword-only).

    Returns:
      ``[batch, H, W]``.
    """
    fn = "attention_energy_map"
    _check_rank(fn, "features", features, (4,), "[batch, H, W, C]")
    _check_floating(fn, "features", features)
    _check_p(fn, p)
    energy = _attention_energy(features, p)
    flat = _l2_normalize(energy.reshape(energy.shape[0], -1))
    return flat.reshape(energy.shape)


def attention_transfer_from_maps(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
    """Attention transfer between two energy maps (`attention_energy_map`), per example.

    Formula: ``|| P(S) / ||P(S)|| - P(T) / ||P(T)|| ||_2^2``, where ``P`` average-pools the finer map to
    the coarser grid (the identity on the coarser one). Equals `attention_transfer_loss` on the
    features the maps came from.

    Args:
      student_map: ``[batch, H1, W1]``; teacher_map: ``[batch, H2, W2]``; the larger height and width
        must each be integer multiples of the smaller.

    Returns:
      ``[batch]`` losses in [0, 2].
    """
    fn = "attention_transfer_from_maps"
    for name, m in (("student_map", student_map), ("teacher_map", teacher_map)):
        _check_rank(fn, name, m, (3,), "[batch, H, W]")
        _check_floating(fn, name, m)
    s_shape, t_shape = jnp.shape(student_map), jnp.shape(teacher_map)
    if s_shape[0] != t_shape[0]:
        raise _fail(fn, f"student_map has shape {tuple(s_shape)} but teacher_map has shape {tuple(t_shape)}; "
                        "the batch sizes must be equal")
    h, w = _common_grid(fn, "student_map", s_shape, "teacher_map", t_shape)
    maps = [_l2_normalize(_average_pool(m, h, w).reshape(m.shape[0], -1)) for m in (student_map, teacher_map)]
    return jnp.sum(jnp.square(maps[0] - maps[1]), axis=-1)


def _check_image_target(fn: str, x, target) -> None:
    _check_rank(fn, "x", x, (4,), "[batch, H, W, C] images")
    _check_floating(fn, "x", x)
    _check_rank(fn, "target", target, (1,), "[batch] integer class indices")
    if not jnp.issubdtype(jnp.result_type(target), jnp.integer):
        raise _fail(fn, f"target has dtype {jnp.result_type(target)}; expected an integer dtype")
    if jnp.shape(target)[0] != jnp.shape(x)[0]:
        raise _fail(
            fn, f"target has shape {tuple(jnp.shape(target))} but x has shape "
            f"{tuple(jnp.shape(x))}; expected target [batch] with the images' batch"
        )


def _target_logit_sum(fn: str, apply_fn: Callable, x: jax.Array, target: jax.Array) -> jax.Array:
    logits = apply_fn(x)
    if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != jnp.shape(x)[0]:
        raise _fail(
            fn, f"apply_fn(x) returned shape {tuple(jnp.shape(logits))} for x of shape "
            f"{tuple(jnp.shape(x))}; expected logits [batch, classes] = "
            f"[{jnp.shape(x)[0]}, classes]"
        )
    picked = jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=-1)
    return jnp.sum(picked)


def input_saliency(apply_fn: Callable, x: jax.Array, target: jax.Array) -> jax.Array:
    """Input-gradient saliency map of the target logit, summed over channels.

    Formula: ``S_b[h, w] = sum_c | d z_b[y_b] / d x_b[h, w, c] |``.

    Per-example gradients come from one ``jax.grad`` of ``sum_b z_b[y_b]``, which is
    exact when ``apply_fn`` treats examples independently (no batch statistics).

    Args:
      apply_fn: pure function ``x -> logits [batch, classes]`` (close over params).
      x: ``[batch, H, W, C]`` floating images.
      target: ``[batch]`` integer class whose logit is explained.

    Returns:
      ``[batch, H, W]`` non-negative saliency.

    Reference: Simonyan, Vedaldi & Zisserman (2014), "Deep Inside Convolutional
    Networks: Visualising Image Classification Models and Saliency Maps", ICLR
    workshop (they take the max over channels; the sum is used here).
    """
    fn = "input_saliency"
    _check_image_target(fn, x, target)
    grads = jax.grad(lambda xx: _target_logit_sum(fn, apply_fn, xx, target))(x)
    return jnp.sum(jnp.abs(grads), axis=-1)


def saliency_matching_loss(
    student_apply_fn: Callable, x: jax.Array, target: jax.Array, teacher_saliency: jax.Array
) -> jax.Array:
    """Make the student's input-gradient saliency map match the teacher's, per example.

    Formula: ``|| vec(S_s) / ||vec(S_s)|| - vec(S_t) / ||vec(S_t)|| ||_2^2`` with
    ``S_s = input_saliency(student_apply_fn, x, target)`` and ``S_t`` the given teacher
    map (normalisation as in ``attention_map``, so an all-zero map stays finite).
    Training through it differentiates a gradient (``jax.grad`` inside ``jax.grad``);
    the function is jit-able. With ReLU students the input gradient is piecewise
    constant in ``x`` but still differentiable in the parameters, so the loss trains;
    smooth activations (softplus, gelu, tanh) give a smoother objective.

    Args:
      student_apply_fn: pure function ``x -> logits [batch, classes]`` closing over the
        student's params (differentiate the enclosing function w.r.t. those params).
      x: ``[batch, H, W, C]`` floating images.
      target: ``[batch]`` integer class whose logit is explained.
      teacher_saliency: ``[batch, H, W]`` floating, e.g.
        ``input_saliency(teacher_apply_fn, x, target)`` under ``stop_gradient``.

    Returns:
      ``[batch]`` losses in [0, 2] (both maps are non-negative).

    Reference: in the spirit of Ross, Hughes & Doshi-Velez (2017), "Right for the Right
    Reasons" (input-gradient penalties) and Zagoruyko & Komodakis (2017) (matching
    normalised maps); the double-backprop technique is Drucker & Le Cun (1992).
    """
    fn = "saliency_matching_loss"
    _check_image_target(fn, x, target)
    _check_rank(fn, "teacher_saliency", teacher_saliency, (3,), "[batch, H, W]")
    _check_floating(fn, "teacher_saliency", teacher_saliency)
    if jnp.shape(teacher_saliency) != jnp.shape(x)[:3]:
        raise _fail(
            fn, f"teacher_saliency has shape {tuple(jnp.shape(teacher_saliency))} but x has "
            f"shape {tuple(jnp.shape(x))}; expected teacher_saliency [batch, H, W] = "
            f"{tuple(jnp.shape(x)[:3])} (use losses.input_saliency on the teacher)"
        )
    student_map = input_saliency(student_apply_fn, x, target)
    b = student_map.shape[0]
    q_s = _l2_normalize(student_map.reshape(b, -1))
    q_t = _l2_normalize(teacher_saliency.reshape(b, -1))
    return jnp.sum(jnp.square(q_s - q_t), axis=-1)
