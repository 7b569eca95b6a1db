"""Does distillation make the readable students better at full scale? Fashion-MNIST, 3 seeds.

Command (the run recorded in experiments/RESULTS.md):
    python experiments/fashion_mnist.py --workdir runs/fashion_mnist_students

Data: the full Fashion-MNIST (60,000 training / 10,000 test images; Debian's `dataset-fashion-mnist`,
or `--set data_dir=DIR` holding the four IDX files). Per seed: one SeedCNN teacher (the recipe chosen on a
validation split by experiments/teacher_recipe.py); a depth-8 soft tree and a linear model over 50 PCA
components, each trained on labels and with Hinton KD at its kind's default T and alpha; scikit-learn's
DecisionTreeClassifier (depth 8) and LogisticRegression (pixels, and the same 50 PCA components) on the same
split. `--students` adds others (the small CNN, function matching `-fm`: teacher and student on the same
mixed-up view, T = 1, no labels). Prints one line per model, then the mean ± std table (accuracy, agreement
and KL with the teacher, Spearman ρ of the model's integrated-gradients maps with the teacher's, IG deletion
AUC) and the paired tables (distilled minus label-trained, readable students minus the scikit-learn
baselines; paired t-test).
Finished seeds are kept in --workdir/seeds and reused, so `--seeds 1` and `--seeds 0,1,2` can run
one after another. `--smoke` runs 600 training images, 1 epoch, 1 seed (tests and CI).

The protocol is experiments/compare_methods.py's (`--config`, `--set`, `--seeds`, `--students`);
experiments/configs/fashion_mnist_experiment.py holds the budgets (experiments/RESULTS.md has the times).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_methods  # noqa: E402 - the shared protocol; puts the repository on sys.path

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fashion_mnist_experiment.py")


def main(argv=None, *, echo=print) -> int:
    return compare_methods.main(argv, echo=echo, default_config=CONFIG, name="fashion_mnist",
                                description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
