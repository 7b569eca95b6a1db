"""An Equinox CNN trained on the bundled digits, distilled into a soft decision tree and explained, with distill_jax.

    python examples/equinox_cnn.py            # about a minute on a 2-core CPU
    python examples/equinox_cnn.py --quick    # seconds (what tests/test_examples.py runs)

Needs equinox (`pip install -e .[examples]`). An Equinox model is a pytree whose array leaves are its
parameters: `params, static = eqx.partition(cnn, eqx.is_array)` splits it, and
`jax.vmap(eqx.combine(params, static))` is the batched `x -> logits` (the model itself sees one
unbatched image). With that split the CNN is, for the library, a pair of pure functions

    init_fn(key, x) -> params,   apply_fn(params, x) -> logits     (a student: `distill.as_student`)

so the library's own train step and fit loop train it (`distill.distill(..., method="labels")`, no
teacher), and `apply_fn` with its params is the teacher a soft tree is distilled from. Grad-CAM takes
the CNN cut at its last conv map, `(features_fn, head_fn)`.

Prints the test accuracy of the CNN and of the tree, their agreement, and over 32 test images:
integrated gradients' completeness error (sum IG = f(x) - f(0)), and the deletion AUC of IG, Grad-CAM
and a random map (lower = the map found the pixels the model needs; a random map is the bar to beat).
"""
from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from distill_jax import attr
from distill_jax import data
from distill_jax import distill
from distill_jax import metrics
from distill_jax import models


BUDGETS = {  # epochs of the CNN, epochs of the tree
    "full": {"cnn_epochs": 60, "tree_epochs": 120},
    "quick": {"cnn_epochs": 4, "tree_epochs": 8},
}


class CNN(eqx.Module):
    """conv 16 -> ReLU -> 2x2 max-pool -> conv 32 -> ReLU (the Grad-CAM layer) -> 2x2 max-pool -> dense 64 -> classes.

    Takes one image [8, 8, 1] (HWC, as the library's data); Equinox convolutions work on CHW.
    """

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    dense: eqx.nn.Linear
    out: eqx.nn.Linear
    pool: eqx.nn.MaxPool2d

    def __init__(self, num_classes: int, key: jax.Array):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k2)
        self.dense = eqx.nn.Linear(2 * 2 * 32, 64, key=k3)
        self.out = eqx.nn.Linear(64, num_classes, key=k4)
        self.pool = eqx.nn.MaxPool2d(2, 2)

    def features(self, x):  # [8, 8, 1] -> [4, 4, 32]
        h = self.pool(jax.nn.relu(self.conv1(jnp.transpose(x, (2, 0, 1)))))
        return jnp.transpose(jax.nn.relu(self.conv2(h)), (1, 2, 0))

    def head(self, a):  # [4, 4, 32] -> [classes]
        h = self.pool(jnp.transpose(a, (2, 0, 1))).reshape(-1)
        return self.out(jax.nn.relu(self.dense(h)))

    def __call__(self, x):
        return self.head(self.features(x))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs: seconds, for tests")
    args = parser.parse_args(argv)
    budget = BUDGETS["quick" if args.quick else "full"]
    start = time.perf_counter()
    ds = data.load("digits")  # NHWC float32 in [0, 1]; 1438 train, 359 test images of 8 x 8
    x_train, y_train = ds.x_train, ds.y_train

    _, static = eqx.partition(CNN(ds.num_classes, jax.random.PRNGKey(0)), eqx.is_array)

    def init_fn(key, x):
        return eqx.partition(CNN(ds.num_classes, key), eqx.is_array)[0]

    def apply_fn(params, x):  # [B, 8, 8, 1] -> [B, classes]
        return jax.vmap(eqx.combine(params, static))(x)

    # the CNN trained by the library's step and fit loop, on the labels alone (no teacher)
    params = distill.distill((init_fn, apply_fn), None, x_train, y_train, key=jax.random.PRNGKey(0), method="labels",
                             epochs=budget["cnn_epochs"], batch_size=64, learning_rate=3e-3)

    # ... then distilled into a soft tree; its params are an argument of the step, not constants
    tree = models.SoftDecisionTree(depth=5, num_classes=ds.num_classes)
    tree_vars = distill.distill(tree, apply_fn, x_train, y_train, teacher_variables=params, key=jax.random.PRNGKey(1),
                                method="kd", temperature=4.0, alpha=0.9, epochs=budget["tree_epochs"], batch_size=64,
                                learning_rate=1e-2)

    x_test = jnp.asarray(ds.x_test)
    t_logits, s_logits = jax.jit(apply_fn)(params, x_test), jax.jit(tree.apply)(tree_vars, x_test)
    result = {
        "teacher_accuracy": float(metrics.accuracy(t_logits, ds.y_test)),
        "tree_accuracy": float(metrics.accuracy(s_logits, ds.y_test)),
        "agreement": float(metrics.agreement(s_logits, t_logits)),
    }

    # explanations of the CNN's own prediction on 32 test images, jitted with the params as an argument
    x, target = x_test[:32], jnp.argmax(t_logits[:32], -1)

    @jax.jit
    def explain_cnn(p, x, target):
        f = lambda z: apply_fn(p, z)  # noqa: E731
        cnn = eqx.combine(p, static)
        split = (jax.vmap(cnn.features), jax.vmap(cnn.head))  # [B, 4, 4, 32] feature maps, NHWC
        ig = attr.integrated_gradients(f, x, target, steps=32)
        cam = attr.grad_cam(split, x, target)  # [B, 8, 8]: the 4 x 4 map resized to the input
        noise = jax.random.uniform(jax.random.PRNGKey(2), x.shape)
        gap = (jnp.take_along_axis(f(x), target[:, None], 1) - jnp.take_along_axis(
            f(jnp.zeros_like(x)), target[:, None], 1))[:, 0]  # f(x) - f(baseline 0), what IG must sum to
        return {"ig_sum": jnp.sum(ig, axis=(1, 2, 3)), "logit_gap": gap,
                "ig_completeness_error": metrics.ig_completeness_error(f, x, ig, target),
                "deletion_auc_ig": metrics.deletion_auc(f, x, ig, target),
                "deletion_auc_grad_cam": metrics.deletion_auc(f, x, cam, target),
                "deletion_auc_random": metrics.deletion_auc(f, x, noise, target)}

    @jax.jit
    def explain_tree(v, x, target):
        f = lambda z: tree.apply(v, z)  # noqa: E731
        return {"tree_deletion_auc_ig": metrics.deletion_auc(f, x, attr.integrated_gradients(f, x, target, steps=32),
                                                             target)}

    scores = {**explain_cnn(params, x, target), **explain_tree(tree_vars, x, target)}
    result.update({k: np.asarray(v) for k, v in scores.items() if k in ("ig_sum", "logit_gap")})
    result.update({k: float(jnp.mean(v)) for k, v in scores.items() if k not in ("ig_sum", "logit_gap")})
    result["seconds"] = time.perf_counter() - start
    print(f"Equinox CNN on digits ({'quick' if args.quick else 'full'}, {result['seconds']:.0f} s)")
    for key in ("teacher_accuracy", "tree_accuracy", "agreement", "ig_completeness_error", "deletion_auc_ig",
                "deletion_auc_grad_cam", "deletion_auc_random", "tree_deletion_auc_ig"):
        print(f"  {key:24s} {result[key]:.3f}")
    return result


if __name__ == "__main__":
    main()
