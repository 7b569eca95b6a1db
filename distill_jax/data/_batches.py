"""Batches: shuffled training batches, evaluation batches, each process's slice under
multi-host, and class-stratified index draws.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from distill_jax._checks import check_int


def _check_xy(x, y):
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must match")


def num_train_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch: ``n // batch_size`` (the ragged tail is dropped)."""
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size={batch_size} must be in [1, n_examples={n}]")
    return n // batch_size


def train_batches(x, y, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches for one epoch, deterministic in (seed, epoch).

    The permutation comes from ``np.random.default_rng([seed, epoch])``, so a resumed run sees the same order;
    the last ``n % batch_size`` examples of the permutation are dropped (a different set each epoch).

    Args:
      x: [n, ...] array; y: [n] array.
      batch_size: in [1, n].

    Yields:
      (x[idx], y[idx]) with idx of length batch_size.
    """
    _check_xy(x, y)
    steps = num_train_batches(len(x), batch_size)
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(len(x))
    for i in range(steps):
        idx = np.sort(perm[i * batch_size:(i + 1) * batch_size])
        yield x[idx], y[idx]


def eval_batches(x, y, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every example exactly once, in order; the last batch is zero-padded to ``batch_size``.

    Yields:
      (x_batch [batch_size, ...], y_batch [batch_size], mask [batch_size] float32: 1 real, 0 padding).
    """
    _check_xy(x, y)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(x)
    if n == 0:
        raise ValueError("eval_batches got zero examples")
    for start in range(0, n, batch_size):
        xb, yb = np.asarray(x[start:start + batch_size]), np.asarray(y[start:start + batch_size])
        m = len(xb)
        mask = np.zeros(batch_size, np.float32)
        mask[:m] = 1.0
        if m < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((batch_size - m, *yb.shape[1:]), yb.dtype)])
        yield xb, yb, mask


def process_slice(n: int, *, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous share of n examples: ``[i * (n // P), (i + 1) * (n // P))``.

    Every process gets the same count (the last ``n % P`` examples are dropped), so all processes run the
    same number of steps.
    """
    i = jax.process_index() if process_index is None else int(process_index)
    p = jax.process_count() if process_count is None else int(process_count)
    if p < 1 or not 0 <= i < p:
        raise ValueError(f"process_index={i} must be in [0, process_count={p})")
    if n < p:
        raise ValueError(f"{n} examples cannot be shared over {p} processes (need at least one each)")
    share = n // p
    return slice(i * share, (i + 1) * share)


def stratified_indices(labels: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` indices into ``labels`` [m], spread over the classes round-robin, deterministic in ``seed``.

    Rule: shuffle 0..m-1 with ``np.random.default_rng(seed)``; within each class keep that shuffled order. Round r
    takes the r-th example of every class, in increasing class (label value) order, skipping classes with fewer
    than r + 1 examples; rounds follow one another until ``n`` indices are taken. So the first
    ``min(n, number of classes)`` indices hold one example of each class, and no class gets a second example
    before every class has one. ``n > m`` gives all m indices in this order.

    Args:
      labels: [m] integer class labels.
      n: how many indices, >= 1.
      seed: shuffle seed.

    Returns:
      [min(n, m)] int64 indices, distinct.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"stratified_indices: labels must be 1-D [m], got shape {labels.shape}")
    n = check_int(n, "stratified_indices: n")
    perm = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[perm]
    by_class = np.argsort(shuffled, kind="stable")  # grouped by class, shuffled order inside each class
    grouped = shuffled[by_class]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(grouped) else np.zeros(0, np.int64)
    rank = np.arange(len(grouped)) - np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
    order = by_class[np.lexsort((grouped, rank))]  # by round, then by class
    return perm[order[:n]].astype(np.int64)
