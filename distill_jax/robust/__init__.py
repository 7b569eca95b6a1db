"""Adversarial attacks (FGSM, PGD) and accuracy under attack.
"""
from distill_jax.robust._attacks import fgsm, pgd, adversarial_accuracy

__all__ = [
    "fgsm",
    "pgd",
    "adversarial_accuracy",
]
