"""Device mesh, shardings, and multi-host start-up.

One code path from one CPU to a multi-host pod: a 1-D mesh with a `data` axis over every
device (`jax.devices()`, all processes); batches are sharded along `data`, parameters and
optimizer state are replicated. Under multi-host, each process holds only its share of
every global batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "make_mesh",
    "local_mesh",
    "data_sharding",
    "replicated",
    "check_batch_size",
    "local_batch_size",
    "shard_batch",
    "gather",
    "broadcast_from_main",
    "any_process",
    "replicate",
    "place_batch",
    "pad_to_multiple",
    "initialize_distributed",
    "is_main_process",
]


DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A mesh with one `data` axis over `devices` (default: every device of every process).

    Built by `jax.make_mesh`, which orders the devices for the hardware's topology (TPU slices), with
    the `Auto` axis type: jit propagates the batch sharding from the inputs (JAX 0.7+ defaults to `Explicit`).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def local_mesh() -> Mesh:
    """A `data` mesh over this process's own devices: for work every process does on its own data
    (the teacher cache of its share, the audit of the test sample), with results it can read back."""
    return make_mesh(jax.local_devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, *, what: str = "batch_size") -> None:
    """Raises ValueError unless the global batch divides evenly over the mesh's `data` axis."""
    n = mesh.shape[DATA_AXIS]
    if global_batch_size < 1 or global_batch_size % n:
        lo = max(n, (global_batch_size // n) * n)
        raise ValueError(
            f"{what}={global_batch_size} must be a positive multiple of the {n} devices in the mesh; "
            f"try {lo} or {lo + n}"
        )


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch (global / process_count)."""
    return global_batch_size // jax.process_count()


def shard_batch(batch, mesh: Mesh):
    """Places a pytree of host (numpy) arrays on the mesh, split along the batch axis.

    With one process the arrays are the global batch; with several, each process passes its
    own contiguous share and the result is the global array.
    """
    sharding = data_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch
    )


def gather(array) -> np.ndarray:
    """A (possibly multi-host sharded) array as one host numpy array, the same on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def broadcast_from_main(tree):
    """Process 0's value of a pytree of arrays, on every process (identity with one process)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return multihost_utils.broadcast_one_to_all(tree)


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (a collective: every process must call it; plain `flag` with one)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def replicate(tree, mesh: Mesh, *, copy: bool = False):
    """Places a pytree on every device of the mesh.

    copy: never reuse the input's buffers (a donating step would delete them). XLA:CPU may alias
    one shard of the result to the input even with `may_alias=False`, so the copy goes through the host.
    """
    return jax.device_put(jax.device_get(tree) if copy else tree, replicated(mesh))


def place_batch(tree, mesh: Mesh):
    """Host arrays [n, ...] placed on a single-process `mesh`: split along `data` when n divides by its
    device count, replicated otherwise (a small audit sample, say 10 images on 4 devices)."""
    n = mesh.shape[DATA_AXIS]

    def place(a):
        return jax.device_put(a, data_sharding(mesh) if np.shape(a)[0] % n == 0 else replicated(mesh))

    return jax.tree_util.tree_map(place, tree)


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """`x` [n, ...] with zero rows appended up to a multiple of `multiple`, and how many were appended."""
    pad = -len(x) % multiple
    if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return x, pad


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts `jax.distributed` when asked (flags) or when the environment says so.

    Explicit arguments win; otherwise JAX's own detection (TPU pods, SLURM, Open MPI) and the
    `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` variables are used.
    Safe to call more than once: whoever calls first starts the runtime, later calls leave it be
    (`jax.distributed.initialize` itself raises when called twice).
    Returns True when a multi-process runtime is running.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    auto = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"))
    if jax.distributed.is_initialized():  # a script (e.g. colab_accelerators.py) already started it
        return True
    if coordinator is None and not auto:
        return False
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def is_main_process() -> bool:
    """True on the process that writes reports and logs (process 0)."""
    return jax.process_index() == 0
