"""Accuracy, fidelity, faithfulness of attributions, sanity checks and adversarial robustness.

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring);
`mean_kl(student_logits, teacher_logits)` is KL(teacher || student).

Everything is batched: the deletion/insertion curves run `lax.map` over the steps with the whole
batch in each call, and the robustness checks run `lax.map` over noise samples.
Targets follow `explain.py`: [batch] ints in [0, num_classes), checked when concrete, or [batch, K]
ints with one attribution per target ([batch, K, ...]); the scores then gain a K axis after the batch
axis and column k equals the call with (attribution[:, k], target[:, k])
(`attribution_core.per_target_scored`). Inside `jax.jit` an out-of-range target gives NaN.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attacks import ATTACKS, fgsm, pgd  # noqa: F401 - re-exported: `metrics.pgd` is public
from distill_jax import compilation
from distill_jax.attribution_core import check_x, gaussian_blur, num_classes_of, per_target_scored, validate_target
from distill_jax.explain import ig_completeness_error
from distill_jax.param_randomization import as_dicts, check_layer_order, default_randomize, randomize_layer
from distill_jax.stats import flat_pair, spearman
from distill_jax.explanation_quality import (  # re-exported
    avg_sensitivity, complexity, efficient_mprt, local_lipschitz, max_sensitivity, random_logit, smooth_mprt,
    sparseness,
)
from distill_jax.faithfulness import (  # re-exported: `metrics.<name>` is the public API
    faithfulness_correlation, infidelity, monotonicity, region_perturbation, road, sensitivity_n,
)

__all__ = [
    "ATTACKS",
    "accuracy",
    "adversarial_accuracy",
    "agreement",
    "avg_sensitivity",
    "complexity",
    "deletion_auc",
    "efficient_mprt",
    "faithfulness_correlation",
    "fgsm",
    "ig_completeness_error",
    "infidelity",
    "insertion_auc",
    "local_lipschitz",
    "max_sensitivity",
    "mean_kl",
    "monotonicity",
    "pgd",
    "random_logit",
    "randomization_check",
    "region_perturbation",
    "road",
    "sensitivity_n",
    "smooth_mprt",
    "sparseness",
    "spearman",
    "top_k_overlap",
]


# --------------------------------------------------------------------------------------------
# Accuracy and fidelity
# --------------------------------------------------------------------------------------------
def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Top-1 accuracy: mean_b [argmax logits_b = y_b] (over examples with mask_b = 1 when given).

    Args:
      logits: [batch, classes]; labels: [batch] ints; mask: optional [batch] bool/0-1 weights.
    Returns:
      scalar.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [batch, classes] and labels [batch]; got {logits.shape} and {labels.shape}")
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    if mask is None:
        return correct.mean()
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != labels.shape:
        raise ValueError(f"mask must be [batch] = {labels.shape}; got {mask.shape}")
    return jnp.sum(correct * mask) / jnp.maximum(mask.sum(), 1.0)


def _check_logit_pair(student_logits, teacher_logits) -> None:
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(f"student_logits and teacher_logits must match; got {jnp.shape(student_logits)} and "
                         f"{jnp.shape(teacher_logits)}")


def agreement(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Top-1 fidelity: mean_b [argmax s_b = argmax t_b]. Returns a scalar (host or device arrays in,
    one compiled program per shape)."""
    _check_logit_pair(student_logits, teacher_logits)
    return _agreement(student_logits, teacher_logits)


@compilation.run_once
def _agreement(student_logits, teacher_logits):
    return jnp.mean((jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32))


