"""Model-parameter randomisation for sanity checks: paths into nested parameter dicts, and randomising one layer.

Shared by `metrics.randomization_check` (cascading MPRT) and `explanation_quality.smooth_mprt` /
`efficient_mprt`. A layer is named by its path in the parameter tree ("conv4" or "params/conv4");
the order of layers always comes from the caller (the model's own layer order), never from dict
order: after jit, `device_get` or orbax, dicts are sorted, so "dense10" would precede "dense2".
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from distill_jax import compilation
from distill_jax._checks import check_choice, check_int, check_number
from distill_jax.attr._core import check_x, validate_target
from distill_jax.metrics._complexity import complexity, discrete_entropy
from distill_jax.metrics._robustness import (
    _check_batch_target,
    _check_maps,
    _sum_samples,
)
from distill_jax.metrics._similarity import SIMILARITIES, spearman


@compilation.run_once  # one program per leaf shape (eagerly: a std, a normal, a where and a product, each compiled)
def default_randomize(key: jax.Array, leaf: jax.Array) -> jax.Array:
    """N(0, s^2) with s the leaf's own standard deviation (0.01 for constant leaves such as zero biases)."""
    std = jnp.std(leaf)
    scale = jnp.where(std > 0, std, 0.01)
    return (jax.random.normal(key, leaf.shape, jnp.result_type(leaf)) * scale).astype(leaf.dtype)


