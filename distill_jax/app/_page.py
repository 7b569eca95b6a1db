"""The report page (report.html) and the text tables of a run's metrics.
"""
from __future__ import annotations

import html
import os

from distill_jax.app._figures import (
    FAITHFULNESS_TITLE,
    RANKING_TITLE,
    READABILITY_TITLE,
    figure_caption,
    summary_figures,
)
from distill_jax.audit.verdict import FAITHFULNESS_KEYS, QUALITY_KEYS, as_text, of


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def model_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model table (one row per model)."""
    private = any("privacy" in m for m in result["models"].values())
    header = ["model", "method", "T, alpha", "accuracy", "agreement", "kl", "params", "fgsm_accuracy", "pgd_accuracy",
              "ig_completeness_error"] + (["privacy (epsilon, delta)"] if private else [])
    rows = []
    for name, m in result["models"].items():
        ex = result.get("explanations", {}).get(name, {})
        rows.append([name, m.get("method", "labels (teacher)"), kd_settings_text(m), _fmt(m["accuracy"]),
                     _fmt(m.get("agreement")),
                     _fmt(m.get("kl")), str(m["params"]), _fmt(m.get("fgsm_accuracy")), _fmt(m.get("pgd_accuracy")),
                     _fmt(ex.get("ig_completeness_error"))] + ([privacy_text(m)] if private else []))
    return header, rows


def privacy_text(model: dict) -> str:
    """`DP-SGD: epsilon 2.31, delta 1e-05` for a privately trained model's metrics; "-" otherwise."""
    p = model.get("privacy")
    return "-" if not p else f"{p['mechanism']}: epsilon {p['epsilon']:.2f}, delta {p['delta']:g}"


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


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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


def _figure_html(title: str, path: str) -> str:
    """A figure with its title and its one-line caption (how to read it) above the image (a link to full size)."""
    caption = figure_caption(title)
    line = f'<br><span class="note">{html.escape(caption)}</span>' if caption else ""
    src = html.escape(path)
    return (f'<figure><figcaption><b>{html.escape(title)}</b>{line}</figcaption>'
            f'<a href="{src}"><img src="{src}" alt="{html.escape(title)}"></a></figure>')


def _scroll(table: str) -> str:
    return f'<div class="scroll">{table}</div>'


def verdict_html(v: dict) -> str:
    """The verdict section: `verdict.as_text` as paragraphs in a box (lead in bold, the rule in small print)."""
    paragraphs = []
    for p in as_text(v).split("\n\n"):
        text, _, rule = p.partition(" Rule: ")
        lead, _, rest = text.partition(": ")
        rule_html = f' <span class="rule">Rule: {html.escape(rule)}</span>' if rule else ""
        paragraphs.append(f"<p><strong>{html.escape(lead)}:</strong> {html.escape(rest)}{rule_html}</p>")
    paragraphs = "".join(paragraphs)
    return f'<section class="verdict" id="verdict"><h2>Verdict: which student, which explanation</h2>{paragraphs}</section>'


def write_html(workdir: str, result: dict, figures: dict[str, str]) -> str:
    """Writes `workdir/report.html`: the verdict, the summary figures, the tables (long ones folded), every figure.

    The figures drawn from metrics alone (`summary_figures`) are drawn here when `figures` lacks them.
    Returns the path of the page.
    """
    if not {READABILITY_TITLE, FAITHFULNESS_TITLE} & set(figures):
        figures = {**summary_figures(workdir, result), **figures}
    figures = dict(figures)
    placed = {t: _figure_html(t, figures.pop(t)) if t in figures else ""
              for t in (READABILITY_TITLE, FAITHFULNESS_TITLE, RANKING_TITLE)}
    model_table = _scroll(_html_table(*model_rows(result)))
    expl_header, expl = explanation_rows(result)
    sens_table = _scroll(_html_table(*sensitivity_rows(result)))
    quality_header, quality = quality_rows(result)
    selection_header, selection = selection_rows(result)
    n_val = max((m["selection"]["validation_images"] for m in result["models"].values() if m.get("selection")),
                default=0)
    selection_html = "" if not selection else f"""<h3>Distillation settings chosen on a validation split</h3>
<p class="note">Each kd student with method.temperature or method.alpha set to "auto" was trained once per candidate on
the training images minus a class-stratified validation split ({n_val} images), then retrained on every training image with the
chosen values; the test set played no part. T, alpha in the table above are the values each student was trained with
(Hinton KD: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross entropy).</p>
{_scroll(_html_table(selection_header, selection))}"""
    figs = "".join(_figure_html(t, p) for t, p in figures.items())
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result["timing_s"].items())
    v = result["versions"]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>distill_jax report: {html.escape(result['dataset'])}</title>
<style>{CSS}</style></head><body>
<h1>distill_jax report: {html.escape(result['dataset'])}</h1>
<p class="note">jax {html.escape(v['jax'])} on {html.escape(v['backend'])} ({v['devices']} device(s)); {html.escape(timing)}</p>
{verdict_html(of(result))}
{placed[READABILITY_TITLE]}
<h2>Models</h2>
<p class="note">accuracy: test top-1; agreement: fraction of test images where the student's top-1 equals the teacher's;
kl: mean KL(teacher || student) over the test set; fgsm/pgd_accuracy: test accuracy under L-inf attacks of the configured
budget; ig_completeness_error: |sum IG - (f(x) - f(0))| / |f(x) - f(0)|.</p>
{model_table}
{selection_html}
<h2>How faithful is each explanation?</h2>
<p class="note">deletion AUC: probability of the true class as the most-attributed pixels are removed first (lower: the map
found pixels the model needs); insertion AUC: the same as they are inserted into a blurred image (higher is better);
spearman / top-10% overlap vs teacher: agreement of the student's map with the teacher's map of the same method.</p>
{placed[FAITHFULNESS_TITLE]}
<details id="faithfulness-table"><summary>Full faithfulness table ({len(expl)} rows: every model and method)</summary>
{_scroll(_html_table(expl_header, expl))}
</details>
<p class="note">max-sensitivity: largest relative change of the saliency map under small uniform input noise (Yeh et al.
2019; lower is more stable).</p>
{sens_table}
<h2>Which explanation method to trust, per model?</h2>
<p class="note">Each model's methods ranked (1 = best) on deletion AUC (lower is better), insertion AUC (higher),
faithfulness correlation (higher: the map's mass on random pixel subsets predicts the logit drop when they are removed;
Bhatt et al. 2020), infidelity (lower: squared error of the map's first-order prediction of the logit change under
Gaussian noise, after the best rescaling; Yeh et al. 2019), sparseness (higher: Gini index of |map|; Chalasani et al.
2020) and complexity (lower: entropy of |map|; Bhatt et al. 2020); mean rank over those six. Sparseness and complexity
say how concise a map is, not whether it is right: read them after the faithfulness columns.</p>
{placed[RANKING_TITLE]}
<details id="quality-table"><summary>Explanation-quality table ({len(quality)} rows: every model and method, best first)</summary>
{_scroll(_html_table(quality_header, quality))}
</details>
<h2>Figures</h2>
{figs}
</body></html>"""
    path = os.path.join(workdir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
