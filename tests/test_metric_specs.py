"""The metric registry (`metrics.METRICS`): every spec names a public metric, and each direction matches what
the metric does on a case where the better map is known; the audit ranks and the verdict reads by it."""
import jax.numpy as jnp
import numpy as np
import pytest

import distill_jax.metrics as metrics
from distill_jax import audit
from distill_jax.audit import verdict


def test_every_spec_names_a_public_metric_function_once():
    public = {getattr(metrics, n) for n in metrics.__all__ if callable(getattr(metrics, n))}
    assert all(spec.function in public for spec in metrics.METRICS.values())
    assert len(metrics.METRICS) == len({s.name for s in metrics.METRICS.values()})
    assert metrics.metric_names("quality") == verdict.QUALITY_KEYS
    assert set(metrics.metric_names(ranked=True)) == {"deletion_auc", "insertion_auc", "faithfulness_correlation",
                                                      "infidelity", "sparseness", "complexity"}


def _linear_model():
    w = jnp.zeros((16, 2)).at[:, 0].set(0.05 * (jnp.arange(16.0)[::-1] + 1))  # pixel 0 matters most for class 0

    def apply_fn(x):  # class 0's probability moves through (0, 1) as pixels come and go: no saturation
        return x.reshape(x.shape[0], -1) @ w - jnp.array([2.0, 0.0])
    return apply_fn, w


@pytest.mark.parametrize("name", ["deletion_auc", "insertion_auc"])
def test_perturbation_curve_directions_prefer_the_map_that_ranks_the_weights(name):
    apply_fn, w = _linear_model()
    x = jnp.asarray(np.random.default_rng(0).uniform(0.0, 1.0, (1, 4, 4, 1)), jnp.float32)  # blur changes it
    target = jnp.array([0])
    right = (w[:, 0] * x.reshape(-1)).reshape(1, 4, 4, 1)       # grad x input of the linear model
    wrong = -right                                              # the opposite ranking
    spec = metrics.METRICS[name]
    score = lambda m: float(spec.function(apply_fn, x, m, target, steps=16)[0])  # noqa: E731
    better, worse = score(right), score(wrong)
    assert (better > worse) if spec.higher_is_better else (better < worse)


@pytest.mark.parametrize("name", ["sparseness", "complexity"])
def test_conciseness_directions_prefer_a_one_pixel_map(name):
    one_pixel = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
    uniform = jnp.ones((1, 4, 4, 1))
    spec = metrics.METRICS[name]
    concise, spread = float(spec.function(one_pixel)[0]), float(spec.function(uniform)[0])
    assert (concise > spread) if spec.higher_is_better else (concise < spread)


def test_rank_methods_follows_each_specs_direction():
    # method "a" is better than "b" on every ranked metric, by each metric's own direction
    a = {n: (1.0 if metrics.METRICS[n].higher_is_better else 0.0) for n in metrics.metric_names(ranked=True)}
    b = {n: 1.0 - v for n, v in a.items()}
    ranks = audit.rank_methods({"a": a, "b": b})
    assert ranks["a"]["mean_rank"] == 1.0 and ranks["b"]["mean_rank"] == 2.0
    assert np.all([r == 1 for r in ranks["a"]["ranks"].values()])
