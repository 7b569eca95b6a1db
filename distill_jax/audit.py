"""The evaluation half of the job: explain trained models, score the explanations, analyse the readable students.

Everything here takes trained models (a linen module plus its variables) and test images and
returns plain arrays and floats; `report` draws them. Each computation is jitted once per
model *class* with the variables as an argument, so three SmallCNN students share one
compilation (and a new checkpoint of the same model reuses it).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import analysis, backend, explain, metrics, models

ATTRIBUTION_METHODS = ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad", "grad_cam", "occlusion")


def _apply(model: nn.Module, variables):
    return lambda z: model.apply(variables, z)


@functools.lru_cache(maxsize=None)  # linen modules hash and compare by their fields
def _per_model(kernel: Callable, model: nn.Module, *static):
    """`kernel(model, *static, variables, ...)` jitted once per model class and static options.

    Conv models run as `models.for_attribution(model)`: the kernels here loop over the network.
    """
    return jax.jit(functools.partial(kernel, models.for_attribution(model), *static))


def spatial_layer(model: nn.Module, variables, sample_x: jax.Array) -> str | None:
    """The deepest 4-D feature map whose grid is at least 4x4 (or the largest one), for Grad-CAM; None if none."""
    _, feats = jax.eval_shape(lambda v: model.apply(v, sample_x, return_features=True), variables)
    maps = [(name, f.shape) for name, f in feats.items() if len(f.shape) == 4]
    if not maps:
        return None
    big = [name for name, s in maps if min(s[1:3]) >= 4]
    return big[-1] if big else max(maps, key=lambda m: m[1][1] * m[1][2])[0]


def _attribution_fn(method: str, model: nn.Module, layer: str | None, *, ig_steps: int, smoothgrad_samples: int,
                    occlusion_patch: int) -> Callable | None:
    """(variables, x, target, key) -> maps like x, or None when `method` does not apply to `model`."""

    def wrap(fn):
        return lambda v, x, t, k: fn(_apply(model, v), x, t, k)

    registry = {
        "saliency": wrap(lambda f, x, t, k: explain.saliency(f, x, t)),
        "grad_x_input": wrap(lambda f, x, t, k: explain.grad_x_input(f, x, t)),
        "integrated_gradients": wrap(lambda f, x, t, k: explain.integrated_gradients(f, x, t, steps=ig_steps)),
        "smoothgrad": wrap(lambda f, x, t, k: explain.smoothgrad(explain.saliency, f, x, t, key=k,
                                                                 samples=smoothgrad_samples)),
        "occlusion": wrap(lambda f, x, t, k: explain.occlusion(f, x, t, patch=occlusion_patch,
                                                               stride=max(1, occlusion_patch // 2))),
    }
    if method == "grad_cam":
        if layer is None:
            return None
        fwd = lambda v: models.forward_with_features(model, v)
        return lambda v, x, t, k: explain.grad_cam(fwd(v), x, t, layer=layer)[..., None] * jnp.ones_like(x)
    return registry[method]


@functools.lru_cache(maxsize=None)  # linen modules hash and compare by their fields
def _compiled(method: str, model: nn.Module, layer, ig_steps, smoothgrad_samples, occlusion_patch):
    fn = _attribution_fn(method, models.for_attribution(model), layer, ig_steps=ig_steps,
                         smoothgrad_samples=smoothgrad_samples, occlusion_patch=occlusion_patch)
    return None if fn is None else jax.jit(fn)


def attribution_maps(model: nn.Module, variables, x: jax.Array, target: jax.Array, *, methods: Sequence[str],
                     ig_steps: int, smoothgrad_samples: int, key: jax.Array) -> dict[str, np.ndarray]:
    """Maps of every applicable method: name -> [batch, h, w, c] (Grad-CAM broadcast over channels)."""
    layer = spatial_layer(model, variables, x[:1])
    patch = max(1, min(x.shape[1:3]) // 4)
    out = {}
    for method in methods:
        if method not in ATTRIBUTION_METHODS:
            raise ValueError(f"explain.methods: {method!r} is not known; use any of {list(ATTRIBUTION_METHODS)}")
        fn = _compiled(method, model, layer, ig_steps, smoothgrad_samples, patch)
        if fn is not None:
            out[method] = np.asarray(fn(variables, x, target, key))
    return out


# --------------------------------------------------------------------------- scores of explanations


def _faithfulness(model, steps, variables, x, maps, target):
    f = _apply(model, variables)
    d_auc, d_curve = metrics.deletion_auc(f, x, maps, target, steps=steps, return_curve=True)
    i_auc, i_curve = metrics.insertion_auc(f, x, maps, target, steps=steps, return_curve=True)
    return d_auc, i_auc, d_curve, i_curve


def faithfulness(model: nn.Module, variables, x, target, maps: dict[str, np.ndarray], teacher_maps, *,
                 steps: int = 16) -> tuple[dict, dict]:
    """Deletion/insertion AUC of every map, and its rank agreement with the teacher's map of the same method.

    Returns (scores: method -> {deletion_auc, insertion_auc, spearman_vs_teacher, top10_overlap_vs_teacher},
    curves: method -> {"deletion": [steps+1], "insertion": [steps+1]} averaged over images).
    """
    fn = _per_model(_faithfulness, model, steps)
    scores, curves = {}, {}
    for method, m in maps.items():
        d_auc, i_auc, d_curve, i_curve = fn(variables, x, jnp.asarray(m), target)
        s = {"deletion_auc": float(jnp.mean(d_auc)), "insertion_auc": float(jnp.mean(i_auc))}
        if teacher_maps is not None and method in teacher_maps:
            a, b = jnp.abs(jnp.asarray(m)).sum(-1), jnp.abs(jnp.asarray(teacher_maps[method])).sum(-1)
            s["spearman_vs_teacher"] = float(jnp.mean(metrics.spearman(a, b)))
            k = max(1, a[0].size // 10)
            s["top10_overlap_vs_teacher"] = float(jnp.mean(metrics.top_k_overlap(a, b, k=k)))
        scores[method] = s
        curves[method] = {"deletion": np.asarray(d_curve).mean(0), "insertion": np.asarray(i_curve).mean(0)}
    return scores, curves


# Each metric's direction: +1 when larger is better, -1 when smaller is better (for `rank_methods`).
QUALITY_DIRECTIONS = {"deletion_auc": -1, "insertion_auc": +1, "faithfulness_correlation": +1,
                      "infidelity": -1, "sparseness": +1, "complexity": -1}


def _quality(model, samples, variables, x, attribution, target, key):
    f = _apply(model, variables)
    features = int(np.prod(x.shape[1:]))
    keys = jax.random.split(key, 2)
    return {
        "faithfulness_correlation": metrics.faithfulness_correlation(
            f, x, attribution, target, key=keys[0], subset_size=max(1, features // 10), samples=samples),
        "infidelity": metrics.infidelity(f, x, attribution, target, key=keys[1], samples=samples, normalize=True),
        "sparseness": metrics.sparseness(attribution),
        "complexity": metrics.complexity(attribution),
    }


def explanation_quality(model: nn.Module, variables, x, target, maps: dict[str, np.ndarray], *, key,
                        samples: int = 32) -> dict[str, dict[str, float]]:
    """Faithfulness correlation, infidelity (optimally scaled), sparseness and complexity of every map.

    Faithfulness correlation removes random tenths of the input (to zero, the standardized mean);
    infidelity uses unit-variance-scaled Gaussian noise of 0.1 with Captum's optimal scaling, so
    maps on different scales compare. Means over the images.

    Returns:
      method -> {faithfulness_correlation, infidelity, sparseness, complexity}.
    """
    fn = _per_model(_quality, model, samples)
    out = {}
    for method, m in maps.items():
        scores = fn(variables, x, jnp.asarray(m), target, key)
        out[method] = {k: float(jnp.mean(v)) for k, v in scores.items()}
    return out


def rank_methods(scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Ranks one model's attribution methods on each metric of `QUALITY_DIRECTIONS` (1 = best) and on average.

    Args:
      scores: method -> {metric: value} (metrics missing for a method are left out of its average).
    Returns:
      method -> {"ranks": {metric: rank}, "mean_rank": float}, ties sharing the better rank.
    """
    ranks = {m: {} for m in scores}
    for metric, direction in QUALITY_DIRECTIONS.items():
        have = [(m, s[metric]) for m, s in scores.items() if s.get(metric) is not None and np.isfinite(s[metric])]
        for method, value in have:
            ranks[method][metric] = 1 + sum(direction * (other - value) > 0 for _, other in have)
    return {m: {"ranks": r, "mean_rank": float(np.mean(list(r.values()))) if r else float("nan")}
            for m, r in ranks.items()}


