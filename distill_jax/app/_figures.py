"""Figures (matplotlib, PNG) and the HTML report of a run, its verdict, plus the terminal summary table.

The report opens with the run's verdict (`distill_jax.verdict`): the most faithful readable student and
the explanation method to trust for it, each with the rule that chose it and the numbers behind it.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distill_jax.app import _plots
from distill_jax.app._plots import (
    MAX_EXAMPLES,
    Panel,
    _boxes,
    _grid,
    _signed_rgba,
    _text_inches,
    _text_width,
    _title,
    attribution_grid,
    labelled_mosaic,
    one_per_class,
)
from distill_jax.audit.verdict import KIND_NAMES, is_finite_number, rank_students
from distill_jax.metrics._specs import METRICS

matplotlib.use("Agg")


FIG_DIR = "figures"


def training_curves(path: str, histories: dict[str, list[dict]]) -> str:
    """Training loss and test accuracy per epoch for every model."""
    figsize = (11, 4)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=figsize, gridspec_kw=_grid(
        figsize, 1, 2, left=1.0, right=0.15, top=0.35, bottom=0.55, wspace=0.85))  # room for log labels like 6x10^-1
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["loss"] for h in hist], label=name, marker="." if len(hist) < 3 else None)
        ax_acc.plot(epochs, [h.get("test_accuracy", np.nan) for h in hist], label=name,
                    marker="." if len(hist) < 3 else None)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    _title(ax_loss, "training loss"), _title(ax_acc, "test accuracy")
    ax_acc.legend(fontsize=7, loc="lower right")
    return _plots.save_figure(fig, path)


def pca_components(path: str, components: np.ndarray, image_shape: tuple[int, ...], *, max_components: int = 16) -> str:
    """The first principal components drawn as images (blue negative, red positive)."""
    k = min(max_components, len(components))
    cols = min(8, k)
    panels = [Panel(i // cols, i % cols, _signed_rgba(components[i].reshape(image_shape).sum(-1)), f"PC {i + 1}")
              for i in range(k)]
    fig, _ = labelled_mosaic(panels, "", inches=1.2, frame=False, fontsize=8)
    return _plots.save_figure(fig, path)


def class_templates(path: str, templates: dict[str, np.ndarray], class_names: Sequence[str]) -> str:
    """Each linear student's class weight vectors drawn in pixel space (rows: students; red raises the logit)."""
    panels = [Panel(i, j, _signed_rgba(t[j].sum(-1)), str(class_names[j]) if i == 0 else "")
              for i, t in enumerate(templates.values()) for j in range(len(class_names))]
    fig, _ = labelled_mosaic(panels, "", row_labels=list(templates), label_fontsize=7)
    return _plots.save_figure(fig, path)


