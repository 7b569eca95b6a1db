"""Counting XLA compilations: how many programs a piece of code compiles and how long that takes.

JAX reports every backend compilation as the `jax.monitoring` event
`/jax/core/compile/backend_compile_duration`; `CompileCounter` listens to it for the duration of a
`with` block. A call served by a jitted function's in-memory cache emits nothing; a program loaded from
the persistent compilation cache is reported through the same event (with its short load time), so
`count` is the number of XLA programs the block needed and `seconds` what producing them cost.

    with CompileCounter() as compiles:
        run_something()
    compiles.count, compiles.seconds
"""
from __future__ import annotations

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Number and total seconds of XLA backend compilations inside a `with` block (this process)."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> bool:
        jax.monitoring.unregister_event_duration_listener(self._listen)
        return False
