"""The `distill-jax` command end to end: the smoke pipeline, its outputs, re-explaining, and bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distill_jax import audit
from distill_jax.app import _explorer, _settings, cli, job
from distill_jax.audit import verdict
from distill_jax.compilation import CompileCounter

STUDENTS = ["cnn-labels", "cnn-kd", "tree-labels", "tree-kd", "linear-labels", "linear-kd", "cnn-kd+attention"]


SMOKE_COMPILES = {}  # filled by the smoke_run fixture: XLA programs compiled by the whole run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    with CompileCounter() as compiles:
        code = cli.main(["run", "--smoke", "--workdir", workdir, "--no-progress"])
    assert code == 0
    SMOKE_COMPILES.update(count=compiles.count, seconds=compiles.seconds)
    with open(os.path.join(workdir, "metrics.json")) as f:
        return workdir, json.load(f)


def test_smoke_run_compiles_each_program_about_once(smoke_run):
    """A count, not a time: 58 XLA programs when measured on the tests' 4 fake devices, and 58 on one device
    (`python benchmarks/startup.py --jobs smoke --no-cache --programs --devices 1` lists them by stage): teacher
    + 7 students, 6 attribution methods on 4 architectures, their metrics and attacks. Students of one
    architecture share one train step (their methods' terms are one loss whose weights, temperature and alpha
    are run-time arguments), one state initialisation and one teacher pass; random draws, read-outs and
    checkpoints compile no program per operation, array shape or device. It was 229 on 4 devices and 144 on one
    before that (orbax sliced every replicated array per shape, and every eager operation compiled), and 447
    on one before the audit asked every model two compiled programs instead of one per method, metric and
    attack. A regression that compiles per student, per model, per method or per batch shape again crosses
    the bound."""
    assert 40 < SMOKE_COMPILES["count"] <= 60, SMOKE_COMPILES


def test_smoke_run_writes_metrics_with_the_documented_layout(smoke_run):
    _, m = smoke_run
    assert m["dataset"] == "digits"
    assert set(m) >= {"dataset", "config", "models", "explanations", "timing_s", "peak_rss_mb", "versions"}
    assert set(m["peak_rss_mb"]) >= {"data", "teacher", *STUDENTS, "explain", "report"}
    assert 0 < m["peak_rss_mb"]["data"] <= m["peak_rss_mb"]["report"]
    assert set(m["models"]) == {"teacher", *STUDENTS}
    assert 0.0 <= m["models"]["teacher"]["accuracy"] <= 1.0 and m["models"]["teacher"]["params"] > 300_000
    for name in STUDENTS:
        s = m["models"][name]
        assert {"accuracy", "agreement", "kl", "method", "params"} <= set(s)
        assert 0 <= s["agreement"] <= 1 and s["kl"] >= 0
        local = s["local_agreement"]  # agreement with the teacher on perturbed copies of the attack sample
        assert set(local) == {"noise", "contrast", "brightness", "cutout", "mean"}
        assert local["mean"] == pytest.approx(np.mean([local[k] for k in ("noise", "contrast", "brightness", "cutout")]))
        assert s["method"] == name.split("-", 1)[1]
        kind, method = name.split("-", 1)
        if method != "labels" and f"{kind}-labels" in STUDENTS:  # the paired comparison with the labels twin
            g = s["vs_labels"]
            assert g["twin"] == f"{kind}-labels"
            assert g["agreement"]["difference"] == pytest.approx(s["agreement"] - m["models"][g["twin"]]["agreement"],
                                                                 abs=1e-6)
            assert g["agreement"]["ci95"][0] <= g["agreement"]["difference"] <= g["agreement"]["ci95"][1]
        else:
            assert "vs_labels" not in s
    for name in ["teacher", *STUDENTS]:
        assert m["explanations"][name]["ig_completeness_error"] >= 0
    assert m["config"]["teacher"]["epochs"] == 1  # the smoke budget


def test_smoke_run_writes_figures_report_and_checkpoints(smoke_run):
    workdir, _ = smoke_run
    for fig in ("saliency.png", "integrated_gradients.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(workdir, "figures", fig)) > 1000
    html = open(os.path.join(workdir, "report.html")).read()
    assert "<table>" in html and 'src="figures/saliency.png"' in html and "cnn-kd" in html
    assert 'id="verdict"' in html and "Most faithful readable student:" in html
    for fig in ("readability.png", "faithfulness.png"):
        assert os.path.getsize(os.path.join(workdir, "figures", fig)) > 10_000
    for name in ["teacher", *STUDENTS]:
        assert os.path.isdir(os.path.join(workdir, "checkpoints", name, "final"))


def test_explain_recomputes_from_checkpoints(smoke_run, capsys):
    workdir, before = smoke_run
    assert cli.main(["explain", "--workdir", workdir]) == 0
    after = json.load(open(os.path.join(workdir, "metrics.json")))
    assert after["models"] == before["models"]
    for name in before["explanations"]:
        assert after["explanations"][name]["ig_completeness_error"] == pytest.approx(
            before["explanations"][name]["ig_completeness_error"], rel=1e-3, abs=1e-6)


# --------------------------------------------------------------------------- explorer.html in a real browser

# what the page shows for the chosen image, read from its elements' data-* attributes and canvases
READ_EXPLORER = """() => {
  const q = (sel) => [...document.querySelectorAll(sel)];
  const pixelsG = (c) => { const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                           return [...d].filter((_, k) => k % 4 === 1); };
  return {
    testIndex: Number(document.getElementById("selected").dataset.testIndex),
    image: pixelsG(document.getElementById("selected-image")),
    predictions: Object.fromEntries(q("#predictions tr[data-model]").map((r) => [r.dataset.model, {
      cls: Number(r.querySelector(".pred").dataset.class), prob: Number(r.querySelector(".prob").dataset.prob),
      accuracy: Number(r.querySelector(".accuracy").dataset.value)}])),
    leaves: Object.fromEntries(q(".leafstrip").map((s) => [s.dataset.model,
      [...s.querySelectorAll("rect")].map((r) => Number(r.dataset.pathProb))])),
    path: Object.fromEntries(q(".tree-svg").map((s) => [s.dataset.model,
      [...s.querySelectorAll(".node.on-path")].map((g) => Number(g.dataset.node))])),
    linear: Object.fromEntries(q(".linear").map((d) => [d.dataset.model, Object.fromEntries(
      [...d.querySelectorAll("tr.logit")].map((r) => [r.dataset.class, Number(r.dataset.value)]))])),
    saliency: Object.fromEntries(q('canvas.map[data-method="saliency"]').map((c) => [c.dataset.model,
      {max: Number(c.dataset.max), scale: Number(c.dataset.scale), g: pixelsG(c)}])),
  };
}"""


def _chromium() -> str:
    """The browser executable, or a one-line skip."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); the explorer's browser test needs one")


