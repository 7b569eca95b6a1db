"""Attribution metrics: `distill_jax.metrics` against Quantus 0.6 and Captum, same SmallCNN in Flax and PyTorch.

    python benchmarks/metrics.py                       # 16 digits (8x8x1), saliency maps, 5 repeats
    python benchmarks/metrics.py --quick               # seconds: 4 images, few samples, 1 repeat, no training
    python benchmarks/metrics.py --frameworks jax      # our side only (what runs without torch/quantus/captum)
    python benchmarks/metrics.py --metrics sparseness complexity --repeats 9

What it does, in one process:
1. Data and model: sklearn's digits (8x8, one channel, values / 16 in [0, 1], plus U(0, --jitter)
   noise, see below); `models.SmallCNN` (convs 16, 32, dense 64, 10 classes) trained --train-steps
   Adam steps on the other digits, then copied into the same network in PyTorch (kernels
   [3, 3, in, out] -> [out, in, 3, 3], the first dense layer's rows permuted from Flax's (h, w, c)
   flatten order to PyTorch's (c, h, w), `MaxPool2d(2, ceil_mode=True)` = SAME pooling). Stops
   unless both give the same logits (1e-4). Targets are the model's predicted classes; the
   attribution is the saliency map |d logit / dx| computed in JAX (`explain.saliency`;
   --attribution grad_x_input for x * gradient), compared with Captum's (first row) and handed to
   Quantus/Captum as numpy `a_batch` (NCHW). The metrics that explain perturbed inputs themselves
   (robustness, random logit) use the same method on each side: `explain.saliency` here, Captum's
   `Saliency` there (`quantus.explain(method="Saliency")` inside Quantus).
2. Each metric runs on our side (jitted with the parameters as an argument, warmed) and on the
   reference side as a user calls it (Quantus metric objects with `disable_warnings=True`, default
   batching; Captum functions with their defaults). Options are set so that the definitions match
   (see each metric's docstring in distill_jax/faithfulness.py and explanation_quality.py): black
   baselines, no batch normalisation where it changes the value, percentages as fractions here and
   percent in Quantus, `curve[:, 1:]` of `region_perturbation` against Quantus' curve, and so on.
   Quantus' RegionPerturbation and MonotonicityCorrelation read softmax probabilities by default
   (`softmax=True` in their __call__); our side is given the network followed by a softmax as
   `apply_fn` for those two, so both read the probability of the target class.
3. Agreement. Deterministic metrics are compared value by value. For randomised metrics whose
   reference accepts a perturbation function (MonotonicityCorrelation with a uniform baseline,
   ROAD's imputation noise, AvgSensitivity, LocalLipschitzEstimate, Captum's infidelity and
   sensitivity_max) the reference is handed *our* draws (generated from the same key in the
   documented order, looked up by a small callable): the values must then agree exactly too.
   FaithfulnessCorrelation (subsets drawn with np.random inside the loop) and RandomLogit (classes
   drawn with np.random.seed(42)) cannot share draws: their means over the images are compared
   within 4 sqrt(2) sd, sd = spread of our batch mean over --mc-keys further keys (the difference of
   two independent estimates). RandomLogit is also compared exactly on Quantus' own classes.
4. Times all cases interleaved round-robin (`common.interleave`, medians of --repeats) and reports
   theirs / ours. Reference calls that receive our draws do a table look-up instead of drawing
   numbers: that is no slower than their own sampling.

Jitter: the digits' background is exactly 0, so a 2x2 max-pool window over background holds equal
(positive, after the bias and ReLU) values. `models.max_pool_slices` (impl "patches" and
"lax_conv") splits the gradient between equal maxima, PyTorch's MaxPool2d (and impl="lax",
reduce_window) gives it to one of them: both are valid subgradients, but the saliency maps then
differ (up to a third of the largest value here), and so do the metrics computed from maps of
unperturbed images (max/avg sensitivity, Lipschitz, random logit). U(0, 0.01) noise removes the
ties, so that the rows compare the metrics and not the pooling rule; `--jitter 0` shows the
difference in the first row (`--impl lax` removes it, at the cost of reduce_window's slow backward).

Float32 ties: MonotonicityCorrelation ranks 64 output changes. Two of them within float32
resolution of each other (e.g. two probabilities that round to the same float32, or an image whose
target probability is 1 - O(1e-7)) can tie on one side and not on the other; one adjacent swap of
ranks moves a Spearman correlation over n features by at most 12 / (n (n + 1)) = 2.9e-3 (a tie by
half). Those rows say how many images agree exactly and whether the rest are within one swap.

Threads: PyTorch runs single-threaded by default here (--torch-threads 1). The reference side makes
thousands of forward passes of 16 tiny images; with torch's default of one OpenMP thread per core,
each of them waited at OpenMP barriers whenever another process held a core: on the shared 2-core
machine Quantus' MonotonicityCorrelation took 3.3-4.6 s with 2 threads and 0.05-0.1 s with 1.
`--torch-threads 0` keeps torch's own choice. JAX keeps its default (XLA's CPU thread pool).

Not compared (the definitions differ; see the docstrings): Quantus' Infidelity (patch baselines,
not Gaussian noise), SensitivityN (one ordering, correlation across the batch), Monotonicity
(Arya et al.'s monotonic-increase test; ours is Nguyen & Martinez's correlation, which is Quantus'
MonotonicityCorrelation), and the parameter-randomisation tests (Quantus re-initialises torch
layers with their own initialisers: different random networks).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from distill_jax import attr
from distill_jax import metrics
from distill_jax import models
from distill_jax.models import _layers

NUM_CLASSES = 10
SHAPE = (8, 8, 1)  # sklearn digits
ATTRIBUTIONS = {  # ours (JAX) -> the same method in Captum / quantus.explain
    "saliency": (functools.partial(attr.saliency, absolute=True), "Saliency"),
    "grad_x_input": (attr.grad_x_input, "InputXGradient"),
}


# --------------------------------------------------------------------------- data and model


def load_digits(batch: int, seed: int = 0, jitter: float = 0.0) -> tuple[np.ndarray, ...]:
    """sklearn digits as NHWC float32, values / 16 + U(0, jitter): (train x, train y, eval x [batch], eval y)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    rng = np.random.default_rng(seed)
    x = (d.images / 16.0 + rng.uniform(0.0, jitter, d.images.shape)).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = rng.permutation(len(x))
    ev, tr = perm[:batch], perm[batch:]
    return x[tr], y[tr], x[ev], y[ev]


