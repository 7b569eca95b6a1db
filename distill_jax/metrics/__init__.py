"""Scores of models and explanations: fidelity, faithfulness, robustness, complexity, randomisation,
axiomatic and similarity metrics (one value per example unless said otherwise).
"""
from distill_jax.metrics._axiomatic import ig_completeness_error
from distill_jax.metrics._complexity import complexity, discrete_entropy, sparseness
from distill_jax.metrics._faithfulness import faithfulness_correlation, infidelity, sensitivity_n
from distill_jax.metrics._fidelity import accuracy, agreement, mean_kl
from distill_jax.metrics._paired import distillation_gain, paired_bootstrap, per_image_fidelity
from distill_jax.metrics._perturbation_order import (
    deletion_auc,
    insertion_auc,
    monotonicity,
    noisy_linear_imputation,
    region_perturbation,
    road,
)
from distill_jax.metrics._randomisation import (
    efficient_mprt,
    random_logit,
    randomization_check,
    randomize_layer,
    smooth_mprt,
)
from distill_jax.metrics._robustness import avg_sensitivity, local_lipschitz, max_sensitivity
from distill_jax.metrics._similarity import pearson, spearman, ssim, top_k_overlap
from distill_jax.metrics._specs import METRICS, MetricSpec, metric_names

__all__ = [
    "distillation_gain",
    "paired_bootstrap",
    "per_image_fidelity",
    "METRICS",
    "MetricSpec",
    "metric_names",
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