def get_path(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            names = list(node) if isinstance(node, Mapping) else []
            raise ValueError(f"layer_order entry {path!r}: no {part!r} in the params; available names: {names}")
        node = node[part]
    return node


def set_path(tree: Mapping, path: str, value: Any) -> dict:
    head, _, rest = path.partition("/")
    return {**tree, head: set_path(tree[head], rest, value) if rest else value}


def check_layer_order(params: Any, layer_order: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layer_order, str) or len(layer_order) == 0:
        raise ValueError(f"layer_order must be a non-empty sequence of parameter names; got {layer_order!r}")
    if len(set(layer_order)) != len(layer_order):
        raise ValueError(f"layer_order must not repeat a name; got {list(layer_order)}")
    for name in layer_order:
        get_path(params, name)
    return tuple(layer_order)


def as_dicts(tree: Any) -> Any:
    """Nested Mappings (e.g. flax FrozenDict) as plain dicts, so randomised copies share the tree structure."""
    return {k: as_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def randomize_layer(params: dict, key: jax.Array, *, name: str, randomize: Callable) -> dict:
    """params with every leaf of the subtree `name` replaced by randomize(key_i, leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(get_path(params, name))
    keys = jax.random.split(key, max(len(leaves), 1))
    new_leaves = []
    for k, leaf in zip(keys, leaves):
        new_leaf = randomize(k, leaf)
        if jnp.shape(new_leaf) != jnp.shape(leaf) or jnp.result_type(new_leaf) != jnp.result_type(leaf):
            raise ValueError(f"randomize must return a leaf of the same shape and dtype; for {name!r} it turned "
                             f"{jnp.shape(leaf)} {jnp.result_type(leaf)} into {jnp.shape(new_leaf)} "
                             f"{jnp.result_type(new_leaf)}")
        new_leaves.append(jnp.asarray(new_leaf, jnp.result_type(leaf)))
    return set_path(params, name, jax.tree_util.tree_unflatten(treedef, new_leaves))


# --------------------------------------------------------------------------------------------
# Random logit
# --------------------------------------------------------------------------------------------
def _off_target(key: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
    """A class drawn uniformly from the num_classes - 1 classes other than target_b, per example."""
    r = jax.random.randint(key, target.shape, 0, num_classes - 1, dtype=target.dtype)
    return r + (r >= target).astype(target.dtype)


def random_logit(
    attr_fn: Callable,
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    num_classes: int,
    similarity: str = "ssim",
) -> jax.Array:
    """Random-logit test: similarity of the explanation of the target and of a random other class.

    RL_b = sim(A(x_b, y_b), A(x_b, c_b)),  c_b ~ Uniform({0..num_classes-1} minus {y_b}).
    As Quantus `RandomLogit` (similarity_func=ssim over the flattened maps by default; abs=False).
    Quantus normalises both batches of maps by their batch max by default (normalise=True), which
    changes SSIM; run it with normalise=False to compare. Quantus' spearman/pearson give NaN for a
    constant map where `distill_jax.stats` gives 0.

    Args:
      attr_fn: attr_fn(x, target) -> maps [batch, ...] (must accept any class as target).
      x: [batch, ...]. target: [batch] ints in [0, num_classes).
      key: PRNG key for the other classes. num_classes: >= 2.
      similarity: a key of `SIMILARITIES` ("ssim", "spearman", "pearson").
    Returns:
      [batch] (lower = the explanation depends more on the class explained).
    Reference: Sixt, Granz & Landgraf 2020, "When Explanations Lie: Why Many Modified BP
    Attributions Fail" (ICML).
    """
    x = check_x(x)
    num_classes = check_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (a class other than the target is needed); got {num_classes}")
    target = validate_target(target, x.shape[0], num_classes)
    if target.ndim != 1:
        raise ValueError(f"target must be [batch] here; got shape {target.shape}")
    sim_fn = check_choice(similarity, SIMILARITIES, "similarity")
    _check_maps(jax.eval_shape(attr_fn, x, target), x.shape[0], "attr_fn(x, target)")
    return sim_fn(attr_fn(x, target), attr_fn(x, _off_target(key, target, num_classes)))


# --------------------------------------------------------------------------------------------
# Model-parameter randomisation: smooth MPRT and efficient MPRT
# --------------------------------------------------------------------------------------------
def _layer_keys(key: jax.Array, layer_order: Sequence[str]) -> jax.Array:
    """One key per layer, as `metrics.randomization_check` draws them."""
    return jax.random.split(key, len(layer_order))


def _fully_randomized(params: dict, layer_order: Sequence[str], key: jax.Array, randomize: Callable) -> dict:
    for name, k in zip(layer_order, _layer_keys(key, layer_order)):
        params = randomize_layer(params, k, name=name, randomize=randomize)
    return params


def _mprt_setup(attr_fn, params, layer_order, x, target):
    x = check_x(x)
    params = as_dicts(params)
    target = _check_batch_target(target, x.shape[0])
    layer_order = check_layer_order(params, layer_order)
    _check_maps(jax.eval_shape(attr_fn, params, x, target), x.shape[0], "attr_fn(params, x, target)")
    return params, x, target, layer_order


def smooth_mprt(
    attr_fn: Callable,
    params: Any,
    layer_order: Sequence[str],
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    samples: int = 50,
    noise: float = 0.1,
    similarity: str = "spearman",
    absolute: bool = True,
    randomize: Callable[[jax.Array, jax.Array], jax.Array] = default_randomize,
    chunk: int | None = None,
) -> jax.Array:
    """Smooth model-parameter randomisation test (sMPRT): MPRT on noise-averaged explanations.

    Denoised map:  Ā_theta(x_b) = (1/S) sum_{s=1..S} A_theta(x_b + e_s),  e_s ~ N(0, sigma_b^2),
    sigma_b = noise * (max x_b - min x_b), and e_S = 0 (the last sample is the clean input, as Quantus).
    theta_i = the trained params with layer_order[0..i] randomised (cascading, in the given order):
    sMPRT_{b,i} = sim(|Ā_theta(x_b)|, |Ā_theta_i(x_b)|)  (without |.| when absolute=False).
    The same noise draws serve every model (common random numbers), so a layer that does not change
    the attribution keeps similarity 1 at any noise level. The models run one after another in one
    `lax.scan` (the attribution is traced once; one copy of the params is alive), and each model's
    samples run `chunk` at a time.

    `layer_order` is the randomisation order, as in `metrics.randomization_check`: list the output
    layer first for the top-down cascade of Adebayo et al., or the input layer first for Quantus'
    default (layer_order="bottom_up"), which Hedström et al. recommend. Name the model's parameter
    subtrees explicitly ("/" for nested names): do not derive the order from the params dict,
    whose keys jit and checkpointing sort alphabetically ("dense10" before "dense2").

    Differences from Quantus `SmoothMPRT`: layers are randomised by `randomize` (default: normal with
    the leaf's std) where Quantus calls torch's reset_parameters; maps are not normalised (the
    correlations are scale-invariant; Quantus' batch-wide second-moment normalisation would only
    change SSIM); Quantus also reports the similarity of two independently smoothed maps of the
    trained model ("original"), which is 1 here by construction and therefore not returned.

    Args:
      attr_fn: attr_fn(params, x, target) -> maps [batch, ...] (params are an argument, not closed over).
      params: (nested) dict of parameters. layer_order: subtree names in randomisation order.
      x: [batch, ...]. target: [batch] ints, passed to attr_fn as is.
      key: PRNG key (split into the new weights' key and the input noise key).
      samples: S >= 1 (Quantus' default 50; S = 1 is plain MPRT). noise: >= 0, fraction of each
        example's value range (Quantus' default 0.1).
      similarity: a key of `SIMILARITIES` (default "spearman", as Quantus).
      absolute: compare |maps| (Quantus' default abs=True). randomize: (key, leaf) -> new leaf.
      chunk: noise samples per `lax.scan` step (None: the backend default).
    Returns:
      [batch, len(layer_order)] similarities (lower = the explanation depends more on the weights).
    Reference: Hedström et al. 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
    Parameter Randomisation Test" (XAI in Action workshop, NeurIPS); Adebayo et al. 2018,
    "Sanity Checks for Saliency Maps".
    """
    params, x, target, layer_order = _mprt_setup(attr_fn, params, layer_order, x, target)
    samples = check_int(samples, "samples")
    check_number(noise, "noise", low=0)
    sim_fn = check_choice(similarity, SIMILARITIES, "similarity")
    layer_key, noise_key = jax.random.split(key)
    flat = x.reshape(x.shape[0], -1)
    sigma = (noise * (flat.max(axis=1) - flat.min(axis=1))).reshape((-1,) + (1,) * (x.ndim - 1))
    noisy = jnp.arange(samples) < samples - 1
    noise_keys = jax.random.split(noise_key, samples)

    def smoothed(p):
        def one(inp):
            k, use_noise = inp
            eps = jnp.where(use_noise, jax.random.normal(k, x.shape, x.dtype) * sigma, 0.0)
            return attr_fn(p, x + eps, target)

        mean = _sum_samples(one, (noise_keys, noisy), chunk) / samples
        return jnp.abs(mean) if absolute else mean

    # One scan over the models: step 0 keeps the trained params (its map becomes the reference),
    # step i randomises layer_order[i - 1] on top of the previous step's params. The attribution is
    # traced once and only one copy of the params is alive.
    branches = [lambda p, k: p] + [partial(randomize_layer, name=n, randomize=randomize) for n in layer_order]
    layer_keys = _layer_keys(layer_key, layer_order)
    steps = (jnp.arange(len(branches)), jnp.concatenate([layer_keys[:1], layer_keys]))
    out = jax.eval_shape(attr_fn, params, x, target)

    def step(carry, inp):
        p, reference = carry
        i, k = inp
        p = jax.lax.switch(i, branches, p, k)
        current = smoothed(p)
        reference = jnp.where(i == 0, current, reference)
        return (p, reference), sim_fn(reference, current)

    init = (params, jnp.zeros(out.shape, out.dtype))
    _, similarities = jax.lax.scan(step, init, steps)  # [1 + layers, batch]; row 0 compares the reference to itself
    return similarities[1:].T


def _complexity_entropy(a: jax.Array, n_bins: int) -> jax.Array:
    return complexity(a)


# Complexity of a map [batch, ...] -> [batch] for eMPRT, called as fn(maps, n_bins).
COMPLEXITY_MEASURES: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "discrete_entropy": lambda a, n_bins: discrete_entropy(a, n_bins=n_bins),
    "entropy": _complexity_entropy,
}


def efficient_mprt(
    attr_fn: Callable,
    params: Any,
    layer_order: Sequence[str],
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    measure: str = "discrete_entropy",
    n_bins: int = 100,
    absolute: bool = False,
    randomize: Callable[[jax.Array, jax.Array], jax.Array] = default_randomize,
) -> jax.Array:
    """Efficient model-parameter randomisation test (eMPRT): relative rise in explanation complexity.

    eMPRT_b = (H(A_rand(x_b)) - H(A_theta(x_b))) / H(A_theta(x_b))
    with A_rand the explanation of the model whose layer_order layers are all randomised and H the
    histogram entropy `discrete_entropy` with n_bins bins (measure="discrete_entropy") or the
    `complexity` entropy of |A| (measure="entropy"). As Quantus `EfficientMPRT` (its
    complexity_func=discrete_entropy, n_bins=100 when no binning rule is given, skip_layers=True,
    abs=False, normalise=False; its score list is (b - a) / a of the last and the original
    complexities). A map of zero complexity gives inf or NaN, as in Quantus.

    Layers are randomised by `randomize` (Quantus: torch's reset_parameters), in layer_order with
    the keys of `metrics.randomization_check` for the same key; the final model does not depend on
    the order.

    Args:
      attr_fn: attr_fn(params, x, target) -> maps [batch, ...].
      params: (nested) dict of parameters. layer_order: the subtree names to randomise ("/" nests).
      x: [batch, ...]. target: [batch] ints. key: PRNG key for the new weights.
      measure: a key of `COMPLEXITY_MEASURES`. n_bins: >= 1 (discrete_entropy only).
      absolute: score |maps|. randomize: (key, leaf) -> new leaf.
    Returns:
      [batch] (higher = the explanation of a random model is more complex: the method passes).
    Reference: Hedström et al. 2023, "Sanity Checks Revisited: An Exploration to Repair the Model
    Parameter Randomisation Test" (XAI in Action workshop, NeurIPS).
    """
    params, x, target, layer_order = _mprt_setup(attr_fn, params, layer_order, x, target)
    measure_fn = check_choice(measure, COMPLEXITY_MEASURES, "measure")
    n_bins = check_int(n_bins, "n_bins")
    models = [params, _fully_randomized(params, layer_order, key, randomize)]

    def score(i):
        a = attr_fn(jax.lax.switch(i, [lambda m=m: m for m in models]), x, target)
        return measure_fn(jnp.abs(a) if absolute else a, n_bins)

    original, randomized = jax.lax.map(score, jnp.arange(2))  # one trace of attr_fn for both models
    return (randomized - original) / original


# --------------------------------------------------------------------------------------------
# Model-parameter randomisation (sanity check)
# --------------------------------------------------------------------------------------------
def randomization_check(
    attr_fn: Callable,
    params: Any,
    layer_order: Sequence[str],
    x: jax.Array,
    target: jax.Array,
    *,
    key: jax.Array,
    randomize: Callable[[jax.Array, jax.Array], jax.Array] = default_randomize,
    jit: bool = True,
) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation: rank correlation of maps as layers are randomised top-down.

    After randomising layer_order[0..i] (cumulatively), rho_i = mean_b spearman(|M_rand(x_b)|, |M_trained(x_b)|).
    A map that depends on the learned weights should lose correlation as more layers are randomised.

    Args:
      attr_fn: attr_fn(params, x, target) -> maps [batch, ...]; it is jitted once (params are an argument)
        unless `jit=False` (an attr_fn that runs compiled programs of its own, as the audit's).
      params: a (nested) dict of parameters. layer_order: names of subtrees, top (output) layer first;
        nested names use "/" (e.g. "params/conv4").
      x, target: inputs and their targets. key: PRNG key for the new weights.
      randomize: (key, leaf) -> new leaf (default: normal with the leaf's standard deviation).
    Returns:
      [(layer, mean Spearman rho as a float)] in layer_order.
    Reference: Adebayo et al. 2018, "Sanity Checks for Saliency Maps".
    """
    layer_order = check_layer_order(params, layer_order)
    fn = jax.jit(attr_fn) if jit else attr_fn
    current = as_dicts(params)
    trained = fn(current, x, target)
    randomized = _randomized_layers(current, key, layer_order, randomize)
    results = []
    for name in layer_order:
        current = set_path(current, name, randomized[name])
        results.append((name, float(_mean_abs_spearman(fn(current, x, target), trained))))
    return results


@compilation.run_once(static_argnums=(2, 3))
def _randomized_layers(params, key, layer_order: tuple[str, ...], randomize: Callable) -> dict:
    """name -> the new weights of that layer: `randomize_layer` with the i-th key of `split(key, len(layer_order))`
    on the trained weights, which the cascade has not changed when it reaches layer i. One program for every
    layer (op by op, one per leaf shape and key operation)."""
    keys = jax.random.split(key, len(layer_order))
    return {name: get_path(randomize_layer(params, k, name=name, randomize=randomize), name)
            for name, k in zip(layer_order, keys)}


@compilation.run_once
def _mean_abs_spearman(maps, trained_maps):
    return jnp.mean(spearman(jnp.abs(maps), jnp.abs(trained_maps)))
