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
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax import backend, compilation

Features = dict[str, jax.Array]


# --------------------------------------------------------------------------- layers


def conv3x3_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 SAME convolution as one matrix product over shifted-slice patches.

    y[n, i, j, :] = sum_{dy, dx, c} x_pad[n, i + dy, j + dx, c] * kernel[dy, dx, c, :]

    Args:
      x: [batch, h, w, c_in].
      kernel: [3, 3, c_in, c_out] (the `nn.Conv` layout).
    Returns:
      [batch, h, w, c_out].
    """
    _, h, w, c_in = x.shape
    x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [x_pad[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)], axis=-1
    )
    return patches @ kernel.reshape(9 * c_in, -1)


def conv3x3_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Reference 3x3 SAME convolution (`lax.conv_general_dilated`); same shapes as `conv3x3_patches`."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def max_pool_slices(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, SAME padding, as the max of the four strided views of each window.

    y = max(max(x[2i, 2j], x[2i, 2j+1]), max(x[2i+1, 2j], x[2i+1, 2j+1]))

    Same values and shapes as `max_pool_lax`. Its backward is elementwise selects and strided pads:
    on XLA:CPU 3-17x faster than that of a reshape to [n, h/2, 2, w/2, 2, c] + max (a reduction over
    two inner window axes) and 7-38x faster than `reduce_window`'s select-and-scatter
    (benchmarks/RESULTS.md). Equal maxima share the gradient pairwise (two get half each), where
    `reduce_window` gives it all to the first; after a ReLU, ties are at 0 and get no gradient anyway.

    Args:
      x: [batch, h, w, c].
    Returns:
      [batch, ceil(h/2), ceil(w/2), c].
    """
    _, h, w, _ = x.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
    top = jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2])
    bottom = jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2])
    return jnp.maximum(top, bottom)


