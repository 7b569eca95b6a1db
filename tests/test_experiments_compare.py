"""Tests of experiments/compare_methods.py and experiments/pruning.py: statistics by hand, smoke runs end to end."""
import json
import math
import os
import sys

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)

import compare_methods as cm  # noqa: E402
import pruning  # noqa: E402

from distill_jax.app import _prepare, config

# A SmallCNN teacher compiles several times faster than SeedCNN; the smoke runs test the plumbing.
FAST = ["--set", "teacher.kind=cnn", "--compilation-cache", ""]


def test_mean_std_is_sample_std():
    mean, std = cm.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert cm.mean_std([0.5]) == (0.5, 0.0)


def test_paired_hand_computed():
    # d = [0.1, 0.0, 0.1]: mean 1/15, std sqrt(1/300), t = mean / (std / sqrt 3) = 2, p(|T_2| > 2) = 1 - 2/sqrt(6)
    out = cm.paired([0.9, 0.8, 0.7], [0.8, 0.8, 0.6])
    assert out["diff"] == pytest.approx([0.1, 0.0, 0.1])
    assert out["mean"] == pytest.approx(1 / 15)
    assert out["std"] == pytest.approx(math.sqrt(1 / 300))
    assert out["t"] == pytest.approx(2.0)
    assert out["p"] == pytest.approx(1 - 2 / math.sqrt(6))  # Student t with 2 dof: P(|T| > t) = 1 - t/sqrt(t^2+2)
    assert (out["wins"], out["n"]) == (2, 3)
    assert cm.paired([0.9, 0.8, 0.7], [0.8, 0.8, 0.6], better=-1)["wins"] == 0  # smaller is better (KL)


def test_paired_degenerate_and_bad_shapes():
    out = cm.paired([1.0, 2.0], [0.0, 1.0])  # every difference equal: no t statistic
    assert out["t"] is None and out["p"] is None and out["std"] == 0.0
    with pytest.raises(ValueError, match="same 1-d shape"):
        cm.paired([1.0, 2.0], [1.0])


def test_parse_list():
    assert cm.parse_list(" 0, 1,2 ", "seeds", int) == [0, 1, 2]
    with pytest.raises(ValueError, match="--seeds"):
        cm.parse_list("a", "seeds", int)
    with pytest.raises(ValueError, match="empty"):
        cm.parse_list(" , ", "datasets")


def _runs():
    def m(seed, acc, agree=None, kl=None):
        out = {"seed": seed, "accuracy": acc, "params": 10, "train_seconds": 1.0}
        if agree is not None:
            out.update(agreement=agree, kl=kl)
        return out

    return {
        "teacher": [m(0, 0.9), m(1, 0.8)],
        "cnn-labels": [m(0, 0.8, 0.8, 0.4), m(1, 0.7, 0.7, 0.5)],
        "cnn-kd": [m(0, 0.85, 0.9, 0.2), m(1, 0.7, 0.8, 0.3)],
        "tree-kd": [m(0, 0.5, 0.5, 1.0), m(1, 0.5, 0.5, 1.0)],  # no tree-labels baseline: not paired
        "sk-tree-d8": [m(0, 0.45, 0.4, 3.0), m(1, 0.5, 0.45, 3.0)],
    }


def test_summarize_pairs_each_distilled_student_with_its_kinds_labels_student():
    out = cm.summarize(_runs(), [("tree-kd", "sk-tree-d8"), ("tree-kd", "absent")])
    assert set(out["summary"]) == {"teacher", "cnn-labels", "cnn-kd", "tree-kd", "sk-tree-d8"}
    assert "agreement" not in out["summary"]["teacher"]
    assert out["summary"]["cnn-kd"]["accuracy"]["mean"] == pytest.approx(0.775)
    assert list(out["paired"]) == ["cnn-kd vs cnn-labels", "tree-kd vs sk-tree-d8"]  # absent models are skipped
    assert out["paired"]["tree-kd vs sk-tree-d8"]["accuracy"]["diff"] == pytest.approx([0.05, 0.0])
    assert "ig_spearman" not in out["paired"]["tree-kd vs sk-tree-d8"]  # a metric neither side has
    p = out["paired"]["cnn-kd vs cnn-labels"]
    assert p["baseline"] == "cnn-labels"
    assert p["agreement"]["diff"] == pytest.approx([0.1, 0.1])
    assert p["kl"]["diff"] == pytest.approx([-0.2, -0.2]) and p["kl"]["wins"] == 2
    assert p["accuracy"]["diff"] == pytest.approx([0.05, 0.0]) and p["accuracy"]["wins"] == 1
    table = cm.markdown_tables("digits", out, 2)
    assert "| cnn-kd | cnn-labels | +0.0250 ± 0.0354 (1/2, p=0.500) | +0.1000 ± 0.0000 (2/2, p=n/a)" in table
    assert "| teacher | 10 |  | 0.8500 ± 0.0707 | — | — | — | — |" in table


