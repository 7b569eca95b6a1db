"""Local fidelity: label-preserving perturbations of the inputs, and agreement with the teacher on them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import audit, data, models

KEY = jax.random.PRNGKey(0)


def _images():
    return jax.random.normal(jax.random.PRNGKey(1), (5, 9, 9, 2))


def test_contrast_keeps_each_images_mean_and_brightness_shifts_every_pixel_alike():
    x = _images()
    c = data.perturb(KEY, x, "contrast")
    np.testing.assert_allclose(c.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
    ratio = (c - c.mean(axis=(1, 2, 3), keepdims=True)) / (x - x.mean(axis=(1, 2, 3), keepdims=True))
    assert np.all((ratio.min(axis=(1, 2, 3)) > 0.6 - 1e-4) & (ratio.max(axis=(1, 2, 3)) < 1.4 + 1e-4))
    shift = data.perturb(KEY, x, "brightness") - x
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1, :1], shift.shape), atol=1e-6)
    assert np.all(np.abs(shift) <= 0.5)


def test_cutout_zeroes_one_third_square_per_image_and_noise_has_its_scale():
    x = jnp.ones((64, 9, 9, 1))
    out = np.asarray(data.perturb(KEY, x, "cutout"))
    assert np.all((out == 0).sum(axis=(1, 2, 3)) == 3 * 3)
    noise = np.asarray(data.perturb(KEY, x, "noise")) - 1.0
    assert noise.std() == pytest.approx(0.3, rel=0.05)
    with pytest.raises(ValueError, match="kind must be one of"):
        data.perturb(KEY, x, "blur")


def test_local_agreement_is_one_for_the_teacher_itself_and_drops_for_another_model():
    net = models.SmallCNN(num_classes=4)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (32, 8, 8, 1)))
    teacher_vars, other_vars = net.init(jax.random.PRNGKey(3), x[:1]), net.init(jax.random.PRNGKey(4), x[:1])
    views = audit.perturbed_views(x, key=KEY)
    assert set(views) == set(data.PERTURBATIONS)
    teacher_logits = {k: np.asarray(net.apply(teacher_vars, v)) for k, v in views.items()}
    same = audit.local_agreement(net, teacher_vars, views, teacher_logits)
    assert all(v == pytest.approx(1.0) for v in same.values())
    other = audit.local_agreement(net, other_vars, views, teacher_logits)
    expected = np.mean([np.mean(np.asarray(net.apply(other_vars, v)).argmax(-1) == teacher_logits[k].argmax(-1))
                        for k, v in views.items()])
    assert other["mean"] == pytest.approx(expected) and other["mean"] < 1.0


def test_perturb_some_replaces_about_the_fraction_each_by_one_kinds_view():
    x = jax.random.normal(jax.random.PRNGKey(5), (400, 6, 6, 1))
    kinds = ("noise", "cutout")
    out = np.asarray(data.perturb_some(KEY, x, kinds, 0.25))
    views = [np.asarray(data.perturb(jax.random.fold_in(KEY, 2 + i), x, k)) for i, k in enumerate(kinds)]
    kept = np.all(out == np.asarray(x), axis=(1, 2, 3))
    by_kind = [np.all(out == v, axis=(1, 2, 3)) for v in views]
    assert np.all(kept | by_kind[0] | by_kind[1])  # every image is itself or exactly one kind's view of it
    assert 0.18 < 1 - kept.mean() < 0.32 and by_kind[0].sum() > 20 and by_kind[1].sum() > 20
    np.testing.assert_array_equal(data.perturb_some(KEY, x, kinds, 0.0), x)
    with pytest.raises(ValueError, match="fraction must be in"):
        data.perturb_some(KEY, x, kinds, 1.5)


def test_students_perturbed_views_are_labelled_by_the_teacher_and_never_reach_the_teachers_training():
    from distill_jax import distill
    from distill_jax.app import config as config_lib
    from distill_jax.app._settings import method_config, teacher_method_config
    from distill_jax.distill._views import training_view

    c = config_lib.default_config()
    c.method.perturb = "all"
    student, teacher = method_config(c, kind="tree"), teacher_method_config(c)
    assert student.perturb == tuple(data.PERTURBATIONS) and student.changes_inputs and teacher.perturb == ()
    x = jax.random.normal(jax.random.PRNGKey(6), (16, 4, 4, 1))
    np.testing.assert_array_equal(training_view(KEY, x, student),
                                  data.perturb_some(jax.random.fold_in(KEY, 3), x, student.perturb, 0.5))
    with pytest.raises(ValueError, match="'blur' is not a perturbation"):
        distill.MethodConfig(perturb=("blur",))
    c.method.perturb = "noise,blur"
    with pytest.raises(ValueError, match="method.perturb"):
        config_lib.validate(c)
