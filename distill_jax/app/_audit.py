"""The job's audit stage: the test sample, then every score family on every model, as the
evaluators of `distill_jax.audit` compute them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import compilation, parallel
from distill_jax.app._fit import Trained, make_host_predict_fn, salted_keys
from distill_jax.app._prepare import Prepared, model_inputs
from distill_jax.audit._evaluators import (
    attribution_maps,
    cka_scores,
    curve_means,
    faithfulness_per_image,
    features_of,
    image_means,
    ig_completeness,
    linear_student,
    local_agreement,
    perturbed_views,
    quality_per_image,
    queries_of,
    randomization_scores,
    rank_methods,
    robustness_scores,
    saliency_max_sensitivity,
    tree_routes,
    tree_student,
)
from distill_jax.data._batches import stratified_indices
from distill_jax.distill.prune import sparsity
from distill_jax.metrics._fidelity import agreement, mean_kl
from distill_jax.metrics._paired import distillation_gain
from distill_jax.models._util import count_params
from distill_jax.train._fit import progress_bar
from distill_jax.train._step import accuracy_from_logits, predict


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
    per_image: dict  # model -> method -> metric -> [n]: the explanation scores of each explained image
    sample_index: np.ndarray  # [n] test-set index of each explained image
    sample_logits: dict  # model -> [n, classes] logits on the explained images
    routes: dict  # tree student name -> audit.tree_routes(...) on the explained images


def purpose_key(seed: int, purpose: str) -> jax.Array:
    """An independent PRNG key per use (SmoothGrad noise, sensitivity noise, randomisation, attack starts).

    One key shared by several uses would give them the same noise bits; `fold_in` of a hash of the
    purpose's name gives each its own stream, the same in every run with the same seed (`salted_keys`).
    """
    return salted_keys(seed, purpose)[0]


def test_sample(prep: Prepared, n: int, *, seed: int) -> tuple[jax.Array, jax.Array]:
    """`n` test images stratified by class (one per class before any repeats) as model inputs, and their labels.

    The images are `prep.x_test[test_sample_indices(prep, n, seed=seed)]`."""
    idx = test_sample_indices(prep, n, seed=seed)
    return prep.inputs(prep.x_test[idx]), jnp.asarray(prep.y_test[idx])


def test_samples(prep: Prepared, sizes: tuple[int, ...], *,
                 seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`test_sample` of each size in `sizes` as host arrays: (model inputs, labels, test-set indices) per size, the
    inputs of all of them made by one call of one compiled program (op by op, each size compiled programs of its
    own)."""
    idx = [test_sample_indices(prep, n, seed=seed) for n in sizes]
    x = np.asarray(_model_inputs(prep.scaler, prep.x_test[np.concatenate(idx)]))
    bounds = np.cumsum([0, *(len(i) for i in idx)])
    return [(x[lo:hi], np.asarray(prep.y_test[i]), i) for lo, hi, i in zip(bounds[:-1], bounds[1:], idx)]


_model_inputs = compilation.run_once(model_inputs)


def test_sample_indices(prep: Prepared, n: int, *, seed: int) -> np.ndarray:
    """The test-set indices [n] of `test_sample`'s images."""
    return np.asarray(stratified_indices(prep.y_test, n, seed=seed))


def _explain_stage(t: Trained, teacher: Trained, maps: dict, x, target, e, seed: int) -> tuple[dict, dict, dict, dict]:
    """One model's attribution maps, their faithfulness scores (means), curves and per-image scores (teacher's maps
    for agreement)."""
    model_maps = attribution_maps(t.model, t.variables, x, target, methods=tuple(e.methods),
                                        ig_steps=e.ig_steps, smoothgrad_samples=e.smoothgrad_samples,
                                        key=purpose_key(seed, "smoothgrad"))
    per_image, curves = faithfulness_per_image(t.model, t.variables, x, target, model_maps,
                                               None if t is teacher else maps[teacher.name], steps=e.faithfulness_steps)
    quality = quality_per_image(t.model, t.variables, x, target, model_maps,
                                key=purpose_key(seed, "explanation_quality"), samples=e.quality_samples)
    for method, values in quality.items():
        per_image[method].update(values)
    scores = {"saliency_max_sensitivity": saliency_max_sensitivity(
        t.model, t.variables, x, target, radius=e.sensitivity_radius, key=purpose_key(seed, "max_sensitivity")),
        **image_means(per_image)}
    if "integrated_gradients" in model_maps:
        scores["ig_completeness_error"] = ig_completeness(t.model, t.variables, x, target,
                                                                model_maps["integrated_gradients"])
    return model_maps, scores, curve_means(curves), per_image


