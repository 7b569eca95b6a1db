"""Membership inference: the loss attack, LiRA with shadow models, and the attack metrics."""
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from distill_jax.distill import privacy


def _two_class_logits(phi: np.ndarray) -> np.ndarray:
    """Logits [.., n, 2] whose class-1 logit-scaled confidence is phi: z = (0, phi)."""
    return np.stack([np.zeros_like(phi), phi], axis=-1)


def test_logit_confidence_is_log_p_over_one_minus_p_and_stable():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 5)) * 3
    y = rng.integers(0, 5, 50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(privacy.logit_confidence(z, y), np.log(py / (1 - py)), rtol=1e-10)
    # a confident model: p_y rounds to 1 in float64, phi stays finite and exact
    assert privacy.logit_confidence(np.array([[60.0, 0.0, 0.0]]), np.array([0]))[0] == pytest.approx(60 - math.log(2))
    # stacked shadows [S, n, classes]: the same per shadow
    stacked = privacy.logit_confidence(np.stack([z, 2 * z]), y)
    np.testing.assert_allclose(stacked[1], privacy.logit_confidence(2 * z, y))
    np.testing.assert_allclose(privacy.loss_attack_scores(z, y), np.log(py), rtol=1e-10)


def test_attack_metrics_auc_and_tpr_at_low_fpr():
    member = np.array([True] * 4 + [False] * 6)
    assert privacy.attack_metrics(np.where(member, 1.0, 0.0), member)["auc"] == 1.0
    m = privacy.attack_metrics(np.where(member, 0.0, 1.0), member)
    assert m["auc"] == 0.0 and m["tpr_at_fpr_0.01"] == 0.0
    rng = np.random.default_rng(1)
    member = rng.random(4000) < 0.5
    scores = rng.normal(size=4000) + member
    m = privacy.attack_metrics(scores, member)
    assert m["auc"] == pytest.approx(sk_metrics.roc_auc_score(member, scores))
    # at FPR 1%: the threshold is the non-members' 99th percentile; TPR = P[N(1, 1) > that]
    cut = np.sort(scores[~member])[int(np.ceil(0.99 * (~member).sum()))]
    assert m["tpr_at_fpr_0.01"] == pytest.approx(np.mean(scores[member] >= cut), abs=0.01)
    assert m["tpr_at_fpr_0.01"] == pytest.approx(stats.norm.sf(stats.norm.isf(0.01) - 1), abs=0.04)
    with pytest.raises(ValueError, match="both members and non-members"):
        privacy.attack_metrics(scores, np.ones(4000, bool))


def test_lira_is_the_gaussian_likelihood_ratio_and_beats_the_loss_attack_on_mixed_difficulty():
    rng = np.random.default_rng(2)
    n, shadows, gap = 2000, 16, 1.0
    difficulty = rng.normal(scale=3.0, size=n)  # per-example level of phi: what the loss attack cannot see
    shadow_in = privacy.shadow_subsets(n, shadows, seed=0)
    assert np.all(shadow_in.sum(0) == shadows // 2)
    shadow_phi = difficulty[None] + gap * shadow_in + rng.normal(scale=0.5, size=(shadows, n))
    member = rng.random(n) < 0.5
    target_phi = difficulty + gap * member + rng.normal(scale=0.5, size=n)
    labels = np.ones(n, int)
    scores = privacy.lira_scores(_two_class_logits(target_phi), labels, _two_class_logits(shadow_phi), shadow_in)
    # by hand for candidate 0: per-candidate IN/OUT means, variance pooled over every candidate
    means_in = np.array([shadow_phi[shadow_in[:, i], i].mean() for i in range(n)])
    means_out = np.array([shadow_phi[~shadow_in[:, i], i].mean() for i in range(n)])
    var_in = sum(((shadow_phi[shadow_in[:, i], i] - means_in[i]) ** 2).sum() for i in range(n)) / (n * 7)
    var_out = sum(((shadow_phi[~shadow_in[:, i], i] - means_out[i]) ** 2).sum() for i in range(n)) / (n * 7)
    by_hand = (stats.norm.logpdf(target_phi[0], means_in[0], math.sqrt(var_in))
               - stats.norm.logpdf(target_phi[0], means_out[0], math.sqrt(var_out)))
    assert scores[0] == pytest.approx(by_hand, rel=1e-9)
    lira = privacy.attack_metrics(scores, member)
    loss = privacy.attack_metrics(privacy.loss_attack_scores(_two_class_logits(target_phi), labels), member)
    assert lira["auc"] > 0.8 > loss["auc"] + 0.1
    assert lira["tpr_at_fpr_0.01"] > 5 * max(loss["tpr_at_fpr_0.01"], 0.01)
    both = privacy.membership_inference(_two_class_logits(target_phi), labels, member,
                                        shadow_logits=_two_class_logits(shadow_phi), shadow_in=shadow_in)
    assert both["lira"] == lira and both["loss"] == loss
    offline = privacy.lira_scores(_two_class_logits(target_phi), labels, _two_class_logits(shadow_phi), shadow_in,
                                  online=False)
    assert privacy.attack_metrics(offline, member)["auc"] > 0.75
    with pytest.raises(ValueError, match="shadow_in must be"):
        privacy.lira_scores(_two_class_logits(target_phi), labels, _two_class_logits(shadow_phi), shadow_in[:, :10])


def test_shadow_models_train_on_given_overlapping_subsets_with_the_vmapped_step():
    rng = np.random.default_rng(3)
    n, d = 64, 3
    data = {"x": rng.normal(size=(n, d)).astype(np.float32)}
    data["y"] = (data["x"] @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)

    def loss_fn(params, batch):
        return (batch["x"] @ params["w"] - batch["y"]) ** 2

    init = lambda key: {"w": jnp.zeros(d)}  # noqa: E731
    default = privacy.train_ensemble(init, loss_fn, optax.sgd(0.05), data, num_teachers=4, batch_size=8, steps=30)
    same = privacy.train_ensemble(init, loss_fn, optax.sgd(0.05), data, num_teachers=4, batch_size=8, steps=30,
                                  shards=privacy.ensemble_shards(n, 4, seed=0))
    np.testing.assert_array_equal(np.asarray(default.params["w"]), np.asarray(same.params["w"]))
    # overlapping or uneven index sets: each model keeps its own
    subsets = [np.flatnonzero(data["y"] > 0), np.flatnonzero(data["y"] <= 0)]
    shadows = privacy.train_ensemble(init, loss_fn, optax.sgd(0.05), data, num_teachers=2, batch_size=8, steps=5,
                                     shards=subsets)
    assert [list(s) for s in shadows.shards] == [list(s) for s in subsets]
    with pytest.raises(ValueError, match="shards must be 2 index arrays"):
        privacy.train_ensemble(init, loss_fn, optax.sgd(0.05), data, num_teachers=2, batch_size=8, steps=5,
                               shards=[np.arange(10), np.arange(60, 70)])
