"""Method comparison: every student kind trained from labels and by each distillation method, 3 seeds.

Command:
    python experiments/compare_methods.py --config experiments/configs/compare_methods.py \
        --workdir runs/compare_methods

Prints, per dataset (digits, mnist5k), one line per trained model, then a table of
mean ± std over the seeds of test accuracy, agreement with the teacher and KL(teacher || student),
and a paired table (same seed, same split, same teacher) of distilled minus label-trained
students. Writes compare_methods.md and compare_methods.json into --workdir.
Add --smoke for a seconds-long run (digits, 2 seeds, 1 epoch, one labels/kd pair per kind).

Budget: the epochs below were scaled so that the full run (2 datasets x 3 seeds x 13 models)
fits in well under 25 minutes on a shared 2-core CPU; `compare.budgets` overrides the
teacher/student epochs per dataset.
"""
import ml_collections

from distill_jax.config import default_config

STUDENTS = ",".join([
    "cnn-labels", "cnn-kd", "cnn-logits", "cnn-labels+hint", "cnn-kd+attention", "cnn-labels+saliency",
    "tree-labels", "tree-kd",
    "linear-labels", "linear-kd",
    "mlp-labels", "mlp-kd",
])


def get_config():
    c = default_config()
    c.students = STUDENTS
    c.compare = ml_collections.ConfigDict(dict(
        datasets="digits,mnist5k",
        seeds="0,1,2",
        # epochs per dataset (teacher, student); datasets not listed use c.teacher/c.student.epochs
        budgets=ml_collections.ConfigDict({
            "digits": dict(teacher_epochs=15, student_epochs=20),
            "mnist5k": dict(teacher_epochs=5, student_epochs=5),
        }),
    ))
    return c