def _analysis_stage(trained: list[Trained], prep: Prepared, x, target, xa, ya, seed: int) -> tuple[dict, dict, dict]:
    """Randomisation check of the teacher, CKA of each student to the teacher, linear and soft-tree read-outs."""
    teacher = trained[0]
    out = {"randomization": randomization_scores(teacher.model, teacher.variables, x, target,
                                                key=purpose_key(seed, "randomization")),
           "cka": {}, "tree": {}}
    teacher_feats = features_of(teacher.model, teacher.variables, xa)
    linear, trees = {}, {}
    image_shape = prep.x_train.shape[1:]
    for t in trained[1:]:
        feats = features_of(t.model, t.variables, xa)
        if feats:
            out["cka"][t.name] = cka_scores(teacher_feats, feats)
        if t.kind == "linear":
            linear[t.name] = linear_student(t.variables, x, image_shape)
        if t.kind == "tree":
            trees[t.name] = tree_student(t.model, t.variables, xa, np.asarray(ya), prep.num_classes, image_shape)
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
    samples = test_samples(prep, (e.num_images, r.num_images, c.analysis_images), seed=c.seed)
    sample_index = samples[0][2]
    x, target, xr, yr, xa, ya = parallel.place_batch(tuple(a for x_y_i in samples for a in x_y_i[:2]), mesh)
    trained = [dataclasses.replace(t, variables=parallel.replicate(t.variables, mesh)) for t in trained]
    teacher = trained[0]
    maps, curves, explanations, robust, per_image = {}, {}, {}, {}, {}
    # local fidelity: the students against the teacher on perturbed copies of the attack sample
    views = perturbed_views(np.asarray(xr), key=purpose_key(c.seed, "local_fidelity"))
    teacher_queries = queries_of(teacher.model, teacher.variables)
    teacher_views = {kind: teacher_queries.logits(v) for kind, v in views.items()}
    stages = [(t, "explain") for t in trained] + [(t, "attack") for t in trained] + [(None, "analysis")]
    with progress_bar(len(stages), desc="audit", show=show_progress) as bar:
        for t, stage in stages:
            bar.set_postfix_str(f"{stage} {t.name if t else 'students'}")
            if stage == "explain":
                maps[t.name], explanations[t.name], curves[t.name], per_image[t.name] = _explain_stage(
                    t, teacher, maps, x, target, e, c.seed)
            elif stage == "attack":
                robust[t.name] = robustness_scores(t.model, t.variables, xr, yr, epsilon=r.epsilon,
                                                  pgd_steps=r.pgd_steps, key=purpose_key(c.seed, "attack"))
                if t is not teacher:
                    robust[t.name]["local_agreement"] = local_agreement(t.model, t.variables, views, teacher_views)
            else:
                analysis_out, linear, trees = _analysis_stage(trained, prep, x, target, xa, ya, c.seed)
            bar.update(1)
    ranking = {name: rank_methods({m: per[m] for m in maps[name]}) for name, per in explanations.items()}
    sample_logits = {t.name: queries_of(t.model, t.variables).logits(np.asarray(x)) for t in trained}
    routes = {t.name: tree_routes(t.model, t.variables, x) for t in trained if t.kind == "tree"}
    return Audit(explanations, robust, analysis_out, np.asarray(x), np.asarray(target), maps, curves, linear, trees,
                 ranking, per_image, sample_index, sample_logits, routes)


def model_metrics(t: Trained, teacher: Trained | None, prep: Prepared) -> dict:
    """accuracy and params for every model; agreement and KL(teacher || student) for students."""
    out = {"accuracy": accuracy_from_logits(t.test_logits, prep.y_test),
           "params": count_params(t.variables["params"]),
           "sparsity": round(sparsity(t.variables["params"]), 4),
           "train_seconds": round(t.seconds, 2), "train_images": t.train_images}
    if teacher is not None:
        agree, kl = _fidelity(t.test_logits, teacher.test_logits)
        out.update(agreement=float(agree), kl=float(kl), method=t.method)
    out.update(t.settings)
    return out


# agreement and KL of one student, host logits in: one compiled program for both
_fidelity = compilation.run_once(lambda student, teacher: (agreement(student, teacher), mean_kl(student, teacher)))


def membership_attack(t: Trained, prep: Prepared, c, mesh, *, images: int = 1000) -> dict:
    """The loss attack (`privacy.membership_inference`) on a model: `images` of its training images against as
    many test images; the AUC and TPR at low FPR say how well its losses tell the two apart (0.5: not at all).

    Members are the first training images, which every model of the run trained on (a kd student also on
    any transfer images); no shadow models, so this is the cheap lower bound of the leak, not LiRA.
    """
    from distill_jax.distill.privacy import membership_inference  # noqa: PLC0415 - sklearn's metrics load here only

    n = min(images, len(prep.y_train), len(prep.y_test))
    predict_fn = make_host_predict_fn(t.model, prep, mesh)
    members = predict(predict_fn, t.variables, prep.x_train[:n], batch_size=c.eval_batch_size, mesh=mesh)
    logits = np.concatenate([members, t.test_logits[:n]])
    labels = np.concatenate([prep.y_train[:n], prep.y_test[:n]])
    result = membership_inference(logits, labels, np.arange(2 * n) < n)["loss"]
    return {"attack": "loss", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}}


def distillation_comparisons(students: list[Trained], teacher: Trained, prep: Prepared) -> dict[str, dict]:
    """Every student not trained on labels alone, against its labels twin (the run's `<kind>-labels`) on the
    whole test set: `metrics.distillation_gain` (paired differences of agreement, accuracy and KL with 95 %
    bootstrap intervals over the test images) and the twin's name. Students without a twin are left out."""
    twins = {s.kind: s for s in students if s.method == "labels"}
    return {s.name: {"twin": twins[s.kind].name,
                     **distillation_gain(s.test_logits, twins[s.kind].test_logits, teacher.test_logits, prep.y_test)}
            for s in students if s.method != "labels" and s.kind in twins}
