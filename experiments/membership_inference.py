"""How much do the teacher, its students and the private models leak about their training images? Membership
inference (the loss attack and LiRA), measured beside each private model's epsilon.

Command (the run recorded in experiments/RESULTS.md):
    python experiments/membership_inference.py --out runs/membership_inference.json
    python experiments/membership_inference.py --smoke          # seconds: digits, small budgets

Setting, scaled for a 2-core CPU: a pool of `pool` Fashion-MNIST training images (inputs scaled by fixed
constants, as in private_and_robust.py); every target model trains on the same random half of it (the
members), the other half are the non-members. Targets: the teacher (an MLP on the members' labels, not
private), a smaller labels student and a KD student of it (T = 1, the teacher's soft labels on the members),
the teacher's architecture trained by DP-SGD (Poisson sampling, `train.fit(sampling="poisson")`), and a PATE
student (teachers on disjoint shards of the members; the student learns from Confident GNMax labels of public
test images and never sees a member). The attacks score every pool image: the loss attack, and online LiRA
with `shadows` shadow models per architecture, each trained on a random half of the pool by the vmapped
ensemble step (every image IN half of them). Reported: ROC AUC and TPR at 0.1 % and 1 % FPR, and epsilon for
the private models (DP-SGD's for the sampling that ran; PATE's data-independent and data-dependent bounds).

Data: Debian's `dataset-fashion-mnist` (falls back to digits when the IDX files are missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import private_and_robust as pr  # noqa: E402 - shared small-model helpers; puts the repository on sys.path

from distill_jax import data, parallel, train  # noqa: E402
from distill_jax.distill import privacy  # noqa: E402

SETTINGS = {
    "full": dict(dataset="fashion_mnist", pool=10_000, teacher_hidden=(512,), student_hidden=(64,), epochs=30,
                 batch_size=64, learning_rate=1e-3, shadows=16, dp_noise_multiplier=1.1, dp_l2_clip=1.0,
                 dp_epochs=15, pate_teachers=25, pate_queries=1000, delta=1e-5),
    "smoke": dict(dataset="digits", pool=600, teacher_hidden=(64,), student_hidden=(16,), epochs=3,
                  batch_size=32, learning_rate=1e-3, shadows=4, dp_noise_multiplier=1.1, dp_l2_clip=1.0,
                  dp_epochs=2, pate_teachers=5, pate_queries=100, delta=1e-5),
}


def load_pool(s: dict, seed: int):
    """(pool images, labels, public images, public labels, classes): the first `pool` training images
    (shuffled by the loader's seed) and the test split as public data."""
    try:
        ds = data.load(s["dataset"], seed=seed, keep_uint8=True)
    except FileNotFoundError:
        ds = data.load("digits", seed=seed, keep_uint8=True)
    pool = min(s["pool"], len(ds.y_train))
    return (pr.unit_inputs(ds.x_train[:pool]), np.asarray(ds.y_train[:pool], np.int32), pr.unit_inputs(ds.x_test),
            np.asarray(ds.y_test, np.int32), ds.num_classes, ds.name)


def fit_soft(name: str, model, x: np.ndarray, soft: np.ndarray, s: dict, seed: int):
    """`model` trained on soft targets [n, classes] (cross-entropy with the teacher's softmax, T = 1): params."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), len(name))
    params = model.init(key, jnp.asarray(x[:1]))["params"]
    steps = s["epochs"] * (len(x) // s["batch_size"])
    tx = optax.adam(optax.cosine_decay_schedule(s["learning_rate"], steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, pb):
        loss = lambda p: jnp.mean(optax.softmax_cross_entropy(model.apply({"params": p}, xb), pb))  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for epoch in range(s["epochs"]):
        order = train.epoch_batch_indices(len(x), s["batch_size"], seed=seed, epoch=epoch)
        for idx in order:
            params, opt_state = step(params, opt_state, x[idx], soft[idx])
    return jax.device_get(params)


def fit_dp(model, x: np.ndarray, y: np.ndarray, s: dict, seed: int):
    """`model` trained by DP-SGD with Poisson sampling through the library's step and fit loop: (params, privacy)."""
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))["params"]
    steps = train.total_steps(len(y), s["batch_size"], s["dp_epochs"])
    optimizer = optax.adam(optax.cosine_decay_schedule(s["learning_rate"], steps))

    def loss_fn(params, extra, batch, teacher, key):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), {}

    mesh = parallel.make_mesh()
    dp = train.DPSGD(l2_clip=s["dp_l2_clip"], noise_multiplier=s["dp_noise_multiplier"],
                     expected_batch_size=s["batch_size"])
    state = train.create_state(params, optimizer, key=jax.random.PRNGKey(seed + 1))
    cap = train.poisson_batch_cap(len(y), s["batch_size"], steps, multiple_of=jax.local_device_count())
    cfg = train.FitConfig(epochs=s["dp_epochs"], batch_size=s["batch_size"], seed=seed, sampling="poisson",
                          batch_cap=cap, show_progress=False)
    state, _ = train.fit(state, train.make_train_step(loss_fn, optimizer, mesh, dp=dp), {"x": x, "y": y}, cfg,
                         mesh=mesh)
    eps = privacy.dp_sgd_epsilon(steps, batch_size=s["batch_size"], n=len(y), noise_multiplier=s["dp_noise_multiplier"],
                                 delta=s["delta"])
    return jax.device_get(state.params), {"epsilon": eps, "mechanism": "DP-SGD (Poisson)", "steps": steps,
                                          "truncation_probability": train.poisson_overflow_probability(
                                              len(y), s["batch_size"], steps, cap)}


