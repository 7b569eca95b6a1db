"""The jitted, data-parallel train step (with DP-SGD when asked) and batched prediction.

A loss whose numbers (a distillation temperature, term weights) are run-time arguments is a
`LossWithSettings`: `make_train_step` compiles one program per (loss program, optimizer, mesh, DP-SGD)
and passes each model's settings to it, so models of one architecture trained with different numbers
share one compiled step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import compilation, parallel
from distill_jax.train._dpsgd import noisy_clipped_mean, per_example_value_and_grad
from distill_jax.train._state import MUTABLE, LossFn, TrainState, _all_finite, merge_mutable


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """Differentially private SGD settings (Abadi et al. 2016): every example's gradient is clipped to L2
    norm `l2_clip` and Gaussian noise of std `noise_multiplier * l2_clip` is added to their sum
    (`noisy_clipped_mean`); the optimizer then applies that gradient as any other.

    `expected_batch_size`: with Poisson sampling (`FitConfig(sampling="poisson")`, the batches carry a
    `mask`), the sum is divided by this fixed number, q * n, not by the batch's random size, which would
    itself depend on who was sampled; None divides by the batch's rows (fixed-size batches).
    """

    l2_clip: float
    noise_multiplier: float
    expected_batch_size: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class LossWithSettings:
    """A per-example loss whose numbers are an argument: `fn(params, extra, batch, teacher, key, settings)`.

    `settings` is a pytree of arrays (e.g. float32 scalars: a temperature, the weight of each term).
    `make_train_step` compiles one program per `fn` (with the optimizer, mesh and DP-SGD settings) and
    passes `settings` to it at run time, so two losses with the same `fn` and different settings
    share one compiled step; `fn` must therefore read its numbers from `settings`, never from
    constants it closes over. Called as a plain `LossFn` (`loss(params, extra, batch, teacher, key)`),
    it uses its own settings.
    """

    fn: Callable
    settings: Any

    def __call__(self, params, extra, batch, teacher, key):
        return self.fn(params, extra, batch, teacher, key, self.settings)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """mean over the batch of `values` [B, ...] (leading axis), counting only rows with mask 1."""
    if mask is None:
        return jnp.mean(values, axis=0)
    weights = mask.reshape((-1,) + (1,) * (values.ndim - 1)).astype(values.dtype)
    return jnp.sum(values * weights, axis=0) / jnp.maximum(jnp.sum(mask), 1.0)


def _gradients(loss_fn: LossFn, state, batch: dict, teacher, key: jax.Array, dp: DPSGD | None):
    """(mean loss, aux, gradient) of one step: the plain gradient of the mean, or DP-SGD's.

    A batch with a `mask` entry (Poisson sampling's padding) counts only its rows with mask 1; aux then
    comes back as means over those rows. DP-SGD: loss and aux are the means over the same per-example
    pass whose gradients are clipped and noised; example i's loss gets `fold_in(loss_key, i)`, so random
    views differ between examples.
    """
    batch = dict(batch)
    mask = batch.pop("mask", None)

    def mean_loss(params):
        losses, aux = loss_fn(params, state.extra, batch, teacher, key)
        if mask is not None:
            aux = {k: (v if k == MUTABLE else _masked_mean(v, mask)) for k, v in aux.items()}
        return _masked_mean(losses, mask), aux

    if dp is None:
        (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        return loss, aux, grads
    if jax.eval_shape(mean_loss, state.params)[1].get(MUTABLE):  # shapes only: the loss runs once, below
        raise ValueError("DP-SGD clips per-example gradients, but this model updates batch statistics "
                         "(a mutable collection), which mix the examples of a batch; use a model without them")
    loss_key, noise_key = jax.random.split(key)
    per_example = lambda params, b, k: loss_fn(params, state.extra, b, teacher, k)
    (losses, aux), per_grads = per_example_value_and_grad(per_example, state.params, batch, key=loss_key)
    grads = noisy_clipped_mean(per_grads, l2_clip=dp.l2_clip, noise_multiplier=dp.noise_multiplier,
                               key=noise_key, mask=mask, denominator=dp.expected_batch_size)
    return _masked_mean(losses, mask), {k: _masked_mean(v, mask) for k, v in aux.items()}, grads


def train_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, dp: DPSGD | None = None) -> Callable:
    """The un-jitted train step: (state, batch, teacher[, settings]) -> (state, metrics).

    `dp`: train with DP-SGD's clipped, noised gradient (`DPSGD`) instead of the gradient of the mean loss.
    `settings` (for a `LossWithSettings`): the loss's numbers for this call, in place of its own.

    metrics: `loss` (batch mean) and the batch mean of every aux entry but `aux["mutable"]`, whose
    collections are written into `state.extra` (`merge_mutable`). A step whose loss or gradient is
    not finite records its step number in `first_bad_step`; from then on the state (step, params,
    optimizer state, extra) stays exactly as it was before that step, so `fit` can save the last
    good state and stop.
    """

    def step(state: TrainState, batch: dict, teacher, settings=None) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        if settings is not None and not isinstance(loss_fn, LossWithSettings):
            raise TypeError(f"settings are for a LossWithSettings; this loss is a {type(loss_fn).__name__}")
        loss_now = loss_fn if settings is None else LossWithSettings(loss_fn.fn, settings)
        loss, aux, grads = _gradients(loss_now, state, batch, teacher, key, dp)
        aux = dict(aux)
        new_extra = merge_mutable(state.extra, aux.pop(MUTABLE, None))
        finite = jnp.isfinite(loss) & _all_finite(grads)
        good = finite & (state.first_bad_step < 0)  # after the first bad step the state stays frozen

        def update(grads, opt_state, params, new_extra, old_extra):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state, new_extra

        def keep(grads, opt_state, params, new_extra, old_extra):
            return params, opt_state, old_extra

        # A cond rather than a select over every leaf: the same result, and a faster step on XLA:CPU
        # (benchmarks/RESULTS.md).
        new_params, new_opt_state, new_extra = jax.lax.cond(
            good, update, keep, grads, state.opt_state, state.params, new_extra, state.extra
        )
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step)
        new_state = state.replace(
            step=jnp.where(good, state.step + 1, state.step),
            params=new_params,
            opt_state=new_opt_state,
            extra=new_extra,
            first_bad_step=first_bad,
        )
        metrics = {"loss": loss, **{k: jnp.mean(v) for k, v in aux.items()}}
        return new_state, metrics

    return step


def with_inputs(loss_fn: LossFn, inputs: Callable[[jax.Array], jax.Array]) -> LossFn:
    """`loss_fn` that reads `inputs(batch["x"])` as its `x`.

    Host batches stay as stored (e.g. uint8, a quarter of float32's bytes) until they are on the
    device; the conversion (e.g. `app._prepare.model_inputs`) runs inside the jitted step. A
    `LossWithSettings` stays one, its program shared by equal `(loss_fn.fn, inputs)`.
    """
    if isinstance(loss_fn, LossWithSettings):
        return LossWithSettings(_settings_on_inputs(loss_fn.fn, inputs), loss_fn.settings)

    def loss_on_inputs(params, extra, batch, teacher, key):
        return loss_fn(params, extra, {**batch, "x": inputs(batch["x"])}, teacher, key)

    return loss_on_inputs


@compilation.shared
def _settings_on_inputs(fn: Callable, inputs: Callable) -> Callable:
    def loss_on_inputs(params, extra, batch, teacher, key, settings):
        return fn(params, extra, {**batch, "x": inputs(batch["x"])}, teacher, key, settings)

    return loss_on_inputs


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh, *,
                    dp: DPSGD | None = None) -> Callable:
    """`train_step_fn` jitted with explicit shardings over `mesh` and the old state donated: `(state, batch,
    teacher) -> (state, metrics)`.

    A `LossWithSettings` gets the program of its `fn` (one per `fn`, optimizer, mesh and `dp`, shared by every
    call that passes the same ones; `make_optimizer` gives equal budgets the same optimizer) with its
    settings placed on the mesh once and passed at every call.
    """
    if isinstance(loss_fn, LossWithSettings):
        return _SettingsStep(_shared_step(loss_fn.fn, optimizer, mesh, dp),
                             parallel.replicate(loss_fn.settings, mesh))
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(
        train_step_fn(loss_fn, optimizer, dp=dp),
        in_shardings=(repl, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


@compilation.shared
def _shared_step(fn: Callable, optimizer: optax.GradientTransformation, mesh, dp: DPSGD | None) -> Callable:
    """The jitted `(state, batch, teacher, settings)` step of `LossWithSettings(fn, ...)`."""
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(
        train_step_fn(LossWithSettings(fn, None), optimizer, dp=dp),
        in_shardings=(repl, data, repl, repl),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


class _SettingsStep:
    """A shared step program with one loss's settings bound: called as `(state, batch, teacher)`."""

    def __init__(self, program: Callable, settings):
        self.program, self.settings = program, settings

    def __call__(self, state, batch, teacher):
        return self.program(state, batch, teacher, self.settings)

    def lower(self, state, batch, teacher):
        return self.program.lower(state, batch, teacher, self.settings)


def make_predict_fn(apply_fn: Callable, mesh) -> Callable:
    """Jitted `(variables, x) -> logits` with the batch sharded over `mesh`."""
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(apply_fn, in_shardings=(repl, data), out_shardings=data)


def predict(predict_fn: Callable, variables, x: np.ndarray, *, batch_size: int, mesh) -> np.ndarray:
    """Logits for every example of `x` (the last batch is padded, the padding dropped).

    Every process passes the same full `x`; under multi-host each feeds its own share of
    every batch and the logits are gathered back, so every process returns all of them.

    Args:
      predict_fn: from `make_predict_fn`.
      x: [n, ...] host array.
      batch_size: global batch; must divide by the number of devices.
    Returns:
      [n, classes] numpy array.
    """
    parallel.check_batch_size(batch_size, mesh, what="eval batch_size")
    local = parallel.local_batch_size(batch_size)
    lo = jax.process_index() * local
    variables = parallel.replicate(variables, mesh)  # once, not with every batch
    out = []
    for start in range(0, len(x), batch_size):
        chunk, pad = parallel.pad_to_multiple(x[start : start + batch_size], batch_size)
        logits = predict_fn(variables, parallel.shard_batch(chunk[lo : lo + local], mesh))
        out.append(parallel.gather(logits)[: batch_size - pad])
    return np.concatenate(out)


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of host logits [n, classes] against labels [n]."""
    return float(np.mean(np.argmax(logits, -1) == labels)) if len(labels) else math.nan