def _read_explorer_after_a_click(path: str, image: int, screenshot: str) -> tuple[dict, list[str]]:
    """Opens explorer.html from file:// in headless Chromium, clicks thumbnail `image`, unticks the shared scale
    (each map on its own maximum) and returns what the page shows, and every JavaScript error raised."""
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto("file://" + os.path.abspath(path))
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.click(f'.thumb[data-i="{image}"]')
        page.wait_for_selector(f'#selected[data-i="{image}"]')
        page.screenshot(path=screenshot, full_page=False)
        page.uncheck("#shared-scale")
        shown = page.evaluate(READ_EXPLORER)
        browser.close()
    return shown, errors


def test_explorer_in_a_browser_matches_the_saved_models(smoke_run, tmp_path):
    """Click an image in explorer.html: its predicted classes and probabilities, each soft tree's leaf path
    probabilities and path, the linear students' logits and the saliency maps are the saved checkpoints' (1e-4)."""
    workdir, metrics = smoke_run
    _chromium()
    screenshot = os.environ.get("DISTILL_JAX_EXPLORER_SCREENSHOT") or str(tmp_path / "explorer.png")
    shown, errors = _read_explorer_after_a_click(os.path.join(workdir, "explorer.html"), 3, screenshot)
    assert errors == []
    assert os.path.getsize(screenshot) > 10_000
    _, trained, prep, _ = job.load_trained(workdir)
    index = shown["testIndex"]
    x, label = prep.inputs(prep.x_test[index : index + 1]), int(prep.y_test[index])
    np.testing.assert_array_equal(shown["image"], _explorer.display_pixels(np.asarray(x))[..., 0].ravel())
    assert set(shown["predictions"]) == {t.name for t in trained}
    for t in trained:
        probs = np.asarray(jax.nn.softmax(t.apply_fn(x)[0]))
        seen = shown["predictions"][t.name]
        assert seen["cls"] == int(probs.argmax()) and seen["prob"] == pytest.approx(float(probs.max()), abs=1e-4)
        assert seen["accuracy"] == pytest.approx(metrics["models"][t.name]["accuracy"])
        if t.kind == "tree":
            routes = audit.tree_routes(t.model, t.variables, x)
            np.testing.assert_allclose(shown["leaves"][t.name], routes["path_probs"][0], atol=1e-4)
            node, path = 0, []
            while node < len(routes["routing"][0]):
                path.append(node)
                node = 2 * node + 1 + int(routes["routing"][0][node] > 0.5)
            assert sorted(shown["path"][t.name]) == path  # breadth-first ids grow along a path
        if t.kind == "linear":
            logits = np.asarray(t.apply_fn(x)[0])
            np.testing.assert_allclose([shown["linear"][t.name][str(k)] for k in range(len(logits))], logits,
                                       atol=1e-4)
        saliency = np.abs(audit.attribution_maps(t.model, t.variables, x, jax.numpy.asarray([label]),
                                                 methods=("saliency",), ig_steps=1, smoothgrad_samples=1,
                                                 key=jax.random.PRNGKey(0))["saliency"][0]).sum(-1)
        seen = shown["saliency"][t.name]
        assert seen["max"] == pytest.approx(float(saliency.max()), rel=1e-3) and seen["scale"] == seen["max"]
        expected_g = 255 - np.round(255 * np.round(255 * saliency / saliency.max()) / 255)
        assert np.abs(np.asarray(seen["g"]) - expected_g.ravel()).max() <= 2  # the page's white-to-red scale
    assert len(shown["leaves"]) == 2 and len(shown["linear"]) == 2  # tree-labels, tree-kd; linear-labels, -kd


