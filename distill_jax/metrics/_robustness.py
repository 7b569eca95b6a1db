"""Explanation quality beyond faithfulness: robustness, complexity and randomisation metrics.

Each metric returns one value per example ([batch]; the sMPRT curve is [batch, layers]) and follows
the definitions of Quantus 0.6 (Hedström et al. 2023, "Quantus: An Explainable AI Toolkit for
Responsible Evaluation of Neural Network Explanations and Beyond", JMLR); where a value differs
from Quantus the function's docstring says how and why.

Robustness (`avg_sensitivity`, `local_lipschitz`) and `random_logit` take `attr_fn(x, target) ->
maps [batch, ...]` (close over apply_fn and the method's options).
The complexity metrics (`sparseness`, `complexity`, `discrete_entropy`) read the attribution only.
The parameter-randomisation tests (`smooth_mprt`, `efficient_mprt`) take
`attr_fn(params, x, target) -> maps` and the parameters, like `metrics.randomization_check`.

Common differences from Quantus, valid for every function here:
- No attribution normalisation. Quantus divides maps by the largest |value| of the whole batch
  (`normalise_by_max`) in several metrics by default, which makes one example's score depend on the
  others; run Quantus with `normalise=False` (or normalise inside attr_fn) to compare values.
- Flattening is in this library's layout (NHWC). Quantus flattens channel-first maps; the two
  orders agree for maps with one channel or without a channel axis (the usual case).
- Randomness comes from `key` (jax.random), so values equal Quantus' only in distribution.
- Samples are evaluated `chunk` at a time (`lax.map` / `lax.scan`), so memory is bounded by
  `chunk` copies of the batch whatever `samples` is. The values do not depend on `chunk` with the
  default threefry keys; "rbg"/"unsafe_rbg" keys draw different noise under vmap, so with those
  the noise (not its distribution) changes with `chunk`.

Call the metrics that take an attr_fn inside `jax.jit` (params as an argument, e.g.
`jax.jit(lambda p, x, t, k: avg_sensitivity(partial(attr, p), x, t, key=k, radius=0.1))`):
eagerly, the sample loop is traced and compiled again on every call.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax._checks import check_choice, check_int, check_number
from distill_jax.attr._core import check_x, sample_chunk

# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------




def _check_batch_target(target: Any, batch: int) -> jax.Array:
    target = jnp.asarray(target)
    if target.ndim < 1 or target.shape[0] != batch or not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(f"target must be integer class indices [batch] with batch={batch}; "
                         f"got shape {target.shape} dtype {target.dtype}")
    return target


def _check_maps(out: Any, batch: int, what: str) -> None:
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) < 2 or shape[0] != batch:
        raise ValueError(f"{what} must return maps [batch, ...] with batch={batch}; got shape {shape}")


def _check_attribution_batch(attribution: Any, name: str = "attribution") -> jax.Array:
    # a host array is flattened on the host: eagerly, a reshape compiles a program per shape
    a = attribution if isinstance(attribution, jax.Array) else np.asarray(attribution)
    if a.ndim < 2 or not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real array [batch, ...]; got shape {a.shape} dtype {a.dtype}")
    return a.reshape(a.shape[0], -1).astype(jnp.result_type(a.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# Loops over samples (memory bounded by `chunk` samples)
# --------------------------------------------------------------------------------------------
def _map_samples(fn: Callable, keys: jax.Array, chunk: int | None) -> jax.Array:
    """[fn(k) for k in keys] stacked on a new leading axis; `chunk` samples per `lax.map` step."""
    return jax.lax.map(fn, keys, batch_size=sample_chunk(chunk, keys.shape[0]))


def _sum_samples(fn: Callable, xs: Any, chunk: int | None) -> jax.Array:
    """sum_s fn(xs[s]) over the leading axis of the pytree xs, `chunk` samples per `lax.scan` step.

    Only the running sum is kept (the samples' outputs are never stacked); the samples left over
    after the whole chunks run as one more vmapped step.
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    size = sample_chunk(chunk, n)
    full, rest = divmod(n, size)
    take = lambda lo, hi: jax.tree_util.tree_map(lambda a: a[lo:hi], xs)
    step_sum = lambda part: jnp.sum(jax.vmap(fn)(part), axis=0)
    out = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: a[0], xs))
    total = jnp.zeros(out.shape, out.dtype)
    chunks = jax.tree_util.tree_map(lambda a: a.reshape((full, size) + a.shape[1:]), take(0, full * size))
    total, _ = jax.lax.scan(lambda acc, part: (acc + step_sum(part), None), total, chunks)
    if rest:
        total = total + step_sum(take(full * size, n))
    return total


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------
def _norm_l2(v: jax.Array) -> jax.Array:
    return jnp.linalg.norm(v, axis=1)


