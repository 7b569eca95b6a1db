"""Distillation: the method grammar and its loss terms, the teacher cache, training views, and `distill()`.

Submodules: `losses` (per-example losses), `tuning` (validation choice of T and alpha), `prune`
(magnitude pruning as an optax transformation), `privacy` (PATE and privacy accounting).
"""
from distill_jax.distill import losses, privacy, prune, tuning
from distill_jax.distill._api import distill, init_student, init_trainable, make_loss_fn
from distill_jax.distill._defaults import KD_DEFAULTS, KDSetting, kd_defaults
from distill_jax.distill._leaf_step import tree_leaf_step, tree_leaf_step_scale
from distill_jax.distill._method import MethodConfig, Needs, method_needs, parse_method
from distill_jax.distill._teacher_cache import (
    cache_teacher_outputs,
    teacher_cache_bytes,
    teacher_cache_shapes,
    teacher_outputs,
    teacher_outputs_fn,
)
from distill_jax.distill._terms import (
    Context,
    TermSpec,
    attention_term,
    defensive_term,
    fm_term,
    hint_term,
    kd_term,
    labels_term,
    logits_term,
    saliency_term,
)
from distill_jax.distill._views import (
    adversarial_view,
    check_adversarial,
    check_mixup,
    pgd_view,
    training_view,
)

__all__ = [
    "KD_DEFAULTS",
    "KDSetting",
    "kd_defaults",
    "tree_leaf_step",
    "tree_leaf_step_scale",
    "distill",
    "init_student",
    "init_trainable",
    "make_loss_fn",
    "MethodConfig",
    "Needs",
    "parse_method",
    "method_needs",
    "Context",
    "TermSpec",
    "labels_term",
    "kd_term",
    "fm_term",
    "logits_term",
    "hint_term",
    "attention_term",
    "saliency_term",
    "defensive_term",
    "teacher_outputs",
    "teacher_outputs_fn",
    "teacher_cache_shapes",
    "teacher_cache_bytes",
    "cache_teacher_outputs",
    "training_view",
    "adversarial_view",
    "pgd_view",
    "check_adversarial",
    "check_mixup",
    "losses",
    "tuning",
    "prune",
    "privacy",
]
