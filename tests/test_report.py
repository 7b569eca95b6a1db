"""The report's verdict (which readable student, which explanation), its summary figures, overlays and page.

Every result dict here is built by hand (no training): `make_result` holds a teacher, a small CNN, a soft
tree and a linear student with six explanation scores per (model, method), rankings made by
`audit.rank_methods`, and a randomisation check. The Chromium test runs only where /usr/bin/chromium exists.
"""
import copy
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import types

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from distill_jax import audit, data
from distill_jax.app import _figures, _page, _plots
from distill_jax.audit import verdict

METHODS = ("saliency", "grad_x_input", "integrated_gradients", "grad_cam")


def _scores(deletion, insertion, fc, infidelity, sparseness, complexity):
    return {"deletion_auc": deletion, "insertion_auc": insertion, "spearman_vs_teacher": 0.5,
            "top10_overlap_vs_teacher": 0.25, "faithfulness_correlation": fc, "infidelity": infidelity,
            "sparseness": sparseness, "complexity": complexity}


def make_result() -> dict:
    """A run's metrics as pipeline.run builds them: teacher, cnn-kd, tree-kd, linear-kd, linear-labels."""
    models = {
        "teacher": {"accuracy": 0.95, "params": 330186},
        "cnn-kd": {"accuracy": 0.93, "params": 13706, "agreement": 0.96, "kl": 0.05, "method": "kd"},
        "tree-kd": {"accuracy": 0.80, "params": 536, "agreement": 0.82, "kl": 0.30, "method": "kd"},
        "linear-kd": {"accuracy": 0.81, "params": 250, "agreement": 0.82, "kl": 0.25, "method": "kd"},
        "linear-labels": {"accuracy": 0.78, "params": 250, "agreement": 0.79, "kl": 0.40, "method": "labels"},
    }
    explanations = {}
    for i, name in enumerate(models):
        per = {"saliency": _scores(0.30, 0.50, 0.60, 1.0, 0.50, 3.0),  # best mean rank, fails the sanity check
               "grad_x_input": _scores(0.20 + 0.01 * i, 0.40, 0.50, 2.0, 0.40, 3.5),
               "integrated_gradients": _scores(0.25, 0.45, 0.50, 2.0, 0.40, 3.5),
               "grad_cam": _scores(0.40, 0.30, 0.10, 3.0, 0.30, 4.0)}
        if name.startswith(("tree", "linear")):
            del per["grad_cam"]  # no spatial layer
        explanations[name] = {"saliency_max_sensitivity": 0.1, "ig_completeness_error": 0.01, **per}
    ranking = {name: audit.rank_methods({m: s for m, s in per.items() if isinstance(s, dict)})
               for name, per in explanations.items()}
    randomization = {"saliency": [["head", 0.9], ["conv1", 0.8]], "grad_x_input": [["head", 0.5], ["conv1", 0.1]]}
    return {"dataset": "digits", "config": {"tree": {"depth": 3}, "students": ",".join(list(models)[1:])},
            "models": models, "explanations": explanations, "explanation_ranking": ranking,
            "analysis": {"randomization": randomization, "cka": {}}, "timing_s": {"total": 1.0},
            "versions": {"jax": "0.0", "backend": "cpu", "devices": 1}}


# --------------------------------------------------------------------------- verdict


def test_make_result_ranks_as_the_tests_below_assume():
    r = make_result()["explanation_ranking"]["linear-kd"]
    assert r["saliency"]["mean_rank"] < r["grad_x_input"]["mean_rank"] == r["integrated_gradients"]["mean_rank"]


def test_verdict_picks_the_readable_student_with_most_agreement_ties_broken_by_kl():
    result = make_result()
    v = verdict.decide(result)
    # tree-kd and linear-kd agree equally (0.82): the lower KL (linear-kd, 0.25 < 0.30) wins; cnn-kd agrees
    # more (0.96) but is not a readable kind, so it is only the comparison
    assert v["student"] == {"name": "linear-kd", "kind": "linear", "readable": True, "agreement": 0.82, "kl": 0.25,
                            "accuracy": 0.81, "params": 250}
    assert v["runner_up"]["name"] == "tree-kd" and v["runner_up"]["depth"] == 3
    assert v["least_readable"]["name"] == "cnn-kd" and v["least_readable"]["agreement"] == 0.96
    assert v["teacher_accuracy"] == 0.95 and v["notes"] == []
    assert [s["name"] for s in verdict.rank_students(result)] == ["cnn-kd", "linear-kd", "tree-kd", "linear-labels"]


