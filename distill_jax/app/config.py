"""The default run configuration, its smoke variant, and validation of user-set values.

Config files under `experiments/configs/` start from `default_config()` and change what
they need. `validate` turns an out-of-range value into one ValueError naming the key, the
value and what is allowed (the CLI prints it as one line and exits with status 2).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from distill_jax._checks import is_number
from distill_jax.app._settings import (
    STUDENT_KINDS,
    method_config,
    parse_pairs,
    parse_students,
    perturbation_kinds,
    student_budget,
    teacher_method_config,
)
from distill_jax.audit._evaluators import ATTRIBUTION_METHODS
from distill_jax.data._augment import PERTURBATIONS
from distill_jax.distill._views import ADVERSARIAL, check_adversarial, check_mixup
from distill_jax.distill.tuning import SCORES
from distill_jax.models._util import MODEL_KINDS
from distill_jax.train._state import OPTIMIZERS, SCHEDULES

__all__ = [
    "default_config",
    "apply_smoke",
    "validate",
    "check_choices",
]

def default_config() -> ml_collections.ConfigDict:
    """The main job: digits, SeedCNN teacher, six students (three kinds x labels/kd) and one attention student."""
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.image_size = ml_collections.FieldReference(None, field_type=int)
    c.test_fraction = 0.2
    c.train_limit = 0  # > 0: train on the first N training images only (quick runs, scaling benchmarks)
    c.seed = 0
    c.pca_components = 24
    # compute dtype of the conv nets and the MLP while training ("bfloat16" on TPU/GPU: about twice the
    # throughput); parameters, optimizer state, losses and everything reported stay float32
    c.dtype = "float32"

    # adversarial training (Madry et al. 2018), per model: adversarial="pgd" trains on PGD examples made
    # against the model each step (distill.ADVERSARIAL); epsilon and step size in standardized input units,
    # like robustness.epsilon; adversarial_step_size=0 means 2.5 * epsilon / steps. Networks only
    # (seed_cnn, cnn, mlp); for students a kind's group may override them (see `student`)
    adversarial = dict(adversarial="none", adversarial_epsilon=0.25, adversarial_steps=5, adversarial_step_size=0.0)
    # DP-SGD (Abadi et al. 2016), per model: dp_noise_multiplier > 0 clips every example's gradient to L2 norm
    # dp_l2_clip and adds Gaussian noise of std dp_noise_multiplier * dp_l2_clip; the run reports the model's
    # (epsilon, dp_delta) from dp-accounting's RDP accountant (`privacy.dp_sgd_epsilon`); 0 = off.
    # dp_sampling: "poisson" (each example enters each step with probability batch_size / n, the sampling the
    # accountant assumes; train.poisson_epoch_batches) or "shuffle" (fixed-size shuffled batches, accounted
    # without amplification by sampling: a far larger epsilon for the same training)
    adversarial.update(dp_noise_multiplier=0.0, dp_l2_clip=1.0, dp_delta=1e-5, dp_sampling="poisson")
    c.teacher = ml_collections.ConfigDict(dict(
        kind="seed_cnn", optimizer="adam", learning_rate=1e-3, momentum=0.9, weight_decay=0.0,
        # 15 epochs: on digits the teacher's test accuracy is the same as after 25 (98.9 %), as are the
        # students' to +-0.3 points; the students keep 40 (25 cost the linear ones 1-2.5 points)
        schedule="cosine", epochs=15, batch_size=64, augment_shift=0, augment_flip=False,
        # softmax temperature of the teacher's training (defensive distillation trains it at the student's T)
        train_temperature=1.0,
        # K > 1: K teachers of this kind with their own initialisations, trained in one vmapped step, distilled
        # from the mean of their logits (models.Ensemble); conv nets and the MLP only
        ensemble=1, **adversarial))
    c.student = ml_collections.ConfigDict(dict(
        optimizer="adam", learning_rate=3e-3, momentum=0.9, weight_decay=0.0,
        schedule="cosine", epochs=40, batch_size=64,
        # gradual magnitude pruning of the students' kernels (Zhu & Gupta 2017); 0 = off
        prune_sparsity=0.0, prune_begin=0.2, prune_end=0.8, **adversarial))
    # "<kind>-<method>": kind in STUDENT_KINDS, method a '+'-joined sum of distill.TERMS.
    c.students = "cnn-labels,cnn-kd,tree-labels,tree-kd,linear-labels,linear-kd,cnn-kd+attention"
    # a kind's group may override any key of `student` for that kind's students
    c.tree = ml_collections.ConfigDict(dict(depth=5, learning_rate=1e-2))
    c.mlp = ml_collections.ConfigDict(dict(hidden=(128,)))

    c.method = ml_collections.ConfigDict(dict(
        # KD temperature and alpha: "default" (each student kind's, `distill.KD_DEFAULTS`, chosen on validation
        # splits by experiments/kd_defaults_sweep.py), numbers, or "auto" to choose each kd student's on a
        # validation split held out from the training images (distill_jax.tuning), from these grids, by
        # auto_score. fm and defensive read the temperature too ("auto": the kind's default); defensive
        # distillation (Papernot et al. 2016) used T = 20..100
        temperature=ml_collections.FieldReference("default", field_type=object),
        alpha=ml_collections.FieldReference("default", field_type=object),
        auto_temperatures=(1.0, 2.0, 4.0, 8.0), auto_alphas=(0.5, 0.9), auto_score="accuracy",
        auto_epochs=0,  # epochs of each candidate run; 0 = the student's own
        validation_fraction=0.1,
        # function matching (Beyer et al. 2022): mix each batch's images with Beta(mixup, mixup) weights,
        # teacher and student on the same view; 0 = off; only for label-free methods such as "fm"
        mixup=0.0,
        # the students' own augmentation (teacher and student on the same shifted/flipped view; the teacher's
        # training has its own, teacher.augment_shift/flip): shifts of up to this many pixels, horizontal flips
        augment_shift=0, augment_flip=False,
        # teacher-labelled perturbations for the students (data.perturb_some): comma-separated kinds of
        # data.PERTURBATIONS (noise, contrast, brightness, cutout) or "all"; perturb_fraction of each batch's
        # images is replaced by one of them, labelled by the teacher on that view; "" = off
        perturb="", perturb_fraction=0.5,
        tree_balance=0.1, attention_p=2.0,
        attention_pairs="conv1:conv1,conv2:conv2", hint_pairs="conv2:conv2",
        # run the frozen teacher once and keep what the terms read, up to this many MB of host memory
        cache_teacher=True, cache_limit_mb=1024))

    # transfer set (Hinton et al. 2015): unlabelled images the teacher labels for the students that learn
    # from it (every method but `labels`); teacher and label-trained students never see them.
    # unlabelled_fraction: hold back that share of each class of the training images, labels dropped;
    # split: a tfds split of unlabelled images (e.g. "unlabelled" of tfds:stl10); npz files: an x_transfer array
    c.transfer = ml_collections.ConfigDict(dict(unlabelled_fraction=0.0, split=""))

    c.explain = ml_collections.ConfigDict(dict(
        num_images=8, ig_steps=64, smoothgrad_samples=16, faithfulness_steps=16, sensitivity_radius=0.1,
        quality_samples=32,  # random subsets / noise draws of faithfulness correlation and infidelity
        methods=("saliency", "grad_x_input", "integrated_gradients", "smoothgrad", "grad_cam", "occlusion")))
    # FGSM/PGD budget in standardized input units (the inputs have unit variance per channel)
    c.robustness = ml_collections.ConfigDict(dict(epsilon=0.25, pgd_steps=10, num_images=256))
    c.analysis_images = 256  # test images for CKA and soft-tree usage
    c.eval_batch_size = 256
    c.checkpoint_every = 0
    c.keep_checkpoints = 2
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny budgets that run the whole pipeline in seconds (for tests and CI)."""
    c = ml_collections.ConfigDict(c.to_dict(preserve_field_references=True))
    c.teacher.epochs = 1
    c.student.epochs = 1
    c.explain.num_images = 4
    c.explain.ig_steps = 8
    c.explain.smoothgrad_samples = 4
    c.explain.faithfulness_steps = 4
    c.explain.quality_samples = 4
    c.robustness.num_images = 32
    c.robustness.pgd_steps = 2
    c.analysis_images = 64
    c.tree.depth = min(c.tree.depth, 3)
    return c


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config value {key}={value!r} is out of range: {allowed}")