def soft_tree(path: str, name: str, filters: np.ndarray, leaf_probs: np.ndarray, depth: int,
              class_names: Sequence[str], *, inches: float = 1.1) -> str:
    """A soft decision tree: every inner node's filter (red: pixels that send an example right) and each leaf's class distribution.

    Node n at depth d (position p = n - (2^d - 1) in its level) is drawn in row d, centred over its
    children: at column (p + 1/2) * 2^(depth-1-d) - 1/2 of the deepest inner level. Below, each leaf's
    class probabilities as bars (y from 0 to 1), two leaves under each deepest node, titled with the
    most likely class.
    """
    w = filters.shape[2]
    gap = max(2, w // 4)
    gap += (w + gap) % 2  # an even stride puts a node exactly half-way between its two children
    panels = []
    for node in range(2**depth - 1):
        d = int(np.floor(np.log2(node + 1)))
        col = (node - (2**d - 1) + 0.5) * 2 ** (depth - 1 - d) - 0.5
        panels.append(Panel(d, col, _signed_rgba(filters[node].sum(-1)), f"node {node}"))
    leaves_h = 0.8
    fig, ax = labelled_mosaic(
        panels, f"{name}: node filters (red pixels push an example right) and leaf class distributions",
        gap=gap, inches=inches, bottom=0.1 + leaves_h + _text_inches(8) + 0.2)
    # the leaves share the mosaic's x (canvas pixels): two under each deepest node, each in half its slot
    box = ax.get_position()
    ax_leaf = fig.add_axes((box.x0, 0.1 / fig.get_figheight(), box.width, leaves_h / fig.get_figheight()))
    probs = np.asarray(leaf_probs)
    n_leaves, n_classes = probs.shape
    slot = (w + gap) / 2
    centres = np.arange(n_leaves) * slot + w / 2 - slot / 2 - 0.5
    bar_w = 0.64 * slot / n_classes
    lefts = (centres[:, None] + 0.8 * slot * ((np.arange(n_classes) + 0.5) / n_classes - 0.5) - bar_w / 2).ravel()
    _boxes(ax_leaf, np.stack([lefts, np.zeros_like(lefts), np.full_like(lefts, bar_w), probs.ravel()], -1),
           facecolor="#555", edgecolor="none")
    _boxes(ax_leaf, [(c - 0.4 * slot, 0.0, 0.8 * slot, 1.0) for c in centres], clip_on=False)
    for c, p in zip(centres, probs):
        ax_leaf.text(c, 1.03, str(class_names[int(np.argmax(p))]), ha="center", va="bottom", fontsize=8)
    ax_leaf.set(xlim=ax.get_xlim(), ylim=(0, 1))
    ax_leaf.set_axis_off()
    return _plots.save_figure(fig, path)


def heatmap(path: str, panels: dict[str, tuple[list[str], list[str], np.ndarray]], title: str,
            *, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis", per_row: int = 4) -> str:
    """One annotated heat map per panel: (row labels, column labels, matrix), at most `per_row` panels a row."""
    n_cols = min(per_row, len(panels))
    n_rows = -(-len(panels) // n_cols)
    row_w = max((_text_width(str(r), 7) for rows, _, _ in panels.values() for r in rows), default=0.0)
    col_h = max((_text_width(str(c), 7) for _, cols, _ in panels.values() for c in cols), default=0.0)  # at 90 deg
    bar_w = 0.9  # the shared colour bar and its tick labels, right of the grid
    figsize = (max(3.6 * n_cols, _text_width(title, 9) + bar_w + 0.4), 3.4 * n_rows)  # the title stays whole
    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False, gridspec_kw=_grid(
        figsize, n_rows, n_cols, left=row_w + 0.2, right=bar_w, top=0.65, bottom=col_h + 0.2,
        wspace=row_w + 0.35, hspace=col_h + 0.5))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, (rows, cols, m)) in zip(axes.flat, panels.items()):
        m = np.asarray(m)
        im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(rows)), rows, fontsize=7), ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
        if m.size <= 64:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        _title(ax, name, fontsize=8)
    top, bottom = axes[0, 0].get_position().y1, axes[-1, 0].get_position().y0
    cax = fig.add_axes((1 - (bar_w - 0.25) / figsize[0], bottom + 0.1 * (top - bottom), 0.15 / figsize[0],
                        0.8 * (top - bottom)))
    fig.colorbar(im, cax=cax)
    fig.suptitle(title, fontsize=9)
    return _plots.save_figure(fig, path)


