"""Distillation methods: which teacher and student outputs each needs, and its per-example loss.

A *method* is a weighted sum of *terms*, written like `"kd"`, `"labels+hint"` or
`"kd+0.5*attention"`. Each term is in the `TERMS` registry and declares what it reads:

    labels     cross entropy with the labels (no teacher)                        loss-based baseline
    kd         Hinton KD: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE    loss-based
    fm         function matching: T^2*KL(teacher_T || student_T), no labels       loss-based
    logits     MSE between logits (Ba & Caruana 2014)                            loss-based
    hint       FitNets hints through a learned 1x1 regressor                     model-based
    attention  attention transfer (Zagoruyko & Komodakis 2017)                   mask-based
    saliency   input-gradient saliency matching                                  mask-based
    defensive  defensive distillation: CE(teacher_T, student_T), no labels       loss-based

Distilling into an interpretable model class (the soft decision tree, the linear model over
PCA components) is model-based distillation too: for the tree, `labels` and `kd` use the
Frosst & Hinton objective (expected cross entropy over leaves) plus its balance penalty.

Function matching (Beyer et al. 2022, "a good teacher is patient and consistent") is `fm` with
augmentation and `mixup` on: teacher and student see the same augmented, mixed view, the teacher runs
inside the step, and no label is read, so unlabelled images can be distilled too.

Defensive distillation (Papernot et al. 2016) is `defensive` with a high `temperature` (they used
20 to 100): the student learns the teacher's softmax at T through its own softmax at T and is used
at T = 1, its logits unchanged (`losses.defensive_distillation_loss` says what that does to attacks).

Adversarial training (Madry et al. 2018) is a view, not a term: with `adversarial="pgd"` each
batch's inputs (after the model-input transform, augmentation and mixup) are replaced by PGD
adversarial examples against the model being trained (`adversarial_view`), and every term, the
teacher included, reads that view. Any method can be trained so; `check_adversarial` says which
models and settings can.

The frozen teacher is either run inside the step (its variables are a step argument, under
`stop_gradient`) or, when nothing changes its inputs (no augmentation), run once over the
training set and its outputs cached (`cache_teacher_outputs`).

Any JAX model: teachers and students reach the terms through the two normal forms of
`distill_jax.adapters` (re-exported here), `as_teacher` (a linen module, or any function
`x -> logits` / `x -> (logits, {name: features})`, or `(variables, x) -> ...` with its variables,
which then travel as the step's teacher argument) and `as_student` (a linen module, or a pair
`(init_fn, apply_fn)` of pure functions). Students declare their `kind`: a `SoftDecisionTree` is a "tree" (the Frosst & Hinton objective above), a
`Linear` a "linear" (its "pca" collection is never trained or updated), anything else a
"network". `distill(student, teacher, x, y, ...)` is the one-call entry point: it builds the loss,
the library's train step and its fit loop, and returns the student's trained variables.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import compilation, parallel
from distill_jax.distill._defaults import kd_defaults
from distill_jax.distill._leaf_step import tree_leaf_step, tree_leaf_step_scale
from distill_jax.distill._method import MethodConfig, method_needs, parse_method
from distill_jax.distill._teacher_cache import cache_teacher_outputs, teacher_cache_bytes, teacher_outputs
from distill_jax.distill._terms import TERMS, Context, _pair_key
from distill_jax.distill._views import (
    _check_layers,
    _check_spatial,
    _used_pairs,
    check_adversarial,
    check_mixup,
    training_view,
)
from distill_jax.distill.losses._tree import tree_balance_penalty
from distill_jax.distill.tuning import candidates, holdout_split, is_auto, select
from distill_jax.models._adapters import as_student, as_teacher
from distill_jax.models._networks import HintRegressor
from distill_jax.train._fit import FitConfig, fit, total_steps
from distill_jax.train._state import MUTABLE, create_state, make_optimizer
from distill_jax.train._step import LossWithSettings, make_train_step

log = logging.getLogger(__name__)


def init_trainable(student, method: str, cfg: MethodConfig, key: jax.Array, sample_x: jax.Array,
                   teacher=None, teacher_vars=None, *, extra=None) -> dict:
    """Initial trainable parameters `{"model": student params, "aux": {"hint": regressors}}`.

    `student`: anything `as_student` takes; `teacher`, `teacher_vars`: anything `as_teacher` takes.
    `init_student` also returns the student's other variable collections.
    Checks that the student and teacher produce every feature the method reads and that each
    pair of features can be matched.

    Raises:
      ValueError: naming the method, the layers and the shapes that do not fit.
    """
    return init_student(student, method, cfg, key, sample_x, teacher, teacher_vars, extra=extra)[0]


def init_student(student, method: str, cfg: MethodConfig, key: jax.Array, sample_x: jax.Array,
                 teacher=None, teacher_vars=None, *, extra=None) -> tuple[dict, dict]:
    """`(init_trainable's parameters, the student's other variable collections)`, `extra` replacing those it names.

    The collections (e.g. "batch_stats", a "pca") are the `extra` of `train.create_state`.
    """
    needs = method_needs(method, cfg)
    model_key, aux_key = compilation.split_keys(key, 2)
    student = as_student(student)
    variables = dict(flax.core.unfreeze(student.init(model_key, sample_x)))
    if "params" not in variables:
        raise ValueError(f"student {student.name}: init gave no 'params' collection (it gave {sorted(variables)})")
    variables.update(extra or {})
    s_logits, s_feats = jax.eval_shape(student.apply, variables, sample_x)
    _check_layers(method, "student", student.name, needs.student_layers, s_feats)
    aux = {}
    if needs.teacher:
        if teacher is None:
            raise ValueError(f"method {method!r} needs a teacher")
        teacher = as_teacher(teacher, teacher_vars)
        t_logits, t_feats = jax.eval_shape(teacher.apply, teacher.variables, sample_x)
        if t_logits.shape[-1] != s_logits.shape[-1]:
            raise ValueError(f"method {method!r}: the student has {s_logits.shape[-1]} classes and the teacher "
                             f"{t_logits.shape[-1]}; they must be equal")
        _check_layers(method, "teacher", teacher.name, needs.teacher_layers + needs.teacher_attention, t_feats)
        for s_layer, t_layer in _used_pairs(method, cfg, "attention"):
            _check_spatial(method, s_layer, s_feats[s_layer].shape, t_layer, t_feats[t_layer].shape)
        hint_pairs = _used_pairs(method, cfg, "hint")
        for s_layer, t_layer in hint_pairs:
            _check_spatial(method, s_layer, s_feats[s_layer].shape, t_layer, t_feats[t_layer].shape)
        if hint_pairs:
            keys = jax.random.split(aux_key, len(hint_pairs))
            aux["hint"] = {
                _pair_key(s, t): HintRegressor(t_feats[t].shape[-1]).init(
                    k, jnp.zeros(s_feats[s].shape, s_feats[s].dtype))["params"]
                for k, (s, t) in zip(keys, hint_pairs)
            }
    params = variables.pop("params")
    return {"model": params, "aux": aux}, variables


# The MethodConfig fields a loss reads at run time (its `train.LossWithSettings` settings, with the terms' weights
# and `label_weight`, 1 - alpha computed on the host): students of one architecture share one compiled train step
# whatever their values. A term reads them, and any property derived from them, from its `ctx.cfg`.
RUNTIME_FIELDS = ("temperature", "alpha", "label_temperature", "tree_balance")


def make_loss_fn(student, student_kind: str | None, method: str, cfg: MethodConfig, num_classes: int,
                 teacher=None, *, terms: str | None = None) -> LossWithSettings:
    """The per-example loss `loss_fn(params, extra, batch, teacher_vars, key) -> (losses [B], aux)` for `train`.

    `student`: anything `as_student` takes; `student_kind` overrides its kind (None: the model's own,
    `STUDENT_KINDS`); "tree" selects the soft tree objective. `teacher`: anything `as_teacher` takes;
    the step passes its variables as `teacher_vars` (None for a function that closes over them).
    `batch` holds `x`, `y` and, when the teacher's outputs are cached, the `teacher_*` entries
    of `teacher_outputs`; otherwise the teacher runs here on the view the student sees
    (`training_view`: augmented, mixed and adversarial when the config says so; the attack runs
    against the student's current parameters under stop_gradient, through its `loop_apply`).
    aux: `accuracy` per example and, for a student with mutable collections (BatchNorm statistics),
    their updated values under `train.MUTABLE` ("mutable"), which the train step writes into
    `state.extra`. For a tree student the balance penalty (a batch-level scalar) is spread evenly
    over the examples.

    The result is a `train.LossWithSettings`: the weight of each term and the config's `RUNTIME_FIELDS`
    (temperature, alpha, label_temperature, tree_balance) are its settings, arguments of the compiled
    step rather than constants, and its program is shared by every call with the same student, teacher,
    terms and other settings, so `train.make_train_step` compiles one step for students of one
    architecture whatever their temperature and alpha. A term reads them as `ctx.cfg.temperature` etc.
    (traced values: usable in arithmetic, not in Python `if`s).
    `terms`: the terms the compiled loss holds (a method string; None: the method's own). The method's
    terms must be among them and the others get weight 0 (their value times 0 is added: it must be
    finite), so students whose methods differ share one step too; the batch must then carry what every
    one of `terms` reads from the teacher.
    Raises:
      ValueError: a method or config that cannot be trained (mixup with terms that read labels, adversarial
        training of a readable student), or a term of `method` missing from `terms`.
    """
    own = parse_method(method)
    program = own if terms is None else parse_method(terms)
    names = tuple(dict.fromkeys(name for name, _ in program))
    missing = [name for name, _ in own if name not in names]
    if missing:
        raise ValueError(f"method {method!r}: terms={terms!r} lacks its terms {missing}")
    student = as_student(student, kind=student_kind)
    teacher = None if teacher is None else dataclasses.replace(as_teacher(teacher), variables=None)
    for checked in dict.fromkeys((method, "+".join(names))):
        check_mixup(checked, cfg)
    check_adversarial(student.kind, cfg)
    weights = np.zeros(len(names), np.float32)
    for name, weight in own:
        weights[names.index(name)] += weight
    settings = {"weights": weights, **{f: np.asarray(getattr(cfg, f), np.float32)
                                       for f in (*RUNTIME_FIELDS, "label_weight")}}
    static = dataclasses.replace(cfg, temperature=1.0, alpha=1.0, label_temperature=1.0,
                                 tree_balance=float(cfg.tree_balance > 0))
    return LossWithSettings(_loss_program(student, names, static, num_classes, teacher), settings)


class _RunTimeConfig:
    """A `MethodConfig` whose `RUNTIME_FIELDS` are read from a loss's (traced) settings."""

    def __init__(self, cfg: MethodConfig, settings: dict):
        self._cfg, self._settings = cfg, settings

    def __getattr__(self, name: str):
        return self._settings[name] if name in (*RUNTIME_FIELDS, "label_weight") else getattr(self._cfg, name)


@compilation.shared
def _loss_program(student, names: tuple[str, ...], cfg: MethodConfig, num_classes: int, teacher) -> Callable:
    """`make_loss_fn`'s loss as `fn(params, extra, batch, teacher_vars, key, settings)`; `cfg` holds no number
    of `RUNTIME_FIELDS` (they come from `settings`), so equal arguments share the function and its step."""
    method = "+".join(names)
    needs = method_needs(method, cfg)
    is_tree = student.kind == "tree"

    def loss_fn(params, extra, batch, teacher_vars, key, settings):
        x, y = batch["x"], batch["y"]
        if cfg.changes_inputs:
            frozen = {"params": jax.lax.stop_gradient(params["model"]), **extra}
            x = training_view(key, x, cfg, labels=y, apply_fn=lambda z: student.loop_apply(frozen, z))
        variables = {"params": params["model"], **extra}
        (logits, feats), updates = student.train_apply(variables, x)
        feats = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), feats)  # losses in float32 under bf16 compute
        t_out = {k: v for k, v in batch.items() if k.startswith("teacher_")}
        if t_out and cfg.changes_inputs:
            raise ValueError("the batch holds cached teacher outputs of the stored images, but augmentation, mixup or "
                             "adversarial training changes the inputs every step; pass no teacher_* entries so the teacher sees the same view")
        if needs.teacher and not t_out:
            if teacher is None:
                raise ValueError(f"method {method!r} needs a teacher: pass teacher= to make_loss_fn")
            t_out = teacher_outputs(teacher, teacher_vars, x, y, needs)
        ctx = Context(
            x=x, labels=y, num_classes=num_classes, student_kind=student.kind,
            student_logits=logits, student_features=feats,
            student_apply=lambda z: student.apply(variables, z)[0],
            aux_params=params["aux"],
            teacher_logits=t_out.get("teacher_logits"),
            teacher_features={k.split("/", 1)[1]: v for k, v in t_out.items() if k.startswith("teacher_feat/")},
            teacher_attention={k.split("/", 1)[1]: v for k, v in t_out.items() if k.startswith("teacher_attention/")},
            teacher_saliency=t_out.get("teacher_saliency"), cfg=_RunTimeConfig(cfg, settings),
        )
        total = sum(settings["weights"][i] * TERMS[name].loss(ctx) for i, name in enumerate(names))
        if is_tree and cfg.tree_balance > 0:
            penalty = tree_balance_penalty(feats["node_reach"], feats["routing"], strength=settings["tree_balance"])
            total = total + penalty
        accuracy = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        aux = {"accuracy": accuracy}
        if updates:
            aux[MUTABLE] = updates
        return total, aux

    return loss_fn


