"""Every notebook in ``experiments/notebooks`` executes without an error.

Each notebook runs in a fresh IPython kernel on this interpreter (``sys.executable``,
so the kernel sees the same environment and the installed xformjax), in a temporary
working directory, with ``XFORMJAX_NOTEBOOK_SMOKE=1``: the notebooks read it to cut
their step counts, so a run checks that every cell works, not what it learns.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))

#: text each notebook must print somewhere (notebooks not listed: only "no error")
EXPECTED_OUTPUT = {
    "quickstart.ipynb": ["chunked and step-by-step logits agree", "validation bits per byte"],
    "state_tracking.ipynb": ["DeltaNet [−1, 1]", "test acc, prefixes 41–256"],
}

#: seconds one cell may run before the test fails
CELL_TIMEOUT = 600


def kernel_manager(directory: pathlib.Path) -> AsyncKernelManager:
    """A kernel manager whose ``python3`` kernel is this interpreter, whatever
    kernelspecs the user's or the system's Jupyter directories hold."""
    kernels = directory / "kernels"
    spec_dir = kernels / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (xformjax tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def outputs_text(notebook) -> str:
    """Everything the code cells printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("execute_result", "display_data"):
                parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_notebooks_are_found():
    assert NOTEBOOKS, "no notebooks under experiments/notebooks"


def setup_cell(path: pathlib.Path) -> str:
    """A notebook's first code cell: the one that installs xformjax."""
    notebook = nbformat.read(path, as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code")


def test_every_notebook_starts_with_the_same_setup_cell():
    assert len({setup_cell(path) for path in NOTEBOOKS}) == 1


@pytest.fixture
def setup(monkeypatch, tmp_path):
    """The setup cell's namespace, in a runtime with no accelerator (an empty PATH
    but for the directory ``tmp_path/bin``, no TPU variables)."""
    for name in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    namespace: dict = {}
    exec(compile(setup_cell(NOTEBOOKS[0]), "setup cell", "exec"), namespace)
    return namespace


def fake_nvidia_smi(directory: pathlib.Path, cuda: str) -> None:
    script = directory / "nvidia-smi"
    script.write_text(
        f"#!/bin/sh\necho '| NVIDIA-SMI 580.65  Driver Version: 580.65  CUDA Version: {cuda}  |'\n"
    )
    script.chmod(0o755)


def test_setup_cell_installs_from_the_checkout_or_the_package_index(setup, tmp_path):
    assert setup["checkout_root"](ROOT / "experiments" / "notebooks") == ROOT
    assert setup["checkout_root"](tmp_path) is None
    assert setup["requirement"](ROOT / "experiments" / "notebooks") == f"{ROOT}[train]"
    assert setup["requirement"](tmp_path) == "xformjax[train]"


@pytest.mark.parametrize("cuda, extra", [("12.4", "cuda12"), ("13.0", "cuda13")])
def test_setup_cell_picks_the_cuda_extra_by_the_driver(setup, tmp_path, cuda, extra):
    fake_nvidia_smi(tmp_path / "bin", cuda)
    assert setup["accelerator_extra"]() == extra
    assert setup["requirement"](tmp_path) == f"xformjax[train,{extra}]"


def test_setup_cell_picks_the_tpu_extra_on_a_tpu_runtime(setup, monkeypatch, tmp_path):
    assert setup["accelerator_extra"]() is None
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    assert setup["requirement"](tmp_path) == "xformjax[train,tpu]"


def test_setup_cell_runs_pip_only_where_xformjax_is_missing(setup, monkeypatch):
    import importlib.util
    import subprocess

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **_: commands.append(command))
    cell = setup_cell(NOTEBOOKS[0])
    exec(compile(cell, "setup cell", "exec"), {})
    assert commands == []  # importable here: nothing to install
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "xformjax" else find_spec(name, *a),
    )
    monkeypatch.chdir(ROOT / "experiments" / "notebooks")
    exec(compile(cell, "setup cell", "exec"), {})
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", f"{ROOT}[train]"]]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: commit notebooks with their outputs cleared"
            )

    workdir = tmp_path / "run"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        notebook,
        km=kernel_manager(tmp_path),
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    # the notebook sees the machine as a user would: without conftest's 8 host devices
    xla_flags = " ".join(
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    env = {**os.environ, "XFORMJAX_NOTEBOOK_SMOKE": "1", "XLA_FLAGS": xla_flags}
    # raises CellExecutionError (naming the cell and its traceback) on the first error;
    # cleanup_kc: shut the kernel down afterwards even though we made its manager
    client.execute(env=env, cleanup_kc=True)

    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors, errors
    text = outputs_text(notebook)
    for expected in EXPECTED_OUTPUT.get(path.name, []):
        assert expected in text, f"{path.name} did not print {expected!r}:\n{text}"
