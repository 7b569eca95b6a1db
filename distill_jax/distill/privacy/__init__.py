"""Private distillation: PATE (teacher ensembles, GNMax aggregation), privacy accounting, and membership
inference attacks that measure the leak an epsilon bounds.
"""
from distill_jax.distill.privacy._accounting import (
    PATE_ORDERS,
    dp_sgd_epsilon,
    gnmax_epsilon,
    pate_epsilon,
    pate_rdp_data_dependent,
    pate_rdp_gnmax,
    pate_rdp_threshold,
)
from distill_jax.distill.privacy._membership import (
    FPR_LEVELS,
    attack_metrics,
    lira_scores,
    logit_confidence,
    loss_attack_scores,
    membership_inference,
    shadow_subsets,
)
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
    "membership_inference",
    "loss_attack_scores",
    "lira_scores",
    "logit_confidence",
    "attack_metrics",
    "shadow_subsets",
    "FPR_LEVELS",
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
    "pate_epsilon",
    "PATE_ORDERS",
    "pate_rdp_gnmax",
    "pate_rdp_threshold",
    "pate_rdp_data_dependent",
    "dp_sgd_epsilon",
]