def method_ranking(path: str, ranking: dict[str, dict]) -> str:
    """Mean rank (1 = best) of each attribution method (columns) for each model (rows), annotated."""
    models_ = list(ranking)
    methods = list(dict.fromkeys(m for per in ranking.values() for m in per))
    m = np.array([[ranking[r].get(c, {}).get("mean_rank", np.nan) for c in methods] for r in models_], float)
    figsize = (2.0 + 0.9 * len(methods), max(2.6, 1.4 + 0.35 * len(models_)))
    fig, ax = plt.subplots(figsize=figsize, gridspec_kw=_grid(
        figsize, left=max((_text_width(r, 7) for r in models_), default=0.0) + 0.2, right=0.6, top=0.35,
        bottom=max((_text_width(c, 7) for c in methods), default=0.0) * 0.71 + 0.25))  # labels at 45 degrees
    im = ax.imshow(m, cmap="viridis_r", vmin=1, vmax=max(len(methods), 2), aspect="auto")
    ax.set_yticks(range(len(models_)), models_, fontsize=7)
    ax.set_xticks(range(len(methods)), methods, fontsize=7, rotation=45, ha="right")
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v > len(methods) / 2 else "k")
    bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("mean rank (1 = best)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    _title(ax, "attribution methods ranked on six explanation-quality metrics", fontsize=8)
    return _plots.save_figure(fig, path)


def perturbation_curves(path: str, curves: dict[str, dict], methods: Sequence[str]) -> str:
    """Mean deletion and insertion curves (probability of the true class) per model, for each method."""
    legend_rows = -(-len(curves) // 5)
    figsize = (3.6 * len(methods), 6.4)
    fig, axes = plt.subplots(2, len(methods), figsize=figsize, squeeze=False, gridspec_kw=_grid(
        figsize, 2, len(methods), left=0.65, right=0.15, top=0.35, bottom=0.65 + 0.2 * legend_rows, wspace=0.75,
        hspace=0.8))
    colour = {name: f"C{i % 10}" for i, name in enumerate(curves)}  # one colour per model in every panel
    for j, method in enumerate(methods):
        for i, kind in enumerate(("deletion", "insertion")):
            ax = axes[i, j]
            for name, per_method in curves.items():
                if method in per_method:
                    c = per_method[method][kind]
                    ax.plot(np.linspace(0, 1, len(c)), c, label=name, color=colour[name])
            _title(ax, f"{kind}: {method}")
            ax.set(xlabel=f"fraction of pixels {'removed' if i == 0 else 'inserted'}",
                   ylabel="p(true class)", ylim=(0, 1.02))
    handles = [plt.Line2D([], [], color=colour[name], label=name) for name in curves]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    return _plots.save_figure(fig, path)


def randomization_plot(path: str, results: dict[str, list]) -> str:
    """Rank correlation with the trained model's maps as layers are randomised top-down (Adebayo et al. 2018)."""
    figsize = (6, 3.5)
    fig, ax = plt.subplots(figsize=figsize, gridspec_kw=_grid(figsize, left=0.75, right=0.15, top=0.35, bottom=0.55))
    for method, rows in results.items():
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=method)
    ax.axhline(0, color="#999", lw=0.8)
    ax.set(ylabel="Spearman rho vs trained maps", xlabel="randomised down to layer", ylim=(-0.2, 1.05))
    _title(ax, "teacher: cascading parameter randomisation")
    ax.legend(fontsize=8)
    return _plots.save_figure(fig, path)


KIND_COLOURS = {"tree": "#1b9e77", "linear": "#7570b3", "mlp": "#e6ab02", "cnn": "#d95f02"}


def _spread_labels(ys: Sequence[float], gap: float) -> list[float]:
    """Label heights at least `gap` apart, each as close to its point's height as the gap allows (bottom-up)."""
    order = np.argsort(ys, kind="stable")
    out = np.asarray(ys, float).copy()
    for a, b in zip(order[:-1], order[1:]):
        out[b] = max(out[b], out[a] + gap)
    return list(out)


def readability_fidelity(path: str, result: dict) -> str:
    """Readability against fidelity: one labelled point per student (`rank_students`), coloured by kind.

    x: parameters, log scale (fewer: easier to read; trees also show their depth in the label);
    y: agreement with the teacher (left panel) and KL(teacher || student) (right panel). The teacher is a
    star at agreement 1 and KL 0. Saves a PNG and returns its path.
    """
    points = [s for s in rank_students(result) if is_finite_number(s.get("params")) and s["params"] > 0]
    teacher = result.get("models", {}).get("teacher", {})
    panels = (("agreement", "agreement with the teacher (higher: more faithful)", 1.0),
              ("kl", "KL(teacher || student) (lower: more faithful)", 0.0))
    figsize = (9.5, 3.8)
    fig, axes = plt.subplots(1, 2, figsize=figsize, gridspec_kw=_grid(
        figsize, 1, 2, left=0.75, right=0.15, top=0.35, bottom=0.55, wspace=0.85))
    for ax, (key, ylabel, teacher_value) in zip(axes, panels):
        pts = [p for p in points if is_finite_number(p.get(key))]
        for kind in dict.fromkeys(p["kind"] for p in pts):
            mine = [p for p in pts if p["kind"] == kind]
            ax.scatter([p["params"] for p in mine], [p[key] for p in mine], s=36, zorder=3,
                       color=KIND_COLOURS.get(kind, "#666"), label=KIND_NAMES.get(kind, kind))
        if is_finite_number(teacher.get("params")):
            ax.scatter([teacher["params"]], [teacher_value], marker="*", s=90, color="#444", zorder=3, label="teacher")
            ax.annotate("teacher", (teacher["params"], teacher_value), xytext=(-6, 6), textcoords="offset points",
                        fontsize=7, ha="right")
        values = [p[key] for p in pts] + [teacher_value]
        lo, hi = min(values), max(values)
        span = max(hi - lo, 1e-6)
        ax.set_ylim(lo - 0.08 * span, hi + 0.12 * span)
        sizes = sorted({p["params"] for p in pts})
        for g, x in enumerate(sizes):  # labels of students of one size kept apart; the smallest size's on the left
            same = [p for p in pts if p["params"] == x]
            left = g == 0 and len(sizes) > 1
            for p, y in zip(same, _spread_labels([p[key] for p in same], 0.07 * span)):
                depth = f" (depth {p['depth']})" if "depth" in p else ""
                ax.annotate(p["name"] + depth, (x, p[key]), xytext=(x / 1.3 if left else x * 1.3, y), fontsize=7,
                            va="center", ha="right" if left else "left",
                            arrowprops=dict(arrowstyle="-", color="#999", lw=0.6) if y != p[key] else None)
        ax.set_xscale("log")
        xs = [p["params"] for p in pts] + ([teacher["params"]] if is_finite_number(teacher.get("params")) else [])
        if xs:
            ax.set_xlim(min(xs) / (40 if len(sizes) > 1 else 2), max(xs) * 6)
        ax.set(xlabel="parameters (log scale; fewer: easier to read)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    if not points:
        axes[0].text(0.5, 0.5, "no student with agreement and parameters", ha="center", transform=axes[0].transAxes)
    fig.suptitle("readability against fidelity to the teacher", fontsize=9)
    return _plots.save_figure(fig, path)


def faithfulness_matrix(result: dict, metric: str = "deletion_auc") -> tuple[list[str], list[str], np.ndarray]:
    """Models (rows) x attribution methods (columns) matrix of one faithfulness score; NaN where not computed.

    Rows follow `result["explanations"]`, columns the methods in order of first appearance.
    """
    per_model = {name: {m: s for m, s in per.items() if isinstance(s, dict)}
                 for name, per in result.get("explanations", {}).items()}
    models_ = [name for name, per in per_model.items() if per]
    methods = list(dict.fromkeys(m for name in models_ for m in per_model[name]))
    m = np.full((len(models_), len(methods)), np.nan)
    for i, name in enumerate(models_):
        for j, method in enumerate(methods):
            v = per_model[name].get(method, {}).get(metric)
            if is_finite_number(v):
                m[i, j] = float(v)
    return models_, methods, m


def faithfulness_heatmap(path: str, result: dict, scores: Sequence[str] = ("deletion_auc", "insertion_auc")) -> str:
    """One heat map per score in `scores` (rows: models, columns: methods, `faithfulness_matrix`), stacked.

    Each cell shows its value; colours run so that brighter is better (reversed for deletion AUC, where
    lower is better); methods a model lacks are grey "n/a". Saves a PNG and returns its path.
    """
    rows, cols, _ = faithfulness_matrix(result, scores[0])
    col_h = max((_text_width(c, 7) for c in cols), default=0.0) * 0.5 + 0.3  # labels at 30 degrees
    margins = dict(left=max((_text_width(r, 7) for r in rows), default=0.0) + 0.2, right=0.5, top=0.3, bottom=col_h,
                   hspace=col_h + 0.25)  # each panel's title sits in the gap above it
    panel_h = 0.15 + 0.34 * max(len(rows), 1)
    figsize = (2.4 + 0.95 * max(len(cols), 1),
               margins["top"] + margins["bottom"] + (len(scores) - 1) * margins["hspace"] + len(scores) * panel_h)
    fig, axes = plt.subplots(len(scores), 1, figsize=figsize, squeeze=False,
                             gridspec_kw=_grid(figsize, len(scores), 1, **margins))
    for ax, metric in zip(axes[:, 0], scores):
        rows, cols, m = faithfulness_matrix(result, metric)
        if not m.size:
            ax.text(0.5, 0.5, f"no {metric} in this run", ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
            continue
        lower = metric in METRICS and not METRICS[metric].higher_is_better
        cmap = plt.get_cmap("viridis_r" if lower else "viridis").with_extremes(bad="#e8e8e8")
        finite = m[np.isfinite(m)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-6, aspect="auto")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=30, ha="right")
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                bright = (hi - v if lower else v - lo) > 0.6 * (hi - lo)
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6.5, color="k" if bright else "w")
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=6, color="#777")
        _title(ax, f"{metric} ({METRICS[metric].better if metric in METRICS else '?'} is better)", fontsize=8)
        bar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        bar.ax.tick_params(labelsize=6)
    return _plots.save_figure(fig, path)


