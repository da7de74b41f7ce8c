"""The ``xformjax`` command end to end, and a run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

XFORMJAX = str(pathlib.Path(sys.executable).parent / "xformjax")


def _text_corpus(root: pathlib.Path) -> pathlib.Path:
    corpus = root / "corpus"
    for i in range(40):
        path = corpus / f"doc_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (i % 5 + 2))
    return corpus


def _train_command(workdir, corpus, data_dir, *extra):
    return [
        XFORMJAX,
        "train",
        "--config",
        "tiny",
        "--workdir",
        str(workdir),
        "--no-progress",
        "--set",
        f"data.path={corpus}",
        f"data.data_dir={data_dir}",
        "data.validation_fraction=0.2",
        *extra,
    ]


def _train_losses(workdir) -> dict[int, float]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_help_for_every_command():
    for command in ([], ["train"], ["eval"], ["generate"]):
        result = subprocess.run([XFORMJAX, *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: xformjax" in result.stdout, command
    assert (
        "--set KEY=VALUE [KEY=VALUE ...]"
        in subprocess.run([XFORMJAX, "train", "--help"], capture_output=True, text=True).stdout
    )


def test_train_eval_generate_on_tiny(tmp_path):
    corpus = _text_corpus(tmp_path)
    workdir = tmp_path / "run"
    result = subprocess.run(
        _train_command(workdir, corpus, tmp_path / "tfds"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation bits per byte:" in result.stdout and "sample:" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "bits_per_byte"):
        assert all(key in r for r in train), key
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(r["split"] == "validation" for r in records)
    assert (workdir / "config.yaml").is_file()

    evaluated = subprocess.run(
        [XFORMJAX, "eval", "--workdir", str(workdir)], capture_output=True, text=True, timeout=600
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "checkpoint: step 30" in evaluated.stdout
    assert "validation bits per byte:" in evaluated.stdout

    generated = subprocess.run(
        [
            XFORMJAX,
            "generate",
            "--workdir",
            str(workdir),
            "--prompt",
            "def f",
            "--max-new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("def f") and len(generated.stdout.strip()) >= 6

    # a batch of two prompts, every sampling flag, and a stop text: each sample ends
    # before the first newline it generates (so it is one line under its header)
    prompts = ["def f", "    return x"]
    sampled = subprocess.run(
        [XFORMJAX, "generate", "--workdir", str(workdir), "--max-new-tokens", "24"]
        + [item for prompt in prompts for item in ("--prompt", prompt)]
        + ["--temperature", "0.7", "--top-k", "none", "--top-p", "0.95", "--min-p", "0.02"]
        + ["--repetition-penalty", "1.2", "--seed", "5", "--stop", "\n"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    lines = sampled.stdout.split("\n")
    assert lines[0::2][:2] == ["--- sample 1 ---", "--- sample 2 ---"] and lines[4:] == [""]
    assert lines[1].startswith(prompts[0]) and lines[3].startswith(prompts[1]), lines


def test_bad_keys_and_values_are_rejected(tmp_path):
    cases = {
        "train.stepz=3": "unknown key 'train.stepz'; valid keys under 'train': steps, batch_size",
        "train.steps=abc": "train.steps: expected int, got 'abc'",
        "data.name=imagenet": "data.name must be one of ['text', 'mqar'",
        "model.layer_pattern=gdn,mamba": "unknown mixer 'mamba'",
        "model.mixer.feature_map=cos": "feature_map` must be one of",
        "mesh.gpu=2": "valid keys under 'mesh': data, fsdp, tensor, seq",
    }
    for assignment, message in cases.items():
        result = subprocess.run(
            [
                XFORMJAX,
                "train",
                "--config",
                "tiny",
                "--workdir",
                str(tmp_path / "never"),
                "--set",
                assignment,
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr, (assignment, result.stderr)
    result = subprocess.run([XFORMJAX, "train", "--config", "huge"], capture_output=True, text=True)
    assert "unknown config 'huge'; presets: ['base', 'default', 'tiny']" in result.stderr


def test_killed_run_resumes_to_the_same_losses(tmp_path):
    corpus = _text_corpus(tmp_path)
    extra = (
        "train.steps=60",
        "train.checkpoint_every=10",
        "train.log_every=1",
        "train.eval_every=1000",
    )
    reference = tmp_path / "uninterrupted"
    result = subprocess.run(
        _train_command(reference, corpus, tmp_path / "tfds", *extra),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    workdir = tmp_path / "killed"
    command = _train_command(workdir, corpus, tmp_path / "tfds", *extra)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = workdir / "checkpoints" / "20"
    deadline = time.time() + 300
    while not committed.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    still_running = process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert still_running, "the run finished before it could be killed"
    killed_at = max(_train_losses(workdir))
    assert killed_at < 60 and not (workdir / "checkpoints" / "60").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _train_losses(reference), _train_losses(workdir)
    assert sorted(got) == sorted(expected) == list(range(1, 61))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
