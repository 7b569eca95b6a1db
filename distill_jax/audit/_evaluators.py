"""The evaluation half of the job: explain trained models, score the explanations, analyse the readable students.

Everything here takes trained models (a linen module plus its variables) and test images and
returns plain arrays and floats; `report` draws them. The gradient and perturbation methods, their
scores and the attacks ask the model for logits or input gradients at many points through
`queries.ModelQueries`: two compiled programs per architecture serve all of them (and every student
of that architecture), the arithmetic around them being `batched_explain`'s numpy. Grad-CAM and the
feature read-outs are one program per architecture each. Variables placed on a mesh (as the pipeline
does) make every query split its points over that mesh's devices.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import backend, compilation
from distill_jax.analysis import (
    _class_templates,
    _linear_contributions,
    _node_filters,
    _tree_usage,
    cka_matrix,
)
from distill_jax.attr._layer import grad_cam
from distill_jax.audit._batched import (
    adversarial_accuracy,
    deletion_insertion,
    faithfulness_correlation,
    grad_x_input,
    ig_completeness_error,
    infidelity,
    integrated_gradients,
    max_sensitivity,
    occlusion,
    saliency,
    smoothgrad,
)
from distill_jax.audit._queries import ModelQueries
from distill_jax.compilation import split_keys
from distill_jax.data._augment import PERTURBATIONS, perturb
from distill_jax.metrics._complexity import complexity, sparseness
from distill_jax.metrics._randomisation import randomization_check
from distill_jax.metrics._similarity import spearman, top_k_overlap
from distill_jax.metrics._specs import METRICS, metric_names
from distill_jax.models._ensemble import MEMBER_LOGITS
from distill_jax.models._layers import for_attribution
from distill_jax.models._students import tree_hard_predict
from distill_jax.models._util import forward_with_features, layer_order

ATTRIBUTION_METHODS = ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad", "grad_cam", "occlusion")


@functools.lru_cache(maxsize=None)  # linen modules hash and compare by their fields
def _per_model(kernel: Callable, model: nn.Module, *static):
    """`kernel(model, *static, variables, ...)` jitted once per model class and static options.

    Conv models run as `models.for_attribution(model)`. Each runs once or twice per model, so it is
    compiled as `compilation.run_once`.
    """
    return compilation.run_once(functools.partial(kernel, for_attribution(model), *static))


def _mesh_of(variables):
    """The mesh the variables are placed on (None when they are not on a `NamedSharding`)."""
    sharding = getattr(jax.tree_util.tree_leaves(variables)[0], "sharding", None)
    return getattr(sharding, "mesh", None) if isinstance(sharding, jax.sharding.NamedSharding) else None


def queries_of(model: nn.Module, variables) -> ModelQueries:
    """`model` with `variables` as a `ModelQueries`, splitting its points over the variables' mesh if any."""
    return ModelQueries(model, variables, _mesh_of(variables))


def _host(*arrays):
    return tuple(np.asarray(a) for a in arrays)


def spatial_layer(model: nn.Module, variables, sample_x: jax.Array) -> str | None:
    """The deepest 4-D feature map whose grid is at least 4x4 (or the largest one), for Grad-CAM; None if none."""
    _, feats = jax.eval_shape(lambda v, z: model.apply(v, z, return_features=True), variables, sample_x)
    maps = [(name, f.shape) for name, f in feats.items() if len(f.shape) == 4]
    if not maps:
        return None
    big = [name for name, s in maps if min(s[1:3]) >= 4]
    return big[-1] if big else max(maps, key=lambda m: m[1][1] * m[1][2])[0]


def _grad_cam(model, layer, variables, x, target):
    maps = grad_cam(forward_with_features(model, variables), x, target, layer=layer)
    return maps[..., None] * jnp.ones_like(x)


