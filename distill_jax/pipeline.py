"""The main job, end to end: load, preprocess, PCA, teacher, students, explanations, evaluation, report.

`run(config, workdir)` is what `distill-jax run` calls. Each stage is a small function of
plain values, so experiments can reuse the ones they need (`prepare_data`,
`train_teacher`, `train_student`, `explain_models`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import time
import zlib
from typing import Any, Callable

import flax.linen as nn
import ml_collections
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import audit, checkpoint, config as config_lib, data, distill, metrics, models, parallel
from distill_jax import pca as pca_lib, preprocess, prune, train, tuning, verdict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prepared:
    """The images as stored, the fitted scaler and PCA, and the dataset's description.

    `x_train`/`x_test` are [n, h, w, c] host arrays exactly as loaded: uint8 in [0, 255] for 8-bit
    sources (a quarter of the memory of float32), float32 in [0, 1] otherwise. Models never see them
    directly: `inputs(x)` turns a batch into standardized float32 model inputs, on the device and
    inside the jitted steps.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    scaler: Any
    pca: Any
    x_transfer: np.ndarray | None = None  # unlabelled transfer images, stored like x_train (see prepare_data)

    def inputs(self, x) -> jax.Array:
        """Model inputs [n, h, w, c] float32 for stored images `x` (see `model_inputs`)."""
        return model_inputs(self.scaler, x)


def model_inputs(scaler, x) -> jax.Array:
    """Standardized float32 model inputs from stored images; jittable.

    Formula: ``u = x / 255`` for uint8 ``x`` (``u = x`` for float images in [0, 1]), then
    ``(u - mean) / std`` with the scaler fitted on the training images.

    Args:
      scaler: a `preprocess.Standardizer` (or any `preprocess` scaler) fitted on ``u``.
      x: [n, h, w, c] uint8 or float.
    Returns:
      [n, h, w, c] float32.
    """
    x = jnp.asarray(x)
    unit = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    return preprocess.apply(scaler, unit)


def batched_inputs(scaler, x: np.ndarray, *, batch_size: int = 4096):
    """Flattened model inputs [b, h*w*c] of consecutive batches of `x` (streamed, never all at once)."""
    for start in range(0, len(x), batch_size):
        yield _flat_inputs(scaler, x[start : start + batch_size])


@jax.jit  # module level: one program per batch shape for the whole process (the scaler is an argument)
def _flat_inputs(scaler, x) -> jax.Array:
    return model_inputs(scaler, x).reshape(x.shape[0], -1)


@dataclasses.dataclass
class Trained:
    """A trained model: its module, variables, kind, method, test logits and training history.

    `settings`: for a student with the `kd` term, the `temperature` and `alpha` it was trained
    with and, when they were chosen on a validation split, the `selection` (`tuning.Selection.as_dict`).
    `train_images`: how many images it trained on (labelled plus any teacher-labelled transfer images).
    """

    name: str
    model: nn.Module
    variables: dict
    kind: str
    method: str
    test_logits: np.ndarray
    history: list[dict]
    seconds: float
    settings: dict = dataclasses.field(default_factory=dict)
    train_images: int = 0
    # `transfer_labels` per transfer set; not copied by `dataclasses.replace` (a changed model starts empty)
    transfer_label_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def apply_fn(self) -> Callable[[jax.Array], jax.Array]:
        return models.apply_fn_of(self.model, self.variables)


def prepare_data(c) -> Prepared:
    """Loads the dataset, fits the per-channel standardizer and the PCA of the flattened standardized train images.

    The images stay as loaded (uint8 for 8-bit sources); the PCA streams standardized batches
    (`pca.fit_batches`), so no float copy of the training set is kept. Under multi-host,
    `x_train`/`y_train` are this process's share of the training split and the scaler and PCA fitted
    on process 0's share are broadcast, so every process preprocesses alike.

    The transfer set (`x_transfer`) is the dataset's own (`transfer.split`, an npz `x_transfer`) plus
    `transfer.unlabelled_fraction` of each class of the training images, held back without labels
    (`hold_out_unlabelled`). Scaler and PCA are fitted on the labelled training images.
    """
    transfer = c.get("transfer", {})
    ds = data.load(c.dataset, data_dir=c.data_dir, image_size=c.image_size, seed=c.seed,
                   test_fraction=c.test_fraction, keep_uint8=True, transfer_split=transfer.get("split") or None)
    x_train, y_train, x_transfer = ds.x_train, ds.y_train, ds.x_transfer
    if c.get("train_limit", 0):  # a quick run on the first N training images
        x_train, y_train = x_train[: c.train_limit], y_train[: c.train_limit]
    if jax.process_count() > 1 and not c.dataset.startswith("tfds:"):  # tfds loaders read only their own share
        share = data.process_slice(len(x_train))
        x_train, y_train = x_train[share], y_train[share]
        x_transfer = None if x_transfer is None else x_transfer[data.process_slice(len(x_transfer))]
    if transfer.get("unlabelled_fraction", 0.0):
        x_train, y_train, x_transfer = hold_out_unlabelled(x_train, y_train, x_transfer,
                                                           transfer.unlabelled_fraction, seed=c.seed)
    scaler = preprocess.standardize_fit(data.as_float01(x_train))
    n_components = min(c.pca_components, len(x_train), int(np.prod(x_train.shape[1:])))
    pca_state = pca_lib.fit_batches(batched_inputs(scaler, x_train), n_components)
    scaler, pca_state = parallel.broadcast_from_main((scaler, pca_state))
    return Prepared(x_train, np.asarray(y_train, np.int32), ds.x_test, np.asarray(ds.y_test, np.int32),
                    ds.num_classes, tuple(ds.class_names), ds.name, scaler, pca_state, x_transfer)