# --------------------------------------------------------------------------- bad input
#
# Every case ends in one line `distill-jax: error: ...` naming the problem, exit status 2, and nothing
# written. All but the checkpoint cases fail during validation, before any training. The table is
# published in docs/bad-input.md (a test below keeps the two in step).


def _npz(path, **changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((20, 8, 8, 1)).astype(np.float32), "y_train": np.arange(20) % 2,
              "x_test": rng.random((6, 8, 8, 1)).astype(np.float32), "y_test": np.arange(6) % 2}
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return str(path)


def _image(path, seed=0):
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Broken inputs of every kind, made once: name -> path."""
    d = tmp_path_factory.mktemp("bad_input")
    f = {"dir": str(d)}
    good = _npz(d / "good.npz")
    raw = open(good, "rb").read()
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    f["truncated.npz"] = str(d / "truncated.npz")
    f["wrong_keys.npz"] = _npz(d / "wrong_keys.npz", x_test=None, images=np.zeros((6, 8, 8, 1), np.float32))
    x_nan = np.random.default_rng(1).random((20, 8, 8, 1)).astype(np.float32)
    x_nan[3, 4, 4, 0] = np.nan
    f["nan.npz"] = _npz(d / "nan.npz", x_train=x_nan)
    objects = np.empty(20, dtype=object)
    f["pickled.npz"] = _npz(d / "pickled.npz", y_train=objects)
    f["length.npz"] = _npz(d / "length.npz", y_train=np.arange(19) % 2)
    f["flat.npz"] = _npz(d / "flat.npz", x_train=np.zeros((20, 8), np.float32))
    f["negative_labels.npz"] = _npz(d / "negative_labels.npz", y_train=np.arange(20) % 2 - 1)
    for name in ("empty_folder", "empty_class/a", "empty_class/b", "bad_image/a", "bad_image/b"):
        os.makedirs(d / name, exist_ok=True)
    for cls in "ab":
        for i in range(3):
            _image(d / "bad_image" / cls / f"{i}.png", seed=i)
    (d / "bad_image" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for kind, body in (("idx_garbage", lambda nd: b"garbage, not IDX"),
                       ("idx_truncated", lambda nd: bytes([0, 0, 8, nd]) + (100).to_bytes(4, "big") * nd + b"\1" * 10)):
        os.makedirs(d / kind)
        for name in IDX_FILES:
            (d / kind / name).write_bytes(body(3 if "images" in name else 1))
    configs = {"syntax.py": "def get_config(:\n    pass\n", "no_get_config.py": "x = 1\n",
               "raises.py": "def get_config():\n    raise RuntimeError('boom')\n",
               "imports.py": "import no_such_module_for_distill_jax\n",
               "returns_dict.py": "def get_config():\n    return {'dataset': 'digits'}\n"}
    for name, text in configs.items():
        (d / name).write_text(text)
        f[name] = str(d / name)
    (d / "a_file").write_text("")
    f["a_file"] = str(d / "a_file")
    return f


# (case id, arguments of `distill-jax run --smoke` given the broken inputs, what the one line must contain)
RUN_CASES = [
    # data: every loader
    ("data-unknown-spec", lambda f: ["--dataset", "imagenet-please"], "unknown dataset spec 'imagenet-please'"),
    ("data-unknown-kind", lambda f: ["--dataset", "nope:x"], "unknown dataset spec 'nope:x'"),
    ("digits-with-argument", lambda f: ["--dataset", "digits:5"], "unknown dataset spec 'digits:5'"),
    ("npz-no-path", lambda f: ["--dataset", "npz:"], "npz spec needs a path"),
    ("npz-missing", lambda f: ["--dataset", f"npz:{f['dir']}/nothing.npz"], "nothing.npz' does not exist"),
    ("npz-truncated", lambda f: ["--dataset", f"npz:{f['truncated.npz']}"], "truncated.npz' cannot be read"),
    ("npz-wrong-keys", lambda f: ["--dataset", f"npz:{f['wrong_keys.npz']}"], "lacks arrays ['x_test']"),
    ("npz-nan", lambda f: ["--dataset", f"npz:{f['nan.npz']}"], "x_train has 1 NaN or inf values"),
    ("npz-pickled", lambda f: ["--dataset", f"npz:{f['pickled.npz']}"], "holds object (pickled) arrays"),
    ("npz-length-mismatch", lambda f: ["--dataset", f"npz:{f['length.npz']}"],
     "x_train has 20 examples but y_train has 19"),
    ("npz-not-images", lambda f: ["--dataset", f"npz:{f['flat.npz']}"], "x_train must be images"),
    ("npz-negative-labels", lambda f: ["--dataset", f"npz:{f['negative_labels.npz']}"], "y_train has labels in [-1, 0]"),
    ("folder-missing", lambda f: ["--dataset", f"folder:{f['dir']}/no_such_folder"], "no_such_folder' does not exist"),
    ("folder-empty", lambda f: ["--dataset", f"folder:{f['dir']}/empty_folder"], "has no class sub-folders"),
    ("folder-empty-class", lambda f: ["--dataset", f"folder:{f['dir']}/empty_class"], "empty_class/a' has no images"),
    ("folder-corrupt-image", lambda f: ["--dataset", f"folder:{f['dir']}/bad_image"], "cannot read image"),
    ("idx-no-directory", lambda f: ["--dataset", "idx:"], "idx spec needs a directory"),
    ("idx-missing", lambda f: ["--dataset", "idx:/nonexistent/dir"], "train-images-idx3-ubyte"),
    ("idx-corrupt", lambda f: ["--dataset", f"idx:{f['dir']}/idx_garbage"], "does not start with an IDX magic number"),
    ("idx-truncated", lambda f: ["--dataset", f"idx:{f['dir']}/idx_truncated"], "the file is truncated"),
    ("fashion-mnist-missing", lambda f: ["--dataset", "fashion_mnist", "--set", "data_dir=/nonexistent/dir"],
     "apt-get install dataset-fashion-mnist"),
    ("fashion-mnist-corrupt", lambda f: ["--dataset", "fashion_mnist", "--set", f"data_dir={f['dir']}/idx_garbage"],
     "does not start with an IDX magic number"),
    ("tfds-no-name", lambda f: ["--dataset", "tfds:"], "tfds spec needs a dataset name"),
    ("tfds-unknown", lambda f: ["--dataset", "tfds:no_such_dataset_xyz"], "not known to tensorflow-datasets"),
    # config files
    ("config-missing", lambda f: ["--config", "/nonexistent/config.py"], "does not exist"),
    ("config-directory", lambda f: ["--config", f["dir"]], "is a directory"),
    ("config-syntax-error", lambda f: ["--config", f["syntax.py"]], "has a syntax error at line 1"),
    ("config-no-get-config", lambda f: ["--config", f["no_get_config.py"]], "has no get_config() function"),
    ("config-get-config-raises", lambda f: ["--config", f["raises.py"]],
     "get_config() failed: RuntimeError: boom (line 2)"),
    ("config-import-fails", lambda f: ["--config", f["imports.py"]], "failed to run: ModuleNotFoundError"),
    ("config-not-a-configdict", lambda f: ["--config", f["returns_dict.py"]], "returned dict, not an ml_collections"),
    # --set values
    ("set-no-equals", lambda f: ["--set", "tree.depth"], "write KEY=VALUE"),
    ("set-unknown-group", lambda f: ["--set", "no.such=1"], "no group 'no'"),
    ("set-unknown-key", lambda f: ["--set", "teacher.nope=1"], "no key 'teacher.nope'"),
    ("set-into-a-value", lambda f: ["--set", "seed.x=1"], "no group 'seed'"),
    ("set-wrong-type", lambda f: ["--set", "tree.depth=abc"], "--set 'tree.depth=abc'"),
    ("set-float-for-int", lambda f: ["--set", "seed=1.5"], "--set 'seed=1.5'"),
    ("set-int-for-tuple", lambda f: ["--set", "mlp.hidden=5"], "--set 'mlp.hidden=5'"),
    ("set-temperature-zero", lambda f: ["--set", "method.temperature=0"], "method.temperature=0"),
    ("set-alpha-above-1", lambda f: ["--set", "method.alpha=1.5"], "method.alpha=1.5"),
    ("set-temperature-a-word", lambda f: ["--set", "method.temperature=hot"], "method.temperature='hot'"),
    ("set-mixup-with-label-terms", lambda f: ["--set", "method.mixup=0.4", "--set", "students=cnn-kd"],
     "mixup makes images whose labels are undefined"),
    ("set-mixup-negative", lambda f: ["--set", "method.mixup=-1.0"], "method.mixup=-1.0"),
    ("set-transfer-fraction", lambda f: ["--set", "transfer.unlabelled_fraction=1.0"], "transfer.unlabelled_fraction"),
    ("transfer-split-not-tfds", lambda f: ["--set", "transfer.split=unlabelled"],
     "transfer_split='unlabelled' names a tfds split"),
    ("set-dp-delta", lambda f: ["--set", "teacher.dp_delta=1.5"], "teacher.dp_delta=1.5"),
    ("set-dp-sampling", lambda f: ["--set", "teacher.dp_sampling=uniform"], "teacher.dp_sampling='uniform'"),
    ("adversarial-tree-student", lambda f: ["--set", "student.adversarial=pgd", "--set", "students=tree-kd"],
     "adversarial training is supported for"),
    ("set-auto-score-unknown", lambda f: ["--set", "method.auto_score=loss"], "method.auto_score='loss'"),
    ("set-auto-temperatures-zero", lambda f: ["--set", "method.auto_temperatures=(0.0, 2.0)"],
     "method.auto_temperatures=(0.0, 2.0)"),
    ("set-tree-depth-zero", lambda f: ["--set", "tree.depth=0"], "tree.depth=0"),
    ("set-tree-depth-too-deep", lambda f: ["--set", "tree.depth=13"], "tree.depth=13"),
    ("set-batch-size-zero", lambda f: ["--set", "teacher.batch_size=0"], "teacher.batch_size=0"),
    ("set-batch-size-negative", lambda f: ["--set", "student.batch_size=-3"], "student.batch_size=-3"),
    ("set-batch-size-not-multiple-of-devices", lambda f: ["--set", "teacher.batch_size=6"],
     "batch_size=6 must be a positive multiple of the 4 devices"),
    ("set-epochs-zero", lambda f: ["--set", "teacher.epochs=0"], "teacher.epochs=0"),
    ("set-train-limit-negative", lambda f: ["--set", "train_limit=-1"], "train_limit=-1"),
    ("set-cache-limit-negative", lambda f: ["--set", "method.cache_limit_mb=-1"], "method.cache_limit_mb=-1"),
    ("set-test-fraction-above-1", lambda f: ["--set", "test_fraction=1.5"], "test_fraction=1.5"),
    ("set-ig-steps-zero", lambda f: ["--set", "explain.ig_steps=0"], "explain.ig_steps=0"),
    ("set-dp-tree-with-balance", lambda f: ["--set", "students=tree-kd", "--set", "student.dp_noise_multiplier=1.0"],
     "method.tree_balance=0.1 is out of range: must be 0 for the DP-SGD soft tree 'tree-kd'"),
    ("set-auto-under-dp", lambda f: ["--set", "students=cnn-kd", "--set", "student.dp_noise_multiplier=1.0", "--set",
                                     "method.alpha=auto"], "method.alpha='auto' is out of range: not for the DP-SGD student"),
    ("set-no-explain-methods", lambda f: ["--set", "explain.methods=()"], "explain.methods=() is out of range"),
    ("set-checkpoint-every-negative", lambda f: ["--set", "checkpoint_every=-5"], "checkpoint_every=-5"),
    ("set-keep-checkpoints-zero", lambda f: ["--set", "keep_checkpoints=0"], "keep_checkpoints=0"),
    ("set-smoothgrad-samples-zero", lambda f: ["--set", "explain.smoothgrad_samples=0"], "explain.smoothgrad_samples=0"),
    ("set-momentum-one", lambda f: ["--set", "teacher.momentum=1.0"], "teacher.momentum=1.0"),
    ("set-mlp-hidden-zero", lambda f: ["--set", "mlp.hidden=(0,)"], "mlp.hidden=(0,)"),
    ("set-unknown-student", lambda f: ["--set", "students=foo-bar"], "'foo-bar' must be '<kind>-<method>'"),
    ("set-no-students", lambda f: ["--set", "students="], "students is empty"),
    ("set-bad-attention-pairs", lambda f: ["--set", "method.attention_pairs=conv1"],
     "each pair must be 'student_layer:teacher_layer'"),
    ("set-unknown-optimizer", lambda f: ["--set", "teacher.optimizer=lion"], "optimizer 'lion' is not known"),
    ("set-unknown-schedule", lambda f: ["--set", "teacher.schedule=linear"], "schedule 'linear' is not known"),
    ("set-unknown-student-optimizer", lambda f: ["--set", "student.optimizer=lion"], "student.optimizer 'lion' is not known"),
    ("set-unknown-teacher-kind", lambda f: ["--set", "teacher.kind=resnet"], "teacher.kind 'resnet' is not known"),
    ("set-unknown-explain-method", lambda f: ["--set", "explain.methods=('saliency','deep_lift')"],
     "explain.methods 'deep_lift' is not known"),
    # the rest of the command line
    ("seed-not-an-int", lambda f: ["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    ("unknown-option", lambda f: ["--epochs", "3"], "unrecognized arguments: --epochs 3"),
    ("process-id-out-of-range", lambda f: ["--num-processes", "2", "--process-id", "2"],
     "--process-id 2: must be in [0, --num-processes=2)"),
    ("coordinator-not-host-port", lambda f: ["--coordinator", "localhost"], "write HOST:PORT"),
    ("coordinator-without-process-count", lambda f: ["--coordinator", "127.0.0.1:1234"],
     "--coordinator needs --num-processes and --process-id"),
    ("compilation-cache-under-a-file", lambda f: ["--compilation-cache", f["a_file"] + "/cache"],
     "--compilation-cache"),
]


def _files_under(path):
    return sorted(os.path.relpath(os.path.join(root, name), path) for root, _, files in os.walk(path) for name in files)


def _one_line(code, capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err[-20:])
    assert len(err) == 1 and err[0].startswith("distill-jax: error: ") and needle in err[0], err
    return err[0]


@pytest.mark.parametrize("case,extra,needle", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_input_exits_2_with_one_line_before_anything_is_written(case, extra, needle, bad, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["run", "--smoke", "--workdir", str(workdir), "--no-progress", *extra(bad)])
    _one_line(code, capsys, needle)
    assert not os.path.exists(workdir) or _files_under(workdir) == []


def test_no_command_is_one_line(capsys):
    _one_line(cli.main([]), capsys, "the following arguments are required: command")


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = cli.main(["run", "--smoke", "--workdir", str(blocker / "run"), "--no-progress"])
    _one_line(code, capsys, "not writable")


def test_workdir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    _one_line(cli.main(["run", "--smoke", "--workdir", str(blocker), "--no-progress"]), capsys, "is a file")
    assert blocker.read_text() == "keep me"


# ---- a finished run's workdir: checkpoints from another config, corrupt ones, and `explain`


def _saved(workdir):
    """What a refused command must leave as it was: the bytes of every train-state checkpoint, metrics,
    history and figures, and the values in every final checkpoint (orbax may rewrite those files)."""
    out = {}
    for rel in _files_under(workdir):
        if "/final/" not in rel and not rel.startswith("report"):
            with open(os.path.join(workdir, rel), "rb") as f:
                out[rel] = f.read()
    for model in os.listdir(os.path.join(workdir, "checkpoints")):
        with ocp.StandardCheckpointer() as ckptr:
            values = ckptr.restore(os.path.join(workdir, "checkpoints", model, "final"))
        out[f"{model}/final"] = [np.asarray(v).tobytes() for v in jax.tree_util.tree_leaves(values)]
    return out


@pytest.fixture
def finished(smoke_run, tmp_path):
    """A copy of the smoke run's workdir (8 models trained, metrics.json written) and what it holds."""
    workdir = str(tmp_path / "finished")
    shutil.copytree(smoke_run[0], workdir)
    return workdir, _saved(workdir)


