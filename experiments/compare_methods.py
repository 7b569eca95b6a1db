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
import copy
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

from distill_jax import audit
from distill_jax.app import _audit, _fit, _metadata, _prepare, _settings, cli, config

METRICS = ("accuracy", "agreement", "kl", "ig_spearman", "ig_top10", "deletion_auc")
# for each metric: +1 when larger is better, -1 when smaller is better
BETTER = {"accuracy": 1, "agreement": 1, "kl": -1, "ig_spearman": 1, "ig_top10": 1, "deletion_auc": -1}
COLUMNS = (("accuracy", "test accuracy"), ("agreement", "agreement"), ("kl", "KL(teacher‖model)"),
           ("ig_spearman", "IG ρ vs teacher"), ("deletion_auc", "IG deletion AUC"))
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
    out = copy.deepcopy(c)  # not ConfigDict(c.to_dict()): that drops the FieldReferences ("default" -> 1.0)
    out.dataset, out.seed = dataset, seed
    budgets = c.get("compare", {}).get("budgets", {})
    if dataset in budgets and not c.get("smoke", False):
        out.teacher.epochs = budgets[dataset]["teacher_epochs"]
        out.student.epochs = budgets[dataset]["student_epochs"]
    return out


def configure(args):
    """The config a command line asks for (config file, --smoke, then --set and the list options), validated."""

    c = cli.load_config(args.config or args.default_config)
    if args.smoke:  # the config's compare.smoke settings, or digits, seeds 0 and 1, SMOKE_STUDENTS
        smoke = c.compare.get("smoke", {})
        c = config.apply_smoke(c)
        c.smoke = True
        c.compare.datasets = smoke.get("datasets", "digits")
        c.compare.seeds = smoke.get("seeds", "0,1")
        c.students = smoke.get("students", SMOKE_STUDENTS)
        c.compare.baselines = smoke.get("baselines", "")
        c.train_limit = smoke.get("train_limit", c.train_limit)
        c.compare.explain_images = smoke.get("explain_images", 8)
    for assignment in args.set:  # after --smoke: explicit overrides win over the smoke budget
        cli.apply_override(c, assignment)
    if args.datasets:
        c.compare.datasets = args.datasets
    if args.seeds:
        c.compare.seeds = args.seeds
    if args.students:
        c.students = args.students
    parse_list(c.compare.datasets, "datasets")
    parse_pairs(c.compare.get("pairs", ""))
    method_overrides(c)  # checks the form of every item
    import _baselines  # noqa: PLC0415 - next to this script

    for name in baseline_names(c):
        if name not in _baselines.BASELINES:
            raise ValueError(f"compare.baselines: {name!r} is not known; use any of {list(_baselines.BASELINES)}")
    parse_list(c.compare.seeds, "seeds", int)
    config.validate(c)
    return c


# --------------------------------------------------------------------------- the experiment


def baseline_names(c) -> list[str]:
    """The scikit-learn baselines `compare.baselines` lists (none when it is empty or absent)."""
    text = c.get("compare", {}).get("baselines", "")
    return parse_list(text, "baselines") if text else []


def method_overrides(c, *targets: str) -> list[str]:
    """The `KEY=VALUE` assignments `compare.method_overrides` gives to any of `targets`, in their order.

    Items read `<method or student>:<key>=<value>`: "fm:method.mixup=1" applies to every `*-fm`
    student, "cnn-fm:method.augment_shift=2" to that student only.
    """
    out = []
    for item in c.get("compare", {}).get("method_overrides", ()):
        target, sep, assignment = str(item).partition(":")
        if not sep or "=" not in assignment:
            raise ValueError(f"compare.method_overrides item {item!r} must be '<method or student>:<key>=<value>'")
        if target in targets:
            out.append(assignment)
    return out


def student_config(cs, name: str, method: str):
    """`cs` with the `compare.method_overrides` of student `name` (`<kind>-<method>`) applied; `cs` if none."""

    assignments = method_overrides(cs, method, name)
    if not assignments:
        return cs
    out = copy.deepcopy(cs)  # keeps the FieldReferences that let a setting change type ("default" -> 0.3)
    for assignment in assignments:
        cli.apply_override(out, assignment)
    config.validate(out)
    return out


