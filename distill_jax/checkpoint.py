"""Orbax checkpoints: periodic train-state saves with resume, and final model variables.

Layout under a run's workdir::

    checkpoints/<model>/state/<step>/   train states (every N steps, last K kept)
    checkpoints/<model>/final/          the trained variables ({"params": ..., other collections})

Paths are made absolute (orbax requires it). Saving is collective: under multi-host every
process calls `save`, orbax writes each array shard once.

A checkpoint is never silently skipped, replaced or mixed with another run's: restoring one that
was saved by another configuration raises `CheckpointMismatch` (naming the parameters whose
names or shapes differ), an unreadable one raises `CheckpointCorrupt` (naming its step), and
saving at a step that already holds a different state raises `CheckpointMismatch`. Both are
ValueErrors, the library's error type for input the user must fix (the CLI prints one line and
exits with status 2); nothing on disk is changed when they are raised.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointMismatch",
    "CheckpointCorrupt",
    "state_manager",
    "save_state",
    "restore_latest",
    "save_variables",
    "load_variables",
]


_SHOWN_DIFFERENCES = 3  # differing parameters named in a mismatch message


class CheckpointMismatch(ValueError):
    """A saved checkpoint belongs to another configuration or run (other parameter names, shapes or values)."""


class CheckpointCorrupt(ValueError):
    """A saved checkpoint cannot be read (damaged, partial, or not an orbax checkpoint)."""


def state_manager(directory: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for train states under `directory` (created if missing), keeping the last `max_to_keep`.

    Raises:
      CheckpointCorrupt: `directory` cannot hold checkpoints (e.g. it is a file).
    """
    path = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    unusable = f"checkpoint directory {path} cannot be used ({{}}); nothing was changed: choose another --workdir"
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointCorrupt(unusable.format("it is a file, not a directory"))
    try:
        return ocp.CheckpointManager(path, options=options, item_handlers=ocp.StandardCheckpointHandler())
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(unusable.format(_reason(exc))) from exc


def save_state(manager: ocp.CheckpointManager, state) -> None:
    """Saves a TrainState at its own step.

    A step that is already saved is left as it is when it holds this very state (fit saves the
    same state twice, e.g. periodically and at the end); a different state there means the
    directory holds another run, and nothing is overwritten.

    Raises:
      CheckpointMismatch: the step is saved already with other parameters, shapes or values.
      CheckpointCorrupt: the step is saved already but cannot be read.
    """
    step = int(state.step)
    if step in manager.all_steps():
        _check_saved_state_is(manager, step, state)
        return
    manager.save(step, args=ocp.args.StandardSave(_one_copy(state)))
    manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, template) -> Any | None:
    """Restores the newest train state, checked against `template`'s structure and shapes; None when there is none.

    Raises:
      CheckpointMismatch: the checkpoint was saved by another configuration (other parameter names
        or shapes, e.g. another `tree.depth`); the message names the first differing parameters with
        both shapes.
      CheckpointCorrupt: the newest checkpoint cannot be read; the message names its step. Older
        steps are not tried silently (the run would go on from an older state than the user
        expects, and the unreadable step would stay in the way of later saves).
    """
    steps = sorted(manager.all_steps())
    if not steps:
        return None
    step = steps[-1]
    _check_structure(_saved_tree(manager, step, steps), template, manager, step)
    return _restore(manager, step, template, steps)


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
      CheckpointMismatch (a ValueError): the saved variables belong to another architecture; the
        message names the first mismatched parameter and both shapes.
      CheckpointCorrupt (a ValueError): the saved variables cannot be read.
    """
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved model at {path}; train it first (distill-jax run --workdir ...)")
    unreadable = (f"the model saved at {path} cannot be read ({{}}); nothing was changed: train it again "
                  f"in another --workdir")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            saved = ckptr.metadata(path)
        except Exception as exc:  # orbax raises many types for a damaged checkpoint
            raise CheckpointCorrupt(unreadable.format(_reason(exc))) from exc
        saved_tree = getattr(saved, "item_metadata", saved)
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        if not jax.tree_util.tree_leaves(saved_tree):
            raise CheckpointCorrupt(unreadable.format("it holds no variables"))
        differences = _differences(saved_tree, template)
        if differences:
            raise CheckpointMismatch(f"the model saved at {path} has another architecture: {differences[0]}")
        try:
            return ckptr.restore(path, _abstract(template))
        except Exception as exc:
            raise CheckpointCorrupt(unreadable.format(_reason(exc))) from exc


def _name(path) -> str:
    """`['params']['model']['head']['kernel']` for a path of dict keys, attributes or sequence indices alike."""
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        parts.append(f"[{str(key)!r}]")
    return "".join(parts)


def _flatten(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_name(path): leaf for path, leaf in flat}


def _shape(leaf) -> tuple:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _differences(saved, template) -> list[str]:
    """What differs between a saved tree (metadata) and `template` as message fragments: missing, then extra,
    then reshaped leaves, each with the model's parameters before the optimizer state."""
    want, have = _flatten(template), _flatten(saved)
    missing, extra, reshaped = [], [], []
    for name in sorted(set(want) | set(have), key=lambda n: ("['params']" not in n, n)):
        if name not in have:
            missing.append(f"parameter {name} is missing from the checkpoint")
        elif name not in want:
            extra.append(f"parameter {name} is not in this model")
        elif _shape(have[name]) != _shape(want[name]):
            reshaped.append(f"parameter {name} has shape {_shape(have[name])} there and {_shape(want[name])} "
                            f"in this model")
    return missing + extra + reshaped


