"""Private distillation: PATE's noisy teacher votes, vmapped teacher ensembles, DP-SGD, and their epsilons.

PATE (Papernot et al., ICLR 2017; "Scalable Private Learning with PATE", ICLR 2018) trains T teachers
on disjoint shards of the private data and labels public student data by a noisy vote::

    votes = teacher_votes(ensemble_logits(apply_fn, stacked_params, x_public))   # [B, classes]
    labels, answered = confident_gnmax(votes, threshold=..., sigma_threshold=..., sigma=..., key=key)
    eps = pate_epsilon(votes, sigma=..., delta=1e-5, threshold=..., sigma_threshold=..., answered=answered)
    # the whole run: every query's threshold check and every answered GNMax query (data_dependent=True:
    # PATE 2018's tighter bound, itself a function of the private votes)

The teachers are trained together: their parameters are stacked on a leading axis [T, ...] and one
jitted `jax.vmap` of a single-teacher step updates all of them, each on a batch of its own shard.

DP-SGD (Abadi et al., CCS 2016) clips every per-example gradient and adds Gaussian noise to the sum;
`dp_sgd_epsilon` gives its (epsilon, delta) guarantee for the sampling that ran. Every epsilon here comes from Google's
`dp_accounting` Renyi-DP accountant (Mironov 2017), so the numbers match the reference implementation.

Loss functions take `(params, batch) -> [batch]` per-example losses (the caller -- here the step --
reduces); `batch` is a pytree of arrays whose leaves share the leading batch axis (e.g. {"x", "y"}).
Hyper-parameters are Python numbers (static under jit).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distill_jax import parallel
from distill_jax._checks import check_int, check_key, check_number, concrete_float
from distill_jax.train._dpsgd import LossFn


def _check_votes(votes) -> None:
    if jnp.ndim(votes) != 2:
        raise ValueError(f"votes must be [batch, classes]; got shape {tuple(jnp.shape(votes))}")


def teacher_votes(logits: jax.Array) -> jax.Array:
    """Vote counts of a teacher ensemble: how many teachers predict each class.

    votes[b, c] = #{t : argmax_k logits[t, b, k] = c}

    A teacher whose logits tie votes for the lowest tied class (`jnp.argmax`).

    Args:
      logits: [teachers, batch, classes], e.g. from `ensemble_logits`.
    Returns:
      [batch, classes] int32; every row sums to the number of teachers.

    Reference: Papernot et al., "Semi-supervised Knowledge Transfer for Deep Learning from Private
    Training Data" (PATE), ICLR 2017, section 2.1.
    """
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must be [teachers, batch, classes]; got shape {tuple(jnp.shape(logits))}")
    num_classes = jnp.shape(logits)[-1]
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.int32).sum(axis=0)


def gnmax(votes: jax.Array, *, sigma, key: jax.Array) -> jax.Array:
    """Gaussian NoisyMax (GNMax): the class with the most votes after Gaussian noise on every count.

    label[b] = argmax_c (votes[b, c] + N(0, sigma^2)),  noise i.i.d. over b and c

    sigma=0 is exactly the plain argmax of the votes (no noise is drawn). Ties (equal noisy counts,
    in practice only when sigma=0) go to the lowest class index, as in `jnp.argmax`.

    Args:
      votes: [batch, classes] vote counts (any real dtype), e.g. from `teacher_votes`.
      sigma: noise standard deviation, >= 0 (Python number).
      key: PRNG key for the noise.
    Returns:
      [batch] int32 labels.

    Reference: Papernot et al., "Scalable Private Learning with PATE", ICLR 2018, section 4.1.
    """
    _check_votes(votes)
    s = check_number(sigma, "sigma", low=0, traced_ok=True)
    check_key(key)
    votes = jnp.asarray(votes)
    if s == 0:
        return jnp.argmax(votes, axis=-1).astype(jnp.int32)
    counts = votes.astype(jnp.promote_types(votes.dtype, jnp.float32))
    noisy = counts + sigma * jax.random.normal(key, counts.shape, counts.dtype)
    return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


def confident_gnmax(votes: jax.Array, *, threshold, sigma_threshold, sigma, key: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Confident GNMax: answer a query only when the teachers agree enough, then label it by GNMax.

    answered[b] = max_c votes[b, c] + N(0, sigma_threshold^2) >= threshold
    label[b]    = gnmax(votes, sigma=sigma)[b]  if answered[b]  else -1

    The key is split once: `k_threshold, k_label = jax.random.split(key)`; the labels are
    `gnmax(votes, sigma=sigma, key=k_label)` where answered. Unanswered queries get label -1 so that no
    label outside the privacy accounting can be used by mistake (only answered queries pay the GNMax cost;
    every query pays the threshold check).

    Args:
      votes: [batch, classes] vote counts.
      threshold: the noisy maximum vote must reach this (T in the paper).
      sigma_threshold: noise std of the threshold check, >= 0 (sigma_1 in the paper).
      sigma: noise std of the GNMax answer, >= 0 (sigma_2 in the paper).
      key: PRNG key.
    Returns:
      (labels [batch] int32, -1 where not answered; answered [batch] bool).

    Reference: Papernot et al., "Scalable Private Learning with PATE", ICLR 2018, Algorithm 1.
    """
    _check_votes(votes)
    concrete_float(threshold, "threshold")
    s1 = check_number(sigma_threshold, "sigma_threshold", low=0, traced_ok=True)
    check_number(sigma, "sigma", low=0, traced_ok=True)
    check_key(key)
    votes = jnp.asarray(votes)
    k_threshold, k_label = jax.random.split(key)
    top = jnp.max(votes, axis=-1).astype(jnp.promote_types(votes.dtype, jnp.float32))
    if s1 != 0:
        top = top + sigma_threshold * jax.random.normal(k_threshold, top.shape, top.dtype)
    answered = top >= threshold
    labels = jnp.where(answered, gnmax(votes, sigma=sigma, key=k_label), -1).astype(jnp.int32)
    return labels, answered


