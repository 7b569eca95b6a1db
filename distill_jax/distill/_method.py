"""The method grammar: a distillation method is a '+'-joined sum of weighted terms
(`"kd+0.5*attention"`), with `MethodConfig` holding every term's hyper-parameters.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from distill_jax.data._augment import PERTURBATIONS
from distill_jax.distill._terms import TERMS

Pair = tuple[str, str]  # (student layer, teacher layer)
# adversarial training methods (their views: `_views.ADVERSARIAL`)
ADVERSARIAL_METHODS = ("none", "pgd")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters of every term (each term reads the ones it needs)."""

    temperature: float = 4.0
    alpha: float = 0.9
    hint_pairs: tuple[Pair, ...] = (("conv2", "conv2"),)
    attention_pairs: tuple[Pair, ...] = (("conv1", "conv1"), ("conv2", "conv2"))
    attention_p: float = 2.0
    tree_balance: float = 0.1
    # the `labels` term's softmax temperature: 1, except for the teacher of defensive distillation, which
    # Papernot et al. (2016) train at the same T as its student (its logits grow about T-fold)
    label_temperature: float = 1.0
    augment_shift: int = 0
    augment_flip: bool = False
    mixup: float = 0.0  # Beta(mixup, mixup) weights of `data.mixup` on every batch; 0 = off
    # label-preserving perturbations the teacher labels (`data.perturb_some`): kinds of `data.PERTURBATIONS`, and
    # the share of each batch's images replaced by one of them; () = off
    perturb: tuple[str, ...] = ()
    perturb_fraction: float = 0.5
    # adversarial training (`ADVERSARIAL_METHODS`): "none" or "pgd"; budget and step in standardized input units
    adversarial: str = "none"
    adversarial_epsilon: float = 0.25
    adversarial_steps: int = 5
    adversarial_step_size: float = 0.0  # 0 = 2.5 * epsilon / steps (Madry et al. 2018)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")
        if self.tree_balance < 0:
            raise ValueError(f"tree_balance must be >= 0; got {self.tree_balance}")
        if not self.label_temperature > 0:
            raise ValueError(f"label_temperature must be > 0; got {self.label_temperature}")
        unknown = [k for k in self.perturb if k not in PERTURBATIONS]
        if unknown:
            raise ValueError(f"perturb: {unknown[0]!r} is not a perturbation; use any of {sorted(PERTURBATIONS)}")
        if not 0.0 <= self.perturb_fraction <= 1.0:
            raise ValueError(f"perturb_fraction must be in [0, 1]; got {self.perturb_fraction}")
        if self.mixup < 0:
            raise ValueError(f"mixup must be >= 0 (0 = off); got {self.mixup}")
        if self.adversarial not in ADVERSARIAL_METHODS:
            raise ValueError(f"adversarial {self.adversarial!r} is not known; use one of {sorted(ADVERSARIAL_METHODS)}")
        if not self.adversarial_epsilon >= 0:
            raise ValueError(f"adversarial_epsilon must be >= 0; got {self.adversarial_epsilon}")
        if not (isinstance(self.adversarial_steps, (int, np.integer)) and self.adversarial_steps >= 1):
            raise ValueError(f"adversarial_steps must be an integer >= 1; got {self.adversarial_steps!r}")
        if not self.adversarial_step_size >= 0:
            raise ValueError(f"adversarial_step_size must be >= 0 (0 = 2.5 * epsilon / steps); "
                             f"got {self.adversarial_step_size}")

    @property
    def label_weight(self) -> float:
        """1 - alpha: the weight of the label cross entropy in the `kd` term."""
        return 1.0 - self.alpha

    @property
    def adversarial_on(self) -> bool:
        return self.adversarial != "none"

    @property
    def pgd_step_size(self) -> float:
        """`adversarial_step_size`, or Madry et al.'s 2.5 * epsilon / steps when it is 0."""
        return self.adversarial_step_size or 2.5 * self.adversarial_epsilon / self.adversarial_steps

    @property
    def changes_inputs(self) -> bool:
        """Whether each step sees new inputs (augmentation, mixup or adversarial examples): then no teacher
        output can be cached."""
        return bool(self.augment_shift or self.augment_flip or self.perturb or self.mixup or self.adversarial_on)


_TERM_RE = re.compile(r"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")


def parse_method(method: str) -> tuple[tuple[str, float], ...]:
    """Parses `"kd+0.5*attention"` into `(("kd", 1.0), ("attention", 0.5))`.

    Raises:
      ValueError: an unknown term or a malformed weight (the message lists the known terms).
    """
    terms = []
    for part in method.split("+"):
        match = _TERM_RE.match(part)
        if not match or match["name"] not in TERMS:
            raise ValueError(f"method {method!r}: term {part.strip()!r} is not known; "
                             f"write terms from {sorted(TERMS)} joined by '+', each optionally 'weight*term'")
        try:
            weight = float(match["w"]) if match["w"] else 1.0
        except ValueError:
            raise ValueError(f"method {method!r}: weight {match['w']!r} is not a number") from None
        terms.append((match["name"], weight))
    return tuple(terms)


@dataclasses.dataclass(frozen=True)
class Needs:
    """Union of what a method's terms read."""

    teacher_logits: bool
    teacher_layers: tuple[str, ...]
    student_layers: tuple[str, ...]
    teacher_saliency: bool
    teacher_attention: tuple[str, ...] = ()
    attention_p: float = 2.0

    @property
    def teacher(self) -> bool:
        return self.teacher_logits or bool(self.teacher_layers) or bool(self.teacher_attention) or self.teacher_saliency

    @property
    def teacher_forward(self) -> bool:
        """Whether the teacher's forward pass (logits and features) must run."""
        return self.teacher_logits or bool(self.teacher_layers) or bool(self.teacher_attention)


def method_needs(method: str, cfg: MethodConfig) -> Needs:
    specs = [TERMS[name] for name, _ in parse_method(method)]
    return Needs(
        teacher_logits=any(s.teacher_logits for s in specs),
        teacher_layers=tuple(dict.fromkeys(l for s in specs for l in s.teacher_layers(cfg))),
        student_layers=tuple(dict.fromkeys(l for s in specs for l in s.student_layers(cfg))),
        teacher_saliency=any(s.teacher_saliency for s in specs),
        teacher_attention=tuple(dict.fromkeys(l for s in specs for l in s.teacher_attention(cfg))),
        attention_p=cfg.attention_p,
    )
