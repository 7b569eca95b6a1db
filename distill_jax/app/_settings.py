"""From config to objects: student names, method configs, budgets, models, pruning and DP-SGD
settings read from an ml_collections config.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections

from distill_jax import parallel
from distill_jax.data._augment import PERTURBATIONS
from distill_jax.distill._defaults import kd_defaults
from distill_jax.distill._method import MethodConfig
from distill_jax.distill.prune import magnitude_pruning
from distill_jax.distill.tuning import is_auto
from distill_jax.models._ensemble import Ensemble
from distill_jax.models._students import set_pca
from distill_jax.models._util import build, with_compute_dtype
from distill_jax.train import poisson_batch_cap, poisson_overflow_probability
from distill_jax.train._step import DPSGD

STUDENT_KINDS = ("cnn", "mlp", "linear", "tree")


def parse_pairs(text: str, key: str) -> tuple[tuple[str, str], ...]:
    """`"conv1:conv1,conv2:conv3"` -> (("conv1", "conv1"), ("conv2", "conv3")) (student:teacher)."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{key}={text!r}: each pair must be 'student_layer:teacher_layer'")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


class StudentSpec(NamedTuple):
    """One student of the config's `students`: its name `<kind>-<method>`, its kind and its method."""

    name: str
    kind: str
    method: str


def parse_students(text: str) -> list[StudentSpec]:
    """`"cnn-kd,tree-labels"` -> [StudentSpec("cnn-kd", "cnn", "kd"), StudentSpec("tree-labels", "tree", "labels")]."""
    out = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        kind, _, method = name.partition("-")
        if kind not in STUDENT_KINDS or not method:
            raise ValueError(f"students: {name!r} must be '<kind>-<method>' with kind in {list(STUDENT_KINDS)}")
        out.append(StudentSpec(name, kind, method))
    if not out:
        raise ValueError("students is empty; name at least one, e.g. 'cnn-kd'")
    return out


ADVERSARIAL_KEYS = ("adversarial", "adversarial_epsilon", "adversarial_steps", "adversarial_step_size")


def _kind_defaults(kind: str | None):
    """The (temperature, alpha) a kind gets by default (`distill.kd_defaults`; without a kind, `MethodConfig`'s)."""
    return kd_defaults(kind) if kind else MethodConfig()


def kd_values(c, kind: str | None) -> tuple:
    """`method.temperature` and `method.alpha` for a student kind: numbers and "auto" as set, "default" as the
    kind's default (`_kind_defaults`)."""
    default = _kind_defaults(kind)
    m = c.method
    return (default.temperature if m.temperature == "default" else m.temperature,
            default.alpha if m.alpha == "default" else m.alpha)


def method_config(c, *, temperature: float | None = None, alpha: float | None = None,
                  group=None, kind: str | None = None) -> MethodConfig:
    """The distillation hyper-parameters of config `c`; `temperature`/`alpha` override the config's.

    A setting left at `"default"` takes the student kind's default (`kd_values`); one left at `"auto"` and
    not overridden takes the kind's default too (it is only read by the `kd` term, whose students get the
    chosen value through `kd_settings`).
    `group`: the budget of the model being trained (`c.teacher`, or `student_budget(kind, c)`), whose
    `adversarial*` keys (`ADVERSARIAL_KEYS`) set adversarial training; None (or keys it lacks) leaves
    `distill.MethodConfig`'s defaults (no adversarial training).
    """
    m = c.method
    defaults = _kind_defaults(kind)
    set_temperature, set_alpha = kd_values(c, kind)
    if temperature is None:
        temperature = defaults.temperature if is_auto(set_temperature) else set_temperature
    if alpha is None:
        alpha = defaults.alpha if is_auto(set_alpha) else set_alpha
    return MethodConfig(
        temperature=float(temperature), alpha=float(alpha), tree_balance=m.tree_balance, attention_p=m.attention_p,
        attention_pairs=parse_pairs(m.attention_pairs, "method.attention_pairs"),
        hint_pairs=parse_pairs(m.hint_pairs, "method.hint_pairs"),
        augment_shift=m.get("augment_shift", 0), augment_flip=m.get("augment_flip", False), mixup=m.get("mixup", 0.0),
        perturb=perturbation_kinds(m.get("perturb", "")), perturb_fraction=float(m.get("perturb_fraction", 0.5)),
        **adversarial_settings(group),
    )


def perturbation_kinds(text: str) -> tuple[str, ...]:
    """`method.perturb`'s comma-separated kinds ("" = none; "all" = every kind of `data.PERTURBATIONS`)."""
    if str(text).strip() == "all":
        return tuple(PERTURBATIONS)
    return tuple(k.strip() for k in str(text).split(",") if k.strip())


def adversarial_settings(group) -> dict:
    """The `adversarial*` keys of a budget group that has them, as `distill.MethodConfig` fields."""
    if group is None:
        return {}
    return {key: group[key] for key in ADVERSARIAL_KEYS if key in group}