def init_params(net, shape, seed: int = 0) -> dict:
    """Kernels N(0, 2/fan_in), biases N(0, 0.1^2), drawn with numpy (as benchmarks/attribution.py does).

    Shapes come from jax.eval_shape: compiling Flax's own initialisers took 5 s on the loaded 2-core CPU.
    """
    rng = np.random.default_rng(seed + 1)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32))["params"]

    def fill(leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape, dtype=np.float32))
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) * np.sqrt(2.0 / fan_in))

    return jax.tree_util.tree_map(fill, shapes)


def train_params(net, x: np.ndarray, y: np.ndarray, steps: int, seed: int = 0) -> dict:
    """`init_params`, then `steps` Adam steps (lr 1e-2, batches of 128) of cross entropy."""
    params = init_params(net, x.shape[1:], seed)
    if steps == 0:
        return params
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, state, xb, yb):
        def loss(q):
            return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": q}, xb), yb).mean()

        grads = jax.grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = opt.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        params, state = step(params, state, x[idx], y[idx])
    return params


def reference_available() -> bool:
    try:
        import captum  # noqa: F401
        import quantus  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- shared set-up


@dataclasses.dataclass
class Setup:
    args: argparse.Namespace
    net: object  # models.SmallCNN
    params: dict
    x: jax.Array  # [B, H, W, C]
    target: jax.Array  # [B] int32: the model's predicted classes
    attribution: jax.Array  # like x
    attr_method: Callable  # (apply_fn, x, target) -> like x
    torch_net: object = None
    key: jax.Array | None = None

    def apply(self, p):
        return functools.partial(self.net.apply, {"params": p})

    def apply_softmax(self, p):
        """The network followed by a softmax: a metric reading "logits[target]" then reads probabilities,
        which is what Quantus' metrics with `softmax=True` as their default read."""
        return lambda xx: jax.nn.softmax(self.net.apply({"params": p}, xx), axis=-1)

    def attr_fn(self, p):
        return lambda xx, tt: self.attr_method(self.apply(p), xx, tt)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def nchw(self, v) -> np.ndarray:
        return np.array(np.asarray(v).transpose(0, 3, 1, 2), order="C")  # a writable copy

    def quantus_kwargs(self, **kw) -> dict:
        """The arguments every Quantus call gets (NCHW numpy; a fresh copy of a_batch)."""
        base = dict(model=self.torch_net, x_batch=self.nchw(self.x), y_batch=np.asarray(self.target),
                    a_batch=self.nchw(self.attribution), device="cpu")
        return {**base, **kw}

    def quantus_explain(self) -> dict:
        import quantus

        method = ATTRIBUTIONS[self.args.attribution][1]
        return dict(explain_func=quantus.explain, explain_func_kwargs={"method": method})

    def torch_tensors(self):
        import torch

        return (torch.from_numpy(self.nchw(self.x)), torch.from_numpy(self.nchw(self.attribution)),
                torch.from_numpy(np.asarray(self.target).astype(np.int64)))


