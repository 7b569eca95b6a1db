"""Paired comparison of two students on the same test images: did distillation help?

A distilled student and its labels twin (same kind, same budget, trained on labels alone) are scored on the
same images, so each image gives one difference per score: agreement with the teacher's top-1 class
(1 or 0 for each model), correctness (1 or 0), and KL(teacher || student). The mean difference comes with a
percentile bootstrap interval over the images (Efron & Tibshirani 1993, ch. 13), the resampling unit being
the test image, as in paired comparisons of classifiers.
"""
from __future__ import annotations

import numpy as np

__all__ = ["per_image_fidelity", "paired_bootstrap", "distillation_gain"]


def per_image_fidelity(student_logits, teacher_logits, labels) -> dict[str, np.ndarray]:
    """Per test image: agreement with the teacher's top-1 (0/1), correctness (0/1), KL(teacher || student).

    Args:
      student_logits, teacher_logits: [n, classes]; labels: [n] ints.
    Returns:
      {"agreement": [n], "accuracy": [n], "kl": [n]} float64 arrays.
    """
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
    if s.shape != t.shape or s.ndim != 2 or np.shape(labels) != s.shape[:1]:
        raise ValueError(f"student_logits and teacher_logits must be [n, classes] and labels [n]; got "
                         f"{s.shape}, {t.shape} and {np.shape(labels)}")
    log_p, log_q = _log_softmax(t), _log_softmax(s)
    return {"agreement": (s.argmax(-1) == t.argmax(-1)).astype(np.float64),
            "accuracy": (s.argmax(-1) == np.asarray(labels)).astype(np.float64),
            "kl": np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis in float64 on the host (no device program for a read-out)."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def paired_bootstrap(differences, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
                     ) -> tuple[float, float, float]:
    """Mean of paired differences [n] and its percentile bootstrap interval at `level`.

    Returns:
      (mean, low, high): `low`/`high` the (1 - level)/2 and (1 + level)/2 quantiles of the means of
      `resamples` resamples of the n differences drawn with replacement (numpy's default_rng(seed)).
    """
    d = np.asarray(differences, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"differences must be a non-empty [n] array; got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # 256 resamples at a time: memory bounded by 256 * n
        stop = min(start + 256, resamples)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(low), float(high)


def distillation_gain(student_logits, twin_logits, teacher_logits, labels, *, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """How a distilled student differs from its labels twin on the same test images.

    Args:
      student_logits: [n, classes], the distilled student; twin_logits: [n, classes], the same kind trained on
        labels; teacher_logits: [n, classes]; labels: [n].
    Returns:
      {score: {"difference": student - twin (mean over images), "ci95": [low, high]}} for "agreement" and
      "accuracy" (fractions of images) and "kl" (lower is better), each from `paired_bootstrap`.
    """
    a = per_image_fidelity(student_logits, teacher_logits, labels)
    b = per_image_fidelity(twin_logits, teacher_logits, labels)
    out = {}
    for i, score in enumerate(("agreement", "accuracy", "kl")):
        mean, low, high = paired_bootstrap(a[score] - b[score], resamples=resamples, seed=seed + i)
        out[score] = {"difference": round(mean, 6), "ci95": [round(low, 6), round(high, 6)]}
    return out
