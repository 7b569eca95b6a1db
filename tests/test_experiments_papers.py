"""The paper-reproduction experiments: their helpers (hand-checked) and their --smoke variants end to end."""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")


def _load(name):
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    module_name = name if name.startswith("_") else f"paper_{name}"  # the scripts `import _table` too
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


table = _load("_table")
hinton = _load("hinton2015_mnist")
tree = _load("soft_tree_mnist")
at = _load("attention_transfer_cifar10")


# --------------------------------------------------------------------------- the table


def test_errors_text_and_difference():
    assert table.errors_text(67, 10000) == "67 / 10000 (0.67%)"
    row = table.Row("r", "p", "o", "s", 1.0, paper_value=0.67, ours_value=4.5, unit=" pp")
    assert row.difference == pytest.approx(3.83)
    assert table.Row("r", "p", "o", "s", 1.0).difference is None


def test_markdown_marks_scaled_down_runs_and_lists_every_row():
    rows = [table.Row("a", "1%", "2%", "set", 3.0, 1.0, 2.0, " pp"), table.Row("b", "-", "5%", "x", 0.5)]
    text = table.markdown("T", rows, variant="local", hw="cpu", wall_s=4.0, command="python x.py --local")
    assert "SCALED DOWN" in text and "python x.py --local" in text
    assert "| a | 1% | 2% | +1.00 pp | set | 3.0 s |" in text
    assert "| b | - | 5% |  | x | 0.5 s |" in text
    full = table.markdown("T", rows, variant="full", hw="gpu", wall_s=1.0, command="c")
    assert "SCALED DOWN" not in full


@pytest.mark.parametrize("script", ["hinton2015_mnist", "soft_tree_mnist", "attention_transfer_cifar10"])
def test_configs_have_three_variants_and_reject_others(script):
    path = os.path.join(EXPERIMENTS, f"{script}.py")
    full, local = table.load_config(path, "full"), table.load_config(path, "local")
    assert full.dataset.startswith("tfds:") and not local.dataset.startswith("tfds:")
    assert table.load_config(path, "smoke").dataset == local.dataset
    with pytest.raises(ValueError, match="variant"):
        table.load_config(path, "huge")


def test_header_and_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", [os.path.join(os.getcwd(), "x.py"), "--local", "a b"])
    assert table.command_line() == "python x.py --local 'a b'"
    lines = table.header("T", variant="smoke", hw="cpu", wall_s=2.0, command="python x.py", details=["date: d"])
    assert lines == ["### T (smoke - SCALED DOWN)", "", "- command: `python x.py`", "- hardware: cpu",
                     "- total wall time: 2.0 s", "- date: d", ""]


def test_parse_args_extra_options():
    extra = {"parts": {"help": "which parts"}, "steps": {"type": int}}
    args = table.parse_args(["--parts", "pate", "--steps", "3"], "d", "w", extra=extra)
    assert (args.parts, args.steps, args.variant) == ("pate", 3, "full")
    assert table.parse_args([], "d", "w", extra=extra).parts is None
    with pytest.raises(SystemExit):
        table.parse_args(["--parts", "pate"], "d", "w")  # unknown without the hook


def test_parse_args_variants():
    assert table.parse_args([], "d", "w").variant == "full"
    assert table.parse_args(["--local"], "d", "w").variant == "local"
    args = table.parse_args(["--smoke", "--workdir", "/tmp/x", "--seed", "3"], "d", "w")
    assert (args.variant, args.workdir, args.seed) == ("smoke", "/tmp/x", 3)
    with pytest.raises(SystemExit):
        table.parse_args(["--smoke", "--local"], "d", "w")


# --------------------------------------------------------------------------- Hinton 2015 helpers