def _norm_linf(v: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(v), axis=1)


# Norms of flattened maps [batch, d] -> [batch]; "fro" and "l2" are the same on flattened maps (as in Quantus).
NORMS: dict[str, Callable[[jax.Array], jax.Array]] = {"fro": _norm_l2, "l2": _norm_l2, "linf": _norm_linf}


def _uniform_noise(key, shape, dtype, radius):
    return jax.random.uniform(key, shape, dtype, -radius, radius)


def _gaussian_noise(key, shape, dtype, radius):
    return radius * jax.random.normal(key, shape, dtype)


# Input perturbations u(key, shape, dtype, radius): U(-r, r) per value, or N(0, r^2) per value.
PERTURBATIONS: dict[str, Callable] = {"uniform": _uniform_noise, "gaussian": _gaussian_noise}


def _robustness_setup(attr_fn, x, target, samples, radius, perturbation):
    x = check_x(x)
    target = _check_batch_target(target, x.shape[0])
    check_int(samples, "samples")
    check_number(radius, "radius", low=0, low_open=True)
    noise_fn = check_choice(perturbation, PERTURBATIONS, "perturbation")
    _check_maps(jax.eval_shape(attr_fn, x, target), x.shape[0], "attr_fn(x, target)")
    return x, target, noise_fn


def avg_sensitivity(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    radius: float,
    samples: int = 10,
    normalize: bool = True,
    norm: str = "fro",
    perturbation: str = "uniform",
    chunk: int | None = None,
) -> jax.Array:
    """Average sensitivity of an explanation under small input noise (Monte Carlo).

    AVG-SENS_b = (1/S) sum_{s=1..S} ||A(x_b + u_s) - A(x_b)|| / ||A(x_b)||,  u_s ~ U(-r, r)^d
    (without the denominator when normalize=False). As Quantus `AvgSensitivity`
    (perturb_func=batch_uniform_noise, lower_bound=r, Frobenius norms of the flattened maps, mean
    over `nr_samples`); Quantus' default r is 0.2 and S is 200. The noise draws are those of
    `metrics.max_sensitivity` with the same key, so max_sensitivity is the max of the same terms.
    A zero map A(x_b) makes the ratio huge (the denominator is floored at the smallest float);
    Quantus gives inf there.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...] (close over apply_fn and options).
      x: [batch, ...] inputs. target: [batch] ints, passed to attr_fn as is.
      key: PRNG key for the noise. radius: r > 0 (half-width for "uniform", std for "gaussian").
      samples: S >= 1. normalize: divide by ||A(x_b)||. norm: a key of `NORMS` ("fro", "l2", "linf"),
        used in numerator and denominator. perturbation: a key of `PERTURBATIONS`.
      chunk: noise samples per `lax.map` step (None: the backend default, see `sample_chunk`).
    Returns:
      [batch] (lower = more robust).
    Reference: Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations".
    """
    return _sensitivities(attr_fn, x, target, key=key, radius=radius, samples=samples, normalize=normalize,
                          norm=norm, perturbation=perturbation, chunk=chunk).mean(axis=0)


