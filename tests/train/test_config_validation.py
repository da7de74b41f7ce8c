"""The experiment config's sections check every field at construction (issue 24), and
overrides are applied together so that a check across fields sees the final values."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from xformjax import train
from xformjax.overrides import apply_overrides

BAD_TRAIN = [
    ({"steps": 0}, "train.steps must be ≥ 1; got 0"),
    ({"batch_size": -4}, "train.batch_size must be ≥ 1; got -4"),
    ({"seq_len": 0}, "train.seq_len must be ≥ 1; got 0"),
    ({"grad_accum": 0}, "train.grad_accum must be ≥ 1; got 0"),
    ({"log_every": 0}, "train.log_every must be ≥ 1; got 0"),
    ({"eval_every": 0}, "train.eval_every must be ≥ 1; got 0"),
    ({"eval_batches": 0}, "train.eval_batches must be ≥ 1; got 0"),
    ({"checkpoint_every": -1}, "train.checkpoint_every must be ≥ 1; got -1"),
    ({"keep_checkpoints": 0}, "train.keep_checkpoints must be ≥ 1; got 0"),
    ({"warmup_steps": -1}, "train.warmup_steps must be ≥ 0; got -1"),
    ({"steps": 50, "warmup_steps": 51}, "train.warmup_steps must be ≤ train.steps (50); got 51"),
    ({"seed": -1}, "train.seed must be in [0, 9223372036854775806]; got -1"),
    ({"learning_rate": math.nan}, "train.learning_rate must be finite and > 0; got nan"),
    ({"learning_rate": math.inf}, "train.learning_rate must be finite and > 0; got inf"),
    ({"learning_rate": 0.0}, "train.learning_rate must be finite and > 0; got 0.0"),
    ({"min_lr_ratio": 1.5}, "train.min_lr_ratio must be finite and in [0, 1]; got 1.5"),
    ({"min_lr_ratio": math.nan}, "train.min_lr_ratio must be finite and in [0, 1]; got nan"),
    ({"weight_decay": -0.1}, "train.weight_decay must be finite and ≥ 0; got -0.1"),
    ({"grad_clip": math.nan}, "train.grad_clip must be finite and ≥ 0; got nan"),
    ({"aux_loss_weight": -1.0}, "train.aux_loss_weight must be finite and ≥ 0; got -1.0"),
    ({"sample_tokens": -1}, "train.sample_tokens must be ≥ 0; got -1"),
]


@pytest.mark.parametrize("fields,message", BAD_TRAIN, ids=[str(f) for f, _ in BAD_TRAIN])
def test_train_config_rejects_each_bad_value(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.TrainConfig(**fields)


def test_train_config_rejects_wrong_types_and_accepts_the_limits():
    strings = ("sample_prompt", "profile")  # profile: tests/train/test_observability.py
    numeric = [f.name for f in dataclasses.fields(train.TrainConfig) if f.name not in strings]
    assert len(numeric) == 18
    for name in numeric:
        with pytest.raises(TypeError, match=re.escape(f"train.{name} must be ")):
            train.TrainConfig(**{name: "1"})  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="train.steps must be an integer; got True"):
        train.TrainConfig(steps=True)
    with pytest.raises(TypeError, match="train.sample_prompt must be a str; got 3"):
        train.TrainConfig(sample_prompt=3)  # pyright: ignore[reportArgumentType]
    limits = train.TrainConfig(
        steps=1,
        warmup_steps=1,  # = steps
        min_lr_ratio=0.0,
        weight_decay=0.0,
        grad_clip=0.0,  # clipping off
        eval_every=1000,  # an interval past the end: that event never happens mid-run
        checkpoint_every=1000,
        sample_tokens=0,
        seed=2**63 - 2,
    )
    assert (limits.steps, limits.warmup_steps, limits.eval_every) == (1, 1, 1000)


BAD_DATA = [
    (
        {"validation_fraction": 1.5},
        ValueError,
        "data.validation_fraction must be finite and in (0, 1); got 1.5",
    ),
    ({"validation_fraction": 0}, ValueError, "must be finite and in (0, 1); got 0.0"),
    ({"validation_fraction": 1.0}, ValueError, "must be finite and in (0, 1); got 1.0"),
    ({"validation_fraction": math.nan}, ValueError, "must be finite and in (0, 1); got nan"),
    ({"pattern": ""}, ValueError, "data.pattern must not be empty"),
    ({"path": 3}, TypeError, "data.path must be a str; got 3"),
    ({"data_dir": ""}, ValueError, "data.data_dir must not be empty"),
    ({"options": [1]}, TypeError, "data.options must be a mapping; got [1]"),
    (
        {"name": "mqar", "options": {"num_pairs": 0}},
        ValueError,
        "data.options: MQAR: `num_pairs` must be ≥ 1; got 0",
    ),
    (
        {"name": "parity", "options": {"min_length": 9, "max_length": 4}},
        ValueError,
        "data.options: Parity: `max_length` must be ≥ `min_length` (9); got 4",
    ),
    (
        {"name": "parity", "options": {"max_length": "16"}},
        TypeError,
        "data.options: Parity: `max_length` must be an integer; got '16' (str)",
    ),
]


@pytest.mark.parametrize("fields,error,message", BAD_DATA, ids=[str(f) for f, _, _ in BAD_DATA])
def test_data_config_rejects_each_bad_value(fields, error, message):
    with pytest.raises(error, match=re.escape(message)):
        train.DataConfig(**fields)


def test_mesh_and_experiment_configs_check_types():
    with pytest.raises(TypeError, match=re.escape("mesh.seq must be an integer; got 2.0 (float)")):
        train.MeshConfig(seq=2.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=re.escape("mesh.data must be ≥ 1 or -1 (the rest)")):
        train.MeshConfig(data=-2)
    with pytest.raises(TypeError, match="ExperimentConfig: `train` must be a TrainConfig; got int"):
        train.ExperimentConfig(train=3)  # pyright: ignore[reportArgumentType]


def test_overrides_are_validated_together_not_one_by_one():
    # the default preset warms up for 60 of 600 steps: steps=10 alone would be refused
    config = train.load_config("default", ["train.steps=10", "train.warmup_steps=5"])
    assert (config.train.steps, config.train.warmup_steps) == (10, 5)
    config = train.load_config("default", {"train.warmup_steps": 5, "train.steps": 10})
    assert (config.train.steps, config.train.warmup_steps) == (10, 5)
    with pytest.raises(ValueError, match=re.escape("train.warmup_steps must be ≤ train.steps")):
        train.load_config("default", ["train.steps=10"])
    # a task and its options, in either order
    config = train.load_config(
        "tiny", ["data.options.max_length=12", "data.name=parity", "data.options.min_length=12"]
    )
    assert config.data.options == {"max_length": 12, "min_length": 12}
    # a single changed key is named; a key the message already names is not repeated
    model = train.load_config("tiny").model
    with pytest.raises(ValueError, match=r"^bad value for 'mixer.num_heads': "):
        apply_overrides(model, {"mixer.num_heads": 0})
    with pytest.raises(ValueError, match=r"^train.learning_rate must be finite and > 0; got nan$"):
        train.load_config("tiny", ["train.learning_rate=nan", "train.steps=20"])
