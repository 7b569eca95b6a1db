"""Privacy accounting with dp_accounting's RDP accountant: GNMax (PATE; Papernot et al. 2018)
and DP-SGD (Abadi et al. 2016).
"""
from __future__ import annotations

import math

import dp_accounting

from distill_jax._checks import check_int, check_number


def gnmax_epsilon(num_queries: int, *, sigma, delta) -> float:
    """Data-independent (epsilon, delta) of answering `num_queries` GNMax queries.

    One teacher's data changes its vote, so two counts move by 1: L2 sensitivity sqrt(2), and a
    GNMax answer is a Gaussian mechanism with noise multiplier sigma / sqrt(2), i.e.
    (lambda, lambda / sigma^2)-RDP at every order lambda. `num_queries` answers compose to
    (lambda, num_queries * lambda / sigma^2)-RDP, converted to (epsilon, delta) by `dp_accounting`'s
    `RdpAccountant.get_epsilon`. (PATE 2018's data-dependent analysis can be much tighter; this is the
    bound that holds whatever the votes.)

    Args:
      num_queries: number of answered queries, an int >= 1.
      sigma: GNMax noise std, > 0.
      delta: target delta, in (0, 1).
    Returns:
      epsilon (Python float).

    Reference: Papernot et al., "Scalable Private Learning with PATE", ICLR 2018, Proposition 8;
    Mironov, "Renyi Differential Privacy", CSF 2017.
    """
    num_queries = check_int(num_queries, "num_queries")
    sigma = check_number(sigma, "sigma", low=0, low_open=True)
    delta = check_number(delta, "delta", low=0, high=1, low_open=True, high_open=True)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / math.sqrt(2.0)), num_queries)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


DP_SGD_SAMPLINGS = ("poisson", "shuffle")


def dp_sgd_epsilon(steps: int, *, batch_size: int, n: int, noise_multiplier, delta, sampling: str = "poisson") -> float:
    """(epsilon, delta) of `steps` DP-SGD steps, for the way the batches were drawn.

    "poisson" (`train.poisson_epoch_batches`): each step is the sampled Gaussian mechanism
    PoissonSampled(q, Gaussian(z)), q = batch_size / n; `steps` of them composed (add-or-remove-one
    neighbours).
    "shuffle" (`train.epoch_batch_indices`: each epoch a data-independent permutation cut into batches of
    batch_size): an example is in at most one step per epoch, and zeroing its gradient moves that step's
    sum of clipped gradients by at most C, so each epoch is one Gaussian mechanism of noise multiplier z
    and the run is E = ceil(steps / (n // batch_size)) of them composed, with no amplification by
    shuffling claimed. The neighbours are zero-out ones (one example's contribution replaced by nothing;
    Kairouz et al. 2021; the adjacency under which Chua et al. compare the samplings, for which the
    Poisson figure is the add-or-remove one); for replace-one neighbours (sensitivity 2C) pass z / 2.
    Both via `dp_accounting`'s `RdpAccountant`, at `delta`.

    Args:
      steps: number of noisy steps, an int >= 1.
      batch_size: (expected) batch size, 1 <= batch_size <= n.
      n: training-set size.
      noise_multiplier: z > 0.
      delta: target delta, in (0, 1).
      sampling: "poisson" or "shuffle".
    Returns:
      epsilon (Python float).

    Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Mironov, Talwar and
    Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019; Chua et al., "How
    Private are DP-SGD Implementations?", ICML 2024 (why shuffled batches need their own accounting).
    """
    steps = check_int(steps, "steps")
    n = check_int(n, "n")
    batch_size = check_int(batch_size, "batch_size")
    if batch_size > n:
        raise ValueError(f"batch_size must be <= n ({n}); got {batch_size}")
    z = check_number(noise_multiplier, "noise_multiplier", low=0, low_open=True)
    delta = check_number(delta, "delta", low=0, high=1, low_open=True, high_open=True)
    if sampling not in DP_SGD_SAMPLINGS:
        raise ValueError(f"sampling must be one of {DP_SGD_SAMPLINGS}; got {sampling!r}")
    if sampling == "poisson":
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(batch_size / n, dp_accounting.GaussianDpEvent(z)), steps)
    else:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), math.ceil(steps / (n // batch_size)))
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