def _ig_completeness(model, variables, x, target, ig_map):
    return explain.ig_completeness_error(_apply(model, variables), x, ig_map, target)


def ig_completeness(model: nn.Module, variables, x, target, ig_map) -> float:
    """Mean |sum IG - (f(x) - f(0))| / |f(x) - f(0)| over the images."""
    return float(jnp.mean(_per_model(_ig_completeness, model)(variables, x, target, jnp.asarray(ig_map))))


def _max_sensitivity(model, radius, variables, x, target, key):
    f = _apply(model, variables)
    return metrics.max_sensitivity(lambda z, t: explain.saliency(f, z, t), x, target, key=key, radius=radius, samples=8)


def saliency_max_sensitivity(model: nn.Module, variables, x, target, *, radius: float, key) -> float:
    """Mean max-sensitivity of the saliency map under uniform noise of `radius` (Yeh et al. 2019)."""
    return float(jnp.mean(_per_model(_max_sensitivity, model, radius)(variables, x, target, key)))


def _randomization_attr(model, method, params, extra, x, target):
    fn = {"saliency": explain.saliency, "grad_x_input": explain.grad_x_input}[method]
    return fn(lambda u: model.apply({"params": params, **extra}, u), x, target)


def randomization(model: nn.Module, variables, x, target, *, key) -> dict[str, list]:
    """Cascading top-down randomisation check of saliency and grad x input (Adebayo et al. 2018).

    Returns method -> [(layer, mean Spearman rho), ...] from the output layer down.
    """
    params = variables["params"]
    order = list(reversed(models.layer_order(model, variables, x[:1])))  # top-down: the output layer first
    extra = {k: v for k, v in variables.items() if k != "params"}
    out = {}
    for method in ("saliency", "grad_x_input"):
        fn = _per_model(_randomization_attr, model, method)
        out[method] = metrics.randomization_check(lambda p, z, t, fn=fn: fn(p, extra, z, t), params, order, x, target,
                                                  key=key)
    return out


