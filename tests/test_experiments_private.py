"""experiments/private_and_robust.py: its helpers, its configs, and --smoke end to end."""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from distill_jax import models
from distill_jax.app import _fit
from distill_jax.distill import privacy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def _load(name):
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    module_name = name if name.startswith("_") else f"paper_{name}"  # the script does `import _table`
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


pr = _load("private_and_robust")
table = _load("_table")
SCRIPT = os.path.join(EXPERIMENTS, "private_and_robust.py")


# --------------------------------------------------------------------------- accounting


def test_unit_inputs_use_fixed_constants_and_cosine_lr_decays():
    x = np.array([[0, 255]], np.uint8)
    np.testing.assert_allclose(pr.unit_inputs(x), [[-1.0, 1.0]])
    assert pr.cosine_lr(1.0, 0, 10) == pytest.approx(1.0)
    assert pr.cosine_lr(1.0, 5, 10) == pytest.approx(0.5)
    assert pr.cosine_lr(1.0, 10, 10) == pytest.approx(0.0)


def test_teacher_at_temperature_scales_the_logits_and_keeps_the_softmax_at_t():
    import jax


    model = models.SmallCNN(3)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    logits = np.asarray(model.apply(variables, x))
    t = _fit.Trained("teacher", model, variables, "cnn", "labels", logits, [], 0.0)
    hot = pr.teacher_at_temperature(t, 20.0)
    hot_logits = np.asarray(model.apply(hot.variables, x))
    np.testing.assert_allclose(hot_logits, 20.0 * logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hot.test_logits, 20.0 * logits, rtol=1e-6)
    np.testing.assert_allclose(jax.nn.softmax(hot_logits / 20.0), jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.apply(t.variables, x)), logits)  # the original is untouched
    with pytest.raises(ValueError, match="head"):
        pr.scale_head({"params": {"dense1": {}}}, 2.0)


def test_configs_have_three_variants():
    full, local, smoke = (table.load_config(SCRIPT, v) for v in ("full", "local", "smoke"))
    assert full.pate.dataset == "tfds:mnist" and 250 in full.pate.num_teachers
    assert local.pate.dataset == "fashion_mnist" and local.pate.fallback_dataset == "mnist5k"
    assert tuple(local.pate.num_teachers) == (100, 250) and local.robust.dataset == "digits"
    assert smoke.pate.dataset == "digits" and tuple(smoke.pate.num_teachers) == (10,)
    for c in (full, local, smoke):
        assert all(20 <= t <= 100 for t in c.robust.defensive_temperatures)
    with pytest.raises(ValueError, match="variant"):
        table.load_config(SCRIPT, "huge")


def test_parse_args():
    args = pr.parse_args(["--smoke", "--workdir", "/tmp/x", "--parts", "pate"])
    assert (args.variant, args.workdir, args.parts) == ("smoke", "/tmp/x", "pate")
    assert pr.parse_args([]).variant == "full"
    with pytest.raises(SystemExit):
        pr.parse_args(["--smoke", "--local"])


def test_main_reads_the_config_of_the_variant_and_applies_parts_seed_and_data_dir():
    def run(c, variant, workdir):
        return c, variant, workdir

    c, variant, workdir = table.main(["--smoke", "--parts", "robust", "--seed", "5", "--data_dir", "/d"], SCRIPT,
                                     "d", pr.WORKDIR, run, extra=pr.EXTRA_ARGS)
    assert (c.parts, c.seed, c.data_dir, variant, workdir) == ("robust", 5, "/d", "smoke", pr.WORKDIR)
    default, _, _ = table.main(["--local"], SCRIPT, "d", pr.WORKDIR, run, extra=pr.EXTRA_ARGS)
    assert default.parts == table.load_config(SCRIPT, "local").parts  # no --parts: the config's


# --------------------------------------------------------------------------- --smoke end to end