def _occlusion_patch(x) -> int:
    return max(1, min(x.shape[1:3]) // 4)


def attribution_maps(model: nn.Module, variables, x: jax.Array, target: jax.Array, *, methods: Sequence[str],
                     ig_steps: int, smoothgrad_samples: int, key: jax.Array) -> dict[str, np.ndarray]:
    """Maps of every applicable method: name -> [batch, h, w, c] (Grad-CAM broadcast over channels).

    Occlusion uses square windows of a quarter of the image side, sliding by half a window.
    """
    unknown = [m for m in methods if m not in ATTRIBUTION_METHODS]
    if unknown:
        raise ValueError(f"explain.methods: {unknown[0]!r} is not known; use any of {list(ATTRIBUTION_METHODS)}")
    q, (xh, th) = queries_of(model, variables), _host(x, target)
    patch = _occlusion_patch(xh)
    registry = {
        "saliency": lambda: saliency(q, xh, th),
        "grad_x_input": lambda: grad_x_input(q, xh, th),
        "integrated_gradients": lambda: integrated_gradients(q, xh, th, steps=ig_steps),
        "smoothgrad": lambda: smoothgrad(q, xh, th, key=key, samples=smoothgrad_samples),
        "occlusion": lambda: occlusion(q, xh, th, patch=patch, stride=max(1, patch // 2)),
    }
    out = {}
    for method in methods:
        if method != "grad_cam":
            out[method] = registry[method]()
            continue
        layer = spatial_layer(model, variables, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        if layer is not None:
            out[method] = np.asarray(_per_model(_grad_cam, model, layer)(variables, x, target))
    return out


def faithfulness_per_image(model: nn.Module, variables, x, target, maps: dict[str, np.ndarray], teacher_maps, *,
                           steps: int = 16) -> tuple[dict, dict]:
    """Deletion/insertion AUC of every map on every image, and its rank agreement with the teacher's map.

    Returns (scores: method -> {deletion_auc, insertion_auc, spearman_vs_teacher, top10_overlap_vs_teacher}
    with one value per image ([batch] arrays; the teacher terms only when `teacher_maps` has the method),
    curves: method -> {"deletion": [batch, steps+1], "insertion": [batch, steps+1]}).
    """
    q, (xh, th) = queries_of(model, variables), _host(x, target)
    scores, curves = {}, {}
    for method, m in maps.items():
        d_auc, i_auc, d_curve, i_curve = deletion_insertion(q, xh, np.asarray(m), th, steps=steps)
        s = {"deletion_auc": np.asarray(d_auc), "insertion_auc": np.asarray(i_auc)}
        if teacher_maps is not None and method in teacher_maps:
            a, b = np.abs(np.asarray(m)).sum(-1), np.abs(np.asarray(teacher_maps[method])).sum(-1)
            rho, overlap = _agreement_with_teacher(a, b, max(1, a[0].size // 10))
            s["spearman_vs_teacher"], s["top10_overlap_vs_teacher"] = np.asarray(rho), np.asarray(overlap)
        scores[method] = s
        curves[method] = {"deletion": np.asarray(d_curve), "insertion": np.asarray(i_curve)}
    return scores, curves


@compilation.run_once(static_argnums=2)
def _agreement_with_teacher(a, b, k: int):
    """(Spearman rho, top-k overlap) of two [batch, h, w] maps, one program for both."""
    return spearman(a, b), top_k_overlap(a, b, k=k)


def faithfulness_scores(model: nn.Module, variables, x, target, maps: dict[str, np.ndarray], teacher_maps, *,
                        steps: int = 16) -> tuple[dict, dict]:
    """`faithfulness_per_image` averaged over the images: (method -> {metric: mean}, method -> {"deletion":
    [steps+1], "insertion": [steps+1]})."""
    scores, curves = faithfulness_per_image(model, variables, x, target, maps, teacher_maps, steps=steps)
    return image_means(scores), curve_means(curves)


def image_means(per_image: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """method -> {metric: [batch]} to method -> {metric: mean over the images}."""
    return {method: {k: float(np.mean(v)) for k, v in s.items()} for method, s in per_image.items()}


def curve_means(curves: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """method -> {"deletion"/"insertion": [batch, steps+1]} to the mean curve over the images ([steps+1])."""
    return {method: {k: v.mean(0) for k, v in c.items()} for method, c in curves.items()}


def quality_per_image(model: nn.Module, variables, x, target, maps: dict[str, np.ndarray], *, key,
                      samples: int = 32) -> dict[str, dict[str, np.ndarray]]:
    """Faithfulness correlation, infidelity (optimally scaled), sparseness and complexity of every map on every image.

    Faithfulness correlation removes random tenths of the input (to zero, the standardized mean);
    infidelity uses unit-variance-scaled Gaussian noise of 0.1 with Captum's optimal scaling, so
    maps on different scales compare.

    Returns:
      method -> {faithfulness_correlation, infidelity, sparseness, complexity}, each [batch].
    """
    q, (xh, th) = queries_of(model, variables), _host(x, target)
    subset = max(1, int(np.prod(xh.shape[1:])) // 10)
    keys = split_keys(key, 2)
    out = {}
    for method, m in maps.items():
        m = np.asarray(m)
        out[method] = {
            "faithfulness_correlation": np.asarray(faithfulness_correlation(
                q, xh, m, th, key=keys[0], subset_size=subset, samples=samples)),
            "infidelity": np.asarray(infidelity(q, xh, m, th, key=keys[1], samples=samples)),
        }
        out[method]["sparseness"], out[method]["complexity"] = map(np.asarray, _map_scores(m.reshape(len(m), -1)))
    return out


# sparseness and complexity of [batch, n] maps, one program for both
_map_scores = compilation.run_once(lambda m: (sparseness(m), complexity(m)))


def quality_scores(model: nn.Module, variables, x, target, maps: dict[str, np.ndarray], *, key,
                   samples: int = 32) -> dict[str, dict[str, float]]:
    """`quality_per_image` averaged over the images: method -> {faithfulness_correlation, infidelity, sparseness,
    complexity}."""
    return image_means(quality_per_image(model, variables, x, target, maps, key=key, samples=samples))


def rank_methods(scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Ranks one model's attribution methods on each ranked metric of `metrics.METRICS` (1 = best) and on average.

    Args:
      scores: method -> {metric: value} (metrics missing for a method are left out of its average).
    Returns:
      method -> {"ranks": {metric: rank}, "mean_rank": float}, ties sharing the better rank.
    """
    ranks = {m: {} for m in scores}
    for metric in metric_names(ranked=True):
        direction = METRICS[metric].direction
        have = [(m, s[metric]) for m, s in scores.items() if s.get(metric) is not None and np.isfinite(s[metric])]
        for method, value in have:
            ranks[method][metric] = 1 + sum(direction * (other - value) > 0 for _, other in have)
    return {m: {"ranks": r, "mean_rank": float(np.mean(list(r.values()))) if r else float("nan")}
            for m, r in ranks.items()}


def ig_completeness(model: nn.Module, variables, x, target, ig_map) -> float:
    """Mean |sum IG - (f(x) - f(0))| / |f(x) - f(0)| over the images."""
    xh, th = _host(x, target)
    return float(np.mean(ig_completeness_error(queries_of(model, variables), xh, np.asarray(ig_map), th)))


def saliency_max_sensitivity(model: nn.Module, variables, x, target, *, radius: float, key) -> float:
    """Mean max-sensitivity of the saliency map under uniform noise of `radius` (Yeh et al. 2019)."""
    xh, th = _host(x, target)
    return float(np.mean(max_sensitivity(queries_of(model, variables), xh, th, key=key, radius=radius, samples=8)))


def randomization_scores(model: nn.Module, variables, x, target, *, key) -> dict[str, list]:
    """Cascading top-down randomisation check of saliency and grad x input (Adebayo et al. 2018).

    Returns method -> [(layer, mean Spearman rho), ...] from the output layer down.
    """
    params = variables["params"]
    sample = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    order = list(reversed(layer_order(model, variables, sample)))  # top-down: the output layer first
    extra = {k: v for k, v in variables.items() if k != "params"}
    mesh = _mesh_of(variables)
    xh, th = _host(x, target)
    out = {}
    for method in ("saliency", "grad_x_input"):
        fn = {"saliency": saliency, "grad_x_input": grad_x_input}[method]
        out[method] = randomization_check(
            lambda p, z, t, fn=fn: fn(ModelQueries(model, {"params": p, **extra}, mesh), z, t), params, order, xh,
            th, key=key, jit=False)
    return out


def robustness_scores(model: nn.Module, variables, x, labels, *, epsilon: float, pgd_steps: int, key) -> dict[str, float]:
    """Accuracy under FGSM and PGD (L-inf, budget `epsilon` in standardized input units; PGD steps of
    2.5 epsilon / pgd_steps from a random start)."""
    q, (xh, yh) = queries_of(model, variables), _host(x, labels)
    return {"fgsm_accuracy": adversarial_accuracy(q, xh, yh, attack="fgsm", epsilon=epsilon),
            "pgd_accuracy": adversarial_accuracy(q, xh, yh, attack="pgd", epsilon=epsilon,
                                                    step_size=2.5 * epsilon / pgd_steps, steps=pgd_steps, key=key)}


def perturbed_views(x, *, key) -> dict[str, np.ndarray]:
    """One label-preserving perturbation of each image per kind of `data.PERTURBATIONS` (host arrays [n, ...])."""
    return {kind: np.asarray(v) for kind, v in _perturbed_views(key, x).items()}


@compilation.run_once
def _perturbed_views(key, x):
    keys = jax.random.split(key, len(PERTURBATIONS))  # one program for every draw (eagerly, about twenty)
    return {kind: perturb(k, x, kind) for kind, k in zip(PERTURBATIONS, keys)}


def local_agreement(model: nn.Module, variables, views: dict[str, np.ndarray],
                    teacher_logits: dict[str, np.ndarray]) -> dict[str, float]:
    """Local fidelity: per kind of perturbation, the share of perturbed images on which the model's top-1 class is
    the teacher's on the same perturbed image, and their mean ("mean")."""
    q = queries_of(model, variables)
    out = {kind: float(np.mean(q.logits(v).argmax(-1) == teacher_logits[kind].argmax(-1))) for kind, v in views.items()}
    return {**out, "mean": float(np.mean(list(out.values())))}


def _features(model, variables, x):
    return model.apply(variables, x, return_features=True)


def tree_routes(model: nn.Module, variables, x) -> dict[str, np.ndarray]:
    """A soft tree's routing of every image of `x`: `routing` [batch, 2^depth - 1] (right-routing probabilities,
    breadth-first) and `path_probs` [batch, 2^depth] (leaf reach probabilities; see `models.SoftDecisionTree`)."""
    _, f = _per_model(_features, model)(variables, x)
    return {"routing": np.asarray(f["routing"]), "path_probs": np.asarray(f["path_probs"])}


def features_of(model: nn.Module, variables, x) -> dict[str, np.ndarray]:
    """Every per-example feature the model names ([batch, ...] arrays only)."""
    _, feats = _per_model(_features, model)(variables, x)
    return {k: np.asarray(v) for k, v in feats.items() if k != MEMBER_LOGITS and v.shape[0] == x.shape[0]}


def cka_scores(teacher_feats: dict, student_feats: dict) -> dict:
    """Linear CKA between every teacher layer and every student layer: {teacher_layers, student_layers, matrix}."""
    names_t, names_s, matrix = cka_matrix(teacher_feats, student_feats)
    return {"teacher_layers": list(names_t), "student_layers": list(names_s), "matrix": np.asarray(matrix).tolist()}


def linear_student(variables, x, image_shape) -> dict:
    """Class templates in pixel space and the exact per-component contributions for the images `x` [B, ...].

    Returns "templates" [C, *image_shape] (T = W^T P), "component_contributions" [B, C, k] (W_jc z_bj),
    "logits" [B, C], "bias" [C], "z" [B, k] (the components z = (x - mean) P^T) and "centred" [B, d] (x - mean),
    so that logits = z W + b = centred T^T + b.
    """
    templates, contrib, z, centred = _linear_readout(variables["params"]["linear"], variables["pca"], x)
    return {
        "templates": np.asarray(templates).reshape(-1, *image_shape),
        "component_contributions": np.asarray(contrib["components"]),  # [B, C, k]
        "logits": np.asarray(contrib["logits"]),
        "bias": np.asarray(variables["params"]["linear"]["bias"]),
        "z": np.asarray(z),
        "centred": np.asarray(centred),
    }


@compilation.run_once
def _linear_readout(linear, pca, x):
    """(class templates, `analysis.linear_contributions`, z, x - mean) of a linear student as one program."""
    w, b = linear["kernel"], linear["bias"]
    comps, mean = pca["components"], pca["mean"]
    centred = x.reshape(len(x), -1) - mean
    z = jnp.matmul(centred, comps.T, precision=backend.HIGHEST)
    return _class_templates(w, comps), _linear_contributions(w, b, z, comps, centred, None), z, centred


def tree_student(model: nn.Module, variables, x, labels, num_classes: int, image_shape) -> dict:
    """Node filters as images, leaf class distributions, and per-class leaf usage on `x`."""
    filters, leaf_probs, usage = _per_model(_tree_readout, model, num_classes, tuple(image_shape))(
        variables, x, np.asarray(labels, np.int32))  # a host array: placed as the program needs it, no reshard
    return {
        "filters": np.asarray(filters),
        "leaf_probs": np.asarray(leaf_probs),
        "usage": {k: np.asarray(v) for k, v in usage.items()},
        "depth": model.depth,
    }


def _tree_readout(model, num_classes, image_shape, variables, x, labels):
    """(node filters, leaf class distributions, `analysis.tree_usage`) of a soft tree as one program."""
    _, f = _features(model, variables, x)
    leaf, _ = tree_hard_predict(f["routing"], f["leaf_logits"], model.depth)
    usage = _tree_usage(f["path_probs"], labels, leaf, num_classes=num_classes)
    return (_node_filters(variables["params"]["nodes"]["kernel"], image_shape),
            jax.nn.softmax(f["leaf_logits"], -1), usage)
