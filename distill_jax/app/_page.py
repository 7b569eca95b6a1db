"""The report page (report.html) and the text tables of a run's metrics.
"""
from __future__ import annotations

import functools
import os

import jinja2

from distill_jax.app._figures import (
    FAITHFULNESS_TITLE,
    RANKING_TITLE,
    READABILITY_TITLE,
    figure_caption,
    summary_figures,
)
from distill_jax.app._fit import privacy_statement
from distill_jax.audit.verdict import FAITHFULNESS_KEYS, QUALITY_KEYS, as_text, of
from distill_jax.metrics._specs import METRICS, metric_names


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def model_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model table (one row per model)."""
    private = any("privacy" in m for m in result["models"].values())
    compared = any("vs_labels" in m for m in result["models"].values())
    header = ["model", "method", "T, alpha", "accuracy", "agreement", "agreement perturbed", "kl", "params",
              "fgsm_accuracy", "pgd_accuracy", "ig_completeness_error"] + (["agreement vs labels twin (95% CI)"] if compared else []) + (
              ["privacy (epsilon, delta)"] if private else [])
    rows = []
    for name, m in result["models"].items():
        ex = result.get("explanations", {}).get(name, {})
        rows.append([name, m.get("method", "labels (teacher)"), kd_settings_text(m), _fmt(m["accuracy"]),
                     _fmt(m.get("agreement")), _fmt((m.get("local_agreement") or {}).get("mean")),
                     _fmt(m.get("kl")), str(m["params"]), _fmt(m.get("fgsm_accuracy")), _fmt(m.get("pgd_accuracy")),
                     _fmt(ex.get("ig_completeness_error"))] + ([gain_text(m)] if compared else [])
                    + ([privacy_text(m)] if private else []))
    return header, rows


def gain_text(model: dict) -> str:
    """`+2.1 (+1.4 to +2.8)`: a distilled student's agreement minus its labels twin's, in points, with the 95 % CI."""
    g = model.get("vs_labels")
    if not g:
        return ""
    d, (lo, hi) = g["agreement"]["difference"], g["agreement"]["ci95"]
    return f"{100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"


def privacy_text(model: dict) -> str:
    """A model's privacy cell: `DP-SGD epsilon 2.31 (delta 1e-05, poisson sampling)` for a privately trained model,
    then the measured leak when the run attacked it (`; membership loss attack AUC 0.512, TPR at 1% FPR 0.010`);
    `not private; membership ...` for the others of such a run; "-" otherwise."""
    p, attack = model.get("privacy"), model.get("membership")
    measured = (f"; membership loss attack AUC {attack['auc']:.3f}, TPR at 1% FPR {attack['tpr_at_fpr_0.01']:.3f}"
                if attack else "")
    if not p:
        return "-" if not attack else f"not private{measured}"
    return privacy_statement(p) + measured


def kd_settings_text(model: dict) -> str:
    """`"4, 0.9"` for a kd student (`"2, 0.5 (validation)"` when chosen on a validation split), "" otherwise."""
    if "temperature" not in model:
        return ""
    chosen = " (validation)" if "selection" in model else ""
    return f"{model['temperature']:g}, {model['alpha']:g}{chosen}"


def selection_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Every (T, alpha) candidate tried for each student with "auto" settings, its validation scores, the one chosen."""
    rows = []
    for name, m in result["models"].items():
        sel = m.get("selection")
        for cand in sel["candidates"] if sel else ():
            chosen = (cand["temperature"], cand["alpha"]) == (sel["temperature"], sel["alpha"])
            rows.append([name, f"{cand['temperature']:g}", f"{cand['alpha']:g}", _fmt(cand["accuracy"]),
                         _fmt(cand["agreement"]), _fmt(cand["kl"]), f"chosen ({sel['score']})" if chosen else ""])
    return ["student", "T", "alpha", "val accuracy", "val agreement", "val kl", ""], rows


def summary_table(result: dict) -> str:
    """The model table as aligned plain text for the terminal."""
    header, rows = model_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    total = result["timing_s"].get("total")
    tail = f"\ntotal time {total:.1f} s" if total else ""
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)]) + tail


