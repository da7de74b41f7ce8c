"""The package as a user installs it: a wheel, a fresh virtual environment, no checkout.

The suite itself runs on an editable install, which sees every file of the
repository; this test is the one that sees only what the wheel carries. It builds
the wheel from a copy of the sources without ``experiments/`` or ``tests/``,
installs it into a new venv (dependencies pinned by ``requirements.lock``, so pip
reuses the wheels it has cached), first with the core dependencies only, then
with the ``train`` extra, and runs the command from a directory outside the
checkout.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import xformjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
#: every public subpackage a user may import
SUBPACKAGES = (
    "xformjax.ops",
    "xformjax.nn",
    "xformjax.nn.linen",
    "xformjax.models",
    "xformjax.parallel",
    "xformjax.kernels",
    "xformjax.train",
    "xformjax.data",
)
#: what the wheel must not carry: the repository's own folders and build debris
NOT_SHIPPED = ("experiments/", "tests/", ".venv/", "runs/")


def _run(command: list[str], cwd: pathlib.Path, timeout: float = 600) -> str:
    """Run ``command`` as a user's shell would (no PYTHONPATH, no test-only XLA flags)
    and return its output; fail the test with the output's tail when it fails."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "XLA_FLAGS", "JAX_ENABLE_X64")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def _build_wheel(directory: pathlib.Path) -> pathlib.Path:
    source = directory / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".lockenv",
            "experiments",
            "tests",
            "runs",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
        ),
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(directory / "dist"),
            str(source),
        ],
        cwd=directory,
    )
    (wheel,) = (directory / "dist").glob("xformjax-*.whl")
    return wheel


def test_pyproject_declares_the_extras_without_capping_jax():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = project["dependencies"]
    assert {d.split(">")[0].split("[")[0] for d in core} == {"jax", "flax", "optax", "numpy"}
    assert not any("<" in d or "jaxlib" in d for d in core), core
    extras = project["optional-dependencies"]
    assert {"train", "cuda12", "cuda13", "tpu", "dev"} <= set(extras)
    assert extras["cuda12"] == ["jax[cuda12]>=0.10.2"] and extras["tpu"] == ["jax[tpu]>=0.10.2"]
    train = " ".join(extras["train"])
    for name in (
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "array-record",
        "tqdm",
        "pyyaml",
        "tensorboardX",
    ):
        assert name in train, name
    assert project["dynamic"] == ["version"] and "version" not in project


def test_wheel_installs_trains_and_generates_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    assert wheel.name == f"xformjax-{xformjax.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "xformjax/train/configs/tiny.yaml",
        "xformjax/train/configs/default.yaml",
        "xformjax/py.typed",
        "xformjax/kernels/tpu/common.py",
        "xformjax/kernels/gpu/chunk_h.py",
    ):
        assert expected in names, f"the wheel lacks {expected}"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not [n for n in names if n.startswith(NOT_SHIPPED)]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip"]
    user_dir = tmp_path / "elsewhere"
    user_dir.mkdir()

    # 1. The core install: ops, layers, the model and sharding, without the train extra.
    _run([*pip, "install", "--quiet", "--constraint", str(LOCK), str(wheel)], cwd=user_dir)
    core = _run(
        [
            python,
            "-c",
            """
import importlib.util, xformjax, jax.numpy as jnp
from xformjax import ops, nn, models, parallel, kernels
o, _ = ops.linear_attention(jnp.ones((1, 5, 2, 8)), jnp.ones((1, 5, 2, 8)), jnp.ones((1, 5, 2, 8)))
print("shape", o.shape, "file", xformjax.__file__)
print("grain installed:", importlib.util.find_spec("grain") is not None)
try:
    import xformjax.train
except ImportError as error:
    print("train:", error)
""",
        ],
        cwd=user_dir,
    )
    assert "shape (1, 5, 2, 8)" in core
    assert f"file {venv}" in core, core  # the wheel's copy, not the checkout
    assert "grain installed: False" in core
    assert 'pip install "xformjax[train]"' in core, core

    # 2. The train extra: the command trains a preset and generates, from any directory.
    _run(
        [
            *pip,
            "install",
            "--quiet",
            "--constraint",
            str(LOCK),
            f"xformjax[train] @ {wheel.as_uri()}",
        ],
        cwd=user_dir,
    )
    _run([*pip, "check"], cwd=user_dir)
    imports = _run(
        [python, "-c", f"import {', '.join(SUBPACKAGES)}; print('imported')"], cwd=user_dir
    )
    assert "imported" in imports
    command = str(venv / "bin" / "xformjax")
    usage = _run([command, "--help"], cwd=user_dir)
    assert "train" in usage and "generate" in usage and "bench" not in usage
    assert "tiny" in _run([command, "train", "--help"], cwd=user_dir)  # the presets are found
    trained = _run(
        [
            command,
            "train",
            "--config",
            "tiny",
            "--workdir",
            "run",
            "--no-progress",
            "--set",
            "train.steps=3",
            "train.warmup_steps=1",
            f"data.data_dir={tmp_path / 'tfds'}",
        ],
        cwd=user_dir,
    )
    assert "validation bits per byte:" in trained, trained
    assert (user_dir / "run" / "config.yaml").is_file()
    generated = _run(
        [command, "generate", "--workdir", "run", "--prompt", "def ", "--max-new-tokens", "8"],
        cwd=user_dir,
    )
    assert generated.startswith("def ") and len(generated.rstrip("\n")) >= 4, generated