def test_verdict_picks_the_best_ranked_method_that_passes_the_sanity_check():
    result = make_result()
    m = verdict.decide(result)["method"]
    # saliency has the best mean rank but keeps rho 0.8 > 0.5 after full randomisation: set aside.
    # grad_x_input and integrated_gradients tie on mean rank; grad_x_input's deletion AUC (0.22) is lower.
    ranking = result["explanation_ranking"]["linear-kd"]
    assert m["name"] == "grad_x_input" and m["model"] == "linear-kd"
    assert m["mean_rank"] == ranking["grad_x_input"]["mean_rank"]
    assert m["scores"]["deletion_auc"] == result["explanations"]["linear-kd"]["grad_x_input"]["deletion_auc"]
    assert m["sanity"] == {"layer": "conv1", "rho": 0.1, "passed": True}
    assert m["failed_sanity"] == {"saliency": 0.8} and not m["all_failed_sanity"]
    assert m["runner_up"] == {"name": "integrated_gradients", "mean_rank": ranking["integrated_gradients"]["mean_rank"],
                              "deletion_auc": 0.25}
    assert m["best_on"] == sum(r == 1 for r in ranking["grad_x_input"]["ranks"].values())


def test_without_a_sanity_check_the_best_mean_rank_wins_and_when_all_fail_it_is_flagged():
    result = make_result()
    del result["analysis"]["randomization"]
    m = verdict.decide(result)["method"]
    assert m["name"] == "saliency" and m["sanity"] is None and m["failed_sanity"] == {}
    result = make_result()
    result["explanation_ranking"]["linear-kd"] = {"saliency": {"ranks": {"infidelity": 1}, "mean_rank": 1.0}}
    m = verdict.decide(result)["method"]
    assert m["name"] == "saliency" and m["all_failed_sanity"]
    assert "Every ranked method failed the sanity check" in verdict.as_text(verdict.decide(result))


def test_verdict_is_json_ready():
    v = verdict.decide(make_result())
    assert json.loads(json.dumps(v)) == v


def test_verdict_text_states_both_rules_and_the_numbers():
    v = verdict.decide(make_result())
    text = verdict.as_text(v)
    student, method = text.split("\n\n")
    assert student.startswith("Most faithful readable student: linear-kd (linear model over PCA, 250 parameters)")
    assert "agreement 0.8200, KL 0.2500, accuracy 0.8100; teacher accuracy 0.9500" in student
    assert "Next: tree-kd (agreement 0.8200, KL 0.3000)" in student and "cnn-kd (small CNN, 13,706 parameters)" in student
    assert f"Rule: {verdict.STUDENT_RULE}." in student
    assert method.startswith("Explanation to trust for linear-kd: grad_x_input, mean rank")
    assert "deletion AUC 0.2300" in method and "rho 0.10 (passed)" in method
    assert "Set aside for failing the sanity check: saliency (rho 0.80)" in method
    assert "below 0.5" in method and "lower deletion AUC" in method


def test_without_readable_students_the_most_faithful_other_student_is_named():
    result = make_result()
    for name in ("tree-kd", "linear-kd", "linear-labels"):
        del result["models"][name]
    v = verdict.decide(result)
    assert v["student"]["name"] == "cnn-kd" and not v["student"]["readable"] and v["least_readable"] is None
    assert v["notes"] == ["no tree or linear student in this run"]
    assert verdict.as_text(v).startswith("No tree or linear student in this run; the most faithful student: cnn-kd")


