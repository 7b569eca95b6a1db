"""distill_jax: distil image classifiers into readable students, explain them with jax.grad, measure faithfulness.

Modules (import the ones you need; `report` pulls in matplotlib):
    data, preprocess, pca         inputs: loading, standardization, PCA in jnp
    models, losses, distill       teacher and students, per-example losses, distillation methods
                                  (distill.distill: any JAX teacher function into any student, one call)
    train, parallel, checkpoint   jitted data-parallel training, device mesh, orbax checkpoints
    prune                         gradual magnitude pruning as an optax transformation
    explain, analysis, metrics    attributions, inner-product analysis, faithfulness and fidelity
                                  (explain re-exports gradient_attributions and perturbation_attributions;
                                  metrics re-exports faithfulness and explanation_quality)
    backend                       kernel and chunk choices per backend (cpu / gpu / tpu), one place
    audit, pipeline, report       the end-to-end job behind `distill-jax run`
"""
from distill_jax import (  # noqa: F401
    analysis,
    backend,
    checkpoint,
    data,
    distill,
    explain,
    losses,
    metrics,
    models,
    parallel,
    pca,
    preprocess,
    prune,
    train,
)

__version__ = "0.1.0"