def metric_key(setup: Setup, builder: str) -> jax.Array:
    """The key of the metric built by BUILDERS[builder] (its draws on both sides come from it)."""
    return jax.random.fold_in(setup.key, list(BUILDERS).index(builder))


def jit_ours(setup: Setup, fn: Callable) -> Callable[[jax.Array], object]:
    """fn(params, x, attribution, target, key) jitted (params are an argument, not constants); key -> numpy."""
    compiled = jax.jit(fn)

    def run(key):
        out = compiled(setup.params, setup.x, setup.attribution, setup.target, key)
        return jax.tree_util.tree_map(np.asarray, jax.block_until_ready(out))

    return run


def quiet(fn: Callable) -> Callable:
    """fn with Python warnings silenced (Quantus warns per perturbed example; the check itself still runs)."""

    def run(*a, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*a, **kw)

    return run


def per_sample_draws(key: jax.Array, samples: int, draw: Callable[[jax.Array], jax.Array]) -> np.ndarray:
    """[draw(k) for k in jax.random.split(key, samples)] as numpy (the order our metrics use)."""
    return np.asarray(jax.vmap(draw)(jax.random.split(key, samples)))


class SequentialNoise:
    """A Quantus batch perturb_func returning arr + noise[s] on its s-th call (noise [S, B, features])."""

    def __init__(self, noise: np.ndarray):
        self.noise, self.calls = noise, 0

    def __call__(self, arr, indices, **_):
        s, self.calls = self.calls, self.calls + 1
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = (arr + self.noise[s])[rows, indices]
        return out


# --------------------------------------------------------------------------- metrics


@dataclasses.dataclass
class Metric:
    name: str
    reference: str  # what it is compared with
    ours: Callable[[jax.Array], object]  # key -> our output (numpy); blocks
    theirs: Callable[[], object] | None  # -> the reference output; None without torch/quantus/captum
    mode: str  # "exact" (deterministic or shared draws) or "mc" (independent draws)
    shared: bool = False  # exact through shared draws (not a deterministic metric)
    to_ref: Callable[[object], np.ndarray] = np.asarray  # our output in the reference's layout
    rtol: float = 1e-4  # exact: |ours - ref| <= rtol * max(1, max |ref|)
    time_theirs: bool = True  # False: the reference call is timed in another row
    unit: str = "images"  # what the first axis of to_ref(ours) indexes
    ranked: int | None = None  # Spearman over this many features: allow one adjacent rank swap (see compare)


def reference_call(s: Setup, make: Callable[[], Callable[[], object]]) -> Callable[[], object] | None:
    """make() (imports and precomputes, returns the timed call), warnings silenced; None without the libraries."""
    return None if s.torch_net is None else quiet(make())


def build_attribution(s: Setup) -> Metric:
    """The attribution itself: ours (JAX) against the same method in Captum, on the same network."""
    ours = jit_ours(s, lambda p, x, att, t, k: s.attr_method(s.apply(p), x, t))

    def make():
        import captum.attr

        explainer = getattr(captum.attr, ATTRIBUTIONS[s.args.attribution][1])(s.torch_net)
        x_t, _, t_t = s.torch_tensors()
        return lambda: explainer.attribute(x_t, target=t_t).detach().numpy()

    return Metric(f"{s.args.attribution} map", f"captum.attr.{ATTRIBUTIONS[s.args.attribution][1]}", ours,
                  reference_call(s, make), "exact", to_ref=s.nchw)


def build_faithfulness_correlation(s: Setup) -> Metric:
    a = s.args
    opts = dict(subset_size=a.subset_size, samples=a.faith_runs, baseline="black")
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.faithfulness_correlation(s.apply(p), x, att, t, key=k, **opts))

    def make():
        import quantus

        def theirs():
            m = quantus.FaithfulnessCorrelation(nr_runs=a.faith_runs, subset_size=a.subset_size,
                                                perturb_baseline="black", return_aggregate=False, disable_warnings=True)
            return m(**s.quantus_kwargs())

        return theirs

    return Metric("faithfulness_correlation", "quantus.FaithfulnessCorrelation", ours, reference_call(s, make), "mc")


def build_monotonicity_black(s: Setup) -> Metric:
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.monotonicity(s.apply_softmax(p), x, att, t, baseline="black",
                                                                   patch=None))

    def make():
        import quantus

        def theirs():  # nr_samples=1: with a fixed baseline every sample is the same forward pass
            m = quantus.MonotonicityCorrelation(nr_samples=1, perturb_baseline="black", features_in_step=1,
                                                disable_warnings=True)
            return m(**s.quantus_kwargs())

        return theirs

    return Metric("monotonicity, black", "quantus.MonotonicityCorrelation", ours, reference_call(s, make), "exact",
                  ranked=int(np.prod(s.x.shape[1:])))


