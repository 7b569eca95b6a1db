"""Orbax checkpoints: periodic train-state saves with resume, and final model variables.

Layout under a run's workdir::

    checkpoints/<model>/state/<step>/   train states (every N steps, last K kept)
    checkpoints/<model>/final/          the trained variables ({"params": ..., other collections})

Paths are made absolute (orbax requires it). Saving is collective: under multi-host every
process calls `save`, orbax writes each array shard once.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def state_manager(directory: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for train states under `directory` (created if missing), keeping the last `max_to_keep`."""
    path = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path, options=options)


def save_state(manager: ocp.CheckpointManager, state) -> None:
    """Saves a TrainState at its own step (skipped if that step is already saved)."""
    step = int(state.step)
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, template) -> Any | None:
    """Restores the newest readable train state shaped like `template`, or None when there is none.

    A checkpoint that cannot be read (corrupt or partial) is skipped with a warning naming its
    step, and the previous one is tried.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as exc:  # orbax raises many types for a damaged checkpoint
            log.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                        step, manager.directory, type(exc).__name__, str(exc).splitlines()[0][:200])
    return None


def save_variables(directory: str, variables) -> str:
    """Writes model variables to `directory` (replacing an older copy). Returns the absolute path."""
    path = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables, force=True)
    return path


def load_variables(directory: str, template) -> Any:
    """Reads model variables saved by `save_variables`, checked against `template`'s structure and shapes.

    Raises:
      FileNotFoundError: nothing saved at `directory`.
      ValueError: the saved variables belong to another architecture; the message names the
        first mismatched parameter and both shapes.
    """
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved model at {path}; train it first (distill-jax run --workdir ...)")
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(path)
        saved_tree = getattr(saved, "item_metadata", saved)
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        _check_same_structure(saved_tree, template, path)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        return ckptr.restore(path, abstract)


def _flatten(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def _check_same_structure(saved, template, path: str) -> None:
    want, have = _flatten(template), _flatten(saved)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        name = (missing or extra)[0]
        raise ValueError(
            f"the model saved at {path} has another architecture: parameter {name} is "
            f"{'missing from the checkpoint' if missing else 'not in this model'}"
        )
    for name, leaf in want.items():
        saved_shape = tuple(getattr(have[name], "shape", np.shape(have[name])))
        if saved_shape != tuple(np.shape(leaf)):
            raise ValueError(
                f"the model saved at {path} has another architecture: parameter {name} has shape "
                f"{saved_shape} there and {tuple(np.shape(leaf))} in this model"
            )
