"""Inputs: loading data sets, batching, augmentation, standardization (`preprocess`) and PCA in jnp (`pca`).
"""
from distill_jax.data._sources import (
    Dataset,
    load,
    as_float01,
    digits_arrays,
    FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
)
from distill_jax.data._idx import read_idx, images_from_idx
from distill_jax.data._batches import (
    num_train_batches,
    train_batches,
    eval_batches,
    process_slice,
    stratified_indices,
)
from distill_jax.data._augment import augment, mixup
from distill_jax.data import pca
from distill_jax.data import preprocess

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
    "mixup",
    "pca",
    "preprocess",
]
