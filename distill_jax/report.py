"""Figures (matplotlib, PNG) and the HTML report of a run, plus the terminal summary table."""
from __future__ import annotations

import html
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIG_DIR = "figures"


def _to_image(x: np.ndarray) -> np.ndarray:
    """[h, w, c] -> something imshow draws: grayscale [h, w] or RGB scaled to [0, 1]."""
    if x.shape[-1] == 1:
        return x[..., 0]
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + 1e-12)


def _heat(a: np.ndarray) -> np.ndarray:
    """Attribution [h, w, c] -> [h, w] magnitude normalised to [0, 1] per image."""
    m = np.abs(a).sum(-1)
    return m / (m.max() + 1e-12)


def attribution_grid(path: str, images: np.ndarray, maps: dict[str, np.ndarray], labels: Sequence[str],
                     title: str) -> str:
    """Rows: images; columns: input | one map per model. Saves a PNG and returns its path."""
    names = list(maps)
    rows, cols = len(images), 1 + len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.6), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(_to_image(images[i]), cmap="gray")
        axes[i, 0].set_ylabel(labels[i], fontsize=8)
        for j, name in enumerate(names, start=1):
            axes[i, j].imshow(_heat(maps[name][i]), cmap="inferno", vmin=0, vmax=1)
    for j, name in enumerate(["input", *names]):
        axes[0, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(path: str, histories: dict[str, list[dict]]) -> str:
    """Training loss and test accuracy per epoch for every model."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["loss"] for h in hist], label=name, marker="." if len(hist) < 3 else None)
        ax_acc.plot(epochs, [h.get("test_accuracy", np.nan) for h in hist], label=name,
                    marker="." if len(hist) < 3 else None)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pca_components(path: str, components: np.ndarray, image_shape: tuple[int, ...], *, max_components: int = 16) -> str:
    """The first principal components drawn as images (blue negative, red positive)."""
    k = min(max_components, len(components))
    cols = min(8, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(k):
        comp = components[i].reshape(image_shape).sum(-1)
        lim = np.abs(comp).max() + 1e-12
        axes.flat[i].imshow(comp, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes.flat[i].set_title(f"PC {i + 1}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(workdir: str, prep, trained, maps: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """Writes every figure of a run under `workdir/figures/`; returns title -> path relative to workdir."""
    out_dir = os.path.join(workdir, FIG_DIR)
    os.makedirs(out_dir, exist_ok=True)
    n = len(next(iter(maps.values()))["saliency"])
    images = prep.x_test[:n]
    labels = [f"label {prep.class_names[y]}" for y in prep.y_test[:n]]
    figures = {}
    for method, title in (("saliency", "Saliency |d logit / d x|"),
                          ("integrated_gradients", "Integrated gradients |IG|")):
        path = os.path.join(out_dir, f"{method}.png")
        attribution_grid(path, images, {name: m[method] for name, m in maps.items()}, labels, title)
        figures[title] = os.path.relpath(path, workdir)
    path = training_curves(os.path.join(out_dir, "training_curves.png"), {t.name: t.history for t in trained})
    figures["Training curves"] = os.path.relpath(path, workdir)
    path = pca_components(os.path.join(out_dir, "pca_components.png"), np.asarray(prep.pca.components),
                          prep.x_train.shape[1:])
    figures["PCA components (inputs of the linear student)"] = os.path.relpath(path, workdir)
    return figures


# --------------------------------------------------------------------------- tables and HTML


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def model_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model table (one row per model)."""
    header = ["model", "method", "accuracy", "agreement", "kl", "params", "ig_completeness_error"]
    rows = []
    for name, m in result["models"].items():
        ex = result["explanations"].get(name, {})
        rows.append([name, m.get("method", "labels (teacher)"), _fmt(m["accuracy"]), _fmt(m.get("agreement")),
                     _fmt(m.get("kl")), str(m["params"]), _fmt(ex.get("ig_completeness_error"))])
    return header, rows


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
    keys = sorted({k for v in result["explanations"].values() for k in v})
    rows = [[name, *(_fmt(v.get(k)) for k in keys)] for name, v in result["explanations"].items()]
    return ["model", *keys], rows


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}
figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:.4em}.note{color:#555;font-size:14px}"""


def write_html(workdir: str, result: dict, figures: dict[str, str]) -> str:
    """Writes `workdir/report.html`: the model and explanation tables and every figure. Returns its path."""
    model_table = _html_table(*model_rows(result))
    expl_table = _html_table(*explanation_rows(result))
    figs = "".join(f'<figure><figcaption>{html.escape(t)}</figcaption><img src="{html.escape(p)}" alt="{html.escape(t)}">'
                   f"</figure>" for t, p in figures.items())
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result["timing_s"].items())
    v = result["versions"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>distill_jax report: {html.escape(result['dataset'])}</title>
<style>{CSS}</style></head><body>
<h1>distill_jax report: {html.escape(result['dataset'])}</h1>
<p class="note">jax {html.escape(v['jax'])} on {html.escape(v['backend'])} ({v['devices']} device(s)); {html.escape(timing)}</p>
<h2>Models</h2>
<p class="note">accuracy: test top-1; agreement: fraction of test images where the student's top-1 equals the teacher's;
kl: mean KL(teacher || student) over the test set; ig_completeness_error: |sum IG - (f(x) - f(0))| / |f(x) - f(0)|.</p>
{model_table}
<h2>Explanations</h2>
<p class="note">deletion AUC: probability of the true class as the most-attributed pixels are removed (lower means the map
found pixels the model needs); spearman vs teacher: rank agreement of the student's map with the teacher's.</p>
{expl_table}
<h2>Figures</h2>
{figs}
</body></html>"""
    path = os.path.join(workdir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
