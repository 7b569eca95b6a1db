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
import functools
import re
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import attacks, compilation, losses, models, parallel, train
from distill_jax.adapters import NETWORK, Student, Teacher, as_student, as_teacher, model_outputs  # noqa: F401 - public here too

Pair = tuple[str, str]  # (student layer, teacher layer)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters of every term (each term reads the ones it needs)."""

    temperature: float = 4.0
    alpha: float = 0.9
    hint_pairs: tuple[Pair, ...] = (("conv2", "conv2"),)
    attention_pairs: tuple[Pair, ...] = (("conv1", "conv1"), ("conv2", "conv2"))
    attention_p: float = 2.0
    tree_balance: float = 0.1
    # the `labels` term's softmax temperature: 1, except for the teacher of defensive distillation, which
    # Papernot et al. (2016) train at the same T as its student (its logits grow about T-fold)
    label_temperature: float = 1.0
    augment_shift: int = 0
    augment_flip: bool = False
    mixup: float = 0.0  # Beta(mixup, mixup) weights of `data.mixup` on every batch; 0 = off
    # adversarial training (`ADVERSARIAL`): "none" or "pgd"; budget and step in standardized input units
    adversarial: str = "none"
    adversarial_epsilon: float = 0.25
    adversarial_steps: int = 5
    adversarial_step_size: float = 0.0  # 0 = 2.5 * epsilon / steps (Madry et al. 2018)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")
        if self.tree_balance < 0:
            raise ValueError(f"tree_balance must be >= 0; got {self.tree_balance}")
        if not self.label_temperature > 0:
            raise ValueError(f"label_temperature must be > 0; got {self.label_temperature}")
        if self.mixup < 0:
            raise ValueError(f"mixup must be >= 0 (0 = off); got {self.mixup}")
        if self.adversarial not in ADVERSARIAL:
            raise ValueError(f"adversarial {self.adversarial!r} is not known; use one of {sorted(ADVERSARIAL)}")
        if not self.adversarial_epsilon >= 0:
            raise ValueError(f"adversarial_epsilon must be >= 0; got {self.adversarial_epsilon}")
        if not (isinstance(self.adversarial_steps, (int, np.integer)) and self.adversarial_steps >= 1):
            raise ValueError(f"adversarial_steps must be an integer >= 1; got {self.adversarial_steps!r}")
        if not self.adversarial_step_size >= 0:
            raise ValueError(f"adversarial_step_size must be >= 0 (0 = 2.5 * epsilon / steps); "
                             f"got {self.adversarial_step_size}")

    @property
    def adversarial_on(self) -> bool:
        return self.adversarial != "none"

    @property
    def pgd_step_size(self) -> float:
        """`adversarial_step_size`, or Madry et al.'s 2.5 * epsilon / steps when it is 0."""
        return self.adversarial_step_size or 2.5 * self.adversarial_epsilon / self.adversarial_steps

    @property
    def changes_inputs(self) -> bool:
        """Whether each step sees new inputs (augmentation, mixup or adversarial examples): then no teacher
        output can be cached."""
        return bool(self.augment_shift or self.augment_flip or self.mixup or self.adversarial_on)