def ensemble_shards(n: int, num_teachers: int, *, seed: int) -> list[np.ndarray]:
    """Disjoint shards of `range(n)`, one per teacher, covering every example.

    A random permutation (numpy, `seed`) split into `num_teachers` parts whose sizes differ by at most
    one (the first `n % num_teachers` shards hold one more). Each shard is sorted.

    Args:
      n: number of training examples.
      num_teachers: number of shards, 1 <= num_teachers <= n.
      seed: permutation seed.
    Returns:
      list of `num_teachers` int64 index arrays.

    Reference: PATE (Papernot et al., ICLR 2017), section 2.1: teachers see disjoint data.
    """
    n = check_int(n, "n")
    num_teachers = check_int(num_teachers, "num_teachers")
    if num_teachers > n:
        raise ValueError(f"more teachers ({num_teachers}) than examples ({n})")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_teachers)]


def ensemble_batch_indices(shards: Sequence[np.ndarray], *, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Per-teacher batches: at every step each teacher gets `batch_size` examples of its own shard.

    Teacher t walks through epochs of its shard, each a fresh permutation
    (`np.random.default_rng([seed, t, epoch])`) with the ragged tail dropped.

    Args:
      shards: from `ensemble_shards`.
      batch_size: per-teacher batch, 1 <= batch_size <= the smallest shard.
      steps: number of steps.
      seed: data-order seed.
    Returns:
      [steps, teachers, batch_size] int64 indices into the full training set.
    """
    batch_size = check_int(batch_size, "batch_size")
    steps = check_int(steps, "steps")
    smallest = min(len(s) for s in shards)
    if batch_size > smallest:
        raise ValueError(f"batch_size must be <= the smallest shard ({smallest} examples); got {batch_size}")
    out = np.empty((steps, len(shards), batch_size), np.int64)
    for t, shard in enumerate(shards):
        per_epoch = len(shard) // batch_size
        for step in range(steps):
            epoch, i = divmod(step, per_epoch)
            if i == 0:
                order = np.random.default_rng([seed, t, epoch]).permutation(len(shard))
            out[step, t] = shard[order[i * batch_size : (i + 1) * batch_size]]
    return out


def teacher_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
    """The un-jitted step of ONE teacher: (params, opt_state, batch) -> (params, opt_state, loss).

    loss = mean_b loss_fn(params, batch)[b];  params <- params + optimizer.update(grad loss)

    `make_ensemble_step` vmaps this over the stacked teachers.
    """

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _teacher_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[teachers, batch, ...]: the teacher axis replicated, the batch axis split over `data`."""
    return NamedSharding(mesh, P(None, parallel.DATA_AXIS))


def make_ensemble_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None
                       ) -> Callable:
    """One jitted step for all teachers: `jax.vmap(teacher_step_fn)` over the leading teacher axis.

    step(stacked_params, stacked_opt_state, batch) -> (stacked_params, stacked_opt_state, losses [T])
    with batch leaves [T, batch_size, ...] (teacher t trains on batch[t]). The old parameters and
    optimizer state are donated.

    With a `mesh` (single process): parameters and optimizer state replicated, batches split along
    `data` on their second (batch) axis; the per-teacher batch must divide by the mesh's devices.
    """
    step = jax.vmap(teacher_step_fn(loss_fn, optimizer))
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    repl = parallel.replicated(mesh)
    return jax.jit(step, in_shardings=(repl, repl, _teacher_batch_sharding(mesh)),
                   out_shardings=(repl, repl, repl), donate_argnums=(0, 1))


def init_ensemble(init_fn: Callable[[jax.Array], Any], num_teachers: int, *, seed: int):
    """Stacked parameters of `num_teachers` teachers: `jax.vmap(init_fn)(jax.random.split(key(seed), T))`.

    Teacher t's parameters equal `init_fn(jax.random.split(jax.random.key(seed), T)[t])`.

    Args:
      init_fn: key -> params of one teacher (e.g. `lambda k: model.init(k, x[:1])["params"]`).
    Returns:
      params pytree whose leaves have a leading [num_teachers] axis.
    """
    num_teachers = check_int(num_teachers, "num_teachers")
    return jax.vmap(init_fn)(jax.random.split(jax.random.key(seed), num_teachers))


