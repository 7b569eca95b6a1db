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


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _signed(ax, img: np.ndarray, title: str | None = None) -> None:
    lim = np.abs(img).max() + 1e-12
    ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def class_templates(path: str, templates: dict[str, np.ndarray], class_names: Sequence[str]) -> str:
    """Each linear student's class weight vectors drawn in pixel space (rows: students; red raises the logit)."""
    rows, cols = len(templates), len(class_names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.4 * rows + 0.3), squeeze=False)
    for i, (name, t) in enumerate(templates.items()):
        for j in range(cols):
            _signed(axes[i, j], t[j].sum(-1), f"{class_names[j]}" if i == 0 else None)
        axes[i, 0].set_ylabel(name, fontsize=7)
    return _save(fig, path)


def soft_tree(path: str, name: str, filters: np.ndarray, leaf_probs: np.ndarray, depth: int,
              class_names: Sequence[str]) -> str:
    """A soft decision tree: every inner node's filter (red: pixels that send an example right) and each leaf's class distribution."""
    n_leaves = 2**depth
    fig = plt.figure(figsize=(max(8, 0.75 * n_leaves), 1.3 * (depth + 1) + 0.6))
    height = 0.93 / (depth + 1)
    for node in range(2**depth - 1):
        d = int(np.floor(np.log2(node + 1)))
        pos = node - (2**d - 1)
        width = 1.0 / 2**d
        size = min(width * 0.9, 0.9 * height * fig.get_figheight() / fig.get_figwidth())
        ax = fig.add_axes([width * (pos + 0.5) - size / 2, 0.93 - height * (d + 0.95), size, height * 0.85])
        _signed(ax, filters[node].sum(-1), f"node {node}")
    for leaf in range(n_leaves):
        ax = fig.add_axes([leaf / n_leaves + 0.1 / n_leaves, 0.02, 0.8 / n_leaves, height * 0.7])
        ax.bar(range(len(class_names)), leaf_probs[leaf], color="#555")
        ax.set_ylim(0, 1), ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{class_names[int(np.argmax(leaf_probs[leaf]))]}", fontsize=8)
    fig.suptitle(f"{name}: node filters (red pixels push an example right) and leaf class distributions", fontsize=9,
                 y=0.995)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(path: str, panels: dict[str, tuple[list[str], list[str], np.ndarray]], title: str,
            *, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> str:
    """One annotated heat map per panel: (row labels, column labels, matrix)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (name, (rows, cols, m)) in zip(axes[0], panels.items()):
        m = np.asarray(m)
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(rows)), rows, fontsize=7), ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
        if m.size <= 64:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def method_ranking(path: str, ranking: dict[str, dict]) -> str:
    """Mean rank (1 = best) of each attribution method (columns) for each model (rows), annotated."""
    models_ = list(ranking)
    methods = list(dict.fromkeys(m for per in ranking.values() for m in per))
    m = np.array([[ranking[r].get(c, {}).get("mean_rank", np.nan) for c in methods] for r in models_], float)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(methods), max(2.6, 1.4 + 0.35 * len(models_))))
    im = ax.imshow(m, cmap="viridis_r", vmin=1, vmax=max(len(methods), 2), aspect="auto")
    ax.set_yticks(range(len(models_)), models_, fontsize=7)
    ax.set_xticks(range(len(methods)), methods, fontsize=7, rotation=45, ha="right")
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v > len(methods) / 2 else "k")
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("mean rank (1 = best)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title("attribution methods ranked on six explanation-quality metrics", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perturbation_curves(path: str, curves: dict[str, dict], methods: Sequence[str]) -> str:
    """Mean deletion and insertion curves (probability of the true class) per model, for each method."""
    fig, axes = plt.subplots(2, len(methods), figsize=(3.6 * len(methods), 6), squeeze=False)
    for j, method in enumerate(methods):
        for i, kind in enumerate(("deletion", "insertion")):
            ax = axes[i, j]
            for name, per_method in curves.items():
                if method in per_method:
                    c = per_method[method][kind]
                    ax.plot(np.linspace(0, 1, len(c)), c, label=name)
            ax.set(title=f"{kind}: {method}", xlabel=f"fraction of pixels {'removed' if i == 0 else 'inserted'}",
                   ylabel="p(true class)", ylim=(0, 1.02))
    axes[0, -1].legend(fontsize=6)
    return _save(fig, path)


def randomization_plot(path: str, results: dict[str, list]) -> str:
    """Rank correlation with the trained model's maps as layers are randomised top-down (Adebayo et al. 2018)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, rows in results.items():
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=method)
    ax.axhline(0, color="#999", lw=0.8)
    ax.set(ylabel="Spearman rho vs trained maps", xlabel="randomised down to layer", ylim=(-0.2, 1.05),
           title="teacher: cascading parameter randomisation")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_figures(workdir: str, prep, trained, found) -> dict[str, str]:
    """Writes every figure of a run under `workdir/figures/`; returns title -> path relative to workdir."""
    out_dir = os.path.join(workdir, FIG_DIR)
    os.makedirs(out_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, workdir)
    labels = [f"label {prep.class_names[y]}" for y in found.labels]
    figures = {}
    methods = list(dict.fromkeys(m for per_model in found.maps.values() for m in per_model))
    for method in methods:
        maps = {name: per[method] for name, per in found.maps.items() if method in per}
        path = os.path.join(out_dir, f"{method}.png")
        attribution_grid(path, found.images, maps, labels, f"{method}: |attribution| per model (true class)")
        figures[f"Attributions: {method}"] = rel(path)
    curve_methods = [m for m in ("saliency", "integrated_gradients", "grad_cam") if m in methods]
    figures["Deletion and insertion curves"] = rel(perturbation_curves(
        os.path.join(out_dir, "deletion_insertion.png"), found.curves, curve_methods))
    if found.ranking:
        figures["Explanation methods ranked per model"] = rel(method_ranking(
            os.path.join(out_dir, "method_ranking.png"), found.ranking))
    figures["Sanity check: parameter randomisation"] = rel(randomization_plot(
        os.path.join(out_dir, "randomization.png"), found.analysis["randomization"]))
    if found.analysis["cka"]:
        panels = {name: (d["teacher_layers"], d["student_layers"], d["matrix"]) for name, d in found.analysis["cka"].items()}
        figures["CKA: teacher layers (rows) vs student layers"] = rel(heatmap(
            os.path.join(out_dir, "cka.png"), panels, "linear CKA between teacher and student representations"))
    figures["Training curves"] = rel(training_curves(os.path.join(out_dir, "training_curves.png"),
                                                     {t.name: t.history for t in trained if t.history}))
    figures["PCA components (inputs of the linear student)"] = rel(pca_components(
        os.path.join(out_dir, "pca_components.png"), np.asarray(prep.pca.components), prep.x_train.shape[1:]))
    if found.linear:
        figures["Linear students: class templates in pixel space"] = rel(class_templates(
            os.path.join(out_dir, "class_templates.png"), {k: v["templates"] for k, v in found.linear.items()},
            prep.class_names))
    for name, tree in found.trees.items():
        figures[f"Soft tree {name}"] = rel(soft_tree(os.path.join(out_dir, f"tree_{name}.png"), name, tree["filters"],
                                                      tree["leaf_probs"], tree["depth"], prep.class_names))
        usage = tree["usage"]["hard"]
        figures[f"Soft tree {name}: leaf usage per class"] = rel(heatmap(
            os.path.join(out_dir, f"tree_usage_{name}.png"),
            {name: ([str(c) for c in prep.class_names], [str(l) for l in range(usage.shape[1])], usage)},
            "fraction of each class's test images that reach each leaf (greedy path)", cmap="Greys"))
    return figures


