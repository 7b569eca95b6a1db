"""The default run of `distill-jax run`: digits, SeedCNN teacher, cnn/tree/linear students.

Command:
    distill-jax run --config experiments/configs/default.py --workdir runs/default

Prints one line per model (teacher test accuracy about 0.98-0.99 on digits), then the summary
table (accuracy, agreement with the teacher, KL, parameters, IG completeness error) and the
paths of metrics.json and report.html. Add --smoke for a seconds-long run of the same pipeline.
"""
from distill_jax.app.config import default_config


def get_config():
    return default_config()