def test_method_overrides_apply_to_that_methods_students_only():

    c = config.default_config()
    import ml_collections

    c.compare = ml_collections.ConfigDict(dict(method_overrides=("fm:method.mixup=1.0", "cnn-fm:method.augment_shift=2",
                                                                 "kd:method.alpha=0.3")))
    fm = cm.student_config(c, "cnn-fm", "fm")
    assert (fm.method.mixup, fm.method.augment_shift, fm.method.alpha) == (1.0, 2, "default")  # alpha: kd only
    tree_fm = cm.student_config(c, "tree-fm", "fm")
    assert (tree_fm.method.mixup, tree_fm.method.augment_shift) == (1.0, 0)  # the student-named item is cnn-fm's
    assert cm.student_config(c, "cnn-labels", "labels") is c and c.method.mixup == 0.0  # the shared config stays
    assert cm.student_config(c, "tree-kd", "kd").method.alpha == 0.3
    c.compare.method_overrides = ("fm-method.mixup=1",)
    with pytest.raises(ValueError, match="'<method or student>:<key>=<value>'"):
        cm.method_overrides(c, "fm")
    assert cm.parse_pairs("tree-fm:sk-tree-d8, a:b") == [("tree-fm", "sk-tree-d8"), ("a", "b")]
    with pytest.raises(ValueError, match="'<model>:<baseline>'"):
        cm.parse_pairs("tree-fm")


def test_linear_readability_counts_nonzeros_per_class_and_components():
    kernel = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, -1.0]])  # [components, classes]
    out = pruning.linear_readability({"linear": {"kernel": kernel, "bias": np.ones(3)}})
    assert out["nonzero_per_class"] == [2, 0, 2]
    assert out["nonzero_per_class_mean"] == pytest.approx(4 / 3)
    assert (out["nonzero_per_class_min"], out["nonzero_per_class_max"]) == (0, 2)
    assert (out["components_used"], out["components"]) == (3, 4)
    params = {"linear": {"kernel": kernel, "bias": np.ones(3)}, "conv": {"kernel": np.ones((2, 2, 1, 1))}}
    assert pruning.nonzero_kernel_weights(params) == 4 + 4  # biases (ndim 1) are not counted