def explanation_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Faithfulness table: one row per (model, attribution method)."""
    rows = []
    for name, per in result.get("explanations", {}).items():
        for method, scores in per.items():
            if isinstance(scores, dict):
                rows.append([name, method, *(_fmt(scores.get(k)) for k in FAITHFULNESS_KEYS)])
    return ["model", "method", *FAITHFULNESS_KEYS], rows


def quality_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Explanation-quality table: one row per (model, method), best-ranked method first within each model."""
    rows = []
    for name, per_method in result.get("explanation_ranking", {}).items():
        for method, r in sorted(per_method.items(), key=lambda kv: kv[1]["mean_rank"]):
            scores = result["explanations"][name][method]
            rows.append([name, method, _fmt(r["mean_rank"]), *(_fmt(scores.get(k)) for k in QUALITY_KEYS)])
    return ["model", "method", "mean rank", *QUALITY_KEYS], rows


def sensitivity_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    keys = ("ig_completeness_error", "saliency_max_sensitivity")
    rows = [[name, *(_fmt(per.get(k)) for k in keys)] for name, per in result.get("explanations", {}).items()]
    return ["model", *keys], rows


CSS = """*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1em 1.5em;max-width:1200px;color:#222;line-height:1.45}
h1{font-size:1.6em;overflow-wrap:anywhere}.scroll{overflow-x:auto;margin:1em 0}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}img{max-width:100%;height:auto;border:1px solid #eee}
figure{margin:1.5em 0}figcaption{margin-bottom:.4em}figcaption b{display:block}
.note{color:#555;font-size:14px;overflow-wrap:anywhere}
.verdict{background:#f3f8f5;border-left:4px solid #1b9e77;padding:.4em 1em;margin:1em 0}
.verdict .rule{color:#555;font-size:.9em}details{margin:1em 0}summary{cursor:pointer;font-weight:600}
@media (max-width:600px){body{padding:.5em .7em}h1{font-size:1.3em}h2{font-size:1.2em}table{font-size:12px}
.verdict{padding:.2em .7em}}"""


def _figure(title: str, path: str) -> dict:
    """A figure as the template shows it: title, the one-line caption (how to read it), path."""
    return {"title": title, "caption": figure_caption(title), "path": path}


def verdict_paragraphs(v: dict) -> list[dict]:
    """`verdict.as_text` split for the page: per paragraph its lead (in bold), its text and its rule (small print)."""
    out = []
    for p in as_text(v).split("\n\n"):
        text, _, rule = p.partition(" Rule: ")
        lead, _, rest = text.partition(": ")
        out.append({"lead": lead, "text": rest, "rule": rule})
    return out


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("distill_jax.app", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    return env.get_template("report.html")


def write_html(workdir: str, result: dict, figures: dict[str, str]) -> str:
    """Writes `workdir/report.html` from the template `app/templates/report.html`: the verdict, the summary figures,
    the tables (long ones folded), every figure; the metric notes come from `metrics.METRICS`.

    The figures drawn from metrics alone (`summary_figures`) are drawn here when `figures` lacks them.
    Returns the path of the page.
    """
    if not {READABILITY_TITLE, FAITHFULNESS_TITLE} & set(figures):
        figures = {**summary_figures(workdir, result), **figures}
    figures = dict(figures)
    placed = {t: _figure(t, figures.pop(t)) if t in figures else None
              for t in (READABILITY_TITLE, FAITHFULNESS_TITLE, RANKING_TITLE)}
    table = lambda header_rows: {"header": header_rows[0], "rows": header_rows[1]}  # noqa: E731
    selection = table(selection_rows(result))
    selection["validation_images"] = max((m["selection"]["validation_images"] for m in result["models"].values()
                                          if m.get("selection")), default=0)
    page = _template().render(
        dataset=result["dataset"], versions=result["versions"], css=CSS,
        timing=", ".join(f"{k} {v:.1f} s" for k, v in result["timing_s"].items()),
        verdict=verdict_paragraphs(of(result)),
        readability=placed[READABILITY_TITLE], faithfulness_figure=placed[FAITHFULNESS_TITLE],
        ranking_figure=placed[RANKING_TITLE], figures=[_figure(t, p) for t, p in figures.items()],
        models=table(model_rows(result)), selection=selection, explanations=table(explanation_rows(result)),
        sensitivities=table(sensitivity_rows(result)), quality=table(quality_rows(result)),
        fidelity=[METRICS[n] for n in metric_names("fidelity")],
        faithfulness=[METRICS[n] for n in metric_names("faithfulness") + metric_names("teacher_agreement")],
        ranked=[METRICS[n] for n in metric_names(ranked=True)],
        completeness=METRICS["ig_completeness_error"], sensitivity=METRICS["saliency_max_sensitivity"])
    path = os.path.join(workdir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
