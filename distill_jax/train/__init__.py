"""Jitted, data-parallel training: train states and optimizers, the train step (with DP-SGD), batch
sampling (shuffled, or Poisson for DP-SGD), the fit loop.
"""
from distill_jax.train._dpsgd import (
    clip_per_example,
    dp_sgd_gradients,
    noisy_clipped_mean,
    per_example_gradients,
    per_example_value_and_grad,
)
from distill_jax.train._fit import (
    FitConfig,
    array_epochs,
    epoch_batch_indices,
    fit,
    progress_bar,
    steps_per_epoch,
    stream_epochs,
    total_steps,
)
from distill_jax.train._sampling import poisson_batch_cap, poisson_epoch_batches, poisson_overflow_probability
from distill_jax.train._state import (
    Interrupted,
    NonFiniteError,
    TrainState,
    create_state,
    make_optimizer,
    merge_mutable,
)
from distill_jax.train._step import (
    DPSGD,
    LossWithSettings,
    accuracy_from_logits,
    make_predict_fn,
    make_train_step,
    predict,
    train_step_fn,
    with_inputs,
)

__all__ = [
    "TrainState",
    "create_state",
    "make_optimizer",
    "merge_mutable",
    "NonFiniteError",
    "Interrupted",
    "DPSGD",
    "LossWithSettings",
    "train_step_fn",
    "with_inputs",
    "make_train_step",
    "make_predict_fn",
    "predict",
    "accuracy_from_logits",
    "FitConfig",
    "fit",
    "array_epochs",
    "stream_epochs",
    "epoch_batch_indices",
    "poisson_epoch_batches",
    "poisson_batch_cap",
    "poisson_overflow_probability",
    "steps_per_epoch",
    "total_steps",
    "progress_bar",
    "per_example_value_and_grad",
    "per_example_gradients",
    "clip_per_example",
    "noisy_clipped_mean",
    "dp_sgd_gradients",
]