@dataclasses.dataclass(frozen=True)
class Context:
    """What a term may read in one step. Teacher fields are None when no term needs them."""

    x: jax.Array
    labels: jax.Array
    num_classes: int
    student_kind: str
    student_logits: jax.Array
    student_features: dict
    student_apply: Callable[[jax.Array], jax.Array]
    aux_params: dict
    teacher_logits: jax.Array | None
    teacher_features: dict
    teacher_attention: dict
    teacher_saliency: jax.Array | None
    cfg: MethodConfig


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A loss term: its per-example loss and what it needs from teacher and student.

    `teacher_layers` are read as whole feature maps [B, H, W, C]; `teacher_attention` layers only as
    their attention energy maps [B, H, W] (`losses.attention_energy_map`), a C-th of the size, which
    is what a teacher cache keeps for attention transfer.
    """

    loss: Callable[[Context], jax.Array]
    teacher_logits: bool = False
    teacher_layers: Callable[[MethodConfig], tuple[str, ...]] = lambda cfg: ()
    teacher_attention: Callable[[MethodConfig], tuple[str, ...]] = lambda cfg: ()
    student_layers: Callable[[MethodConfig], tuple[str, ...]] = lambda cfg: ()
    teacher_saliency: bool = False
    reads_labels: bool = False  # labels of a mixed image are undefined: terms that read them refuse mixup


# --------------------------------------------------------------------------- terms


def _is_tree(ctx: Context) -> bool:
    return ctx.student_kind == "tree"


def _tree_loss(ctx: Context, target_probs: jax.Array) -> jax.Array:
    f = ctx.student_features
    return losses.soft_tree_loss(f["path_probs"], f["leaf_logits"], target_probs)


def labels_term(ctx: Context) -> jax.Array:
    """Cross entropy with the labels, CE(softmax(logits / label_temperature), y); for a soft tree, Frosst &
    Hinton's expected leaf cross entropy."""
    if _is_tree(ctx):
        return _tree_loss(ctx, jax.nn.one_hot(ctx.labels, ctx.num_classes))
    return losses.cross_entropy(ctx.student_logits / ctx.cfg.label_temperature, ctx.labels)


def kd_term(ctx: Context) -> jax.Array:
    """Hinton KD mixed with label cross entropy: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE.

    For a soft tree the soft part is `losses.soft_tree_kd_loss` (leaf logits divided by T, as a
    network's logits are) and the hard part Frosst & Hinton's leaf cross entropy with the labels.
    """
    t, alpha = ctx.cfg.temperature, ctx.cfg.alpha
    if _is_tree(ctx):
        return alpha * fm_term(ctx) + (1 - alpha) * labels_term(ctx)
    return losses.distillation_loss(ctx.student_logits, ctx.teacher_logits, ctx.labels, temperature=t, alpha=alpha)


def fm_term(ctx: Context) -> jax.Array:
    """Function matching: T^2 * KL(teacher_T || student_T) on the view both saw, labels unread (a tree: its KD form)."""
    t = ctx.cfg.temperature
    if _is_tree(ctx):
        f = ctx.student_features
        return losses.soft_tree_kd_loss(f["path_probs"], f["leaf_logits"], ctx.teacher_logits, temperature=t)
    return losses.kd_loss(ctx.student_logits, ctx.teacher_logits, temperature=t)


def logits_term(ctx: Context) -> jax.Array:
    return losses.logit_matching_loss(ctx.student_logits, ctx.teacher_logits)


def hint_term(ctx: Context) -> jax.Array:
    total = 0.0
    for s_layer, t_layer in ctx.cfg.hint_pairs:
        teacher = ctx.teacher_features[t_layer]
        regressor = models.HintRegressor(teacher.shape[-1])
        mapped = regressor.apply({"params": ctx.aux_params["hint"][_pair_key(s_layer, t_layer)]},
                                 ctx.student_features[s_layer])
        total = total + losses.hint_loss(mapped, teacher)
    return total


def attention_term(ctx: Context) -> jax.Array:
    total = 0.0
    for s_layer, t_layer in ctx.cfg.attention_pairs:
        student_map = losses.attention_energy_map(ctx.student_features[s_layer], p=ctx.cfg.attention_p)
        total = total + losses.attention_transfer_from_maps(student_map, ctx.teacher_attention[t_layer])
    return total


def saliency_term(ctx: Context) -> jax.Array:
    return losses.saliency_matching_loss(ctx.student_apply, ctx.x, ctx.labels, ctx.teacher_saliency)


def defensive_term(ctx: Context) -> jax.Array:
    """Defensive distillation: -sum softmax(t/T) log softmax(s/T), labels unread; the student is used at T = 1.

    For a soft tree the leaves play the student's logits: Frosst & Hinton's path-weighted leaf cross
    entropy with the leaf logits divided by T and the teacher's softmax at T as the target.
    See `losses.defensive_distillation_loss` (Papernot et al. 2016).
    """
    t = ctx.cfg.temperature
    if _is_tree(ctx):
        f = ctx.student_features
        return losses.soft_tree_loss(f["path_probs"], f["leaf_logits"] / t, jax.nn.softmax(ctx.teacher_logits / t, -1))
    return losses.defensive_distillation_loss(ctx.student_logits, ctx.teacher_logits, temperature=t)


