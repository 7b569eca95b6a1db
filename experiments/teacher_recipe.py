"""Choosing the Fashion-MNIST teacher's training recipe on a validation split (never the test set).

The training images are split, class-stratified, into a fit part (90 %) and a validation part (10 %);
each recipe trains the SeedCNN teacher of experiments/configs/fashion_mnist_experiment.py on the fit part and
is scored on the validation part. A recipe is a set of `teacher.*` overrides (epochs, augmentation,
schedule, weight decay, ensemble size). The chosen recipe then goes into the experiment's config, whose
three-seed run (experiments/fashion_mnist.py) measures it once on the test set.

    python experiments/teacher_recipe.py --recipes base aug12 --out experiments/results/teacher_recipe.json
    python experiments/teacher_recipe.py --recipes base --quick      # seconds: checks the script

Prints one line per recipe (validation accuracy, seconds); appends every row to `--out`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill_jax import parallel, train  # noqa: E402
from distill_jax.app import config as config_lib  # noqa: E402
from distill_jax.app._fit import make_host_predict_fn, train_teacher  # noqa: E402
from distill_jax.app._prepare import prepare_data, validation_split  # noqa: E402

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))

# name -> teacher.* overrides on top of the experiment config's teacher (3 epochs, batch 128, cosine, Adam 1e-3)
RECIPES = {
    "base": {},
    "plain12": {"epochs": 12},
    "aug12": {"epochs": 12, "augment_shift": 2, "augment_flip": True},
    "aug20": {"epochs": 20, "augment_shift": 2, "augment_flip": True},
    "flip12": {"epochs": 12, "augment_flip": True},
    "aug12-wd": {"epochs": 12, "augment_shift": 2, "augment_flip": True, "optimizer": "adamw",
                 "weight_decay": 5e-4},
    # two aug12 teachers with their own initialisations, distilled from the mean of their logits
    "aug12-ens2": {"epochs": 12, "augment_shift": 2, "augment_flip": True, "ensemble": 2},
}


def experiment_config(seed: int, quick: bool):
    """experiments/configs/fashion_mnist_experiment.py's config for `seed`."""
    spec = importlib.util.spec_from_file_location(
        "fashion_experiment", os.path.join(EXPERIMENTS, "configs", "fashion_mnist_experiment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.seed = seed
    if quick:
        c = config_lib.apply_smoke(c)  # it returns a new config
        c.train_limit = 600
    return c


def run_recipe(name: str, seed: int, args) -> dict:
    """Train the teacher with recipe `name` on the fit part; its validation accuracy and time."""
    c = experiment_config(seed, args.quick)
    for key, value in RECIPES[name].items():
        c.teacher[key] = value
    if args.quick:
        c.teacher.epochs = 1
    config_lib.validate(c)
    prep = prepare_data(c)
    held = validation_split(prep, args.validation_fraction, seed)
    mesh = parallel.make_mesh()
    start = time.perf_counter()
    teacher = train_teacher(held, c, mesh, None, show_progress=False)
    seconds = round(time.perf_counter() - start, 1)
    test = {}
    if args.report_test:  # read after training, never used to choose: the choice reads validation_accuracy
        logits = train.predict(make_host_predict_fn(teacher.model, prep, mesh), teacher.variables, prep.x_test,
                               batch_size=c.eval_batch_size, mesh=mesh)
        test = {"test_accuracy_of_fit_part_teacher": train.accuracy_from_logits(logits, prep.y_test)}
    return {**test, "recipe": name, "seed": seed, "overrides": RECIPES[name], "epochs": int(c.teacher.epochs),
            "fit_images": int(len(held.y_train)), "validation_images": int(len(held.y_test)),
            "validation_accuracy": train.accuracy_from_logits(teacher.test_logits, held.y_test),
            "seconds": seconds}


def main(argv=None, echo=print) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="the smoke budgets: checks the script in seconds")
    p.add_argument("--report-test", action="store_true",
                   help="also record the test accuracy of the teacher trained on the fit part (read once, after "
                        "training; the recipe is chosen by validation accuracy)")
    p.add_argument("--out", default=None, help="JSON file for every row (appended to when it exists)")
    args = p.parse_args(argv)
    rows = []
    for name in args.recipes:
        row = run_recipe(name, args.seed, args)
        rows.append(row)
        echo(f"{name}: validation accuracy {row['validation_accuracy']:.4f} "
             f"({row['epochs']} epochs, {row['seconds']} s)"
             + (f"; test accuracy {row['test_accuracy_of_fit_part_teacher']:.4f}" if args.report_test else ""))
        if args.out:
            previous = json.load(open(args.out)) if os.path.exists(args.out) else []
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(previous + [row], f, indent=1)
    return rows


if __name__ == "__main__":
    main()
