"""Sparsity against accuracy and fidelity: kd students pruned by gradual magnitude pruning.

Command (the run recorded in experiments/RESULTS.md):
    python experiments/pruning.py --config experiments/configs/pruning.py --workdir runs/pruning

Options: --sparsities 0,0.5,0.8,0.9,0.95  --seeds 0,1,2  --students linear-kd,cnn-kd  --set KEY=VALUE
--smoke (1 seed, 1 epoch, sparsities 0 and 0.8, the linear student: runs in seconds).

For each seed the data are prepared and the teacher trained once; each student is then distilled
at every target sparsity (config `student.prune_sparsity`; Zhu & Gupta's cubic schedule prunes
every kernel between `prune_begin` and `prune_end` of training, 0 = no pruning). Prints one line
per trained student, then a table of mean ± std over seeds of achieved sparsity (fraction of zero
kernel weights), nonzero kernel weights, test accuracy, agreement with the teacher and
KL(teacher || student). For the linear-on-PCA student (logits = W^T z + b, W [components, classes])
it also reports the nonzero weights per class (mean over classes, and the min-max range) and how
many PCA components still carry a weight: a class score then reads as a sum of that many terms.
Writes the table to <workdir>/pruning.md and every number to <workdir>/pruning.json.
Exit status 2 with a one-line message on a bad option or config.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import compare_methods as cm  # noqa: E402 - shared helpers (also puts the repository on sys.path)
import numpy as np  # noqa: E402

from distill_jax.app import _audit, _fit, _prepare, _settings, cli, config

DEFAULT_CONFIG = os.path.join(HERE, "configs", "pruning.py")


def linear_readability(params) -> dict:
    """Nonzero weights per class and PCA components used by a linear student's kernel [components, classes]."""
    kernel = np.asarray(params["linear"]["kernel"])
    per_class = (kernel != 0).sum(axis=0)
    return {"nonzero_per_class": per_class.tolist(), "nonzero_per_class_mean": float(per_class.mean()),
            "nonzero_per_class_min": int(per_class.min()), "nonzero_per_class_max": int(per_class.max()),
            "components_used": int(np.any(kernel != 0, axis=1).sum()), "components": int(kernel.shape[0])}


def nonzero_kernel_weights(params) -> int:
    """Nonzero entries of the prunable leaves (kernels, ndim >= 2)."""
    import jax  # noqa: PLC0415

    return int(sum(np.count_nonzero(np.asarray(l)) for l in jax.tree_util.tree_leaves(params) if np.ndim(l) >= 2))


def configure(args):

    c = cli.load_config(args.config or DEFAULT_CONFIG)
    if args.smoke:
        c = config.apply_smoke(c)
        c.pruning.seeds, c.pruning.sparsities, c.students = "0", "0,0.8", "linear-kd"
    for assignment in args.set:  # after --smoke: explicit overrides win over the smoke budget
        cli.apply_override(c, assignment)
    if args.seeds:
        c.pruning.seeds = args.seeds
    if args.sparsities:
        c.pruning.sparsities = args.sparsities
    if args.students:
        c.students = args.students
    cm.parse_list(c.pruning.seeds, "seeds", int)
    for s in cm.parse_list(c.pruning.sparsities, "sparsities", float):
        if not 0 <= s < 1:
            raise ValueError(f"--sparsities={c.pruning.sparsities!r}: {s} is outside [0, 1)")
    config.validate(c)
    return c


