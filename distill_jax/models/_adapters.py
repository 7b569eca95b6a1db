"""Any JAX model as a distillation teacher or student: two small normal forms.

`as_teacher` takes a linen module (with its variables), any function `x -> logits` /
`x -> (logits, {name: features})`, or `(variables, x) -> ...` with its variables (which then travel
as the train step's teacher argument), and returns a `Teacher` whose `apply(variables, x)` gives
`(logits, features)`. `as_student` takes a linen module or a pair `(init_fn, apply_fn)` of pure
functions and returns a `Student` (init, apply, the kind that picks its objective: "tree" for a
`models.SoftDecisionTree`, "linear" for `models.Linear`, "network" otherwise). Both dispatch with
`functools.singledispatch`, so another model library can register its own adapter.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax

from distill_jax import compilation
from distill_jax.models._layers import for_attribution, forward_only
from distill_jax.models._networks import MLP, SeedCNN, SmallCNN
from distill_jax.models._students import Linear, SoftDecisionTree

NETWORK = "network"  # the kind of a student that is neither a soft tree nor a linear-over-PCA model


def model_outputs(out, *, role: str) -> tuple[jax.Array, dict]:
    """`(logits, features)` from what a model returned: logits alone, or `(logits, {name: features})`.

    Args:
      out: logits [batch, classes], or a pair (logits, mapping name -> array).
      role: who returned it, for the error message (e.g. "teacher").
    Returns:
      (logits [batch, classes], features dict; {} when the model gave none).
    Raises:
      ValueError: naming `role`, for any other output.
    """
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Mapping):
        logits, features = out[0], dict(out[1])
    else:
        logits, features = out, {}
    if len(getattr(logits, "shape", ())) != 2:
        got = getattr(logits, "shape", None) or type(out).__name__
        raise ValueError(f"{role} must return logits [batch, classes] or (logits, {{name: features}}); got {got}")
    return logits, features


def _takes_return_features(module: nn.Module) -> bool:
    """Whether a linen module's `__call__` has this library's `return_features` option."""
    return "return_features" in inspect.signature(type(module).__call__).parameters


def _linen_apply(module: nn.Module, role: str, **kwargs) -> Callable:
    """`(variables, x) -> (logits, features)` of a linen module (features {} unless it has `return_features`)."""
    if _takes_return_features(module):
        kwargs = {**kwargs, "return_features": True}

    def apply(variables, x):
        return model_outputs(module.apply(variables, x, **kwargs), role=role)

    return apply


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher as pure functions of `(variables, x)`, whatever model it came from (`as_teacher`).

    Fields:
      apply: (variables, x) -> (logits [B, C], features {name: [B, ...]}); gradients go through it (saliency).
      forward: the same outputs for passes with no backward (a library model runs its fastest impl there).
      variables: what a train step receives as its `teacher` argument; None when the functions close
        over their parameters (they then become constants of the compiled step).
      name: for error messages.
    """

    apply: Callable
    forward: Callable
    variables: Any = None
    name: str = "teacher"


@functools.singledispatch
def as_teacher(teacher, variables=None) -> Teacher:
    """Any teacher as a `Teacher`: a linen module, a function, or a `Teacher` (returned as it is).

    - a flax linen module: `module.apply(variables, x)` (with `return_features=True` for this
      library's models); its variables are given here or passed to each step.
    - a function with `variables=None`: `x -> logits` or `x -> (logits, {name: features})`, its
      parameters closed over (an nnx module, `jax.vmap(equinox_module)`, a jnp function);
    - a function with `variables`: `(variables, x) -> logits` or `(logits, features)`, so the
      parameters are an argument of the train step, e.g. `(lambda s, x: nnx.merge(graphdef, s)(x), state)`
      from `nnx.split(model)`, or `(lambda p, x: jax.vmap(eqx.combine(p, static))(x), p)` from
      `eqx.partition(model, eqx.is_array)`.

    Other model types can register an adapter: `@as_teacher.register(MyModel)`.

    Raises:
      ValueError: `teacher` is none of these.
    """
    if not callable(teacher):
        raise ValueError(f"teacher must be a flax linen module, a function x -> logits (or (variables, x) -> logits "
                         f"with variables=...) or a distill.Teacher; got {type(teacher).__name__}")
    return _with_variables(_function_teacher(teacher, variables is not None), variables)


# The adapters of one model are built once (`compilation.shared`): the same module or function gives the same
# `Teacher` / `Student` functions, so the losses and train steps built from them are shared, not compiled again.
@compilation.shared
def _function_teacher(teacher: Callable, takes_variables: bool) -> Teacher:
    name = getattr(teacher, "__name__", type(teacher).__name__)
    role = f"teacher {name}"
    if not takes_variables:
        def apply(_, x):
            return model_outputs(teacher(x), role=role)
    else:
        def apply(v, x):
            return model_outputs(teacher(v, x), role=role)
    return Teacher(apply=apply, forward=apply, name=name)


def _with_variables(teacher: Teacher, variables) -> Teacher:
    return teacher if variables is None else dataclasses.replace(teacher, variables=variables)


@as_teacher.register(Teacher)
def _(teacher, variables=None) -> Teacher:
    return _with_variables(teacher, variables)


@as_teacher.register(nn.Module)
def _(teacher, variables=None) -> Teacher:
    return _with_variables(_linen_teacher(teacher), variables)


@compilation.shared
def _linen_teacher(teacher: nn.Module) -> Teacher:
    name = type(teacher).__name__
    return Teacher(apply=_linen_apply(teacher, name), forward=_linen_apply(forward_only(teacher), name), name=name)


