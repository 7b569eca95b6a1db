"""experiments/teacher_recipe.py: recipes are scored on a validation split of the training images only."""
import importlib.util
import json
import os

import pytest

from distill_jax.data import _sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("teacher_recipe", os.path.join(ROOT, "experiments", "teacher_recipe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.isdir(_sources.FASHION_MNIST_DIR),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_quick_recipes_train_on_the_fit_part_and_score_the_held_out_training_images(tmp_path):
    tr = _load()
    out = tmp_path / "recipes.json"
    lines = []
    rows = tr.main(["--recipes", "base", "aug12", "--quick", "--out", str(out)], echo=lines.append)
    assert [r["recipe"] for r in rows] == ["base", "aug12"] == [r["recipe"] for r in json.loads(out.read_text())]
    for r in rows:
        # 600 training images, 10 % of them held out: the test split is never read
        assert r["fit_images"] + r["validation_images"] == 600 and 50 <= r["validation_images"] <= 70  # per class
        assert 0.0 <= r["validation_accuracy"] <= 1.0
    assert rows[1]["overrides"] == {"epochs": 12, "augment_shift": 2, "augment_flip": True}
    assert lines[0].startswith("base: validation accuracy ")
