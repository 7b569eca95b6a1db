"""Jitted, data-parallel training: train states and optimizers, the train step (with DP-SGD), the fit loop.
"""
from distill_jax.train._state import (
    TrainState,
    create_state,
    make_optimizer,
    merge_mutable,
    NonFiniteError,
    Interrupted,
)
from distill_jax.train._step import (
    DPSGD,
    train_step_fn,
    with_inputs,
    make_train_step,
    make_predict_fn,
    predict,
    accuracy_from_logits,
)
from distill_jax.train._fit import (
    FitConfig,
    fit,
    array_epochs,
    stream_epochs,
    epoch_batch_indices,
    steps_per_epoch,
    total_steps,
    progress_bar,
)
from distill_jax.train._dpsgd import (
    per_example_value_and_grad,
    per_example_gradients,
    clip_per_example,
    noisy_clipped_mean,
    dp_sgd_gradients,
)

__all__ = [
    "TrainState",
    "create_state",
    "make_optimizer",
    "merge_mutable",
    "NonFiniteError",
    "Interrupted",
    "DPSGD",
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
    "steps_per_epoch",
    "total_steps",
    "progress_bar",
    "per_example_value_and_grad",
    "per_example_gradients",
    "clip_per_example",
    "noisy_clipped_mean",
    "dp_sgd_gradients",
]