def build_monotonicity_uniform(s: Setup) -> Metric:
    samples, batch = s.args.mono_samples, s.batch
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.monotonicity(s.apply_softmax(p), x, att, t, key=k,
                                                                   baseline="uniform", samples=samples, patch=None))

    def make():
        import quantus

        features = int(np.prod(s.x.shape[1:]))
        # pair (feature i, sample j) -> one value per example, drawn as `monotonicity` documents
        values = per_sample_draws(metric_key(s, "monotonicity_uniform"), features * samples,
                                  lambda k: jax.random.uniform(k, (batch,), s.x.dtype, 0.0, 1.0))
        values = values.reshape(features, samples, batch)

        class UniformDraws:
            """Called nr_samples times per feature step; example b replaces its feature indices[b, 0]."""

            def __init__(self):
                self.calls = 0

            def __call__(self, arr, indices, **_):
                j, self.calls = self.calls % samples, self.calls + 1
                out = arr.copy()
                rows = np.arange(arr.shape[0])[:, None]
                out[rows, indices] = values[indices, j, rows]
                return out

        def theirs():
            m = quantus.MonotonicityCorrelation(nr_samples=samples, perturb_func=UniformDraws(), features_in_step=1,
                                                disable_warnings=True)
            return m(**s.quantus_kwargs())

        return theirs

    return Metric(f"monotonicity, uniform x{samples}", "quantus.MonotonicityCorrelation", ours,
                  reference_call(s, make), "exact", shared=True, ranked=int(np.prod(s.x.shape[1:])))


def build_region_perturbation(s: Setup) -> Metric:
    patch = s.args.patch
    h, w = s.x.shape[1:3]
    regions = math.ceil(h / patch) * math.ceil(w / patch)
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.region_perturbation(s.apply_softmax(p), x, att, t, patch=patch,
                                                                          baseline="black"))

    def make():
        import quantus

        def theirs():
            m = quantus.RegionPerturbation(patch_size=patch, regions_evaluation=regions, perturb_baseline="black",
                                           disable_warnings=True)
            return np.asarray(m(**s.quantus_kwargs()))

        return theirs

    # Quantus' curve has no k = 0 term (our AOPC averages curve[:, 0..steps])
    return Metric(f"region_perturbation {patch}x{patch} (curve)", "quantus.RegionPerturbation", ours,
                  reference_call(s, make), "exact", to_ref=lambda out: np.asarray(out[1])[:, 1:])


def build_road(s: Setup) -> Metric:
    a = s.args
    fractions = tuple(q / 100 for q in a.percentages)
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.road(s.apply(p), x, att, t, key=k, percentages=fractions,
                                                           noise=a.road_noise))

    def make():
        import quantus
        from quantus.functions.perturb_func import noisy_linear_imputation

        batch = s.batch
        keys = jax.random.split(metric_key(s, "road"), len(fractions))  # fraction j's noise key, as `road` draws it
        noise = np.stack([s.nchw(a.road_noise * jax.random.normal(k, s.x.shape, s.x.dtype)) for k in keys])

        class RoadDraws:
            """Called per percentage, then per example: Quantus' exact imputation plus our noise."""

            def __init__(self):
                self.calls = 0

            def __call__(self, arr, indices, **_):
                (j, b), self.calls = divmod(self.calls, batch), self.calls + 1
                flat = noisy_linear_imputation(arr, indices, noise=0.0).reshape(arr.shape[0], -1)
                flat[:, indices] += noise[j, b].reshape(arr.shape[0], -1)[:, indices]
                return flat.reshape(arr.shape)

        def theirs():
            m = quantus.ROAD(percentages=list(a.percentages), noise=a.road_noise, perturb_func=RoadDraws(),
                             disable_warnings=True)
            return np.asarray(list(m(**s.quantus_kwargs()).values()))

        return theirs

    # Quantus returns the accuracy per percentage (mean over the batch): one flipped decision is 1 / batch
    return Metric("road (accuracy curve)", "quantus.ROAD", ours, reference_call(s, make), "exact", shared=True,
                  to_ref=lambda out: np.asarray(out).mean(axis=0), rtol=0.0, unit="percentages")


