"""Networks: the article's 4-conv teacher (`SeedCNN`), a small CNN, an MLP, and FitNets' hint
regressor.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models._layers import POOL_IMPLS, Conv3x3, Features, _check_images, _check_impl, _output, _with_delta


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
        pool = POOL_IMPLS[self.impl]
        # max-pool and ReLU commute (both monotone), and their gradients agree wherever the maximum is
        # unique or positive. Pooling first runs the ReLU and its backward on a quarter of the
        # elements (SeedCNN's gradient 1.2x faster on XLA:CPU; benchmarks/RESULTS.md, "Train step: where
        # XLA:CPU lost to PyTorch"); the features need the ReLU's output unpooled.
        pool_first = not return_features and deltas is None
        h = x.astype(self.dtype)
        for i, width in enumerate(self.conv_features, start=1):
            h = Conv3x3(width, impl=self.impl, dtype=self.dtype, name=f"conv{i}")(h)
            if pool_first:
                h = nn.relu(pool(h))
            else:
                h = _with_delta(f"conv{i}", nn.relu(h), deltas, features)
                h = pool(h)
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


class HintRegressor(nn.Module):
    """FitNets regressor: a 1x1 convolution (or dense layer for vectors) mapping a student feature to a teacher's width."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, name="proj")(x)