def _pairs_side(attr: str, side: int):
    return lambda cfg: tuple(pair[side] for pair in getattr(cfg, attr))


TERMS: dict[str, TermSpec] = {
    "labels": TermSpec(labels_term, reads_labels=True),
    "kd": TermSpec(kd_term, teacher_logits=True, reads_labels=True),
    "fm": TermSpec(fm_term, teacher_logits=True),
    "logits": TermSpec(logits_term, teacher_logits=True),
    "hint": TermSpec(hint_term, teacher_layers=_pairs_side("hint_pairs", 1),
                     student_layers=_pairs_side("hint_pairs", 0)),
    "attention": TermSpec(attention_term, teacher_attention=_pairs_side("attention_pairs", 1),
                          student_layers=_pairs_side("attention_pairs", 0)),
    "saliency": TermSpec(saliency_term, teacher_saliency=True, reads_labels=True),
    "defensive": TermSpec(defensive_term, teacher_logits=True),
}

_TERM_RE = re.compile(r"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")


def parse_method(method: str) -> tuple[tuple[str, float], ...]:
    """Parses `"kd+0.5*attention"` into `(("kd", 1.0), ("attention", 0.5))`.

    Raises:
      ValueError: an unknown term or a malformed weight (the message lists the known terms).
    """
    terms = []
    for part in method.split("+"):
        match = _TERM_RE.match(part)
        if not match or match["name"] not in TERMS:
            raise ValueError(f"method {method!r}: term {part.strip()!r} is not known; "
                             f"write terms from {sorted(TERMS)} joined by '+', each optionally 'weight*term'")
        try:
            weight = float(match["w"]) if match["w"] else 1.0
        except ValueError:
            raise ValueError(f"method {method!r}: weight {match['w']!r} is not a number") from None
        terms.append((match["name"], weight))
    return tuple(terms)


@dataclasses.dataclass(frozen=True)
class Needs:
    """Union of what a method's terms read."""

    teacher_logits: bool
    teacher_layers: tuple[str, ...]
    student_layers: tuple[str, ...]
    teacher_saliency: bool
    teacher_attention: tuple[str, ...] = ()
    attention_p: float = 2.0

    @property
    def teacher(self) -> bool:
        return self.teacher_logits or bool(self.teacher_layers) or bool(self.teacher_attention) or self.teacher_saliency

    @property
    def teacher_forward(self) -> bool:
        """Whether the teacher's forward pass (logits and features) must run."""
        return self.teacher_logits or bool(self.teacher_layers) or bool(self.teacher_attention)


def method_needs(method: str, cfg: MethodConfig) -> Needs:
    specs = [TERMS[name] for name, _ in parse_method(method)]
    return Needs(
        teacher_logits=any(s.teacher_logits for s in specs),
        teacher_layers=tuple(dict.fromkeys(l for s in specs for l in s.teacher_layers(cfg))),
        student_layers=tuple(dict.fromkeys(l for s in specs for l in s.student_layers(cfg))),
        teacher_saliency=any(s.teacher_saliency for s in specs),
        teacher_attention=tuple(dict.fromkeys(l for s in specs for l in s.teacher_attention(cfg))),
        attention_p=cfg.attention_p,
    )


def _pair_key(student_layer: str, teacher_layer: str) -> str:
    return f"{student_layer}->{teacher_layer}"


# --------------------------------------------------------------------------- teacher outputs


