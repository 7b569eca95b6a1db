"""Run metadata: peak memory, versions, the CPU model, and JSON writing of results.
"""
from __future__ import annotations

import json
import os
import platform

import jax
import numpy as np


def cpu_model() -> str:
    """The host CPU's model name from /proc/cpuinfo (what `lscpu` prints); platform's guess elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (0.0 where the OS does not report it)."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if platform.system() == "Darwin" else 2**10), 1)  # bytes on macOS, KB on Linux


def versions() -> dict:
    """Versions of python and the libraries a run used, and the machine it ran on (for metrics.json)."""
    import flax  # noqa: E401, PLC0415
    import optax
    import orbax.checkpoint

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": orbax.checkpoint.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
            "machine": platform.machine(), "processor": cpu_model(), "cpus": os.cpu_count()}


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)