def _saved_tree(manager: ocp.CheckpointManager, step: int, steps: list[int]):
    try:
        metadata = manager.item_metadata(step)
    except Exception as exc:  # orbax raises many types for a damaged checkpoint
        raise _corrupt(manager, step, steps, exc) from exc
    tree = getattr(metadata, "tree", metadata)
    if not jax.tree_util.tree_leaves(tree):
        raise _corrupt(manager, step, steps, "it holds no train state")
    return tree


def _check_structure(saved, template, manager: ocp.CheckpointManager, step: int) -> None:
    differences = _differences(saved, template)
    if differences:
        more = len(differences) - _SHOWN_DIFFERENCES
        listed = "; ".join(differences[:_SHOWN_DIFFERENCES]) + (f"; and {more} more" if more > 0 else "")
        raise CheckpointMismatch(
            f"the checkpoint in {manager.directory} (step {step}) was saved by another configuration: {listed}. "
            f"Nothing was changed: resume with the configuration it was saved with, or run this one in another "
            f"--workdir (without --resume)")


def _restore(manager: ocp.CheckpointManager, step: int, template, steps: list[int]):
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(_abstract(template)))
    except Exception as exc:  # the structure matched, so the data itself cannot be read
        raise _corrupt(manager, step, steps, exc) from exc


def _corrupt(manager: ocp.CheckpointManager, step: int, steps: list[int], cause) -> CheckpointCorrupt:
    where = os.path.join(str(manager.directory), str(step))
    earlier = [s for s in steps if s < step]
    fix = (f"move {where} away to resume from step {earlier[-1]}" if earlier
           else f"move {where} away to train this model again")
    reason = cause if isinstance(cause, str) else _reason(cause)
    return CheckpointCorrupt(f"the checkpoint at step {step} in {manager.directory} cannot be read ({reason}); "
                             f"nothing was changed: {fix}, or use another --workdir")


def _check_saved_state_is(manager: ocp.CheckpointManager, step: int, state) -> None:
    steps = sorted(manager.all_steps())
    _check_structure(_saved_tree(manager, step, steps), state, manager, step)
    saved = _restore(manager, step, state, steps)
    mine, theirs = _flatten(state), _flatten(saved)
    for name, leaf in mine.items():
        if not np.array_equal(_host(leaf), _host(theirs[name])):
            raise CheckpointMismatch(
                f"step {step} in {manager.directory} already holds another train state ({name} differs): the "
                f"directory holds another run, which is kept as it is; continue that run with --resume and its "
                f"configuration, or use another --workdir")


def _host(leaf) -> np.ndarray:
    """A leaf as a host numpy array (key data for typed PRNG keys; this process's copy of a replicated array)."""
    if isinstance(leaf, jax.Array):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(leaf if leaf.is_fully_addressable else leaf.addressable_data(0))
    return np.asarray(leaf)


def _one_copy(tree):
    """With one process, each array replicated over several devices as its copy on the first: orbax would
    otherwise split the writing of a replicated array between its replicas, compiling a slicing program per
    array shape (XLA:CPU's fake devices, TPUs). The files are the same; restoring reads them into the shardings
    of the template."""
    if jax.process_count() > 1:
        return tree

    def one(leaf):
        if isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1 and leaf.is_fully_replicated:
            return leaf.addressable_data(0)
        return leaf

    return jax.tree_util.tree_map(one, tree)


def _abstract(template):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
