"""The job's data stage: load, hold out unlabelled images, fit the standardizer and the PCA, and
the host-side input pipeline that standardizes batches inside the jitted step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import parallel
from distill_jax.data._batches import process_slice
from distill_jax.data._dataset import Dataset, as_float01
from distill_jax.data._sources import load
from distill_jax.data.pca import fit_batches
from distill_jax.data.preprocess import apply, standardize_fit
from distill_jax.distill.tuning import holdout_split


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A `Dataset` as the job trains on it, with the scaler and PCA fitted on its training images.

    `data.x_train`/`data.x_test` are [n, h, w, c] host arrays exactly as loaded: uint8 in [0, 255] for 8-bit
    sources (a quarter of the memory of float32), float32 in [0, 1] otherwise. Models never see them
    directly: `inputs(x)` turns a batch into standardized float32 model inputs, on the device and
    inside the jitted steps. The dataset's fields read through (`prep.x_train` is `prep.data.x_train`).
    """

    data: Dataset
    scaler: Any
    pca: Any

    x_train = property(lambda self: self.data.x_train)
    y_train = property(lambda self: self.data.y_train)
    x_test = property(lambda self: self.data.x_test)
    y_test = property(lambda self: self.data.y_test)
    num_classes = property(lambda self: self.data.num_classes)
    class_names = property(lambda self: self.data.class_names)
    name = property(lambda self: self.data.name)
    x_transfer = property(lambda self: self.data.x_transfer)  # unlabelled transfer images (see prepare_data)

    def with_data(self, **fields) -> "Prepared":
        """The same scaler and PCA over a dataset with `fields` replaced (e.g. a validation split)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **fields))

    def inputs(self, x) -> jax.Array:
        """Model inputs [n, h, w, c] float32 for stored images `x` (see `model_inputs`)."""
        return model_inputs(self.scaler, x)


def model_inputs(scaler, x) -> jax.Array:
    """Standardized float32 model inputs from stored images; jittable.

    Formula: ``u = x / 255`` for uint8 ``x`` (``u = x`` for float images in [0, 1]), then
    ``(u - mean) / std`` with the scaler fitted on the training images.

    Args:
      scaler: a `preprocess.Standardizer` (or any `preprocess` scaler) fitted on ``u``.
      x: [n, h, w, c] uint8 or float.
    Returns:
      [n, h, w, c] float32.
    """
    x = jnp.asarray(x)
    unit = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    return apply(scaler, unit)


def batched_inputs(scaler, x: np.ndarray, *, batch_size: int = 4096):
    """Flattened model inputs [b, h*w*c] of consecutive batches of `x` (streamed, never all at once)."""
    for start in range(0, len(x), batch_size):
        yield _flat_inputs(scaler, x[start : start + batch_size])


@jax.jit  # module level: one program per batch shape for the whole process (the scaler is an argument)
def _flat_inputs(scaler, x) -> jax.Array:
    return model_inputs(scaler, x).reshape(x.shape[0], -1)


def prepare_data(c) -> Prepared:
    """Loads the dataset, fits the per-channel standardizer and the PCA of the flattened standardized train images.

    The images stay as loaded (uint8 for 8-bit sources); the PCA streams standardized batches
    (`pca.fit_batches`), so no float copy of the training set is kept. Under multi-host,
    `x_train`/`y_train` are this process's share of the training split and the scaler and PCA fitted
    on process 0's share are broadcast, so every process preprocesses alike.

    The transfer set (`x_transfer`) is the dataset's own (`transfer.split`, an npz `x_transfer`) plus
    `transfer.unlabelled_fraction` of each class of the training images, held back without labels
    (`hold_out_unlabelled`). Scaler and PCA are fitted on the labelled training images.
    """
    transfer = c.get("transfer", {})
    ds = load(c.dataset, data_dir=c.data_dir, image_size=c.image_size, seed=c.seed,
                   test_fraction=c.test_fraction, keep_uint8=True, transfer_split=transfer.get("split") or None)
    x_train, y_train, x_transfer = ds.x_train, ds.y_train, ds.x_transfer
    if c.get("train_limit", 0):  # a quick run on the first N training images
        x_train, y_train = x_train[: c.train_limit], y_train[: c.train_limit]
    if jax.process_count() > 1 and not c.dataset.startswith("tfds:"):  # tfds loaders read only their own share
        share = process_slice(len(x_train))
        x_train, y_train = x_train[share], y_train[share]
        x_transfer = None if x_transfer is None else x_transfer[process_slice(len(x_transfer))]
    if transfer.get("unlabelled_fraction", 0.0):
        x_train, y_train, x_transfer = hold_out_unlabelled(x_train, y_train, x_transfer,
                                                           transfer.unlabelled_fraction, seed=c.seed)
    scaler = standardize_fit(as_float01(x_train))
    n_components = min(c.pca_components, len(x_train), int(np.prod(x_train.shape[1:])))
    pca_state = fit_batches(batched_inputs(scaler, x_train), n_components)
    scaler, pca_state = parallel.broadcast_from_main((scaler, pca_state))
    kept = dataclasses.replace(ds, x_train=x_train, y_train=np.asarray(y_train, np.int32),
                               y_test=np.asarray(ds.y_test, np.int32), class_names=tuple(ds.class_names),
                               x_transfer=x_transfer)
    return Prepared(kept, scaler, pca_state)


def hold_out_unlabelled(x: np.ndarray, y: np.ndarray, x_transfer: np.ndarray | None, fraction: float, *,
                        seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moves `fraction` of each class of (x, y) into the transfer set, without their labels.

    Returns (x_labelled, y_labelled, x_transfer): the kept images in their order, and the
    held-back ones appended to `x_transfer` (when given). Deterministic in `seed`
    (`tuning.holdout_split`).
    """
    keep, held = holdout_split(y, fraction, seed=seed)
    extra = x[held]
    return x[keep], y[keep], extra if x_transfer is None else np.concatenate([x_transfer, extra])


def validation_split(prep: Prepared, fraction: float, seed: int) -> Prepared:
    """`prep` with `fraction` of each class of the training images moved to the evaluation side.

    The returned `x_test`/`y_test` are the held-out training images (never the test set). The scaler
    and PCA stay those fitted on every training image: they use no labels.
    """
    fit, val = holdout_split(prep.y_train, fraction, seed=seed)
    return prep.with_data(x_train=prep.x_train[fit], y_train=prep.y_train[fit], x_test=prep.x_train[val],
                          y_test=prep.y_train[val])
