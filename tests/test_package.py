"""The installed package: layout, the kernels mapping and the test-session set-up."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp

import xformjax
import xformjax.kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_directory_is_installed_as_a_subpackage():
    assert pathlib.Path(xformjax.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def _imported_modules(path: pathlib.Path) -> list[str]:
    """The absolute module names ``path`` imports."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
    return names


PACKAGE_FILES = list((ROOT / "xformjax").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))


def test_nothing_imports_a_top_level_kernels_package():
    offenders = [
        f"{path}: {name}"
        for path in PACKAGE_FILES
        for name in _imported_modules(path)
        if name.split(".")[0] == "kernels"
    ]
    assert not offenders, offenders


def test_the_package_never_imports_the_repositorys_experiments():
    """A wheel carries no experiments/: nothing installed may need it."""
    offenders = [
        f"{path}: {name}"
        for path in PACKAGE_FILES
        for name in _imported_modules(path)
        if name.split(".")[0] == "experiments"
    ]
    assert not offenders, offenders


def test_ops_never_import_layers_or_above():
    for path in (ROOT / "xformjax" / "ops").rglob("*.py"):
        text = path.read_text()
        for layer in ("xformjax.nn", "xformjax.models", "xformjax.train", "xformjax.data"):
            assert layer not in text, f"{path} imports {layer}"


def test_eight_host_devices_are_available_for_sharding_tests():
    assert jax.device_count() == 8


def test_x64_fixture_enables_float64(x64):
    assert jnp.zeros(1).dtype == jnp.float64


def test_float64_is_off_by_default():
    assert jnp.zeros(1).dtype == jnp.float32
    assert xformjax.__version__


def test_every_subpackage_is_listed_in_pyproject():
    """A non-editable install only ships the packages pyproject lists."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "xformjax").rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
