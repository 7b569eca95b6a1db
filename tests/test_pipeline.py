"""pipeline helpers that need no training: history.json bookkeeping across --resume."""
import json

from distill_jax.app import _fit


def _epochs(history):
    return [e["epoch"] for e in history]


def test_fresh_run_starts_history_anew(tmp_path):
    path = str(tmp_path / "history.json")
    json.dump({"teacher": [{"epoch": 1, "loss": 9.0}], "old-student": [{"epoch": 1}]}, open(path, "w"))
    _fit.record_history(path, "teacher", [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}], resume=False)
    _fit.record_history(path, "cnn-kd", [{"epoch": 1, "loss": 2.0}], resume=False)
    saved = json.load(open(path))
    assert set(saved) == {"teacher", "cnn-kd"}
    assert saved["teacher"][0]["loss"] == 1.0 and _epochs(saved["teacher"]) == [1, 2]


def test_resume_keeps_the_epochs_of_the_earlier_run(tmp_path):
    path = str(tmp_path / "history.json")
    _fit.record_history(path, "teacher", [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}], resume=False)
    # the resumed teacher continued mid-epoch 2 and ran epochs 2-3; a finished student ran nothing now
    merged = _fit.record_history(path, "teacher", [{"epoch": 2, "loss": 0.4}, {"epoch": 3, "loss": 0.3}],
                                     resume=True)
    assert _epochs(merged) == [1, 2, 3] and merged[1]["loss"] == 0.4
    _fit.record_history(path, "cnn-kd", [{"epoch": 1, "loss": 2.0}], resume=True)
    assert _epochs(_fit.record_history(path, "cnn-kd", [], resume=True)) == [1]
    assert _epochs(json.load(open(path))["teacher"]) == [1, 2, 3]