def hold_out_unlabelled(x: np.ndarray, y: np.ndarray, x_transfer: np.ndarray | None, fraction: float, *,
                        seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moves `fraction` of each class of (x, y) into the transfer set, without their labels.

    Returns (x_labelled, y_labelled, x_transfer): the kept images in their order, and the
    held-back ones appended to `x_transfer` (when given). Deterministic in `seed`
    (`tuning.holdout_split`).
    """
    keep, held = tuning.holdout_split(y, fraction, seed=seed)
    extra = x[held]
    return x[keep], y[keep], extra if x_transfer is None else np.concatenate([x_transfer, extra])


def transfer_labels(teacher: Trained, prep: Prepared, c, mesh) -> np.ndarray:
    """The teacher's arg-max class [m] int32 for each transfer image (its label for label-reading terms).

    Computed once per (teacher, transfer set) and kept on the teacher: every student and every `auto`
    candidate that learns from it trains on the same labels.
    """
    key = id(prep.x_transfer)
    if key not in teacher.transfer_label_cache:
        logits = train.predict(make_predict_fn(teacher.model, prep, mesh), teacher.variables, prep.x_transfer,
                               batch_size=c.eval_batch_size, mesh=mesh)
        teacher.transfer_label_cache[key] = np.argmax(logits, axis=-1).astype(np.int32)
    return teacher.transfer_label_cache[key]


def training_set(needs: distill.Needs, prep: Prepared, teacher: Trained | None, c, mesh) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels a model trains on: (x [n, h, w, c], y [n]).

    A model that learns from the teacher (any term reads it) trains on the labelled images plus
    the transfer set, whose labels are the teacher's arg-max (`transfer_labels`); the teacher and
    label-trained students on the labelled images only.
    """
    if teacher is None or not needs.teacher or prep.x_transfer is None or not len(prep.x_transfer):
        return prep.x_train, prep.y_train
    return (np.concatenate([prep.x_train, prep.x_transfer]),
            np.concatenate([prep.y_train, transfer_labels(teacher, prep, c, mesh)]))


ADVERSARIAL_KEYS = ("adversarial", "adversarial_epsilon", "adversarial_steps", "adversarial_step_size")


def method_config(c, *, temperature: float | None = None, alpha: float | None = None,
                  group=None) -> distill.MethodConfig:
    """The distillation hyper-parameters of config `c`; `temperature`/`alpha` override the config's.

    A setting left at `"auto"` and not overridden takes `distill.MethodConfig`'s default (it is only
    read by the `kd` term, whose students get the chosen value through `kd_settings`).
    `group`: the budget of the model being trained (`c.teacher`, or `student_budget(kind, c)`), whose
    `adversarial*` keys (`ADVERSARIAL_KEYS`) set adversarial training; None (or keys it lacks) leaves
    `distill.MethodConfig`'s defaults (no adversarial training).
    """
    m = c.method
    defaults = distill.MethodConfig()
    if temperature is None:
        temperature = defaults.temperature if tuning.is_auto(m.temperature) else m.temperature
    if alpha is None:
        alpha = defaults.alpha if tuning.is_auto(m.alpha) else m.alpha
    return distill.MethodConfig(
        temperature=float(temperature), alpha=float(alpha), tree_balance=m.tree_balance, attention_p=m.attention_p,
        attention_pairs=config_lib.parse_pairs(m.attention_pairs, "method.attention_pairs"),
        hint_pairs=config_lib.parse_pairs(m.hint_pairs, "method.hint_pairs"),
        augment_shift=c.teacher.augment_shift, augment_flip=c.teacher.augment_flip, mixup=m.get("mixup", 0.0),
        **adversarial_settings(group),
    )


def adversarial_settings(group) -> dict:
    """The `adversarial*` keys of a budget group that has them, as `distill.MethodConfig` fields."""
    if group is None:
        return {}
    return {key: group[key] for key in ADVERSARIAL_KEYS if key in group}


def build_model(kind: str, c, num_classes: int, pca_state) -> tuple[nn.Module, dict]:
    """A model of `kind` computing in `c.dtype`, and its non-trainable collections (the PCA for `linear`)."""
    options = {
        "seed_cnn": {}, "cnn": {}, "mlp": {"hidden": tuple(c.mlp.hidden)},
        "tree": {"depth": c.tree.depth},
        "linear": {"n_components": int(pca_state.components.shape[0])},
    }[kind]
    model = models.with_compute_dtype(models.build(kind, num_classes, **options), c.get("dtype", "float32"))
    extra = {"pca": models.set_pca({}, pca_state)["pca"]} if kind == "linear" else {}
    return model, extra


def pruning_of(budget, total_steps: int):
    """The gradual magnitude pruning transformation a budget asks for (`prune_sparsity` > 0), or None."""
    target = budget.get("prune_sparsity", 0.0)
    if not target:
        return None
    return prune.magnitude_pruning(final_sparsity=target, begin_step=int(budget.prune_begin * total_steps),
                                   end_step=int(budget.prune_end * total_steps),
                                   frequency=max(1, total_steps // 100))


def _train(name: str, kind: str, method: str, model: nn.Module, extra: dict, budget, prep: Prepared,
           mcfg: distill.MethodConfig, c, mesh, ckpt_dir: str | None, *, teacher: Trained | None = None,
           cache_teacher: bool = True, show_progress: bool | None = None) -> Trained:
    start = time.perf_counter()
    parallel.check_batch_size(budget.batch_size, mesh, what=f"{name} batch_size")
    key = jax.random.PRNGKey(c.seed)
    init_key, state_key = jax.random.split(jax.random.fold_in(key, zlib.crc32(name.encode()) % (2**31)))
    sample = prep.inputs(prep.x_train[:2])
    t_model, t_vars = (teacher.model, teacher.variables) if teacher else (None, None)
    params = distill.init_trainable(model, method, mcfg, init_key, sample, t_model, t_vars, extra=extra)
    needs = distill.method_needs(method, mcfg)
    x_fit, y_fit = training_set(needs, prep, teacher, c, mesh)
    steps = train.total_steps(len(y_fit), parallel.local_batch_size(budget.batch_size), budget.epochs)
    optimizer = train.make_optimizer(budget.optimizer, learning_rate=budget.learning_rate, total_steps=steps,
                                     momentum=budget.momentum, weight_decay=budget.weight_decay,
                                     schedule=budget.schedule, extra=pruning_of(budget, steps))
    state = train.create_state(params, optimizer, key=state_key, extra=extra)
    loss_fn = train.with_inputs(distill.make_loss_fn(model, kind, method, mcfg, prep.num_classes, t_model), prep.inputs)
    arrays = {"x": x_fit, "y": y_fit}
    use_cache = cache_teacher and _teacher_cache_fits(name, needs, mcfg, t_model, t_vars, x_fit, prep, c)
    if use_cache:
        arrays.update(distill.cache_teacher_outputs(t_model, t_vars, x_fit, y_fit, needs,
                                                    inputs=prep.inputs, mesh=parallel.local_mesh()))
    dp = dp_sgd_of(budget)
    step_fn = train.make_train_step(loss_fn, optimizer, mesh, dp=dp)
    predict_fn = make_predict_fn(model, prep, mesh)

    def variables_of(st):
        return {"params": st.params["model"], **st.extra}

    def evaluate(st):
        logits = train.predict(predict_fn, variables_of(st), prep.x_test, batch_size=c.eval_batch_size, mesh=mesh)
        return train.accuracy_from_logits(logits, prep.y_test)

    save = None
    if ckpt_dir is not None:
        manager = checkpoint.state_manager(os.path.join(ckpt_dir, name, "state"), max_to_keep=c.keep_checkpoints)
        restored = checkpoint.restore_latest(manager, state) if c.get("resume", False) else None
        state = restored if restored is not None else state
        save = lambda st: checkpoint.save_state(manager, st)
    fit_cfg = train.FitConfig(epochs=budget.epochs, batch_size=budget.batch_size, seed=c.seed, desc=name,
                              checkpoint_every=c.checkpoint_every, show_progress=show_progress)
    history_path = (os.path.join(os.path.dirname(ckpt_dir), "history.json")
                    if ckpt_dir is not None and parallel.is_main_process() else None)
    resume = c.get("resume", False)
    record = (lambda h: record_history(history_path, name, h, resume=resume)) if history_path else None
    state, history = train.fit(state, step_fn, arrays, fit_cfg, mesh=mesh,
                               teacher=t_vars if (needs.teacher and not use_cache) else None,
                               evaluate=evaluate, save=save, on_epoch=record)
    if record is not None:  # a finished model resumed runs no epoch: its history comes from the file
        history = record(history)
    variables = jax.device_get(variables_of(state))
    if ckpt_dir is not None:
        checkpoint.save_variables(os.path.join(ckpt_dir, name, "final"), variables)
    test_logits = train.predict(predict_fn, variables, prep.x_test, batch_size=c.eval_batch_size, mesh=mesh)
    # what is evaluated, explained and reported runs in float32, whatever the training compute dtype
    settings = {} if dp is None else {"privacy": privacy_of(dp, budget, steps, len(y_fit))}
    return Trained(name, models.with_compute_dtype(model, "float32"), variables, kind, method, test_logits, history,
                   time.perf_counter() - start, settings=settings, train_images=len(y_fit))


def privacy_text(t: Trained) -> str:
    """`", DP-SGD epsilon 2.31 (delta 1e-05)"` for a privately trained model; "" otherwise."""
    p = t.settings.get("privacy")
    return "" if not p else f", {p['mechanism']} epsilon {p['epsilon']:.2f} (delta {p['delta']:g})"


def dp_sgd_of(budget) -> train.DPSGD | None:
    """The DP-SGD settings of a budget group (`dp_noise_multiplier` > 0), or None."""
    if not budget.get("dp_noise_multiplier", 0.0):
        return None
    return train.DPSGD(l2_clip=float(budget.dp_l2_clip), noise_multiplier=float(budget.dp_noise_multiplier))


def privacy_of(dp: train.DPSGD, budget, steps: int, n: int) -> dict:
    """What a DP-SGD model reports: (epsilon, delta) of its `steps` steps at sampling rate batch / n
    (`privacy.dp_sgd_epsilon`, which assumes Poisson sampling; the trainer draws shuffled fixed-size
    batches, as most DP-SGD implementations do), with the settings."""
    from distill_jax import privacy  # noqa: PLC0415 - dp-accounting loads only for private training

    epsilon = privacy.dp_sgd_epsilon(steps, batch_size=parallel.local_batch_size(budget.batch_size), n=n,
                                     noise_multiplier=dp.noise_multiplier, delta=float(budget.dp_delta))
    return {"mechanism": "DP-SGD", "epsilon": round(float(epsilon), 4), "delta": float(budget.dp_delta),
            "noise_multiplier": dp.noise_multiplier, "l2_clip": dp.l2_clip, "steps": steps}


def _teacher_cache_fits(name: str, needs: distill.Needs, mcfg: distill.MethodConfig, t_model, t_vars,
                        x: np.ndarray, prep: Prepared, c) -> bool:
    """Whether to run the teacher once and cache its outputs, rather than inside every step.

    Only when a term reads the teacher, nothing (augmentation, mixup, adversarial examples) changes the
    inputs between epochs, and the cache fits in `c.method.cache_limit_mb` of host memory (whole feature
    maps for hints can be gigabytes at 60,000 images; logits and attention maps are small).
    """
    if not needs.teacher or mcfg.changes_inputs:
        return False
    size = distill.teacher_cache_bytes(t_model, t_vars, x[:1], needs, len(x), inputs=prep.inputs)
    if size > c.method.cache_limit_mb * 2**20:
        log.info("%s: the teacher's outputs would take %.0f MB (> method.cache_limit_mb=%s): running the teacher "
                 "inside each step instead", name, size / 2**20, c.method.cache_limit_mb)
        return False
    return True


def make_predict_fn(model: nn.Module, prep: Prepared, mesh) -> Callable:
    """Jitted `(variables, stored images) -> logits`, sharded over `mesh`: inputs made on the device, forward only.

    One compiled program per architecture and mesh (`_predict_program`): the scaler is an argument, not
    a constant, so students of the same kind share it.
    """
    # evaluation runs no backward (the fastest forward impl) and in float32: its numbers are reported
    program = _predict_program(models.forward_only(models.with_compute_dtype(model, "float32")), mesh)
    scaler = parallel.replicate(prep.scaler, mesh)
    return lambda variables, x: program((variables, scaler), x)


@functools.lru_cache(maxsize=None)  # linen modules and meshes hash by value
def _predict_program(evaluator: nn.Module, mesh) -> Callable:
    return train.make_predict_fn(lambda vs, x: evaluator.apply(vs[0], model_inputs(vs[1], x)), mesh)


def train_teacher(prep: Prepared, c, mesh, ckpt_dir: str | None, **kw) -> Trained:
    """Trains the teacher (`c.teacher.kind`, SeedCNN by default) on labels; on PGD adversarial examples when
    `c.teacher.adversarial="pgd"` (Madry et al. 2018); at softmax temperature `c.teacher.train_temperature`
    (the teacher of defensive distillation, Papernot et al. 2016; 1 otherwise), used at T = 1 afterwards."""
    model, extra = build_model(c.teacher.kind, c, prep.num_classes, prep.pca)
    # mixup is a distillation setting: the teacher learns labels
    mcfg = teacher_method_config(c)
    return _train("teacher", c.teacher.kind, "labels", model, extra, c.teacher, prep, mcfg, c, mesh,
                  ckpt_dir, **kw)


def teacher_method_config(c) -> distill.MethodConfig:
    """The teacher's training settings: its adversarial keys and training temperature, no mixup."""
    return dataclasses.replace(method_config(c, group=c.teacher), mixup=0.0,
                               label_temperature=float(c.teacher.get("train_temperature", 1.0)))


def student_budget(kind: str, c):
    """`c.student`, with any of its keys overridden by the kind's own group (e.g. `c.tree.learning_rate`,
    or `c.mlp.adversarial` in a config file)."""
    budget = ml_collections.ConfigDict(c.student.to_dict())
    for key, value in c.get(kind, {}).items():
        if key in budget:
            budget[key] = value
    return budget


def train_student(name: str, kind: str, method: str, prep: Prepared, teacher: Trained, c, mesh,
                  ckpt_dir: str | None, **kw) -> Trained:
    """Trains one student `<kind>-<method>` from the teacher (or from labels alone for `labels`).

    A `kd` student with `method.temperature` or `method.alpha` set to "auto" first selects them on a
    validation split of the training images (`select_kd_settings`).
    """
    start = time.perf_counter()
    settings = kd_settings(name, kind, method, prep, teacher, c, mesh)
    budget = student_budget(kind, c)
    mcfg = method_config(c, temperature=settings.get("temperature"), alpha=settings.get("alpha"), group=budget)
    model, extra = build_model(kind, c, prep.num_classes, prep.pca)
    trained = _train(name, kind, method, model, extra, budget, prep, mcfg, c, mesh, ckpt_dir,
                     teacher=teacher, cache_teacher=c.method.cache_teacher, **kw)
    if "selection" in settings:
        settings["selection"]["seconds"] = round(time.perf_counter() - start - trained.seconds, 2)
    return dataclasses.replace(trained, settings={**trained.settings, **settings}, seconds=time.perf_counter() - start)


def kd_settings(name: str, kind: str, method: str, prep: Prepared, teacher: Trained, c, mesh) -> dict:
    """`{temperature, alpha[, selection]}` for a student whose method has the `kd` term; `{}` otherwise."""
    terms = [term for term, _ in distill.parse_method(method)]
    m = c.method
    if tuning.TUNED_TERM not in terms:
        return {}
    if not tuning.wants_selection(terms, m.temperature, m.alpha):
        return {"temperature": float(m.temperature), "alpha": float(m.alpha)}
    chosen = select_kd_settings(name, kind, method, prep, teacher, c, mesh)
    return {"temperature": chosen.temperature, "alpha": chosen.alpha, "selection": chosen.as_dict()}


def validation_split(prep: Prepared, fraction: float, seed: int) -> Prepared:
    """`prep` with `fraction` of each class of the training images moved to the evaluation side.

    The returned `x_test`/`y_test` are the held-out training images (never the test set). The scaler
    and PCA stay those fitted on every training image: they use no labels.
    """
    fit, val = tuning.holdout_split(prep.y_train, fraction, seed=seed)
    return dataclasses.replace(prep, x_train=prep.x_train[fit], y_train=prep.y_train[fit],
                               x_test=prep.x_train[val], y_test=prep.y_train[val])


def select_kd_settings(name: str, kind: str, method: str, prep: Prepared, teacher: Trained, c, mesh) -> tuning.Selection:
    """Trains the student once per (T, alpha) candidate on the training images minus a validation split
    and returns the best by `method.auto_score` (see `tuning`).

    Each candidate trains for `method.auto_epochs` epochs (0: the student's own budget).
    Raises:
      ValueError: under multi-host (each process holds a different share of the training images).
    """
    m = c.method
    if jax.process_count() > 1:
        raise ValueError("method.temperature/alpha='auto' runs on one process for now; set numbers under multi-host")
    held = validation_split(prep, m.validation_fraction, c.seed)
    teacher_logits = train.predict(make_predict_fn(teacher.model, held, mesh), teacher.variables, held.x_test,
                                   batch_size=c.eval_batch_size, mesh=mesh)
    budget = student_budget(kind, c)
    if m.auto_epochs:
        budget.epochs = m.auto_epochs

    def validation_logits(temperature: float, alpha: float) -> np.ndarray:
        model, extra = build_model(kind, c, prep.num_classes, prep.pca)
        candidate = _train(f"{name}@T={temperature:g},alpha={alpha:g}", kind, method, model, extra, budget, held,
                           method_config(c, temperature=temperature, alpha=alpha, group=budget), c, mesh, None,
                           teacher=teacher, cache_teacher=m.cache_teacher, show_progress=False)
        return candidate.test_logits

    grid = tuning.candidates(m.temperature, m.alpha, m.auto_temperatures, m.auto_alphas)
    chosen = tuning.select(grid, validation_logits, teacher_logits, held.y_test, score=m.auto_score)
    log.info("%s: chose temperature %g and alpha %g on %d validation images (%s)", name, chosen.temperature,
             chosen.alpha, chosen.validation_images, m.auto_score)
    return chosen


# --------------------------------------------------------------------------- explanations


@dataclasses.dataclass
class Audit:
    """What the evaluation stage found: JSON-ready scores, plus the arrays the figures draw."""

    explanations: dict  # model -> {ig_completeness_error, saliency_max_sensitivity, <method>: {scores}}
    robustness: dict  # model -> {fgsm_accuracy, pgd_accuracy}
    analysis: dict  # JSON-ready: randomization, cka, tree usage, linear sparsity
    images: np.ndarray  # the explained test images
    labels: np.ndarray
    maps: dict  # model -> method -> [n, h, w, c]
    curves: dict  # model -> method -> {deletion, insertion}
    linear: dict  # linear student name -> audit.linear_student(...)
    trees: dict  # tree student name -> audit.tree_student(...)
    ranking: dict  # model -> method -> {ranks: {metric: rank}, mean_rank} (audit.rank_methods)


def purpose_key(seed: int, purpose: str) -> jax.Array:
    """An independent PRNG key per use (SmoothGrad noise, sensitivity noise, randomisation, attack starts).

    One key shared by several uses would give them the same noise bits; `fold_in` of a hash of the
    purpose's name gives each its own stream, the same in every run with the same seed.
    """
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(purpose.encode()) % (2**31))


def test_sample(prep: Prepared, n: int, *, seed: int) -> tuple[jax.Array, jax.Array]:
    """`n` test images stratified by class (one per class before any repeats) as model inputs, and their labels."""
    idx = data.stratified_indices(prep.y_test, n, seed=seed)
    return prep.inputs(prep.x_test[idx]), jnp.asarray(prep.y_test[idx])


def _explain_stage(t: Trained, teacher: Trained, maps: dict, x, target, e, seed: int) -> tuple[dict, dict, dict]:
    """One model's attribution maps, their faithfulness scores and curves (teacher's maps for agreement)."""
    model_maps = audit.attribution_maps(t.model, t.variables, x, target, methods=tuple(e.methods),
                                        ig_steps=e.ig_steps, smoothgrad_samples=e.smoothgrad_samples,
                                        key=purpose_key(seed, "smoothgrad"))
    scores, curves = audit.faithfulness(t.model, t.variables, x, target, model_maps,
                                        None if t is teacher else maps[teacher.name], steps=e.faithfulness_steps)
    scores = {"saliency_max_sensitivity": audit.saliency_max_sensitivity(
        t.model, t.variables, x, target, radius=e.sensitivity_radius, key=purpose_key(seed, "max_sensitivity")),
        **scores}
    quality = audit.explanation_quality(t.model, t.variables, x, target, model_maps,
                                        key=purpose_key(seed, "explanation_quality"), samples=e.quality_samples)
    for method, values in quality.items():
        scores[method].update(values)
    if "integrated_gradients" in model_maps:
        scores["ig_completeness_error"] = audit.ig_completeness(t.model, t.variables, x, target,
                                                                model_maps["integrated_gradients"])
    return model_maps, scores, curves


def _analysis_stage(trained: list[Trained], prep: Prepared, x, target, xa, ya, seed: int) -> tuple[dict, dict, dict]:
    """Randomisation check of the teacher, CKA of each student to the teacher, linear and soft-tree read-outs."""
    teacher = trained[0]
    out = {"randomization": audit.randomization(teacher.model, teacher.variables, x, target,
                                                key=purpose_key(seed, "randomization")),
           "cka": {}, "tree": {}}
    teacher_feats = audit.features_of(teacher.model, teacher.variables, xa)
    linear, trees = {}, {}
    image_shape = prep.x_train.shape[1:]
    for t in trained[1:]:
        feats = audit.features_of(t.model, t.variables, xa)
        if feats:
            out["cka"][t.name] = audit.cka(teacher_feats, feats)
        if t.kind == "linear":
            linear[t.name] = audit.linear_student(t.variables, x, image_shape)
        if t.kind == "tree":
            trees[t.name] = audit.tree_student(t.model, t.variables, xa, np.asarray(ya), prep.num_classes, image_shape)
            usage = trees[t.name]["usage"]["hard"]
            out["tree"][t.name] = {
                "leaves_used": int(np.sum(usage.sum(0) > 0)), "leaves": int(usage.shape[1]),
                "top_leaf_share_per_class": [round(float(v), 4) for v in usage.max(1)],
            }
    return out, linear, trees


def audit_models(trained: list[Trained], prep: Prepared, c, *, show_progress: bool | None = None) -> Audit:
    """Explains every model on a class-stratified test sample, scores the maps, attacks the models, analyses the students.

    The samples are split over this process's devices (`parallel.place_batch`) and every model's
    variables replicated on them once, so each kernel runs data-parallel.

    Targets are the true labels, so maps of different models explain the same decision.
    The first model in `trained` is the teacher. Accuracy, agreement and KL come from the whole test
    set (`model_metrics`); this stage works on samples: `explain.num_images` images for the maps,
    `robustness.num_images` for the attacks, `analysis_images` for CKA and tree usage.
    `show_progress`: None shows a bar on a terminal only, True always, False never.
    """
    e, r = c.explain, c.robustness
    # each process audits the same samples on its own devices: batches split over them, variables placed once
    mesh = parallel.local_mesh()
    x, target, xr, yr, xa, ya = parallel.place_batch((*test_sample(prep, e.num_images, seed=c.seed),
                                                      *test_sample(prep, r.num_images, seed=c.seed),
                                                      *test_sample(prep, c.analysis_images, seed=c.seed)), mesh)
    trained = [dataclasses.replace(t, variables=parallel.replicate(t.variables, mesh)) for t in trained]
    teacher = trained[0]
    maps, curves, explanations, robust = {}, {}, {}, {}
    stages = [(t, "explain") for t in trained] + [(t, "attack") for t in trained] + [(None, "analysis")]
    with train.progress_bar(len(stages), desc="audit", show=show_progress) as bar:
        for t, stage in stages:
            bar.set_postfix_str(f"{stage} {t.name if t else 'students'}")
            if stage == "explain":
                maps[t.name], explanations[t.name], curves[t.name] = _explain_stage(t, teacher, maps, x, target, e,
                                                                                   c.seed)
            elif stage == "attack":
                robust[t.name] = audit.robustness(t.model, t.variables, xr, yr, epsilon=r.epsilon,
                                                  pgd_steps=r.pgd_steps, key=purpose_key(c.seed, "attack"))
            else:
                analysis_out, linear, trees = _analysis_stage(trained, prep, x, target, xa, ya, c.seed)
            bar.update(1)
    ranking = {name: audit.rank_methods({m: per[m] for m in maps[name]}) for name, per in explanations.items()}
    return Audit(explanations, robust, analysis_out, np.asarray(x), np.asarray(target), maps, curves, linear, trees,
                 ranking)


# --------------------------------------------------------------------------- the job


def check_choices(c) -> None:
    """Names in the config that only the library's registries can check, checked before anything trains.

    Raises:
      ValueError: naming the key, the value and the accepted names.
    """
    def require(ok: bool, key: str, value, accepted) -> None:
        if not ok:
            raise ValueError(f"config value {key} {value!r} is not known; use one of {sorted(accepted)}")

    require(c.teacher.kind in models.MODEL_KINDS, "teacher.kind", c.teacher.kind, models.MODEL_KINDS)
    for group in ("teacher", "student"):
        require(c[group].optimizer in train.OPTIMIZERS, f"{group}.optimizer", c[group].optimizer, train.OPTIMIZERS)
        require(c[group].schedule in train.SCHEDULES, f"{group}.schedule", c[group].schedule, train.SCHEDULES)
    for method in c.explain.methods:
        require(method in audit.ATTRIBUTION_METHODS, "explain.methods", method, audit.ATTRIBUTION_METHODS)
    students = config_lib.parse_students(c.students)
    groups = [("teacher", c.teacher)] + [(kind, c[kind]) for kind in dict.fromkeys(k for _, k, _ in students)
                                         if kind in c and "adversarial" in c[kind]]
    for group, values in [("student", c.student)] + groups:
        if "adversarial" in values:
            require(values.adversarial in distill.ADVERSARIAL, f"{group}.adversarial", values.adversarial,
                    distill.ADVERSARIAL)
    distill.check_adversarial(c.teacher.kind, teacher_method_config(c),
                              key="teacher.adversarial")
    for name, kind, method in students:
        mcfg = method_config(c, group=student_budget(kind, c))
        distill.check_mixup(method, mcfg)  # a mixed image has no label: say so before training
        key = f"{kind}.adversarial" if "adversarial" in c.get(kind, {}) else "student.adversarial"
        try:
            distill.check_adversarial(kind, mcfg, key=key)
        except ValueError as exc:
            raise ValueError(f"student {name!r}: {exc} (or leave {name!r} out of `students`)") from None


def model_metrics(t: Trained, teacher: Trained | None, prep: Prepared) -> dict:
    """accuracy and params for every model; agreement and KL(teacher || student) for students."""
    out = {"accuracy": train.accuracy_from_logits(t.test_logits, prep.y_test),
           "params": models.count_params(t.variables["params"]),
           "sparsity": round(prune.sparsity(t.variables["params"]), 4),
           "train_seconds": round(t.seconds, 2), "train_images": t.train_images}
    if teacher is not None:
        out.update(
            agreement=float(metrics.agreement(jnp.asarray(t.test_logits), jnp.asarray(teacher.test_logits))),
            kl=float(metrics.mean_kl(jnp.asarray(t.test_logits), jnp.asarray(teacher.test_logits))),
            method=t.method,
        )
    out.update(t.settings)
    return out


def cpu_model() -> str:
    """The host CPU's model name from /proc/cpuinfo (what `lscpu` prints); platform's guess elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (0.0 where the OS does not report it)."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if platform.system() == "Darwin" else 2**10), 1)  # bytes on macOS, KB on Linux


def versions() -> dict:
    """Versions of python and the libraries a run used, and the machine it ran on (for metrics.json)."""
    import flax, optax, orbax.checkpoint  # noqa: E401, PLC0415

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": orbax.checkpoint.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
            "machine": platform.machine(), "processor": cpu_model(), "cpus": os.cpu_count()}


def run(c, workdir: str, *, show_progress: bool | None = None, echo: Callable[[str], None] = print) -> dict:
    """Runs the whole job and writes metrics.json, figures, report.html and checkpoints into `workdir`.

    `show_progress`: progress bars for each model's training and the audit (None: only on a
    terminal; True: always; False: never); only process 0 draws them.
    Returns the metrics dict (the content of metrics.json).
    """
    config_lib.validate(c)
    check_choices(c)
    main = parallel.is_main_process()
    show_progress = show_progress if main else False
    timing: dict[str, float] = {}
    memory: dict[str, float] = {}  # stage -> peak resident memory of the process so far, MB
    t0 = time.perf_counter()
    prep = prepare_data(c)
    timing["data"] = time.perf_counter() - t0
    memory["data"] = peak_rss_mb()
    mesh = parallel.make_mesh()
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")

    teacher = train_teacher(prep, c, mesh, ckpt_dir, show_progress=show_progress)
    timing["teacher"] = teacher.seconds
    memory["teacher"] = peak_rss_mb()
    if main:
        echo(f"teacher {c.teacher.kind}: test accuracy {train.accuracy_from_logits(teacher.test_logits, prep.y_test):.4f}"
             f"{privacy_text(teacher)} ({teacher.seconds:.1f} s)")
    students = []
    for name, kind, method in config_lib.parse_students(c.students):
        s = train_student(name, kind, method, prep, teacher, c, mesh, ckpt_dir, show_progress=show_progress)
        students.append(s)
        timing[name] = s.seconds
        memory[name] = peak_rss_mb()
        if main:
            echo(f"student {name}: test accuracy {train.accuracy_from_logits(s.test_logits, prep.y_test):.4f}"
                 f"{privacy_text(s)} ({s.seconds:.1f} s)")

    result = {
        "dataset": prep.name,
        "config": c.to_dict(),
        "models": {"teacher": model_metrics(teacher, None, prep),
                   **{s.name: model_metrics(s, teacher, prep) for s in students}},
        "timing_s": timing,
        "peak_rss_mb": memory,
        "versions": versions(),
    }
    return explain_and_report(result, [teacher, *students], prep, c, workdir, main=main, echo=echo,
                              show_progress=show_progress)


def explain_and_report(result: dict, everyone: list[Trained], prep: Prepared, c, workdir: str, *, main: bool = True,
                       echo: Callable[[str], None] = print, show_progress: bool | None = None) -> dict:
    """Explains every model, adds the scores and the verdict (`distill_jax.verdict`) to `result`, and writes
    metrics.json, figures and report.html."""
    timing = result["timing_s"]
    t1 = time.perf_counter()
    found = audit_models(everyone, prep, c, show_progress=show_progress if main else False)
    timing["explain"] = time.perf_counter() - t1
    memory = result.setdefault("peak_rss_mb", {})
    memory["explain"] = peak_rss_mb()
    result["explanations"] = found.explanations
    result["explanation_ranking"] = found.ranking
    for name, scores in found.robustness.items():
        result["models"][name].update(scores)
    result["analysis"] = found.analysis
    result["verdict"] = verdict.decide(result)
    if main:
        from distill_jax import report  # noqa: PLC0415 - matplotlib only where a report is written

        _write_json(os.path.join(workdir, "metrics.json"), result)  # first: a failing figure must not lose the scores
        t2 = time.perf_counter()
        figures = {**report.summary_figures(workdir, result), **report.write_figures(workdir, prep, everyone, found)}
        timing["report"] = time.perf_counter() - t2
        memory["report"] = peak_rss_mb()
        timing["total"] = sum(v for k, v in timing.items() if k != "total")
        _write_json(os.path.join(workdir, "metrics.json"), result)
        report.write_html(workdir, result, figures)
        echo(report.summary_table(result))
    return result


def load_trained(workdir: str) -> tuple[dict, list[Trained], Prepared, Any]:
    """Reloads a finished run from `workdir`: its metrics, every model from its checkpoint, and the data.

    Raises:
      FileNotFoundError: `workdir` has no metrics.json or a model has no checkpoint.
    """
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; run `distill-jax run --workdir {workdir}` first")
    with open(path) as f:
        result = json.load(f)
    c = ml_collections.ConfigDict(result["config"])
    prep = prepare_data(c)
    mesh = parallel.make_mesh()
    history_path = os.path.join(workdir, "history.json")
    histories = json.load(open(history_path)) if os.path.isfile(history_path) else {}
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    kinds = [("teacher", c.teacher.kind, "labels")] + config_lib.parse_students(c.students)
    trained = []
    for name, kind, method in kinds:
        model, extra = build_model(kind, c, prep.num_classes, prep.pca)
        model = models.with_compute_dtype(model, "float32")
        template = {**model.init(jax.random.PRNGKey(0), prep.inputs(prep.x_train[:1])), **extra}
        variables = checkpoint.load_variables(os.path.join(ckpt_dir, name, "final"), template)
        predict_fn = make_predict_fn(model, prep, mesh)
        logits = train.predict(predict_fn, variables, prep.x_test, batch_size=c.eval_batch_size, mesh=mesh)
        trained.append(Trained(name, model, variables, kind, method, logits, histories.get(name, []), 0.0))
    return result, trained, prep, c


def explain_from_checkpoints(workdir: str, *, echo: Callable[[str], None] = print) -> dict:
    """Recomputes explanations, figures and the report of a finished run from its checkpoints (no training)."""
    result, trained, prep, c = load_trained(workdir)
    result["timing_s"] = {}
    return explain_and_report(result, trained, prep, c, workdir, echo=echo)


def record_history(path: str, name: str, history: list[dict], *, resume: bool) -> list[dict]:
    """Writes model `name`'s per-epoch history into the history.json at `path` as soon as it has trained.

    A fresh run starts the file anew with the teacher. On `--resume` a model continues from its
    checkpoint and `fit` reports only the epochs it ran now, so the epochs recorded by the earlier
    run are kept and the new ones replace any with the same number. Returns the merged history.
    """
    fresh_start = name == "teacher" and not resume
    previous = {}
    if not fresh_start and os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
    earlier = previous.get(name, []) if resume else []
    ran_now = {entry["epoch"] for entry in history}
    merged = sorted([e for e in earlier if e["epoch"] not in ran_now] + list(history), key=lambda e: e["epoch"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_json(path, {**previous, name: merged})
    return merged


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)