def teacher_outputs(teacher, teacher_vars, x: jax.Array, labels: jax.Array, needs: Needs) -> dict:
    """The teacher outputs a method needs, under stop_gradient.

    `teacher`: anything `as_teacher` takes (a linen module, a function `x -> logits`, a `Teacher`);
    `teacher_vars` is passed to its `(variables, x)` form (None for a function that closes over them).
    Returns a dict with `teacher_logits` [B, C], `teacher_feat/<layer>` feature maps,
    `teacher_attention/<layer>` attention energy maps [B, H, W] and `teacher_saliency`,
    each present only when needed.
    """
    out = {}
    teacher = as_teacher(teacher)
    if needs.teacher_forward:
        logits, feats = teacher.forward(teacher_vars, x)
        if needs.teacher_logits:
            out["teacher_logits"] = logits
        out.update({f"teacher_feat/{l}": feats[l] for l in needs.teacher_layers})
        out.update({f"teacher_attention/{l}": losses.attention_energy_map(feats[l], p=needs.attention_p)
                    for l in needs.teacher_attention})
    if needs.teacher_saliency:
        out["teacher_saliency"] = losses.input_saliency(lambda z: teacher.apply(teacher_vars, z)[0], x, labels)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def _identity(x):
    return x


def teacher_cache_shapes(teacher, teacher_vars, sample_x: jax.Array, needs: Needs, *,
                         inputs: Callable[[jax.Array], jax.Array] = _identity) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of one example's cached outputs (no computation): key -> ShapeDtypeStruct without the batch axis."""
    out = jax.eval_shape(lambda v, xb: teacher_outputs(teacher, v, inputs(xb), jnp.zeros(xb.shape[:1], jnp.int32), needs),
                         teacher_vars, sample_x[:1])
    return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in out.items()}


def teacher_cache_bytes(teacher, teacher_vars, sample_x: jax.Array, needs: Needs, n: int, *,
                        inputs: Callable[[jax.Array], jax.Array] = _identity) -> int:
    """Host memory `cache_teacher_outputs` would take for `n` examples, in bytes."""
    shapes = teacher_cache_shapes(teacher, teacher_vars, sample_x, needs, inputs=inputs)
    return n * sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in shapes.values())


def cache_teacher_outputs(teacher, teacher_vars, x: np.ndarray, labels: np.ndarray, needs: Needs,
                          *, batch_size: int = 256, inputs: Callable[[jax.Array], jax.Array] = _identity,
                          mesh=None) -> dict[str, np.ndarray]:
    """Runs the frozen teacher once over `x` and returns its outputs as host arrays (same keys as `teacher_outputs`).

    The outputs are written into arrays allocated once at their final size, so the peak host memory
    is the cache itself plus one batch (`teacher_cache_bytes` says how much beforehand).

    Args:
      teacher, teacher_vars: as for `teacher_outputs`.
      x: [n, ...] host images as stored (e.g. uint8); `inputs` maps a batch of them to the teacher's
        input on the device (e.g. standardization), inside the jitted call.
      labels: [n] ints (saliency targets).
      mesh: a single-process mesh (e.g. `parallel.local_mesh()`) to split every batch over its devices,
        the teacher's variables placed on it once; None runs on the default device.
    Returns:
      key -> [n, ...] numpy array.

    The jitted teacher pass is kept for the next call with the same teacher, needs, inputs, mesh and batch
    size (students of one run share one compiled program instead of one each).
    """
    n = len(x)
    if n == 0:
        return {}
    shapes = teacher_cache_shapes(teacher, teacher_vars, x[:1], needs, inputs=inputs)  # shapes only: no transfer
    out = {k: np.empty((n,) + s.shape, s.dtype) for k, s in shapes.items()}
    if _hashable((teacher, needs, inputs, mesh)):
        fn, batch_size = _cached_teacher_outputs_fn(teacher, needs, inputs, mesh, batch_size)
        teacher_vars = teacher_vars if mesh is None else parallel.replicate(teacher_vars, mesh)
    else:  # e.g. a module with a list field: a program of its own
        fn, teacher_vars, batch_size = teacher_outputs_fn(teacher, teacher_vars, needs, inputs, mesh, batch_size)
    multiple = batch_size if mesh is not None else 1  # a sharded batch keeps its size: the last one is padded
    for i in range(0, n, batch_size):
        xb, pad = parallel.pad_to_multiple(x[i : i + batch_size], multiple)
        yb, _ = parallel.pad_to_multiple(labels[i : i + batch_size], multiple)
        if mesh is not None:
            xb, yb = jax.device_put((xb, yb), parallel.data_sharding(mesh))
        chunk = jax.device_get(fn(teacher_vars, xb, yb))
        for k, v in chunk.items():
            out[k][i : i + len(v) - pad] = v[: len(v) - pad]
    return out


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=4)  # small: each entry keeps its teacher module and `inputs` (and what they hold) alive
def _cached_teacher_outputs_fn(teacher, needs: Needs, inputs: Callable, mesh, batch_size: int):
    """`teacher_outputs_fn`'s jitted function and batch size, one per (teacher, needs, inputs, mesh, batch size)."""
    fn, _, batch_size = teacher_outputs_fn(teacher, None, needs, inputs, mesh, batch_size)
    return fn, batch_size


