"""The job behind `distill-jax`: `config` (defaults and every check), `job` (run, explain from checkpoints), `cli`.
"""
from distill_jax.app import config
from distill_jax.app import job
from distill_jax.app import cli

__all__ = [
    "config",
    "job",
    "cli",
]
