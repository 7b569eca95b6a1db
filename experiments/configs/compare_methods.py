"""Method comparison: every student kind trained from labels and by each distillation method, 3 seeds.

Command:
    python experiments/compare_methods.py --config experiments/configs/compare_methods.py \
        --workdir runs/compare_methods

Prints, per dataset (digits, mnist5k), one line per trained model, then a table of
mean ± std over the seeds of test accuracy, agreement and KL with the teacher, how well the
model's integrated-gradients maps agree with the teacher's (Spearman ρ) and their deletion AUC,
and a paired table (same seed, same split, same teacher) of distilled minus label-trained
students and of the readable students against scikit-learn's baselines. Writes
compare_methods.md and compare_methods.json into --workdir (finished seeds are kept in
--workdir/seeds and reused by a rerun). Add --smoke for a seconds-long run (digits, 2 seeds,
1 epoch, one labels/kd pair per kind).

The protocol is the one of experiments/fashion_mnist.py (depth-8 soft tree; kd at T = 2,
alpha = 0.5; function matching at T = 1 with mixup and shifts; the same baselines), so the
effect of the data size shows across the two tables. Budget: the epochs below keep the full
run (2 datasets x 3 seeds x 9 students + 4 baselines) within about a quarter of an hour on a 2-core
CPU; `compare.budgets` sets the teacher/student epochs per dataset.
"""
import ml_collections

from distill_jax.app.config import default_config

# the protocol of experiments/fashion_mnist.py; the feature-hint, attention, saliency and MLP students
# of the earlier table (experiments/RESULTS.md, 2026-11-28) run with --students
STUDENTS = ",".join([
    "tree-labels", "tree-kd", "tree-fm",
    "linear-labels", "linear-kd", "linear-fm",
    "cnn-labels", "cnn-kd", "cnn-fm",
])
ALL_STUDENTS = STUDENTS + ",cnn-logits,cnn-labels+hint,cnn-kd+attention,cnn-labels+saliency,mlp-labels,mlp-kd"


def get_config():
    c = default_config()
    c.students = STUDENTS
    c.tree.depth = 8
    c.method.temperature = 2.0
    c.method.alpha = 0.5
    c.compare = ml_collections.ConfigDict(dict(
        datasets="digits,mnist5k",
        seeds="0,1,2",
        # epochs per dataset (teacher, student); datasets not listed use c.teacher/c.student.epochs
        budgets=ml_collections.ConfigDict({
            "digits": dict(teacher_epochs=15, student_epochs=20),
            "mnist5k": dict(teacher_epochs=5, student_epochs=5),
        }),
        # function matching (Beyer et al. 2022): teacher and student on the same mixed view, T = 1; the CNN's
        # view also shifted (as in experiments/configs/fashion_mnist_experiment.py)
        method_overrides=("fm:method.mixup=1.0", "fm:method.temperature=1.0", "cnn-fm:method.augment_shift=1"),
        baselines="sk-tree-d8,sk-tree,sk-logreg-pixels,sk-logreg-pca",
        pairs="tree-fm:sk-tree-d8,tree-kd:sk-tree-d8,linear-fm:sk-logreg-pixels,linear-kd:sk-logreg-pixels,"
              "linear-labels:sk-logreg-pca",
        explain_images=100,  # class-stratified test images for the integrated-gradients scores
    ))
    return c