@pytest.mark.parametrize("drop", ["students", "explanations", "everything"])
def test_missing_pieces_give_a_sentence_not_an_error(drop):
    result = make_result()
    if drop == "students":
        result["models"] = {"teacher": result["models"]["teacher"]}
    elif drop == "explanations":
        del result["explanations"], result["explanation_ranking"]
    else:
        result = {}
    v = verdict.decide(result)
    text = verdict.as_text(v)
    assert json.loads(json.dumps(v)) == v and len(text.split("\n\n")) == 2
    if drop == "students":
        assert v["student"] is None and text.startswith("Student: none to recommend")
        assert v["method"]["model"] == "teacher"  # the teacher's explanation is still recommended
    elif drop == "explanations":
        assert v["student"]["name"] == "linear-kd" and v["method"] is None
        assert "Explanation: none to recommend: this run has no explanation-method ranking for linear-kd" in text
    else:
        assert v["student"] is None and v["method"] is None and "no model to explain" in text


# --------------------------------------------------------------------------- summary figures


def test_faithfulness_matrix_holds_the_results_numbers():
    result = make_result()
    rows, cols, m = _figures.faithfulness_matrix(result, "deletion_auc")
    assert rows == list(result["models"]) and cols == list(METHODS)
    for i, name in enumerate(rows):
        for j, method in enumerate(cols):
            if method in result["explanations"][name]:
                assert m[i, j] == result["explanations"][name][method]["deletion_auc"]
            else:
                assert np.isnan(m[i, j])  # grad_cam of the tree and linear students
    assert np.isnan(m).sum() == 3
    assert _figures.faithfulness_matrix({}, "deletion_auc")[2].shape == (0, 0)


def test_readability_and_faithfulness_figures_are_written(tmp_path):
    result = make_result()
    figures = _figures.summary_figures(str(tmp_path), result)
    assert figures == {_figures.READABILITY_TITLE: "figures/readability.png",
                       _figures.FAITHFULNESS_TITLE: "figures/faithfulness.png"}
    for rel in figures.values():
        img = matplotlib.image.imread(tmp_path / rel)
        assert os.path.getsize(tmp_path / rel) > 15_000 and img.shape[1] > 500 and img[..., :3].std() > 0.05
    assert _figures.summary_figures(str(tmp_path / "empty"), {"models": {}}) == {}


def test_spread_labels_keeps_the_gap_and_moves_only_what_it_must():
    assert _figures._spread_labels([0.5, 0.51, 0.9], 0.05) == pytest.approx([0.5, 0.55, 0.9])
    assert _figures._spread_labels([0.3, 0.1], 0.05) == [0.3, 0.1]


# --------------------------------------------------------------------------- overlays and examples