def teacher_outputs_fn(teacher, teacher_vars, needs: Needs, inputs: Callable, mesh, batch_size: int):
    """The jitted `(variables, x, labels) -> teacher_outputs`, the variables to pass it, and the batch size.

    With a mesh: batches split over its `data` axis (the batch size rounded up to a multiple of its
    devices), the variables replicated on it once; without one: plain jit on the default device.
    """
    def run(v, xb, yb):
        return teacher_outputs(teacher, v, inputs(xb), yb, needs)

    if mesh is None:
        return compilation.jit(run), teacher_vars, batch_size
    devices = mesh.shape[parallel.DATA_AXIS]
    batch_size = -(-batch_size // devices) * devices
    repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return compilation.jit(run, in_shardings=(repl, data, data), out_shardings=data), parallel.replicate(teacher_vars, mesh), \
        batch_size


# --------------------------------------------------------------------------- the loss function


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
    model_key, aux_key = jax.random.split(key)
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
                _pair_key(s, t): models.HintRegressor(t_feats[t].shape[-1]).init(
                    k, jnp.zeros(s_feats[s].shape, s_feats[s].dtype))["params"]
                for k, (s, t) in zip(keys, hint_pairs)
            }
    params = variables.pop("params")
    return {"model": params, "aux": aux}, variables


def _used_pairs(method: str, cfg: MethodConfig, term: str) -> tuple[Pair, ...]:
    return getattr(cfg, f"{term}_pairs") if term in dict(parse_method(method)) else ()


def _check_layers(method: str, role: str, model_name: str, wanted, features) -> None:
    missing = [l for l in wanted if l not in features]
    if missing:
        raise ValueError(f"method {method!r} reads {role} feature(s) {missing}, but {model_name} produces "
                         f"{ {k: tuple(v.shape) for k, v in features.items()} }")


def _check_spatial(method: str, s_layer: str, s_shape, t_layer: str, t_shape) -> None:
    ok = len(s_shape) == len(t_shape) and (
        len(s_shape) == 2 or all(max(a, b) % min(a, b) == 0 for a, b in zip(s_shape[1:3], t_shape[1:3])))
    if not ok:
        raise ValueError(f"method {method!r}: student layer {s_layer!r} {tuple(s_shape)} cannot be matched to "
                         f"teacher layer {t_layer!r} {tuple(t_shape)} (spatial sizes must divide each other)")


def check_mixup(method: str, cfg: MethodConfig) -> None:
    """Mixup only with terms that read no labels (`fm`, `logits`, `hint`, `attention`).

    Raises:
      ValueError: naming the terms that read labels.
    """
    readers = [name for name, _ in parse_method(method) if TERMS[name].reads_labels]
    if cfg.mixup and readers:
        raise ValueError(f"method {method!r}: mixup makes images whose labels are undefined, but {readers} read the "
                         f"labels; use 'fm' (function matching) or set method.mixup=0")


# --------------------------------------------------------------------------- adversarial training