# --------------------------------------------------------------------------- robustness


def _robustness(model, epsilon, pgd_steps, variables, x, labels, key):
    f = _apply(model, variables)
    fgsm = metrics.adversarial_accuracy(f, x, labels, attack="fgsm", epsilon=epsilon)
    pgd = metrics.adversarial_accuracy(f, x, labels, attack="pgd", epsilon=epsilon, step_size=2.5 * epsilon / pgd_steps,
                                       steps=pgd_steps, key=key)
    return fgsm, pgd


def robustness(model: nn.Module, variables, x, labels, *, epsilon: float, pgd_steps: int, key) -> dict[str, float]:
    """Accuracy under FGSM and PGD (L-inf, budget `epsilon` in standardized input units)."""
    fgsm, pgd = _per_model(_robustness, model, epsilon, pgd_steps)(variables, x, labels, key)
    return {"fgsm_accuracy": float(fgsm), "pgd_accuracy": float(pgd)}


# --------------------------------------------------------------------------- readable students


def _features(model, variables, x):
    return model.apply(variables, x, return_features=True)


def features_of(model: nn.Module, variables, x) -> dict[str, np.ndarray]:
    """Every per-example feature the model names ([batch, ...] arrays only)."""
    _, feats = _per_model(_features, model)(variables, x)
    return {k: np.asarray(v) for k, v in feats.items() if v.shape[0] == x.shape[0]}


def cka(teacher_feats: dict, student_feats: dict) -> dict:
    """Linear CKA between every teacher layer and every student layer: {teacher_layers, student_layers, matrix}."""
    names_t, names_s, matrix = analysis.cka_matrix({k: jnp.asarray(v) for k, v in teacher_feats.items()},
                                                   {k: jnp.asarray(v) for k, v in student_feats.items()})
    return {"teacher_layers": list(names_t), "student_layers": list(names_s), "matrix": np.asarray(matrix).tolist()}


def linear_student(variables, x, image_shape) -> dict:
    """Class templates in pixel space and the exact per-component contributions for the images `x`."""
    w = variables["params"]["linear"]["kernel"]
    b = variables["params"]["linear"]["bias"]
    comps, mean = variables["pca"]["components"], variables["pca"]["mean"]
    flat = jnp.asarray(x).reshape(len(x), -1)
    z = jnp.matmul(flat - mean, comps.T, precision=backend.HIGHEST)
    contrib = analysis.linear_contributions(w, b, z, comps, x=flat, mean=mean)
    return {
        "templates": np.asarray(analysis.class_templates(w, comps)).reshape(-1, *image_shape),
        "component_contributions": np.asarray(contrib["components"]),  # [B, C, k]
        "logits": np.asarray(contrib["logits"]),
        "bias": np.asarray(b),
    }


def tree_student(model: nn.Module, variables, x, labels, num_classes: int, image_shape) -> dict:
    """Node filters as images, leaf class distributions, and per-class leaf usage on `x`."""
    _, f = _per_model(_features, model)(variables, x)
    leaf, _ = models.tree_hard_predict(f["routing"], f["leaf_logits"], model.depth)
    usage = analysis.tree_usage(f["path_probs"], jnp.asarray(labels), num_classes, hard_leaf=leaf)
    return {
        "filters": np.asarray(analysis.node_filters(variables["params"]["nodes"]["kernel"], tuple(image_shape))),
        "leaf_probs": np.asarray(jax.nn.softmax(f["leaf_logits"], -1)),
        "usage": {k: np.asarray(v) for k, v in usage.items()},
        "depth": model.depth,
    }
