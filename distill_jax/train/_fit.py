"""Training state, jitted train/eval steps, and the fit loop shared by teacher and students.

A train step is built from a per-example loss function

    loss_fn(params, extra, batch, teacher, key) -> (losses [batch], aux: dict of [batch] arrays)

where `params` are the trainable parameters, `extra` the non-trainable variable collections
(e.g. a PCA, BatchNorm statistics), `batch` a dict with at least `x` and `y`, and `teacher` the
frozen teacher's variables (an argument, never closed over, so it is not baked into the compiled
program as a constant) or None. The step is jitted once with explicit shardings (batch split over
the mesh's `data` axis, everything else replicated) and donates the old state.

Mutable collections: a loss function whose model updates some of `extra` in its training pass
(BatchNorm's `batch_stats`) returns the updated collections as `aux["mutable"]` (`MUTABLE`), e.g.

    (logits, updates) = model.apply({"params": params, **extra}, x, train=True, mutable=["batch_stats"])
    return losses, {"accuracy": ..., "mutable": updates}

and the step writes them into `state.extra`; collections it does not return (a PCA) stay as they were.

`fit` reads batches from in-memory arrays (shuffled by `epoch_batch_indices`) or from any iterable of
batch dicts (a data loader, a tfds `data_source` read through an index sampler, a generator).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import signal
import time
from typing import Callable, Iterable, Iterator, Mapping, Union

import jax
import numpy as np
from tqdm.auto import tqdm

from distill_jax import parallel
from distill_jax.train._sampling import poisson_batch_cap, poisson_epoch_batches
from distill_jax.train._state import Interrupted, NonFiniteError, TrainState


def _sync_every_step(mesh) -> bool:
    """Whether `fit` waits for each step before dispatching the next: on CPU with several devices only.

    XLA:CPU runs each (fake) device's share of a collective on a shared thread pool; with several
    steps in flight on a small machine the all-reduce rendezvous starved and aborted ("Termination
    timeout for all reduce ... only 3 of them arrived"). With one CPU device there is no collective,
    and not waiting lets the host prepare the next batch while the step runs, which matters for
    small models whose steps take about as long as the host's share. A function, not a module constant: asking for the backend at import time would
    start XLA before `jax.distributed.initialize` could run.
    """
    return jax.default_backend() == "cpu" and mesh.devices.size > 1


def epoch_batch_indices(n: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """Shuffled batches of indices for one epoch: [n // batch_size, batch_size].

    Deterministic in (seed, epoch), so a resumed run sees the same order. The ragged tail
    is dropped (a different tail every epoch).
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the number of training examples); got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


@dataclasses.dataclass
class FitConfig:
    """Budget of one training run: epochs, global batch size, data-order seed, progress bar label.

    `show_progress`: a progress bar with the running loss and images per second (see `progress_bar`).
    `stop_check_every`: with several processes, how often (in steps) they agree on whether any of
    them received SIGINT/SIGTERM (one tiny all-gather; a single process checks every step for free).
    `sampling` (in-memory arrays only): "shuffle" (each epoch a permutation cut into fixed-size batches)
    or "poisson" (each example enters each step with probability batch_size / n, the batch padded to
    `batch_cap` rows with a `mask` entry, `poisson_epoch_batches`: the sampling DP-SGD's accounting
    assumes). `batch_cap=None`: `poisson_batch_cap(n, batch_size, steps)`.
    """

    epochs: int
    batch_size: int
    seed: int = 0
    desc: str = "train"
    checkpoint_every: int = 0  # steps; 0 = only at the end
    show_progress: bool | None = None  # None: a bar only when stderr is a terminal; True: always; False: never
    stop_check_every: int = 10
    sampling: str = "shuffle"
    batch_cap: int | None = None

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}; got {self.sampling!r}")


SAMPLINGS = ("shuffle", "poisson")


def progress_bar(total: int | None, *, desc: str, show: bool | None = None, initial: int = 0) -> tqdm:
    """A tqdm bar over `total` units (None: unknown): `show=None` draws it only on a terminal, True always, False never."""
    disable = {None: None, True: False, False: True}[show]
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


