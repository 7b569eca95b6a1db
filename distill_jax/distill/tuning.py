"""Choosing a student's distillation temperature and alpha on a validation split.

Hinton KD's temperature T and mix alpha (`distill.kd_term`) were set for a CNN student; a
250-parameter linear model or a soft tree may need other values. With `method.temperature` or
`method.alpha` set to `"auto"`, each student whose method has the `kd` term is first trained once
per candidate of a small grid on the training images minus a held-out validation split, and the
candidate with the best validation score is then used to train the student on every training image.
The test set is never looked at.

    score            chosen candidate
    accuracy         highest validation accuracy (ties: lower KL)
    agreement        highest top-1 agreement with the teacher (ties: lower KL)
    kl               lowest KL(teacher || student) at T = 1 (ties: higher accuracy)

`select` is pure: it is given a function that trains one candidate and returns its validation
logits, so it is tested without training anything (the pipeline passes the real trainer).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from distill_jax.metrics._fidelity import agreement, mean_kl
from distill_jax.metrics._specs import metric_names
from distill_jax.train._step import accuracy_from_logits

__all__ = [
    "is_auto",
    "wants_selection",
    "candidates",
    "holdout_split",
    "validation_scores",
    "Selection",
    "select",
]

AUTO = "auto"


SCORES = metric_names("fidelity")


TUNED_TERM = "kd"  # the only term that reads temperature and alpha


def is_auto(value) -> bool:
    return isinstance(value, str) and value == AUTO


def wants_selection(terms: Sequence[str], temperature, alpha) -> bool:
    """Whether a student with these method terms selects T and alpha: it has `kd` and one of them is auto."""
    return TUNED_TERM in terms and (is_auto(temperature) or is_auto(alpha))


def candidates(temperature, alpha, temperatures: Sequence[float], alphas: Sequence[float]) -> list[tuple[float, float]]:
    """The (T, alpha) grid: every listed value for an `"auto"` setting, the fixed value otherwise."""
    ts = [float(t) for t in temperatures] if is_auto(temperature) else [float(temperature)]
    als = [float(a) for a in alphas] if is_auto(alpha) else [float(alpha)]
    return [(t, a) for t in ts for a in als]


def holdout_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, validation) with `fraction` of every class held out, deterministic in `seed`.

    Each class with at least two examples gives round(fraction * count) of them (at least one, and
    never all) to the validation split, chosen from a shuffle by `np.random.default_rng(seed)`.

    Args:
      labels: [m] integer labels.
      fraction: in (0, 1).
    Returns:
      (fit [m - v], validation [v]) sorted int64 indices; together they are 0..m-1.
    Raises:
      ValueError: `fraction` outside (0, 1), or no class has two examples.
    """
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1); got {fraction!r}")
    order = np.random.default_rng(seed).permutation(len(labels))
    held = []
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        if len(members) >= 2:
            held.append(members[: min(len(members) - 1, max(1, round(fraction * len(members))))])
    if not held:
        raise ValueError("cannot hold out a validation split: no class has two training examples")
    val = np.sort(np.concatenate(held))
    fit = np.setdiff1d(np.arange(len(labels)), val)
    return fit, val


def validation_scores(logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, agreement with the teacher's top-1, and mean KL(teacher || student) at T = 1 ([n, C] logits).

    The same functions that score the test set (`train.accuracy_from_logits`, `metrics.agreement`,
    `metrics.mean_kl`), so a validation score means what the reported one means.
    """
    logits, teacher_logits = np.asarray(logits, np.float32), np.asarray(teacher_logits, np.float32)
    return {"accuracy": accuracy_from_logits(logits, np.asarray(labels)),
            "agreement": float(agreement(jnp.asarray(logits), jnp.asarray(teacher_logits))),
            "kl": float(mean_kl(jnp.asarray(logits), jnp.asarray(teacher_logits)))}


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen (temperature, alpha) and every candidate's validation scores (JSON-ready by `as_dict`)."""

    temperature: float
    alpha: float
    score: str
    validation_images: int
    rows: tuple[dict, ...]

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "alpha": self.alpha, "score": self.score,
                "validation_images": self.validation_images, "candidates": list(self.rows)}


def _rank_key(score: str) -> Callable[[dict], tuple]:
    if score == "kl":
        return lambda r: (r["kl"], -r["accuracy"])
    return lambda r: (-r[score], r["kl"])


def select(grid: Sequence[tuple[float, float]], validation_logits: Callable[[float, float], np.ndarray],
           teacher_logits: np.ndarray, labels: np.ndarray, *, score: str = "accuracy") -> Selection:
    """Trains each candidate through `validation_logits(T, alpha) -> [n, C]` and keeps the best by `score`.

    Ties go to the earlier candidate of `grid` after the tie-break of the module table.
    Raises:
      ValueError: an unknown score or an empty grid.
    """
    if score not in SCORES:
        raise ValueError(f"method.auto_score {score!r} is not known; use one of {list(SCORES)}")
    if not grid:
        raise ValueError("the temperature/alpha grid is empty; list at least one value in method.auto_temperatures "
                         "and method.auto_alphas")
    rows = []
    for temperature, alpha in grid:
        scores = validation_scores(validation_logits(temperature, alpha), teacher_logits, labels)
        rows.append({"temperature": temperature, "alpha": alpha, **{k: round(v, 6) for k, v in scores.items()}})
    best = min(rows, key=_rank_key(score))
    return Selection(best["temperature"], best["alpha"], score, int(len(labels)), tuple(rows))
