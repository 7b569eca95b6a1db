"""Private distillation: PATE (teacher ensembles, GNMax aggregation) and privacy accounting.
"""
from distill_jax.distill.privacy._accounting import dp_sgd_epsilon, gnmax_epsilon
from distill_jax.distill.privacy._pate import (
    ShardEnsemble,
    confident_gnmax,
    ensemble_batch_indices,
    ensemble_logits,
    ensemble_shards,
    gnmax,
    init_ensemble,
    make_ensemble_step,
    teacher_step_fn,
    teacher_votes,
    train_ensemble,
)

__all__ = [
    "teacher_votes",
    "gnmax",
    "confident_gnmax",
    "ensemble_shards",
    "ensemble_batch_indices",
    "teacher_step_fn",
    "make_ensemble_step",
    "init_ensemble",
    "ShardEnsemble",
    "train_ensemble",
    "ensemble_logits",
    "gnmax_epsilon",
    "dp_sgd_epsilon",
]