def build_imputation(s: Setup) -> Metric:
    """Noisy linear imputation (noise 0) of the half of the pixels with the largest attribution."""
    batch, h, w, _ = s.x.shape
    order = np.argsort(-np.asarray(s.attribution).sum(-1).reshape(batch, -1), axis=1, kind="stable")[:, : h * w // 2]
    removed = np.zeros((batch, h * w), bool)
    removed[np.arange(batch)[:, None], order] = True
    removed = jnp.asarray(removed.reshape(batch, h, w))
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.noisy_linear_imputation(x, removed, noise=0.0))

    def make():
        from quantus.functions.perturb_func import noisy_linear_imputation

        x_nchw = s.nchw(s.x)

        def theirs():
            return np.stack([noisy_linear_imputation(x_nchw[b], order[b], noise=0.0) for b in range(batch)])

        return theirs

    return Metric("noisy_linear_imputation (50%, noise 0)", "quantus noisy_linear_imputation", ours,
                  reference_call(s, make), "exact", to_ref=s.nchw)


def repeated_per_example(s: Setup, draws: np.ndarray):
    """[S, B, H, W, C] draws -> torch [B * S, C, H, W], row b * S + j = draw j of example b (Captum's layout)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(draws.transpose(1, 0, 4, 2, 3)).reshape(-1, *s.nchw(s.x).shape[1:]))


def build_infidelity(s: Setup) -> Metric:
    a = s.args
    samples, sigma = a.samples, a.infidelity_noise
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.infidelity(s.apply(p), x, att, t, key=k, samples=samples,
                                                                 noise=sigma))

    def make():
        from captum.metrics import infidelity

        perturbations = repeated_per_example(s, per_sample_draws(
            metric_key(s, "infidelity"), samples, lambda k: sigma * jax.random.normal(k, s.x.shape, s.x.dtype)))
        x_t, a_t, t_t = s.torch_tensors()

        def perturb(inputs):
            return perturbations, inputs - perturbations

        def theirs():
            return infidelity(s.torch_net, perturb, x_t, a_t, target=t_t, n_perturb_samples=samples).numpy()

        return theirs

    return Metric("infidelity", "captum.metrics.infidelity", ours, reference_call(s, make), "exact", shared=True)


def build_max_sensitivity(s: Setup) -> Metric:
    a = s.args
    samples, radius = a.samples, a.max_sens_radius
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.max_sensitivity(s.attr_fn(p), x, t, key=k, radius=radius,
                                                                      samples=samples))

    def make():
        import captum.attr
        from captum.metrics import sensitivity_max

        noise = repeated_per_example(s, per_sample_draws(
            metric_key(s, "max_sensitivity"), samples,
            lambda k: jax.random.uniform(k, s.x.shape, s.x.dtype, -radius, radius)))
        x_t, _, t_t = s.torch_tensors()
        explainer = getattr(captum.attr, ATTRIBUTIONS[a.attribution][1])(s.torch_net)

        def perturb(inputs, perturb_radius):
            return inputs + noise

        def theirs():
            return sensitivity_max(explainer.attribute, x_t, perturb_func=perturb, perturb_radius=radius,
                                   n_perturb_samples=samples, target=t_t).numpy()

        return theirs

    return Metric("max_sensitivity", "captum.metrics.sensitivity_max", ours, reference_call(s, make), "exact",
                  shared=True)


def flat_noise(s: Setup, builder: str, draw: Callable[[jax.Array], jax.Array]) -> np.ndarray:
    """Our draws for Quantus' batch perturb functions: [S, B, features] in NCHW flatten order."""
    noise = per_sample_draws(metric_key(s, builder), s.args.samples, draw)
    return noise.transpose(0, 1, 4, 2, 3).reshape(s.args.samples, s.batch, -1)


def build_avg_sensitivity(s: Setup) -> Metric:
    samples, radius = s.args.samples, s.args.avg_sens_radius
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.avg_sensitivity(s.attr_fn(p), x, t, key=k, radius=radius,
                                                                      samples=samples))

    def make():
        import quantus

        noise = flat_noise(s, "avg_sensitivity", lambda k: jax.random.uniform(k, s.x.shape, s.x.dtype, -radius, radius))

        def theirs():
            m = quantus.AvgSensitivity(nr_samples=samples, lower_bound=radius, perturb_func=SequentialNoise(noise),
                                       disable_warnings=True)
            return m(**s.quantus_kwargs(a_batch=None, **s.quantus_explain()))

        return theirs

    return Metric("avg_sensitivity", "quantus.AvgSensitivity", ours, reference_call(s, make), "exact", shared=True)