def _with_given_collections(initial: dict, given: dict | None) -> dict:
    """A student's non-trained collections from its init, each replaced by the one `given` (same names, shapes).

    Raises:
      ValueError: naming a given collection the student does not have, or an array whose shape differs.
    """
    if not given:
        return initial
    for name, tree in given.items():
        if name not in initial:
            raise ValueError(f"collections: the student has no collection {name!r} (it has {sorted(initial) or 'none'})")
        want = jax.tree_util.tree_map(np.shape, initial[name])
        got = jax.tree_util.tree_map(np.shape, tree)
        if want != got:
            raise ValueError(f"collections[{name!r}]: shapes {got} differ from the student's {want}")
    return {**initial, **{name: jax.tree_util.tree_map(jnp.asarray, tree) for name, tree in given.items()}}


def distill(student, teacher, x, y, *, key: jax.Array, method: str = "kd", temperature: float | None = None,
            alpha: float | None = None, config: MethodConfig | None = None, teacher_variables=None,
            epochs: int = 10, batch_size: int = 64, learning_rate: float = 1e-3,
            optimizer: str | optax.GradientTransformation = "adam", seed: int = 0, mesh=None,
            cache_limit_mb: float = 1024.0, show_progress: bool | None = False, collections: dict | None = None):
    """Distils `teacher` into `student` on `(x, y)` with the library's train step and fit loop.

    The loss is the method's (e.g. "kd": alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y),
    per example, batch-averaged; a soft tree gets its Frosst & Hinton form), trained by `optimizer` over
    `epochs` passes of shuffled batches (`train.fit`; the ragged tail of each epoch is dropped).

    Args:
      student: a linen module, a pair `(init_fn, apply_fn)` or a `Student` (`as_student`).
      teacher: a linen module (with `teacher_variables`), a function `x -> logits` or
        `x -> (logits, {name: features})`, a function `(variables, x) -> ...` with `teacher_variables`
        (then they are an argument of the compiled step, not constants), or a `Teacher`; None for "labels".
      x: [n, ...] host inputs as the models take them (e.g. NHWC float32). y: [n] int labels.
      key: PRNG key (student initialization and the step keys).
      method: `parse_method`'s form, e.g. "kd", "fm", "kd+attention".
      temperature, alpha: override `config`'s; without a `config`, the student kind's defaults
        (`distill.kd_defaults`, chosen on validation splits: experiments/RESULTS.md). `"auto"` (either or
        both): chosen on a class-stratified 10 % of `(x, y)` held out (`tuning.holdout_split`) from
        T in (1, 2, 4, 8) and alpha in (0.5, 0.9) by validation accuracy (`tuning.select`), each candidate
        trained on the rest with the same budget; then the student trains on all of `(x, y)` with the
        chosen values (logged).
      config: every other method setting (`MethodConfig`).
      epochs, batch_size, learning_rate: the budget; batch_size a multiple of the mesh's devices.
      optimizer: a `train.OPTIMIZERS` name or an optax transformation (then learning_rate is unused).
      seed: the data order (`train.epoch_batch_indices`).
      mesh: default `parallel.make_mesh()` (every device; the batch is split over them).
      cache_limit_mb: when no setting changes the inputs, the teacher runs once over `x` and its outputs are
        kept on the host if they take at most this many MB; otherwise (or 0) it runs inside every step.
      show_progress: a progress bar (`train.progress_bar`).
      collections: non-trained variable collections of a linen student to use in place of its init's, e.g. a
        `models.Linear`'s PCA: `models.set_pca({}, pca.fit(...))`; each must be one the student's init makes,
        with the same shapes.
    Returns:
      The student's trained variables, as its own apply takes them: a linen module's
      `{"params": ..., **collections}` (BatchNorm statistics, a PCA), a pair's params.
    Raises:
      ValueError: naming the bad argument (`x`/`y` lengths, a linen teacher without `teacher_variables`, ...).
    """
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of examples, y as [n] labels; got x {x.shape}, y {y.shape}")
    if isinstance(teacher, nn.Module) and teacher_variables is None:
        raise ValueError(f"teacher is a linen module ({type(teacher).__name__}): pass its variables as teacher_variables=")
    student = as_student(student)
    teacher = None if teacher is None else as_teacher(teacher, teacher_variables)
    if is_auto(temperature) or is_auto(alpha):
        temperature, alpha = _auto_settings(student, teacher, x, y, key=key, method=method, temperature=temperature,
                                            alpha=alpha, config=config, epochs=epochs, batch_size=batch_size,
                                            learning_rate=learning_rate, optimizer=optimizer, seed=seed, mesh=mesh,
                                            cache_limit_mb=cache_limit_mb)
    overrides = {k: v for k, v in (("temperature", temperature), ("alpha", alpha)) if v is not None}
    cfg = dataclasses.replace(config or MethodConfig(*kd_defaults(student.kind)), **overrides)
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(batch_size, mesh)
    init_key, state_key = compilation.split_keys(key, 2)
    sample = x[:2]
    params, initial = init_student(student, method, cfg, init_key, sample, teacher)
    collections = _with_given_collections(initial, collections)
    num_classes = jax.eval_shape(student.apply, {"params": params["model"], **collections}, sample)[0].shape[-1]
    needs = method_needs(method, cfg)
    arrays = {"x": x, "y": y}
    if needs.teacher and not cfg.changes_inputs and cache_limit_mb > 0 and \
            teacher_cache_bytes(teacher, teacher.variables, x[:1], needs, len(x)) <= cache_limit_mb * 2**20:
        # the teacher without its variables (they are an argument): hashable, so its compiled pass is kept
        arrays.update(cache_teacher_outputs(dataclasses.replace(teacher, variables=None), teacher.variables, x, y, needs,
                                            mesh=parallel.local_mesh()))
    run_teacher = needs.teacher and len(arrays) == 2
    if isinstance(optimizer, str):
        steps = total_steps(len(y), parallel.local_batch_size(batch_size), epochs)
        leaf_step = tree_leaf_step(tree_leaf_step_scale(student.kind, method, cfg, optimizer))
        optimizer = make_optimizer(optimizer, learning_rate=learning_rate, total_steps=steps, extra=leaf_step)
    state = create_state(params, optimizer, key=state_key, extra=collections)
    step_fn = make_train_step(make_loss_fn(student, None, method, cfg, num_classes, teacher), optimizer, mesh)
    fit_cfg = FitConfig(epochs=epochs, batch_size=batch_size, seed=seed, desc=f"distill {student.name}",
                              show_progress=show_progress)
    state, _ = fit(state, step_fn, arrays, fit_cfg, mesh=mesh, teacher=teacher.variables if run_teacher else None)
    return student.export(jax.device_get({"params": state.params["model"], **state.extra}))


