"""Privacy accounting with dp_accounting's RDP accountant: GNMax (PATE; Papernot et al. 2018)
and DP-SGD (Abadi et al. 2016).
"""
from __future__ import annotations

import math

import dp_accounting
import numpy as np
from scipy import stats

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


# Renyi orders of every PATE curve: dp_accounting's defaults (1.25 ... 256, then a few large ones)
PATE_ORDERS = tuple(float(o) for o in dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def pate_epsilon(votes, *, sigma, delta, threshold=None, sigma_threshold=None, answered=None,
                 data_dependent: bool = False) -> float:
    """(epsilon, delta) of a whole PATE run: every posed query's threshold check and every answered GNMax query.

    Per query b with votes n = votes[b] (one teacher's data moves one vote: the top count by at most 1,
    two counts by 1 each), Renyi DP at every order lambda of `PATE_ORDERS`, summed over queries and
    converted to epsilon at `delta` by dp_accounting's `compute_epsilon`:

      threshold check (confident GNMax, every posed query): lambda / (2 sigma_threshold^2)
      GNMax answer (answered queries; all of them without a threshold): lambda / sigma^2

    `data_dependent=True` replaces each cost by Papernot et al.'s data-dependent bound where it is smaller
    (`pate_rdp_data_dependent`): for GNMax with q >= P[answer != argmax n] bounded by Proposition 7,
    q <= sum_{j != i*} P[N(0, 2 sigma^2) >= n_i* - n_j]; for the threshold check with q the probability of
    its less likely outcome, P[max n + N(0, sigma_threshold^2) >= T] or its complement. It never exceeds
    the data-independent figure and equals it when the votes show no consensus. Caution: the data-dependent
    figure depends on the private votes; publishing it is itself a release (Papernot et al. release a
    noisy version by smooth sensitivity, which this function does not do).

    Args:
      votes: [queries, classes] vote counts of every posed query (e.g. `teacher_votes`).
      sigma: GNMax noise std (sigma_2 of confident GNMax), > 0.
      delta: target delta, in (0, 1).
      threshold, sigma_threshold: the threshold check of `confident_gnmax` (T, sigma_1 > 0); None for
        plain GNMax, which answers every query.
      answered: [queries] bool, which queries the threshold check let through (`confident_gnmax`'s second
        output); needed with a threshold.
      data_dependent: use the data-dependent bound (Theorem 6 / Proposition 7).
    Returns:
      epsilon (Python float).

    Reference: Papernot et al., "Scalable Private Learning with PATE", ICLR 2018, Theorem 6, Propositions
    7-8 and Algorithm 1; Mironov, "Renyi Differential Privacy", CSF 2017.
    """
    votes = np.asarray(votes, np.float64)
    if votes.ndim != 2 or votes.shape[1] < 2:
        raise ValueError(f"votes must be [queries, classes >= 2]; got shape {votes.shape}")
    sigma = check_number(sigma, "sigma", low=0, low_open=True)
    delta = check_number(delta, "delta", low=0, high=1, low_open=True, high_open=True)
    if (threshold is None) != (sigma_threshold is None):
        raise ValueError("threshold and sigma_threshold go together: both for confident GNMax, neither for GNMax")
    if threshold is None:
        answered = np.ones(len(votes), bool)
    else:
        sigma_threshold = check_number(sigma_threshold, "sigma_threshold", low=0, low_open=True)
        if answered is None or np.shape(answered) != (len(votes),):
            raise ValueError(f"answered must be a [queries] = [{len(votes)}] bool array (confident_gnmax's "
                             f"second output) when there is a threshold; got {None if answered is None else np.shape(answered)}")
        answered = np.asarray(answered, bool)
    orders = np.asarray(PATE_ORDERS)
    rdp = np.zeros_like(orders)
    for row, was_answered in zip(votes, answered):
        if threshold is not None:
            rdp += pate_rdp_threshold(row, threshold, sigma_threshold, orders, data_dependent=data_dependent)
        if was_answered:
            rdp += pate_rdp_gnmax(row, sigma, orders, data_dependent=data_dependent)
    epsilon, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)
    return float(epsilon)


