"""Teacher and student networks (Flax linen) with named intermediate features.

Every model here follows one calling convention::

    logits = model.apply(variables, x)                                  # [batch, classes]
    logits, features = model.apply(variables, x, return_features=True)  # features: name -> array
    logits, features = model.apply(variables, x, return_features=True, deltas={"conv4": d})

`deltas` adds an array to a named feature inside the network, so the gradient of the
logits with respect to that feature is `jax.grad` with respect to a zero delta (Grad-CAM,
TCAV). `forward_with_features(model, variables)` turns a model into the
`forward_fn(x, deltas=None) -> (logits, features)` that `explain` and `analysis` take.

Mixed precision: the conv nets and the MLP take a compute `dtype` (`with_compute_dtype(model,
"bfloat16")`): inputs, activations and matrix products in that dtype, parameters and logits in
float32, so losses and every reported number stay float32.

Convolution and pooling come in three implementations (`impl`) with the same parameters:
`"lax_conv"` (default: XLA's own convolution, `lax.conv_general_dilated`, with the 2x2 max-pool
as the max of four strided views, whose backward is cheap where `reduce_window`'s
select-and-scatter is slow on XLA:CPU), `"patches"` (the 3x3 convolution as one matrix product
over shifted-slice patches, same pool) and `"lax"` (`lax.conv_general_dilated` + `reduce_window`,
the reference).
benchmarks/RESULTS.md has the measured speeds.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models._networks import MLP, SeedCNN, SmallCNN
from distill_jax.models._students import Linear, SoftDecisionTree


def forward_with_features(model: nn.Module, variables: dict) -> Callable:
    """Returns `forward_fn(x, deltas=None) -> (logits, features)` for a model of this module."""

    def forward_fn(x, deltas=None):
        return model.apply(variables, x, return_features=True, deltas=deltas)

    return forward_fn


def apply_fn_of(model: nn.Module, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """Returns the pure `apply_fn(x) -> logits` of a model with its variables closed over."""
    return functools.partial(model.apply, variables)


def layer_order(model: nn.Module, variables, sample_x: jax.Array) -> list[str]:
    """Names of the top-level parameter subtrees in the order the forward pass calls them (input to output).

    Found by tracing `model.apply` once (no computation) and recording each top-level submodule as it is
    called; parameters created directly on the model (e.g. a soft tree's `leaf_logits`) follow, in the
    order of `variables["params"]`. Dict order itself is no guide: after jit, `device_get` or orbax,
    parameter dicts are sorted, so "dense10" comes before "dense2".
    """
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        path = context.module.scope.path if context.module.scope is not None else ()
        if context.method_name == "__call__" and len(path) == 1 and path[0] not in order:
            order.append(path[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, z: model.apply(v, z), variables, sample_x)
    params = list(variables["params"])
    return [name for name in order if name in params] + [name for name in params if name not in order]


COMPUTE_DTYPES = ("float32", "bfloat16")


def with_compute_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """`model` computing in `dtype` ("float32" or "bfloat16") where it has a compute dtype (the conv nets
    and the MLP); the soft tree and the linear student always compute in float32. Parameters are float32
    either way, so the same variables serve both."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype!r} is not supported; use one of {list(COMPUTE_DTYPES)}")
    return model.clone(dtype=jnp.dtype(dtype)) if hasattr(model, "dtype") else model


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {
    "seed_cnn": lambda num_classes, **kw: SeedCNN(num_classes=num_classes, **kw),
    "cnn": lambda num_classes, **kw: SmallCNN(num_classes=num_classes, **kw),
    "mlp": lambda num_classes, **kw: MLP(num_classes=num_classes, **kw),
    "linear": lambda num_classes, **kw: Linear(num_classes=num_classes, **kw),
    "tree": lambda num_classes, **kw: SoftDecisionTree(num_classes=num_classes, **kw),
}


def build(kind: str, num_classes: int, **options) -> nn.Module:
    """Builds a model by kind name (`seed_cnn`, `cnn`, `mlp`, `linear`, `tree`)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not known; use one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](num_classes, **options)
