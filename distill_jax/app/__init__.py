"""The job behind `distill-jax`: `config` (defaults and every check), `job` (run, explain from checkpoints), `cli`.

The submodules load on first use, so that `python -m distill_jax.app.cli` imports the CLI once.
"""
import importlib

__all__ = ["cli", "config", "job"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"distill_jax.app.{name}")
    raise AttributeError(f"module 'distill_jax.app' has no attribute {name!r}")
