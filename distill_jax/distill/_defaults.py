"""The KD temperature and alpha each student kind gets unless told otherwise.

Chosen by experiments/kd_defaults_sweep.py on validation splits held out from the training images, for the
highest mean agreement with the teacher among the KD settings of the grid T in (1, 2, 4), alpha in (0.5, 0.9):
the soft tree and the linear student over digits, mnist5k and Fashion-MNIST (20,000 images), three seeds
each; the small CNN over digits only (three seeds). experiments/RESULTS.md, "KD defaults per student kind",
has the tables. A kind not swept (the MLP, a user's own network) gets Hinton et al.'s usual T = 4,
alpha = 0.9.
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
    "cnn": KDSetting(4.0, 0.5),
}
NETWORK_DEFAULT = KDSetting(4.0, 0.9)


def kd_defaults(kind: str) -> KDSetting:
    """The default (T, alpha) of a student kind ("tree", "linear", "cnn", "mlp"; any other: T = 4, alpha = 0.9)."""
    return KD_DEFAULTS.get(kind, NETWORK_DEFAULT)
