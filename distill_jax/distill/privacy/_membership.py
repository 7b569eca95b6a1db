"""Membership inference: how well an attacker tells the training images of a model from other images.

An epsilon is an upper bound on that leak; an attack measures it from below. Two attacks, both scoring
each candidate image (higher = "was in the training set") from the model's logits only:

* the loss attack (Yeom et al. 2018): score = -cross_entropy(logits, label);
* LiRA (Carlini et al. 2022): shadow models of the same recipe, each trained on a random half of a pool
  that holds the candidates, give for every candidate the distribution of its logit-scaled confidence
  phi = log p_y - log(1 - p_y) when it was IN a training set and when it was OUT; the score is the
  likelihood ratio of the target's phi under the two Gaussians (online) or how far above OUT it lies
  (offline).

`attack_metrics` reports ROC AUC and the true-positive rate at 0.1 % and 1 % false-positive rate, the
low-FPR view Carlini et al. argue for.
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats
from sklearn import metrics as sk_metrics

FPR_LEVELS = (0.001, 0.01)


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's logit-scaled confidence of the true class, computed without forming p.

    phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j

    Args:
      logits: [..., n, classes] float.
      labels: [n] int.
    Returns:
      [..., n] float64.

    Reference: Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022, eq. 4.
    """
    z = np.asarray(logits, np.float64)
    true_class = np.arange(z.shape[-1]) == np.asarray(labels)[:, None]  # [n, classes], broadcast over [...]
    own = np.sum(np.where(true_class, z, 0.0), axis=-1)
    return own - special.logsumexp(np.where(true_class, -np.inf, z), axis=-1)


def loss_attack_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The loss attack's score of every candidate: -cross_entropy = log softmax(z)_y, [n] float64.

    Reference: Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", CSF 2018.
    """
    z = np.asarray(logits, np.float64)
    return np.take_along_axis(z, np.asarray(labels)[:, None], axis=1)[:, 0] - special.logsumexp(z, axis=1)


def lira_scores(target_logits: np.ndarray, labels: np.ndarray, shadow_logits: np.ndarray, shadow_in: np.ndarray,
                *, online: bool = True) -> np.ndarray:
    """LiRA's score of every candidate: the target's phi under the IN and OUT Gaussians of the shadows.

    online:  log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)
    offline: log P[N(mu_out, s_out^2) <= phi]   (OUT shadows only)

    mu_in / mu_out are each candidate's mean phi over the shadows that trained / did not train on it; the
    variances are pooled over all candidates (Carlini et al.'s "global variance", their choice below 64
    shadows). A candidate with no IN (or OUT) shadow uses the mean over all candidates instead.

    Args:
      target_logits: [n, classes] the attacked model's logits on the candidates.
      labels: [n] their labels.
      shadow_logits: [S, n, classes] each shadow model's logits on the same candidates.
      shadow_in: [S, n] bool, whether shadow s trained on candidate i.
      online: the two-sided test (needs IN shadows) or the offline one.
    Returns:
      [n] float64 scores, higher = more likely a member.

    Reference: Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022,
    Algorithm 1 and section VI.
    """
    shadow_in = np.asarray(shadow_in, bool)
    if shadow_in.shape != np.shape(shadow_logits)[:2]:
        raise ValueError(f"shadow_in must be [shadows, candidates] = {np.shape(shadow_logits)[:2]}; "
                         f"got {shadow_in.shape}")
    if np.shape(target_logits)[0] != shadow_in.shape[1]:
        raise ValueError(f"target_logits has {np.shape(target_logits)[0]} candidates, the shadows "
                         f"{shadow_in.shape[1]}")
    phi = logit_confidence(target_logits, labels)
    shadow_phi = logit_confidence(shadow_logits, labels)
    mu_out, var_out = _per_candidate_mean_and_pooled_variance(shadow_phi, ~shadow_in)
    if not online:
        return stats.norm.logcdf(phi, loc=mu_out, scale=np.sqrt(var_out))
    mu_in, var_in = _per_candidate_mean_and_pooled_variance(shadow_phi, shadow_in)
    return (stats.norm.logpdf(phi, loc=mu_in, scale=np.sqrt(var_in))
            - stats.norm.logpdf(phi, loc=mu_out, scale=np.sqrt(var_out)))


def _per_candidate_mean_and_pooled_variance(phi: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, float]:
    """Each candidate's mean of phi over the chosen shadows [n], and the variance pooled over candidates."""
    counts = chosen.sum(0)
    if not counts.any():
        raise ValueError("no shadow model is on this side (IN or OUT) of any candidate: train shadows on random "
                         "halves of the candidates")
    means = np.where(counts > 0, (phi * chosen).sum(0) / np.maximum(counts, 1), np.nan)
    means = np.where(np.isnan(means), np.nanmean(means), means)
    residual = np.where(chosen, phi - means[None], 0.0)
    dof = max(int(counts.sum() - (counts > 0).sum()), 1)
    return means, max(float((residual**2).sum() / dof), 1e-12)


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """ROC AUC of the scores and the true-positive rate at each false-positive rate of `FPR_LEVELS`.

    TPR at FPR x: the largest TPR of any threshold whose FPR is at most x (0 if none).

    Args:
      scores: [n] higher = member.  is_member: [n] bool, both classes present.
    Returns:
      {"auc": float, "tpr_at_fpr_0.001": float, "tpr_at_fpr_0.01": float, "members": int, "non_members": int}.
    """
    is_member = np.asarray(is_member, bool)
    if is_member.all() or not is_member.any():
        raise ValueError("is_member must hold both members and non-members")
    fpr, tpr, _ = sk_metrics.roc_curve(is_member, scores)
    out = {"auc": float(sk_metrics.roc_auc_score(is_member, scores))}
    for level in FPR_LEVELS:
        out[f"tpr_at_fpr_{level:g}"] = float(tpr[fpr <= level].max()) if (fpr <= level).any() else 0.0
    out.update(members=int(is_member.sum()), non_members=int((~is_member).sum()))
    return out


def membership_inference(target_logits: np.ndarray, labels: np.ndarray, is_member: np.ndarray, *,
                         shadow_logits: np.ndarray | None = None, shadow_in: np.ndarray | None = None) -> dict:
    """Both attacks on one model: {"loss": attack_metrics, "lira": attack_metrics (online; with shadows only)}.

    Args:
      target_logits: [n, classes] the model's logits on the candidates; labels: [n]; is_member: [n] bool,
        whether the model trained on each candidate (the ground truth the attacks are scored against).
      shadow_logits, shadow_in: see `lira_scores` (None: the loss attack only).
    """
    out = {"loss": attack_metrics(loss_attack_scores(target_logits, labels), is_member)}
    if shadow_logits is not None:
        out["lira"] = attack_metrics(lira_scores(target_logits, labels, shadow_logits, shadow_in), is_member)
    return out


def shadow_subsets(n: int, num_shadows: int, *, seed: int) -> np.ndarray:
    """Which candidates each shadow model trains on: [S, n] bool, every candidate IN exactly half the shadows.

    Per candidate a random half of the S shadows (S even), so that every candidate has S/2 IN and S/2 OUT
    models (Carlini et al.'s balanced split).
    """
    if num_shadows < 2 or num_shadows % 2:
        raise ValueError(f"num_shadows must be an even number >= 2; got {num_shadows}")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((num_shadows, n)), axis=0)
    return order < num_shadows // 2