def build_model(kind: str, c, num_classes: int, pca_state, *, ensemble: int = 1) -> tuple[nn.Module, dict]:
    """A model of `kind` computing in `c.dtype`, and its non-trainable collections (the PCA for `linear`);
    with `ensemble` > 1, `ensemble` such networks as one `models.Ensemble` (the teacher's `teacher.ensemble`)."""
    options = {
        "seed_cnn": {}, "cnn": {}, "mlp": {"hidden": tuple(c.mlp.hidden)},
        "tree": {"depth": c.tree.depth},
        "linear": {"n_components": int(pca_state.components.shape[0])},
    }[kind]
    model = build(kind, num_classes, **options)
    if ensemble > 1:
        model = Ensemble(model, members=ensemble, impl=getattr(model, "impl", None))
    model = with_compute_dtype(model, c.get("dtype", "float32"))
    extra = {"pca": set_pca({}, pca_state)["pca"]} if kind == "linear" else {}
    return model, extra


def pruning_of(budget, total_steps: int):
    """The gradual magnitude pruning transformation a budget asks for (`prune_sparsity` > 0), or None."""
    target = budget.get("prune_sparsity", 0.0)
    if not target:
        return None
    return magnitude_pruning(final_sparsity=target, begin_step=int(budget.prune_begin * total_steps),
                                   end_step=int(budget.prune_end * total_steps),
                                   frequency=max(1, total_steps // 100))




def dp_sgd_of(budget) -> DPSGD | None:
    """The DP-SGD settings of a budget group (`dp_noise_multiplier` > 0), or None. With Poisson sampling
    (`dp_sampling`, the default) the noisy sum is divided by the expected batch size."""
    if not budget.get("dp_noise_multiplier", 0.0):
        return None
    poisson = budget.get("dp_sampling", "poisson") == "poisson"
    return DPSGD(l2_clip=float(budget.dp_l2_clip), noise_multiplier=float(budget.dp_noise_multiplier),
                 expected_batch_size=int(budget.batch_size) if poisson else None)


def dp_batch_cap(dp: DPSGD | None, budget, steps: int, n: int) -> int | None:
    """The fixed size Poisson batches are padded to (`train.poisson_batch_cap`, a multiple of the local
    devices); None without DP-SGD or with shuffled batches."""
    if dp is None or dp.expected_batch_size is None:
        return None
    return poisson_batch_cap(n, parallel.local_batch_size(budget.batch_size), steps, multiple_of=jax.local_device_count())


def privacy_of(dp: DPSGD, budget, steps: int, n: int, batch_cap: int | None) -> dict:
    """What a DP-SGD model reports: (epsilon, delta) of the `steps` steps that ran, for the sampling that ran.

    Poisson (`batch_cap` given): epsilon from `distill.privacy.dp_sgd_epsilon` at q = batch / n, the bound
    p on the probability that any step sampled more than `batch_cap` examples (extra ones dropped), and
    `delta_with_truncation` = delta + (1 + e^epsilon) p, the delta that also covers the truncation (the
    truncated run differs from the analysed one only on that event). Shuffled batches: the per-epoch bound
    without amplification (`dp_sgd_epsilon(sampling="shuffle")`)."""
    from distill_jax.distill.privacy import dp_sgd_epsilon  # noqa: PLC0415 - dp-accounting loads only for private training

    sampling = "shuffle" if batch_cap is None else "poisson"
    local_bs = parallel.local_batch_size(budget.batch_size)
    delta = float(budget.dp_delta)
    epsilon = float(dp_sgd_epsilon(steps, batch_size=local_bs, n=n, noise_multiplier=dp.noise_multiplier,
                                   delta=delta, sampling=sampling))
    report = {"mechanism": "DP-SGD", "epsilon": round(epsilon, 4), "delta": delta, "sampling": sampling,
              "sampling_rate": local_bs / n, "steps": steps, "noise_multiplier": dp.noise_multiplier,
              "l2_clip": dp.l2_clip}
    if sampling == "poisson":
        overflow = poisson_overflow_probability(n, local_bs, steps, batch_cap)
        report.update(batch_cap=batch_cap, truncation_probability=overflow,
                      delta_with_truncation=delta + (1.0 + math.exp(epsilon)) * overflow,
                      neighbours="add or remove one example")
    else:
        report.update(neighbours="zero out one example; no amplification by shuffling claimed",
                      epochs=math.ceil(steps / (n // local_bs)))
    return report


def teacher_method_config(c) -> MethodConfig:
    """The teacher's training settings: its adversarial keys, augmentation (`teacher.augment_shift/flip`) and
    training temperature, no mixup and no teacher-labelled perturbations."""
    return dataclasses.replace(method_config(c, group=c.teacher), mixup=0.0, perturb=(),
                               augment_shift=c.teacher.augment_shift, augment_flip=c.teacher.augment_flip,
                               label_temperature=float(c.teacher.get("train_temperature", 1.0)))


def student_budget(kind: str, c):
    """`c.student`, with any of its keys overridden by the kind's own group (e.g. `c.tree.learning_rate`,
    or `c.mlp.adversarial` in a config file)."""
    budget = ml_collections.ConfigDict(c.student.to_dict())
    for key, value in c.get(kind, {}).items():
        if key in budget:
            budget[key] = value
    return budget


