"""Every score the job reports, described once: its key in metrics.json, the library function that
computes it, its direction and the words the report uses for it.

The audit's method ranking, the verdict, the report's tables, notes and figure captions, the choice of
T and alpha (`distill.tuning`) and the config's checks read these specs; nothing else spells out a
metric's direction.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from distill_jax.metrics._axiomatic import ig_completeness_error
from distill_jax.metrics._complexity import complexity, sparseness
from distill_jax.metrics._faithfulness import faithfulness_correlation, infidelity
from distill_jax.metrics._fidelity import accuracy, agreement, mean_kl
from distill_jax.metrics._perturbation_order import deletion_auc, insertion_auc
from distill_jax.metrics._robustness import max_sensitivity
from distill_jax.metrics._similarity import spearman, top_k_overlap


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One reported score.

    Attributes:
      name: its key in metrics.json.
      function: the library function that computes it (per example; the report gives the mean).
      higher_is_better: its direction.
      label: a short name for tables and sentences ("deletion AUC").
      caption: one line on what it measures and how to read it.
      family: "fidelity" (a student against the teacher), "faithfulness" (a map against the model),
        "teacher_agreement" (a student's map against the teacher's), "quality" (a map alone or
        under perturbation), "axiomatic" or "robustness".
      ranked: whether the method ranking (`audit.rank_methods`) uses it.
    """

    name: str
    function: Callable
    higher_is_better: bool
    label: str
    caption: str
    family: str
    ranked: bool = False

    @property
    def direction(self) -> int:
        """+1 when higher is better, -1 when lower is."""
        return 1 if self.higher_is_better else -1

    @property
    def better(self) -> str:
        """"higher" or "lower", as the report says which way is better."""
        return "higher" if self.higher_is_better else "lower"


_SPECS = (
    MetricSpec("accuracy", accuracy, True, "accuracy", "share of test images classified correctly", "fidelity"),
    MetricSpec("agreement", agreement, True, "agreement", "share of test images on which the student's top-1 class "
               "is the teacher's", "fidelity"),
    MetricSpec("kl", mean_kl, False, "KL(teacher || student)", "mean KL divergence of the student's softmax from the "
               "teacher's", "fidelity"),
    MetricSpec("deletion_auc", deletion_auc, False, "deletion AUC", "probability of the true class as the "
               "most-attributed pixels are removed: a fast drop means the map found pixels the model needs; "
               "Petsiuk et al. 2018",
               "faithfulness", ranked=True),
    MetricSpec("insertion_auc", insertion_auc, True, "insertion AUC", "probability of the true class as the "
               "most-attributed pixels are inserted into a blurred image; Petsiuk et al. 2018", "faithfulness",
               ranked=True),
    MetricSpec("spearman_vs_teacher", spearman, True, "rank correlation with the teacher's map",
               "Spearman correlation of a student's map with the teacher's on the same image", "teacher_agreement"),
    MetricSpec("top10_overlap_vs_teacher", top_k_overlap, True, "top-10% overlap with the teacher's map",
               "share of the teacher's 10% most-attributed pixels that the student's map also ranks there",
               "teacher_agreement"),
    MetricSpec("faithfulness_correlation", faithfulness_correlation, True, "faithfulness correlation",
               "correlation of the attribution of random pixel subsets with the logit drop when they are removed; "
               "Bhatt et al. 2020",
               "quality", ranked=True),
    MetricSpec("infidelity", infidelity, False, "infidelity", "squared error of the map's first-order prediction of the "
               "logit change under Gaussian noise, after the best rescaling; Yeh et al. 2019", "quality", ranked=True),
    MetricSpec("sparseness", sparseness, True, "sparseness", "Gini index of |map|: how few pixels carry it; Chalasani et al. 2020",
               "quality", ranked=True),
    MetricSpec("complexity", complexity, False, "complexity", "entropy of |map| as a distribution over pixels; Bhatt et al. 2020",
               "quality", ranked=True),
    MetricSpec("ig_completeness_error", ig_completeness_error, False, "IG completeness error",
               "how far integrated gradients are from summing to f(x) - f(baseline), relative", "axiomatic"),
    MetricSpec("saliency_max_sensitivity", max_sensitivity, False, "saliency max-sensitivity",
               "largest relative change of the saliency map under small uniform input noise", "robustness"),
)

METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def metric_names(family: str | None = None, *, ranked: bool | None = None) -> tuple[str, ...]:
    """The names of the registered metrics of a family (all when None), optionally only the ranked ones,
    in registry order."""
    return tuple(s.name for s in _SPECS
                 if (family is None or s.family == family) and (ranked is None or s.ranked == ranked))
