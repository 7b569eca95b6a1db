"""The KD temperature and alpha each student kind gets unless told otherwise.

Chosen by experiments/kd_defaults_sweep.py on validation splits held out from the training images of
digits, mnist5k and Fashion-MNIST (20,000 images), three seeds each, for the highest mean agreement with
the teacher (ties: the lower KL); experiments/RESULTS.md, "KD defaults per student kind", has the table.
A kind not listed (a user's own network) gets Hinton et al.'s usual T = 4, alpha = 0.9.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["KDSetting", "KD_DEFAULTS", "kd_defaults"]


class KDSetting(NamedTuple):
    """A KD temperature T > 0 and the weight alpha in [0, 1] of the KD term (1 - alpha on the labels)."""

    temperature: float
    alpha: float


KD_DEFAULTS: dict[str, KDSetting] = {
    "tree": KDSetting(1.0, 0.9),
    "linear": KDSetting(1.0, 0.9),
    "cnn": KDSetting(4.0, 0.9),
    "mlp": KDSetting(4.0, 0.9),
}
NETWORK_DEFAULT = KDSetting(4.0, 0.9)


def kd_defaults(kind: str) -> KDSetting:
    """The default (T, alpha) of a student kind ("tree", "linear", "cnn", "mlp"; any other: T = 4, alpha = 0.9)."""
    return KD_DEFAULTS.get(kind, NETWORK_DEFAULT)
