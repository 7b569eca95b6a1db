"""The job's training stage: the teacher, then every student with its method, budget, teacher
cache, transfer labels and (for `auto`) its validation-chosen temperature and alpha.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import zlib
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from distill_jax import checkpoint, compilation, parallel, train
from distill_jax.app import _metadata
from distill_jax.app._prepare import Prepared, model_inputs, validation_split
from distill_jax.app._settings import (
    build_model,
    dp_batch_cap,
    dp_sgd_of,
    kd_values,
    method_config,
    parse_students,
    privacy_of,
    pruning_of,
    student_budget,
    teacher_method_config,
)
from distill_jax.distill._api import init_trainable, make_loss_fn
from distill_jax.distill._leaf_step import tree_leaf_step, tree_leaf_step_scale
from distill_jax.distill._method import MethodConfig, Needs, method_needs, parse_method
from distill_jax.distill._teacher_cache import cache_teacher_outputs, teacher_cache_bytes
from distill_jax.distill.tuning import TUNED_TERM, Selection, candidates, select, wants_selection
from distill_jax.models._layers import forward_only
from distill_jax.models._util import apply_fn_of, with_compute_dtype
from distill_jax.train._fit import FitConfig
from distill_jax.train._state import create_state, make_optimizer
from distill_jax.train._step import accuracy_from_logits, make_train_step, predict, with_inputs

log = logging.getLogger(__name__)

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
        return apply_fn_of(self.model, self.variables)


def transfer_labels(teacher: Trained, prep: Prepared, c, mesh) -> np.ndarray:
    """The teacher's arg-max class [m] int32 for each transfer image (its label for label-reading terms).

    Computed once per (teacher, transfer set) and kept on the teacher: every student and every `auto`
    candidate that learns from it trains on the same labels.
    """
    key = id(prep.x_transfer)
    if key not in teacher.transfer_label_cache:
        logits = predict(make_host_predict_fn(teacher.model, prep, mesh), teacher.variables, prep.x_transfer,
                               batch_size=c.eval_batch_size, mesh=mesh)
        teacher.transfer_label_cache[key] = np.argmax(logits, axis=-1).astype(np.int32)
    return teacher.transfer_label_cache[key]


def training_set(needs: Needs, prep: Prepared, teacher: Trained | None, c, mesh) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels a model trains on: (x [n, h, w, c], y [n]).

    A model that learns from the teacher (any term reads it) trains on the labelled images plus
    the transfer set, whose labels are the teacher's arg-max (`transfer_labels`); the teacher and
    label-trained students on the labelled images only.
    """
    if teacher is None or not needs.teacher or prep.x_transfer is None or not len(prep.x_transfer):
        return prep.x_train, prep.y_train
    return (np.concatenate([prep.x_train, prep.x_transfer]),
            np.concatenate([prep.y_train, transfer_labels(teacher, prep, c, mesh)]))


