"""Stored images stay uint8 on the host; models see standardized inputs made on the device; class-stratified samples."""
import gzip
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import distill
from distill_jax.app import _audit, _fit, _prepare, cli, config


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A small 10-class IDX dataset: 12x12 images whose mean brightness encodes the class (learnable)."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 100)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 12, 12)) + labels[:, None, None] * 20
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return str(root)


def _config(spec):
    c = config.apply_smoke(config.default_config())
    c.dataset = spec
    c.pca_components = 8
    return c


def test_stored_uint8_images_and_model_inputs(idx_dir):
    prep = _prepare.prepare_data(_config(f"idx:{idx_dir}"))
    assert prep.x_train.dtype == np.uint8 and prep.x_test.dtype == np.uint8  # 1 byte per pixel on the host
    unit = prep.x_train.astype(np.float64) / 255.0
    expected = (unit - unit.mean()) / unit.std()  # one channel: per-channel standardization
    np.testing.assert_allclose(np.asarray(prep.inputs(prep.x_train)), expected, rtol=1e-4, atol=1e-4)
    # the PCA (variance with n - 1, as scikit-learn) was fitted on the standardized inputs, streamed in batches
    flat = expected.reshape(len(expected), -1)
    top = np.linalg.eigh(np.cov(flat, rowvar=False))[0][::-1][:8]
    np.testing.assert_allclose(np.asarray(prep.pca.explained_variance), top, rtol=1e-3)


def test_model_inputs_of_float_images_match_uint8_ones(idx_dir):
    prep = _prepare.prepare_data(_config(f"idx:{idx_dir}"))
    as_float = prep.x_test.astype(np.float32) / 255.0
    np.testing.assert_allclose(np.asarray(prep.inputs(as_float)), np.asarray(prep.inputs(prep.x_test)), atol=1e-6)


def test_test_sample_is_stratified_by_class(idx_dir):
    prep = _prepare.prepare_data(_config(f"idx:{idx_dir}"))
    x, y = _audit.test_sample(prep, 10, seed=0)
    assert sorted(np.asarray(y).tolist()) == list(range(10))  # one image of every class
    assert x.dtype == jnp.float32 and x.shape == (10, 12, 12, 1)


def test_test_samples_are_test_sample_of_each_size_with_their_indices(idx_dir):
    prep = _prepare.prepare_data(_config(f"idx:{idx_dir}"))
    for n, (x, y, index) in zip((10, 3, 17), _audit.test_samples(prep, (10, 3, 17), seed=4)):
        want_x, want_y = _audit.test_sample(prep, n, seed=4)
        np.testing.assert_array_equal(index, _audit.test_sample_indices(prep, n, seed=4))
        np.testing.assert_array_equal(y, prep.y_test[index])
        np.testing.assert_array_equal(y, np.asarray(want_y))
        np.testing.assert_allclose(x, np.asarray(want_x), rtol=1e-6, atol=1e-6)


def test_purpose_keys_differ_and_repeat():
    a, b = _audit.purpose_key(0, "smoothgrad"), _audit.purpose_key(0, "attack")
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(_audit.purpose_key(0, "smoothgrad")))


def test_uint8_idx_students_train_from_cached_teacher_logits_and_attention_maps(idx_dir, monkeypatch):
    """The pipeline's stages on uint8 IDX images: the teacher cache is built from the stored uint8 images and
    holds logits and attention maps, and the attention and linear students train from it (no audit: the
    CLI run below, marked slow, adds it)."""
    from distill_jax import parallel
    from distill_jax.app import _prepare

    c = _config(f"idx:{idx_dir}")
    c.teacher.epochs = 10
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    teacher = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    assert np.mean(teacher.test_logits.argmax(-1) == prep.y_test) > 0.3  # brightness separates the classes
    cached = []
    real = distill.cache_teacher_outputs

    def spy(teacher_model, teacher_vars, x, labels, needs, **kw):
        out = real(teacher_model, teacher_vars, x, labels, needs, **kw)
        cached.append((x.dtype, {k: v.shape for k, v in out.items()}))
        return out

    monkeypatch.setattr(_fit, "cache_teacher_outputs", spy)
    students = [_fit.train_student(name, kind, method, prep, teacher, c, mesh, None, show_progress=False)
                for name, kind, method in (("cnn-kd+attention", "cnn", "kd+attention"), ("linear-kd", "linear", "kd"))]
    n = len(prep.y_train)
    assert cached[0] == (np.uint8, {"teacher_logits": (n, 10), "teacher_attention/conv1": (n, 12, 12),
                                    "teacher_attention/conv2": (n, 6, 6)})
    assert cached[1] == (np.uint8, {"teacher_logits": (n, 10)})
    for s in students:
        assert s.test_logits.shape == (100, 10) and np.isfinite(s.history[-1]["loss"])


@pytest.mark.slow  # a whole CLI run with its audit (about a minute): the stages are tested above, the audit in test_cli
def test_uint8_idx_run_with_attention_cache_end_to_end(idx_dir, tmp_path):
    """The CLI on an IDX dataset: uint8 storage, cached attention maps, the linear student over PCA, a report."""
    workdir = str(tmp_path / "run")
    code = cli.main(["run", "--smoke", "--workdir", workdir, "--no-progress", "--dataset", f"idx:{idx_dir}",
                     "--set", "students=cnn-kd+attention,linear-kd", "--set", "pca_components=8", "--set", "teacher.epochs=10",
                     "--set", "explain.methods=('saliency','integrated_gradients')"])
    assert code == 0
    m = json.load(open(os.path.join(workdir, "metrics.json")))
    assert m["models"]["teacher"]["accuracy"] > 0.3  # brightness separates the classes: far above chance (0.1)
    assert set(m["models"]) == {"teacher", "cnn-kd+attention", "linear-kd"}
