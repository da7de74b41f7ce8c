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
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (xformjax tests)", "language": "python"}
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: commit notebooks with their outputs cleared")

    workdir = tmp_path / "run"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        notebook, km=kernel_manager(tmp_path), kernel_name="python3", timeout=CELL_TIMEOUT,
        allow_errors=False, resources={"metadata": {"path": str(workdir)}})
    # the notebook sees the machine as a user would: without conftest's 8 host devices
    xla_flags = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                         if not flag.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "XFORMJAX_NOTEBOOK_SMOKE": "1", "XLA_FLAGS": xla_flags}
    # raises CellExecutionError (naming the cell and its traceback) on the first error;
    # cleanup_kc: shut the kernel down afterwards even though we made its manager
    client.execute(env=env, cleanup_kc=True)

    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.output_type == "error"]
    assert not errors, errors
    text = outputs_text(notebook)
    for expected in EXPECTED_OUTPUT.get(path.name, []):
        assert expected in text, f"{path.name} did not print {expected!r}:\n{text}"