def build_local_lipschitz(s: Setup) -> Metric:
    samples, radius = s.args.samples, s.args.lipschitz_std
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.local_lipschitz(s.attr_fn(p), x, t, key=k, radius=radius,
                                                                      samples=samples))

    def make():
        import quantus

        noise = flat_noise(s, "local_lipschitz", lambda k: radius * jax.random.normal(k, s.x.shape, s.x.dtype))

        def theirs():
            m = quantus.LocalLipschitzEstimate(nr_samples=samples, perturb_std=radius, normalise=False,
                                               perturb_func=SequentialNoise(noise), disable_warnings=True)
            return m(**s.quantus_kwargs(a_batch=None, **s.quantus_explain()))

        return theirs

    return Metric("local_lipschitz", "quantus.LocalLipschitzEstimate", ours, reference_call(s, make), "exact",
                  shared=True)


def quantus_random_logit(s: Setup) -> Callable[[], Callable[[], object]]:
    def make():
        import quantus

        def theirs():
            m = quantus.RandomLogit(num_classes=NUM_CLASSES, normalise=False, disable_warnings=True)
            return m(**s.quantus_kwargs(a_batch=None, **s.quantus_explain()))

        return theirs

    return make


def build_random_logit(s: Setup) -> Metric:
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.random_logit(s.attr_fn(p), x, t, key=k, num_classes=NUM_CLASSES))
    return Metric("random_logit (ssim)", "quantus.RandomLogit", ours, reference_call(s, quantus_random_logit(s)), "mc")


def quantus_off_classes(target: np.ndarray, num_classes: int, seed: int = 42) -> np.ndarray:
    """The other classes Quantus' RandomLogit explains: np.random.seed(seed), r ~ randint(0, C - 1), skip the target."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        r = np.random.randint(0, num_classes - 1, target.shape[0])
    finally:
        np.random.set_state(state)
    return r + (r >= target)


def build_random_logit_shared(s: Setup) -> Metric:
    """random_logit's similarity on the classes Quantus draws (seed 42): an exact comparison."""
    off = jnp.asarray(quantus_off_classes(np.asarray(s.target), NUM_CLASSES), jnp.int32)

    def fn(p, x, att, t, k):
        amap = s.attr_fn(p)
        return metrics.ssim(amap(x, t), amap(x, off))

    return Metric("random_logit, Quantus' classes", "quantus.RandomLogit", jit_ours(s, fn),
                  reference_call(s, quantus_random_logit(s)), "exact", shared=True, time_theirs=False)


def build_sparseness(s: Setup) -> Metric:
    # Quantus: normalise_by_max over the whole batch, abs, then + 1e-7 (see `sparseness`)
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.sparseness(att / jnp.max(jnp.abs(att)), eps=1e-7))

    def make():
        import quantus

        return lambda: quantus.Sparseness(disable_warnings=True)(**s.quantus_kwargs())

    return Metric("sparseness", "quantus.Sparseness", ours, reference_call(s, make), "exact")


def build_complexity(s: Setup) -> Metric:
    ours = jit_ours(s, lambda p, x, att, t, k: metrics.complexity(att))

    def make():
        import quantus

        return lambda: quantus.Complexity(disable_warnings=True)(**s.quantus_kwargs())

    return Metric("complexity", "quantus.Complexity", ours, reference_call(s, make), "exact")


BUILDERS: dict[str, Callable[[Setup], Metric]] = {
    "attribution": build_attribution,
    "faithfulness_correlation": build_faithfulness_correlation,
    "monotonicity_black": build_monotonicity_black,
    "monotonicity_uniform": build_monotonicity_uniform,
    "region_perturbation": build_region_perturbation,
    "road": build_road,
    "noisy_linear_imputation": build_imputation,
    "infidelity": build_infidelity,
    "max_sensitivity": build_max_sensitivity,
    "avg_sensitivity": build_avg_sensitivity,
    "local_lipschitz": build_local_lipschitz,
    "random_logit": build_random_logit,
    "random_logit_shared": build_random_logit_shared,
    "sparseness": build_sparseness,
    "complexity": build_complexity,
}


# --------------------------------------------------------------------------- comparison and timing


@dataclasses.dataclass
class Row:
    metric: str
    reference: str
    ours_value: float
    ref_value: float | None = None
    max_abs_diff: float | None = None
    ours_s: float | None = None
    theirs_s: float | None = None
    agreement: str = "-"
    agrees: bool | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.theirs_s is None or not self.ours_s else self.theirs_s / self.ours_s


