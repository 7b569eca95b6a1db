"""The sweep behind the KD defaults of each student kind (`distill.KD_DEFAULTS`): T and alpha on validation splits.

For every dataset and seed:
  1. the training images are split, class-stratified, into a fit part and a validation part
     (`--validation-fraction`, 20 %); the test set is never read;
  2. the teacher of the dataset's config trains on the fit part only (so that on the validation images it is
     a teacher that has not seen them, as on the test set);
  3. each student kind trains on the fit part from labels (`<kind>-labels`) and by KD (`<kind>-kd`) at every
     (T, alpha) of the grid, with the same initialisation for every setting of a kind (the library derives
     it from the student's name), and is scored on the validation part: accuracy, agreement with the
     teacher's top-1 class, KL(teacher || student).

The datasets run with their configs' budgets: `digits` and `mnist5k` with the default config (SeedCNN
teacher, 15 epochs; students 40 epochs), `fashion_mnist` with experiments/configs/fashion_mnist.py limited
to its first `--fashion-images` training images (teacher and students 2 epochs).

    python experiments/kd_defaults_sweep.py --out experiments/results/kd_sweep.json
    python experiments/kd_defaults_sweep.py --datasets digits --seeds 0 --kinds tree --quick   # seconds

Prints, per kind, the mean over datasets and seeds of each setting's validation agreement, accuracy and KL
and its paired difference from the labels twin (mean and the number of runs in which KD was at least as
good), best agreement first; writes every run's row to `--out`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill_jax import metrics, parallel, train  # noqa: E402
from distill_jax.app import config as config_lib  # noqa: E402
from distill_jax.app._fit import train_student, train_teacher  # noqa: E402
from distill_jax.app._prepare import prepare_data, validation_split  # noqa: E402

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))


def dataset_config(name: str, *, fashion_images: int, seed: int, quick: bool):
    """The config a dataset's runs use (see the module docstring)."""
    if name == "fashion_mnist":
        spec = __import__("importlib.util").util.spec_from_file_location(
            "fashion_config", os.path.join(EXPERIMENTS, "configs", "fashion_mnist.py"))
        module = __import__("importlib.util").util.module_from_spec(spec)
        spec.loader.exec_module(module)
        c = module.get_config()
        c.train_limit = fashion_images
    else:
        c = config_lib.default_config()
        c.dataset = name
    c.seed = seed
    if quick:
        c = config_lib.apply_smoke(c)  # it returns a new config
    config_lib.validate(c)
    return c


def scores(student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray) -> dict:
    """Validation accuracy, agreement and KL, by the functions that score the test set."""
    s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    return {"accuracy": train.accuracy_from_logits(student_logits, labels),
            "agreement": float(metrics.agreement(s, t)), "kl": float(metrics.mean_kl(s, t))}


def run_one(dataset: str, seed: int, kinds: list[str], grid: list[tuple[float, float]], args) -> list[dict]:
    """Every row of one (dataset, seed): the teacher, then each kind's labels twin and kd settings."""
    c = dataset_config(dataset, fashion_images=args.fashion_images, seed=seed, quick=args.quick)
    mesh = parallel.make_mesh()
    held = validation_split(prepare_data(c), args.validation_fraction, seed)
    start = time.perf_counter()
    teacher = train_teacher(held, c, mesh, None, show_progress=False)
    base = {"dataset": dataset, "seed": seed, "fit_images": int(len(held.y_train)),
            "validation_images": int(len(held.y_test))}
    rows = [{**base, "kind": "teacher", "method": "labels", "seconds": round(time.perf_counter() - start, 1),
             "accuracy": train.accuracy_from_logits(teacher.test_logits, held.y_test)}]
    print(f"{dataset} seed {seed}: teacher {rows[0]['accuracy']:.4f} on {base['validation_images']} validation images",
          flush=True)
    for kind in kinds:
        for method, settings in [("labels", [(None, None)]), ("kd", grid)]:
            for temperature, alpha in settings:
                if temperature is not None:
                    c.method.temperature, c.method.alpha = temperature, alpha
                t0 = time.perf_counter()
                student = train_student(f"{kind}-{method}", kind, method, held, teacher, c, mesh, None,
                                        show_progress=False)
                row = {**base, "kind": kind, "method": method, "temperature": temperature, "alpha": alpha,
                       "seconds": round(time.perf_counter() - t0, 1),
                       **scores(student.test_logits, teacher.test_logits, held.y_test)}
                rows.append(row)
                print(f"  {kind}-{method} T={temperature} alpha={alpha}: acc {row['accuracy']:.4f} "
                      f"agr {row['agreement']:.4f} kl {row['kl']:.4f} ({row['seconds']} s)", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Per kind: each setting's mean validation scores and paired differences from the labels twin."""
    out = []
    twins = {(r["dataset"], r["seed"], r["kind"]): r for r in rows if r["method"] == "labels" and r["kind"] != "teacher"}
    for kind in dict.fromkeys(r["kind"] for r in rows if r["kind"] != "teacher"):
        out.append(f"\n### {kind}\n\n| setting | runs | agreement | accuracy | KL | Δ agreement vs labels (KD >= labels) "
                   f"| Δ accuracy | Δ KL (KD < labels) |\n|---|---|---|---|---|---|---|---|")
        groups: dict = {}
        for r in rows:
            if r["kind"] == kind:
                key = "labels" if r["method"] == "labels" else f"T={r['temperature']:g}, alpha={r['alpha']:g}"
                groups.setdefault(key, []).append(r)
        lines = []
        for key, rs in groups.items():
            twin = [twins[(r["dataset"], r["seed"], kind)] for r in rs]
            d_agr = [r["agreement"] - t["agreement"] for r, t in zip(rs, twin)]
            d_acc = [r["accuracy"] - t["accuracy"] for r, t in zip(rs, twin)]
            d_kl = [r["kl"] - t["kl"] for r, t in zip(rs, twin)]
            mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            lines.append((mean("agreement"), -mean("kl"),
                          f"| {key} | {len(rs)} | {mean('agreement'):.4f} | {mean('accuracy'):.4f} | {mean('kl'):.4f} | "
                          f"{np.mean(d_agr):+.4f} ({sum(d >= 0 for d in d_agr)}/{len(rs)}) | {np.mean(d_acc):+.4f} | "
                          f"{np.mean(d_kl):+.4f} ({sum(d < 0 for d in d_kl)}/{len(rs)}) |"))
        out += [line for *_, line in sorted(lines, reverse=True)]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k", "fashion_mnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", default=["tree", "linear", "cnn"])
    p.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.9])
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--fashion-images", type=int, default=20000)
    p.add_argument("--quick", action="store_true", help="the smoke budgets: checks the script in seconds")
    p.add_argument("--out", default=None, help="JSON file for every row (appended to when it exists)")
    args = p.parse_args(argv)
    grid = list(itertools.product(args.temperatures, args.alphas))
    rows = []
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)
    done = {(r["dataset"], r["seed"]) for r in rows}
    for dataset, seed in itertools.product(args.datasets, args.seeds):
        if (dataset, seed) in done:
            continue
        rows += run_one(dataset, seed, args.kinds, grid, args)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print(summary(rows))


if __name__ == "__main__":
    main()
