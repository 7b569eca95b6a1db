"""Poisson sampling for DP-SGD: each example enters a step independently with probability q, and the
variable-size batch is padded (or, rarely, truncated) to one fixed size with a 0/1 mask, so the step
compiles once.

The privacy accounting of DP-SGD (`distill.privacy.dp_sgd_epsilon`) assumes exactly this sampling
(Abadi et al. 2016; Mironov, Talwar and Zhang 2019). Shuffled fixed-size batches, the usual data order
(`epoch_batch_indices`), can sit far above that figure (Chua et al., "How Private are DP-SGD
Implementations?", ICML 2024).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from distill_jax._checks import check_int, check_number


def poisson_batch_cap(n: int, batch_size: int, steps: int, *, overflow=1e-9, multiple_of: int = 1) -> int:
    """The fixed batch size that Poisson batches of expected size `batch_size` are padded to.

    The smallest m (a multiple of `multiple_of`) with  steps * P[Binomial(n, q) > m] <= overflow,
    q = batch_size / n: over the whole run, the probability that any step samples more than m examples
    (whose extra examples are then dropped) is at most `overflow` (`poisson_overflow_probability`).

    Args:
      n: number of training examples.
      batch_size: expected batch size B = q * n, 1 <= B <= n.
      steps: number of steps of the run.
      overflow: bound on the probability that any step is truncated, in (0, 1).
      multiple_of: the cap is rounded up to a multiple of this (e.g. the number of devices).
    Returns:
      m, with batch_size <= m <= n rounded up to `multiple_of`.
    """
    n, batch_size, steps = check_int(n, "n"), check_int(batch_size, "batch_size"), check_int(steps, "steps")
    if batch_size > n:
        raise ValueError(f"batch_size must be <= n ({n}); got {batch_size}")
    overflow = check_number(overflow, "overflow", low=0, high=1, low_open=True, high_open=True)
    multiple_of = check_int(multiple_of, "multiple_of")
    # isf: the smallest m with P[X > m] <= overflow / steps
    m = int(stats.binom.isf(overflow / steps, n, batch_size / n))
    m = min(max(m, batch_size), n)
    return int(math.ceil(m / multiple_of) * multiple_of)


def poisson_overflow_probability(n: int, batch_size: int, steps: int, cap: int) -> float:
    """A bound on the probability that any of `steps` Poisson batches (rate batch_size / n) exceeds `cap`:
    min(1, steps * P[Binomial(n, batch_size / n) > cap]) (the union bound)."""
    return float(min(1.0, steps * stats.binom.sf(cap, n, batch_size / n)))


def poisson_epoch_batches(n: int, batch_size: int, cap: int, *, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of Poisson-sampled batches, padded to `cap`: (indices [steps, cap], mask [steps, cap]).

    steps = n // batch_size (an epoch is one expected pass). In each step every example is chosen
    independently with probability q = batch_size / n: the batch size k ~ Binomial(n, q), then k distinct
    examples uniformly (the same distribution). The first min(k, cap) chosen examples fill the row with
    mask 1; the rest of the row repeats index 0 with mask 0 (a valid image, whose contribution the step
    multiplies by 0). Deterministic in (seed, epoch), so a resumed run sees the same batches.

    Args:
      n: number of examples; batch_size: expected batch size (1 <= batch_size <= n); cap: padded size >= 1.
    Returns:
      int64 indices and float32 0/1 mask, both [n // batch_size, cap].
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the number of training examples); got {batch_size}")
    cap = check_int(cap, "cap")
    rng = np.random.default_rng([seed, epoch, 0x9015])  # a different stream from the shuffled order's
    steps = n // batch_size
    indices = np.zeros((steps, cap), np.int64)
    mask = np.zeros((steps, cap), np.float32)
    for s in range(steps):
        k = min(int(rng.binomial(n, batch_size / n)), cap)
        indices[s, :k] = rng.choice(n, size=k, replace=False)
        mask[s, :k] = 1.0
    return indices, mask
