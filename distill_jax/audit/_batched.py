"""The audit's attribution maps, explanation scores and attacks, from a model's `queries.ModelQueries`.

Each function is the formula of the library function of the same name (in `explain`, `metrics`,
`faithfulness`, `explanation_quality`, `attacks`), which stays the reference: one traced function a
user can jit, vmap or differentiate, for any `apply_fn`. The versions here gather every point a method
needs, ask the model's two compiled programs for logits or gradients there, and do the rest in numpy,
so a whole audit compiles the network twice per architecture instead of once per (method, metric,
attack). Random draws are the reference's draws (the same keys through the same `jax.random` calls,
compiled once per shape and shared by every model), so results agree to float rounding;
tests/test_batched_explain.py checks each function against its reference.

Conventions: `q` a `ModelQueries`; `x` [B, H, W, C] float images and `target` [B] int classes as
host arrays; maps like `x`; scores [B]. Only [B] targets (the references also take [B, K]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import compilation
from distill_jax.attr._core import gaussian_blur
from distill_jax.attr._gradient import path_rule
from distill_jax.attr._perturbation import occlusion_masks
from distill_jax.audit._queries import ModelQueries
from distill_jax.metrics._faithfulness import _random_subset
from distill_jax.metrics._similarity import pearson


def _keys(key: jax.Array, samples: int | None) -> jax.Array:
    """jax.random.split(key, samples): the reference's per-sample keys ([1] holding `key` itself when None).
    Traced inside the draws below, so a draw is one compiled program with its split."""
    return key[None] if samples is None else jax.random.split(key, samples)


@compilation.run_once(static_argnums=(1, 2))
def _normal(key: jax.Array, samples: int, shape: tuple[int, ...]) -> jax.Array:
    """[S, *shape]: jax.random.normal(k, shape) for each of the S keys of `_keys(key, samples)`."""
    return jax.vmap(lambda k: jax.random.normal(k, shape))(_keys(key, samples))


@compilation.run_once(static_argnums=(1, 2))
def _uniform(key: jax.Array, samples: int | None, shape: tuple[int, ...], radius: jax.Array) -> jax.Array:
    """[S, *shape]: jax.random.uniform(k, shape, minval=-radius, maxval=radius) for each of the S keys of
    `_keys(key, samples)`."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -radius, radius))(_keys(key, samples))


@compilation.run_once(static_argnums=(1, 2, 3, 4))
def _subsets(key: jax.Array, samples: int, batch: int, features: int, size: int) -> jax.Array:
    """[S, batch, features] bool: `faithfulness._random_subset` of `size` features for each of the S keys."""
    return jax.vmap(lambda k: _random_subset(k, batch, features, size, size))(_keys(key, samples))


# p_target after softmax, as one program (eagerly, each of softmax's five operations compiles one)
_softmax = compilation.run_once(jax.nn.softmax)


_blur = compilation.run_once(gaussian_blur, static_argnames=("sigma", "truncate"))


