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
import functools
import itertools
import math
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from distill_jax import compilation, parallel

LossFn = Callable[..., tuple[jax.Array, dict]]
MUTABLE = "mutable"  # aux key of a loss function's updated non-trainable collections (see the module docstring)


def _sync_every_step(mesh) -> bool:
    """Whether `fit` waits for each step before dispatching the next: on CPU with several devices only.

    XLA:CPU runs each (fake) device's share of a collective on a shared thread pool; with several
    steps in flight on a small machine the all-reduce rendezvous starved and aborted ("Termination
    timeout for all reduce ... only 3 of them arrived"). With one CPU device there is no collective,
    and not waiting lets the host prepare the next batch while the step runs: the default job's
    small students trained 1.5-2x faster (their steps take about a millisecond, the host's share
    about as long). A function, not a module constant: asking for the backend at import time would
    start XLA before `jax.distributed.initialize` could run.
    """
    return jax.default_backend() == "cpu" and mesh.devices.size > 1


class NonFiniteError(FloatingPointError):
    """Raised when a loss or gradient became NaN/inf; the last good state is kept."""


class Interrupted(KeyboardInterrupt):
    """Raised by `fit` after SIGINT/SIGTERM, once a checkpoint of the current state is written."""


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped.

    Fields: step (int32 scalar), params (trainable pytree), opt_state, extra (non-trainable
    variable collections: updated only where the loss function returns them as `aux["mutable"]`), key (PRNG key; step keys are fold_in(key, step)),
    first_bad_step (int32 scalar; -1 while every loss and gradient has been finite).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any
    key: jax.Array
    first_bad_step: jax.Array


def create_state(params, optimizer: optax.GradientTransformation, *, key: jax.Array, extra=None) -> TrainState:
    """A fresh TrainState at step 0 (params and extra are copied: the train step donates its state's buffers).

    The copies, `optimizer.init` and the counters are one compiled program, cached per `optimizer.init` and
    parameter shapes (op by op they were one small program per leaf shape and optimizer statistic).
    """
    init = optimizer.init
    if not isinstance(init, collections.abc.Hashable):
        init = functools.partial(init)  # hashed by identity: still one program, not cached across calls
    step, params, opt_state, extra, first_bad_step = _fresh_state(params, extra, init)
    return TrainState(step=step, params=params, opt_state=opt_state, extra={} if extra is None else extra, key=key,
                      first_bad_step=first_bad_step)


@compilation.run_once(static_argnums=2)
def _fresh_state(params, extra, init):
    # jnp.copy: the outputs must be new buffers even where XLA could forward an input unchanged
    params = jax.tree_util.tree_map(jnp.copy, params)
    extra = jax.tree_util.tree_map(jnp.copy, extra)
    return jnp.zeros((), jnp.int32), params, init(params), extra, jnp.full((), -1, jnp.int32)


# --------------------------------------------------------------------------- optimizers


def _sgd(learning_rate, *, momentum, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum or None))


def _adam(learning_rate, *, momentum, weight_decay):
    del momentum
    return optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay else optax.adam(learning_rate)


OPTIMIZERS = {"sgd": _sgd, "adam": _adam}
SCHEDULES = {
    "constant": lambda lr, total: optax.constant_schedule(lr),
    "cosine": lambda lr, total: optax.cosine_decay_schedule(lr, max(total, 1)),
}


