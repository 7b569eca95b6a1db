"""Counting XLA compilations, and compiling cheaply the programs that run only a few times.

`run_once` is `jax.jit` for programs a job calls a handful of times (random draws, parameter
initialisation, the audit's read-outs): compiled with the backend's `run_once_compiler_options`.
On XLA:CPU these skip LLVM's optimisation of the generated code, most of the compile time of such
programs, while their run time stays small; programs run many times (train steps, the audit's model
queries) keep XLA's defaults (benchmarks/RESULTS.md, "Start-up", has the measurements).

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

__all__ = [
    "CompileCounter",
    "jit",
    "run_once",
    "shared",
    "split_keys",
]


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


def jit(fun: Callable | None = None, *, run_once: bool = False, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with the library's XLA options for the current backend.

    `backend.choices().compiler_options`, plus its `run_once_compiler_options` when `run_once`
    (a program a job calls only a few times). The options are read when the function is first
    called on a backend (never at import, so `jax.distributed` can start first); an option the
    installed XLA does not know is left out (checked once per option), so a newer jaxlib cannot
    break a run. Inside another jitted function it is inlined as any jit is. Usable as a decorator,
    with or without arguments; `.lower` and the other attributes of the jitted function pass through.
    """
    if fun is None:
        return functools.partial(jit, run_once=run_once, **jit_kwargs)
    return _LazyJit(fun, run_once, jit_kwargs)


def run_once(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """`jit(fun, run_once=True, **jit_kwargs)`: for random draws, initialisation, the audit's read-outs."""
    return jit(fun, run_once=True, **jit_kwargs)


class _LazyJit:
    """A `jax.jit` of `fun` per backend choices, created on first use."""

    def __init__(self, fun: Callable, run_once: bool, jit_kwargs: dict):
        functools.update_wrapper(self, fun)
        self._fun, self._run_once, self._jit_kwargs = fun, run_once, jit_kwargs
        self._jitted: dict[backend.Choices, Callable] = {}

    def _current(self) -> Callable:
        picked = backend.choices()
        if picked not in self._jitted:
            wanted = picked.compiler_options + (picked.run_once_compiler_options if self._run_once else ())
            options = dict(_supported_options(wanted))
            self._jitted[picked] = jax.jit(self._fun, compiler_options=options or None, **self._jit_kwargs)
        return self._jitted[picked]

    def __call__(self, *args, **kwargs):
        if _tracing(args, kwargs):
            return self._nested(*args, **kwargs)  # JAX takes compiler options at the top level only
        return self._current()(*args, **kwargs)

    @functools.cached_property
    def _nested(self) -> Callable:
        return jax.jit(self._fun, **self._jit_kwargs)

    def __getattr__(self, name: str):
        return getattr(self._current(), name)


def shared(builder: Callable) -> Callable:
    """`builder` memoised on its arguments: equal arguments give the very same object back.

    For functions that build what a jitted program closes over (a loss, an optimizer, a step): JAX
    caches a compiled program per Python function object, so a builder that returned a new closure
    on every call would compile a new program for every model, even an identical one. Arguments hash
    by value where they can (linen modules, dataclasses, tuples, numbers) and by identity otherwise
    (functions); a call with an argument that cannot be hashed (a dict, an array) is built afresh.
    The cache holds at most 256 results (least recently used dropped). Results built inside a
    `backend.override` block are kept apart from those built outside it (what they trace may differ).
    """

    @functools.lru_cache(maxsize=256, typed=True)
    def cached(overrides, *args, **kwargs):
        del overrides  # only part of the key
        return builder(*args, **kwargs)

    @functools.wraps(builder)
    def build(*args, **kwargs):
        key = backend.override_key()
        try:
            hash((key, args, tuple(sorted(kwargs.items()))))
        except TypeError:
            return builder(*args, **kwargs)
        return cached(key, *args, **kwargs)

    build.cache_clear = cached.cache_clear
    return build


@functools.partial(run_once, static_argnums=1)
def split_keys(key: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """`tuple(jax.random.split(key, n))`, the same keys, from one compiled program per `n` (eagerly, the split
    and the indexing compile a program each, per shape)."""
    return tuple(jax.random.split(key, n))


def _tracing(args, kwargs) -> bool:
    """Whether this call happens inside a JAX transformation (a traced argument, or an active trace)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs))):
        return True
    try:
        from jax._src import core  # noqa: PLC0415 - no public way to ask; absent: the argument check above
    except ImportError:
        return False
    clean = getattr(core, "trace_state_clean", None)
    return clean is not None and not clean()


@functools.lru_cache(maxsize=None)
def _supported_options(options: tuple[tuple[str, object], ...]) -> tuple[tuple[str, object], ...]:
    """The options the installed XLA accepts: all of them when one probe compiled with all of them works (one
    program, not one per option), else those `_supported` accepts one by one."""
    if _supported_all(options):
        return options
    return tuple((name, value) for name, value in options if _supported(name, value))


def _supported_all(options: tuple[tuple[str, object], ...]) -> bool:
    if not options:
        return True
    if all((name, value) in _KNOWN for name, value in options):
        return True
    try:
        jax.jit(lambda: jax.numpy.zeros(()), compiler_options=dict(options)).lower().compile()
    except Exception:  # noqa: BLE001 - XLA reports an unknown option as a runtime error of its own type
        return False
    _KNOWN.update(options)
    return True


_KNOWN: set[tuple[str, object]] = set()  # options that compiled in a probe


@functools.lru_cache(maxsize=None)
def _supported(name: str, value) -> bool:
    """Whether the installed XLA accepts compile option `name` (a trivial program compiled with it)."""
    try:
        jax.jit(lambda: jax.numpy.zeros(()), compiler_options={name: value}).lower().compile()
    except Exception:  # noqa: BLE001 - XLA reports an unknown option as a runtime error of its own type
        return False
    return True