def _train(name: str, kind: str, method: str, model: nn.Module, *, extra: dict, budget, prep: Prepared,
           mcfg: MethodConfig, c, mesh, ckpt_dir: str | None = None, teacher: Trained | None = None,
           cache_teacher: bool = True, show_progress: bool | None = None, terms: str | None = None) -> Trained:
    """Trains one model. `terms`: the terms its compiled loss holds (`shared_terms`; None: its method's own);
    used only where the teacher's outputs for all of them can be cached, else the method's own."""
    start = time.perf_counter()
    parallel.check_batch_size(budget.batch_size, mesh, what=f"{name} batch_size")
    _, init_key, state_key = salted_keys(c.seed, name)
    sample = np.zeros((2, *prep.x_train.shape[1:]), np.float32)  # shapes only: initial parameters depend on the keys
    t_model, t_vars = (teacher.model, teacher.variables) if teacher else (None, None)
    needs = method_needs(method, mcfg)
    x_fit, y_fit = training_set(needs, prep, teacher, c, mesh)
    if terms is not None and (mcfg.changes_inputs or method_needs(terms, mcfg) != needs and not (
            cache_teacher and teacher is not None and
            _teacher_cache_fits(name, method_needs(terms, mcfg), mcfg, t_model, t_vars, x_fit, prep, c, quiet=True))):
        # new views every step (augmentation, perturbations, mixup: which label terms cannot read, attacks), or the
        # other terms would need the teacher inside every step: not worth a shared program
        terms = None
    program = method if terms is None else terms
    program_needs = method_needs(program, mcfg)
    params = init_trainable(model, program, mcfg, init_key, sample, t_model, t_vars, extra=extra)
    steps = train.total_steps(len(y_fit), parallel.local_batch_size(budget.batch_size), budget.epochs)
    # a tree trained by Adam on leaf logits read at T: leaf steps x T (distill.tree_leaf_step_scale), then pruning
    extras = [t for t in (tree_leaf_step(tree_leaf_step_scale(kind, method, mcfg, budget.optimizer)),
                          pruning_of(budget, steps)) if t is not None]
    optimizer = make_optimizer(budget.optimizer, learning_rate=budget.learning_rate, total_steps=steps,
                               momentum=budget.momentum, weight_decay=budget.weight_decay, schedule=budget.schedule,
                               extra=_chain(*extras) if extras else None)
    state = create_state(params, optimizer, key=state_key, extra=extra)
    loss_fn = with_inputs(make_loss_fn(model, kind, method, mcfg, prep.num_classes, t_model, terms=terms), prep.inputs)
    arrays = {"x": x_fit, "y": y_fit}
    use_cache = cache_teacher and _teacher_cache_fits(name, program_needs, mcfg, t_model, t_vars, x_fit, prep, c)
    if use_cache:
        arrays.update(cache_teacher_outputs(t_model, t_vars, x_fit, y_fit, program_needs,
                                                    inputs=prep.inputs, mesh=parallel.local_mesh()))
    dp = dp_sgd_of(budget)
    batch_cap = dp_batch_cap(dp, budget, steps, len(y_fit))  # `fit` checks that the devices can split it
    step_fn = make_train_step(loss_fn, optimizer, mesh, dp=dp)
    predict_fn = make_host_predict_fn(model, prep, mesh)

    def variables_of(st):
        return {"params": st.params["model"], **st.extra}

    def evaluate(st):
        logits = predict(predict_fn, variables_of(st), prep.x_test, batch_size=c.eval_batch_size, mesh=mesh)
        return accuracy_from_logits(logits, prep.y_test)

    save = None
    if ckpt_dir is not None:
        manager = checkpoint.state_manager(os.path.join(ckpt_dir, name, "state"), max_to_keep=c.keep_checkpoints)
        restored = checkpoint.restore_latest(manager, state) if c.get("resume", False) else None
        state = restored if restored is not None else state
        save = lambda st: checkpoint.save_state(manager, st)
    fit_cfg = FitConfig(epochs=budget.epochs, batch_size=budget.batch_size, seed=c.seed, desc=name,
                              checkpoint_every=c.checkpoint_every, show_progress=show_progress,
                              sampling="shuffle" if batch_cap is None else "poisson", batch_cap=batch_cap)
    history_path = (os.path.join(os.path.dirname(ckpt_dir), "history.json")
                    if ckpt_dir is not None and parallel.is_main_process() else None)
    resume = c.get("resume", False)
    record = (lambda h: record_history(history_path, name, h, resume=resume)) if history_path else None
    state, history = train.fit(state, step_fn, arrays, fit_cfg, mesh=mesh,
                               teacher=t_vars if (program_needs.teacher and not use_cache) else None,
                               evaluate=evaluate, save=save, on_epoch=record)
    if record is not None:  # a finished model resumed runs no epoch: its history comes from the file
        history = record(history)
    variables = jax.device_get(variables_of(state))
    if ckpt_dir is not None:
        checkpoint.save_variables(os.path.join(ckpt_dir, name, "final"), variables)
    test_logits = predict(predict_fn, variables, prep.x_test, batch_size=c.eval_batch_size, mesh=mesh)
    # what is evaluated, explained and reported runs in float32, whatever the training compute dtype
    settings = ({} if dp is None else
                {"privacy": {**privacy_of(dp, budget, steps, len(y_fit), batch_cap),
                             **privacy_scope(teacher if needs.teacher else None)}})
    return Trained(name, with_compute_dtype(model, "float32"), variables, kind, method, test_logits, history,
                   time.perf_counter() - start, settings=settings, train_images=len(y_fit))


