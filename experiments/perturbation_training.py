"""Teacher-labelled perturbations for the readable students: do they raise agreement and local fidelity?

For every dataset and seed (validation splits only; the test set is never read):
  1. the training images are split, class-stratified, into a fit part and a validation part (20 %);
  2. the teacher of the dataset's config (as in experiments/kd_defaults_sweep.py) trains on the fit part;
  3. each readable kind (soft tree, linear) trains on the fit part four ways: `labels`, `kd` (the kind's default
     T and alpha), `labels` on perturbed views (`method.perturb=all`: the augmentation alone, a control) and `kd`
     on perturbed views (the teacher labels each perturbed image: `data.perturb_some`, half of each batch);
  4. each is scored on the validation part: accuracy, agreement with the teacher's top-1 class, KL(teacher ||
     student), and local agreement: agreement with the teacher on one perturbed copy of each validation image per
     kind of `data.PERTURBATIONS` (`audit.local_agreement`, the audit's local fidelity).

    python experiments/perturbation_training.py --out experiments/results/perturbation_training.json
    python experiments/perturbation_training.py --datasets digits --seeds 0 --quick     # seconds

Prints per kind each variant's mean scores and its paired differences from plain `kd` (and in how many runs it
was at least as good); writes every row to `--out`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kd_defaults_sweep import dataset_config, scores  # noqa: E402

from distill_jax import audit, parallel, train  # noqa: E402
from distill_jax.app._fit import train_student, train_teacher  # noqa: E402
from distill_jax.app._prepare import prepare_data, validation_split  # noqa: E402

VARIANTS = {  # name -> (method, method.perturb)
    "labels": ("labels", ""), "kd": ("kd", ""), "labels+perturb": ("labels", "all"), "kd+perturb": ("kd", "all"),
}


def run_one(dataset: str, seed: int, kinds: list[str], args) -> list[dict]:
    """The teacher's row, then every (kind, variant) row of one (dataset, seed)."""
    c = dataset_config(dataset, fashion_images=args.fashion_images, seed=seed, quick=args.quick)
    mesh = parallel.make_mesh()
    held = validation_split(prepare_data(c), args.validation_fraction, seed)
    teacher = train_teacher(held, c, mesh, None, show_progress=False)
    base = {"dataset": dataset, "seed": seed, "fit_images": int(len(held.y_train)),
            "validation_images": int(len(held.y_test))}
    rows = [{**base, "kind": "teacher", "variant": "labels",
             "accuracy": train.accuracy_from_logits(teacher.test_logits, held.y_test)}]
    print(f"{dataset} seed {seed}: teacher {rows[0]['accuracy']:.4f}", flush=True)
    views = audit.perturbed_views(np.asarray(held.inputs(held.x_test)), key=jax.random.PRNGKey(1000 + seed))
    teacher_queries = audit.queries_of(teacher.model, teacher.variables)
    teacher_views = {kind: teacher_queries.logits(v) for kind, v in views.items()}
    for kind, (variant, (method, perturb)) in itertools.product(kinds, VARIANTS.items()):
        c.method.perturb = perturb
        t0 = time.perf_counter()
        student = train_student(f"{kind}-{method}", kind, method, held, teacher, c, mesh, None, show_progress=False)
        local = audit.local_agreement(student.model, student.variables, views, teacher_views)
        row = {**base, "kind": kind, "variant": variant, "seconds": round(time.perf_counter() - t0, 1),
               **scores(student.test_logits, teacher.test_logits, held.y_test), "local_agreement": local["mean"],
               "local": local}
        rows.append(row)
        print(f"  {kind} {variant}: acc {row['accuracy']:.4f} agr {row['agreement']:.4f} kl {row['kl']:.4f} "
              f"local {local['mean']:.4f} ({row['seconds']} s)", flush=True)
    c.method.perturb = ""
    return rows


def summary(rows: list[dict]) -> str:
    """Per kind: each variant's mean validation scores and paired differences from plain kd."""
    out = []
    ref = {(r["dataset"], r["seed"], r["kind"]): r for r in rows if r["variant"] == "kd"}
    for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"] != "teacher"):
        out.append(f"\n### {kind}\n\n| variant | runs | accuracy | agreement | KL | local agreement | "
                   f"Δ agreement vs kd (>= kd) | Δ local agreement vs kd (>= kd) | Δ accuracy vs kd |\n"
                   f"|---|---|---|---|---|---|---|---|---|")
        for variant in VARIANTS:
            rs = [r for r in rows if r["kind"] == kind and r["variant"] == variant]
            if not rs:
                continue
            twin = [ref[(r["dataset"], r["seed"], kind)] for r in rs]
            diff = lambda k: [r[k] - t[k] for r, t in zip(rs, twin)]  # noqa: E731
            mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            d_agr, d_loc, d_acc = diff("agreement"), diff("local_agreement"), diff("accuracy")
            out.append(f"| {variant} | {len(rs)} | {mean('accuracy'):.4f} | {mean('agreement'):.4f} | {mean('kl'):.4f} "
                       f"| {mean('local_agreement'):.4f} | {np.mean(d_agr):+.4f} ({sum(d >= 0 for d in d_agr)}/{len(rs)}) "
                       f"| {np.mean(d_loc):+.4f} ({sum(d >= 0 for d in d_loc)}/{len(rs)}) | {np.mean(d_acc):+.4f} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=["tree", "linear"])
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--fashion-images", type=int, default=20000)
    p.add_argument("--quick", action="store_true", help="the smoke budgets: checks the script in seconds")
    p.add_argument("--out", default=None, help="JSON file for every row (runs already in it are skipped)")
    args = p.parse_args(argv)
    rows = json.load(open(args.out)) if args.out and os.path.exists(args.out) else []
    done = {(r["dataset"], r["seed"]) for r in rows}
    for dataset, seed in itertools.product(args.datasets, args.seeds):
        if (dataset, seed) in done:
            continue
        rows += run_one(dataset, seed, args.kinds, args)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
