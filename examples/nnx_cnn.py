"""A Flax NNX CNN trained on the bundled digits, distilled into a soft decision tree and explained, with distill_jax.

    python examples/nnx_cnn.py            # about a minute on a 2-core CPU
    python examples/nnx_cnn.py --quick    # seconds (what tests/test_examples.py runs)

The CNN is trained by its own NNX loop (`nnx.Optimizer`, `nnx.jit`): the library needs no part of it.
For the library it is split once, `graphdef, state = nnx.split(cnn)`, into pure functions of `state`:

    teacher(state, x) -> logits               distilled with `distill.distill(tree, teacher, ...,
                                               teacher_variables=state)`: the state is an argument of the
                                               compiled train step, not a constant baked into it
    features(state, x) -> [B, 4, 4, 32]        with head(state, a) -> logits: the (features_fn, head_fn)
                                               pair that `explain.grad_cam` takes

Prints the test accuracy of the CNN and of the tree, their agreement, and over 32 test images:
integrated gradients' completeness error (sum IG = f(x) - f(0)), and the deletion AUC of IG, Grad-CAM
and a random map (lower = the map found the pixels the model needs; a random map is the bar to beat).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from distill_jax import attr
from distill_jax import data
from distill_jax import distill
from distill_jax import metrics
from distill_jax import models


BUDGETS = {  # epochs of the CNN, epochs of the tree
    "full": {"cnn_epochs": 60, "tree_epochs": 120},
    "quick": {"cnn_epochs": 4, "tree_epochs": 8},
}


class CNN(nnx.Module):
    """conv 16 -> ReLU -> 2x2 max-pool -> conv 32 -> ReLU (the Grad-CAM layer) -> 2x2 max-pool -> dense 64 -> classes."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(2 * 2 * 32, 64, rngs=rngs)
        self.out = nnx.Linear(64, num_classes, rngs=rngs)

    def features(self, x):  # [B, 8, 8, 1] -> [B, 4, 4, 32]
        h = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        return nnx.relu(self.conv2(h))

    def head(self, a):  # [B, 4, 4, 32] -> [B, classes]
        h = nnx.max_pool(a, (2, 2), strides=(2, 2)).reshape(a.shape[0], -1)
        return self.out(nnx.relu(self.dense(h)))

    def __call__(self, x):
        return self.head(self.features(x))


def train_cnn(cnn: CNN, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int = 64, seed: int = 0) -> None:
    """The plain NNX loop: Adam on the mean cross entropy, shuffled batches (updates `cnn` in place)."""
    optimizer = nnx.Optimizer(cnn, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            step(cnn, optimizer, x[order[i : i + batch_size]], y[order[i : i + batch_size]])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs: seconds, for tests")
    args = parser.parse_args(argv)
    budget = BUDGETS["quick" if args.quick else "full"]
    start = time.perf_counter()
    ds = data.load("digits")  # NHWC float32 in [0, 1]; 1438 train, 359 test images of 8 x 8
    x_train, y_train = ds.x_train, ds.y_train

    cnn = CNN(ds.num_classes, rngs=nnx.Rngs(0))
    train_cnn(cnn, x_train, y_train, epochs=budget["cnn_epochs"])
    graphdef, state = nnx.split(cnn)

    def teacher(s, x):
        return nnx.merge(graphdef, s)(x)

    tree = models.SoftDecisionTree(depth=5, num_classes=ds.num_classes)
    tree_vars = distill.distill(tree, teacher, x_train, y_train, teacher_variables=state, key=jax.random.PRNGKey(1),
                                method="kd", temperature=4.0, alpha=0.9, epochs=budget["tree_epochs"], batch_size=64,
                                learning_rate=1e-2)

    x_test = jnp.asarray(ds.x_test)
    t_logits, s_logits = jax.jit(teacher)(state, x_test), jax.jit(tree.apply)(tree_vars, x_test)
    result = {
        "teacher_accuracy": float(metrics.accuracy(t_logits, ds.y_test)),
        "tree_accuracy": float(metrics.accuracy(s_logits, ds.y_test)),
        "agreement": float(metrics.agreement(s_logits, t_logits)),
    }

    # explanations of the CNN's own prediction on 32 test images, jitted with the state as an argument
    x, target = x_test[:32], jnp.argmax(t_logits[:32], -1)

    @jax.jit
    def explain_cnn(s, x, target):
        apply_fn = lambda z: teacher(s, z)  # noqa: E731
        split = (lambda z: nnx.merge(graphdef, s).features(z), lambda a: nnx.merge(graphdef, s).head(a))
        ig = attr.integrated_gradients(apply_fn, x, target, steps=32)
        cam = attr.grad_cam(split, x, target)  # [B, 8, 8]: the 4 x 4 map resized to the input
        noise = jax.random.uniform(jax.random.PRNGKey(2), x.shape)
        gap = (jnp.take_along_axis(apply_fn(x), target[:, None], 1) - jnp.take_along_axis(
            apply_fn(jnp.zeros_like(x)), target[:, None], 1))[:, 0]  # f(x) - f(baseline 0), what IG must sum to
        return {"ig_sum": jnp.sum(ig, axis=(1, 2, 3)), "logit_gap": gap,
                "ig_completeness_error": metrics.ig_completeness_error(apply_fn, x, ig, target),
                "deletion_auc_ig": metrics.deletion_auc(apply_fn, x, ig, target),
                "deletion_auc_grad_cam": metrics.deletion_auc(apply_fn, x, cam, target),
                "deletion_auc_random": metrics.deletion_auc(apply_fn, x, noise, target)}

    @jax.jit
    def explain_tree(v, x, target):
        apply_fn = lambda z: tree.apply(v, z)  # noqa: E731
        return {"tree_deletion_auc_ig": metrics.deletion_auc(
            apply_fn, x, attr.integrated_gradients(apply_fn, x, target, steps=32), target)}

    scores = {**explain_cnn(state, x, target), **explain_tree(tree_vars, x, target)}
    result.update({k: np.asarray(v) for k, v in scores.items() if k in ("ig_sum", "logit_gap")})
    result.update({k: float(jnp.mean(v)) for k, v in scores.items() if k not in ("ig_sum", "logit_gap")})
    result["seconds"] = time.perf_counter() - start
    print(f"NNX CNN on digits ({'quick' if args.quick else 'full'}, {result['seconds']:.0f} s)")
    for key in ("teacher_accuracy", "tree_accuracy", "agreement", "ig_completeness_error", "deletion_auc_ig",
                "deletion_auc_grad_cam", "deletion_auc_random", "tree_deletion_auc_ig"):
        print(f"  {key:24s} {result[key]:.3f}")
    return result


if __name__ == "__main__":
    main()
