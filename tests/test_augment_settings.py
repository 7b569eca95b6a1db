"""The teacher's augmentation trains the teacher only; the students' views have their own keys."""
import pytest

from distill_jax.app import _settings, config


def test_the_teachers_augmentation_stays_the_teachers():
    c = config.default_config()
    c.teacher.augment_shift, c.teacher.augment_flip = 2, True
    teacher = _settings.teacher_method_config(c)
    student = _settings.method_config(c, kind="tree", group=c.student)
    assert (teacher.augment_shift, teacher.augment_flip) == (2, True) and teacher.changes_inputs
    # the students keep the cached teacher outputs: no view that changes between epochs
    assert (student.augment_shift, student.augment_flip) == (0, False) and not student.changes_inputs
    c.method.augment_shift, c.method.augment_flip = 1, True
    cnn = _settings.method_config(c, kind="cnn", group=c.student)
    assert (cnn.augment_shift, cnn.augment_flip) == (1, True)
    assert _settings.teacher_method_config(c).augment_shift == 2


@pytest.mark.parametrize("key,value", [("augment_shift", -1), ("augment_shift", -3)])
def test_bad_student_augmentation_is_refused(key, value):
    c = config.default_config()
    c.method[key] = value
    with pytest.raises(ValueError, match=f"method.{key}"):
        config.validate(c)
