"""Per-example distillation losses: loss-based (KD), model-based (hints, soft trees), mask-based (attention, saliency).
"""
from distill_jax.distill.losses._features import (
    attention_energy_map,
    attention_map,
    attention_transfer_from_maps,
    attention_transfer_loss,
    hint_loss,
    input_saliency,
    saliency_matching_loss,
)
from distill_jax.distill.losses._logits import (
    cross_entropy,
    defensive_distillation_loss,
    distillation_loss,
    kd_loss,
    logit_matching_loss,
    soft_cross_entropy,
)
from distill_jax.distill.losses._tree import soft_tree_kd_loss, soft_tree_loss, tree_balance_penalty

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
