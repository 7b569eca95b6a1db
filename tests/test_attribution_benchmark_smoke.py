"""Smoke tests for benchmarks/attribution.py (tiny sizes, no timing assertions) and for the
`batch_chunk` option of `explain.integrated_gradients` that the benchmark measures."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import attribution  # noqa: E402  (benchmarks/ is a plain folder, not installed)
from distill_jax import attr

TINY = ["--quick", "--batch", "3", "--steps", "4", "--shape", "8x8x1", "--batch-chunk", "2", "--no-memory"]


def test_quick_run_jax_only():
    lines = []
    rows = attribution.main(TINY + ["--frameworks", "jax"], log=lines.append)
    assert [r.variant for r in rows] == ["jax", "jax batch_chunk=2"]
    assert rows[0].rel_diff == 0.0
    assert rows[1].rel_diff < 1e-5  # grouping the examples does not change the result
    for r in rows:
        assert r.seconds > 0 and r.first_call_s > 0 and r.scratch_mb is not None and r.ratios == {}
    text = "\n".join(lines)
    assert "allocator" in text and "| variant | median s |" in text


def test_memory_probe_of_the_jax_variant():
    res = attribution.probe("jax", attribution.parse_args(TINY))
    assert res["variant"] == "jax" and res["peak_mb"] >= 0 and res["first_call_peak_mb"] >= 0


def test_params_cover_seedcnn_and_bad_variant_name():
    params = attribution.init_params((8, 8, 1))
    assert sorted(params) == ["conv1", "conv2", "conv3", "conv4", "dense1", "head"]
    assert params["conv2"]["kernel"].shape == (3, 3, 64, 64) and params["dense1"]["kernel"].shape == (128, 512)
    x, t = attribution.make_inputs((8, 8, 1), 2)
    with pytest.raises(ValueError, match="unknown variant"):
        attribution.build("jax fast", params, x, t, attribution.parse_args(TINY))


def test_torch_copy_gives_the_same_logits_and_captum_agrees():
    pytest.importorskip("torch")
    pytest.importorskip("captum")
    # odd size: ceil_mode pooling must match SAME pooling, and the flatten permutation is non-trivial (2x2x128)
    rows = attribution.main(["--quick", "--batch", "2", "--steps", "4", "--shape", "7x5x3", "--batch-chunk",
                             "--ibs", "2", "--no-memory"], log=lambda *_: None)
    assert [r.variant for r in rows] == ["jax", "captum default", "captum ibs=2"]
    for r in rows:
        assert r.rel_diff < 1e-4  # same weights, same Gauss-Legendre rule
        assert r.ratios["captum best"] > 0


def _tanh_net(key, d=8, hidden=6, classes=3):
    """f(x) = tanh(x W1 + b) W2 per example: non-linear, examples independent, cheap to compile."""
    k1, k2, k3 = jax.random.split(key, 3)
    w1, b, w2 = jax.random.normal(k1, (d, hidden)), jax.random.normal(k2, (hidden,)), jax.random.normal(k3, (hidden, classes))
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b) @ w2


@pytest.mark.parametrize("jit", [False, True])
def test_batch_chunk_matches_whole_batch(jit):
    f = _tanh_net(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 2, 2, 2))  # 5 examples: groups of 2 need one padding example
    t = jnp.array([0, 2, 1, 1, 0])

    def ig(x, t, g):
        return attr.integrated_gradients(f, x, t, steps=6, method="gauss_legendre", batch_chunk=g, return_error=True)

    run = jax.jit(ig, static_argnums=2) if jit else ig
    ref, ref_err = run(x, t, None)
    for g in (1, 2, 5, 9) if jit else (2,):  # eagerly, every call compiles its scan again: one is enough
        amap, err = run(x, t, g)
        assert amap.shape == x.shape and err.shape == (5,)
        np.testing.assert_allclose(amap, ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))
        np.testing.assert_allclose(err, ref_err, rtol=1e-4, atol=1e-6)
    # and the grouped result is still IG: completeness holds to the quadrature error
    assert float(jnp.max(ref_err)) < 1e-2


def test_batch_chunk_with_several_targets_per_example():
    w = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    f = lambda x: jnp.einsum("khwc,bhwc->bk", w, x)  # noqa: E731  IG = w_target * x exactly
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    tk = jnp.array([[0, 2], [1, 1], [2, 0]])
    amap = attr.integrated_gradients(f, x, tk, steps=4, batch_chunk=2)
    np.testing.assert_allclose(amap, w[tk] * x[:, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4"])
def test_batch_chunk_must_be_a_positive_int(bad):
    f = lambda x: x.reshape(x.shape[0], -1)[:, :3]  # noqa: E731
    with pytest.raises(ValueError, match="batch_chunk"):
        attr.integrated_gradients(f, jnp.ones((2, 4)), jnp.array([0, 1]), steps=4, batch_chunk=bad)
