"""Choosing KD temperature and alpha on a validation split: the split, the grid, the choice, the pipeline."""
import json

import numpy as np
import pytest

from distill_jax import parallel
from distill_jax.app import _audit, _fit, _page, _prepare, config
from distill_jax.distill import tuning


def test_holdout_split_takes_the_fraction_of_every_class_and_nothing_else():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 10 + [3])  # class 3 has one example: it stays for fitting
    fit, val = tuning.holdout_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    assert not set(fit) & set(val)
    assert [int(np.sum(labels[val] == c)) for c in range(4)] == [10, 6, 2, 0]
    again, _ = tuning.holdout_split(labels, 0.2, seed=0)
    other, _ = tuning.holdout_split(labels, 0.2, seed=1)
    assert np.array_equal(fit, again) and not np.array_equal(fit, other)


def test_holdout_split_keeps_one_example_of_a_two_example_class_and_refuses_bad_fractions():
    fit, val = tuning.holdout_split(np.array([0, 0, 1, 1]), 0.9, seed=0)
    assert len(val) == 2 and sorted(np.array([0, 0, 1, 1])[fit]) == [0, 1]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation fraction must be in"):
            tuning.holdout_split(np.array([0, 0, 1, 1]), bad, seed=0)
    with pytest.raises(ValueError, match="no class has two"):
        tuning.holdout_split(np.array([0, 1, 2]), 0.5, seed=0)


def test_candidates_grid_only_the_auto_settings():
    assert tuning.candidates("auto", "auto", (1, 4), (0.5, 0.9)) == [(1.0, 0.5), (1.0, 0.9), (4.0, 0.5), (4.0, 0.9)]
    assert tuning.candidates(3.0, "auto", (1, 4), (0.5, 0.9)) == [(3.0, 0.5), (3.0, 0.9)]
    assert tuning.candidates("auto", 0.7, (1, 4), (0.5,)) == [(1.0, 0.7), (4.0, 0.7)]
    assert tuning.wants_selection(["kd", "attention"], "auto", 0.9)
    assert not tuning.wants_selection(["labels", "hint"], "auto", "auto")
    assert not tuning.wants_selection(["kd"], 4.0, 0.9)


def test_validation_scores_hand_computed():
    teacher = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    student = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
    scores = tuning.validation_scores(student, teacher, np.array([1, 2]))
    kl_first = 0.5 * np.log(2) + 0.25 * np.log(0.5)
    assert scores == pytest.approx({"accuracy": 1.0, "agreement": 0.5, "kl": kl_first / 2})


def _fake_logits(per_candidate):
    """validation_logits that returns fixed logits per (T, alpha), recording the calls."""
    calls = []

    def validation_logits(t, a):
        calls.append((t, a))
        return per_candidate[(t, a)]

    return validation_logits, calls


def test_select_keeps_the_best_candidate_by_each_score():
    labels = np.array([0, 1, 2, 0])
    teacher = np.eye(3)[[0, 1, 1, 0]] * 2.0  # the teacher gets example 2 wrong
    right = np.eye(3)[labels] * 3.0  # 4/4 accurate, 3/4 agreement
    follows = np.eye(3)[[0, 1, 1, 0]] * 2.0  # the teacher's logits exactly: KL 0, 3/4 accurate, 4/4 agreement
    grid = [(1.0, 0.5), (4.0, 0.9)]
    fn, calls = _fake_logits({(1.0, 0.5): right, (4.0, 0.9): follows})
    by_accuracy = tuning.select(grid, fn, teacher, labels, score="accuracy")
    assert calls == grid and (by_accuracy.temperature, by_accuracy.alpha) == (1.0, 0.5)
    assert [r["accuracy"] for r in by_accuracy.rows] == [1.0, 0.75]
    for score in ("agreement", "kl"):
        chosen = tuning.select(grid, _fake_logits({(1.0, 0.5): right, (4.0, 0.9): follows})[0], teacher, labels,
                               score=score)
        assert (chosen.temperature, chosen.alpha) == (4.0, 0.9), score
    assert by_accuracy.as_dict()["candidates"][1]["kl"] == pytest.approx(0.0, abs=1e-9)


def test_select_breaks_accuracy_ties_by_kl_and_refuses_unknown_scores():
    labels = np.array([0, 1])
    teacher = np.array([[2.0, 0.0], [0.0, 2.0]])
    sharp, close = teacher * 5, teacher  # both fully accurate; `close` has KL 0
    fn, _ = _fake_logits({(1.0, 0.9): sharp, (2.0, 0.9): close})
    assert tuning.select([(1.0, 0.9), (2.0, 0.9)], fn, teacher, labels).temperature == 2.0
    with pytest.raises(ValueError, match="auto_score 'loss' is not known"):
        tuning.select([(1.0, 0.9)], fn, teacher, labels, score="loss")
    with pytest.raises(ValueError, match="grid is empty"):
        tuning.select([], fn, teacher, labels)


def test_config_accepts_auto_and_numbers_only():
    c = config.default_config()
    c.method.temperature = "auto"
    c.method.alpha = "auto"
    config.validate(c)
    smoke = config.apply_smoke(c)
    smoke.method.temperature = 2  # still settable after the smoke copy
    config.validate(smoke)
    c.method.temperature = "warm"
    with pytest.raises(ValueError, match="method.temperature='warm' is out of range: must be > 0, 'default' or 'auto'"):
        config.validate(c)


def test_pipeline_selects_on_held_out_training_images_and_trains_with_the_choice(tmp_path):
    c = config.apply_smoke(config.default_config())
    c.method.temperature = "auto"
    c.method.auto_temperatures = (1.0, 8.0)
    c.method.auto_alphas = (0.9,)
    c.train_limit = 400
    prep = _prepare.prepare_data(c)
    mesh = parallel.make_mesh()
    teacher = _fit.train_teacher(prep, c, mesh, None, show_progress=False)
    student = _fit.train_student("linear-kd", "linear", "kd", prep, teacher, c, mesh, None, show_progress=False)
    sel = student.settings["selection"]
    assert sel["validation_images"] == len(tuning.holdout_split(prep.y_train, 0.1, seed=c.seed)[1]) > 30
    assert [r["temperature"] for r in sel["candidates"]] == [1.0, 8.0]
    best = max(sel["candidates"], key=lambda r: (r["accuracy"], -r["kl"]))
    assert (student.settings["temperature"], student.settings["alpha"]) == (best["temperature"], 0.9)
    assert sel["temperature"] == best["temperature"] and 0 < sel["seconds"] < student.seconds  # tuning is timed
    labels_only = _fit.train_student("linear-labels", "linear", "labels", prep, teacher, c, mesh, None,
                                         show_progress=False)
    assert labels_only.settings == {}
    metrics = _audit.model_metrics(student, teacher, prep)
    assert metrics["selection"] == sel and _page.kd_settings_text(metrics).endswith("(validation)")
    header, rows = _page.selection_rows({"models": {"linear-kd": json.loads(json.dumps(metrics))}})
    assert len(rows) == 2 and sum(r[-1].startswith("chosen") for r in rows) == 1