def test_smoke_runs_end_to_end(tmp_path):
    lines = []
    out = pr.main(["--smoke", "--workdir", str(tmp_path)], echo=lines.append)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    text = (tmp_path / "results.md").read_text()
    assert saved["variant"] == "smoke" and saved["wall_s"] > 0 and "hardware" in saved
    assert "SCALED DOWN" in text and "data-independent" in text and "Carlini" in text

    # (a) PATE: finite epsilons that grow as sigma falls; accuracies in [0, 1]
    pate = out["pate"]
    gnmax = [r for r in pate["rows"] if r["aggregator"] == "GNMax"]
    assert len(gnmax) == 3
    by_sigma = sorted(gnmax, key=lambda r: r["sigma"])
    eps = [r["epsilon"] for r in by_sigma]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert all(a > b for a, b in zip(eps, eps[1:])), eps  # smaller sigma, larger epsilon
    for r in pate["rows"]:
        assert math.isfinite(r["epsilon"]) and r["queries"] == 100 and 0 <= r["answered"] <= r["queries"]
        assert r["epsilon_data_dependent"] <= r["epsilon"] + 1e-9  # never above the data-independent bound
        if r["student_accuracy"] is not None:
            assert 0.0 <= r["student_accuracy"] <= 1.0
    assert all(r["answered"] == r["queries"] for r in gnmax)
    assert any(r["aggregator"] == "Confident GNMax" for r in pate["rows"])
    kinds = {ref["kind"] for ref in pate["references"]}
    assert kinds == {"baseline", "true_labels", "ensemble"}
    assert len(pate["published"]) == 3 and "| Papernot et al., ICLR 2018, Table 2 |" in text

    # (b) robustness: the four rows, accuracies in [0, 1], explanation scores finite
    rows = {r["model"]: r for r in out["robust"]["rows"]}
    assert len(rows) == 5
    assert any(name.startswith("teacher (standard)") for name in rows)
    assert any("PGD-trained" in name for name in rows)
    assert any(name.startswith("cnn-kd") for name in rows)
    defensive = ("cnn-defensive (T=20), teacher at T=1", "cnn-defensive (T=20), teacher at T")
    assert set(defensive) <= set(rows)
    for name, r in rows.items():
        assert 0.0 <= r["accuracy"] <= 1.0
        a = r["attacks"]["0.5"]
        assert 0.0 <= a["fgsm"] <= 1.0 and 0.0 <= a["pgd"] <= 1.0
        assert math.isfinite(r["saliency_max_sensitivity"]) and math.isfinite(r["ig_deletion_auc"])
        assert f"| {name} |" in text
        if not name.startswith("teacher (standard)"):
            assert -1.0 <= r["ig_spearman_vs_teacher"] <= 1.0 and 0.0 <= a["transfer_pgd"] <= 1.0
    for name in defensive:
        assert 0.0 <= rows[name]["attacks"]["0.5"]["pgd_rescaled"] <= 1.0
        assert rows[name]["logit_spread"] > 0 and 0.0 <= rows[name]["saturated"] <= 1.0
    assert any(line.startswith("robust: cnn-kd") for line in lines)


def test_membership_smoke_attacks_every_target_and_reports_the_private_epsilons(tmp_path):
    mi = _load("membership_inference")
    lines = []
    mi.main(["--smoke", "--out", str(tmp_path / "mi.json")], echo=lines.append)
    res = json.loads((tmp_path / "mi.json").read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["teacher (not private)", "labels student", "kd student (T = 1)",
                          "DP-SGD, teacher's architecture", "PATE student"]
    for r in rows.values():
        for attack in ("loss", "lira"):
            m = r[attack]
            assert 0.0 <= m["auc"] <= 1.0 and m["members"] == m["non_members"] == 300
            assert 0.0 <= m["tpr_at_fpr_0.001"] <= m["tpr_at_fpr_0.01"] <= 1.0
    s = res["settings"]
    dp = rows["DP-SGD, teacher's architecture"]["privacy"]
    assert dp["epsilon"] == privacy.dp_sgd_epsilon(dp["steps"], batch_size=s["batch_size"], n=300,
                                                   noise_multiplier=s["dp_noise_multiplier"], delta=s["delta"])
    pate = rows["PATE student"]["privacy"]
    assert pate["epsilon_data_dependent"] <= pate["epsilon"]
    assert rows["teacher (not private)"]["privacy"] is None
    assert "\n| PATE student |" in "\n".join(lines)