def _picked(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """logits[n, target_n] -> [N]."""
    return np.take_along_axis(logits, target[:, None], axis=1)[:, 0]


def _target_logits(q: ModelQueries, z: np.ndarray, target: np.ndarray) -> np.ndarray:
    """f(z)_target for points z [S * B, ...] whose targets repeat every B: [S * B]."""
    return _picked(q.logits(z), np.tile(target, len(z) // len(target)))


def _stacked(points: np.ndarray) -> np.ndarray:
    """[S, B, ...] -> [S * B, ...]."""
    return points.reshape((-1,) + points.shape[2:])


def saliency(q: ModelQueries, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """|d logit_target / dx| (`attr.saliency`)."""
    return np.abs(q.gradients(x, target))


def grad_x_input(q: ModelQueries, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """x * d logit_target / dx (`attr.grad_x_input`)."""
    return x * q.gradients(x, target)


def integrated_gradients(q: ModelQueries, x: np.ndarray, target: np.ndarray, *, steps: int = 64,
                         method: str = "riemann_trapezoid") -> np.ndarray:
    """IG from the zero baseline: x * sum_s w_s grad f(a_s x) (`attr.integrated_gradients`, baseline None)."""
    alphas, weights = path_rule(method, steps)
    points = alphas.astype(np.float32).reshape((-1,) + (1,) * x.ndim) * x[None]
    grads = q.gradients(_stacked(points), np.tile(target, len(alphas))).reshape(points.shape)
    return x * np.tensordot(weights.astype(np.float32), grads, axes=1)


def smoothgrad(q: ModelQueries, x: np.ndarray, target: np.ndarray, *, key: jax.Array, samples: int = 16,
               noise: float = 0.15) -> np.ndarray:
    """(1/n) sum_s |grad f(x + e_s)|, e_s ~ N(0, (noise (max x_b - min x_b))^2) (`attr.smoothgrad` of saliency).

    The draws are the reference's with its default chunk of 1: normal(k_s, [1, *x.shape]) per split key.
    """
    flat = x.reshape(len(x), -1)
    sigma = (noise * (flat.max(1) - flat.min(1))).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    # normal(k, [1, *x.shape]) draws the same numbers as normal(k, x.shape): one program with infidelity's draws
    eps = np.asarray(_normal(key, samples, x.shape)) * sigma[None]
    noisy = x[None] + eps
    grads = q.gradients(_stacked(noisy), np.tile(target, samples)).reshape(noisy.shape)
    return np.abs(grads).sum(0) / samples


def occlusion(q: ModelQueries, x: np.ndarray, target: np.ndarray, *, patch: int = 4, stride: int = 2,
              value: float = 0.0) -> np.ndarray:
    """Mean over windows covering each pixel of f(x) - f(x with the window set to `value`) (`attr.occlusion`)."""
    masks = occlusion_masks(x.shape[1:3], patch, stride).astype(x.dtype)  # [P, H, W]
    full = _picked(q.logits(x), target)
    m4 = masks[:, None, :, :, None]
    occluded = x[None] * (1 - m4) + value * m4  # [P, B, H, W, C]
    diffs = full[None] - _target_logits(q, _stacked(occluded), target).reshape(len(masks), len(x))
    heat = np.einsum("pb,phw->bhw", diffs, masks) / masks.sum(0)
    return np.broadcast_to(heat[..., None], x.shape).astype(x.dtype)


def deletion_insertion(q: ModelQueries, x: np.ndarray, attribution: np.ndarray, target: np.ndarray, *,
                       steps: int = 16, blur_sigma: float = 5.0):
    """(deletion AUC, insertion AUC, deletion curve, insertion curve) as `metrics.deletion_auc` (zero
    baseline) and `metrics.insertion_auc` (blurred baseline) with their defaults: [B], [B], [B, steps + 1] x 2.

    Pixels ranked by the map summed over channels; at step s the top round(s H W / steps) pixels are
    removed (set to 0) or inserted (copied onto the blurred image); p_target after softmax; trapezoid AUC.
    """
    batch, height, width = x.shape[:3]
    score = attribution.sum(-1).reshape(batch, -1)
    ranks = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1, kind="stable")
    counts = np.round(np.linspace(0, height * width, steps + 1)).astype(np.int64)
    changed = (ranks[None] < counts[:, None, None]).reshape(steps + 1, batch, height, width, 1)
    blurred = np.asarray(_blur(x, sigma=blur_sigma))
    out = []
    for images in (np.where(changed, 0.0, x[None]), np.where(changed, x[None], blurred[None])):
        logits = q.logits(_stacked(images.astype(x.dtype)))
        p = np.asarray(_softmax(logits))
        curve = _picked(p, np.tile(target, steps + 1)).reshape(steps + 1, batch).T
        out.append((np.sum((curve[:, 1:] + curve[:, :-1]) / 2, axis=1) / steps, curve))
    (d_auc, d_curve), (i_auc, i_curve) = out
    return d_auc, i_auc, d_curve, i_curve


def faithfulness_correlation(q: ModelQueries, x: np.ndarray, attribution: np.ndarray, target: np.ndarray, *,
                             key: jax.Array, subset_size: int, samples: int) -> np.ndarray:
    """pearson_s(sum of A over S_s, f(x) - f(x with S_s set to 0)) per example (`metrics.faithfulness_correlation`,
    entry-wise features, baseline 0.0), the same random subsets."""
    batch = len(x)
    features = int(np.prod(x.shape[1:]))
    selected = np.asarray(_subsets(key, samples, batch, features, subset_size))  # [S, B, n]
    scores = attribution.reshape(batch, -1)
    atts = np.where(selected, scores[None], 0.0).sum(-1)  # [S, B]
    removed = np.where(selected.reshape((samples,) + x.shape), 0.0, x[None]).astype(x.dtype)
    full = _picked(q.logits(x), target)
    deltas = full[None] - _target_logits(q, _stacked(removed), target).reshape(samples, batch)
    return np.asarray(pearson(atts.T, deltas.T))


def infidelity(q: ModelQueries, x: np.ndarray, attribution: np.ndarray, target: np.ndarray, *, key: jax.Array,
               samples: int, noise: float = 0.1, normalize: bool = True) -> np.ndarray:
    """E_I[(I . A - (f(x) - f(x - I)))^2], I ~ N(0, noise^2), optionally with the optimal scale of A
    (`metrics.infidelity`), the same draws."""
    batch = len(x)
    perturbation = noise * np.asarray(_normal(key, samples, x.shape))  # [S, B, ...]
    explained = (perturbation.reshape(samples, batch, -1) * attribution.reshape(1, batch, -1)).sum(-1)
    full = _picked(q.logits(x), target)
    delta = full[None] - _target_logits(q, _stacked(x[None] - perturbation), target).reshape(samples, batch)
    if normalize:
        num, den = np.mean(explained * delta, axis=0), np.mean(explained**2, axis=0)
        explained = explained * (num / np.where(den > 0, den, 1.0))
    return np.mean((explained - delta) ** 2, axis=0)


def max_sensitivity(q: ModelQueries, x: np.ndarray, target: np.ndarray, *, key: jax.Array, radius: float,
                    samples: int = 8) -> np.ndarray:
    """max_s ||S(x + u_s) - S(x)||_2 / ||S(x)||_2 of the saliency map S, u_s ~ U(-r, r)
    (`metrics.max_sensitivity` of `attr.saliency`), the same draws."""
    batch = len(x)
    ref = saliency(q, x, target).reshape(batch, -1)
    noisy = x[None] + np.asarray(_uniform(key, samples, x.shape, radius))
    maps = saliency(q, _stacked(noisy), np.tile(target, samples)).reshape(samples, batch, -1)
    dist = np.linalg.norm(maps - ref[None], axis=-1)
    return (dist / np.maximum(np.linalg.norm(ref, axis=-1), np.finfo(np.float32).tiny)).max(0)


def ig_completeness_error(q: ModelQueries, x: np.ndarray, attribution: np.ndarray, target: np.ndarray, *,
                          eps: float = 1e-9) -> np.ndarray:
    """|sum_i A_i - (f(x) - f(0))| / max(|f(x) - f(0)|, eps) (`metrics.ig_completeness_error`, zero baseline)."""
    delta = _target_logits(q, np.concatenate([x, np.zeros_like(x)]), target).reshape(2, len(x))
    delta = delta[0] - delta[1]
    total = attribution.reshape(len(x), -1).sum(1)
    return np.abs(total - delta) / np.maximum(np.abs(delta), eps)


def adversarial_accuracy(q: ModelQueries, x: np.ndarray, labels: np.ndarray, *, attack: str, epsilon: float,
                         step_size: float = 0.0, steps: int = 1, key: jax.Array | None = None) -> float:
    """Accuracy on FGSM or PGD examples (`robust.adversarial_accuracy` with `robust.fgsm` / `robust.pgd`,
    random start, no clipping), the same random start.

    FGSM: x + eps sign(grad CE(x)). PGD: x_0 = x + U(-eps, eps), x_{t+1} = P_eps(x_t + a sign(grad CE(x_t))).
    """
    if attack == "fgsm":
        adv = x + epsilon * np.sign(q.gradients(x, labels, cross_entropy=True))
    elif attack == "pgd":
        adv = x + np.asarray(_uniform(key, None, x.shape, epsilon))[0]
        for _ in range(steps):
            adv = adv + step_size * np.sign(q.gradients(adv, labels, cross_entropy=True))
            adv = np.clip(adv, x - epsilon, x + epsilon)
    else:
        raise ValueError(f"attack must be 'fgsm' or 'pgd'; got {attack!r}")
    return float(np.mean(np.argmax(q.logits(adv.astype(x.dtype)), axis=-1) == labels))