def explanation_scores(t, x, target, teacher_maps, c) -> tuple[dict, dict]:
    """Integrated gradients of `t` on the sample `x`: its deletion AUC and agreement with the teacher's maps.

    Returns ({deletion_auc, ig_spearman, ig_top10}, maps); ig_* are absent for the teacher
    (`teacher_maps` None). Spearman and top-10 % overlap compare |IG| summed over channels
    (`audit.faithfulness`).
    """
    import jax  # noqa: PLC0415


    e = c.explain
    maps = audit.attribution_maps(t.model, t.variables, x, target, methods=("integrated_gradients",),
                                  ig_steps=e.ig_steps, smoothgrad_samples=1, key=jax.random.PRNGKey(c.seed))
    scores, _ = audit.faithfulness_scores(t.model, t.variables, x, target, maps, teacher_maps, steps=e.faithfulness_steps)
    ig = scores["integrated_gradients"]
    out = {"deletion_auc": ig["deletion_auc"]}
    if teacher_maps is not None:
        out.update(ig_spearman=ig["spearman_vs_teacher"], ig_top10=ig["top10_overlap_vs_teacher"])
    return out, maps


def baseline_metrics(name: str, prep, teacher, c, mesh, x, target, teacher_maps, flat) -> dict:
    """Metrics of one scikit-learn baseline (`_baselines.BASELINES`) on the seed's split.

    `flat`: (train, test) flattened model inputs, `_baselines.flat_split(prep)`, shared by the seed's baselines.
    """
    import _baselines  # noqa: PLC0415 - next to this script


    if name.startswith("sk-tree"):
        return _baselines.fit_tree(name, prep, *flat, teacher.test_logits, seed=c.seed)
    fitted, fit_info = _baselines.fit_logreg(name, prep, flat[0], seed=c.seed, mesh=mesh,
                                             eval_batch_size=c.eval_batch_size)
    m = {**_audit.model_metrics(fitted, teacher, prep), "method": "sklearn", **fit_info}
    m.update(explanation_scores(fitted, x, target, teacher_maps, c)[0])
    return m


def _seed_file(workdir: str | None, dataset: str, seed: int) -> str | None:
    if not workdir:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset)
    return os.path.join(workdir, "seeds", f"{safe}-seed{seed}.json")


def run_seed(c, dataset: str, seed: int, mesh, *, echo: Callable[[str], None] = print) -> dict:
    """One matched block: data prepared, teacher trained, every student and baseline trained and measured.

    Returns {"teacher": metrics, "<model>": metrics, ...} (each with "seed").
    """
    import jax.numpy as jnp  # noqa: PLC0415


    cs = dataset_config(c, dataset, seed)
    config.validate(cs)
    prep = _prepare.prepare_data(cs)
    teacher = _fit.train_teacher(prep, cs, mesh, None, show_progress=False)
    x, target = _audit.test_sample(prep, cs.compare.get("explain_images", 64), seed=seed)
    scores, teacher_maps = explanation_scores(teacher, x, target, None, cs)
    out = {"teacher": {"seed": seed, **_audit.model_metrics(teacher, None, prep), **scores}}
    echo(f"{dataset} seed {seed} teacher: accuracy {out['teacher']['accuracy']:.4f} ({teacher.seconds:.1f} s)")
    teacher_maps = {k: jnp.asarray(v) for k, v in teacher_maps.items()}
    for name, kind, method in _settings.parse_students(cs.students):
        ck = student_config(cs, name, method)
        s = _fit.train_student(name, kind, method, prep, teacher, ck, mesh, None, show_progress=False)
        m = {"seed": seed, **_audit.model_metrics(s, teacher, prep), **explanation_scores(s, x, target,
                                                                                             teacher_maps, ck)[0]}
        out[name] = m
        echo(f"{dataset} seed {seed} {name}: accuracy {m['accuracy']:.4f} agreement {m['agreement']:.4f} "
             f"kl {m['kl']:.4f} ig_spearman {m['ig_spearman']:.3f} ({s.seconds:.1f} s)")
    names = baseline_names(cs)
    if names:
        import _baselines  # noqa: PLC0415 - next to this script

        flat = _baselines.flat_split(prep)
    for name in names:
        m = {"seed": seed, **baseline_metrics(name, prep, teacher, cs, mesh, x, target, teacher_maps, flat)}
        out[name] = m
        echo(f"{dataset} seed {seed} {name}: accuracy {m['accuracy']:.4f} agreement {m['agreement']:.4f} "
             f"kl {m['kl']:.4f} ({m['train_seconds']:.1f} s)")
    return out