def max_pool_lax(x: jax.Array) -> jax.Array:
    """Reference 2x2 SAME max-pool (`reduce_window`)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


CONV_IMPLS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "lax_conv": conv3x3_lax,
    "patches": conv3x3_patches,
    "lax": conv3x3_lax,
}
POOL_IMPLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "lax_conv": max_pool_slices,
    "patches": max_pool_slices,
    "lax": max_pool_lax,
}


def forward_only(model: nn.Module) -> nn.Module:
    """The same network for a pass with no backward, as the backend's `forward_impl` (`backend.choices()`).

    The impls differ in what their *backward* pass costs; a forward pass alone runs fastest through
    XLA's convolution + `reduce_window` pool, `impl="lax"`, on XLA:CPU (benchmarks/RESULTS.md,
    distillation step), and that is XLA's own convolution on GPU/TPU as well.
    Parameters are shared, outputs equal to float32 rounding. Models without `impl` are returned as they are.
    """
    impl = getattr(model, "impl", None)
    wanted = backend.choices().forward_impl
    return model if impl is None or impl == wanted else model.clone(impl=wanted)


def for_attribution(model: nn.Module) -> nn.Module:
    """The same network (same parameters, outputs equal to float32 rounding) with the backend's attribution impl.

    Attributions run the network inside loops (integrated gradients' scan over path points,
    SmoothGrad's samples, PGD's steps, deletion curves). On CPU a `"lax_conv"` model runs as
    `"patches"`: XLA:CPU ran `lax.conv` inside a loop body about 2x slower than at the top level (an
    open XLA:CPU issue, jax-ml/jax#12868; far worse when weight gradients are taken in the loop),
    while the patch convolution's matrix products kept their speed: integrated gradients, 64 steps x
    16 images, 0.46-0.60 s with patches against 1.08-1.14 s with `lax_conv` (benchmarks/RESULTS.md).
    On GPU/TPU a `"patches"` model runs as `"lax_conv"`, XLA's own convolution (the patches move
    about 9x more activation data). The mapping is `backend.choices().attribution_impls`; other
    impls and models without `impl` are returned as they are.
    """
    return _run_as(model, backend.choices().attribution_impls)


def for_queries(model: nn.Module) -> nn.Module:
    """The same network with the impl `queries.ModelQueries` runs it with: `backend.choices().query_impls`.

    The queries call the network at the top level of a program (no loop around it), where XLA:CPU's
    own convolution compiled in about half the time of the patch convolution; on GPU/TPU a
    `"patches"` model runs as `"lax_conv"`, as for attributions.
    """
    return _run_as(model, backend.choices().query_impls)


def _run_as(model: nn.Module, impls: tuple[tuple[str, str], ...]) -> nn.Module:
    """`model` with its impl replaced as the (from, to) pairs say (unchanged when none applies or it has no impl)."""
    impl = getattr(model, "impl", None)
    wanted = dict(impls).get(impl, impl)
    return model if impl is None or wanted == impl else model.clone(impl=wanted)


def _check_impl(impl: str) -> None:
    if impl not in CONV_IMPLS:
        raise ValueError(f"impl={impl!r} is not known; use one of {sorted(CONV_IMPLS)}")


class Conv3x3(nn.Module):
    """3x3 SAME convolution with bias; parameters `kernel` [3, 3, c_in, c_out] and `bias` [c_out]."""

    features: int
    impl: str = "lax_conv"
    dtype: Any = jnp.float32  # compute dtype; the parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return CONV_IMPLS[self.impl](x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def _with_delta(name: str, value: jax.Array, deltas: Features | None, features: Features) -> jax.Array:
    """Adds `deltas[name]` (if given) to `value`, records it under `name`, and returns it."""
    if deltas is not None and name in deltas:
        value = value + deltas[name]
    features[name] = value
    return value


def _check_images(x: jax.Array, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects images [batch, h, w, c]; got x with shape {x.shape}")


def _check_deltas(deltas: Features | None, features: Features, model: str) -> None:
    unknown = sorted(set(deltas or {}) - set(features))
    if unknown:
        raise ValueError(f"{model} has no feature(s) {unknown} for deltas; it has {sorted(features)}")


def _output(logits: jax.Array, features: Features, deltas: Features | None, return_features: bool, model: str):
    _check_deltas(deltas, features, model)
    return (logits, features) if return_features else logits


# --------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    """Conv(3x3) -> ReLU -> 2x2 max-pool blocks, then dense layers and the class layer.

    Features: `conv{i}` (after ReLU, before pooling) for each conv block, `dense{i}` for each
    hidden dense layer (after ReLU).
    """

    num_classes: int
    conv_features: Sequence[int]
    dense_features: Sequence[int]
    impl: str = "lax_conv"
    dtype: Any = jnp.float32  # compute dtype (e.g. bfloat16 on TPU/GPU); parameters and logits stay float32

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        _check_images(x, type(self).__name__)
        _check_impl(self.impl)
        features: Features = {}
        h = x.astype(self.dtype)
        for i, width in enumerate(self.conv_features, start=1):
            h = nn.relu(Conv3x3(width, impl=self.impl, dtype=self.dtype, name=f"conv{i}")(h))
            h = _with_delta(f"conv{i}", h, deltas, features)
            h = POOL_IMPLS[self.impl](h)
        h = h.reshape(h.shape[0], -1)
        for i, width in enumerate(self.dense_features, start=1):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(h))
            h = _with_delta(f"dense{i}", h, deltas, features)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h).astype(jnp.float32)
        return _output(logits, features, deltas, return_features, type(self).__name__)


class SeedCNN(ConvNet):
    """The article's teacher: convs 64, 64, 128, 128 (3x3 SAME, ReLU, 2x2 SAME max-pool), dense 512, classes.

    SAME pooling makes any input size work; the flatten size follows from it
    (ceil(h/16) * ceil(w/16) * 128), which fixes the article's hard-coded 128 * 4 * 4.
    """

    conv_features: Sequence[int] = (64, 64, 128, 128)
    dense_features: Sequence[int] = (512,)


class SmallCNN(ConvNet):
    """A small student CNN: convs 16, 32, dense 64, classes (about 1/30 of SeedCNN's weights)."""

    conv_features: Sequence[int] = (16, 32)
    dense_features: Sequence[int] = (64,)


class MLP(nn.Module):
    """Flatten -> dense layers with ReLU -> class layer. Features `dense{i}`."""

    num_classes: int
    hidden: Sequence[int] = (128,)
    dtype: Any = jnp.float32  # compute dtype; parameters and logits stay float32

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        features: Features = {}
        h = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.hidden, start=1):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(h))
            h = _with_delta(f"dense{i}", h, deltas, features)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h).astype(jnp.float32)
        return _output(logits, features, deltas, return_features, type(self).__name__)


class Linear(nn.Module):
    """A linear classifier over PCA components of the flattened input.

    logits = W^T z + b,  z = (flatten(x) - mean) @ components^T

    The PCA (`mean` [d], `components` [k, d]) lives in the non-trainable variable collection
    `"pca"`; fill it with `set_pca(variables, pca_state)` after `init`. Parameters: `linear`
    (`kernel` [k, classes], `bias` [classes]). Features: `pca` (the components z, [batch, k]).
    """

    num_classes: int
    n_components: int

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        flat = x.reshape(x.shape[0], -1)
        mean = self.variable("pca", "mean", jnp.zeros, (flat.shape[-1],), jnp.float32)
        comps = self.variable(
            "pca", "components", lambda: jnp.eye(self.n_components, flat.shape[-1], dtype=jnp.float32)
        )
        features: Features = {}
        z = _with_delta("pca", jnp.matmul(flat - mean.value, comps.value.T, precision=backend.HIGHEST), deltas, features)
        logits = nn.Dense(self.num_classes, name="linear")(z)
        return _output(logits, features, deltas, return_features, type(self).__name__)