def test_overlay_blends_grey_image_and_colour_by_the_stated_formula():
    image = np.array([[0.0, 1.0], [2.0, 3.0]])[..., None]  # grey after min-max: [[0, 1/3], [2/3, 1]]
    attribution = np.array([[0.0, -1.0], [2.0, 4.0]])[..., None]  # heat |a| / max: [[0, .25], [.5, 1]]
    out = _plots.overlay(image, attribution, alpha=0.5, cmap="inferno")
    gray = np.array([[0.0, 1 / 3], [2 / 3, 1.0]])
    heat = np.array([[0.0, 0.25], [0.5, 1.0]])
    colour = plt.get_cmap("inferno")(heat)[..., :3]
    a = 0.5 * heat[..., None]
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out, (1 - a) * gray[..., None] + a * colour, atol=1e-12)
    np.testing.assert_allclose(out[0, 0], [0, 0, 0])  # no attribution: the grey pixel itself
    np.testing.assert_allclose(out[1, 1], 0.5 * 1.0 + 0.5 * np.array(plt.get_cmap("inferno")(1.0)[:3]))
    # a zero map leaves the grey image; alpha 1 shows the pure colour where the map peaks
    np.testing.assert_allclose(_plots.overlay(image, np.zeros_like(image)), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_allclose(_plots.overlay(image, attribution, alpha=1.0)[1, 1], colour[1, 1])


def test_overlay_of_rgb_uses_the_channel_mean_and_checks_its_arguments():
    image = np.stack([np.zeros((2, 2)), np.ones((2, 2)), 2 * np.eye(2)], -1)  # channel mean: eye(2)
    np.testing.assert_allclose(_plots.overlay(image, np.zeros((2, 2, 3)))[..., 0], np.eye(2))
    with pytest.raises(ValueError, match="differ in height/width"):
        _plots.overlay(image, np.zeros((3, 2, 1)))
    with pytest.raises(ValueError, match="alpha"):
        _plots.overlay(image, np.zeros((2, 2, 1)), alpha=1.5)


def test_one_per_class_takes_the_first_image_of_each_class_in_class_order():
    np.testing.assert_array_equal(_plots.one_per_class([3, 1, 3, 0, 1, 2]), [3, 1, 5, 0])
    np.testing.assert_array_equal(_plots.one_per_class([3, 1, 3, 0, 1, 2], limit=2), [3, 1])
    np.testing.assert_array_equal(_plots.one_per_class([2, 2]), [0])
    # on the pipeline's class-stratified sample: one image per class whether the sample is larger or smaller
    labels = np.arange(200) % 10
    for n, classes in ((25, 10), (4, 4)):
        sample = labels[data.stratified_indices(labels, n, seed=0)]
        shown = sample[_plots.one_per_class(sample)]
        assert sorted(shown) == list(range(classes))


# --------------------------------------------------------------------------- mosaics and fixed layouts


@pytest.fixture
def drawn(monkeypatch):
    """Every figure `_plots.save_figure` writes, in order, kept for inspection after it is saved."""
    figures, save = [], _plots.save_figure

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(_plots, "save_figure", keep)
    return figures


def test_mosaic_puts_each_panel_at_its_corner_on_white():
    panels = [_plots.Panel(0, 0, np.full((2, 3, 3), 0.1)), _plots.Panel(0, 1, np.full((2, 3, 3), 0.2)),
              _plots.Panel(1, 0.5, np.full((2, 3, 4), 0.3))]
    canvas = _plots.mosaic(panels, gap=(1, 1))
    # rows: 2 pixels and a gap of 1, so row 1 starts at y = 3; columns: 3 + 1, so column 1 at x = 4, 0.5 at x = 2
    expected = np.ones((5, 7, 4))
    expected[0:2, 0:3, :3] = 0.1
    expected[0:2, 4:7, :3] = 0.2
    expected[3:5, 2:5] = 0.3
    np.testing.assert_array_equal(canvas, expected)


def test_signed_maps_use_rdbu_on_a_symmetric_scale_per_map():
    m = np.array([[-2.0, 0.0], [0.7, 2.0]])
    cmap = plt.get_cmap("RdBu_r")
    np.testing.assert_array_equal(_plots._signed_rgba(m), cmap(matplotlib.colors.Normalize(-2, 2)(m)))
    np.testing.assert_array_equal(_plots._signed_rgba(m)[0, 1], cmap(0.5))  # 0: the white middle of the map
    np.testing.assert_array_equal(_plots._signed_rgba(3 * m), _plots._signed_rgba(m))  # each map on its own scale


def test_grid_places_axes_with_margins_and_gaps_in_inches():
    figsize = (10.0, 5.0)
    fig, axes = plt.subplots(2, 2, figsize=figsize, gridspec_kw=_plots._grid(
        figsize, 2, 2, left=1.0, right=0.5, top=0.25, bottom=0.75, wspace=0.5, hspace=1.0))
    # Axes (10 - 1 - 0.5 - 0.5) / 2 = 4 wide and (5 - 0.25 - 0.75 - 1) / 2 = 1.5 high
    inches = [np.array(ax.get_position().extents) * [10, 5, 10, 5] for ax in axes.flat]
    np.testing.assert_allclose(inches, [[1, 3.25, 5, 4.75], [5.5, 3.25, 9.5, 4.75], [1, 0.75, 5, 2.25],
                                        [5.5, 0.75, 9.5, 2.25]], atol=1e-12)
    plt.close(fig)


def test_attribution_grid_is_one_image_of_the_overlays_with_every_label(tmp_path, drawn):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 8, 8, 1))
    maps = {"teacher": rng.normal(size=images.shape), "student": rng.normal(size=images.shape)}
    path = str(tmp_path / "grid.png")
    _plots.attribution_grid(path, images, maps, ["label 3", "label 5"], "saliency: a title")
    (fig,) = drawn
    (ax,) = fig.axes
    (image,) = ax.images
    canvas = image.get_array()
    # 8-pixel panels 1 pixel apart: row i, column j starts at (9 i, 9 j); column 0 the grey input
    assert canvas.shape == (17, 26, 4)
    for i in range(2):
        grey = np.round(255 * _plots._gray(images[i]))
        np.testing.assert_array_equal(canvas[9 * i:9 * i + 8, 0:8, :3], np.repeat(grey[..., None], 3, -1))
        for j, name in enumerate(maps, start=1):
            expected = np.round(255 * _plots.overlay(images[i], maps[name][i]))
            np.testing.assert_array_equal(canvas[9 * i:9 * i + 8, 9 * j:9 * j + 8, :3], expected)
    assert (canvas[8] == 255).all() and (canvas[:, 8] == 255).all()  # white gaps
    # column titles centred over the first row, row labels beside each row, the title on top
    labels = {t.get_text(): t.get_position() for t in ax.texts}
    assert set(labels) == {"input", "teacher", "student", "label 3", "label 5"}
    assert [labels[n][0] for n in ("input", "teacher", "student")] == [3.5, 12.5, 21.5]
    assert labels["label 3"][1] == 3.5 and labels["label 5"][1] == 12.5 and labels["label 5"][0] < -0.5
    assert [t.get_text() for t in fig.texts] == ["saliency: a title"]
    # the saved PNG shows each image pixel where the Axes puts it
    png = matplotlib.image.imread(path)
    for (r, c) in [(0, 0), (3, 13), (12, 22), (16, 25)]:
        x, y = ax.transData.transform((c, r))
        np.testing.assert_allclose(png[int(png.shape[0] - y), int(x), :3], canvas[r, c, :3] / 255, atol=1 / 255)


