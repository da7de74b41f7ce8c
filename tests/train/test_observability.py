"""Observability of ``xformjax train`` (issue 25, item 4): TensorBoard scalars beside
``metrics.jsonl`` (and no duplicated steps after a resume), a ``jax.profiler`` trace of
a step window, model FLOPs per token, tokens/s and MFU against the device's peak."""

from __future__ import annotations

import json

import pytest

from xformjax import train
from xformjax.models import model_cost
from xformjax.train import cli, trainer
from xformjax.train.mfu import model_flops_utilization, peak_flops
from xformjax.train.profiling import parse_window
from xformjax.train.tensorboard_log import (
    TensorBoardLog,
    drop_events_after,
    event_files,
    read_scalars,
)

RUN = [
    "data.name=parity",
    "data.options.max_length=12",
    "data.options.min_length=2",
    "model.vocab_size=3",
    "model.layer_pattern=attn",
    "model.num_layers=1",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
    "train.eval_batches=1",
    "train.warmup_steps=1",
]


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # the SXM card
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == peak_flops("NVIDIA A100-PCIE-40GB") == 312e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v5 lite") == peak_flops("TPU v5e") == 197e12
    assert peak_flops("TPU v5") == peak_flops("TPU v5p") == 459e12
    assert peak_flops("TPU v6 lite") == 918e12
    for unknown in ("cpu", "TPU v3", "NVIDIA GeForce RTX 4090", "Interpreter"):
        assert peak_flops(unknown) is None
    # 1e9 FLOP/token × 1e5 token/s on 4 devices of 1e14 FLOP/s: 25 %
    assert model_flops_utilization(1e9, 1e5, 1e14, 4) == pytest.approx(0.25)
    assert model_flops_utilization(1e9, 1e5, None, 4) is None


def test_profile_windows_are_checked():
    assert parse_window("2:3") == (2, 3)
    window = train.TrainConfig(steps=5, warmup_steps=1, profile="5:9").profile
    assert window == "5:9"  # a window may run past the last step
    bad = {
        "3:2": "1 ≤ START < END",
        "2:2": "1 ≤ START < END",
        "0:2": "1 ≤ START < END",
        "a:b": "integer steps",
        "4": "integer steps",
        "123": "base-60",  # what YAML makes of an unquoted 2:3
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            train.TrainConfig(profile=text)
    with pytest.raises(ValueError, match="starts after the last step"):
        train.TrainConfig(steps=5, warmup_steps=1, profile="6:8")
    with pytest.raises(TypeError, match="train.tensorboard must be a bool"):
        train.TrainConfig(tensorboard="yes")  # pyright: ignore[reportArgumentType]


@pytest.fixture
def spy(monkeypatch):
    """The config ``xformjax train`` would run; nothing trains."""
    seen = []

    class Trainer:
        def __init__(self, config, workdir, progress=True):
            seen.append(config)
            raise ValueError("spy: stopped before training")

    monkeypatch.setattr(trainer, "Trainer", Trainer)
    return seen


def test_profile_option_of_the_command(capsys, spy):
    command = ["train", "--config", "tiny", "--workdir", "/nonexistent", "--distributed", "off"]

    def error(*extra):
        assert cli.main([*command, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("xformjax: error: "), err
        return err.removeprefix("xformjax: error: ").strip()

    assert error("--profile", "3:2").startswith("train.profile must be 'START:END' with 1 ≤")
    assert error("--profile", "0:1").endswith("got '0:1'")
    assert "integer steps" in error("--profile", "two:three")
    assert "starts after the last step" in error("--profile", "31:40")  # tiny: 30 steps
    assert error("--profile", "2:3", "--set", "train.profile='4:5'") == (
        "give the profile window once: --profile or --set train.profile"
    )
    assert "quote it" in error("--set", "train.profile=2:3")  # YAML's base-60 2:3
    assert spy == []
    assert error("--profile", "2:3") == "spy: stopped before training"
    assert spy[0].train.profile == "2:3" and spy[0].train.tensorboard


def test_tensorboard_log_drops_later_events_and_a_damaged_tail(tmp_path):
    board = TensorBoardLog(tmp_path)
    for step in (1, 2, 3):
        board.write({"step": step, "split": "train", "loss": float(step), "mfu": None})
    board.write({"step": 3, "split": "validation", "loss": 0.5})
    board.close()
    (path,) = event_files(tmp_path)
    assert read_scalars(tmp_path) == {
        "train/loss": [(1, 1.0), (2, 2.0), (3, 3.0)],
        "validation/loss": [(3, 0.5)],
    }
    with path.open("ab") as file:
        file.write(b"\x10\x00\x00")  # a record cut short by a crash
    drop_events_after(tmp_path, 2)
    assert read_scalars(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0)]}
    TensorBoardLog(tmp_path / "other", enabled=False).write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_a_run_logs_mfu_tensorboard_and_a_profile_and_resumes_without_duplicates(tmp_path):
    config = train.load_config("tiny", RUN + ["train.steps=3", "train.profile='2:3'"])
    run = train.Trainer(config, tmp_path, progress=False)
    run.run()

    # metrics.jsonl: FLOPs per token (training: 3 × forward), tokens/s, MFU n/a on CPU
    records = _records(tmp_path)
    steps = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    forward = model_cost(run.model, run.datasets.sequence_length).forward_flops_per_token
    for record in steps:
        assert record["model_flops_per_token"] == pytest.approx(3 * forward)
        assert record["tokens_per_second"] > 0 and record["mfu"] is None

    # TensorBoard: the same numbers at the same steps, validation included
    scalars = read_scalars(tmp_path / "tensorboard")
    for name in ("loss", "accuracy", "grad_norm", "learning_rate", "tokens_per_second"):
        expected = [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in steps]
        assert scalars[f"train/{name}"] == expected, name
    assert [s for s, _ in scalars["train/model_flops_per_token"]] == [1, 2, 3]
    assert "train/mfu" not in scalars  # None: not written
    assert [s for s, _ in scalars["validation/loss"]] == [3]

    # the profile of step 2
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0

    # a crash after step 5 whose last checkpoint is step 3: the events of steps 4 and 5
    # were written, then the run resumes from 3 — each step is in the events once
    late = TensorBoardLog(tmp_path / "tensorboard", start_step=3)
    for step in (4, 5):
        late.write({"step": step, "split": "train", "loss": 99.0})
    late.close()
    resumed = train.load_config("tiny", RUN + ["train.steps=5"])
    train.Trainer(resumed, tmp_path, progress=False).run()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5]
    assert 99.0 not in [v for _, v in scalars["train/loss"]]
    assert [s for s, _ in scalars["validation/loss"]] == [3, 5]
    assert [r["step"] for r in _records(tmp_path) if r["split"] == "train"] == [1, 2, 3, 4, 5]
