"""notebooks/quickstart.ipynb: committed without outputs, and run top to bottom in a Jupyter kernel with tiny budgets.

The executed notebook is checked for what it printed, not only that it ran: the model table's accuracies,
agreements and KLs, the deletion AUCs, the verdict (its student must be the one with the highest agreement in
the table), the exact rebuild of the linear student's logits from its templates, and the two inline figures.
The kernel is this interpreter (a kernelspec written for the test), so it imports the distill_jax under test.
"""
import json
import os
import pathlib
import re
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
STUDENTS = ("tree-kd", "tree-labels", "linear-kd", "linear-labels")
AUDITED_METHODS = ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad", "occlusion")
NUMBER = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    cells = _code_cells(nb)
    assert len(cells) >= 6, len(cells)
    for cell in cells:
        source = "".join(cell["source"])
        assert cell["outputs"] == [] and cell["execution_count"] is None, source[:80]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    # the budgets are read from the environment in one early cell, before any training
    quick = next(i for i, c in enumerate(cells) if 'os.environ.get("DISTILL_JAX_NOTEBOOK_QUICK") == "1"' in
                 "".join(c["source"]))
    training = next(i for i, c in enumerate(cells) if "distill.distill(" in "".join(c["source"]))
    assert quick < training, (quick, training)


def _kernel_manager(tmp_path: pathlib.Path):
    """A kernel manager whose only kernelspec runs ipykernel on this interpreter (sys.executable)."""
    from jupyter_client.kernelspec import KernelSpecManager  # an optional test dependency
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "distill-jax-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "distill_jax tests", "language": "python"}))
    return KernelManager(kernel_name="distill-jax-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in _code_cells(nb) for o in c["outputs"] if o["output_type"] == "stream"
                   and o.get("name") == "stdout")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed by nbclient with DISTILL_JAX_NOTEBOOK_QUICK=1 in notebooks/ (any cell error fails)."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install '.[test]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install '.[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits the test set-up of conftest.py (XLA flags, CPU, no compilation cache); matplotlib is left
    # to ipykernel's inline backend so that figures come back as outputs
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(DISTILL_JAX_NOTEBOOK_QUICK="1", JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path_factory.mktemp("jupyter")), timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)
    return nb


def test_notebook_runs_and_prints_computed_results(executed):
    cells = _code_cells(executed)
    assert all(c["execution_count"] is not None for c in cells)
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    text = _stream_text(executed)
    assert "budgets: quick (tests)" in text, text[:500]

    # the model table: teacher accuracy, then every student's accuracy, agreement and KL
    teacher = re.search(rf"^teacher\s+[\d,]+\s+{NUMBER}$", text, re.MULTILINE)
    assert teacher, text
    assert 0.5 < float(teacher.group(1)) <= 1.0, teacher.group(0)  # chance is 0.1: the teacher learned
    table = {}
    for name in STUDENTS:
        row = re.search(rf"^{name}\s+[\d,]+\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", text, re.MULTILINE)
        assert row, (name, text)
        table[name] = dict(zip(("accuracy", "agreement", "kl"), map(float, row.groups())))
        assert 0.0 <= table[name]["accuracy"] <= 1.0 and 0.0 <= table[name]["agreement"] <= 1.0, (name, table)
        assert table[name]["kl"] >= 0.0, (name, table)
    assert max(t["agreement"] for t in table.values()) > 0.3, table

    aucs = re.findall(rf"^deletion AUC, (.+?)\s+{NUMBER}$", text, re.MULTILINE)
    assert len(aucs) == 5 and all(0.0 <= float(v) <= 1.0 for _, v in aucs), aucs

    # the verdict: its two paragraphs, and a student that is the most faithful readable one of the table
    assert "Most faithful readable student: " in text and "Explanation to trust for " in text, text
    chosen = re.search(rf"^verdict: student (\S+), agreement {NUMBER}, method (\S+)$", text, re.MULTILINE)
    assert chosen, text
    name, agreement, method = chosen.group(1), float(chosen.group(2)), chosen.group(3)
    assert name in table and agreement == pytest.approx(table[name]["agreement"], abs=1e-4), (chosen.group(0), table)
    assert agreement == pytest.approx(max(t["agreement"] for t in table.values()), abs=1e-4), table
    assert method in AUDITED_METHODS, method

    # the linear student's templates give back its logits exactly (float32 rounding)
    rebuilt = re.search(rf"differ from its output by at most {NUMBER}$", text, re.MULTILINE)
    assert rebuilt and float(rebuilt.group(1)) < 1e-3, text

    figures = [o for c in cells for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(figures) == 2, [o.get("output_type") for c in cells for o in c["outputs"]]
