"""Adversarial attacks (FGSM, PGD) and accuracy under attack.
"""
from distill_jax.robust._attacks import adversarial_accuracy, fgsm, pgd

__all__ = [
    "fgsm",
    "pgd",
    "adversarial_accuracy",
]
