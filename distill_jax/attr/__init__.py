"""Attribution methods over any pure `apply_fn(x) -> logits`: gradient, path, noise-tunnel, perturbation,
surrogate, layer (Grad-CAM) and concept (TCAV) methods, and `attribute` to call one by name.
"""
from distill_jax.attr._concepts import concept_activation_vector, tcav_score
from distill_jax.attr._gradient import (
    grad_x_input,
    gradient_shap,
    integrated_gradients,
    path_rule,
    saliency,
)
from distill_jax.attr._layer import LayerForward, check_layer, grad_cam, layer_grad, split_forward
from distill_jax.attr._noise_tunnel import smoothgrad, smoothgrad_squared, vargrad
from distill_jax.attr._paths import blur_ig, guided_ig
from distill_jax.attr._perturbation import (
    feature_ablation,
    feature_ids,
    occlusion,
    occlusion_masks,
    rise,
    rise_masks,
)
from distill_jax.attr._registry import attribute
from distill_jax.attr._surrogates import kernel_shap, kernel_shap_coalitions, lime, lime_coalitions

__all__ = [
    "saliency",
    "grad_x_input",
    "integrated_gradients",
    "path_rule",
    "gradient_shap",
    "smoothgrad",
    "smoothgrad_squared",
    "vargrad",
    "guided_ig",
    "blur_ig",
    "occlusion",
    "occlusion_masks",
    "feature_ids",
    "feature_ablation",
    "rise",
    "rise_masks",
    "kernel_shap",
    "kernel_shap_coalitions",
    "lime",
    "lime_coalitions",
    "grad_cam",
    "layer_grad",
    "split_forward",
    "check_layer",
    "LayerForward",
    "concept_activation_vector",
    "tcav_score",
    "attribute",
]
