"""Per-example distillation losses: loss-based (KD), model-based (hints, soft trees), mask-based (attention, saliency).
"""
from distill_jax.distill.losses._logits import (
    cross_entropy,
    soft_cross_entropy,
    kd_loss,
    distillation_loss,
    defensive_distillation_loss,
    logit_matching_loss,
)
from distill_jax.distill.losses._tree import soft_tree_loss, soft_tree_kd_loss, tree_balance_penalty
from distill_jax.distill.losses._features import (
    hint_loss,
    attention_map,
    attention_transfer_loss,
    attention_energy_map,
    attention_transfer_from_maps,
    input_saliency,
    saliency_matching_loss,
)

__all__ = [
    "cross_entropy",
    "soft_cross_entropy",
    "kd_loss",
    "distillation_loss",
    "defensive_distillation_loss",
    "logit_matching_loss",
    "soft_tree_loss",
    "soft_tree_kd_loss",
    "tree_balance_penalty",
    "hint_loss",
    "attention_map",
    "attention_transfer_loss",
    "attention_energy_map",
    "attention_transfer_from_maps",
    "input_saliency",
    "saliency_matching_loss",
]