def test_soft_tree_centres_each_node_over_its_children_and_draws_each_leafs_distribution(tmp_path, drawn):
    rng = np.random.default_rng(2)
    depth, names = 3, ["zero", "one", "two"]
    filters = rng.normal(size=(2**depth - 1, 8, 8, 1))
    leaf_probs = rng.dirichlet(np.ones(3), size=2**depth)
    _figures.soft_tree(str(tmp_path / "tree.png"), "tree-kd", filters, leaf_probs, depth, names)
    (fig,) = drawn
    ax, ax_leaf = fig.axes
    x = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert set(x) == {f"node {n}" for n in range(7)}
    for node in range(3):
        assert x[f"node {node}"] == pytest.approx((x[f"node {2 * node + 1}"] + x[f"node {2 * node + 2}"]) / 2)
    assert [x[f"node {n}"] for n in range(3, 7)] == sorted(x[f"node {n}"] for n in range(3, 7))
    # each node's filter at its title's column: the RdBu map of its channel sum
    canvas = ax.images[0].get_array()
    for node in range(7):
        left = int(x[f"node {node}"] + 0.5 - 4)
        top = int(np.floor(np.log2(node + 1))) * (canvas.shape[0] - 8) // 2  # 3 rows 8 high, 2 equal strides
        np.testing.assert_array_equal(canvas[top:top + 8, left:left + 8],
                                      np.round(255 * _plots._signed_rgba(filters[node].sum(-1))))
    # leaves: two under each deepest node, titled with the most likely class, one bar per class of that height
    assert ax_leaf.get_xlim() == ax.get_xlim()
    leaf_x = [t.get_position()[0] for t in ax_leaf.texts]
    assert [t.get_text() for t in ax_leaf.texts] == [names[k] for k in leaf_probs.argmax(1)]
    for k in range(4):
        assert (leaf_x[2 * k] + leaf_x[2 * k + 1]) / 2 == pytest.approx(x[f"node {3 + k}"])
    bars = ax_leaf.collections[0].get_paths()
    heights = [np.ptp(p.vertices[:, 1]) for p in bars]
    np.testing.assert_allclose(heights, leaf_probs.ravel())


