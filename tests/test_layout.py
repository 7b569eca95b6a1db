"""The package's layout: layers import only downwards, every public module has `__all__`, every public
function and class has exactly one public import path, no module is longer than 600 lines, and the API
reference builds from the docstrings."""
import ast
import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "distill_jax"

# each subpackage's layer: a module may import from its own layer or the ones below it, never above
LAYERS = {
    "backend": 0, "compilation": 0, "parallel": 0, "checkpoint": 0, "_checks": 0,
    "data": 1, "models": 2, "attr": 3, "metrics": 4, "robust": 4, "analysis": 4,
    "train": 5, "distill": 6, "audit": 7, "app": 8,
}
MAX_LINES = 600


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_subpackage_has_a_layer():
    tops = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops == set(LAYERS)


def test_imports_go_only_downwards():
    upward = []
    for name, path in _modules():
        own = _layer(name)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill_jax"):
                targets = [node.module] if node.module != "distill_jax" else [f"distill_jax.{a.name}" for a in node.names]
                for target in targets:
                    other = _layer(target)
                    if other is not None and other > own:
                        upward.append(f"{name} (layer {own}) imports {target} (layer {other})")
    assert not upward, "\n".join(upward)


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_every_public_module_defines_all_and_its_names_exist():
    for name, _ in _modules():
        if not _is_public(name):
            continue
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names {missing}, which it does not have"


def test_every_public_function_and_class_has_exactly_one_public_path():
    paths: dict[int, list[str]] = {}
    for name, _ in _modules():
        if not _is_public(name):
            continue
        module = importlib.import_module(name)
        for attr in module.__all__:
            value = getattr(module, attr)
            if inspect.isfunction(value) or inspect.isclass(value):
                paths.setdefault(id(value), []).append(f"{name}.{attr}")
    twice = [p for p in paths.values() if len(p) > 1]
    assert not twice, twice
    assert len(paths) > 250  # the library's public surface, listed once each


def test_private_modules_are_not_exported_by_name():
    # a public `__all__` lists functions, classes, constants and public submodules, never a private module
    for name, _ in _modules():
        if _is_public(name):
            module = importlib.import_module(name)
            assert not [n for n in module.__all__ if n.startswith("_")], name


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    out = tmp_path / "api"
    result = subprocess.run([sys.executable, "docs/build_api.py", str(out)], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (out / "distill_jax" / "attr.html").read_text()
    assert "integrated_gradients" in page and "Sundararajan" in page  # the docstring made it to the page
    assert (out / "distill_jax" / "metrics.html").exists() and (out / "index.html").exists()
