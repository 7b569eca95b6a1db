"""Training views: the view of a batch that student and teacher both see (augmentation, mixup,
an adversarial example), and checks of what each student kind supports.
"""
from __future__ import annotations

from typing import Callable

import jax

from distill_jax.data._augment import augment, mixup, perturb_some
from distill_jax.distill._method import ADVERSARIAL_METHODS, MethodConfig, Pair, parse_method
from distill_jax.distill._terms import TERMS
from distill_jax.models._adapters import NETWORK
from distill_jax.robust._attacks import pgd


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


def pgd_view(apply_fn: Callable[[jax.Array], jax.Array], x: jax.Array, labels: jax.Array, *, key: jax.Array,
             cfg: MethodConfig) -> jax.Array:
    """PGD adversarial examples against `apply_fn`, under stop_gradient: `robust.pgd` with the config's budget.

    Formula: x_0 = x + U(-eps, eps);  x_{k+1} = Proj_{||v - x||_inf <= eps}(x_k + a * sign(grad_x CE(f(x_k), y))),
    `adversarial_steps` times, eps = `adversarial_epsilon`, a = `pgd_step_size`, both in standardized
    input units; no clipping to the pixel range (as `robust.adversarial_accuracy` evaluates).

    Args:
      apply_fn: x -> logits [B, C] of the model being trained (its parameters under stop_gradient).
      x: [B, ...] model inputs; labels: [B] ints; key: the random start.
    Returns:
      [B, ...] like x, with no gradient to anything.
    Reference: Madry, Makelov, Schmidt, Tsipras & Vladu (2018), "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR, section 3 and appendix (the min-max training).
    """
    x_adv = pgd(apply_fn, x, labels, epsilon=cfg.adversarial_epsilon, step_size=cfg.pgd_step_size,
                        steps=int(cfg.adversarial_steps), key=key)
    return jax.lax.stop_gradient(x_adv)


# name -> (apply_fn, x, labels, *, key, cfg) -> adversarial view of x; "none" leaves the batch alone
ADVERSARIAL: dict[str, Callable | None] = {"none": None, "pgd": pgd_view}
assert tuple(ADVERSARIAL) == ADVERSARIAL_METHODS


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
    """The view of a batch that student and teacher both see: `data.augment`, then `data.perturb_some`, then
    `data.mixup`, then `adversarial_view` against `apply_fn` (the model being trained) with `labels`, each when on.

    Keys: the augmentation reads `key`, mixup `fold_in(key, 1)`, the attack's random start `fold_in(key, 2)`, the
    perturbations `fold_in(key, 3)`.
    """
    if cfg.augment_shift or cfg.augment_flip:
        x = augment(key, x, max_shift=cfg.augment_shift, flip=cfg.augment_flip)
    if cfg.perturb:
        x = perturb_some(jax.random.fold_in(key, 3), x, tuple(cfg.perturb), cfg.perturb_fraction)
    if cfg.mixup:
        x, _ = mixup(jax.random.fold_in(key, 1), x, alpha=cfg.mixup)
    if cfg.adversarial_on:
        if apply_fn is None or labels is None:
            raise ValueError(f"adversarial={cfg.adversarial!r} needs the model (apply_fn) and the labels to attack")
        x = adversarial_view(apply_fn, x, labels, key=jax.random.fold_in(key, 2), cfg=cfg)
    return x