def _integer(v, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _auto_or(value, ok) -> bool:
    """`value` is "auto", "default" or a number for which `ok(value)` holds."""
    return value in ("auto", "default") or (is_number(value) and ok(value))


# The per-model training extras a budget group (teacher, student, a student kind) may set, in the order
# they are checked: key -> (whether a value is allowed, what is allowed). The adversarial method's name is
# checked with the other choices (`check_choices`).
_TRAINING_EXTRAS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dp_noise_multiplier": (lambda v: is_number(v) and v >= 0, "must be >= 0 (0 = no DP-SGD)"),
    "dp_l2_clip": (lambda v: is_number(v) and v > 0, "must be > 0"),
    "dp_delta": (lambda v: is_number(v) and 0 < v < 1, "must be in (0, 1)"),
    "dp_sampling": (lambda v: v in ("poisson", "shuffle"), "must be 'poisson' or 'shuffle'"),
    "adversarial_epsilon": (lambda v: is_number(v) and v >= 0, "must be >= 0 (standardized input units)"),
    "adversarial_steps": (lambda v: isinstance(v, int) and v >= 1, "must be an integer >= 1"),
    "adversarial_step_size": (lambda v: is_number(v) and v >= 0, "must be >= 0 (0 = 2.5 * epsilon / steps)"),
}


