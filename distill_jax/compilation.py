"""Counting XLA compilations, and compiling cheaply the programs that run only a few times.

`run_once` is `jax.jit` for programs a job calls a handful of times (random draws, parameter
initialisation, the audit's read-outs): compiled with the backend's `run_once_compiler_options`.
On XLA:CPU these skip LLVM's optimisation of the generated code, which took about two thirds of the
compile time of such programs (a 2-core AMD EPYC: SeedCNN's init 1.96 s -> 0.51 s, a `jax.random.normal`
draw ~1 s -> ~0.3 s) while their run time stays milliseconds; programs run many times (train
steps, the audit's model queries) keep XLA's defaults.

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

import functools
from typing import Callable

import jax
import jax.monitoring

from distill_jax import backend

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


def run_once(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with `backend.choices().run_once_compiler_options`.

    The options are read when the function is first called on a backend (never at import, so
    `jax.distributed` can start first); inside another jitted function it is inlined as any jit is.
    Usable as `@run_once` or `@run_once(static_argnums=...)`.
    """
    if fun is None:
        return functools.partial(run_once, **jit_kwargs)
    jitted: dict[backend.Choices, Callable] = {}

    @functools.wraps(fun)
    def call(*args, **kwargs):
        picked = backend.choices()
        if picked not in jitted:
            options = dict(picked.run_once_compiler_options)
            jitted[picked] = jax.jit(fun, compiler_options=options or None, **jit_kwargs)
        return jitted[picked](*args, **kwargs)

    return call