def summary_figures(workdir: str, result: dict) -> dict[str, str]:
    """The figures drawn from metrics alone (readability against fidelity, faithfulness heat map); title -> path."""
    out_dir = os.path.join(workdir, FIG_DIR)
    os.makedirs(out_dir, exist_ok=True)
    figures = {}
    if rank_students(result):
        figures[READABILITY_TITLE] = os.path.relpath(
            readability_fidelity(os.path.join(out_dir, "readability.png"), result), workdir)
    if faithfulness_matrix(result)[2].size:
        figures[FAITHFULNESS_TITLE] = os.path.relpath(
            faithfulness_heatmap(os.path.join(out_dir, "faithfulness.png"), result), workdir)
    return figures


READABILITY_TITLE = "Readability against fidelity"


FAITHFULNESS_TITLE = "Faithfulness of each explanation"


RANKING_TITLE = "Explanation methods ranked per model"


FIGURE_CAPTIONS = {
    READABILITY_TITLE: "Each point is a student: further left means fewer parameters (easier to read); higher in "
                       "the left panel and lower in the right one means closer to the teacher (the star).",
    FAITHFULNESS_TITLE: "Rows are models, columns attribution methods, each cell the mean score over the explained "
                        "images: brighter is better in both panels (deletion AUC: lower; insertion AUC: higher); "
                        "n/a: the method does not apply to that model.",
    RANKING_TITLE: "Mean rank of each method (columns) for each model (rows) over the six quality metrics: "
                   "1 = best; read along a row to choose a method for that model.",
    "Deletion and insertion curves": "Probability of the true class as the most-attributed pixels are removed (top: "
                                     "a faster drop is better) or inserted into a blurred image (bottom: a faster "
                                     "rise is better); one line per model.",
    "Sanity check: parameter randomisation": "Rank correlation of the teacher's maps with those of the same network "
                                             "as its layers are randomised from the output down: a method that reads "
                                             "the learned weights falls towards 0.",
    "CKA: teacher layers (rows) vs student layers": "Linear CKA (0 to 1) between each teacher layer (rows) and each "
                                                    "student layer (columns) on test images: bright cells are "
                                                    "layers that represent the images alike.",
    "Training curves": "Training loss (left, log scale) and test accuracy (right) per epoch for every model; a curve "
                       "still moving at the last epoch would gain from more epochs.",
    "PCA components (inputs of the linear student)": "The principal components the linear students read, as "
                                                     "images: red pixels raise a component's value, blue lower it.",
    "Linear students: class templates in pixel space": "Each linear student's weights for each class (columns) "
                                                       "mapped back to pixels: red pixels raise that class's logit, "
                                                       "blue lower it.",
}