def _same_run(config: dict, saved: dict) -> bool:
    """Whether a saved seed was trained with `config`; which seeds and datasets the run lists, and the --smoke
    settings of a run that is not a smoke run, do not matter."""
    def trimmed(d: dict) -> dict:
        d = json.loads(json.dumps(d, default=str))
        ignored = ("seeds", "datasets") + (() if d.get("smoke") else ("smoke",))
        compare = {k: v for k, v in d.get("compare", {}).items() if k not in ignored}
        return {**d, "compare": compare}

    return trimmed(config) == trimmed(saved)


def run_dataset(c, dataset: str, seeds: list[int], *, workdir: str | None = None,
                echo: Callable[[str], None] = print) -> dict:
    """Every seed of one dataset; returns {"teacher": [...], "<model>": [metrics per seed]}.

    With `workdir`, each finished seed is kept in `<workdir>/seeds/<dataset>-seed<k>.json` and a
    later run with the same models and config reuses it: an interrupted run loses at most one seed.
    """
    from distill_jax import parallel

    mesh = parallel.make_mesh()
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        path = _seed_file(workdir, dataset, seed)
        fingerprint = dataset_config(c, dataset, seed).to_dict()
        block = None
        if path and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if _same_run(fingerprint, saved.get("config") or {}):
                block = saved["models"]
                echo(f"{dataset} seed {seed}: reusing {path}")
        if block is None:
            block = run_seed(c, dataset, seed, mesh, echo=echo)
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump({"config": fingerprint, "models": block}, f, indent=1, default=str)
        for name, metrics in block.items():
            runs.setdefault(name, []).append(metrics)
    return runs


def summarize(runs: dict, pairs: list[tuple[str, str]] = ()) -> dict:
    """Mean/std of every metric per model, and paired comparisons: each distilled student against the
    label-trained student of its kind, then the explicit `pairs` (model, baseline)."""
    summary = {}
    for name, per_seed in runs.items():
        row = {"params": per_seed[0]["params"], "train_seconds": mean_std([m["train_seconds"] for m in per_seed])[0],
               "train_images": per_seed[0].get("train_images", "")}
        for metric in METRICS:
            if per_seed[0].get(metric) is not None:
                row[metric] = dict(zip(("mean", "std"), mean_std([m[metric] for m in per_seed])))
        summary[name] = row
    wanted = []
    for name in runs:
        kind, _, method = name.partition("-")
        if name != "teacher" and method != "labels" and f"{kind}-labels" in runs:
            wanted.append((name, f"{kind}-labels"))
    wanted += [p for p in pairs if p[0] in runs and p[1] in runs and p not in wanted]
    comparisons = {}
    for name, base in wanted:
        a, b = runs[name], runs[base]
        comparisons[f"{name} vs {base}"] = {"model": name, "baseline": base, **{
            metric: paired([m[metric] for m in a], [m[metric] for m in b], better=BETTER[metric])
            for metric in METRICS if a[0].get(metric) is not None and b[0].get(metric) is not None}}
    return {"summary": summary, "paired": comparisons}


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """`"tree-fm:sk-tree-d8,linear-fm:sk-logreg-pixels"` -> [("tree-fm", "sk-tree-d8"), ...]."""
    out = []
    for item in parse_list(text, "compare.pairs") if text else []:
        model, sep, base = item.partition(":")
        if not sep or not model or not base:
            raise ValueError(f"compare.pairs item {item!r} must be '<model>:<baseline>'")
        out.append((model, base))
    return out