def pate_rdp_gnmax(votes: np.ndarray, sigma: float, orders: np.ndarray, *, data_dependent: bool) -> np.ndarray:
    """RDP of one GNMax answer at each order: lambda / sigma^2, or the data-dependent bound where smaller.

    q = min(1 - 1/classes, sum_{j != i*} P[N(0, 2 sigma^2) >= n_i* - n_j])   (Proposition 7, a union bound)

    Args: votes [classes]; sigma > 0; orders [k] > 1. Returns: [k].
    """
    if not data_dependent:
        return orders / sigma**2
    top = int(np.argmax(votes))
    gaps = votes[top] - np.delete(votes, top)
    logq = float(np.logaddexp.reduce(stats.norm.logsf(gaps, scale=math.sqrt(2.0) * sigma)))
    return pate_rdp_data_dependent(min(logq, math.log1p(-1.0 / len(votes))), sigma, orders)


def pate_rdp_threshold(votes: np.ndarray, threshold: float, sigma_threshold: float, orders: np.ndarray, *,
                       data_dependent: bool) -> np.ndarray:
    """RDP of one threshold check at each order: lambda / (2 sigma_1^2), or the data-dependent bound.

    The check is a Gaussian mechanism on max_c votes (sensitivity 1), i.e. GNMax's analysis at
    sigma_1 * sqrt(2); q is the probability of its less likely outcome, from
    p = P[round(max votes) + N(0, sigma_1^2) >= T].

    Args: votes [classes]; threshold T; sigma_threshold sigma_1 > 0; orders [k] > 1. Returns: [k].
    """
    scaled = math.sqrt(2.0) * sigma_threshold
    if not data_dependent:
        return orders / scaled**2
    log_p = float(stats.norm.logsf(threshold - round(float(np.max(votes))), scale=sigma_threshold))
    return pate_rdp_data_dependent(min(log_p, _log1mexp(log_p)), scaled, orders)


def pate_rdp_data_dependent(logq: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """Papernot et al.'s data-dependent RDP of a GNMax-like mechanism whose less likely outcome has
    probability at most q = exp(logq), capped by the data-independent lambda / sigma^2.

    With mu_2 = sqrt(sigma^2 log(1/q)), mu_1 = mu_2 + 1, eps_i = mu_i / sigma^2 (Proposition 10's orders),
    when q is small enough (q <= e^{(mu_2 - 1) eps_2} / (mu_1/(mu_1-1) * mu_2/(mu_2-1))^{mu_2} and
    log(1/q) > eps_2) the RDP at order lambda < mu_1 is at most

      1/(lambda-1) log((1-q) A^{lambda-1} + q B^{lambda-1}),
      A = (1-q) / (1 - (e^{eps_2} q)^{(mu_2-1)/mu_2}),   B = e^{eps_1} / q^{1/(mu_1-1)}   (Theorem 6)

    and lambda / sigma^2 otherwise.

    Args: logq <= 0; sigma > 0; orders [k] > 1. Returns: [k].
    """
    bound = orders / sigma**2
    if logq == -math.inf:  # the outcome is fixed: nothing is revealed
        return np.zeros_like(orders)
    mu2 = math.sqrt(sigma**2 * -logq)
    mu1 = mu2 + 1.0
    eps1, eps2 = mu1 / sigma**2, mu2 / sigma**2
    usable = (orders < mu1) & (mu2 > 1)
    small_q = logq <= (mu2 - 1) * eps2 - mu2 * (math.log1p(1 / (mu1 - 1)) + math.log1p(1 / (mu2 - 1))) if mu2 > 1 else False
    if not (usable.any() and small_q and -logq > eps2):
        return bound
    log1q = _log1mexp(logq)
    log_a = (orders - 1) * (log1q - _log1mexp((logq + eps2) * (1 - 1 / mu2)))
    log_b = (orders - 1) * (eps1 - logq / (mu1 - 1))
    dependent = np.logaddexp(log1q + log_a, logq + log_b) / (orders - 1)
    return np.where(usable, np.minimum(bound, dependent), bound)


def _log1mexp(x: float) -> float:
    """log(1 - e^x) for x <= 0, accurately near both ends."""
    if x > 0:
        raise ValueError(f"log1mexp needs x <= 0; got {x}")
    if x == 0:
        return -math.inf
    return math.log1p(-math.exp(x)) if x < -math.log(2) else math.log(-math.expm1(x))
