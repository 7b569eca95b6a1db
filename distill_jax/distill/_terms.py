"""The terms of a distillation loss (labels, kd, fm, logits, hint, attention, saliency,
defensive), each a function of a `Context`, registered by name in `TERMS`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax

from distill_jax.distill.losses._features import (
    attention_energy_map,
    attention_transfer_from_maps,
    hint_loss,
    saliency_matching_loss,
)
from distill_jax.distill.losses._logits import (
    cross_entropy,
    defensive_distillation_loss,
    kd_loss,
    logit_matching_loss,
)
from distill_jax.distill.losses._tree import soft_tree_kd_loss, soft_tree_loss
from distill_jax.models._ensemble import MEMBER_LOGITS
from distill_jax.models._networks import HintRegressor

if TYPE_CHECKING:
    from distill_jax.distill._method import MethodConfig

@dataclasses.dataclass(frozen=True)
class Context:
    """What a term may read in one step. Teacher fields are None when no term needs them."""

    x: jax.Array
    labels: jax.Array
    num_classes: int
    student_kind: str
    student_logits: jax.Array
    student_features: dict
    student_apply: Callable[[jax.Array], jax.Array]
    aux_params: dict
    teacher_logits: jax.Array | None
    teacher_features: dict
    teacher_attention: dict
    teacher_saliency: jax.Array | None
    cfg: MethodConfig


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A loss term: its per-example loss and what it needs from teacher and student.

    `teacher_layers` are read as whole feature maps [B, H, W, C]; `teacher_attention` layers only as
    their attention energy maps [B, H, W] (`losses.attention_energy_map`), a C-th of the size, which
    is what a teacher cache keeps for attention transfer.
    """

    loss: Callable[[Context], jax.Array]
    teacher_logits: bool = False
    teacher_layers: Callable[[MethodConfig], tuple[str, ...]] = lambda cfg: ()
    teacher_attention: Callable[[MethodConfig], tuple[str, ...]] = lambda cfg: ()
    student_layers: Callable[[MethodConfig], tuple[str, ...]] = lambda cfg: ()
    teacher_saliency: bool = False
    reads_labels: bool = False  # labels of a mixed image are undefined: terms that read them refuse mixup
    # for a soft tree, the term reads the leaf logits at the temperature (`losses.soft_tree_kd_loss`): under Adam
    # the leaves then need their steps scaled by T (`tree_leaf_step_scale`)
    tree_leaves_at_temperature: bool = False


def _is_tree(ctx: Context) -> bool:
    return ctx.student_kind == "tree"


def _tree_loss(ctx: Context, target_probs: jax.Array) -> jax.Array:
    f = ctx.student_features
    return soft_tree_loss(f["path_probs"], f["leaf_logits"], target_probs)


def labels_term(ctx: Context) -> jax.Array:
    """Cross entropy with the labels, CE(softmax(logits / label_temperature), y); for a soft tree, Frosst &
    Hinton's expected leaf cross entropy."""
    if _is_tree(ctx):
        return _tree_loss(ctx, jax.nn.one_hot(ctx.labels, ctx.num_classes))
    members = (ctx.student_features or {}).get(MEMBER_LOGITS)
    if members is not None:  # an ensemble: every member learns the labels on its own (their losses summed)
        return sum(cross_entropy(m / ctx.cfg.label_temperature, ctx.labels) for m in members)
    return cross_entropy(ctx.student_logits / ctx.cfg.label_temperature, ctx.labels)


def kd_term(ctx: Context) -> jax.Array:
    """Hinton KD mixed with label cross entropy: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE.

    For a soft tree the soft part is `losses.soft_tree_kd_loss` (leaf logits divided by T, as a
    network's logits are) and the hard part Frosst & Hinton's leaf cross entropy with the labels.
    """
    t, alpha, label_weight = ctx.cfg.temperature, ctx.cfg.alpha, ctx.cfg.label_weight
    if _is_tree(ctx):
        return alpha * fm_term(ctx) + label_weight * labels_term(ctx)
    # `losses.distillation_loss` (in its order of operations) with its 1 - alpha read from the config: computed
    # once on the host, also when alpha is a run-time setting of the step
    ce = cross_entropy(ctx.student_logits, ctx.labels)
    return alpha * kd_loss(ctx.student_logits, ctx.teacher_logits, temperature=t) + label_weight * ce


