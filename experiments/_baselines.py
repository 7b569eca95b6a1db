"""Classical readable baselines from scikit-learn, fitted on the same images, split and seed as the students.

- `sk-tree-d8`, `sk-tree`: `DecisionTreeClassifier` at depth 8 and at unlimited depth on the
  standardized pixels.
- `sk-logreg-pixels`, `sk-logreg-pca`: multinomial `LogisticRegression` on the standardized pixels
  and on the same PCA components the linear student reads.

A logistic regression is a linear model, so it becomes a `models.Linear` with its coefficients
(the pixels as the identity "PCA"): the library evaluates and explains it like the linear
student (integrated gradients, deletion AUC). A decision tree has no gradient: it gets accuracy,
agreement and KL only. Nothing here reads a config beyond the caller's arguments.
"""
from __future__ import annotations

import time
import warnings

import jax
import numpy as np

from distill_jax import metrics, models, train
from distill_jax.app import _fit, _prepare

BASELINES = ("sk-tree-d8", "sk-tree", "sk-logreg-pixels", "sk-logreg-pca")
# a decision tree's leaf frequencies can be exactly 0; KL(teacher || tree) is computed on
# (p + eps) / (1 + K eps) so that it stays finite (the smoothing is named in the results)
TREE_PROBABILITY_EPS = 1e-4


def flat_inputs(prep, x: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Standardized model inputs of stored images, flattened: [n, h*w*c] float32 on the host."""

    return np.concatenate([np.asarray(b) for b in _prepare.batched_inputs(prep.scaler, x, batch_size=batch_size)])


def flat_split(prep) -> tuple[np.ndarray, np.ndarray]:
    """(train [n, d], test [m, d]): `flat_inputs` of the training and test images, computed once per seed
    and passed to every baseline."""
    return flat_inputs(prep, prep.x_train), flat_inputs(prep, prep.x_test)


def _linear_trained(name: str, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, components: np.ndarray,
                    prep, seconds: float, mesh, eval_batch_size: int):
    """A fitted logistic regression as a `pipeline.Trained` over `models.Linear` (z = (x - mean) components^T)."""

    model = models.Linear(prep.num_classes, n_components=int(components.shape[0]))
    variables = jax.device_get({
        "params": {"linear": {"kernel": np.asarray(coef.T, np.float32), "bias": np.asarray(intercept, np.float32)}},
        "pca": {"mean": np.asarray(mean, np.float32), "components": np.asarray(components, np.float32)},
    })
    logits = train.predict(_fit.make_host_predict_fn(model, prep, mesh), variables, prep.x_test,
                           batch_size=eval_batch_size, mesh=mesh)
    return _fit.Trained(name, model, variables, "linear", "sklearn", logits, [], seconds,
                            train_images=len(prep.y_train))


def fit_logreg(name: str, prep, x_train: np.ndarray, *, seed: int, mesh, eval_batch_size: int = 1000,
               max_iter: int = 300):
    """`sk-logreg-pixels` or `sk-logreg-pca`: (a `pipeline.Trained` linear model, {iterations, converged}).

    L-BFGS on the multinomial log-loss with scikit-learn's default L2 penalty (C = 1), at most
    `max_iter` iterations; whether it converged is returned, not warned about. `x_train`: the
    training images' `flat_inputs` [n, d]; the test images are evaluated through the library's model.
    """
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    start = time.perf_counter()
    x, d = x_train, x_train.shape[1]
    if name == "sk-logreg-pca":
        mean, components = np.asarray(prep.pca.mean), np.asarray(prep.pca.components)
        x = (x - mean) @ components.T
    else:
        mean, components = np.zeros(d, np.float32), np.eye(d, dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:  # not converging is recorded, not printed
        warnings.simplefilter("always", ConvergenceWarning)
        clf = LogisticRegression(max_iter=max_iter, random_state=seed).fit(x, prep.y_train)
    trained = _linear_trained(name, clf.coef_, clf.intercept_, mean, components, prep, time.perf_counter() - start,
                              mesh, eval_batch_size)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return trained, {"iterations": int(np.max(clf.n_iter_)), "converged": converged}


def fit_tree(name: str, prep, x_train: np.ndarray, x_test: np.ndarray, teacher_logits: np.ndarray, *,
             seed: int) -> dict:
    """`sk-tree-d8` / `sk-tree`: metrics of a `DecisionTreeClassifier` (no gradients: no attributions).

    `x_train` [n, d], `x_test` [m, d]: the images' `flat_inputs` (`flat_split`).
    """
    from sklearn.tree import DecisionTreeClassifier  # noqa: PLC0415


    start = time.perf_counter()
    clf = DecisionTreeClassifier(max_depth=8 if name == "sk-tree-d8" else None, random_state=seed)
    clf.fit(x_train, prep.y_train)
    seconds = time.perf_counter() - start
    proba = np.zeros((len(prep.y_test), prep.num_classes))
    proba[:, clf.classes_] = clf.predict_proba(x_test)
    k = prep.num_classes
    logits = np.log((proba + TREE_PROBABILITY_EPS) / (1 + k * TREE_PROBABILITY_EPS)).astype(np.float32)
    return {"accuracy": float(np.mean(np.argmax(proba, -1) == prep.y_test)),
            "agreement": float(metrics.agreement(logits, teacher_logits)),
            "kl": float(metrics.mean_kl(logits, teacher_logits)),
            "params": int(clf.tree_.node_count), "depth": int(clf.get_depth()), "leaves": int(clf.get_n_leaves()),
            "train_seconds": round(seconds, 2), "train_images": len(prep.y_train), "method": "sklearn"}
