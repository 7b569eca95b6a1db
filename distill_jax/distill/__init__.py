"""Distillation: the method grammar and its loss terms, the teacher cache, training views, and `distill()`.

Submodules: `losses` (per-example losses), `tuning` (validation choice of T and alpha), `prune`
(magnitude pruning as an optax transformation), `privacy` (PATE and privacy accounting).
"""
from distill_jax.distill._api import distill, init_student, init_trainable, make_loss_fn
from distill_jax.distill._method import MethodConfig, Needs, parse_method, method_needs
from distill_jax.distill._terms import (
    Context,
    TermSpec,
    labels_term,
    kd_term,
    fm_term,
    logits_term,
    hint_term,
    attention_term,
    saliency_term,
    defensive_term,
)
from distill_jax.distill._teacher_cache import (
    teacher_outputs,
    teacher_outputs_fn,
    teacher_cache_shapes,
    teacher_cache_bytes,
    cache_teacher_outputs,
)
from distill_jax.distill._views import (
    training_view,
    adversarial_view,
    pgd_view,
    check_adversarial,
    check_mixup,
)
from distill_jax.distill import losses
from distill_jax.distill import tuning
from distill_jax.distill import prune
from distill_jax.distill import privacy

__all__ = [
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
