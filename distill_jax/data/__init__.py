"""Inputs: loading data sets, batching, augmentation, standardization (`preprocess`) and PCA in jnp (`pca`).
"""
from distill_jax.data import pca, preprocess
from distill_jax.data._augment import PERTURBATIONS, augment, mixup, perturb, perturb_some
from distill_jax.data._batches import (
    eval_batches,
    num_train_batches,
    process_slice,
    stratified_indices,
    train_batches,
)
from distill_jax.data._dataset import Dataset, as_float01
from distill_jax.data._idx import images_from_idx, read_idx
from distill_jax.data._sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    digits_arrays,
    load,
)

__all__ = [
    "Dataset",
    "load",
    "as_float01",
    "digits_arrays",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "images_from_idx",
    "num_train_batches",
    "train_batches",
    "eval_batches",
    "process_slice",
    "stratified_indices",
    "augment",
    "perturb",
    "perturb_some",
    "PERTURBATIONS",
    "mixup",
    "pca",
    "preprocess",
]