def _auto_settings(student, teacher, x, y, *, temperature, alpha, config, seed, **budget) -> tuple[float, float]:
    """(T, alpha) for `distill(..., temperature="auto" or alpha="auto")`: each candidate of the grid trained on
    `(x, y)` minus a class-stratified 10 % and scored on that 10 % (`tuning.select`, by accuracy)."""
    if teacher is None:
        raise ValueError('temperature/alpha="auto" compares students distilled from a teacher; pass teacher=')
    base = config or MethodConfig(*kd_defaults(student.kind))
    fixed_t = base.temperature if temperature is None else temperature
    fixed_a = base.alpha if alpha is None else alpha
    fit, held = holdout_split(y, 0.1, seed=seed)
    teacher_logits = np.asarray(teacher.apply(teacher.variables, jnp.asarray(x[held]))[0])

    def validation_logits(t: float, a: float) -> np.ndarray:
        variables = distill(student, teacher, x[fit], y[fit], temperature=t, alpha=a, config=config, seed=seed,
                            **budget)
        # `distill` returns what the student's own apply takes; `Student.apply` takes {"params": ...} (a pair's
        # params are returned bare)
        internal = variables if isinstance(variables, dict) and "params" in variables else {"params": variables}
        return np.asarray(student.apply(internal, jnp.asarray(x[held]))[0])

    grid = candidates(fixed_t, fixed_a, (1.0, 2.0, 4.0, 8.0), (0.5, 0.9))
    chosen = select(grid, validation_logits, teacher_logits, y[held], score="accuracy")
    log.info("distill: chose temperature %g and alpha %g on %d held-out examples", chosen.temperature, chosen.alpha,
             chosen.validation_images)
    return chosen.temperature, chosen.alpha