def _pm(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _signed(stat: dict) -> str:
    p = "n/a" if stat["p"] is None else f"{stat['p']:.3f}"
    return f"{stat['mean']:+.4f} ± {stat['std']:.4f} ({stat['wins']}/{stat['n']}, p={p})"


def markdown_tables(dataset: str, result: dict, n_seeds: int) -> str:
    """The summary and paired tables of one dataset as markdown."""
    head = " | ".join(title for _, title in COLUMNS)
    lines = [f"### {dataset} ({n_seeds} seeds, mean ± std)", "",
             f"| model | params | train images | {head} | train s |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for name, row in result["summary"].items():
        cells = " | ".join(_pm(row[m]) if m in row else "—" for m, _ in COLUMNS)
        lines.append(f"| {name} | {row['params']} | {row.get('train_images', '')} | {cells} | "
                     f"{row['train_seconds']:.1f} |")
    if result["paired"]:
        lines += ["", f"Paired per seed, model minus baseline (same split, same teacher): mean ± std "
                      f"(seeds where the model is better / seeds, paired t-test p, df={n_seeds - 1}).", "",
                  "| model | vs | " + " | ".join(f"Δ {title}" for _, title in COLUMNS) + " |",
                  "|---|---|" + "---:|" * len(COLUMNS)]
        for cmp in result["paired"].values():
            cells = " | ".join(_signed(cmp[m]) if m in cmp else "—" for m, _ in COLUMNS)
            lines.append(f"| {cmp['model']} | {cmp['baseline']} | {cells} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """Machine and versions the run used (CPU model name as `lscpu` prints it)."""

    return {"cpu": _metadata.cpu_model(), **_metadata.versions()}


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

    cli.enable_compilation_cache(path)


def add_common_options(parser: argparse.ArgumentParser, default_workdir: str) -> None:
    parser.add_argument("--workdir", default=default_workdir, help="where the .md and .json tables go")
    parser.add_argument("--seeds", help="comma-separated integer seeds (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--compilation-cache", default=os.path.join(default_workdir, "jax_cache"),
                        help="directory of JAX's persistent compilation cache ('' to disable)")


def main(argv: list[str] | None = None, *, echo: Callable[[str], None] = print, default_config: str = DEFAULT_CONFIG,
         name: str = "compare_methods", description: str | None = None) -> int:
    """The command line of this protocol; experiments/fashion_mnist.py calls it with its own config and name."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py",
                                     description=description or __doc__.splitlines()[0])
    parser.set_defaults(default_config=default_config)
    parser.add_argument("--config", help=f"config file with get_config() (default {default_config})")
    add_common_options(parser, f"runs/{name}")
    parser.add_argument("--datasets", help="comma-separated dataset specs (default: the config's compare.datasets)")
    parser.add_argument("--students", help="comma-separated <kind>-<method> students (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="the config's compare.smoke (default: digits, 2 seeds, "
                                                             "1 epoch, 4 students): seconds")
    args = parser.parse_args(argv)
    try:
        c = configure(args)
        use_compilation_cache(args.compilation_cache)
        start = time.perf_counter()
        datasets, seeds = parse_list(c.compare.datasets, "datasets"), parse_list(c.compare.seeds, "seeds", int)
        payload = {"command": " ".join(["python", f"experiments/{name}.py", *(argv if argv is not None
                                                                            else sys.argv[1:])]),
                   "date": time.strftime("%Y-%m-%d %H:%M %Z"), "environment": environment(),
                   "config": c.to_dict(), "datasets": {}}
        markdown = []
        for dataset in datasets:
            t0 = time.perf_counter()
            runs = run_dataset(c, dataset, seeds, workdir=args.workdir, echo=echo)
            result = {"runs": runs, **summarize(runs, parse_pairs(c.compare.get("pairs", ""))),
                      "wall_seconds": round(time.perf_counter() - t0, 1)}
            payload["datasets"][dataset] = result
            table = markdown_tables(dataset, result, len(seeds))
            markdown.append(table + f"\nWall time for {dataset}: {result['wall_seconds']:.0f} s.\n")
            echo("\n" + table)
        payload["wall_seconds"] = round(time.perf_counter() - start, 1)
        md_path, json_path = write_outputs(args.workdir, name, "\n".join(markdown), payload)
        echo(f"total wall time {payload['wall_seconds']:.0f} s; wrote {md_path} and {json_path}")
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"{name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