def _overhang(fig) -> np.ndarray:
    """How far (inches) everything drawn in a saved (so closed) figure reaches past its left, bottom, right, top
    edges; <= 0 where it stays inside."""
    FigureCanvasAgg(fig).draw()  # a closed figure has lost its canvas; drawing places the tick labels
    bb = fig.get_tightbbox(fig.canvas.get_renderer())  # inches: axes, their labels and texts, figure texts
    w, h = fig.get_size_inches()
    return np.array([-bb.x0, -bb.y0, bb.x1 - w, bb.y1 - h])


def test_every_label_of_every_figure_lies_inside_it(tmp_path, drawn):
    """The layouts are fixed up front (no tight_layout): margins sized from the labels must hold them."""
    result, prep, trained, found = _fake_run()
    result["models"]["teacher"]["params"] = 3  # a short x axis, and a run whose names are long
    found.maps = {f"{name}-with-a-much-longer-name": per for name, per in found.maps.items()}
    found.analysis = {**found.analysis, "cka": {"cnn-kd": {"teacher_layers": ["conv1", "a_long_layer_name"],
                                                           "student_layers": ["conv1", "dense"],
                                                           "matrix": np.array([[0.9, 0.2], [0.3, 0.8]])}}}
    found.trees = {"tree-kd": {"filters": np.zeros((3, 8, 8, 1)), "leaf_probs": np.full((4, 3), 1 / 3), "depth": 2,
                               "usage": {"hard": np.eye(3, 4)}}}
    found.linear = {"linear-kd": {"templates": np.ones((3, 8, 8, 1))}}
    _figures.summary_figures(str(tmp_path), result)
    _figures.write_figures(str(tmp_path), prep, trained, found)
    assert len(drawn) == 2 + len(METHODS) + 9  # readability, faithfulness; one per method; 7 more, tree and usage
    for fig in drawn:
        name = fig.texts[0].get_text() if fig.texts else fig.axes[0].get_title()
        assert (_overhang(fig) <= 0.01).all(), (name, _overhang(fig))
    # the long model names over the attribution columns widen the panels rather than run into each other
    titles = sorted((t.get_window_extent() for t in drawn[2].axes[0].texts if t.get_rotation() == 0),
                    key=lambda b: b.x0)
    assert len(titles) == 1 + len(found.maps) and all(a.x1 < b.x0 for a, b in zip(titles, titles[1:]))


# --------------------------------------------------------------------------- write_figures and the page