# (prefix, suffix, caption) for titles that carry a method or model name; the first match wins
CAPTION_PATTERNS = (
    ("Attributions: ", "", "Rows: one test image per class (its label on the left); columns: the image in grey, then "
                           "each model's map for the true class laid over it: the brighter and more opaque the "
                           "colour, the larger |attribution|."),
    ("Soft tree ", ": leaf usage per class", "Fraction of each class's test images (rows) that end in each leaf "
                                             "(columns) on the greedy path: one dark cell per row means the tree "
                                             "gives that class a leaf of its own."),
    ("Soft tree ", "", "Top: each inner node's filter (red pixels send an image to the right child); bottom: each "
                       "leaf's class distribution, titled with its most likely class."),
)


def figure_caption(title: str) -> str:
    """One line saying how to read the figure `title` (as `write_figures` / `summary_figures` name it); "" if unknown."""
    if title in FIGURE_CAPTIONS:
        return FIGURE_CAPTIONS[title]
    return next((c for pre, suf, c in CAPTION_PATTERNS if title.startswith(pre) and title.endswith(suf)), "")


def write_figures(workdir: str, prep, trained, found) -> dict[str, str]:
    """Writes every figure of a run under `workdir/figures/`; returns title -> path relative to workdir."""
    out_dir = os.path.join(workdir, FIG_DIR)
    os.makedirs(out_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, workdir)
    shown = one_per_class(found.labels, limit=MAX_EXAMPLES)
    labels = [f"label {prep.class_names[y]}" for y in np.asarray(found.labels)[shown]]
    images = np.asarray(found.images)[shown]
    figures = {}
    methods = list(dict.fromkeys(m for per_model in found.maps.values() for m in per_model))
    for method in methods:
        maps = {name: np.asarray(per[method])[shown] for name, per in found.maps.items() if method in per}
        path = os.path.join(out_dir, f"{method}.png")
        attribution_grid(path, images, maps, labels, f"{method}: |attribution| of the true class over the image")
        figures[f"Attributions: {method}"] = rel(path)
    curve_methods = [m for m in ("saliency", "integrated_gradients", "grad_cam") if m in methods]
    figures["Deletion and insertion curves"] = rel(perturbation_curves(
        os.path.join(out_dir, "deletion_insertion.png"), found.curves, curve_methods))
    if found.ranking:
        figures[RANKING_TITLE] = rel(method_ranking(
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