@pytest.mark.parametrize("module,argv,needle", [
    (cm, ["--seeds", "a,b"], "--seeds"),
    (cm, ["--students", "forest-kd"], "forest-kd"),
    (cm, ["--set", "method.alpha=2.0"], "method.alpha"),
    (pruning, ["--sparsities", "0,1.0"], "outside [0, 1)"),
])
def test_bad_options_exit_2_with_one_line(module, argv, needle, tmp_path, capsys):
    assert module.main(argv + ["--workdir", str(tmp_path), "--compilation-cache", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_compare_methods_smoke(tmp_path):
    lines = []
    argv = ["--smoke", "--students", "cnn-labels,cnn-kd", "--workdir", str(tmp_path), *FAST]
    assert cm.main(argv, echo=lines.append) == 0
    payload = json.loads((tmp_path / "compare_methods.json").read_text())
    digits = payload["datasets"]["digits"]
    assert [r["seed"] for r in digits["runs"]["cnn-kd"]] == [0, 1]
    for m in digits["runs"]["cnn-kd"]:
        assert 0 <= m["agreement"] <= 1 and m["kl"] >= 0 and np.isfinite(m["kl"])
    diffs = [a["agreement"] - b["agreement"] for a, b in zip(digits["runs"]["cnn-kd"], digits["runs"]["cnn-labels"])]
    assert digits["paired"]["cnn-kd vs cnn-labels"]["agreement"]["diff"] == pytest.approx(diffs)
    for m in digits["runs"]["cnn-kd"]:  # integrated-gradients scores on the explained sample
        assert -1 <= m["ig_spearman"] <= 1 and 0 <= m["deletion_auc"] <= 1
    # finished seeds are kept and reused by a rerun with the same config
    assert sorted(os.listdir(tmp_path / "seeds")) == ["digits-seed0.json", "digits-seed1.json"]
    again = []
    assert cm.main(argv, echo=again.append) == 0
    assert sum("reusing" in line for line in again) == 2 and not any("cnn-kd: accuracy" in l for l in again)
    rerun = json.loads((tmp_path / "compare_methods.json").read_text())["datasets"]["digits"]["runs"]
    assert rerun["cnn-kd"] == digits["runs"]["cnn-kd"]
    assert payload["environment"]["cpu"] and payload["wall_seconds"] > 0
    md = (tmp_path / "compare_methods.md").read_text()
    assert "| cnn-kd | cnn-labels |" in md and "### digits (2 seeds" in md
    assert any("digits seed 1 cnn-kd: accuracy" in l for l in lines)
    one = []  # listing fewer seeds is the same run: seed 1's file is reused
    assert cm.main(argv + ["--seeds", "1"], echo=one.append) == 0
    assert sum("reusing" in line for line in one) == 1 and not any("accuracy" in line for line in one[:1])


def test_pruning_smoke_reaches_target_sparsity(tmp_path):
    assert pruning.main(["--smoke", "--workdir", str(tmp_path), *FAST], echo=lambda s: None) == 0
    payload = json.loads((tmp_path / "pruning.json").read_text())
    dense, sparse = payload["runs"]["linear-kd@0"][0], payload["runs"]["linear-kd@0.8"][0]
    assert dense["sparsity"] == 0 and dense["nonzero"] == dense["components"] * 10
    assert sparse["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert sum(sparse["nonzero_per_class"]) == sparse["nonzero"] == round(0.2 * dense["nonzero"])
    assert "| linear-kd@0.8 | 0.800 ± 0.000 |" in (tmp_path / "pruning.md").read_text()


def test_sklearn_baselines_match_scikit_learn_and_run_through_the_library():
    import _baselines
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    from distill_jax import parallel

    c = config.apply_smoke(config.default_config())
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    x_train, x_test = _baselines.flat_split(prep)
    # the flattened model inputs, also across ragged batches
    np.testing.assert_allclose(_baselines.flat_inputs(prep, prep.x_test[:10], batch_size=4),
                               np.asarray(prep.inputs(prep.x_test[:10])).reshape(10, -1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_test, np.asarray(prep.inputs(prep.x_test)).reshape(len(prep.x_test), -1),
                               rtol=1e-6, atol=1e-6)
    pca_mean, comps = np.asarray(prep.pca.mean), np.asarray(prep.pca.components)
    for name, fit_x, test_x in [("sk-logreg-pixels", x_train, x_test),
                                ("sk-logreg-pca", (x_train - pca_mean) @ comps.T, (x_test - pca_mean) @ comps.T)]:
        trained, info = _baselines.fit_logreg(name, prep, x_train, seed=0, mesh=mesh)
        reference = LogisticRegression(max_iter=300, random_state=0).fit(fit_x, prep.y_train)
        # the library's Linear model with the fitted coefficients gives scikit-learn's decision function
        np.testing.assert_allclose(trained.test_logits, reference.decision_function(test_x), rtol=1e-3, atol=1e-3)
        assert info["iterations"] >= 1 and isinstance(info["converged"], bool)
    teacher_logits = np.asarray(trained.test_logits)  # any logits: agreement is then a known number
    tree = _baselines.fit_tree("sk-tree-d8", prep, x_train, x_test, teacher_logits, seed=0)
    reference = DecisionTreeClassifier(max_depth=8, random_state=0).fit(x_train, prep.y_train)
    assert tree["accuracy"] == pytest.approx(reference.score(x_test, prep.y_test))
    expected_agreement = np.mean(reference.predict(x_test) == np.argmax(teacher_logits, -1))
    assert tree["agreement"] == pytest.approx(expected_agreement)
    assert tree["depth"] <= 8 and tree["params"] == reference.tree_.node_count and np.isfinite(tree["kl"])


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_experiment_smoke(tmp_path):
    import fashion_mnist

    lines = []
    assert fashion_mnist.main(["--smoke", "--workdir", str(tmp_path), *FAST], echo=lines.append) == 0
    payload = json.loads((tmp_path / "fashion_mnist.json").read_text())
    runs = payload["datasets"]["fashion_mnist"]["runs"]
    assert set(runs) == {"teacher", "tree-labels", "tree-kd", "linear-labels", "linear-kd", "linear-fm",
                         "sk-tree-d8", "sk-logreg-pca"}
    assert runs["linear-fm"][0]["train_images"] == 600 and "ig_spearman" in runs["linear-fm"][0]
    assert "ig_spearman" not in runs["sk-tree-d8"][0] and "ig_spearman" in runs["sk-logreg-pca"][0]
    paired = payload["datasets"]["fashion_mnist"]["paired"]
    assert {"tree-kd vs tree-labels", "tree-kd vs sk-tree-d8", "linear-kd vs sk-logreg-pca"} <= set(paired)
    assert "| tree-kd | sk-tree-d8 |" in (tmp_path / "fashion_mnist.md").read_text()
