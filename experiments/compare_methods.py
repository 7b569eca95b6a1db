"""Compare distillation methods: every student kind trained from labels and by each method, over seeds.

Command (the full run recorded in experiments/RESULTS.md):
    python experiments/compare_methods.py --config experiments/configs/compare_methods.py \
        --workdir runs/compare_methods

Options: --datasets digits,mnist5k  --seeds 0,1,2  --students cnn-labels,cnn-kd,...  --set KEY=VALUE
--smoke (digits, seeds 0,1, 1 epoch, students cnn/tree x labels/kd: runs in seconds).

For each dataset and seed the data are prepared once (split, standardization and PCA depend on
the seed), the teacher is trained once, and every student `<kind>-<method>` is trained from it.
Prints one line per trained model, then per dataset:
  - a table of mean ± std over seeds of test accuracy, agreement with the teacher (top-1 fidelity)
    and KL(teacher || student) on the test split, with parameter count and training seconds;
  - a paired table: for every distilled student, (distilled - label-trained student of the same
    kind) computed per seed (same split, same teacher), its mean ± std, how many seeds favour the
    distilled student, and a paired t statistic with its two-sided p-value (df = seeds - 1).
Writes the same tables to <workdir>/compare_methods.md and every number to
<workdir>/compare_methods.json. Exit status 2 with a one-line message on a bad option or config.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout: distill_jax need not be installed
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

METRICS = ("accuracy", "agreement", "kl")
# for each metric: +1 when larger is better, -1 when smaller is better
BETTER = {"accuracy": 1, "agreement": 1, "kl": -1}
SMOKE_STUDENTS = "cnn-labels,cnn-kd,tree-labels,tree-kd"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "compare_methods.py")


# --------------------------------------------------------------------------- statistics


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired(distilled, baseline, *, better: int = 1) -> dict:
    """Paired comparison of per-seed values: d_i = distilled_i - baseline_i.

    t = mean(d) / (std(d, ddof=1) / sqrt(n)), two-sided p from Student's t with n - 1 degrees of
    freedom (None when n < 2 or every d_i is equal). `wins` counts seeds where the distilled value
    is better (larger when better=+1, smaller when better=-1).
    """
    a, b = np.asarray(distilled, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired: distilled and baseline need the same 1-d shape; got {a.shape} and {b.shape}")
    d = a - b
    n = len(d)
    mean, std = mean_std(d)
    t = p = None
    if n >= 2 and std > 1e-12 * max(1.0, abs(mean)):  # equal differences up to rounding: no t
        from scipy import stats  # noqa: PLC0415 - scipy comes with scikit-learn

        t = mean / (std / math.sqrt(n))
        p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return {"diff": d.tolist(), "mean": mean, "std": std, "wins": int(np.sum(better * d > 0)), "n": n,
            "t": t, "p": p}


def parse_list(text: str, what: str, cast: Callable = str) -> list:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise ValueError(f"--{what} is empty; give a comma-separated list")
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise ValueError(f"--{what}={text!r}: every item must be {cast.__name__}") from None


# --------------------------------------------------------------------------- config


def dataset_config(c, dataset: str, seed: int):
    """A copy of `c` for one dataset and seed, with that dataset's epoch budget."""
    import ml_collections  # noqa: PLC0415

    out = ml_collections.ConfigDict(c.to_dict())
    out.dataset, out.seed = dataset, seed
    budgets = c.get("compare", {}).get("budgets", {})
    if dataset in budgets and not c.get("smoke", False):
        out.teacher.epochs = budgets[dataset]["teacher_epochs"]
        out.student.epochs = budgets[dataset]["student_epochs"]
    return out


