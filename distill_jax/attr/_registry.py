"""The attribution methods by name (`attribute(name, apply_fn, x, target, **options)`), as the
audit and the CLI call them.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from distill_jax.attr._gradient import grad_x_input, gradient_shap, integrated_gradients, saliency
from distill_jax.attr._layer import grad_cam
from distill_jax.attr._noise_tunnel import smoothgrad, smoothgrad_squared, vargrad
from distill_jax.attr._paths import blur_ig, guided_ig
from distill_jax.attr._perturbation import feature_ablation, occlusion, rise
from distill_jax.attr._surrogates import kernel_shap, lime


def _smoothgrad_by_name(apply_fn, x, target, *, method: str | Callable = "saliency", **kw):
    fn = METHODS[method] if isinstance(method, str) else method
    return smoothgrad(fn, apply_fn, x, target, **kw)


METHODS: dict[str, Callable[..., Any]] = {
    "saliency": saliency,
    "grad_x_input": grad_x_input,
    "integrated_gradients": integrated_gradients,
    "grad_cam": grad_cam,  # takes forward (forward_fn with layer=, or (features_fn, head_fn)) instead of apply_fn
    "occlusion": occlusion,
    "smoothgrad": _smoothgrad_by_name,  # method= a METHODS name or function; key= required
    "smoothgrad_squared": smoothgrad_squared,  # key= required
    "vargrad": vargrad,  # key= required
    "gradient_shap": gradient_shap,  # key= required; baselines= a [m, ...] distribution (default: zeros)
    "guided_ig": guided_ig,
    "blur_ig": blur_ig,  # NHWC images only
    "feature_ablation": feature_ablation,
    "rise": rise,  # key= required
    "kernel_shap": kernel_shap,  # key= required unless exact=True
    "lime": lime,  # key= required
}


def attribute(name: str, apply_fn: Callable, x: jax.Array, target: jax.Array, **kw) -> Any:
    """Runs the attribution method `name` (a key of `METHODS`) with keyword options `kw`."""
    if name not in METHODS:
        raise ValueError(f"name must be one of {sorted(METHODS)}; got {name!r}")
    return METHODS[name](apply_fn, x, target, **kw)
