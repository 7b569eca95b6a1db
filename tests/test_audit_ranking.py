"""Ranking attribution methods on the explanation-quality metrics, and the report table built from it."""
import numpy as np

from distill_jax import audit
from distill_jax.app import _page


def test_rank_methods_follows_each_metrics_direction():
    scores = {
        "a": {"deletion_auc": 0.1, "insertion_auc": 0.9, "faithfulness_correlation": 0.5, "infidelity": 2.0,
              "sparseness": 0.3, "complexity": 3.0},
        "b": {"deletion_auc": 0.3, "insertion_auc": 0.5, "faithfulness_correlation": 0.7, "infidelity": 1.0,
              "sparseness": 0.3, "complexity": 4.0},
        "c": {"deletion_auc": 0.2, "insertion_auc": 0.7, "faithfulness_correlation": float("nan")},
    }
    r = audit.rank_methods(scores)
    assert r["a"]["ranks"] == {"deletion_auc": 1, "insertion_auc": 1, "faithfulness_correlation": 2, "infidelity": 2,
                               "sparseness": 1, "complexity": 1}  # a tie shares the better rank
    assert r["b"]["ranks"] == {"deletion_auc": 3, "insertion_auc": 3, "faithfulness_correlation": 1, "infidelity": 1,
                               "sparseness": 1, "complexity": 2}
    assert r["c"]["ranks"] == {"deletion_auc": 2, "insertion_auc": 2}  # NaN and missing metrics are left out
    assert r["a"]["mean_rank"] == np.mean([1, 1, 2, 2, 1, 1]) and r["c"]["mean_rank"] == 2.0


def test_quality_table_lists_best_method_first():
    result = {"explanations": {"teacher": {"saliency": {"infidelity": 2.0}, "grad_x_input": {"infidelity": 1.0}}},
              "explanation_ranking": {"teacher": audit.rank_methods(
                  {"saliency": {"infidelity": 2.0}, "grad_x_input": {"infidelity": 1.0}})}}
    header, rows = _page.quality_rows(result)
    assert header[:3] == ["model", "method", "mean rank"]
    assert [r[1] for r in rows] == ["grad_x_input", "saliency"] and rows[0][2] == "1.0000"
