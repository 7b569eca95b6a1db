"""`privacy.pate_epsilon`: a whole PATE run's epsilon, data-independent (checked against dp_accounting) and
PATE 2018's data-dependent bound (checked by hand and by its known properties)."""
import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from distill_jax.distill import privacy


def _votes(top: float, second: float, queries: int, classes: int = 10) -> np.ndarray:
    v = np.zeros((queries, classes))
    v[:, 0], v[:, 1] = top, second
    return v


def test_data_independent_confident_gnmax_equals_dp_accounting_by_hand():
    votes = _votes(180, 70, 6)
    answered = np.array([True, False, True, True, False, True])
    s1, s2, delta = 50.0, 10.0, 1e-5
    eps = privacy.pate_epsilon(votes, sigma=s2, delta=delta, threshold=150, sigma_threshold=s1, answered=answered)
    # every posed query: a threshold check, Gaussian of sensitivity 1; every answered one: GNMax, sensitivity sqrt(2)
    accountant = dp_accounting.rdp.RdpAccountant(list(privacy.PATE_ORDERS))
    accountant.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s1), 6),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s2 / math.sqrt(2)), 4)]))
    assert eps == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # no threshold: plain GNMax on every query, the library's gnmax_epsilon
    assert privacy.pate_epsilon(votes, sigma=s2, delta=delta) == pytest.approx(
        privacy.gnmax_epsilon(6, sigma=s2, delta=delta), rel=1e-9)


def test_data_dependent_gnmax_matches_theorem_6_by_hand():
    sigma, order = 40.0, 20.0
    votes = np.array([230.0, 15.0, 5.0] + [0.0] * 7)
    # Proposition 7: q <= sum_j P[N(0, 2 sigma^2) >= n_1 - n_j]
    q = sum(stats.norm.sf(230.0 - n, scale=math.sqrt(2) * sigma) for n in votes[1:])
    mu2 = math.sqrt(sigma**2 * math.log(1 / q))
    mu1 = mu2 + 1
    e1, e2 = mu1 / sigma**2, mu2 / sigma**2
    a = (1 - q) / (1 - (math.exp(e2) * q) ** ((mu2 - 1) / mu2))
    b = math.exp(e1) / q ** (1 / (mu1 - 1))
    by_hand = math.log((1 - q) * a ** (order - 1) + q * b ** (order - 1)) / (order - 1)
    got = privacy.pate_rdp_gnmax(votes, sigma, np.array([order]), data_dependent=True)[0]
    assert order < mu1 and by_hand < order / sigma**2
    assert got == pytest.approx(by_hand, rel=1e-9)


def test_data_dependent_is_never_above_the_data_independent_bound_and_falls_back_without_consensus():
    rng = np.random.default_rng(0)
    for _ in range(20):
        votes = rng.multinomial(250, rng.dirichlet(np.full(10, 0.3)), size=30).astype(float)
        answered = rng.random(30) < 0.6
        kw = dict(sigma=40.0, delta=1e-5, threshold=200.0, sigma_threshold=150.0, answered=answered)
        assert privacy.pate_epsilon(votes, **kw, data_dependent=True) <= privacy.pate_epsilon(votes, **kw) + 1e-12
    # the teachers split evenly: q is at its cap and the bound is the data-independent one
    even = np.full((50, 10), 25.0)
    assert privacy.pate_epsilon(even, sigma=40.0, delta=1e-5, data_dependent=True) == pytest.approx(
        privacy.pate_epsilon(even, sigma=40.0, delta=1e-5), rel=1e-12)
    # strong consensus: far below it (PATE 2018's regime)
    agree = _votes(245, 5, 50)
    dd = privacy.pate_epsilon(agree, sigma=40.0, delta=1e-5, data_dependent=True)
    assert dd < 0.5 * privacy.pate_epsilon(agree, sigma=40.0, delta=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(threshold=150.0), "threshold and sigma_threshold go together"),
    (dict(threshold=150.0, sigma_threshold=50.0), r"answered must be a \[queries\] = \[4\] bool array"),
    (dict(sigma=0.0), r"^sigma must be > 0"),
])
def test_bad_pate_accounting_arguments_give_one_line_errors(kwargs, message):
    args = dict(sigma=10.0, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=message):
        privacy.pate_epsilon(_votes(9, 1, 4), **args)
    with pytest.raises(ValueError, match=r"votes must be \[queries, classes >= 2\]"):
        privacy.pate_epsilon(np.ones(4), sigma=1.0, delta=1e-5)