def train_shadows(model, x: np.ndarray, y: np.ndarray, s: dict, seed: int):
    """`shadows` copies of `model`, each on a random half of the pool, by one vmapped step: (logits [S, n, C], in [S, n])."""
    shadow_in = privacy.shadow_subsets(len(y), s["shadows"], seed=seed)
    subsets = [np.flatnonzero(row) for row in shadow_in]
    steps = s["epochs"] * (len(y) // 2 // s["batch_size"])

    def loss_fn(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, batch["x"]), batch["y"])

    ens = privacy.train_ensemble(lambda k: model.init(k, jnp.asarray(x[:1]))["params"], loss_fn,
                                 optax.adam(optax.cosine_decay_schedule(s["learning_rate"], steps)), {"x": x, "y": y},
                                 num_teachers=s["shadows"], batch_size=s["batch_size"], steps=steps, seed=seed,
                                 shards=subsets)
    apply_fn = lambda params, xb: model.apply({"params": params}, xb)  # noqa: E731
    logits = np.concatenate([np.asarray(privacy.ensemble_logits(apply_fn, ens.params, jnp.asarray(x[i:i + 1000])))
                             for i in range(0, len(x), 1000)], axis=1)
    return logits, shadow_in


def pate_student(model, student, x_members, y_members, x_public, s: dict, seed: int):
    """A PATE student: teachers on disjoint shards of the members, Confident GNMax labels on public images."""
    p = {"teacher_model": "mlp", "teacher_hidden": s["teacher_hidden"], "teacher_epochs": s["epochs"],
         "teacher_batch_size": s["batch_size"], "teacher_learning_rate": s["learning_rate"]}
    n_t = s["pate_teachers"]
    _, ens, _ = pr.train_pate_ensemble(types.SimpleNamespace(**p), n_t, x_members, y_members, int(y_members.max()) + 1, seed)
    apply_fn = lambda params, xb: model.apply({"params": params}, xb)  # noqa: E731
    queries = x_public[: s["pate_queries"]]
    votes, _ = pr.ensemble_votes_and_predictions(apply_fn, ens.params, queries, chunk=500)
    kw = dict(threshold=0.8 * n_t, sigma_threshold=0.6 * n_t, sigma=0.16 * n_t)
    labels, answered = privacy.confident_gnmax(jnp.asarray(votes), key=jax.random.PRNGKey(seed), **kw)
    labels, answered = np.asarray(labels), np.asarray(answered)
    params, _ = pr.fit_classifier("pate-student", student, queries[answered], labels[answered], epochs=s["epochs"],
                                  batch_size=s["batch_size"], learning_rate=s["learning_rate"], seed=seed)
    accounting = dict(kw, delta=s["delta"], answered=answered)
    return params, {"mechanism": "PATE (Confident GNMax)", "answered": int(answered.sum()),
                    "epsilon": privacy.pate_epsilon(votes, **accounting),
                    "epsilon_data_dependent": privacy.pate_epsilon(votes, **accounting, data_dependent=True)}


