"""Transfer sets: unlabelled images the teacher labels, seen only by the students that learn from it."""

import jax
import numpy as np
import pytest

from distill_jax import data, distill, parallel
from distill_jax.app import _fit, _prepare, _settings, config


def _npz(tmp_path, *, transfer_shape=(30, 8, 8)):
    rng = np.random.default_rng(0)
    path = tmp_path / "with_transfer.npz"
    y_train, y_test = np.arange(60) % 3, np.arange(15) % 3
    np.savez(path, x_train=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y_train=y_train,
             x_test=rng.integers(0, 256, (15, 8, 8), dtype=np.uint8), y_test=y_test,
             x_transfer=rng.integers(0, 256, transfer_shape, dtype=np.uint8))
    return str(path)


def test_npz_transfer_images_load_unlabelled_and_with_the_same_dtype(tmp_path):
    ds = data.load(f"npz:{_npz(tmp_path)}", keep_uint8=True)
    assert ds.x_transfer.shape == (30, 8, 8, 1) and ds.x_transfer.dtype == np.uint8
    assert data.load(f"npz:{_npz(tmp_path)}").x_transfer.dtype == np.float32  # converted like x_train
    assert data.load("digits").x_transfer is None


def test_transfer_images_of_another_shape_and_transfer_split_outside_tfds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="transfer images .* differ in shape"):
        data.load(f"npz:{_npz(tmp_path, transfer_shape=(30, 9, 8))}")
    with pytest.raises(ValueError, match="transfer_split='unlabelled' names a tfds split"):
        data.load("digits", transfer_split="unlabelled")


def test_hold_out_unlabelled_moves_a_share_of_every_class():
    y = np.repeat(np.arange(4), 25)
    x = np.arange(100)[:, None, None, None].astype(np.uint8)
    x_l, y_l, x_t = _prepare.hold_out_unlabelled(x, y, None, 0.2, seed=3)
    assert len(x_t) == 20 and len(x_l) == 80
    assert np.bincount(y_l).tolist() == [20, 20, 20, 20]  # 5 of each class's 25 held back
    assert sorted(np.r_[x_l.ravel(), x_t.ravel()].tolist()) == list(range(100))  # a partition
    np.testing.assert_array_equal(y_l, y[x_l.ravel()])  # labels stay with their images
    existing = np.full((7, 1, 1, 1), 200, np.uint8)
    _, _, both = _prepare.hold_out_unlabelled(x, y, existing, 0.2, seed=3)
    assert len(both) == 27 and np.all(both[:7] == 200)  # appended after the dataset's own transfer images


def test_config_refuses_a_bad_unlabelled_fraction():
    c = config.default_config()
    c.transfer.unlabelled_fraction = 1.0
    with pytest.raises(ValueError, match="transfer.unlabelled_fraction"):
        config.validate(c)


@pytest.fixture(scope="module")
def transfer_run():
    """digits with half of each class held back unlabelled, and a 'teacher' that always says class 3."""
    c = config.apply_smoke(config.default_config())
    c.transfer.unlabelled_fraction = 0.5
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    model, extra = _settings.build_model("mlp", c, prep.num_classes, prep.pca)
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), prep.inputs(prep.x_train[:2])))
    bias = np.zeros(prep.num_classes, np.float32)
    bias[3] = 1e3
    variables["params"]["head"]["bias"] = bias
    teacher = _fit.Trained("teacher", model, variables, "mlp", "labels", np.zeros((0, 10)), [], 0.0)
    return c, prep, mesh, teacher


def test_transfer_images_are_labelled_by_the_teacher_for_students_that_learn_from_it(transfer_run):
    c, prep, mesh, teacher = transfer_run
    assert prep.x_transfer is not None and len(prep.x_transfer) > 0.4 * (len(prep.x_train) + len(prep.x_transfer))
    needs_kd = distill.method_needs("kd", _settings.method_config(c))
    x, y = _fit.training_set(needs_kd, prep, teacher, c, mesh)
    n = len(prep.x_train)
    np.testing.assert_array_equal(x[:n], prep.x_train)
    np.testing.assert_array_equal(x[n:], prep.x_transfer)
    np.testing.assert_array_equal(y[:n], prep.y_train)  # true labels where they exist
    assert np.all(y[n:] == 3)  # the teacher's arg-max on every transfer image
    # the label-trained student and the teacher never see the transfer images
    needs_labels = distill.method_needs("labels", _settings.method_config(c))
    x_l, y_l = _fit.training_set(needs_labels, prep, teacher, c, mesh)
    assert len(x_l) == n and np.array_equal(y_l, prep.y_train)
    assert _fit.training_set(needs_kd, prep, None, c, mesh)[0] is prep.x_train


def test_a_distilled_student_trains_on_the_transfer_set(transfer_run):
    c, prep, mesh, teacher = transfer_run
    c = c.copy_and_resolve_references()
    c.student.epochs = 8
    fm = _fit.train_student("linear-fm", "linear", "fm", prep, teacher, c, mesh, None, show_progress=False)
    labels = _fit.train_student("linear-labels", "linear", "labels", prep, teacher, c, mesh, None,
                                    show_progress=False)
    assert fm.train_images == len(prep.x_train) + len(prep.x_transfer)
    assert labels.train_images == len(prep.x_train)
    # a teacher that always says 3 pulls the fm student towards 3 on the test images; labels do not
    share_fm, share_labels = (np.mean(np.argmax(t.test_logits, -1) == 3) for t in (fm, labels))
    assert share_fm > share_labels + 0.2 and share_labels < 0.2
    no_transfer = prep.with_data(x_transfer=None)
    assert _fit.train_student("linear-fm", "linear", "fm", no_transfer, teacher, c, mesh, None,
                                  show_progress=False).train_images == len(prep.x_train)
