"""PCA speed: distill_jax.pca.fit (each method) against scikit-learn's PCA (full, randomized, covariance_eigh).

Run from the repository root:
    python benchmarks/pca.py [--n 10000] [--d 784] [--k 50] [--repeats 9]
Prints the machine, versions and allocator, then a markdown table: the median seconds of each variant
(repetitions interleaved round-robin in one process, after a warm-up that also compiles the jitted fits) and
its ratio to scikit-learn's fastest method (< 1 means faster). Every fit is checked against scikit-learn's full
SVD before timing. Data: float32 [n, d] with a decaying spectrum (a low-rank signal plus noise and an offset),
like flattened images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA as SkPCA  # noqa: E402

from benchmarks import common  # noqa: E402
from distill_jax.data import pca


def make_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    """[n, d] float32: 100 directions with std 10..1, isotropic noise of std 0.1, offset 0.5."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 100)) * np.linspace(10, 1, 100) @ rng.normal(size=(100, d)) / np.sqrt(d)
    return (signal + 0.1 * rng.normal(size=(n, d)) + 0.5).astype(np.float32)


def cases(x: np.ndarray, k: int) -> dict:
    """name -> a blocking call that fits a PCA and returns (components, explained_variance)."""
    xj = jnp.asarray(x)
    key = jax.random.PRNGKey(0)

    def ours(method):
        def run():
            p = jax.block_until_ready(pca.fit(xj, k, method=method, key=key))
            return np.asarray(p.components), np.asarray(p.explained_variance)
        return run

    def sklearn(solver):
        def run():
            s = SkPCA(k, svd_solver=solver, random_state=0).fit(x)
            return s.components_, s.explained_variance_
        return run

    out = {f"distill_jax {m}": ours(m) for m in ("covariance", "randomized", "full")}
    out.update({f"sklearn {s}": sklearn(s) for s in ("covariance_eigh", "randomized", "full")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    x = make_data(a.n, a.d)
    fns = cases(x, a.k)
    ref = SkPCA(a.k, svd_solver="full").fit(x.astype(np.float64))
    for name, f in fns.items():  # warm-up (compiles) and a correctness check on the leading components
        comps, ev = f()
        err = float(np.max(np.abs(comps[:10] - ref.components_[:10])))
        rel = float(np.max(np.abs(ev[:10] / ref.explained_variance_[:10] - 1)))
        assert err < 1e-3 and rel < 1e-3, f"{name}: components off by {err:.2g}, variances by {rel:.2g}"
    med = common.interleave(fns, a.repeats)
    best = min(v for name, v in med.items() if name.startswith("sklearn"))
    print(f"PCA fit of {a.n}x{a.d} float32 keeping {a.k}; median of {a.repeats} interleaved repetitions")
    print(f"device: {common.device_description()}; allocator: {common.detect_allocator()}")
    print(f"versions: {common.versions('jax', 'jaxlib', 'sklearn', 'numpy', 'scipy')}")
    rows = [[name, f"{v:.3f}", f"{v / best:.2f}"] for name, v in med.items()]
    print(common.markdown_table(["variant", "median s", "x sklearn fastest"], rows))


if __name__ == "__main__":
    main()
