"""Did distillation help? Paired differences of a distilled student and its labels twin on the same test images,
with bootstrap intervals; the verdict's outcome and sentence."""
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import metrics
from distill_jax.audit import verdict


def test_paired_bootstrap_matches_the_normal_interval_of_a_proportion():
    d = np.r_[np.ones(300), np.zeros(700)]  # 30 % of 1,000 images
    mean, low, high = metrics.paired_bootstrap(d, resamples=4000, seed=1)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 1000)
    assert mean == pytest.approx(0.3)
    assert low == pytest.approx(0.3 - half, abs=0.006) and high == pytest.approx(0.3 + half, abs=0.006)


def test_paired_bootstrap_of_a_constant_is_that_constant_and_is_reproducible():
    assert metrics.paired_bootstrap(np.full(17, -0.25)) == (-0.25, -0.25, -0.25)
    d = np.random.default_rng(0).normal(size=50)
    assert metrics.paired_bootstrap(d, seed=3) == metrics.paired_bootstrap(d, seed=3)
    with pytest.raises(ValueError, match="differences must be a non-empty"):
        metrics.paired_bootstrap(np.zeros((0,)))


def test_distillation_gain_hand_computed():
    teacher = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1, 1, 1])
    student = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])   # agrees on 3 of 4, correct on 2
    twin = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])      # agrees on 2 of 4, correct on 3
    g = metrics.distillation_gain(student, twin, teacher, labels, resamples=500)
    assert g["agreement"]["difference"] == pytest.approx(0.25)
    assert g["accuracy"]["difference"] == pytest.approx(-0.25)
    kl = lambda s: float(metrics.mean_kl(jnp.asarray(s, jnp.float32), jnp.asarray(teacher, jnp.float32)))  # noqa: E731
    assert g["kl"]["difference"] == pytest.approx(kl(student) - kl(twin), abs=1e-5)
    for score in g.values():
        assert score["ci95"][0] <= score["difference"] <= score["ci95"][1]


def _result(ci_agreement, ci_kl, d_agreement=0.02, d_kl=-0.04):
    gain = {"twin": "tree-labels", "agreement": {"difference": d_agreement, "ci95": ci_agreement},
            "accuracy": {"difference": 0.01, "ci95": [-0.01, 0.03]}, "kl": {"difference": d_kl, "ci95": ci_kl}}
    return {"models": {"teacher": {"accuracy": 0.9}, "tree-labels": {"accuracy": 0.8, "agreement": 0.85, "kl": 0.2},
                       "tree-kd": {"accuracy": 0.81, "agreement": 0.87, "kl": 0.16, "vs_labels": gain}}}


@pytest.mark.parametrize("ci_agreement, ci_kl, outcome", [
    ([0.01, 0.03], [-0.05, -0.03], "helped"),
    ([-0.03, -0.01], [-0.05, -0.03], "hurt"),
    ([-0.01, 0.03], [-0.05, -0.03], "lower KL only"),
    ([-0.01, 0.03], [-0.01, 0.02], "no clear difference"),
])
def test_verdict_names_the_outcome_of_each_distilled_student(ci_agreement, ci_kl, outcome):
    v = verdict.decide(_result(ci_agreement, ci_kl))
    assert [(d["name"], d["twin"], d["outcome"]) for d in v["distillation"]] == [("tree-kd", "tree-labels", outcome)]
    text = verdict.as_text(v)
    assert f"tree-kd against tree-labels: {outcome}. It agrees with the teacher on 2.0 points more test images" in text


def test_verdict_without_a_comparison_has_no_distillation_paragraph():
    result = _result([0.01, 0.03], [-0.05, -0.03])
    del result["models"]["tree-kd"]["vs_labels"]
    assert "Did distillation help" not in verdict.as_text(verdict.decide(result))