def pgd_view(apply_fn: Callable[[jax.Array], jax.Array], x: jax.Array, labels: jax.Array, *, key: jax.Array,
             cfg: MethodConfig) -> jax.Array:
    """PGD adversarial examples against `apply_fn`, under stop_gradient: `attacks.pgd` with the config's budget.

    Formula: x_0 = x + U(-eps, eps);  x_{k+1} = Proj_{||v - x||_inf <= eps}(x_k + a * sign(grad_x CE(f(x_k), y))),
    `adversarial_steps` times, eps = `adversarial_epsilon`, a = `pgd_step_size`, both in standardized
    input units; no clipping to the pixel range (as `metrics.adversarial_accuracy` evaluates).

    Args:
      apply_fn: x -> logits [B, C] of the model being trained (its parameters under stop_gradient).
      x: [B, ...] model inputs; labels: [B] ints; key: the random start.
    Returns:
      [B, ...] like x, with no gradient to anything.
    Reference: Madry, Makelov, Schmidt, Tsipras & Vladu (2018), "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR, section 3 and appendix (the min-max training).
    """
    x_adv = attacks.pgd(apply_fn, x, labels, epsilon=cfg.adversarial_epsilon, step_size=cfg.pgd_step_size,
                        steps=int(cfg.adversarial_steps), key=key)
    return jax.lax.stop_gradient(x_adv)


# name -> (apply_fn, x, labels, *, key, cfg) -> adversarial view of x; "none" leaves the batch alone
ADVERSARIAL: dict[str, Callable | None] = {"none": None, "pgd": pgd_view}
ADVERSARIAL_KINDS = ("seed_cnn", "cnn", "mlp")  # the networks; trees and linear-over-PCA students are not supported


def check_adversarial(kind: str, cfg: MethodConfig, *, key: str = "adversarial") -> None:
    """Adversarial training only for the networks (`ADVERSARIAL_KINDS`, or a user's model of kind "network")
    and without mixup.

    The attack maximizes the cross entropy with the batch's labels, which a mixed image does not have.
    Raises:
      ValueError: naming `key` (the config key that asked for it), the model kind and the fix.
    """
    if not cfg.adversarial_on:
        return
    if kind not in ADVERSARIAL_KINDS and kind != NETWORK:
        raise ValueError(f"{key}={cfg.adversarial!r}: adversarial training is supported for {list(ADVERSARIAL_KINDS)} "
                         f"models, not {kind!r}; set it to 'none' for this model")
    if cfg.mixup:
        raise ValueError(f"{key}={cfg.adversarial!r}: the attack maximizes the cross entropy with the labels, but "
                         f"mixup makes images whose labels are undefined; set method.mixup=0 or {key}='none'")


def adversarial_view(apply_fn: Callable[[jax.Array], jax.Array], x: jax.Array, labels: jax.Array, *,
                     key: jax.Array, cfg: MethodConfig) -> jax.Array:
    """`ADVERSARIAL[cfg.adversarial]`'s view of the batch (`x` itself for "none")."""
    make = ADVERSARIAL[cfg.adversarial]
    return x if make is None else make(apply_fn, x, labels, key=key, cfg=cfg)


def training_view(key: jax.Array, x: jax.Array, cfg: MethodConfig, *, labels: jax.Array | None = None,
                  apply_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The view of a batch that student and teacher both see: `data.augment`, then `data.mixup`, then
    `adversarial_view` against `apply_fn` (the model being trained) with `labels`, each when on.

    Keys: the augmentation reads `key`, mixup `fold_in(key, 1)`, the attack's random start `fold_in(key, 2)`.
    """
    from distill_jax import data  # noqa: PLC0415 - data imports jax-heavy loaders lazily

    if cfg.augment_shift or cfg.augment_flip:
        x = data.augment(key, x, max_shift=cfg.augment_shift, flip=cfg.augment_flip)
    if cfg.mixup:
        x, _ = data.mixup(jax.random.fold_in(key, 1), x, alpha=cfg.mixup)
    if cfg.adversarial_on:
        if apply_fn is None or labels is None:
            raise ValueError(f"adversarial={cfg.adversarial!r} needs the model (apply_fn) and the labels to attack")
        x = adversarial_view(apply_fn, x, labels, key=jax.random.fold_in(key, 2), cfg=cfg)
    return x


def make_loss_fn(student, student_kind: str | None, method: str, cfg: MethodConfig, num_classes: int,
                 teacher=None) -> Callable:
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
    """
    terms = parse_method(method)
    needs = method_needs(method, cfg)
    student = as_student(student, kind=student_kind)
    teacher = None if teacher is None else as_teacher(teacher)
    check_mixup(method, cfg)
    check_adversarial(student.kind, cfg)
    is_tree = student.kind == "tree"

    def loss_fn(params, extra, batch, teacher_vars, key):
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
            teacher_saliency=t_out.get("teacher_saliency"), cfg=cfg,
        )
        total = sum(weight * TERMS[name].loss(ctx) for name, weight in terms)
        if is_tree and cfg.tree_balance > 0:
            penalty = losses.tree_balance_penalty(feats["node_reach"], feats["routing"], strength=cfg.tree_balance)
            total = total + penalty
        accuracy = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        aux = {"accuracy": accuracy}
        if updates:
            aux[train.MUTABLE] = updates
        return total, aux

    return loss_fn