def configure(args):
    """The config a command line asks for (config file, --smoke, then --set and the list options), validated."""
    from distill_jax import cli, config as config_lib  # noqa: PLC0415

    c = cli.load_config(args.config or DEFAULT_CONFIG)
    if args.smoke:
        c = config_lib.apply_smoke(c)
        c.smoke = True
        c.compare.datasets, c.compare.seeds, c.students = "digits", "0,1", SMOKE_STUDENTS
    for assignment in args.set:  # after --smoke: explicit overrides win over the smoke budget
        cli.apply_override(c, assignment)
    if args.datasets:
        c.compare.datasets = args.datasets
    if args.seeds:
        c.compare.seeds = args.seeds
    if args.students:
        c.students = args.students
    parse_list(c.compare.datasets, "datasets")
    parse_list(c.compare.seeds, "seeds", int)
    config_lib.validate(c)
    return c


# --------------------------------------------------------------------------- the experiment


def run_dataset(c, dataset: str, seeds: list[int], *, echo: Callable[[str], None] = print) -> dict:
    """Trains teacher and students for every seed; returns {"teacher": [...], "<student>": [metrics per seed]}."""
    from distill_jax import config as config_lib, parallel, pipeline  # noqa: PLC0415

    mesh = parallel.make_mesh()
    students = config_lib.parse_students(c.students)
    runs: dict[str, list[dict]] = {"teacher": []}
    for seed in seeds:
        cs = dataset_config(c, dataset, seed)
        config_lib.validate(cs)
        prep = pipeline.prepare_data(cs)
        teacher = pipeline.train_teacher(prep, cs, mesh, None, show_progress=False)
        runs["teacher"].append({"seed": seed, **pipeline.model_metrics(teacher, None, prep)})
        echo(f"{dataset} seed {seed} teacher: accuracy {runs['teacher'][-1]['accuracy']:.4f} ({teacher.seconds:.1f} s)")
        for name, kind, method in students:
            s = pipeline.train_student(name, kind, method, prep, teacher, cs, mesh, None, show_progress=False)
            m = {"seed": seed, **pipeline.model_metrics(s, teacher, prep)}
            runs.setdefault(name, []).append(m)
            echo(f"{dataset} seed {seed} {name}: accuracy {m['accuracy']:.4f} agreement {m['agreement']:.4f} "
                 f"kl {m['kl']:.4f} ({s.seconds:.1f} s)")
    return runs


def summarize(runs: dict) -> dict:
    """Mean/std of every metric per model, and paired (distilled - labels) comparisons per kind."""
    summary = {}
    for name, per_seed in runs.items():
        row = {"params": per_seed[0]["params"], "train_seconds": mean_std([m["train_seconds"] for m in per_seed])[0]}
        for metric in METRICS:
            if metric in per_seed[0]:
                row[metric] = dict(zip(("mean", "std"), mean_std([m[metric] for m in per_seed])))
        summary[name] = row
    comparisons = {}
    for name, per_seed in runs.items():
        kind, _, method = name.partition("-")
        base = runs.get(f"{kind}-labels")
        if name == "teacher" or method == "labels" or base is None:
            continue
        comparisons[name] = {"baseline": f"{kind}-labels", **{
            metric: paired([m[metric] for m in per_seed], [m[metric] for m in base], better=BETTER[metric])
            for metric in METRICS}}
    return {"summary": summary, "paired": comparisons}


