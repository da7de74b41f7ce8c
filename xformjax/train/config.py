"""The experiment configuration: frozen dataclasses, YAML presets, dotted overrides.

An :class:`ExperimentConfig` has four sections — ``model`` (:class:`LMConfig`, with
its ``mixer``), ``train``, ``data`` and ``mesh`` — addressed by dotted keys:
``train.steps``, ``model.layer_pattern``, ``model.mixer.num_heads``, ``data.name``,
``mesh.seq``. :func:`load_config` reads a preset (``NAME.yaml`` in
``xformjax/train/configs/``, package data that a wheel installs) or a YAML path and
applies ``key=value`` overrides; an unknown key or a value of the wrong type is
rejected with the valid keys or choices listed.

A YAML file nests the same keys; ``model.preset`` picks an :class:`LMConfig`
preset to start from::

    model: {preset: tiny, layer_pattern: "gated_deltanet,attn"}
    train: {steps: 200, batch_size: 8}
    data: {name: parity, options: {max_length: 16}}
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
from typing import Any

import yaml

from xformjax.data.tasks import TASKS
from xformjax.models.config import LMConfig
from xformjax.overrides import apply_overrides

#: The presets, package data of ``xformjax.train`` (a wheel carries them).
PRESETS_DIR = importlib.resources.files("xformjax.train") / "configs"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing.

    The learning rate warms up linearly for ``warmup_steps`` to ``learning_rate``,
    then follows a cosine to ``learning_rate · min_lr_ratio`` at ``steps``. AdamW
    with ``weight_decay``; gradients clipped to global norm ``grad_clip`` (0: off);
    ``grad_accum`` micro-batches of ``batch_size`` per optimiser step. Every
    ``log_every`` steps a line goes to ``metrics.jsonl``; every ``eval_every`` steps
    ``eval_batches`` validation batches are scored; every ``checkpoint_every``
    steps a checkpoint is saved (``keep_checkpoints`` kept). ``aux_loss_weight``
    scales auxiliary losses that layers return (Mixture-of-Memories' balance loss).
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0
    aux_loss_weight: float = 0.01
    sample_prompt: str = "def "
    sample_tokens: int = 160

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be ≥ 1; got {getattr(self, name)}")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.learning_rate must be > 0 and train.min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.warmup_steps, grad_clip and weight_decay must be ≥ 0")


DATA_NAMES = ("text",) + tuple(TASKS)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on.

    ``name="text"``: byte-level language modelling on the text files under ``path``
    matching ``pattern`` (``path=None``: the running Python's standard library, the
    default corpus), split by file with ``validation_fraction``, built once as a
    TFDS array_record dataset under ``data_dir`` (``~/.cache/xformjax/tfds`` if
    ``None``). Any other name is a synthetic task of :data:`xformjax.data.TASKS`
    built with ``options`` (its dataclass fields, e.g. ``max_length``); validation
    uses the task with ``seed + 1``.
    """

    name: str = "text"
    path: str | None = None
    pattern: str = "**/*.py"
    validation_fraction: float = 0.02
    data_dir: str | None = None
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in DATA_NAMES:
            raise ValueError(f"data.name must be one of {list(DATA_NAMES)}; got {self.name!r}")
        if self.name != "text":
            fields = {f.name for f in dataclasses.fields(TASKS[self.name])}
            unknown = sorted(set(self.options) - fields)
            if unknown:
                raise ValueError(
                    f"data.options {unknown} are not options of task "
                    f"{self.name!r}; valid: {sorted(fields)}"
                )
        elif self.options:
            raise ValueError("data.options apply to synthetic tasks, not to data.name='text'")

    def __hash__(self):
        return hash(
            (
                self.name,
                self.path,
                self.pattern,
                self.validation_fraction,
                self.data_dir,
                tuple(sorted(self.options.items())),
            )
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes per named axis (see :mod:`xformjax.parallel.mesh`): ``data``
    splits the batch; ``fsdp`` splits the batch and shards parameters and optimiser
    states along ``embed``; ``tensor`` splits heads, MLP units and the vocabulary;
    ``seq`` splits the sequence (LASP-2 / LASP-2H). One axis may be ``-1``: it takes
    the devices left over (``mesh.data=-1``: data parallel over every device). The
    product must not exceed the number of devices (all hosts' devices)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    seq: int = 1

    def __post_init__(self):
        sizes = self.shape
        for name, size in sizes.items():
            if size < 1 and size != -1:
                raise ValueError(f"mesh.{name} must be ≥ 1 or -1 (the rest); got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1; got {sizes}")

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "seq": self.seq}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs (see the module docstring)."""

    model: LMConfig = dataclasses.field(default_factory=LMConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.steps=10"`` → ``("train.steps", 10)`` (the value is read as YAML)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value; got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (key == "options" and prefix.endswith("data.")):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def available_presets() -> list[str]:
    """The preset names :func:`load_config` accepts (``tiny``, ``default``, ...)."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in PRESETS_DIR.iterdir()
        if entry.name.endswith(".yaml")
    )


def load_config(
    name_or_path: str | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """A preset name (see :func:`available_presets`), a YAML path or ``None`` (the
    ``default`` preset), with ``overrides`` (``"key=value"`` strings or a dict)."""
    name_or_path = name_or_path or "default"
    if pathlib.Path(name_or_path).suffix not in (".yaml", ".yml"):
        if name_or_path not in available_presets():
            raise ValueError(
                f"unknown config {name_or_path!r}; presets: {available_presets()} "
                "(or give a path to a .yaml file)"
            )
        text = (PRESETS_DIR / f"{name_or_path}.yaml").read_text()
    else:
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    tree = yaml.safe_load(text) or {}
    return config_from_tree(tree, overrides)


def config_from_tree(
    tree: dict[str, Any], overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a nested dict (a YAML document)."""
    tree = dict(tree)
    model = dict(tree.pop("model", None) or {})
    base = ExperimentConfig()
    preset = model.pop("preset", None)
    if preset is not None:
        base = dataclasses.replace(base, model=LMConfig.preset(preset))
    flat = _flatten({"model": model, **tree})
    if isinstance(overrides, dict):
        flat.update(overrides)
    else:
        flat.update(parse_assignment(item) for item in overrides or [])
    return apply_overrides(base, flat)


def config_to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