# --------------------------------------------------------------------------- one call


def distill(student, teacher, x, y, *, key: jax.Array, method: str = "kd", temperature: float | None = None,
            alpha: float | None = None, config: MethodConfig | None = None, teacher_variables=None,
            epochs: int = 10, batch_size: int = 64, learning_rate: float = 1e-3,
            optimizer: str | optax.GradientTransformation = "adam", seed: int = 0, mesh=None,
            cache_limit_mb: float = 1024.0, show_progress: bool | None = False):
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
      temperature, alpha: override `config`'s (default `MethodConfig()`: T = 4, alpha = 0.9).
      config: every other method setting (`MethodConfig`).
      epochs, batch_size, learning_rate: the budget; batch_size a multiple of the mesh's devices.
      optimizer: a `train.OPTIMIZERS` name or an optax transformation (then learning_rate is unused).
      seed: the data order (`train.epoch_batch_indices`).
      mesh: default `parallel.make_mesh()` (every device; the batch is split over them).
      cache_limit_mb: when no setting changes the inputs, the teacher runs once over `x` and its outputs are
        kept on the host if they take at most this many MB; otherwise (or 0) it runs inside every step.
      show_progress: a progress bar (`train.progress_bar`).
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
    overrides = {k: v for k, v in (("temperature", temperature), ("alpha", alpha)) if v is not None}
    cfg = dataclasses.replace(config or MethodConfig(), **overrides)
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(batch_size, mesh)
    init_key, state_key = jax.random.split(key)
    sample = jnp.asarray(x[:2])
    params, collections = init_student(student, method, cfg, init_key, sample, teacher)
    num_classes = jax.eval_shape(student.apply, {"params": params["model"], **collections}, sample)[0].shape[-1]
    needs = method_needs(method, cfg)
    arrays = {"x": x, "y": y}
    if needs.teacher and not cfg.changes_inputs and cache_limit_mb > 0 and \
            teacher_cache_bytes(teacher, teacher.variables, x[:1], needs, len(x)) <= cache_limit_mb * 2**20:
        arrays.update(cache_teacher_outputs(teacher, teacher.variables, x, y, needs, mesh=parallel.local_mesh()))
    run_teacher = needs.teacher and len(arrays) == 2
    if isinstance(optimizer, str):
        steps = train.total_steps(len(y), parallel.local_batch_size(batch_size), epochs)
        optimizer = train.make_optimizer(optimizer, learning_rate=learning_rate, total_steps=steps)
    state = train.create_state(params, optimizer, key=state_key, extra=collections)
    step_fn = train.make_train_step(make_loss_fn(student, None, method, cfg, num_classes, teacher), optimizer, mesh)
    fit_cfg = train.FitConfig(epochs=epochs, batch_size=batch_size, seed=seed, desc=f"distill {student.name}",
                              show_progress=show_progress)
    state, _ = train.fit(state, step_fn, arrays, fit_cfg, mesh=mesh, teacher=teacher.variables if run_teacher else None)
    return student.export(jax.device_get({"params": state.params["model"], **state.extra}))
