"""Pruning: kd-distilled linear-on-PCA and small CNN students at increasing target sparsity, on digits.

Command:
    python experiments/pruning.py --config experiments/configs/pruning.py --workdir runs/pruning

Gradual magnitude pruning (Zhu & Gupta 2017; `student.prune_sparsity`, cubic schedule from
`prune_begin` to `prune_end` of the student's steps) at each target in `pruning.sparsities`
(0 = no pruning). Prints one line per trained student, then a table of mean ± std over the seeds
of achieved kernel sparsity, nonzero kernel weights, test accuracy, agreement with the teacher and
KL(teacher || student), and for the linear student the nonzero weights per class and the PCA
components still used. Writes pruning.md and pruning.json into --workdir.
Add --smoke for a seconds-long run (1 seed, 1 epoch, sparsities 0 and 0.8, linear student).
"""
import ml_collections

from distill_jax.app.config import default_config


def get_config():
    c = default_config()
    c.dataset = "digits"
    c.teacher.epochs = 15
    c.student.epochs = 20
    c.students = "linear-kd,cnn-kd"
    c.pruning = ml_collections.ConfigDict(dict(sparsities="0,0.5,0.8,0.9,0.95", seeds="0,1,2"))
    return c