def _steps(workdir, model):
    state = os.path.join(workdir, "checkpoints", model, "state")
    return sorted(int(p) for p in os.listdir(state) if p.isdigit())


def test_resume_after_tree_depth_changed_stops_naming_the_tree_parameters(finished, capsys):
    """Before: every restore error was swallowed, the tree student trained again from step 0, and its new
    checkpoints were dropped because the old run's steps already existed."""
    workdir, before = finished
    code = cli.main(["run", "--smoke", "--resume", "--workdir", workdir, "--no-progress",
                     "--set", "students=tree-labels", "--set", "tree.depth=2"])
    line = _one_line(code, capsys, os.path.join(workdir, "checkpoints", "tree-labels", "state"))
    assert "was saved by another configuration" in line
    assert re.search(r"parameter \['params'\]\['model'\]\[.+\] has shape \(\d+(, \d+)*\) there and \(\d+(, \d+)*\) "
                     r"in this model", line), line
    assert "resume with the configuration it was saved with, or run this one in another --workdir" in line
    assert _saved(workdir) == before


def test_resume_after_teacher_kind_changed_stops_before_training(finished, capsys):
    workdir, before = finished
    code = cli.main(["run", "--smoke", "--resume", "--workdir", workdir, "--no-progress",
                     "--set", "teacher.kind=cnn", "--set", "students=cnn-labels"])
    line = _one_line(code, capsys, os.path.join(workdir, "checkpoints", "teacher", "state"))
    assert "is missing from the checkpoint" in line or "is not in this model" in line
    assert _saved(workdir) == before