def set_pca(variables: dict, pca_state: Any) -> dict:
    """Returns `variables` with the `"pca"` collection set from a fitted `pca.PCA` (mean, components)."""
    return {**variables, "pca": {"mean": pca_state.mean, "components": pca_state.components}}


class SoftDecisionTree(nn.Module):
    """Soft binary decision tree (Frosst & Hinton 2017, "Distilling a Neural Network Into a Soft Decision Tree").

    Inner node i (breadth-first; children 2i+1 left, 2i+2 right) routes an example right with
    probability p_i(x) = sigmoid(beta * (x . w_i + b_i)), beta a learned inverse temperature
    (softplus-parameterised, starts at 1). The probability of reaching leaf l is the product of
    the routing probabilities on its path; leaf l holds a learned class distribution
    softmax(leaf_logits[l]). Output logits are the log of the path-weighted mixture
    log sum_l P_l(x) softmax(leaf_logits[l]), so softmax(logits) is the soft prediction.

    Features: `routing` [batch, 2^depth - 1] (p_i), `node_reach` [batch, 2^depth - 1]
    (probability of reaching node i), `path_probs` [batch, 2^depth] (sums to 1), `leaf_logits`
    [2^depth, classes] (broadcast-free: the same for every example).
    """

    depth: int
    num_classes: int

    @nn.compact
    def __call__(self, x, *, return_features: bool = False, deltas: Features | None = None):
        if self.depth < 1:
            raise ValueError(f"SoftDecisionTree depth must be >= 1; got depth={self.depth}")
        flat = x.reshape(x.shape[0], -1)
        n_inner, n_leaves = 2**self.depth - 1, 2**self.depth
        # x . w_i + b_i for every inner node; HIGHEST precision (as the leaf mixture below): the tree is
        # cheap, and its outputs are reported (accuracy, fidelity, leaf usage)
        decisions = nn.Dense(n_inner, precision=backend.HIGHEST, name="nodes")(flat)
        beta = nn.softplus(self.param("inverse_temperature", nn.initializers.constant(0.5413), ()))
        leaf_logits = self.param("leaf_logits", nn.initializers.normal(0.1), (n_leaves, self.num_classes))
        features: Features = {}
        routing = _with_delta("routing", nn.sigmoid(beta * decisions), deltas, features)
        node_reach, path_probs = path_probabilities(routing, self.depth)
        features.update(node_reach=node_reach, path_probs=path_probs, leaf_logits=leaf_logits)
        mixture = jnp.matmul(path_probs, jax.nn.softmax(leaf_logits, axis=-1), precision=backend.HIGHEST)
        logits = jnp.log(jnp.maximum(mixture, jnp.finfo(mixture.dtype).tiny))
        return _output(logits, features, deltas, return_features, type(self).__name__)


def path_probabilities(routing: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Probabilities of reaching every inner node and every leaf of a complete binary tree.

    reach(root) = 1; reach(2i+1) = reach(i) * (1 - p_i); reach(2i+2) = reach(i) * p_i.

    Args:
      routing: [batch, 2^depth - 1] right-routing probabilities p_i, breadth-first.
      depth: tree depth (>= 1).
    Returns:
      (node_reach [batch, 2^depth - 1], path_probs [batch, 2^depth]); each row of path_probs sums to 1.
    """
    level = jnp.ones((routing.shape[0], 1), routing.dtype)
    reach_levels = []
    for d in range(depth):
        reach_levels.append(level)
        p = routing[:, 2**d - 1 : 2 ** (d + 1) - 1]
        level = jnp.stack([level * (1 - p), level * p], axis=-1).reshape(routing.shape[0], -1)
    return jnp.concatenate(reach_levels, axis=-1), level


@compilation.run_once(static_argnames="depth")
def tree_hard_predict(routing: jax.Array, leaf_logits: jax.Array, depth: int) -> jax.Array:
    """Class predicted by following the most probable branch at every node to a single leaf.

    node_0 = 0;  node_{t+1} = 2 node_t + 1 + [p_{node_t} > 0.5];  leaf = node_depth - (2^depth - 1).
    Jitted (depth static): one compiled program per shape, not one per step of the walk.

    Args:
      routing: [batch, 2^depth - 1]; leaf_logits: [2^depth, classes].
    Returns:
      (leaf [batch] int32, class [batch] int32).
    """
    node = jnp.zeros((routing.shape[0],), jnp.int32)
    for _ in range(depth):
        go_right = jnp.take_along_axis(routing, node[:, None], axis=1)[:, 0] > 0.5
        node = 2 * node + 1 + go_right.astype(jnp.int32)
    leaf = node - (2**depth - 1)
    return leaf, jnp.argmax(leaf_logits[leaf], axis=-1).astype(jnp.int32)


class HintRegressor(nn.Module):
    """FitNets regressor: a 1x1 convolution (or dense layer for vectors) mapping a student feature to a teacher's width."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, name="proj")(x)


# --------------------------------------------------------------------------- helpers


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
        jax.eval_shape(lambda v: model.apply(v, sample_x), variables)
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