def _validate_training_extras(g, group: str) -> None:
    """The `_TRAINING_EXTRAS` keys (DP-SGD and adversarial training) of one budget group, where it has them."""
    for key, (ok, allowed) in _TRAINING_EXTRAS.items():
        if key in g:
            _require(ok(g[key]), f"{group}.{key}", g[key], allowed)


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first out-of-range value."""
    _require(0 < c.test_fraction < 1, "test_fraction", c.test_fraction, "must be in (0, 1)")
    _require(c.train_limit >= 0, "train_limit", c.train_limit, "must be >= 0 (0 = every training image)")
    _require(c.pca_components >= 1, "pca_components", c.pca_components, "must be >= 1")
    _require(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "must be 'float32' or 'bfloat16'")
    for group in ("teacher", "student"):
        g = c[group]
        _require(g.batch_size >= 1, f"{group}.batch_size", g.batch_size, "must be >= 1")
        _require(g.epochs >= 1, f"{group}.epochs", g.epochs, "must be >= 1")
        _require(g.learning_rate > 0, f"{group}.learning_rate", g.learning_rate, "must be > 0")
    _require(is_number(c.teacher.get("train_temperature", 1.0)) and c.teacher.get("train_temperature", 1.0) > 0,
             "teacher.train_temperature", c.teacher.get("train_temperature"), "must be > 0 (1 = plain training)")
    for group in ("teacher", "student") + STUDENT_KINDS:
        _validate_training_extras(c.get(group, {}), group)
    _require(0 <= c.student.prune_sparsity < 1, "student.prune_sparsity", c.student.prune_sparsity,
             "must be in [0, 1)")
    _require(0 <= c.student.prune_begin <= c.student.prune_end <= 1, "student.prune_begin/prune_end",
             (c.student.prune_begin, c.student.prune_end), "need 0 <= prune_begin <= prune_end <= 1")
    m = c.method
    _require(_auto_or(m.temperature, lambda t: t > 0), "method.temperature", m.temperature,
             "must be > 0, 'default' or 'auto'")
    _require(_auto_or(m.alpha, lambda a: 0 <= a <= 1), "method.alpha", m.alpha, "must be in [0, 1], 'default' or 'auto'")
    _require(len(m.auto_temperatures) > 0 and all(is_number(t) and t > 0 for t in m.auto_temperatures),
             "method.auto_temperatures", m.auto_temperatures, "must list numbers > 0")
    _require(len(m.auto_alphas) > 0 and all(is_number(a) and 0 <= a <= 1 for a in m.auto_alphas),
             "method.auto_alphas", m.auto_alphas, "must list numbers in [0, 1]")
    _require(m.auto_score in SCORES, "method.auto_score", m.auto_score, f"must be one of {list(SCORES)}")
    _require(m.mixup >= 0, "method.mixup", m.mixup, "must be >= 0 (0 = off)")
    kinds = perturbation_kinds(m.get("perturb", ""))
    _require(isinstance(m.get("perturb", ""), str) and all(k in PERTURBATIONS for k in kinds), "method.perturb",
             m.get("perturb"), f"must be \"\", \"all\" or comma-separated kinds of {sorted(PERTURBATIONS)}")
    _require(is_number(m.get("perturb_fraction", 0.5)) and 0 <= m.get("perturb_fraction", 0.5) <= 1,
             "method.perturb_fraction", m.get("perturb_fraction"), "must be in [0, 1]")
    # DP-SGD takes each example's gradient on its own (a batch of one), where mixup would mix it with itself
    private = [g for g in ("student",) + STUDENT_KINDS if c.get(g, {}).get("dp_noise_multiplier", 0) > 0]
    _require(m.mixup == 0 or not private, "method.mixup", m.mixup,
             f"must be 0 with DP-SGD ({private[0] if private else ''}.dp_noise_multiplier > 0): DP-SGD takes each "
             f"example's gradient on its own, so there is no batch to mix")
    _validate_private_students(c)
    _require(m.auto_epochs >= 0, "method.auto_epochs", m.auto_epochs, "must be >= 0 (0 = the student's epochs)")
    _require(0 < m.validation_fraction < 1, "method.validation_fraction", m.validation_fraction, "must be in (0, 1)")
    _require(c.method.cache_limit_mb >= 0, "method.cache_limit_mb", c.method.cache_limit_mb, "must be >= 0")
    _require(c.method.tree_balance >= 0, "method.tree_balance", c.method.tree_balance, "must be >= 0")
    transfer = c.get("transfer", {})
    _require(0 <= transfer.get("unlabelled_fraction", 0.0) < 1, "transfer.unlabelled_fraction",
             transfer.get("unlabelled_fraction"), "must be in [0, 1) (0 = no held-back images)")
    _require(isinstance(transfer.get("split", ""), str), "transfer.split", transfer.get("split"),
             "must be a tfds split name or '' (none)")
    _require(c.tree.depth >= 1, "tree.depth", c.tree.depth, "must be >= 1")
    _require(c.tree.depth <= 12, "tree.depth", c.tree.depth, "must be <= 12 (2^depth leaves)")
    _require(c.explain.ig_steps >= 1, "explain.ig_steps", c.explain.ig_steps, "must be >= 1")
    _require(c.robustness.epsilon >= 0, "robustness.epsilon", c.robustness.epsilon, "must be >= 0")
    _require(c.robustness.pgd_steps >= 1, "robustness.pgd_steps", c.robustness.pgd_steps, "must be >= 1")
    _require(c.analysis_images >= 2, "analysis_images", c.analysis_images, "must be >= 2")
    _require(c.explain.quality_samples >= 2, "explain.quality_samples", c.explain.quality_samples, "must be >= 2")
    _require(c.explain.num_images >= 1, "explain.num_images", c.explain.num_images, "must be >= 1")
    _require(c.eval_batch_size >= 1, "eval_batch_size", c.eval_batch_size, "must be >= 1")
    _validate_run_keys(c)
    parse_students(c.students)
    parse_pairs(c.method.attention_pairs, "method.attention_pairs")
    parse_pairs(c.method.hint_pairs, "method.hint_pairs")


def _validate_private_students(c: ml_collections.ConfigDict) -> None:
    """Settings whose privacy figure would not describe what runs, refused for DP-SGD students.

    A soft tree's balance penalty is a batch-level term, while DP-SGD takes each example's gradient alone (on a
    batch of one it would push every routing decision of that example to 1/2); and `auto` trains one private
    model per candidate on the same images but would report only the last one's epsilon.
    """
    m = c.method
    for name, kind, method in parse_students(c.students):
        group = c.get(kind, {}).get("dp_noise_multiplier", c.student.get("dp_noise_multiplier", 0.0))
        if not group:
            continue
        where = f"{kind}.dp_noise_multiplier" if "dp_noise_multiplier" in c.get(kind, {}) else "student.dp_noise_multiplier"
        _require(kind != "tree" or m.tree_balance == 0, "method.tree_balance", m.tree_balance,
                 f"must be 0 for the DP-SGD soft tree {name!r} ({where} > 0): the balance penalty is a batch-level "
                 f"term and DP-SGD takes each example's gradient alone")
        auto = [k for k in ("temperature", "alpha") if m[k] == "auto"]
        _require(not (auto and "kd" in method.split("+")), f"method.{auto[0] if auto else 'temperature'}", "auto",
                 f"not for the DP-SGD student {name!r} ({where} > 0): each candidate would be another private "
                 f"training on the same images and the reported epsilon would cover only the last; set numbers")


def _validate_run_keys(c: ml_collections.ConfigDict) -> None:
    """The keys of checkpoints, the audit's budgets, optimizers and inputs that `validate` does not check above."""
    _require(isinstance(c.dataset, str) and c.dataset != "", "dataset", c.dataset, "must be a dataset spec")
    _require(c.data_dir is None or isinstance(c.data_dir, str), "data_dir", c.data_dir, "must be a path or None")
    _require(c.image_size is None or _integer(c.image_size, 1), "image_size", c.image_size,
             "must be an integer >= 1 or None (the first image's size)")
    _require(_integer(c.seed, 0), "seed", c.seed, "must be an integer >= 0")
    _require(_integer(c.checkpoint_every, 0), "checkpoint_every", c.checkpoint_every,
             "must be an integer >= 0 (steps between checkpoints; 0 = only at the end)")
    _require(_integer(c.keep_checkpoints, 1), "keep_checkpoints", c.keep_checkpoints, "must be an integer >= 1")
    ensemble = c.teacher.get("ensemble", 1)
    _require(_integer(ensemble, 1), "teacher.ensemble", ensemble, "must be an integer >= 1 (1 = one teacher)")
    _require(ensemble == 1 or c.teacher.kind in ("seed_cnn", "cnn", "mlp"), "teacher.ensemble", ensemble,
             f"needs a network teacher (seed_cnn, cnn, mlp), not teacher.kind={c.teacher.kind!r}")
    e = c.explain
    _require(isinstance(e.methods, (tuple, list)) and len(e.methods) > 0 and all(isinstance(m, str) for m in e.methods),
             "explain.methods", e.methods, "must name at least one attribution method, e.g. ('saliency',)")
    _require(_integer(e.faithfulness_steps, 1), "explain.faithfulness_steps", e.faithfulness_steps,
             "must be an integer >= 1")
    _require(_integer(e.smoothgrad_samples, 1), "explain.smoothgrad_samples", e.smoothgrad_samples,
             "must be an integer >= 1")
    _require(is_number(e.sensitivity_radius) and e.sensitivity_radius >= 0, "explain.sensitivity_radius",
             e.sensitivity_radius, "must be >= 0")
    for group in ("teacher", "student"):
        g = c[group]
        _require(is_number(g.momentum) and 0 <= g.momentum < 1, f"{group}.momentum", g.momentum, "must be in [0, 1)")
        _require(is_number(g.weight_decay) and g.weight_decay >= 0, f"{group}.weight_decay", g.weight_decay,
                 "must be >= 0")
    _require(_integer(c.teacher.augment_shift, 0), "teacher.augment_shift", c.teacher.augment_shift,
             "must be an integer >= 0 (pixels)")
    _require(isinstance(c.teacher.augment_flip, bool), "teacher.augment_flip", c.teacher.augment_flip,
             "must be True or False")
    _require(_integer(c.method.get("augment_shift", 0), 0), "method.augment_shift", c.method.get("augment_shift"),
             "must be an integer >= 0 (pixels)")
    _require(isinstance(c.method.get("augment_flip", False), bool), "method.augment_flip",
             c.method.get("augment_flip"), "must be True or False")
    _require(isinstance(c.method.cache_teacher, bool), "method.cache_teacher", c.method.cache_teacher,
             "must be True or False")
    hidden = c.mlp.hidden
    _require(isinstance(hidden, (tuple, list)) and len(hidden) > 0 and all(_integer(h, 1) for h in hidden),
             "mlp.hidden", hidden, "must list layer widths >= 1, e.g. (128,)")


