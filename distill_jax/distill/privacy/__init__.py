"""Private distillation: PATE (teacher ensembles, GNMax aggregation) and privacy accounting.
"""
from distill_jax.distill.privacy._pate import (
    teacher_votes,
    gnmax,
    confident_gnmax,
    ensemble_shards,
    ensemble_batch_indices,
    teacher_step_fn,
    make_ensemble_step,
    init_ensemble,
    Ensemble,
    train_ensemble,
    ensemble_logits,
)
from distill_jax.distill.privacy._accounting import gnmax_epsilon, dp_sgd_epsilon

__all__ = [
    "teacher_votes",
    "gnmax",
    "confident_gnmax",
    "ensemble_shards",
    "ensemble_batch_indices",
    "teacher_step_fn",
    "make_ensemble_step",
    "init_ensemble",
    "Ensemble",
    "train_ensemble",
    "ensemble_logits",
    "gnmax_epsilon",
    "dp_sgd_epsilon",
]