def test_resume_from_a_corrupt_checkpoint_names_the_step_and_deletes_nothing(finished, capsys):
    workdir, _ = finished
    state = os.path.join(workdir, "checkpoints", "teacher", "state")
    step = _steps(workdir, "teacher")[-1]
    for root, _, files in os.walk(os.path.join(state, str(step))):
        for name in files:
            if name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\x5a" * 64)
    before = {rel: open(os.path.join(workdir, rel), "rb").read() for rel in _files_under(workdir)}
    code = cli.main(["run", "--smoke", "--resume", "--workdir", workdir, "--no-progress", "--set", "students=cnn-labels"])
    _one_line(code, capsys, f"the checkpoint at step {step} in {state} cannot be read")
    assert {rel: open(os.path.join(workdir, rel), "rb").read() for rel in _files_under(workdir)} == before


def test_resume_when_the_checkpoint_directory_is_a_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "teacher").mkdir(parents=True)
    (workdir / "checkpoints" / "teacher" / "state").write_text("not a directory")
    code = cli.main(["run", "--smoke", "--resume", "--workdir", str(workdir), "--no-progress",
                     "--set", "students=cnn-labels", "--set", "teacher.kind=cnn"])
    _one_line(code, capsys, "teacher/state cannot be used (it is a file")
    assert (workdir / "checkpoints" / "teacher" / "state").read_text() == "not a directory"