def compare(m: Metric, ours_out, ref_out, mc_means: Sequence[float]) -> Row:
    """Values and agreement of one metric (`ref_out` None: our side only)."""
    mine = np.asarray(m.to_ref(ours_out), np.float64)
    row = Row(m.name, m.reference, float(np.nanmean(mine)))
    if ref_out is None:
        return row
    ref = np.asarray(ref_out, np.float64).reshape(mine.shape)
    row.ref_value = float(np.nanmean(ref))
    if m.mode == "exact":
        err = np.abs(mine - ref)
        row.max_abs_diff = float(np.nanmax(err))
        tol = m.rtol * max(1.0, float(np.nanmax(np.abs(ref))))
        nan_both = np.isnan(mine) & np.isnan(ref)
        exact = ((err <= tol) | nan_both).reshape(err.shape[0], -1).all(axis=1)
        how = "same draws" if m.shared else "deterministic"
        row.agrees = bool(exact.all())
        row.agreement = f"{'yes' if row.agrees else 'NO'}: {how}, tol {tol:.0e}"
        if not row.agrees and m.ranked:
            # Two features whose output changes lie within float32 resolution of each other can tie on
            # one side and not the other: an adjacent swap of ranks i, j moves Spearman's rho by
            # 12 |r_i - r_j| / (n (n^2 - 1)) <= 12 / (n (n + 1)), a tie by half that.
            swap = 12 / (m.ranked * (m.ranked + 1))
            row.agrees = bool(((err <= swap) | nan_both).all())
            row.agreement = (f"{'yes' if row.agrees else 'NO'}: {how}, {int(exact.sum())}/{exact.size} {m.unit} "
                             f"within tol {tol:.0e}, all within one adjacent rank swap {swap:.1e} (float32 ties)")
        elif not row.agrees:
            row.agreement += f", {int(exact.sum())}/{exact.size} {m.unit} within tol"
    else:
        row.max_abs_diff = abs(row.ours_value - row.ref_value)
        sd = float(np.std(mc_means, ddof=1)) if len(mc_means) > 1 else float("nan")
        tol = 4 * math.sqrt(2) * sd
        row.agrees = bool(row.max_abs_diff <= tol)
        row.agreement = (f"{'yes' if row.agrees else 'NO'}: means, own draws, tol {tol:.2g} "
                         f"(4 sqrt2 sd, {len(mc_means)} keys)")
    return row