def _pm(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _signed(stat: dict) -> str:
    p = "n/a" if stat["p"] is None else f"{stat['p']:.3f}"
    return f"{stat['mean']:+.4f} ± {stat['std']:.4f} ({stat['wins']}/{stat['n']}, p={p})"


def markdown_tables(dataset: str, result: dict, n_seeds: int) -> str:
    """The summary and paired tables of one dataset as markdown."""
    lines = [f"### {dataset} ({n_seeds} seeds, mean ± std)", "",
             "| model | params | test accuracy | agreement | KL(teacher‖student) | train s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in result["summary"].items():
        agree = _pm(row["agreement"]) if "agreement" in row else "—"
        kl = _pm(row["kl"]) if "kl" in row else "—"
        lines.append(f"| {name} | {row['params']} | {_pm(row['accuracy'])} | {agree} | {kl} | "
                     f"{row['train_seconds']:.1f} |")
    if result["paired"]:
        lines += ["", f"Paired per seed, distilled minus the label-trained student of the same kind: mean ± std "
                      f"(seeds where the distilled student is better / seeds, paired t-test p, df={n_seeds - 1}).", "",
                  "| student | vs | Δ agreement | Δ KL (lower is better) | Δ test accuracy |",
                  "|---|---|---:|---:|---:|"]
        for name, cmp in result["paired"].items():
            lines.append(f"| {name} | {cmp['baseline']} | {_signed(cmp['agreement'])} | {_signed(cmp['kl'])} | "
                         f"{_signed(cmp['accuracy'])} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """Machine and versions the run used (CPU model name as `lscpu` prints it)."""
    from distill_jax import pipeline  # noqa: PLC0415

    return {"cpu": pipeline.cpu_model(), **pipeline.versions()}


def write_outputs(workdir: str, stem: str, markdown: str, payload: dict) -> tuple[str, str]:
    os.makedirs(workdir, exist_ok=True)
    md_path, json_path = os.path.join(workdir, f"{stem}.md"), os.path.join(workdir, f"{stem}.json")
    with open(md_path, "w") as f:
        f.write(markdown)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    return md_path, json_path


def use_compilation_cache(path: str | None) -> None:
    """Keeps compiled steps on disk: later seeds (same shapes, same programs) skip XLA compilation."""
    if not path:
        return
    from distill_jax import cli  # noqa: PLC0415

    cli.enable_compilation_cache(path)


def add_common_options(parser: argparse.ArgumentParser, default_workdir: str) -> None:
    parser.add_argument("--workdir", default=default_workdir, help="where the .md and .json tables go")
    parser.add_argument("--seeds", help="comma-separated integer seeds (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--compilation-cache", default=os.path.join(default_workdir, "jax_cache"),
                        help="directory of JAX's persistent compilation cache ('' to disable)")


def main(argv: list[str] | None = None, *, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"config file with get_config() (default {DEFAULT_CONFIG})")
    add_common_options(parser, "runs/compare_methods")
    parser.add_argument("--datasets", help="comma-separated dataset specs (default: the config's compare.datasets)")
    parser.add_argument("--students", help="comma-separated <kind>-<method> students (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="digits, 2 seeds, 1 epoch, 4 students: seconds")
    args = parser.parse_args(argv)
    try:
        c = configure(args)
        use_compilation_cache(args.compilation_cache)
        start = time.perf_counter()
        datasets, seeds = parse_list(c.compare.datasets, "datasets"), parse_list(c.compare.seeds, "seeds", int)
        payload = {"command": " ".join(["python", "experiments/compare_methods.py", *(argv if argv is not None
                                                                                      else sys.argv[1:])]),
                   "date": time.strftime("%Y-%m-%d %H:%M %Z"), "environment": environment(),
                   "config": c.to_dict(), "datasets": {}}
        markdown = []
        for dataset in datasets:
            t0 = time.perf_counter()
            runs = run_dataset(c, dataset, seeds, echo=echo)
            result = {"runs": runs, **summarize(runs), "wall_seconds": round(time.perf_counter() - t0, 1)}
            payload["datasets"][dataset] = result
            table = markdown_tables(dataset, result, len(seeds))
            markdown.append(table + f"\nWall time for {dataset}: {result['wall_seconds']:.0f} s.\n")
            echo("\n" + table)
        payload["wall_seconds"] = round(time.perf_counter() - start, 1)
        md_path, json_path = write_outputs(args.workdir, "compare_methods", "\n".join(markdown), payload)
        echo(f"total wall time {payload['wall_seconds']:.0f} s; wrote {md_path} and {json_path}")
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"compare_methods: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