def run(c, *, echo: Callable[[str], None] = print) -> dict:
    """Trains the teacher per seed and every student at every sparsity; returns {row: [metrics per seed]}."""
    from distill_jax import parallel

    mesh = parallel.make_mesh()
    seeds = cm.parse_list(c.pruning.seeds, "seeds", int)
    sparsities = cm.parse_list(c.pruning.sparsities, "sparsities", float)
    students = _settings.parse_students(c.students)
    rows: dict[str, list[dict]] = {"teacher": []}
    for seed in seeds:
        cs = cm.dataset_config(c, c.dataset, seed)
        prep = _prepare.prepare_data(cs)
        teacher = _fit.train_teacher(prep, cs, mesh, None, show_progress=False)
        rows["teacher"].append({"seed": seed, **_audit.model_metrics(teacher, None, prep),
                                "nonzero": nonzero_kernel_weights(teacher.variables["params"])})
        echo(f"seed {seed} teacher: accuracy {rows['teacher'][-1]['accuracy']:.4f} ({teacher.seconds:.1f} s)")
        for name, kind, method in students:
            for target in sparsities:
                cs.student.prune_sparsity = target
                s = _fit.train_student(name, kind, method, prep, teacher, cs, mesh, None, show_progress=False)
                params = s.variables["params"]
                m = {"seed": seed, "target_sparsity": target, **_audit.model_metrics(s, teacher, prep),
                     "nonzero": nonzero_kernel_weights(params)}
                if kind == "linear":
                    m.update(linear_readability(params))
                rows.setdefault(f"{name}@{target:g}", []).append(m)
                extra = (f" nonzero/class {m['nonzero_per_class_mean']:.1f} components {m['components_used']}"
                         if kind == "linear" else "")
                echo(f"seed {seed} {name} target {target:g}: sparsity {m['sparsity']:.3f} accuracy {m['accuracy']:.4f} "
                     f"agreement {m['agreement']:.4f} kl {m['kl']:.4f}{extra} ({s.seconds:.1f} s)")
    return rows


def summarize(rows: dict) -> dict:
    keys = ("sparsity", "nonzero", "accuracy", "agreement", "kl", "nonzero_per_class_mean", "components_used")
    out = {}
    for name, per_seed in rows.items():
        row = {"params": per_seed[0]["params"]}
        for k in keys:
            if k in per_seed[0]:
                row[k] = dict(zip(("mean", "std"), cm.mean_std([m[k] for m in per_seed])))
        if "nonzero_per_class_min" in per_seed[0]:
            row["nonzero_per_class_range"] = [min(m["nonzero_per_class_min"] for m in per_seed),
                                              max(m["nonzero_per_class_max"] for m in per_seed)]
            row["components"] = per_seed[0]["components"]
        out[name] = row
    return out


def markdown_table(dataset: str, summary: dict, n_seeds: int) -> str:
    pm = cm._pm  # noqa: SLF001 - same formatting as the comparison tables
    lines = [f"### {dataset} ({n_seeds} seeds, mean ± std)", "",
             "| model @ target sparsity | achieved sparsity | nonzero kernel weights | test accuracy | agreement | "
             "KL(teacher‖student) | nonzero weights per class (range) | PCA components used |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        agree = pm(row["agreement"]) if "agreement" in row else "—"
        kl = pm(row["kl"]) if "kl" in row else "—"
        per_class = used = "—"
        if "nonzero_per_class_mean" in row:
            lo, hi = row["nonzero_per_class_range"]
            per_class = f"{row['nonzero_per_class_mean']['mean']:.1f} ({lo}–{hi}) of {row['components']}"
            used = f"{row['components_used']['mean']:.1f} of {row['components']}"
        lines.append(f"| {name} | {pm(row['sparsity'], 3)} | {row['nonzero']['mean']:.0f} | {pm(row['accuracy'])} | "
                     f"{agree} | {kl} | {per_class} | {used} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, echo: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cm.add_common_options(parser, "runs/pruning")
    parser.add_argument("--config", help=f"config file with get_config() (default {DEFAULT_CONFIG})")
    parser.add_argument("--sparsities", help="comma-separated target sparsities in [0, 1) (default: the config's)")
    parser.add_argument("--students", help="comma-separated <kind>-<method> students (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, sparsities 0 and 0.8: seconds")
    args = parser.parse_args(argv)
    try:
        c = configure(args)
        cm.use_compilation_cache(args.compilation_cache)
        start = time.perf_counter()
        rows = run(c, echo=echo)
        summary = summarize(rows)
        n_seeds = len(rows["teacher"])
        table = markdown_table(c.dataset, summary, n_seeds)
        wall = round(time.perf_counter() - start, 1)
        payload = {"command": " ".join(["python", "experiments/pruning.py",
                                        *(argv if argv is not None else sys.argv[1:])]),
                   "date": time.strftime("%Y-%m-%d %H:%M %Z"), "environment": cm.environment(),
                   "config": c.to_dict(), "runs": rows, "summary": summary, "wall_seconds": wall}
        md_path, json_path = cm.write_outputs(args.workdir, "pruning", table + f"\nWall time: {wall:.0f} s.\n", payload)
        echo("\n" + table)
        echo(f"total wall time {wall:.0f} s; wrote {md_path} and {json_path}")
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"pruning: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
