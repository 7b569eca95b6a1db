"""Loaders of image files: a folder of class sub-folders (ImageFolder layout) and tensorflow-datasets
(array_record, read through `tfds.data_source`), resized on device to one size.
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data._batches import process_slice
from distill_jax.data._dataset import Dataset, _make_dataset, _split, _split_indices, as_float01

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


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
