"""The `Dataset` every loader returns, and the checks and splits every loader shares.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays: x_* [n, h, w, c] (NHWC), y_* [n] int32 in [0, num_classes).

    x_* is float32 in [0, 1], except after ``load(..., keep_uint8=True)`` from a source whose images are uint8
    (idx, fashion_mnist, folder, tfds, npz with uint8 arrays): then x_* is uint8 in [0, 255] (a quarter of the
    memory) and callers convert batches with ``as_float01(x)`` (x / 255 as float32).

    ``x_transfer`` [m, h, w, c] (or None): unlabelled images of the same kind, a transfer set for
    distillation (Hinton et al. 2015): the teacher labels them and students learn from it there too.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    x_transfer: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of one image."""
        return tuple(int(s) for s in self.x_train.shape[1:])


def as_float01(x):
    """Images as float32 in [0, 1]: uint8 [..] -> x / 255 (one float32 allocation); float -> float32 (no copy if
    already float32). Works on numpy arrays and on jax arrays (also inside jit), returning the same kind.

    Raises ValueError for any other dtype (e.g. int16 images, whose scale is unknown).
    """
    if isinstance(x, jax.Array):
        if x.dtype == jnp.uint8:
            return x.astype(jnp.float32) / jnp.float32(255.0)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(jnp.float32)
        raise ValueError(f"as_float01 takes uint8 (0..255) or floating (0..1) images, got dtype {x.dtype}")
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return np.divide(x, np.float32(255.0), dtype=np.float32)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    raise ValueError(f"as_float01 takes uint8 (0..255) or floating (0..1) images, got dtype {x.dtype}")


def _check_arrays(x, y, split: str, num_classes: int, name: str, *,
                  keep_uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x NHWC, y [n] int32) or raises ValueError naming what is wrong with ``split``.

    x comes back float32 in [0, 1]; with ``keep_uint8`` uint8 input stays uint8 [0, 255] (not copied).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{name}: x_{split} must be images [n, h, w, c] or [n, h, w], got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x if keep_uint8 else as_float01(x)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{name}: x_{split} must be uint8 (0..255) or floating (0..1), got dtype {x.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name}: y_{split} must be 1-D labels [n], got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}: x_{split} has {len(x)} examples but y_{split} has {len(y)}; they must match")
    if len(x) == 0:
        raise ValueError(f"{name}: the {split} split has zero examples")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: y_{split} must hold integer class labels, got dtype {y.dtype}")
    if x.dtype != np.uint8 and not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ValueError(f"{name}: x_{split} has {bad} NaN or inf values; clean them before loading")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: y_{split} has labels in [{lo}, {hi}], outside [0, {num_classes}) "
                         f"for num_classes={num_classes}")
    return x, y.astype(np.int32)


def _make_dataset(x_train, y_train, x_test, y_test, *, num_classes: int | None = None,
                  class_names=None, name: str, keep_uint8: bool = False, x_transfer=None) -> Dataset:
    """Validates the arrays and builds a Dataset (num_classes defaults to 1 + the largest train label).

    With ``keep_uint8``, images stay uint8 when x_train, x_test (and x_transfer) are all uint8 (else all
    become float32).
    """
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else _infer_num_classes(y_train)
    images = [x_train, x_test] + ([] if x_transfer is None else [x_transfer])
    keep = bool(keep_uint8) and all(np.asarray(x).dtype == np.uint8 for x in images)
    x_train, y_train = _check_arrays(x_train, y_train, "train", num_classes, name, keep_uint8=keep)
    x_test, y_test = _check_arrays(x_test, y_test, "test", num_classes, name, keep_uint8=keep)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ in shape")
    if x_transfer is not None:
        # unlabelled: checked as images only (the zero labels stand in for the missing ones)
        x_transfer, _ = _check_arrays(x_transfer, np.zeros(len(x_transfer), np.int32), "transfer", num_classes,
                                      name, keep_uint8=keep)
        if x_transfer.shape[1:] != x_train.shape[1:]:
            raise ValueError(f"{name}: transfer images {x_transfer.shape[1:]} and train images "
                             f"{x_train.shape[1:]} differ in shape")
    present = np.unique(y_train)
    if len(present) < 2:
        raise ValueError(f"{name}: the training split has a single class ({present.tolist()}); "
                         f"classification needs at least 2")
    if num_classes < 2:
        raise ValueError(f"{name}: num_classes={num_classes}; classification needs at least 2 classes")
    names = tuple(str(c) for c in class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{name}: {len(names)} class names for {num_classes} classes")
    return Dataset(x_train, y_train, x_test, y_test, int(num_classes), names, name, x_transfer)


def _infer_num_classes(y) -> int:
    """1 + the largest label when the labels are finite numbers (bad labels are reported by _check_arrays)."""
    y = np.asarray(y)
    if y.size == 0 or not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
        return 0
    return int(np.max(y)) + 1


def _split_indices(n: int, *, seed: int, test_fraction: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of n examples: a permutation drawn from ``seed``, its first
    round(n * test_fraction) entries held out (at least one example each side).

    It depends only on (n, seed, test_fraction), so every process that splits the same n examples holds
    out the same test set.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"{name}: {n} example(s) cannot be split into train and test")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def _split(x, y, *, seed: int, test_fraction: float, name: str):
    """Shuffles with ``seed`` and holds out round(n * test_fraction) examples (at least one each side)."""
    train, test = _split_indices(len(x), seed=seed, test_fraction=test_fraction, name=name)
    return x[train], y[train], x[test], y[test]