@dataclasses.dataclass(frozen=True)
class Student:
    """A trainable student as pure functions, whatever model it came from (`as_student`).

    Fields:
      init: (key, x) -> variables `{"params": trainable pytree, **other collections}` (e.g. "batch_stats",
        "pca"); only "params" is trained by gradient.
      apply: (variables, x) -> (logits [B, C], features): the evaluation pass (saliency matching reads it).
      train_apply: (variables, x) -> ((logits, features), updated collections): the training pass; the
        updates hold only the `mutable` collections ({} when there are none) and go to `state.extra`.
      loop_apply: (variables, x) -> logits, the same function for use inside loops (the PGD attack).
      export: variables -> what the user's own apply takes (a linen module's variables; a pair's params).
      kind: "tree" (the Frosst & Hinton objective), "linear", "network", or a `models.MODEL_KINDS` name.
      name: for error messages.
    """

    init: Callable
    apply: Callable
    train_apply: Callable
    loop_apply: Callable
    export: Callable
    kind: str = NETWORK
    name: str = "student"


# library models whose class fixes the objective; other linen modules and pairs are networks
STUDENT_KINDS: tuple[tuple[type, str], ...] = (
    (SoftDecisionTree, "tree"), (Linear, "linear"), (SeedCNN, "seed_cnn"),
    (SmallCNN, "cnn"), (MLP, "mlp"),
)


def _kind_of(module: nn.Module) -> str:
    return next((kind for cls, kind in STUDENT_KINDS if isinstance(module, cls)), NETWORK)


@functools.singledispatch
def as_student(student, *, kind: str | None = None, mutable=(), train_kwargs=None) -> Student:
    """Any student as a `Student`: a linen module, a pair `(init_fn, apply_fn)`, or a `Student`.

    - a flax linen module: `init` is `module.init` (jitted), `apply` is `module.apply` (with
      `return_features=True` for this library's models); `mutable` names the collections its training
      pass updates (e.g. `("batch_stats",)`, applied with `mutable=` and `train_kwargs`, e.g.
      `{"train": True}`); every other collection (a PCA) stays as initialised or given.
    - a pair of pure functions: `init_fn(key, x) -> params`, `apply_fn(params, x) -> logits` or
      `(logits, {name: features})`; all of `params` is trained, and `distill` returns it as it is.

    Args:
      kind: overrides the kind found from the model (`STUDENT_KINDS`; "network" otherwise), e.g. "tree"
        for a pair that returns a soft tree's `path_probs`, `leaf_logits`, `node_reach` and `routing`.
    Raises:
      ValueError: naming `student` (not a module or a pair of callables) or `mutable` (given for a pair).
    Other model types can register an adapter: `@as_student.register(MyModel)`.
    """
    if not (isinstance(student, (tuple, list)) and len(student) == 2 and all(callable(f) for f in student)):
        raise ValueError(f"student must be a flax linen module, a pair (init_fn, apply_fn) of functions or a "
                         f"distill.Student; got {type(student).__name__}")
    if mutable:
        raise ValueError(f"mutable={tuple(mutable)!r} is for linen modules; a pair (init_fn, apply_fn) has no "
                         f"collections besides its params (all trained)")
    return _pair_student(*student, kind or NETWORK)


@compilation.shared
def _pair_student(init_fn: Callable, apply_fn: Callable, kind: str) -> Student:
    name = getattr(apply_fn, "__name__", "apply_fn")

    def init(key, x):
        return {"params": init_fn(key, x)}

    def apply(variables, x):
        return model_outputs(apply_fn(variables["params"], x), role=f"student {name}")

    return Student(init=init, apply=apply, train_apply=lambda v, x: (apply(v, x), {}),
                   loop_apply=lambda v, x: apply(v, x)[0], export=lambda v: v["params"], kind=kind, name=name)


@as_student.register(Student)
def _(student, *, kind: str | None = None, mutable=(), train_kwargs=None) -> Student:
    del mutable, train_kwargs
    return student if kind is None else dataclasses.replace(student, kind=kind)


@as_student.register(nn.Module)
def _(student, *, kind: str | None = None, mutable=(), train_kwargs=None) -> Student:
    return _linen_student(student, kind or _kind_of(student), tuple(mutable), tuple(dict(train_kwargs or {}).items()))


@compilation.shared
def _linen_student(student: nn.Module, kind: str, mutable: tuple, train_items: tuple) -> Student:
    name, train_kwargs = type(student).__name__, dict(train_items)
    apply = _linen_apply(student, name)
    # the attack runs the model in a loop: the backend's attribution impl (see `models.for_attribution`)
    loop = _linen_apply(for_attribution(student), name)
    options = {**train_kwargs, "return_features": True} if _takes_return_features(student) else train_kwargs

    def train_apply(variables, x):
        if not mutable:
            return model_outputs(student.apply(variables, x, **options), role=name), {}
        out, updates = student.apply(variables, x, mutable=list(mutable), **options)
        return model_outputs(out, role=name), flax.core.unfreeze(updates)

    return Student(init=_jitted_init(student, tuple(sorted(train_kwargs.items()))), apply=apply,
                   train_apply=train_apply, loop_apply=lambda v, x: loop(v, x)[0], export=lambda v: v,
                   kind=kind, name=name)


@functools.lru_cache(maxsize=None)  # linen modules hash by their fields: one compiled init per architecture
def _jitted_init(module: nn.Module, options: tuple = ()) -> Callable:
    """`module.init` jitted with keyword `options` (an eager init of a deep net dispatches op by op), compiled
    as a program that runs once (`compilation.run_once`)."""
    return compilation.run_once(functools.partial(module.init, **dict(options)))
