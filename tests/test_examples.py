"""examples/: the NNX and Equinox CNNs run end to end with --quick (train, distil into a tree, explain)."""
import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["nnx_cnn", "equinox_cnn"])
def test_example_trains_distils_and_explains(name, capsys):
    if name == "equinox_cnn":
        pytest.importorskip("equinox")
    result = _load(name).main(["--quick"])
    printed = capsys.readouterr().out
    for key in ("teacher_accuracy", "tree_accuracy", "agreement", "ig_completeness_error", "deletion_auc_ig",
                "deletion_auc_grad_cam", "deletion_auc_random"):
        assert f"{key:24s} {result[key]:.3f}" in printed, (key, printed)
    # after a few epochs the CNN is well above chance (0.1), and the tree follows it
    assert result["teacher_accuracy"] > 0.5, result
    assert result["agreement"] > 0.3 and result["tree_accuracy"] > 0.3, result
    # IG completeness: sum_i IG_i = f(x) - f(0) for the target logit, per image, to the 32-step rule's error
    gap, ig_sum = result["logit_gap"], result["ig_sum"]
    assert gap.shape == ig_sum.shape == (32,) and np.max(np.abs(gap)) > 1.0
    np.testing.assert_allclose(ig_sum, gap, rtol=0.05, atol=0.05)
    assert result["ig_completeness_error"] < 0.05
    # deletion AUCs are areas under probabilities; IG's pixels matter far more than random ones
    for key in ("deletion_auc_ig", "deletion_auc_grad_cam", "deletion_auc_random", "tree_deletion_auc_ig"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["deletion_auc_ig"] < 0.5 * result["deletion_auc_random"], result
