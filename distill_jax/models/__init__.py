"""Networks and readable students (Flax linen), their layers per backend, and adapters for any JAX model.
"""
from distill_jax.models._adapters import Student, Teacher, as_student, as_teacher, model_outputs
from distill_jax.models._ensemble import Ensemble
from distill_jax.models._layers import (
    Conv3x3,
    conv3x3_filter_grad,
    conv3x3_lax,
    conv3x3_patches,
    conv3x3_xla,
    for_attribution,
    for_queries,
    forward_only,
    max_pool_lax,
    max_pool_slices,
)
from distill_jax.models._networks import MLP, ConvNet, HintRegressor, SeedCNN, SmallCNN
from distill_jax.models._students import (
    Linear,
    SoftDecisionTree,
    path_probabilities,
    set_pca,
    tree_hard_predict,
)
from distill_jax.models._util import (
    apply_fn_of,
    build,
    count_params,
    forward_with_features,
    layer_order,
    with_compute_dtype,
)

__all__ = [
    "Ensemble",
    "ConvNet",
    "SeedCNN",
    "SmallCNN",
    "MLP",
    "HintRegressor",
    "Linear",
    "set_pca",
    "SoftDecisionTree",
    "path_probabilities",
    "tree_hard_predict",
    "Conv3x3",
    "conv3x3_patches",
    "conv3x3_lax",
    "conv3x3_xla",
    "conv3x3_filter_grad",
    "max_pool_slices",
    "max_pool_lax",
    "forward_only",
    "for_attribution",
    "for_queries",
    "build",
    "forward_with_features",
    "apply_fn_of",
    "layer_order",
    "with_compute_dtype",
    "count_params",
    "Teacher",
    "Student",
    "as_teacher",
    "as_student",
    "model_outputs",
]