def max_sensitivity(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    radius: float,
    samples: int = 10,
    normalize: bool = True,
    chunk: int | None = None,
) -> jax.Array:
    """Max-sensitivity of an explanation under small uniform input noise (Monte Carlo).

    SENS_b = max_{s} ||A(x_b + u_s) - A(x_b)||_2 / ||A(x_b)||_2,  u_s ~ U(-r, r)^d
    (without the denominator when normalize=False): the max over the same terms whose mean is
    `avg_sensitivity` with the same key.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...] (close over apply_fn and options).
      x: [batch, ...]; target: [batch]; key: PRNG key; radius: r > 0; samples: >= 1;
      chunk: noise samples per `lax.map` step (None: the backend default, see `sample_chunk`).
    Returns:
      [batch].
    Reference: Yeh et al. 2019, "On the (In)fidelity and Sensitivity of Explanations".
    """
    return _sensitivities(attr_fn, x, target, key=key, radius=radius, samples=samples, normalize=normalize,
                          norm="l2", perturbation="uniform", chunk=chunk).max(axis=0)


def _sensitivities(attr_fn, x, target, *, key, radius, samples, normalize, norm, perturbation, chunk) -> jax.Array:
    """[samples, batch]: ||A(x + u_s) - A(x)|| (/ ||A(x)|| when normalize), u_s from `PERTURBATIONS[perturbation]`."""
    x, target, noise_fn = _robustness_setup(attr_fn, x, target, samples, radius, perturbation)
    norm_fn = check_choice(norm, NORMS, "norm")
    ref = attr_fn(x, target).reshape(x.shape[0], -1)

    def one(k):
        noisy = x + noise_fn(k, x.shape, x.dtype, radius)
        return norm_fn(attr_fn(noisy, target).reshape(ref.shape) - ref)

    dist = _map_samples(one, jax.random.split(key, samples), chunk)
    if not normalize:
        return dist
    den = norm_fn(ref)
    return dist / jnp.maximum(den, jnp.finfo(den.dtype).tiny)


def local_lipschitz(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    radius: float,
    samples: int = 10,
    perturbation: str = "gaussian",
    chunk: int | None = None,
) -> jax.Array:
    """Local Lipschitz estimate of an explanation: the largest change of the map per unit of input change.

    LLE_b = max_{s=1..S} ||A(x_b + u_s) - A(x_b)||_2 / (||u_s||_2 + 1e-10),  u_s ~ N(0, r^2 I)
    As Quantus `LocalLipschitzEstimate` (batch_gaussian_noise with perturb_std=r, Euclidean
    distances in numerator and denominator, the same 1e-10, max over `nr_samples`); Quantus'
    default r is 0.1 and S is 200, and it normalises the maps by the batch max by default
    (normalise=True): pass normalise=False there to compare. The paper maximises over a ball with
    an optimiser; this (like Quantus) is the Monte Carlo lower bound of that maximum.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...].
      x: [batch, ...]. target: [batch] ints, passed to attr_fn as is.
      key: PRNG key. radius: r > 0 (std for "gaussian", half-width for "uniform").
      samples: S >= 1. perturbation: a key of `PERTURBATIONS` (default "gaussian", as Quantus).
      chunk: noise samples per `lax.map` step (None: the backend default).
    Returns:
      [batch] (lower = more robust; exactly L for A(x) = L x).
    Reference: Alvarez-Melis & Jaakkola 2018, "On the Robustness of Interpretability Methods".
    """
    x, target, noise_fn = _robustness_setup(attr_fn, x, target, samples, radius, perturbation)
    ref = attr_fn(x, target).reshape(x.shape[0], -1)

    def one(k):
        u = noise_fn(k, x.shape, x.dtype, radius)
        change = _norm_l2(attr_fn(x + u, target).reshape(ref.shape) - ref)
        return change / (_norm_l2(u.reshape(x.shape[0], -1)) + 1e-10)

    return _map_samples(one, jax.random.split(key, samples), chunk).max(axis=0)