def run(s: dict, seed: int, echo=print) -> dict:
    t0 = time.perf_counter()
    x, y, x_public, y_public, k, name = load_pool(s, seed)
    is_member = np.random.default_rng([seed, 7]).permutation(len(y)) < len(y) // 2
    xm, ym = x[is_member], y[is_member]
    teacher_arch = pr.build_model("mlp", k, s["teacher_hidden"])
    student_arch = pr.build_model("mlp", k, s["student_hidden"])
    echo(f"membership: {name}, pool {len(y)} ({is_member.sum()} members), {s['shadows']} shadows per architecture")
    fit = dict(epochs=s["epochs"], batch_size=s["batch_size"], learning_rate=s["learning_rate"], seed=seed)
    teacher, _ = pr.fit_classifier("teacher", teacher_arch, xm, ym, **fit)
    labels_student, _ = pr.fit_classifier("labels-student", student_arch, xm, ym, **fit)
    soft = np.asarray(jax.nn.softmax(pr.predict(teacher_arch, teacher, xm, batch_size=500)))
    kd_student = fit_soft("kd-student", student_arch, xm, soft, s, seed)
    dp_model, dp_privacy = fit_dp(teacher_arch, xm, ym, s, seed)
    pate_params, pate_privacy = pate_student(teacher_arch, student_arch, xm, ym, x_public, s, seed)
    echo(f"membership: targets trained ({time.perf_counter() - t0:.0f} s)")
    shadows = {"teacher": train_shadows(teacher_arch, x, y, s, seed), "student": train_shadows(student_arch, x, y, s, seed)}
    echo(f"membership: shadows trained ({time.perf_counter() - t0:.0f} s)")
    targets = [("teacher (not private)", teacher_arch, teacher, "teacher", None),
               ("labels student", student_arch, labels_student, "student", None),
               ("kd student (T = 1)", student_arch, kd_student, "student", None),
               ("DP-SGD, teacher's architecture", teacher_arch, dp_model, "teacher", dp_privacy),
               ("PATE student", student_arch, pate_params, "student", pate_privacy)]
    rows = []
    for label, arch, params, family, priv in targets:
        logits = pr.predict(arch, params, x, batch_size=500)
        shadow_logits, shadow_in = shadows[family]
        attacks = privacy.membership_inference(logits, y, is_member, shadow_logits=shadow_logits, shadow_in=shadow_in)
        test_acc = pr.accuracy(pr.predict(arch, params, x_public, batch_size=500), y_public)
        rows.append({"model": label, "test_accuracy": test_acc,
                     "train_accuracy": pr.accuracy(logits[is_member], y[is_member]), **attacks,
                     "privacy": priv})
        echo(f"membership: {label}: test {test_acc:.4f}, loss AUC {attacks['loss']['auc']:.3f}, LiRA AUC "
             f"{attacks['lira']['auc']:.3f}, TPR@1%FPR {attacks['lira']['tpr_at_fpr_0.01']:.3f}")
    return {"dataset": name, "seed": seed, "settings": s, "rows": rows, "wall_s": time.perf_counter() - t0}


def markdown(res: dict) -> str:
    lines = [f"| model | test accuracy | train accuracy | loss attack AUC | LiRA AUC | LiRA TPR @ 0.1% FPR "
             f"| LiRA TPR @ 1% FPR | epsilon (delta {res['settings']['delta']:g}) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        p = r["privacy"]
        eps = "— (not private)" if p is None else (
            f"{p['epsilon']:.2f}" + (f" (data-dependent {p['epsilon_data_dependent']:.2f})"
                                     if "epsilon_data_dependent" in p else ""))
        lines.append(f"| {r['model']} | {r['test_accuracy']:.4f} | {r['train_accuracy']:.4f} | {r['loss']['auc']:.3f} "
                     f"| {r['lira']['auc']:.3f} | {r['lira']['tpr_at_fpr_0.001']:.3f} "
                     f"| {r['lira']['tpr_at_fpr_0.01']:.3f} | {eps} |")
    return "\n".join(lines)


def main(argv=None, echo=print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="digits, tiny budgets: seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    res = run(SETTINGS["smoke" if args.smoke else "full"], args.seed, echo)
    echo(markdown(res))
    echo(f"wall time {res['wall_s']:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
