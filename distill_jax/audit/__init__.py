"""The audit of trained models: two compiled queries per model, the evaluators of every score family,
and (`verdict`) the choice of student and explanation method.
"""
from distill_jax.audit import verdict
from distill_jax.audit._evaluators import (
    attribution_maps,
    cka_scores,
    faithfulness_scores,
    features_of,
    ig_completeness,
    linear_student,
    local_agreement,
    perturbed_views,
    quality_scores,
    queries_of,
    randomization_scores,
    rank_methods,
    robustness_scores,
    saliency_max_sensitivity,
    spatial_layer,
    tree_student,
)
from distill_jax.audit._queries import ModelQueries

__all__ = [
    "ModelQueries",
    "attribution_maps",
    "faithfulness_scores",
    "quality_scores",
    "rank_methods",
    "ig_completeness",
    "saliency_max_sensitivity",
    "randomization_scores",
    "robustness_scores",
    "cka_scores",
    "linear_student",
    "local_agreement",
    "perturbed_views",
    "tree_student",
    "features_of",
    "spatial_layer",
    "queries_of",
    "verdict",
]