# --------------------------------------------------------------------------- tables and HTML


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def model_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model table (one row per model)."""
    header = ["model", "method", "T, alpha", "accuracy", "agreement", "kl", "params", "fgsm_accuracy", "pgd_accuracy",
              "ig_completeness_error"]
    rows = []
    for name, m in result["models"].items():
        ex = result.get("explanations", {}).get(name, {})
        rows.append([name, m.get("method", "labels (teacher)"), kd_settings_text(m), _fmt(m["accuracy"]),
                     _fmt(m.get("agreement")),
                     _fmt(m.get("kl")), str(m["params"]), _fmt(m.get("fgsm_accuracy")), _fmt(m.get("pgd_accuracy")),
                     _fmt(ex.get("ig_completeness_error"))])
    return header, rows


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


FAITHFULNESS_KEYS = ("deletion_auc", "insertion_auc", "spearman_vs_teacher", "top10_overlap_vs_teacher")
QUALITY_KEYS = ("faithfulness_correlation", "infidelity", "sparseness", "complexity")


def explanation_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Faithfulness table: one row per (model, attribution method)."""
    rows = []
    for name, per in result["explanations"].items():
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
    rows = [[name, *(_fmt(per.get(k)) for k in keys)] for name, per in result["explanations"].items()]
    return ["model", *keys], rows


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}img{max-width:100%;border:1px solid #eee}
figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:.4em}.note{color:#555;font-size:14px}"""


def write_html(workdir: str, result: dict, figures: dict[str, str]) -> str:
    """Writes `workdir/report.html`: the model and explanation tables and every figure. Returns its path."""
    model_table = _html_table(*model_rows(result))
    expl_table = _html_table(*explanation_rows(result))
    sens_table = _html_table(*sensitivity_rows(result))
    quality_table = _html_table(*quality_rows(result))
    selection_header, selection = selection_rows(result)
    n_val = max((m["selection"]["validation_images"] for m in result["models"].values() if m.get("selection")),
                default=0)
    selection_html = "" if not selection else f"""<h3>Distillation settings chosen on a validation split</h3>
<p class="note">Each kd student with method.temperature or method.alpha set to "auto" was trained once per candidate on
the training images minus a class-stratified validation split ({n_val} images), then retrained on every training image with the
chosen values; the test set played no part. T, alpha in the table above are the values each student was trained with
(Hinton KD: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross entropy).</p>
{_html_table(selection_header, selection)}"""
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
kl: mean KL(teacher || student) over the test set; fgsm/pgd_accuracy: test accuracy under L-inf attacks of the configured
budget; ig_completeness_error: |sum IG - (f(x) - f(0))| / |f(x) - f(0)|.</p>
{model_table}
{selection_html}
<h2>How faithful is each explanation?</h2>
<p class="note">deletion AUC: probability of the true class as the most-attributed pixels are removed first (lower: the map
found pixels the model needs); insertion AUC: the same as they are inserted into a blurred image (higher is better);
spearman / top-10% overlap vs teacher: agreement of the student's map with the teacher's map of the same method.</p>
{expl_table}
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
{quality_table}
<h2>Figures</h2>
{figs}
</body></html>"""
    path = os.path.join(workdir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