class ShardEnsemble(NamedTuple):
    """A trained teacher ensemble: stacked params [T, ...], the shards, and the losses [steps, T]."""

    params: Any
    shards: list[np.ndarray]
    losses: np.ndarray


def train_ensemble(init_fn: Callable[[jax.Array], Any], loss_fn: LossFn, optimizer: optax.GradientTransformation,
                   data, *, num_teachers: int, batch_size: int, steps: int, seed: int = 0,
                   mesh: Mesh | None = None, shards: Sequence[np.ndarray] | None = None) -> ShardEnsemble:
    """Trains `num_teachers` teachers on disjoint shards of `data` with one vmapped, jitted step.

    shards = ensemble_shards(n, T, seed) (or the given index sets, which may overlap: e.g. membership
    inference's shadow models, `shadow_subsets`); params = init_ensemble(init_fn, T, seed);
    for each step: params = ensemble_step(params, opt_state, data[idx[step]]), idx from
    `ensemble_batch_indices(shards, batch_size, steps, seed)`.

    Args:
      init_fn: key -> one teacher's params.
      loss_fn: (params, batch) -> [batch] per-example losses.
      optimizer: an optax transformation (its state is vmapped too).
      data: pytree of host arrays with a common leading axis n (e.g. {"x": [n, ...], "y": [n]}).
      num_teachers, batch_size (per teacher), steps, seed: see above.
      mesh: optional single-process mesh; batches are split along `data` (see `make_ensemble_step`).
      shards: optional T index arrays into `data`, one training set per model (default: disjoint shards).
    Returns:
      ShardEnsemble(params [T, ...], shards, losses [steps, T] numpy).

    Reference: PATE (Papernot et al., ICLR 2017), section 2.1.
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data must hold at least one array")
    n = len(leaves[0])
    if any(len(a) != n for a in leaves):
        raise ValueError(f"data arrays must share their leading axis; got lengths {[len(a) for a in leaves]}")
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
    if shards is None:
        shards = ensemble_shards(n, num_teachers, seed=seed)
    elif len(shards) != num_teachers or any(np.max(s, initial=0) >= n or np.min(s, initial=0) < 0 for s in shards):
        raise ValueError(f"shards must be {num_teachers} index arrays into the {n} examples of data")
    idx = ensemble_batch_indices(shards, batch_size=batch_size, steps=steps, seed=seed)
    params = init_ensemble(init_fn, num_teachers, seed=seed)
    opt_state = jax.vmap(optimizer.init)(params)
    step_fn = make_ensemble_step(loss_fn, optimizer, mesh=mesh)
    host = jax.tree_util.tree_map(np.asarray, data)
    sync = jax.default_backend() == "cpu"  # as train._sync_every_step: XLA:CPU collectives starve otherwise
    losses = []
    for step in range(steps):
        batch = jax.tree_util.tree_map(lambda a: a[idx[step]], host)
        params, opt_state, loss = step_fn(params, opt_state, batch)
        if sync:
            loss.block_until_ready()
        losses.append(loss)
    return ShardEnsemble(params, shards, np.asarray(jax.device_get(jnp.stack(losses))))


def ensemble_logits(apply_fn: Callable, stacked_params, x: jax.Array, *, mesh: Mesh | None = None) -> jax.Array:
    """Every teacher's logits on the same inputs: `jax.vmap(apply_fn, in_axes=(0, None))`, jitted.

    logits[t] = apply_fn(stacked_params[t], x)

    Args:
      apply_fn: (params, x) -> [batch, classes] for one teacher.
      stacked_params: leaves with a leading [T] axis (from `train_ensemble`).
      x: [batch, ...].
      mesh: optional single-process mesh: x split along `data` when its batch divides by the devices
        (replicated otherwise), parameters replicated.
    Returns:
      [T, batch, classes].
    """
    split = mesh is not None and jnp.shape(x)[0] % mesh.shape[parallel.DATA_AXIS] == 0
    return _ensemble_program(apply_fn, mesh, split)(stacked_params, x)


@functools.lru_cache(maxsize=None)  # one compiled program per (apply_fn, mesh, split), not one per call
def _ensemble_program(apply_fn: Callable, mesh: Mesh | None, split: bool) -> Callable:
    fn = jax.vmap(apply_fn, in_axes=(0, None))
    if mesh is None:
        return jax.jit(fn)
    repl = parallel.replicated(mesh)
    x_sharding, out_sharding = (parallel.data_sharding(mesh), _teacher_batch_sharding(mesh)) if split else (repl, repl)
    return jax.jit(fn, in_shardings=(repl, x_sharding), out_shardings=out_sharding)
