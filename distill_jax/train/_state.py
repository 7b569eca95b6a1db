"""Train states and optimizers: `TrainState`, `create_state`, optax optimizers and schedules by
name, and merging of mutable collections (batch statistics).
"""
from __future__ import annotations

import collections.abc
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from distill_jax import compilation

LossFn = Callable[..., tuple[jax.Array, dict]]


MUTABLE = "mutable"  # aux key of a loss function's updated non-trainable collections (see the module docstring)


class NonFiniteError(FloatingPointError):
    """Raised when a loss or gradient became NaN/inf; the last good state is kept."""


class Interrupted(KeyboardInterrupt):
    """Raised by `fit` after SIGINT/SIGTERM, once a checkpoint of the current state is written."""


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped.

    Fields: step (int32 scalar), params (trainable pytree), opt_state, extra (non-trainable
    variable collections: updated only where the loss function returns them as `aux["mutable"]`), key (PRNG key; step keys are fold_in(key, step)),
    first_bad_step (int32 scalar; -1 while every loss and gradient has been finite).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any
    key: jax.Array
    first_bad_step: jax.Array


def create_state(params, optimizer: optax.GradientTransformation, *, key: jax.Array, extra=None) -> TrainState:
    """A fresh TrainState at step 0 (params and extra are copied: the train step donates its state's buffers).

    The copies, `optimizer.init` and the counters are one compiled program, cached per `optimizer.init` and
    parameter shapes (op by op they were one small program per leaf shape and optimizer statistic).
    """
    init = optimizer.init
    if not isinstance(init, collections.abc.Hashable):
        init = functools.partial(init)  # hashed by identity: still one program, not cached across calls
    step, params, opt_state, extra, first_bad_step = _fresh_state(params, extra, init)
    return TrainState(step=step, params=params, opt_state=opt_state, extra={} if extra is None else extra, key=key,
                      first_bad_step=first_bad_step)


@compilation.run_once(static_argnums=2)
def _fresh_state(params, extra, init):
    # jnp.copy: the outputs must be new buffers even where XLA could forward an input unchanged
    params = jax.tree_util.tree_map(jnp.copy, params)
    extra = jax.tree_util.tree_map(jnp.copy, extra)
    return jnp.zeros((), jnp.int32), params, init(params), extra, jnp.full((), -1, jnp.int32)


def _sgd(learning_rate, *, momentum, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum or None))


def _adam(learning_rate, *, momentum, weight_decay):
    del momentum
    return optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)


OPTIMIZERS = {"sgd": _sgd, "adam": _adam}


SCHEDULES = {
    "constant": lambda lr, total: optax.constant_schedule(lr),
    "cosine": lambda lr, total: optax.cosine_decay_schedule(lr, max(total, 1)),
}


@compilation.shared
def make_optimizer(name: str, *, learning_rate: float, total_steps: int, momentum: float = 0.9,
                   weight_decay: float = 0.0, schedule: str = "constant",
                   extra: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """An optax optimizer by name (`sgd`, `adam`) with a learning-rate schedule (`constant`, `cosine`).

    `extra` (e.g. a pruning mask transformation) is chained after the update. The same arguments give
    the same object (`compilation.shared`), so models trained with the same budget share their compiled
    train step and state initialisation.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not known; use one of {sorted(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not known; use one of {sorted(SCHEDULES)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}")
    lr = SCHEDULES[schedule](learning_rate, total_steps)
    opt = OPTIMIZERS[name](lr, momentum=momentum, weight_decay=weight_decay)
    return optax.chain(opt, extra) if extra is not None else opt


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def merge_mutable(extra, updates):
    """`extra` with the collections in `updates` replaced; the others (e.g. a PCA) stay as they were.

    The result has exactly the tree structure of `extra` (so a jitted step keeps one compiled program).

    Args:
      extra: the state's non-trainable collections, name -> pytree.
      updates: name -> pytree for some of those names (a loss function's `aux["mutable"]`), or None.
    Raises:
      ValueError: an updated collection that `extra` lacks, or one whose leaves differ in number or shape.
    """
    if not updates:
        return extra
    unknown = sorted(set(updates) - set(extra))
    if unknown:
        raise ValueError(f"loss_fn returned mutable collection(s) {unknown} that state.extra lacks (it has "
                         f"{sorted(extra)}); create the state with extra= holding their initial values")
    new = dict(extra)
    for name, value in updates.items():
        # FrozenDicts flatten in insertion order, dicts in sorted order: compare and rebuild as plain dicts
        old, value = flax.core.unfreeze(extra[name]), flax.core.unfreeze(value)
        old_shapes = jax.tree_util.tree_map(jnp.shape, old)
        new_shapes = jax.tree_util.tree_map(jnp.shape, value)
        if old_shapes != new_shapes:
            raise ValueError(f"loss_fn returned mutable collection {name!r} shaped {new_shapes}; "
                             f"state.extra[{name!r}] is shaped {old_shapes}")
        merged = jax.tree_util.tree_map(lambda n, o: jnp.asarray(n, o.dtype), value, old)
        new[name] = flax.core.freeze(merged) if isinstance(extra[name], flax.core.FrozenDict) else merged
    return type(extra)(new)