def _fake_run(n_images=6, classes=3, hw=8):
    """What pipeline.explain_and_report hands to write_figures: prep, trained models and the audit."""
    rng = np.random.default_rng(0)
    labels = np.arange(n_images) % classes  # a stratified sample with repeats: 0 1 2 0 1 2
    images = rng.normal(size=(n_images, hw, hw, 1)).astype(np.float32)
    result = make_result()
    names = list(result["models"])
    maps = {name: {m: rng.normal(size=images.shape) for m in METHODS if m in result["explanations"][name]}
            for name in names}
    curves = {name: {m: {"deletion": np.linspace(1, 0, 5), "insertion": np.linspace(0, 1, 5)} for m in per}
              for name, per in maps.items()}
    found = types.SimpleNamespace(images=images, labels=labels, maps=maps, curves=curves,
                                  ranking=result["explanation_ranking"], analysis=result["analysis"], linear={},
                                  trees={})
    prep = types.SimpleNamespace(class_names=[str(c) for c in range(classes)], x_train=np.zeros((4, hw, hw, 1)),
                                 pca=types.SimpleNamespace(components=rng.normal(size=(4, hw * hw))))
    trained = [types.SimpleNamespace(name=n, history=[{"epoch": 1, "loss": 1.0, "test_accuracy": 0.5},
                                                      {"epoch": 2, "loss": 0.5, "test_accuracy": 0.7}])
               for n in names]
    return result, prep, trained, found


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A report written from the hand-made result and fake audit: (workdir, result, figures, html)."""
    workdir = str(tmp_path_factory.mktemp("report"))
    result, prep, trained, found = _fake_run()
    figures = _figures.write_figures(workdir, prep, trained, found)
    path = _page.write_html(workdir, result, figures)
    with open(path) as f:
        return workdir, result, figures, f.read()


def test_attribution_figures_show_one_image_per_class(monkeypatch, tmp_path):
    result, prep, trained, found = _fake_run()
    drawn = []
    monkeypatch.setattr(_figures, "attribution_grid", lambda path, images, maps, labels, title: drawn.append(
        (images, maps, labels)))
    _figures.write_figures(str(tmp_path), prep, trained, found)
    assert len(drawn) == len(METHODS)
    for images, maps, labels in drawn:
        assert labels == ["label 0", "label 1", "label 2"]  # the sample held 0 1 2 0 1 2
        np.testing.assert_array_equal(images, found.images[:3])
        for name, m in maps.items():
            assert m.shape[0] == 3


def test_every_figure_has_a_caption(page):
    _, _, figures, text = page
    titles = re.findall(r"<figure><figcaption><b>(.*?)</b>", text)
    assert set(titles) == {html.escape(t) for t in figures} | {_figures.READABILITY_TITLE, _figures.FAITHFULNESS_TITLE}
    for title in [*figures, _figures.READABILITY_TITLE, _figures.FAITHFULNESS_TITLE, "Soft tree t",
                  "Soft tree t: leaf usage per class"]:
        assert _figures.figure_caption(title), title
    captions = re.findall(r'</b><br><span class="note">(.*?)</span></figcaption>', text)
    assert len(captions) == len(titles) and all(len(c) > 40 for c in captions)


def test_page_opens_with_the_verdict_and_folds_the_long_tables(page):
    workdir, result, figures, text = page
    expected = verdict.as_text(verdict.decide(result))
    section = text[text.index('<section class="verdict"'):text.index("</section>")]
    shown = [html.unescape(re.sub(r"<[^>]+>", "", p)) for p in re.findall(r"<p>(.*?)</p>", section)]
    assert shown == expected.split("\n\n")  # the CLI's text, paragraph by paragraph
    assert "<strong>Most faithful readable student:</strong> linear-kd" in section
    assert '<span class="rule">Rule: among the soft-tree and linear students' in section
    assert text.index('id="verdict"') < text.index("<h2>Models</h2>") < text.index('id="faithfulness-table"')
    assert text.index('src="figures/readability.png"') < text.index("<h2>Models</h2>")
    assert text.index('src="figures/faithfulness.png"') < text.index('id="faithfulness-table"')
    folded = text[text.index('<details id="faithfulness-table">'):]
    folded = folded[:folded.index("</details>")]
    n_rows = sum(isinstance(s, dict) for per in result["explanations"].values() for s in per.values())
    assert f"({n_rows} rows" in folded and folded.count("<tr>") == n_rows + 1  # header + one per (model, method)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert "max-width:100%" in _page.CSS and ".scroll{overflow-x:auto" in _page.CSS
    assert text.count('<div class="scroll"><table>') == text.count("<table>")
    for rel in figures.values():
        assert os.path.getsize(os.path.join(workdir, rel)) > 2000


def _screenshot(url: str, width: int, out: str) -> None:
    profile = tempfile.mkdtemp()
    try:
        subprocess.run(["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
                        f"--window-size={width},2000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium (apt-get install chromium)")
@pytest.mark.parametrize("width", [1280, 390])
def test_page_renders_in_headless_chromium(page, width, tmp_path):
    workdir = page[0]
    out = str(tmp_path / f"report_{width}.png")
    _screenshot("file://" + os.path.join(workdir, "report.html"), width, out)
    img = matplotlib.image.imread(out)[..., :3]
    assert img.shape[:2] == (2000, width)
    ink = (img < 0.9).any(-1)  # not blank: text, boxes and figures cover part of the page
    assert 0.02 < ink.mean() < 0.9 and img.std() > 0.05
    # nothing is wider than the window: the right-most column of pixels is page background
    right = img[:, -3:]
    assert (right > 0.95).all(-1).mean() > 0.98


def test_verdict_of_a_copy_does_not_change_the_result():
    result = make_result()
    before = copy.deepcopy(result)
    verdict.decide(result)
    assert result == before