def check_choices(c) -> None:
    """Names in the config that only the library's registries can check, checked before anything trains.

    Raises:
      ValueError: naming the key, the value and the accepted names.
    """
    def require(ok: bool, key: str, value, accepted) -> None:
        if not ok:
            raise ValueError(f"config value {key} {value!r} is not known; use one of {sorted(accepted)}")

    require(c.teacher.kind in MODEL_KINDS, "teacher.kind", c.teacher.kind, MODEL_KINDS)
    for group in ("teacher", "student"):
        require(c[group].optimizer in OPTIMIZERS, f"{group}.optimizer", c[group].optimizer, OPTIMIZERS)
        require(c[group].schedule in SCHEDULES, f"{group}.schedule", c[group].schedule, SCHEDULES)
    for method in c.explain.methods:
        require(method in ATTRIBUTION_METHODS, "explain.methods", method, ATTRIBUTION_METHODS)
    students = parse_students(c.students)
    groups = [("teacher", c.teacher)] + [(kind, c[kind]) for kind in dict.fromkeys(k for _, k, _ in students)
                                         if kind in c and "adversarial" in c[kind]]
    for group, values in [("student", c.student)] + groups:
        if "adversarial" in values:
            require(values.adversarial in ADVERSARIAL, f"{group}.adversarial", values.adversarial,
                    ADVERSARIAL)
    check_adversarial(c.teacher.kind, teacher_method_config(c),
                              key="teacher.adversarial")
    for name, kind, method in students:
        mcfg = method_config(c, group=student_budget(kind, c))
        check_mixup(method, mcfg)  # a mixed image has no label: say so before training
        key = f"{kind}.adversarial" if "adversarial" in c.get(kind, {}) else "student.adversarial"
        try:
            check_adversarial(kind, mcfg, key=key)
        except ValueError as exc:
            raise ValueError(f"student {name!r}: {exc} (or leave {name!r} out of `students`)") from None