def test_a_fresh_run_in_a_workdir_with_checkpoints_is_refused(finished, capsys):
    """Without --resume it would overwrite the final models and mix its states with the earlier run's."""
    workdir, before = finished
    code = cli.main(["run", "--smoke", "--workdir", workdir, "--no-progress"])
    _one_line(code, capsys, "already holds the checkpoints of an earlier run")
    assert _saved(workdir) == before


def test_explain_without_a_run(tmp_path, capsys):
    missing = tmp_path / "never_ran"
    _one_line(cli.main(["explain", "--workdir", str(missing)]), capsys, "does not exist: there is no run to explain")
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    _one_line(cli.main(["explain", "--workdir", str(tmp_path / "empty")]), capsys, "no finished run in")


def test_explain_with_a_damaged_metrics_json(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text('{"config": {"data')
    _one_line(cli.main(["explain", "--workdir", str(tmp_path)]), capsys, "metrics.json cannot be read")
    (tmp_path / "metrics.json").write_text('{"models": {}}')
    _one_line(cli.main(["explain", "--workdir", str(tmp_path)]), capsys, "holds no run configuration")


def test_explain_with_a_missing_model_checkpoint(finished, capsys):
    workdir, _ = finished
    shutil.rmtree(os.path.join(workdir, "checkpoints", "teacher", "final"))
    _one_line(cli.main(["explain", "--workdir", workdir]), capsys, "no saved model at")


def test_explain_with_a_corrupt_model_checkpoint(finished, capsys):
    workdir, _ = finished
    final = os.path.join(workdir, "checkpoints", "teacher", "final")
    for root, _, files in os.walk(final):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x5a" * 64)
    _one_line(cli.main(["explain", "--workdir", workdir]), capsys, f"the model saved at {final} cannot be read")


def test_explain_with_a_config_that_does_not_match_the_checkpoints(finished, capsys):
    workdir, before = finished
    path = os.path.join(workdir, "metrics.json")
    metrics = json.load(open(path))
    metrics["config"]["teacher"]["kind"] = "cnn"
    with open(path, "w") as f:
        json.dump(metrics, f)
    _one_line(cli.main(["explain", "--workdir", workdir]), capsys, "has another architecture: parameter")
    assert {k: v for k, v in _saved(workdir).items() if k != "metrics.json"} == \
        {k: v for k, v in before.items() if k != "metrics.json"}


def test_docs_list_every_bad_input_case():
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "bad-input.md")).read()
    ids = [c[0] for c in RUN_CASES] + DOCUMENTED_ELSEWHERE
    assert len(set(ids)) == len(ids) >= 40
    missing = [i for i in ids if f"`{i}`" not in doc]
    assert not missing, f"docs/bad-input.md lacks {missing}"


