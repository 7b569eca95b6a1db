"""distill_jax: distil image classifiers into readable students, explain them with jax.grad, measure faithfulness.

Subpackages, in the order they build on each other (each imports only those before it):

    backend, compilation, parallel, checkpoint   per-backend choices, jit options, device mesh, orbax
    data        loading, batches, augmentation; `data.preprocess` (standardize), `data.pca` (PCA in jnp)
    models      teacher networks, readable students (soft tree, linear), adapters for any JAX model
    attr        attribution methods over any `apply_fn(x) -> logits`
    metrics     fidelity, faithfulness, robustness, complexity, randomisation, axiomatic, similarity
    robust      adversarial attacks
    analysis    linear contributions, class templates, CKA, soft-tree read-outs
    train       train states, the jitted data-parallel train step (and DP-SGD), the fit loop
    distill     distillation methods and `distill()`; `losses`, `tuning`, `prune`, `privacy`
    audit       the audit of trained models (queries, evaluators) and `audit.verdict`
    app         the `distill-jax` job: `app.config`, `app.job`, `app.cli`

Subpackages are imported on first use (`distill_jax.attr` pulls in only what attributions need).
"""
import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("backend", "compilation", "parallel", "checkpoint", "data", "models", "attr", "metrics",
                "robust", "analysis", "train", "distill", "audit", "app")

__all__ = list(_SUBPACKAGES)


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"distill_jax.{name}")
    raise AttributeError(f"module 'distill_jax' has no attribute {name!r}")
