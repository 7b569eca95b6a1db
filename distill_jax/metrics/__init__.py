"""Scores of models and explanations: fidelity, faithfulness, robustness, complexity, randomisation,
axiomatic and similarity metrics (one value per example unless said otherwise).
"""
from distill_jax.metrics._fidelity import accuracy, agreement, mean_kl
from distill_jax.metrics._faithfulness import faithfulness_correlation, sensitivity_n, infidelity
from distill_jax.metrics._perturbation_order import (
    deletion_auc,
    insertion_auc,
    monotonicity,
    road,
    region_perturbation,
    noisy_linear_imputation,
)
from distill_jax.metrics._robustness import avg_sensitivity, max_sensitivity, local_lipschitz
from distill_jax.metrics._complexity import sparseness, complexity, discrete_entropy
from distill_jax.metrics._randomisation import (
    random_logit,
    smooth_mprt,
    efficient_mprt,
    randomization_check,
    randomize_layer,
)
from distill_jax.metrics._axiomatic import ig_completeness_error
from distill_jax.metrics._similarity import ssim, top_k_overlap, spearman, pearson

__all__ = [
    "accuracy",
    "agreement",
    "mean_kl",
    "faithfulness_correlation",
    "sensitivity_n",
    "infidelity",
    "deletion_auc",
    "insertion_auc",
    "monotonicity",
    "road",
    "region_perturbation",
    "noisy_linear_imputation",
    "avg_sensitivity",
    "max_sensitivity",
    "local_lipschitz",
    "sparseness",
    "complexity",
    "discrete_entropy",
    "random_logit",
    "smooth_mprt",
    "efficient_mprt",
    "randomization_check",
    "randomize_layer",
    "ig_completeness_error",
    "ssim",
    "top_k_overlap",
    "spearman",
    "pearson",
]