@compilation.shared
def _chain(*transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optax.chain`, the same object for the same transformations (one optimizer, one compiled step)."""
    return optax.chain(*transforms)


def shared_terms(kind: str, method: str, c, prep: Prepared) -> str | None:
    """The terms of every student of `kind` in `c.students`, as one method (`"labels+kd+attention"`), for the
    compiled loss of a student of that kind with `method`: each student weighs its own terms and gives the
    others weight 0, so students of one architecture share one train step whatever their methods. None when
    there is nothing to share (one method, or `method` is not among them) or their budgets differ (a transfer
    set: students that read the teacher train on more images)."""
    methods = [m for _, k, m in parse_students(c.students) if k == kind]
    has_transfer = prep.x_transfer is not None and len(prep.x_transfer)
    if len(set(methods)) < 2 or method not in methods or has_transfer:
        return None
    return "+".join(dict.fromkeys(term for method in methods for term, _ in parse_method(method)))


def salted_keys(seed: int, purpose: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`fold_in(PRNGKey(seed), crc32(purpose))` and the two halves of its split, from one compiled program.

    A model's initialisation and step keys are the halves for its name; the audit's draws use the key itself
    (`purpose_key`), an independent stream per use, the same in every run with the same seed.
    """
    return _salted_keys(seed, zlib.crc32(purpose.encode()) % (2**31))


@compilation.run_once
def _salted_keys(seed, salt):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), salt)
    first, second = jax.random.split(key)
    return key, first, second


def _teacher_cache_fits(name: str, needs: Needs, mcfg: MethodConfig, t_model, t_vars,
                        x: np.ndarray, prep: Prepared, c, *, quiet: bool = False) -> bool:
    """Whether to run the teacher once and cache its outputs, rather than inside every step.

    Only when a term reads the teacher, nothing (augmentation, mixup, adversarial examples) changes the
    inputs between epochs, and the cache fits in `c.method.cache_limit_mb` of host memory (whole feature
    maps for hints can be gigabytes at 60,000 images; logits and attention maps are small).
    """
    if not needs.teacher or mcfg.changes_inputs:
        return False
    size = teacher_cache_bytes(t_model, t_vars, x[:1], needs, len(x), inputs=prep.inputs)
    if size > c.method.cache_limit_mb * 2**20:
        if quiet:
            return False
        log.info("%s: the teacher's outputs would take %.0f MB (> method.cache_limit_mb=%s): running the teacher "
                 "inside each step instead", name, size / 2**20, c.method.cache_limit_mb)
        return False
    return True


def make_host_predict_fn(model: nn.Module, prep: Prepared, mesh) -> Callable:
    """Jitted `(variables, stored images) -> logits`, sharded over `mesh`: inputs made on the device, forward only.

    One compiled program per architecture and mesh (`_predict_program`): the scaler is an argument, not
    a constant, so students of the same kind share it.
    """
    # evaluation runs no backward (the fastest forward impl) and in float32: its numbers are reported
    program = _predict_program(forward_only(with_compute_dtype(model, "float32")), mesh)
    scaler = parallel.replicate(prep.scaler, mesh)
    return lambda variables, x: program((variables, scaler), x)


@functools.lru_cache(maxsize=None)  # linen modules and meshes hash by value
def _predict_program(evaluator: nn.Module, mesh) -> Callable:
    return train.make_predict_fn(lambda vs, x: evaluator.apply(vs[0], model_inputs(vs[1], x)), mesh)


def train_teacher(prep: Prepared, c, mesh, ckpt_dir: str | None, **kw) -> Trained:
    """Trains the teacher (`c.teacher.kind`, SeedCNN by default) on labels; on PGD adversarial examples when
    `c.teacher.adversarial="pgd"` (Madry et al. 2018); at softmax temperature `c.teacher.train_temperature`
    (the teacher of defensive distillation, Papernot et al. 2016; 1 otherwise), used at T = 1 afterwards."""
    model, extra = build_model(c.teacher.kind, c, prep.num_classes, prep.pca, ensemble=c.teacher.get("ensemble", 1))
    # mixup is a distillation setting: the teacher learns labels
    mcfg = teacher_method_config(c)
    return _train("teacher", c.teacher.kind, "labels", model, extra=extra, budget=c.teacher, prep=prep, mcfg=mcfg,
                  c=c, mesh=mesh, ckpt_dir=ckpt_dir, **kw)


def train_student(name: str, kind: str, method: str, prep: Prepared, teacher: Trained, c, mesh,
                  ckpt_dir: str | None, **kw) -> Trained:
    """Trains one student `<kind>-<method>` from the teacher (or from labels alone for `labels`).

    A `kd` student with `method.temperature` or `method.alpha` set to "auto" first selects them on a
    validation split of the training images (`select_kd_settings`).
    """
    start = time.perf_counter()
    settings = kd_settings(name, kind, method, prep, teacher, c, mesh)
    budget = student_budget(kind, c)
    mcfg = method_config(c, temperature=settings.get("temperature"), alpha=settings.get("alpha"), group=budget,
                         kind=kind)
    model, extra = build_model(kind, c, prep.num_classes, prep.pca)
    trained = _train(name, kind, method, model, extra=extra, budget=budget, prep=prep, mcfg=mcfg, c=c, mesh=mesh,
                     ckpt_dir=ckpt_dir, teacher=teacher, cache_teacher=c.method.cache_teacher,
                     terms=shared_terms(kind, method, c, prep), **kw)
    if "selection" in settings:
        settings["selection"]["seconds"] = round(time.perf_counter() - start - trained.seconds, 2)
    return dataclasses.replace(trained, settings={**trained.settings, **settings}, seconds=time.perf_counter() - start)


def select_kd_settings(name: str, kind: str, method: str, prep: Prepared, teacher: Trained, c, mesh) -> Selection:
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
    teacher_logits = predict(make_host_predict_fn(teacher.model, held, mesh), teacher.variables, held.x_test,
                                   batch_size=c.eval_batch_size, mesh=mesh)
    budget = student_budget(kind, c)
    if m.auto_epochs:
        budget.epochs = m.auto_epochs

    def validation_logits(temperature: float, alpha: float) -> np.ndarray:
        model, extra = build_model(kind, c, prep.num_classes, prep.pca)
        candidate = _train(f"{name}@T={temperature:g},alpha={alpha:g}", kind, method, model, extra=extra,
                           budget=budget, prep=held,
                           mcfg=method_config(c, temperature=temperature, alpha=alpha, group=budget), c=c, mesh=mesh,
                           teacher=teacher, cache_teacher=m.cache_teacher, show_progress=False,
                           terms=shared_terms(kind, method, c, prep))
        return candidate.test_logits

    grid = candidates(*kd_values(c, kind), m.auto_temperatures, m.auto_alphas)
    chosen = select(grid, validation_logits, teacher_logits, held.y_test, score=m.auto_score)
    log.info("%s: chose temperature %g and alpha %g on %d validation images (%s)", name, chosen.temperature,
             chosen.alpha, chosen.validation_images, m.auto_score)
    return chosen


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
    _metadata.write_json(path, {**previous, name: merged})
    return merged


def privacy_scope(teacher: Trained | None) -> dict:
    """What a DP-SGD model's epsilon bounds, given the teacher it learns from (None: it reads no teacher).

    A student that reads a teacher trained on the same images is private only if the teacher is: the
    student's steps are accounted, the teacher's are not. Two private trainings compose: (eps_s, delta_s)
    and (eps_t, delta_t) give at most (eps_s + eps_t, delta_s + delta_t) (basic composition; Dwork and Roth,
    "The Algorithmic Foundations of Differential Privacy", 2014, Theorem 3.16).

    Returns:
      {"covers": a sentence} and, for a student of a teacher, "teacher_private": bool.
    """
    if teacher is None:
        return {"covers": "the whole training of this model"}
    p = teacher.settings.get("privacy")
    if p is None:
        return {"covers": "this model's own training steps only: its teacher saw the same images without privacy, "
                          "so the epsilon bounds nothing about them", "teacher_private": False}
    return {"covers": f"this model's own training steps only; with its teacher's (epsilon {p['epsilon']:.2f}, delta "
                      f"{p['delta']:g}) the two trainings are private at the sums of both (basic composition)",
            "teacher_private": True}


def privacy_statement(privacy: dict) -> str:
    """A model's privacy record (`Trained.settings["privacy"]`) in words, the same in the CLI's lines and the report:
    `"DP-SGD epsilon 2.31 (delta 1e-05, poisson sampling; its own steps only: the teacher is not private)"`."""
    how = f", {privacy['sampling']} sampling" if "sampling" in privacy else ""
    scope = "; its own steps only: the teacher is not private" if privacy.get("teacher_private") is False else ""
    return f"{privacy['mechanism']} epsilon {privacy['epsilon']:.2f} (delta {privacy['delta']:g}{how}{scope})"


def privacy_summary(t: Trained) -> str:
    """`", " + privacy_statement(...)` for a privately trained model (the CLI's line); "" otherwise."""
    p = t.settings.get("privacy")
    return f", {privacy_statement(p)}" if p else ""


def kd_settings(name: str, kind: str, method: str, prep: Prepared, teacher: Trained, c, mesh) -> dict:
    """`{temperature, alpha[, selection]}` for a student whose method has the `kd` term; `{}` otherwise."""
    terms = [term for term, _ in parse_method(method)]
    if TUNED_TERM not in terms:
        return {}
    temperature, alpha = kd_values(c, kind)
    if not wants_selection(terms, temperature, alpha):
        return {"temperature": float(temperature), "alpha": float(alpha)}
    chosen = select_kd_settings(name, kind, method, prep, teacher, c, mesh)
    return {"temperature": chosen.temperature, "alpha": chosen.alpha, "selection": chosen.as_dict()}
