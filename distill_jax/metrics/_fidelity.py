"""Accuracy, fidelity, faithfulness of attributions, sanity checks and adversarial robustness.

Arguments follow the library's one convention (`distill_jax.attribution_core`'s docstring);
`mean_kl(student_logits, teacher_logits)` is KL(teacher || student).

Everything is batched: the deletion/insertion curves run `lax.map` over the steps with the whole
batch in each call, and the robustness checks run `lax.map` over noise samples.
Targets follow `distill_jax.attr`: [batch] ints in [0, num_classes), checked when concrete, or [batch, K]
ints with one attribution per target ([batch, K, ...]); the scores then gain a K axis after the batch
axis and column k equals the call with (attribution[:, k], target[:, k])
(`attr._core.per_target_scored`). Inside `jax.jit` an out-of-range target gives NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax import compilation


# --------------------------------------------------------------------------------------------
# Accuracy and fidelity
# --------------------------------------------------------------------------------------------
def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Top-1 accuracy: mean_b [argmax logits_b = y_b] (over examples with mask_b = 1 when given).

    Args:
      logits: [batch, classes]; labels: [batch] ints; mask: optional [batch] bool/0-1 weights.
    Returns:
      scalar.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [batch, classes] and labels [batch]; got {logits.shape} and {labels.shape}")
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    if mask is None:
        return correct.mean()
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != labels.shape:
        raise ValueError(f"mask must be [batch] = {labels.shape}; got {mask.shape}")
    return jnp.sum(correct * mask) / jnp.maximum(mask.sum(), 1.0)


def _check_logit_pair(student_logits, teacher_logits) -> None:
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(f"student_logits and teacher_logits must match; got {jnp.shape(student_logits)} and "
                         f"{jnp.shape(teacher_logits)}")


def agreement(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Top-1 fidelity: mean_b [argmax s_b = argmax t_b]. Returns a scalar (host or device arrays in,
    one compiled program per shape)."""
    _check_logit_pair(student_logits, teacher_logits)
    return _agreement(student_logits, teacher_logits)


@compilation.run_once
def _agreement(student_logits, teacher_logits):
    return jnp.mean((jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32))


def mean_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Mean KL(softmax(t/T) || softmax(s/T)) over the batch: how much the student loses of the teacher's
    distribution (student first, as every two-model function). Returns a scalar (one compiled program
    per shape; `temperature` is an operand, so a new value does not recompile).

    Reference: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".
    """
    _check_logit_pair(student_logits, teacher_logits)
    return _mean_kl(student_logits, teacher_logits, temperature)


@compilation.run_once
def _mean_kl(student_logits, teacher_logits, temperature):
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))