def format_rows(rows: Sequence[Row]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    header = ["metric", "our value", "reference value", "max abs diff", "ours s", "theirs s", "theirs / ours",
              "agreement (reference)"]
    return common.markdown_table(header, [
        [r.metric, f"{r.ours_value:.6g}", fmt(r.ref_value, ".6g"), fmt(r.max_abs_diff, ".1e"), fmt(r.ours_s, ".4f"),
         fmt(r.theirs_s, ".4f"), fmt(r.ratio, ".1f"), f"{r.agreement} ({r.reference})"] for r in rows])


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="images (default 16)")
    p.add_argument("--train-steps", type=int, default=None, help="Adam steps on the other digits (default 300)")
    p.add_argument("--attribution", choices=sorted(ATTRIBUTIONS), default="saliency")
    p.add_argument("--jitter", type=float, default=0.01,
                   help="U(0, jitter) added to the digits so that no max-pool window holds equal values "
                        "(default 0.01; 0: the raw digits, see the docstring)")
    p.add_argument("--faith-runs", type=int, default=None, help="FaithfulnessCorrelation random subsets (default 100)")
    p.add_argument("--subset-size", type=int, default=16, help="FaithfulnessCorrelation subset size (default 16 of 64)")
    p.add_argument("--mono-samples", type=int, default=None,
                   help="uniform draws per feature, monotonicity (default 100)")
    p.add_argument("--patch", type=int, default=2, help="region_perturbation patch side (default 2: 16 regions)")
    p.add_argument("--percentages", type=int, nargs="+", default=None, help="ROAD percentages (default 10 20 .. 90)")
    p.add_argument("--road-noise", type=float, default=0.01, help="ROAD imputation noise (default 0.01, Quantus')")
    p.add_argument("--samples", type=int, default=None,
                   help="noise samples of infidelity, max/avg sensitivity, local Lipschitz (default 50)")
    p.add_argument("--infidelity-noise", type=float, default=0.1, help="infidelity perturbation std (default 0.1)")
    p.add_argument("--max-sens-radius", type=float, default=0.02, help="max_sensitivity radius (default Captum's 0.02)")
    p.add_argument("--avg-sens-radius", type=float, default=0.2, help="avg_sensitivity radius (default Quantus' 0.2)")
    p.add_argument("--lipschitz-std", type=float, default=0.1, help="local_lipschitz noise std (default Quantus' 0.1)")
    p.add_argument("--mc-keys", type=int, default=None, help="extra keys for the Monte-Carlo tolerance (default 8)")
    p.add_argument("--repeats", type=int, default=None, help="round-robin repetitions (default 5)")
    p.add_argument("--metrics", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    p.add_argument("--impl", choices=sorted(_layers.CONV_IMPLS), default="patches",
                   help="SmallCNN impl (default patches: what attributions run with, models.for_attribution)")
    p.add_argument("--frameworks", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for the reference side (default 1; 0: torch's own choice; see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 images, no training, 4 subsets, 2 uniform draws, 3 noise samples, 1 repeat")
    a = p.parse_args(argv)
    quick = {"batch": 4, "train_steps": 0, "faith_runs": 4, "mono_samples": 2, "samples": 3, "mc_keys": 2,
             "repeats": 1, "percentages": [20, 50, 80]}
    full = {"batch": 16, "train_steps": 300, "faith_runs": 100, "mono_samples": 100, "samples": 50, "mc_keys": 8,
            "repeats": 5, "percentages": list(range(10, 100, 10))}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if not all(0 < q < 100 for q in a.percentages):
        p.error(f"--percentages must lie in (0, 100); got {a.percentages}")
    return a


def make_setup(args, with_reference: bool, log) -> Setup:
    x_train, y_train, x_eval, y_eval = load_digits(args.batch, args.seed, args.jitter)
    net = models.SmallCNN(NUM_CLASSES, impl=args.impl)
    params = train_params(net, x_train, y_train, args.train_steps, args.seed)
    x = jnp.asarray(x_eval)
    logits = jax.jit(net.apply)({"params": params}, x)
    target = jnp.argmax(logits, axis=1).astype(jnp.int32)
    method = ATTRIBUTIONS[args.attribution][0]
    attribution = jax.jit(lambda p, xx, t: method(functools.partial(net.apply, {"params": p}), xx, t))(
        params, x, target)
    log(f"model: SmallCNN {tuple(net.conv_features)} / {tuple(net.dense_features)}, {args.train_steps} Adam steps; "
        f"accuracy on the {args.batch} images {float(jnp.mean(target == y_eval)):.2f}; targets = predicted classes")
    setup = Setup(args, net, params, x, target, attribution, method, key=jax.random.key(args.seed))
    if with_reference:
        import torch

        setup.torch_net = common.torch_convnet(params, SHAPE, net.conv_features, net.dense_features, NUM_CLASSES)
        with torch.no_grad():
            torch_logits = setup.torch_net(torch.from_numpy(setup.nchw(x))).numpy()
        err = float(np.abs(np.asarray(logits) - torch_logits).max())
        if not err <= 1e-4:
            raise RuntimeError(f"Flax and PyTorch SmallCNN logits differ by {err:.3g} > 1e-4: the weight copy is wrong")
        log(f"logits Flax vs PyTorch, same weights: max abs diff {err:.2e} (limit 1e-4)")
    return setup


def main(argv=None, log=print) -> list[Row]:
    args = parse_args(argv)
    with_reference = "torch" in args.frameworks and reference_available()
    if "torch" in args.frameworks and not with_reference:
        log("note: torch, quantus or captum is not importable; reference columns skipped, our side only "
            "(pip install torch==2.13.0 quantus==0.6.0 captum in a separate venv)")
    command = " ".join(["python benchmarks/metrics.py", *(sys.argv[1:] if argv is None else argv)])
    log(f"attribution metrics, {args.batch} digits 8x8x1, {args.attribution}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    log(f"command: {command}")
    log(f"machine: {common.device_description()}; load average {os.getloadavg()[0]:.1f}")
    log(f"versions: python {sys.version.split()[0]}, "
        f"{common.versions('jax', 'jaxlib', 'flax', 'numpy', 'scipy', 'torch', 'quantus', 'captum')}")
    if with_reference:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        log(f"torch intra-op threads {torch.get_num_threads()} (--torch-threads {args.torch_threads})")
    setup = make_setup(args, with_reference, log)

    rows, cases = [], {}
    for builder in args.metrics:
        m = BUILDERS[builder](setup)
        key = metric_key(setup, builder)
        ours_out = m.ours(key)  # compiles
        ref_out = m.theirs() if m.theirs is not None else None
        mc_means = []
        if m.mode == "mc" and ref_out is not None:
            mc_keys = [jax.random.fold_in(key, 1 + i) for i in range(args.mc_keys)]
            mc_means = [float(np.nanmean(m.to_ref(m.ours(k)))) for k in mc_keys]
        rows.append(compare(m, ours_out, ref_out, mc_means))
        cases[f"{m.name} ours"] = functools.partial(m.ours, key)
        if m.theirs is not None and m.time_theirs:
            cases[f"{m.name} theirs"] = m.theirs
    seconds = common.interleave(cases, args.repeats)
    for r in rows:
        r.ours_s = seconds[f"{r.metric} ours"]
        r.theirs_s = seconds.get(f"{r.metric} theirs")
    log(format_rows(rows))
    log(f"repeats {args.repeats} (median); load average after the run {os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
