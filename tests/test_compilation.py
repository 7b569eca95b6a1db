"""CompileCounter counts XLA compilations (not calls served by a jitted function's cache) inside its block only."""
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.compilation import CompileCounter


def test_counts_one_compilation_per_new_shape_and_none_for_a_cached_call():
    f = jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)
    with CompileCounter() as compiles:
        f(np.ones(3, np.float32))
        f(np.full(3, 2.0, np.float32))  # same shape: the jit cache, no compilation
        f(np.ones(5, np.float32))
    assert compiles.count == 2 and compiles.seconds > 0
    with CompileCounter() as eager:
        jnp.ones(4) * 3.0  # eager operations on a new shape compile too: that is what the count is for
    assert eager.count >= 1
    f(np.ones(7, np.float32))  # outside the block: not counted
    assert compiles.count == 2


def test_library_jits_use_the_backends_options_and_skip_unknown_ones():
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from distill_jax import backend, compilation

    cpu = backend.choices("cpu")
    assert cpu.compiler_options == (("xla_cpu_use_fusion_emitters", False),)
    assert cpu.run_once_compiler_options == (("xla_backend_optimization_level", 0),)
    assert compilation._supported("xla_backend_optimization_level", 0)
    assert not compilation._supported("no_such_xla_option", 1)
    a = jnp.linspace(0.0, 1.0, 5)
    f = compilation.run_once(lambda v: jnp.sin(v) * 2.0)
    np.testing.assert_allclose(f(a), np.sin(np.linspace(0.0, 1.0, 5)) * 2.0, rtol=1e-6)
    # an option the installed XLA does not know is left out instead of failing the run
    bogus = dataclasses.replace(cpu, compiler_options=(("no_such_xla_option", 1),) + cpu.compiler_options)
    g = compilation.jit(lambda v: jnp.cos(v), static_argnums=())
    with backend.override(bogus):
        np.testing.assert_allclose(g(a), np.cos(np.linspace(0.0, 1.0, 5)), rtol=1e-6)
    assert g.lower(a).compile() is not None  # attributes of the jitted function pass through
    # inside another jit (where JAX refuses compiler options) it is inlined as a plain jit
    outer = jax.jit(lambda v: f(v) + g(v))
    np.testing.assert_allclose(outer(a), np.sin(np.linspace(0.0, 1.0, 5)) * 2.0 + np.cos(np.linspace(0.0, 1.0, 5)),
                               rtol=1e-6)


def test_shared_builders_give_the_same_object_back_but_not_across_a_backend_override():
    from distill_jax import backend, compilation

    calls = []

    @compilation.shared
    def build(width: int):
        calls.append(width)
        return lambda x: x * width

    assert build(2) is build(2) and build(3) is not build(2)
    with backend.override("gpu"):  # what a builder traces may depend on the backend's choices
        under_gpu = build(2)
        assert under_gpu is build(2)
    assert build(2) is not under_gpu
    assert calls == [2, 3, 2]
    assert build({"unhashable": 1}) is not build({"unhashable": 1})  # built afresh