def make_optimizer(name: str, *, learning_rate: float, total_steps: int, momentum: float = 0.9,
                   weight_decay: float = 0.0, schedule: str = "constant",
                   extra: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """An optax optimizer by name (`sgd`, `adam`) with a learning-rate schedule (`constant`, `cosine`).

    `extra` (e.g. a pruning mask transformation) is chained after the update.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not known; use one of {sorted(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not known; use one of {sorted(SCHEDULES)}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}")
    lr = SCHEDULES[schedule](learning_rate, total_steps)
    opt = OPTIMIZERS[name](lr, momentum=momentum, weight_decay=weight_decay)
    return optax.chain(opt, extra) if extra is not None else opt


# --------------------------------------------------------------------------- steps


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def merge_mutable(extra, updates):
    """`extra` with the collections in `updates` replaced; the others (e.g. a PCA) stay as they were.

    The result has exactly the tree structure of `extra` (so a jitted step keeps one compiled program).

    Args:
      extra: the state's non-trainable collections, name -> pytree.
      updates: name -> pytree for some of those names (a loss function's `aux["mutable"]`), or None.
    Raises:
      ValueError: an updated collection that `extra` lacks, or one whose leaves differ in number or shape.
    """
    if not updates:
        return extra
    unknown = sorted(set(updates) - set(extra))
    if unknown:
        raise ValueError(f"loss_fn returned mutable collection(s) {unknown} that state.extra lacks (it has "
                         f"{sorted(extra)}); create the state with extra= holding their initial values")
    new = dict(extra)
    for name, value in updates.items():
        # FrozenDicts flatten in insertion order, dicts in sorted order: compare and rebuild as plain dicts
        old, value = flax.core.unfreeze(extra[name]), flax.core.unfreeze(value)
        old_shapes = jax.tree_util.tree_map(jnp.shape, old)
        new_shapes = jax.tree_util.tree_map(jnp.shape, value)
        if old_shapes != new_shapes:
            raise ValueError(f"loss_fn returned mutable collection {name!r} shaped {new_shapes}; "
                             f"state.extra[{name!r}] is shaped {old_shapes}")
        merged = jax.tree_util.tree_map(lambda n, o: jnp.asarray(n, o.dtype), value, old)
        new[name] = flax.core.freeze(merged) if isinstance(extra[name], flax.core.FrozenDict) else merged
    return type(extra)(new)


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """Differentially private SGD settings (Abadi et al. 2016): every example's gradient is clipped to L2
    norm `l2_clip` and Gaussian noise of std `noise_multiplier * l2_clip` is added to their sum
    (`privacy.dp_sgd_gradients`); the optimizer then applies that gradient as any other."""

    l2_clip: float
    noise_multiplier: float


def _gradients(loss_fn: LossFn, state, batch: dict, teacher, key: jax.Array, dp: DPSGD | None):
    """(mean loss, aux, gradient) of one step: the plain gradient of the mean, or DP-SGD's.

    DP-SGD: loss and aux are the means over the same per-example pass whose gradients are clipped and
    noised; example i's loss gets `fold_in(loss_key, i)`, so random views differ between examples.
    """

    def mean_loss(params):
        losses, aux = loss_fn(params, state.extra, batch, teacher, key)
        return jnp.mean(losses), aux

    if dp is None:
        (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
        return loss, aux, grads
    from distill_jax import privacy  # noqa: PLC0415 - dp-accounting loads only for private training

    if jax.eval_shape(mean_loss, state.params)[1].get(MUTABLE):  # shapes only: the loss runs once, below
        raise ValueError("DP-SGD clips per-example gradients, but this model updates batch statistics "
                         "(a mutable collection), which mix the examples of a batch; use a model without them")
    loss_key, noise_key = jax.random.split(key)
    per_example = lambda params, b, k: loss_fn(params, state.extra, b, teacher, k)
    (losses, aux), per_grads = privacy.per_example_value_and_grad(per_example, state.params, batch, key=loss_key)
    grads = privacy.noisy_clipped_mean(per_grads, l2_clip=dp.l2_clip, noise_multiplier=dp.noise_multiplier,
                                       key=noise_key)
    return jnp.mean(losses), aux, grads


def train_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, dp: DPSGD | None = None) -> Callable:
    """The un-jitted train step: (state, batch, teacher) -> (state, metrics).

    `dp`: train with DP-SGD's clipped, noised gradient (`DPSGD`) instead of the gradient of the mean loss.

    metrics: `loss` (batch mean) and the batch mean of every aux entry but `aux["mutable"]`, whose
    collections are written into `state.extra` (`merge_mutable`). A step whose loss or gradient is
    not finite records its step number in `first_bad_step`; from then on the state (step, params,
    optimizer state, extra) stays exactly as it was before that step, so `fit` can save the last
    good state and stop.
    """

    def step(state: TrainState, batch: dict, teacher) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        loss, aux, grads = _gradients(loss_fn, state, batch, teacher, key, dp)
        aux = dict(aux)
        new_extra = merge_mutable(state.extra, aux.pop(MUTABLE, None))
        finite = jnp.isfinite(loss) & _all_finite(grads)
        good = finite & (state.first_bad_step < 0)  # after the first bad step the state stays frozen

        def update(grads, opt_state, params, new_extra, old_extra):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state, new_extra

        def keep(grads, opt_state, params, new_extra, old_extra):
            return params, opt_state, old_extra

        # A cond rather than a select over every leaf: the SeedCNN step ran 1.4x faster at batch 32 on
        # XLA:CPU with glibc malloc (benchmarks/RESULTS.md); the result is the same.
        new_params, new_opt_state, new_extra = jax.lax.cond(
            good, update, keep, grads, state.opt_state, state.params, new_extra, state.extra
        )
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step)
        new_state = state.replace(
            step=jnp.where(good, state.step + 1, state.step),
            params=new_params,
            opt_state=new_opt_state,
            extra=new_extra,
            first_bad_step=first_bad,
        )
        metrics = {"loss": loss, **{k: jnp.mean(v) for k, v in aux.items()}}
        return new_state, metrics

    return step


def with_inputs(loss_fn: LossFn, inputs: Callable[[jax.Array], jax.Array]) -> LossFn:
    """`loss_fn` that reads `inputs(batch["x"])` as its `x`.

    Host batches stay as stored (e.g. uint8, a quarter of float32's bytes) until they are on the
    device; the conversion (e.g. `pipeline.model_inputs`) runs inside the jitted step.
    """

    def loss_on_inputs(params, extra, batch, teacher, key):
        return loss_fn(params, extra, {**batch, "x": inputs(batch["x"])}, teacher, key)

    return loss_on_inputs


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh, *,
                    dp: DPSGD | None = None) -> Callable:
    """`train_step_fn` jitted with explicit shardings over `mesh` and the old state donated."""
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(
        train_step_fn(loss_fn, optimizer, dp=dp),
        in_shardings=(repl, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=0,
    )


def make_predict_fn(apply_fn: Callable, mesh) -> Callable:
    """Jitted `(variables, x) -> logits` with the batch sharded over `mesh`."""
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(apply_fn, in_shardings=(repl, data), out_shardings=data)


def predict(predict_fn: Callable, variables, x: np.ndarray, *, batch_size: int, mesh) -> np.ndarray:
    """Logits for every example of `x` (the last batch is padded, the padding dropped).

    Every process passes the same full `x`; under multi-host each feeds its own share of
    every batch and the logits are gathered back, so every process returns all of them.

    Args:
      predict_fn: from `make_predict_fn`.
      x: [n, ...] host array.
      batch_size: global batch; must divide by the number of devices.
    Returns:
      [n, classes] numpy array.
    """
    parallel.check_batch_size(batch_size, mesh, what="eval batch_size")
    local = parallel.local_batch_size(batch_size)
    lo = jax.process_index() * local
    variables = parallel.replicate(variables, mesh)  # once, not with every batch
    out = []
    for start in range(0, len(x), batch_size):
        chunk, pad = parallel.pad_to_multiple(x[start : start + batch_size], batch_size)
        logits = predict_fn(variables, parallel.shard_batch(chunk[lo : lo + local], mesh))
        out.append(parallel.gather(logits)[: batch_size - pad])
    return np.concatenate(out)


# --------------------------------------------------------------------------- fit loop


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
    """

    epochs: int
    batch_size: int
    seed: int = 0
    desc: str = "train"
    checkpoint_every: int = 0  # steps; 0 = only at the end
    show_progress: bool | None = None  # None: a bar only when stderr is a terminal; True: always; False: never
    stop_check_every: int = 10


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

    Each epoch's order is `epoch_batch_indices(n, local batch, seed=cfg.seed, epoch)`; a resumed run
    (`start` > 0) continues mid-epoch at the batch where it stopped.
    Raises:
      ValueError: the batch is larger than the n examples.
    """
    n = len(data["y"])
    local_bs = parallel.local_batch_size(cfg.batch_size)
    per_epoch = n // local_bs if local_bs <= n else 0
    if per_epoch == 0:
        raise ValueError(f"{cfg.desc}: batch_size={cfg.batch_size} is larger than the {n} training examples")

    def epochs():
        for epoch in range(start // per_epoch, cfg.epochs):
            order = epoch_batch_indices(n, local_bs, seed=cfg.seed, epoch=epoch)
            first = start - epoch * per_epoch if epoch == start // per_epoch else 0
            yield epoch, ({k: v[idx] for k, v in data.items()} for idx in order[first:])

    return epochs(), per_epoch * cfg.epochs


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
      ValueError: a one-shot iterator with `cfg.epochs` > 1, an epoch with no batches, a batch of the wrong size.
    """
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


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of host logits [n, classes] against labels [n]."""
    return float(np.mean(np.argmax(logits, -1) == labels)) if len(labels) else math.nan
