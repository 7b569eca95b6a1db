"""The main job on the full Fashion-MNIST (60,000 training / 10,000 test 28x28 images), sized for a 2-core CPU.

Command:
    distill-jax run --config experiments/configs/fashion_mnist.py --workdir runs/fashion_mnist

Data: the four IDX files of Debian's `dataset-fashion-mnist` package (`apt-get install
dataset-fashion-mnist`), or `--set data_dir=DIR` holding the same files. The default students
(cnn, tree and linear, each from labels and by KD, plus cnn-kd+attention) train with short
budgets: 2 epochs of the SeedCNN teacher, 2 epochs per student. Prints one line per model, then
the summary table; the README gives the measured wall time and peak memory on a 2-core CPU
(benchmarks/RESULTS.md, "Full scale"). Images stay uint8 on the host, the teacher cache keeps
logits and attention maps only, and evaluation streams the 10,000 test images in batches.
"""
from distill_jax.app.config import default_config


def get_config():
    c = default_config()
    c.dataset = "fashion_mnist"
    c.teacher.epochs = 2
    c.teacher.batch_size = 128
    c.student.epochs = 2
    c.student.batch_size = 128
    c.tree.depth = 6
    c.explain.num_images = 10  # one per class
    c.eval_batch_size = 1000
    return c