def fm_term(ctx: Context) -> jax.Array:
    """Function matching: T^2 * KL(teacher_T || student_T) on the view both saw, labels unread (a tree: its KD form)."""
    t = ctx.cfg.temperature
    if _is_tree(ctx):
        f = ctx.student_features
        return soft_tree_kd_loss(f["path_probs"], f["leaf_logits"], ctx.teacher_logits, temperature=t)
    return kd_loss(ctx.student_logits, ctx.teacher_logits, temperature=t)


def logits_term(ctx: Context) -> jax.Array:
    return logit_matching_loss(ctx.student_logits, ctx.teacher_logits)


def hint_term(ctx: Context) -> jax.Array:
    total = 0.0
    for s_layer, t_layer in ctx.cfg.hint_pairs:
        teacher = ctx.teacher_features[t_layer]
        regressor = HintRegressor(teacher.shape[-1])
        mapped = regressor.apply({"params": ctx.aux_params["hint"][_pair_key(s_layer, t_layer)]},
                                 ctx.student_features[s_layer])
        total = total + hint_loss(mapped, teacher)
    return total


def attention_term(ctx: Context) -> jax.Array:
    total = 0.0
    for s_layer, t_layer in ctx.cfg.attention_pairs:
        student_map = attention_energy_map(ctx.student_features[s_layer], p=ctx.cfg.attention_p)
        total = total + attention_transfer_from_maps(student_map, ctx.teacher_attention[t_layer])
    return total


def saliency_term(ctx: Context) -> jax.Array:
    return saliency_matching_loss(ctx.student_apply, ctx.x, ctx.labels, ctx.teacher_saliency)


def defensive_term(ctx: Context) -> jax.Array:
    """Defensive distillation: -sum softmax(t/T) log softmax(s/T), labels unread; the student is used at T = 1.

    For a soft tree the leaves play the student's logits: Frosst & Hinton's path-weighted leaf cross
    entropy with the leaf logits divided by T and the teacher's softmax at T as the target.
    See `losses.defensive_distillation_loss` (Papernot et al. 2016).
    """
    t = ctx.cfg.temperature
    if _is_tree(ctx):
        f = ctx.student_features
        return soft_tree_loss(f["path_probs"], f["leaf_logits"] / t, jax.nn.softmax(ctx.teacher_logits / t, -1))
    return defensive_distillation_loss(ctx.student_logits, ctx.teacher_logits, temperature=t)


def _pairs_side(attr: str, side: int):
    return lambda cfg: tuple(pair[side] for pair in getattr(cfg, attr))


TERMS: dict[str, TermSpec] = {
    "labels": TermSpec(labels_term, reads_labels=True),
    "kd": TermSpec(kd_term, teacher_logits=True, reads_labels=True, tree_leaves_at_temperature=True),
    "fm": TermSpec(fm_term, teacher_logits=True, tree_leaves_at_temperature=True),
    "logits": TermSpec(logits_term, teacher_logits=True),
    "hint": TermSpec(hint_term, teacher_layers=_pairs_side("hint_pairs", 1),
                     student_layers=_pairs_side("hint_pairs", 0)),
    "attention": TermSpec(attention_term, teacher_attention=_pairs_side("attention_pairs", 1),
                          student_layers=_pairs_side("attention_pairs", 0)),
    "saliency": TermSpec(saliency_term, teacher_saliency=True, reads_labels=True),
    "defensive": TermSpec(defensive_term, teacher_logits=True),
}


def _pair_key(student_layer: str, teacher_layer: str) -> str:
    return f"{student_layer}->{teacher_layer}"