def mean_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Mean KL(softmax(t/T) || softmax(s/T)) over the batch: how much the student loses of the teacher's
    distribution (student first, as every two-model function). Returns a scalar (one compiled program
    per shape; `temperature` is an operand, so a new value does not recompile).

    Reference: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".
    """
    _check_logit_pair(student_logits, teacher_logits)
    return _mean_kl(student_logits, teacher_logits, temperature)


@compilation.run_once
def _mean_kl(student_logits, teacher_logits, temperature):
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


# --------------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------------
def _baseline_image(x: jax.Array, baseline: Any, blur_sigma: float) -> jax.Array:
    if isinstance(baseline, str):
        table = {"zeros": lambda: jnp.zeros_like(x), "blur": lambda: gaussian_blur(x, sigma=blur_sigma)}
        if baseline not in table:
            raise ValueError(f"baseline must be a float or one of {sorted(table)}; got {baseline!r}")
        return table[baseline]()
    if isinstance(baseline, (int, float)):
        return jnp.full_like(x, baseline)
    b = jnp.asarray(baseline, x.dtype)
    if b.shape != x.shape:
        raise ValueError(f"baseline array must have the shape of x {x.shape}; got {b.shape}")
    return b


def _pixel_ranks(attribution: jax.Array, x: jax.Array) -> jax.Array:
    """Rank 0 = most important pixel; attribution summed over channels. Returns [batch, H*W]."""
    if attribution.shape == x.shape and x.ndim == 4:
        score = attribution.sum(-1)
    elif attribution.shape == x.shape[:3] and x.ndim == 4:
        score = attribution
    elif attribution.shape == x.shape:
        score = attribution
    else:
        raise ValueError(f"attribution must have the shape of x {x.shape} or (NHWC) of x without channels {x.shape[:3]}; got {attribution.shape}")
    flat = score.reshape(score.shape[0], -1)
    order = jnp.argsort(-flat, axis=1)
    return jnp.argsort(order, axis=1)


def _perturbation_curve(apply_fn, x, attribution, target, steps, baseline, blur_sigma, insert, chunk):
    """(auc, curve) of deletion (insert=False) or insertion, for [batch] or [batch, K] targets."""
    x = check_x(x)
    c = num_classes_of(apply_fn, x)
    target = validate_target(target, x.shape[0], c)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    base = _baseline_image(x, baseline, blur_sigma)
    spatial = x.shape[1:3] if x.ndim == 4 else x.shape[1:]
    counts = jnp.asarray(np.round(np.linspace(0, int(np.prod(spatial)), steps + 1)).astype(np.int32))

    def score_one(v, a, t):
        ranks = _pixel_ranks(a, v)

        def prob_at(k):
            changed = (ranks < k).reshape((v.shape[0],) + tuple(spatial))
            if v.ndim == 4:
                changed = changed[..., None]
            img = jnp.where(changed, v, base) if insert else jnp.where(changed, base, v)
            p = jax.nn.softmax(apply_fn(img), axis=-1)
            return jnp.take_along_axis(p, jnp.clip(t, 0, c - 1)[:, None], axis=1)[:, 0]

        curve = jax.lax.map(prob_at, counts, batch_size=chunk).T  # [batch, steps + 1]
        return jnp.sum((curve[:, 1:] + curve[:, :-1]) / 2, axis=1) / steps, curve

    return per_target_scored(score_one, x, attribution, target, c)


def deletion_auc(
    apply_fn: Callable,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    steps: int = 16,
    baseline: Any = "zeros",
    blur_sigma: float = 5.0,
    chunk: int | None = None,
    return_curve: bool = False,
):
    """Deletion metric: area under p_target while the most important pixels are removed first.

    Pixels are ranked by attribution (summed over channels); at step s = 0..steps the top
    round(s * H*W / steps) pixels are replaced by the baseline (all channels). AUC by the
    trapezoid rule on [0, 1]. Lower = more faithful attribution.

    Args:
      apply_fn: x -> logits. x: [batch, H, W, C]. attribution: like x or [batch, H, W]; for [batch, K]
        targets one map per target, [batch, K, H, W, C] or [batch, K, H, W].
      target: [batch] or [batch, K]. steps: >= 1. baseline: "zeros", "blur" (Gaussian, `blur_sigma`), a
        float, or an array like x.
      chunk: steps evaluated together by `lax.map` (None: one at a time).
    Returns:
      [batch] AUC; with return_curve, (auc, curve [batch, steps + 1]). For [batch, K] targets [batch, K]
      and [batch, K, steps + 1], column k equal to the call with (attribution[:, k], target[:, k]).
    Reference: Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box Models".
    """
    auc, curve = _perturbation_curve(apply_fn, x, attribution, target, steps, baseline, blur_sigma, False, chunk)
    return (auc, curve) if return_curve else auc


def insertion_auc(
    apply_fn: Callable,
    x: jax.Array,
    attribution: jax.Array,
    target: jax.Array,
    *,
    steps: int = 16,
    baseline: Any = "blur",
    blur_sigma: float = 5.0,
    chunk: int | None = None,
    return_curve: bool = False,
):
    """Insertion metric: area under p_target while the most important pixels are inserted first.

    Starts from the baseline image (default blurred, as Petsiuk et al.) and copies the top
    round(s * H*W / steps) pixels of x, s = 0..steps. Higher = more faithful. Args/Returns as `deletion_auc`.
    Reference: Petsiuk, Das & Saenko 2018.
    """
    auc, curve = _perturbation_curve(apply_fn, x, attribution, target, steps, baseline, blur_sigma, True, chunk)
    return (auc, curve) if return_curve else auc


# --------------------------------------------------------------------------------------------
# Agreement between maps
# --------------------------------------------------------------------------------------------
def top_k_overlap(a: jax.Array, b: jax.Array, *, k: int) -> jax.Array:
    """Fraction of the k largest entries of a that are also among the k largest of b.

    overlap_b = |top_k(a_b) ∩ top_k(b_b)| / k  (pass |maps| to rank by magnitude).

    Args:
      a, b: [batch, ...] of the same shape; k: 1 <= k <= entries per example (static: one compiled
        program per shape and k).
    Returns:
      [batch] in [0, 1].
    """
    if not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int in [1, {int(np.prod(jnp.shape(a)[1:]))}]; got {k!r}")
    return _top_k_overlap(a, b, k=int(k))


@compilation.run_once(static_argnames="k")
def _top_k_overlap(a, b, *, k: int):
    a, b = flat_pair(a, b, "top_k_overlap")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k must be an int in [1, {a.shape[1]}]; got {k!r}")

    def mask(v):
        _, idx = jax.lax.top_k(v, k)
        return jnp.zeros(v.shape, jnp.float32).at[idx].set(1.0)

    ma, mb = jax.vmap(mask)(a), jax.vmap(mask)(b)
    return jnp.sum(ma * mb, axis=1) / k


# --------------------------------------------------------------------------------------------
# Model-parameter randomisation (sanity check)
# --------------------------------------------------------------------------------------------
def randomization_check(
    attr_fn: Callable,
    params: Any,
    layer_order: Sequence[str],
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    randomize: Callable[[jax.Array, jax.Array], jax.Array] = default_randomize,
    jit: bool = True,
) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation: rank correlation of maps as layers are randomised top-down.

    After randomising layer_order[0..i] (cumulatively), rho_i = mean_b spearman(|M_rand(x_b)|, |M_trained(x_b)|).
    A map that depends on the learned weights should lose correlation as more layers are randomised.

    Args:
      attr_fn: attr_fn(params, x, target) -> maps [batch, ...]; it is jitted once (params are an argument)
        unless `jit=False` (an attr_fn that runs compiled programs of its own, as the audit's).
      params: a (nested) dict of parameters. layer_order: names of subtrees, top (output) layer first;
        nested names use "/" (e.g. "params/conv4").
      x, target: inputs and their targets. key: PRNG key for the new weights.
      randomize: (key, leaf) -> new leaf (default: normal with the leaf's standard deviation).
    Returns:
      [(layer, mean Spearman rho as a float)] in layer_order.
    Reference: Adebayo et al. 2018, "Sanity Checks for Saliency Maps".
    """
    layer_order = check_layer_order(params, layer_order)
    fn = jax.jit(attr_fn) if jit else attr_fn
    current = as_dicts(params)
    trained = jnp.abs(fn(current, x, target))
    results = []
    for name, k in zip(layer_order, jax.random.split(key, len(layer_order))):
        current = randomize_layer(current, k, name=name, randomize=randomize)
        rho = spearman(jnp.abs(fn(current, x, target)), trained)
        results.append((name, float(jnp.mean(rho))))
    return results


# --------------------------------------------------------------------------------------------
# Adversarial robustness and explanation sensitivity
# --------------------------------------------------------------------------------------------


def adversarial_accuracy(apply_fn: Callable, x: jax.Array, labels: jax.Array, *, attack: str = "fgsm", **attack_kw) -> jax.Array:
    """Accuracy on adversarial examples made by `ATTACKS[attack](apply_fn, x, labels, **attack_kw)`. Returns a scalar."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {sorted(ATTACKS)}; got {attack!r}")
    x_adv = ATTACKS[attack](apply_fn, x, labels, **attack_kw)
    return accuracy(apply_fn(x_adv), jnp.asarray(labels))