def test_raise_class_bias_adds_to_exactly_one_logit():
    model = hinton.DropoutMLP(4, (3,))
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 2, 2, 1)))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 2, 1))
    shifted = hinton.raise_class_bias(variables, 2, 3.5)
    diff = model.apply(shifted, x) - model.apply(variables, x)
    np.testing.assert_allclose(diff, np.tile([0.0, 0.0, 3.5, 0.0], (5, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="cls=4"):
        hinton.raise_class_bias(variables, 4, 1.0)


def test_dropout_mlp_is_deterministic_in_eval_and_random_in_training():
    model = hinton.DropoutMLP(3, (16,), input_dropout=0.2, hidden_dropout=0.5)
    x = jnp.ones((4, 3, 3, 1))
    v = model.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(model.apply(v, x), jax.jit(model.apply)(v, x))
    a = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b)


def test_count_errors_overall_and_per_class():
    logits = np.array([[2.0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 0, 0]])
    y = np.array([0, 3, 1, 3])
    assert hinton.count_errors(logits, y) == 2
    assert hinton.count_errors(logits, y, cls=3) == 1
    assert hinton.count_errors(logits, y, cls=1) == 1


def test_distillation_loss_fn_uses_cached_teacher_logits():
    model = hinton.DropoutMLP(3, ())
    x = jnp.zeros((2, 2, 2, 1))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    params = jax.tree_util.tree_map(jnp.zeros_like, params)  # student logits all 0: uniform softmax
    teacher = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    batch = {"x": x, "y": jnp.array([0, 0]), "teacher_logits": teacher}
    fn = hinton.make_loss_fn(model, jitter=0, temperature=1.0, alpha=1.0, distil=True)
    loss, aux = fn(params, {}, batch, None, jax.random.PRNGKey(0))
    p = np.exp([3.0, 0, 0]) / np.exp([3.0, 0, 0]).sum()  # KL(p || uniform) = sum p log(3p)
    np.testing.assert_allclose(loss, [0.0, np.sum(p * np.log(3 * p))], rtol=1e-5, atol=1e-6)
    assert aux["accuracy"].shape == (2,)


# --------------------------------------------------------------------------- Zagoruyko & Komodakis helpers


@pytest.mark.parametrize("size,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
def test_conv_patches_matches_lax(size, stride):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    k = jax.random.normal(jax.random.PRNGKey(1), (size, size, 3, 5))
    p = size // 2
    want = jax.lax.conv_general_dilated(x, k, (stride, stride), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(at.conv_patches(x, k, stride), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(at.conv_patches, static_argnums=2)(x, k, stride), want, rtol=1e-4, atol=1e-4)


def test_wrn_features_and_parameter_count():
    model = at.WideResNet(10, 2, 10)
    x = jnp.ones((2, 16, 16, 3))
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # shapes only: the smoke test runs the network
    logits, feats = jax.eval_shape(lambda v_, x_: model.apply(v_, x_, return_features=True), v, x)
    assert logits.shape == (2, 10)
    assert {k: f.shape for k, f in feats.items()} == {
        "group1": (2, 16, 16, 32), "group2": (2, 8, 8, 64), "group3": (2, 4, 4, 128)}
    # WRN-16-1 has 0.175 M parameters (the paper's Table 1 rounds to 0.2 M); no conv biases, as in the WRN code
    shapes = jax.eval_shape(at.WideResNet(16, 1, 10).init, jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
    n = sum(p.size for p in jax.tree_util.tree_leaves(shapes["params"]))
    assert 170_000 < n < 180_000
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(at.WideResNet(12, 1, 10).init, jax.random.PRNGKey(0), x)


def test_attention_term_is_zero_for_equal_maps_and_matches_hand_value():
    f = {g: jax.random.normal(jax.random.PRNGKey(i), (2, 4, 4, 3)) for i, g in enumerate(at.GROUPS)}
    np.testing.assert_allclose(at.attention_term(f, f, beta=1000.0, p=2.0), [0.0, 0.0], atol=1e-6)
    # one hot-spot per map, at different places: each normalized map is a unit basis vector,
    # squared distance 2 per group, divided by h*w = 4, times beta / 2 = 1, over 3 groups: 1.5
    s = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)
    t = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(2.0)
    got = at.attention_term({g: s for g in at.GROUPS}, {g: t for g in at.GROUPS}, beta=2.0, p=2.0)
    np.testing.assert_allclose(got, [1.5], rtol=1e-6)


def test_colour16_paints_digits_in_distinct_colours():
    x = np.zeros((3, 28, 28, 1), np.float32)
    x[:, 8:20, 8:20] = 1.0
    out = at.colour16(x, seed=0)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    bg, fg = out[:, 0, 0], out[:, 8, 8]
    gap = np.abs(fg - bg)
    assert np.all(np.minimum(gap, 1 - gap) >= 0.25 - 1e-5)  # cyclic distance per channel
    np.testing.assert_array_equal(out, at.colour16(x, seed=0))
    with pytest.raises(ValueError, match="grayscale"):
        at.colour16(np.zeros((1, 4, 4, 3)), seed=0)


def test_optimizer_schedule_decays_at_the_given_epochs():
    import ml_collections

    tc = ml_collections.ConfigDict(dict(learning_rate=0.1, decay_epochs=(2, 3), decay_factor=0.2,
                                        weight_decay=0.0, momentum=0.0))
    opt = at.make_optimizer(tc, steps_per_epoch=10)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    steps = []
    for _ in range(35):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        steps.append(-float(updates["w"]))
    np.testing.assert_allclose([steps[0], steps[19], steps[20], steps[29], steps[30]],
                               [0.1, 0.1, 0.02, 0.02, 0.004], rtol=1e-5)


def _at_smoke_config(**train):
    c = table.load_config(os.path.join(EXPERIMENTS, "attention_transfer_cifar10.py"), "smoke")
    c.train.update(dict(crop_pad=0, batch_size=4, **train))
    return c


def test_at_step_freezes_the_state_from_the_first_non_finite_loss_like_the_library():
    """A NaN image makes step 1 bad: from then on step, params, optimizer state and batch statistics stay as
    after step 0, even when the next batch is fine (the library's `train.train_step_fn` rule); `train.fit`
    then stops with `train.NonFiniteError`."""
    from distill_jax import parallel

    c = _at_smoke_config()
    model = at.WideResNet(10, 1, 3)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    y = jnp.array([0, 1, 2, 0])
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)  # eager init of a WRN is slow on CPU
    opt = at.make_optimizer(c.train, steps_per_epoch=10)
    state = train.create_state(variables["params"], opt, key=jax.random.PRNGKey(2),
                               extra={"batch_stats": variables["batch_stats"]})
    step = jax.jit(at.make_step(model, None, opt, c.train, beta=c.at_beta, p=c.at_p))
    good = {"x": x, "y": y}
    bad = {"x": x.at[1, 2, 3, 0].set(jnp.nan), "y": y}
    state, m = step(state, good, None)
    assert np.isfinite(float(m["loss"])) and int(state.step) == 1 and int(state.first_bad_step) == -1
    kept = lambda st: jax.device_get((st.params, st.opt_state, st.extra))  # noqa: E731
    after_good = kept(state)
    for batch in (bad, good):  # the bad step, then a good one that must not resume training
        state, m = step(state, batch, None)
        assert int(state.step) == 1 and int(state.first_bad_step) == 1
        for a, b in zip(jax.tree_util.tree_leaves(kept(state)), jax.tree_util.tree_leaves(after_good)):
            np.testing.assert_array_equal(a, b)
    assert np.isnan(float(step(state, bad, None)[1]["loss"]))
    # through the script's own training loop (train.fit): the run stops with the library's error
    xs = np.array(jax.random.normal(jax.random.PRNGKey(3), (8, 8, 8, 3)))
    xs[5, 0, 0, 0] = np.nan
    with pytest.raises(train.NonFiniteError, match="non-finite at step"):
        at.train_wrn("nan-run", model, xs, np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32), c, parallel.make_mesh())


# --------------------------------------------------------------------------- the smoke variants


def _check_results(workdir, n_rows, paper_values):
    data = json.load(open(os.path.join(workdir, "results.json")))
    assert data["variant"] == "smoke" and len(data["rows"]) == n_rows
    assert [r["paper_value"] for r in data["rows"]][: len(paper_values)] == pytest.approx(paper_values)
    for r in data["rows"]:
        assert np.isfinite(r["ours_value"]) and np.isfinite(r["difference"])
    assert "SCALED DOWN" in open(os.path.join(workdir, "results.md")).read()
    return data


def test_hinton_smoke(tmp_path):
    out = hinton.main(["--smoke", "--workdir", str(tmp_path)])
    data = _check_results(tmp_path, 7, [0.67, 1.46, 0.74, 2.06, 100 * 133 / 1010, 1.09, 100 * 14 / 1010])
    assert out["rows"] == data["rows"]
    assert all(0 <= r["ours_value"] <= 100 for r in data["rows"])


def test_soft_tree_smoke(tmp_path):
    data = _check_results(tmp_path if tree.main(["--smoke", "--workdir", str(tmp_path)]) else None, 3,
                          [99.21, 94.45, 96.76])
    assert set(data["agreement_with_teacher"]) == {"tree-labels", "tree-kd"}


def test_attention_transfer_smoke(tmp_path):
    data = _check_results(tmp_path if at.main(["--smoke", "--workdir", str(tmp_path)]) else None, 4,
                          [6.31, 8.77, 7.93, 0.84])
    rows = {r["result"]: r for r in data["rows"]}
    gain = rows["AT gain (alone - AT)"]["ours_value"]
    assert gain == pytest.approx(rows["student WRN-10-1 alone"]["ours_value"]
                                 - rows["student WRN-10-1 + AT"]["ours_value"])