# Steps between updates of the bar's loss and img/s: reading the loss waits for the step, so not every step.
_POSTFIX_EVERY = 20


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request that `fit` honours between steps.

    The first signal sets `requested`; the loop then saves a checkpoint and raises
    `Interrupted`, so no save or step is ever cut in half. A second SIGINT interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = None
        self._old = {}
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def agreed(self, step: int, every: int, *, force: bool = False) -> str | None:
        """The signal name if this process (one process) or any process (several) asked to stop.

        With several processes the answer is a collective: every process must ask at the same
        steps (`step % every == 0`, or `force` at the same point), so all stop at the same step
        and the checkpoint save that follows, itself collective, cannot deadlock.
        """
        if jax.process_count() == 1:
            return self.requested
        if not force and step % max(every, 1):
            return None
        if not parallel.any_process(self.requested is not None):
            return None
        return self.requested or "a signal on another process"

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


Batches = Union[Mapping[str, np.ndarray], Iterable[dict], Callable[[int], Iterable[dict]]]


def array_epochs(data: Mapping[str, np.ndarray], cfg: FitConfig, start: int) -> tuple[Iterator, int]:
    """The batches of in-memory arrays still to run from step `start`: (iterator of (epoch, batches), total steps).

    Each epoch's order is `epoch_batch_indices(n, local batch, seed=cfg.seed, epoch)`, or with
    `cfg.sampling == "poisson"` the batches of `poisson_epoch_batches` (each with a `mask` entry); a resumed
    run (`start` > 0) continues mid-epoch at the batch where it stopped.
    Raises:
      ValueError: the batch is larger than the n examples.
    """
    n = len(data["y"])
    local_bs = parallel.local_batch_size(cfg.batch_size)
    per_epoch = n // local_bs if local_bs <= n else 0
    if per_epoch == 0:
        raise ValueError(f"{cfg.desc}: batch_size={cfg.batch_size} is larger than the {n} training examples")

    total = per_epoch * cfg.epochs
    poisson = cfg.sampling == "poisson"
    cap = (cfg.batch_cap or poisson_batch_cap(n, local_bs, total, multiple_of=jax.local_device_count())) if poisson else None

    def rows(idx: np.ndarray, mask: np.ndarray | None) -> dict:
        return {k: v[idx] for k, v in data.items()} | ({} if mask is None else {"mask": mask})

    def epochs():
        for epoch in range(start // per_epoch, cfg.epochs):
            if poisson:
                order, masks = poisson_epoch_batches(n, local_bs, cap, seed=cfg.seed, epoch=epoch)
            else:
                order, masks = epoch_batch_indices(n, local_bs, seed=cfg.seed, epoch=epoch), None
            first = start - epoch * per_epoch if epoch == start // per_epoch else 0
            yield epoch, (rows(order[i], None if masks is None else masks[i]) for i in range(first, len(order)))

    return epochs(), total


def stream_epochs(data: Iterable[dict] | Callable[[int], Iterable[dict]], cfg: FitConfig,
                  start: int) -> tuple[Iterator, int | None]:
    """The batches of an iterable (or of `data(epoch)`) still to run from step `start`: (iterator of (epoch, batches), total steps or None).

    One epoch is one pass: `iter(data)` (a re-iterable: a list, a data loader) or `data(epoch)` (a function
    that may shuffle by epoch). Every batch is a dict of host arrays whose leading axis is this process's
    share of `cfg.batch_size`. A resumed run reads and drops the first `start` batches, so the stream
    must give the same batches again (seeded by epoch). Under multi-host, every process must yield
    the same number of batches. E.g. a tfds `data_source` (random access, nothing loaded up front) read
    through a per-epoch index sampler:

        source = tfds.data_source("mnist", split="train")
        def batches(epoch):
            order = epoch_batch_indices(len(source), batch_size, seed=0, epoch=epoch)
            for idx in order:
                records = [source[int(i)] for i in idx]
                yield {"x": np.stack([r["image"] for r in records]), "y": np.array([r["label"] for r in records])}

    Raises:
      ValueError: a one-shot iterator with `cfg.epochs` > 1, an epoch with no batches, a batch of the wrong size,
        `cfg.sampling == "poisson"` (a stream's batches are the caller's: sample them yourself, with a `mask`).
    """
    if cfg.sampling != "shuffle":
        raise ValueError(f"{cfg.desc}: sampling={cfg.sampling!r} draws batches from in-memory arrays; a stream gives its "
                         f"own batches (Poisson-sample them with train.poisson_epoch_batches and add its 'mask')")
    local_bs = parallel.local_batch_size(cfg.batch_size)
    if not callable(data) and isinstance(data, collections.abc.Iterator) and cfg.epochs > 1:
        raise ValueError(f"{cfg.desc}: data is a one-shot iterator, which can feed one epoch, not epochs={cfg.epochs}; "
                         f"pass a re-iterable (a list, a data loader) or a function epoch -> batches")
    total = None if callable(data) or not hasattr(data, "__len__") else len(data) * cfg.epochs

    def checked(batches, epoch):
        for i, batch in enumerate(batches):
            sizes = {k: len(v) for k, v in batch.items()}
            if "x" not in batch or "y" not in batch or set(sizes.values()) != {local_bs}:
                raise ValueError(f"{cfg.desc}: batch {i} of epoch {epoch} has {sizes} examples; every batch must be "
                                 f"a dict with 'x' and 'y' of {local_bs} examples each (drop or pad the ragged tail)")
            yield batch

    def epochs():
        skip = start
        for epoch in range(cfg.epochs):
            batches = checked(iter(data(epoch) if callable(data) else data), epoch)
            head, seen = None, 0
            for batch in batches:
                seen += 1
                if skip:
                    skip -= 1
                    continue
                head = batch
                break
            if not seen:
                raise ValueError(f"{cfg.desc}: data gave no batches in epoch {epoch}")
            if head is not None:  # else the whole epoch ran before `start`
                yield epoch, itertools.chain([head], batches)

    return epochs(), total


def fit(state: TrainState, step_fn: Callable, data: Batches, cfg: FitConfig, *, mesh,
        teacher=None, evaluate: Callable[[TrainState], float] | None = None,
        save: Callable[[TrainState], None] | None = None,
        on_epoch: Callable[[list[dict]], None] | None = None) -> tuple[TrainState, list[dict]]:
    """Runs `step_fn` over the batches of `data` for `cfg.epochs` epochs, resuming from `state.step`.

    For arrays the data order depends only on (cfg.seed, epoch), the step keys on (state.key, step),
    so a run restored from a checkpoint ends bitwise where an uninterrupted run ends; a stream that
    gives the same batches again resumes the same way.

    Args:
      state: a TrainState (fresh or restored; a restored one continues mid-epoch exactly).
      step_fn: from `make_train_step`.
      data: either a dict of host arrays with the same leading length n (at least `x`, `y`); each step
        gets the rows of one shuffled batch of every entry (e.g. cached teacher logits), `array_epochs`;
        or an iterable of batch dicts (one pass per epoch), or a function epoch -> such an iterable,
        each batch `cfg.batch_size` examples (`stream_epochs`). Under multi-host, each process passes
        its own share of the training data (its batches: its share of every global batch).
      evaluate: optional state -> test accuracy, called after every epoch.
      save: optional state -> None, called every `cfg.checkpoint_every` steps, at the end, and
        on SIGINT/SIGTERM before `Interrupted` is raised. Under multi-host it is called on every
        process at the same step (orbax saves collectively).
      on_epoch: optional history-so-far -> None, called after every epoch (e.g. to write it to disk,
        so an interrupted run keeps the epochs it finished).
    Returns:
      (final state, history: one dict per epoch with `epoch`, `loss`, `accuracy`, `test_accuracy`).
    Raises:
      NonFiniteError: a loss or gradient became non-finite (the state before that step is saved).
      Interrupted: SIGINT/SIGTERM arrived (on any process); the current state was saved first.
      ValueError: bad data (see `array_epochs`, `stream_epochs`).
    """
    start = step = int(jax.device_get(state.step))  # reads back explicitly: fit runs under transfer guards
    if cfg.sampling == "poisson" and cfg.batch_cap:  # each process pads its share to batch_cap rows
        parallel.check_batch_size(cfg.batch_cap * jax.process_count(), mesh, what=f"{cfg.desc}: batch_cap")
    epochs, total = (array_epochs if isinstance(data, Mapping) else stream_epochs)(data, cfg, start)
    sync = _sync_every_step(mesh)
    # committed to the step's sharding (one compilation, not two), and a copy: the step donates its
    # input, which must not delete the caller's arrays
    state = parallel.replicate(state, mesh, copy=True)
    teacher = None if teacher is None else parallel.replicate(teacher, mesh)  # placed once, not sent every step
    history: list[dict] = []
    bar = progress_bar(total, desc=cfg.desc, show=cfg.show_progress, initial=start if total is None else min(start, total))
    shown_at, shown_time = step, time.perf_counter()
    try:
        with _StopRequest() as stop:
            for epoch, batches in epochs:
                step_metrics: list[dict] = []  # summed once per epoch: no per-step dispatch, no wait
                for host_batch in batches:
                    batch = parallel.shard_batch(host_batch, mesh)
                    state, metrics = step_fn(state, batch, teacher)
                    step += 1
                    if sync:
                        jax.block_until_ready(metrics)
                    step_metrics.append(metrics)
                    bar.update(1)
                    if not bar.disable and step - shown_at >= _POSTFIX_EVERY:
                        now = time.perf_counter()
                        rate = (step - shown_at) * cfg.batch_size / max(now - shown_time, 1e-9)
                        bar.set_postfix(loss=f"{float(jax.device_get(metrics['loss'])):.4f}", img_s=f"{rate:.0f}")
                        shown_at, shown_time = step, now
                    signal_name = stop.agreed(step, cfg.stop_check_every)
                    if signal_name:
                        _interrupt(state, cfg.desc, save, signal_name)
                    if cfg.checkpoint_every and save and step % cfg.checkpoint_every == 0:
                        _raise_if_nonfinite(state, cfg.desc, save)
                        save(state)
                _raise_if_nonfinite(state, cfg.desc, save)
                record = {"epoch": epoch + 1, **_epoch_means(step_metrics)}
                if evaluate is not None:
                    record["test_accuracy"] = float(evaluate(state))
                history.append(record)
                if on_epoch is not None:
                    on_epoch(list(history))
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
            # the final save runs while the handlers are still ours: a SIGTERM during it waits for it to finish
            if save is not None:
                save(state)
            signal_name = stop.agreed(step, cfg.stop_check_every, force=True)  # a signal during the last steps or save
    finally:
        bar.close()
    if signal_name:
        raise Interrupted(f"{cfg.desc} interrupted by {signal_name} at step {int(jax.device_get(state.step))} (the last one); "
                          f"{'checkpoint saved' if save is not None else 'nothing saved'}")
    return state, history


def _epoch_means(step_metrics: list[dict]) -> dict[str, float]:
    """The mean over an epoch's steps of every metric (fetched from the device in one transfer)."""
    host = jax.device_get(step_metrics)
    return {k: float(np.mean([np.float64(m[k]) for m in host])) for k in host[0]} if host else {}


def _interrupt(state: TrainState, desc: str, save, signal_name: str) -> None:
    _raise_if_nonfinite(state, desc, save)
    if save is not None:
        save(state)
    where = "; checkpoint saved" if save is not None else ""
    raise Interrupted(f"{desc} interrupted by {signal_name} at step {int(jax.device_get(state.step))}{where}")


def _raise_if_nonfinite(state: TrainState, desc: str, save) -> None:
    bad = int(jax.device_get(state.first_bad_step))
    if bad >= 0:
        if save is not None:  # the state is frozen just before the bad step: save it as a good one
            save(state.replace(first_bad_step=state.first_bad_step * 0 - 1))
        raise NonFiniteError(
            f"{desc}: the loss or its gradient became non-finite at step {bad}; training stopped and the "
            f"state before that step was kept{' (checkpoint saved)' if save is not None else ''} "
            f"(lower the learning rate or check the data)"
        )


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Number of train steps in one epoch of n examples (ragged tail dropped)."""
    return n // batch_size


def total_steps(n: int, batch_size: int, epochs: int) -> int:
    """Number of train steps in a run."""
    return steps_per_epoch(n, batch_size) * epochs