# the cases with a test of their own above, as docs/bad-input.md names them
DOCUMENTED_ELSEWHERE = ["no-command", "workdir-unwritable", "workdir-is-a-file", "resume-tree-depth-changed",
                        "resume-teacher-kind-changed", "resume-corrupt-checkpoint", "resume-checkpoint-dir-is-a-file",
                        "fresh-run-over-a-finished-run", "explain-no-run", "explain-empty-workdir",
                        "explain-damaged-metrics", "explain-metrics-without-config", "explain-missing-checkpoint",
                        "explain-corrupt-checkpoint", "explain-config-mismatch"]


# ---- errors that are not the user's: a bug keeps its traceback, says so, and exits 1


def _jax_internal_value_error(*args, **kwargs):
    import jax.numpy as jnp

    return jnp.stack([jnp.zeros(2), jnp.zeros(3)])  # raises ValueError inside jax


@pytest.mark.parametrize("failure", [_jax_internal_value_error, lambda *a, **k: {}["missing"],
                                     lambda *a, **k: None + 1])
def test_an_internal_error_keeps_its_traceback_says_it_is_a_bug_and_exits_1(failure, tmp_path, capsys, monkeypatch):
    """Before: a ValueError from inside JAX printed one line as if the input were wrong (exit 2), and other
    exceptions escaped main() altogether."""
    from distill_jax.app import cli

    monkeypatch.setattr(job, "run", failure)
    code = cli.main(["run", "--smoke", "--workdir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("distill-jax: internal error (") and "this is a bug in distill_jax 0.1.0" in last
    assert "please report it" in last and cli.REPORT_BUGS_TO in last


def test_a_value_error_raised_by_distill_jax_itself_is_the_users(tmp_path, capsys, monkeypatch):
    from distill_jax.app import cli

    def invalid(*args, **kwargs):

        _settings.parse_students("cnn-labels,oops")

    monkeypatch.setattr(job, "run", invalid)
    code = cli.main(["run", "--smoke", "--workdir", str(tmp_path), "--no-progress"])
    _one_line(code, capsys, "'oops' must be '<kind>-<method>'")


VERDICT_RESULT = {
    "dataset": "digits", "config": {"tree": {"depth": 2}},
    "models": {"teacher": {"accuracy": 0.9, "params": 1000},
               "tree-kd": {"accuracy": 0.7, "params": 50, "agreement": 0.75, "kl": 0.3},
               "linear-kd": {"accuracy": 0.6, "params": 40, "agreement": 0.65, "kl": 0.2}},
    "explanations": {"tree-kd": {"saliency": {"deletion_auc": 0.2}, "grad_x_input": {"deletion_auc": 0.1}}},
    "explanation_ranking": {"tree-kd": {"saliency": {"ranks": {"deletion_auc": 2}, "mean_rank": 2.0},
                                        "grad_x_input": {"ranks": {"deletion_auc": 1}, "mean_rank": 1.0}}},
}


@pytest.mark.parametrize("command", ["run", "explain"])
def test_run_and_explain_end_by_printing_the_reports_verdict(command, tmp_path, capsys, monkeypatch):
    from distill_jax.app import cli

    workdir = str(tmp_path / "w")
    if command == "run":
        monkeypatch.setattr(job, "run", lambda c, workdir, **kw: VERDICT_RESULT)
        code = cli.main(["run", "--smoke", "--workdir", workdir, "--no-progress", "--no-compilation-cache"])
    else:
        os.makedirs(workdir)
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(VERDICT_RESULT, f)
        monkeypatch.setattr(job, "explain_from_checkpoints", lambda workdir: VERDICT_RESULT)
        code = cli.main(["explain", "--workdir", workdir, "--no-compilation-cache"])
    out = capsys.readouterr().out
    assert code == 0
    text = verdict.as_text(verdict.decide(VERDICT_RESULT))
    assert out.endswith(f"\n\n{text}\n")
    assert "Most faithful readable student: tree-kd (soft decision tree, depth 2, 50 parameters)" in out
    assert "Explanation to trust for tree-kd: grad_x_input" in out


def test_the_verdict_of_a_run_without_explanations_is_printed_not_raised(tmp_path, capsys, monkeypatch):
    """A run whose explanation stage produced nothing (as multi-host TRAIN_ONLY runs do) still ends cleanly."""
    from distill_jax.app import cli

    bare = {"models": VERDICT_RESULT["models"]}
    monkeypatch.setattr(job, "run", lambda c, workdir, **kw: bare)
    code = cli.main(["run", "--smoke", "--workdir", str(tmp_path), "--no-progress", "--no-compilation-cache"])
    out = capsys.readouterr().out
    assert code == 0 and "Explanation: none to recommend" in out


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "distill_jax.app.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_real_process_exit_status_and_no_traceback(tmp_path):
    proc = _cli("run", "--smoke", "--workdir", str(tmp_path), "--dataset", "nope:x")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "nope:x" in err


def test_ctrl_c_exits_cleanly_and_keeps_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    proc = _cli("run", "--workdir", str(workdir), "--no-progress", "--set", "checkpoint_every=5",
                "--set", "teacher.epochs=200")
    state_dir = workdir / "checkpoints" / "teacher" / "state"
    deadline = time.time() + 240
    while time.time() < deadline and not (state_dir.is_dir() and any(p.name.isdigit() for p in state_dir.iterdir())):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    steps = sorted(int(p.name) for p in state_dir.iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 5  # checkpoints written before the interrupt are kept


# ---- the persistent compilation cache: on by default, in the user's cache directory


def _cache_args(*argv):
    return cli.build_parser().parse_args(["run", *argv])


def test_compilation_cache_defaults_to_the_users_cache_dir(tmp_path, monkeypatch):
    import jax

    monkeypatch.delenv("DISTILL_JAX_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("DISTILL_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this test process's JAX alone
    assert cli.setup_compilation_cache(_cache_args()) == str(tmp_path / "xdg" / "distill_jax" / "xla")
    assert os.path.isdir(tmp_path / "xdg" / "distill_jax" / "xla")
    monkeypatch.setenv("DISTILL_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert cli.setup_compilation_cache(_cache_args()) == str(tmp_path / "mine")
    assert cli.setup_compilation_cache(_cache_args("--compilation-cache", str(tmp_path / "flag"))) == str(tmp_path / "flag")
    assert cli.setup_compilation_cache(_cache_args("--no-compilation-cache")) is None
    monkeypatch.setenv("DISTILL_JAX_COMPILATION_CACHE", "off")
    assert cli.setup_compilation_cache(_cache_args()) is None
    assert cli.setup_compilation_cache(_cache_args("--compilation-cache", str(tmp_path / "flag"))) == str(tmp_path / "flag")


def test_an_unusable_default_cache_dir_only_warns(tmp_path, monkeypatch, capsys):
    import jax

    monkeypatch.delenv("DISTILL_JAX_COMPILATION_CACHE", raising=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DISTILL_JAX_CACHE_DIR", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    assert cli.setup_compilation_cache(_cache_args()) is None
    assert "warning: no compilation cache" in capsys.readouterr().err
