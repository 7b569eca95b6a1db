"""The main job, end to end: load, preprocess, PCA, teacher, students, explanations, evaluation, report.

`run(config, workdir)` is what `distill-jax run` calls. Each stage is a small function of
plain values, so experiments can reuse the ones they need (`prepare_data`,
`train_teacher`, `train_student`, `explain_models`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections

from distill_jax import checkpoint, parallel
from distill_jax.app import _metadata
from distill_jax.app._audit import audit_models, distillation_comparisons, membership_attack, model_metrics
from distill_jax.app._fit import Trained, make_host_predict_fn, privacy_summary, train_student, train_teacher
from distill_jax.app._metadata import peak_rss_mb, versions
from distill_jax.app._prepare import Prepared, prepare_data
from distill_jax.app._settings import build_model, parse_students
from distill_jax.app.config import check_choices, validate
from distill_jax.audit.verdict import decide
from distill_jax.models._util import with_compute_dtype
from distill_jax.train._step import accuracy_from_logits, predict

__all__ = [
    "run",
    "explain_and_report",
    "load_trained",
    "explain_from_checkpoints",
]

def run(c, workdir: str, *, show_progress: bool | None = None, echo: Callable[[str], None] = print) -> dict:
    """Runs the whole job and writes metrics.json, figures, report.html and checkpoints into `workdir`.

    `show_progress`: progress bars for each model's training and the audit (None: only on a
    terminal; True: always; False: never); only process 0 draws them.
    Returns the metrics dict (the content of metrics.json).
    """
    validate(c)
    check_choices(c)
    main = parallel.is_main_process()
    show_progress = show_progress if main else False
    timing: dict[str, float] = {}
    memory: dict[str, float] = {}  # stage -> peak resident memory of the process so far, MB
    t0 = time.perf_counter()
    prep = prepare_data(c)
    timing["data"] = time.perf_counter() - t0
    memory["data"] = peak_rss_mb()
    mesh = parallel.make_mesh()
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")

    teacher = train_teacher(prep, c, mesh, ckpt_dir, show_progress=show_progress)
    timing["teacher"] = teacher.seconds
    memory["teacher"] = peak_rss_mb()
    if main:
        echo(f"teacher {c.teacher.kind}: test accuracy {accuracy_from_logits(teacher.test_logits, prep.y_test):.4f}"
             f"{privacy_summary(teacher)} ({teacher.seconds:.1f} s)")
    students = []
    for name, kind, method in parse_students(c.students):
        s = train_student(name, kind, method, prep, teacher, c, mesh, ckpt_dir, show_progress=show_progress)
        students.append(s)
        timing[name] = s.seconds
        memory[name] = peak_rss_mb()
        if main:
            echo(f"student {name}: test accuracy {accuracy_from_logits(s.test_logits, prep.y_test):.4f}"
                 f"{privacy_summary(s)} ({s.seconds:.1f} s)")

    result = {
        "dataset": prep.name,
        "config": c.to_dict(),
        "models": {"teacher": model_metrics(teacher, None, prep),
                   **{s.name: model_metrics(s, teacher, prep) for s in students}},
        "timing_s": timing,
        "peak_rss_mb": memory,
        "versions": versions(),
    }
    for name, comparison in distillation_comparisons(students, teacher, prep).items():
        result["models"][name]["vs_labels"] = comparison
    if any("privacy" in m for m in result["models"].values()):  # the measured leak beside each bound
        for t in (teacher, *students):
            result["models"][t.name]["membership"] = membership_attack(t, prep, c, parallel.make_mesh())
    return explain_and_report(result, [teacher, *students], prep, c, workdir, main=main, echo=echo,
                              show_progress=show_progress)


def explain_and_report(result: dict, everyone: list[Trained], prep: Prepared, c, workdir: str, *, main: bool = True,
                       echo: Callable[[str], None] = print, show_progress: bool | None = None) -> dict:
    """Explains every model, adds the scores and the verdict (`distill_jax.verdict`) to `result`, and writes
    metrics.json, figures, report.html and explorer.html."""
    timing = result["timing_s"]
    t1 = time.perf_counter()
    found = audit_models(everyone, prep, c, show_progress=show_progress if main else False)
    timing["explain"] = time.perf_counter() - t1
    memory = result.setdefault("peak_rss_mb", {})
    memory["explain"] = peak_rss_mb()
    result["explanations"] = found.explanations
    result["explanation_ranking"] = found.ranking
    for name, scores in found.robustness.items():
        result["models"][name].update(scores)
    result["analysis"] = found.analysis
    result["verdict"] = decide(result)
    if main:
        from distill_jax.app import _explorer, _figures, _page  # noqa: PLC0415 - matplotlib only where a report is written

        _metadata.write_json(os.path.join(workdir, "metrics.json"), result)  # first: a failing figure must not lose the scores
        t2 = time.perf_counter()
        figures = {**_figures.summary_figures(workdir, result), **_figures.write_figures(workdir, prep, everyone, found)}
        timing["report"] = time.perf_counter() - t2
        memory["report"] = peak_rss_mb()
        timing["total"] = sum(v for k, v in timing.items() if k != "total")
        _metadata.write_json(os.path.join(workdir, "metrics.json"), result)
        _page.write_html(workdir, result, figures)
        _explorer.write_explorer(workdir, _explorer.explorer_data(result, prep, everyone, found))
        echo(_page.summary_table(result))
    return result


def load_trained(workdir: str) -> tuple[dict, list[Trained], Prepared, Any]:
    """Reloads a finished run from `workdir`: its metrics, every model from its checkpoint, and the data.

    Raises:
      FileNotFoundError: `workdir` has no metrics.json or a model has no checkpoint.
    """
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; run `distill-jax run --workdir {workdir}` first")
    with open(path) as f:
        result = json.load(f)
    c = ml_collections.ConfigDict(result["config"])
    prep = prepare_data(c)
    mesh = parallel.make_mesh()
    history_path = os.path.join(workdir, "history.json")
    histories = json.load(open(history_path)) if os.path.isfile(history_path) else {}
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    kinds = [("teacher", c.teacher.kind, "labels")] + parse_students(c.students)
    trained = []
    for name, kind, method in kinds:
        model, extra = build_model(kind, c, prep.num_classes, prep.pca,
                                   ensemble=c.teacher.get("ensemble", 1) if name == "teacher" else 1)
        model = with_compute_dtype(model, "float32")
        template = {**model.init(jax.random.PRNGKey(0), prep.inputs(prep.x_train[:1])), **extra}
        variables = checkpoint.load_variables(os.path.join(ckpt_dir, name, "final"), template)
        predict_fn = make_host_predict_fn(model, prep, mesh)
        logits = predict(predict_fn, variables, prep.x_test, batch_size=c.eval_batch_size, mesh=mesh)
        trained.append(Trained(name, model, variables, kind, method, logits, histories.get(name, []), 0.0))
    return result, trained, prep, c


def explain_from_checkpoints(workdir: str, *, echo: Callable[[str], None] = print) -> dict:
    """Recomputes explanations, figures and the report of a finished run from its checkpoints (no training)."""
    result, trained, prep, c = load_trained(workdir)
    result["timing_s"] = {}
    return explain_and_report(result, trained, prep, c, workdir, echo=echo)
