"""Soft decision tree losses: the path-weighted leaf cross entropy (Frosst & Hinton 2017, eq. 2),
its KD form, and the balance penalty.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from distill_jax.distill.losses._common import (
    _BALANCE_EPS,
    _check_floating,
    _check_logits,
    _check_rank,
    _check_same_shape,
    _check_temperature,
    _concrete_scalar,
    _fail,
)


def soft_tree_loss(
    path_probs: jax.Array, leaf_logits: jax.Array, target_probs: jax.Array
) -> jax.Array:
    """Soft decision tree objective: path-weighted cross entropy of the leaf distributions.

    Formula: ``L_b = -sum_l P_l(x_b) * sum_c T_bc * log Q_lc`` with
    ``Q_l = softmax(leaf_logits_l)`` the class distribution held by leaf ``l``,
    ``P_l(x)`` the probability of reaching leaf ``l`` (product of the routing
    probabilities along its path; see ``models.SoftDecisionTree``), and ``T`` the
    target distribution (one-hot labels or the teacher's soft targets).

    Args:
      path_probs: ``[batch, leaves]``, rows non-negative and summing to 1.
      leaf_logits: ``[leaves, classes]`` floating.
      target_probs: ``[batch, classes]``, rows non-negative and summing to 1.

    Returns:
      ``[batch]`` losses.

    Reference: Frosst & Hinton (2017), "Distilling a Neural Network Into a Soft
    Decision Tree", arXiv:1711.09784, equation 2.
    """
    fn = "soft_tree_loss"
    _check_rank(fn, "path_probs", path_probs, (2,), "[batch, leaves]")
    _check_rank(fn, "leaf_logits", leaf_logits, (2,), "[leaves, classes]")
    _check_rank(fn, "target_probs", target_probs, (2,), "[batch, classes]")
    for name, x in (("path_probs", path_probs), ("leaf_logits", leaf_logits),
                    ("target_probs", target_probs)):
        _check_floating(fn, name, x)
    (b, n_leaves), (l2, c), (b2, c2) = (
        jnp.shape(path_probs), jnp.shape(leaf_logits), jnp.shape(target_probs)
    )
    if n_leaves != l2:
        raise _fail(
            fn, f"path_probs has shape {(b, n_leaves)} but leaf_logits has shape {(l2, c)}; "
            "expected path_probs [batch, leaves] and leaf_logits [leaves, classes] with the "
            "same number of leaves"
        )
    if (b, c) != (b2, c2):
        raise _fail(
            fn, f"target_probs has shape {(b2, c2)} but path_probs has shape {(b, n_leaves)} "
            f"and leaf_logits has shape {(l2, c)}; expected target_probs [batch, classes] = "
            f"{(b, c)}"
        )
    log_q = jax.nn.log_softmax(leaf_logits, axis=-1)  # [L, C]
    ce_per_leaf = -target_probs @ log_q.T  # [B, L]: CE(T_b, Q_l)
    return jnp.sum(path_probs * ce_per_leaf, axis=-1)


def soft_tree_kd_loss(
    path_probs: jax.Array, leaf_logits: jax.Array, teacher_logits: jax.Array, *, temperature
) -> jax.Array:
    """Hinton KD for a soft decision tree: both sides softened by ``T``, leaves read at ``T = 1``.

    Formula: ``T^2 * sum_l P_l(x) * KL(p_t || softmax(leaf_logits_l / T))`` with
    ``p_t = softmax(teacher_logits / T)``; equal to
    ``T^2 * (soft_tree_loss(P, leaf_logits / T, p_t) - H(p_t))``, the Frosst & Hinton
    path-weighted leaf cross entropy minus the target entropy (which has no gradient), so the
    value is 0 when every reachable leaf holds the teacher's distribution. Dividing the leaf
    logits by ``T`` here, as ``kd_loss`` divides a network's logits, lets the leaves become as
    sharp as the teacher when read at ``T = 1``; matching ``softmax(leaf_logits)`` to ``p_t``
    directly would leave them softened by ``T`` at test time.

    Args:
      path_probs: ``[batch, leaves]``, rows non-negative and summing to 1.
      leaf_logits: ``[leaves, classes]`` floating.
      teacher_logits: ``[batch, classes]`` floating (the caller stops its gradient).
      temperature: scalar ``T > 0`` (keyword-only).

    Returns:
      ``[batch]`` losses.

    References: Hinton, Vinyals & Dean (2015), arXiv:1503.02531, section 2; Frosst & Hinton
    (2017), arXiv:1711.09784, equation 2.
    """
    fn = "soft_tree_kd_loss"
    _check_logits(fn, "teacher_logits", teacher_logits)
    _check_temperature(fn, temperature)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_t = jnp.exp(log_p_t)
    entropy = -jnp.sum(p_t * log_p_t, axis=-1)
    cross = soft_tree_loss(path_probs, leaf_logits / temperature, p_t)
    return temperature**2 * (cross - entropy)


def tree_balance_penalty(node_reach: jax.Array, routing: jax.Array, *, strength) -> jax.Array:
    """Soft decision tree balance penalty (a batch-level scalar, not per example).

    Encourages every inner node to send half of the data that reaches it each way.
    Inner nodes are in breadth-first order: node ``i`` has children ``2i+1`` (left) and
    ``2i+2`` (right) and depth ``d(i) = floor(log2(i + 1))``.

    Formula::

        a_i = sum_x P^i(x) p_i(x) / sum_x P^i(x)          (sums over the batch)
        penalty = sum_i strength * 2^-d(i) * -1/2 * (log a_i + log(1 - a_i))

    ``1 - a_i`` is computed as ``sum_x P^i(x) (1 - p_i(x)) / sum_x P^i(x)`` (accurate when
    ``a_i`` is near 1), and ``a_i`` and ``1 - a_i`` are each clipped to ``>= 1e-6`` so the
    penalty stays finite; a node no example reaches (``sum_x P^i(x) = 0``) counts as
    balanced (``a_i = 1/2``). The minimum,
    reached when every ``a_i = 1/2``, is ``strength * log 2 * sum_i 2^-d(i)``.

    Args:
      node_reach: ``[batch, inner_nodes]``, ``P^i(x)`` = probability of reaching node i.
      routing: ``[batch, inner_nodes]``, ``p_i(x)`` = probability of going right at node i.
      strength: scalar ``lambda >= 0`` (keyword-only; the paper's lambda). A traced value
        is not checked.

    Returns:
      A scalar: the penalty for the whole batch (it depends on batch averages, so it
      does not decompose into per-example terms).

    Reference: Frosst & Hinton (2017), "Distilling a Neural Network Into a Soft
    Decision Tree", arXiv:1711.09784, section 4.1.
    """
    fn = "tree_balance_penalty"
    _check_rank(fn, "node_reach", node_reach, (2,), "[batch, inner_nodes]")
    _check_rank(fn, "routing", routing, (2,), "[batch, inner_nodes]")
    _check_floating(fn, "node_reach", node_reach)
    _check_floating(fn, "routing", routing)
    _check_same_shape(fn, "node_reach", node_reach, "routing", routing, "[batch, inner_nodes]")
    lam = _concrete_scalar(fn, "strength", strength)
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        raise _fail(fn, f"strength={lam!r}; expected a finite value >= 0")
    n_inner = jnp.shape(routing)[1]
    # depth(i) = floor(log2(i + 1)), computed exactly on integers:
    depth = jnp.asarray(
        [(i + 1).bit_length() - 1 for i in range(n_inner)], dtype=jnp.result_type(routing)
    )
    den = jnp.sum(node_reach, axis=0)
    reached = den > 0
    safe_den = jnp.where(reached, den, 1.0)
    # a_i and 1 - a_i each from their own sum: 1 - a_i stays accurate when a_i is near 1.
    right = jnp.where(reached, jnp.sum(node_reach * routing, axis=0) / safe_den, 0.5)
    left = jnp.where(reached, jnp.sum(node_reach * (1.0 - routing), axis=0) / safe_den, 0.5)
    right = jnp.clip(right, _BALANCE_EPS, 1.0)
    left = jnp.clip(left, _BALANCE_EPS, 1.0)
    per_node = -0.5 * (jnp.log(right) + jnp.log(left))
    return strength * jnp.sum(jnp.exp2(-depth) * per_node)
