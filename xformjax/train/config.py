"""The experiment configuration: frozen dataclasses, YAML presets, dotted overrides.

An :class:`ExperimentConfig` has four sections — ``model`` (:class:`LMConfig`, with
its ``mixer``), ``train``, ``data`` and ``mesh`` — addressed by dotted keys:
``train.steps``, ``model.layer_pattern``, ``model.mixer.num_heads``, ``data.name``,
``mesh.seq``. :func:`load_config` reads a preset (``NAME.yaml`` in
``xformjax/train/configs/``, package data that a wheel installs) or a YAML path and
applies ``key=value`` overrides; an unknown key or a value of
the wrong type is rejected with the valid keys or choices listed. Every section checks
every field when it is built (a count ≥ 1, a finite learning rate > 0, a fraction in
its range, ``warmup_steps ≤ steps``, a task's options through the task itself), and a
broken YAML file, a Python tag (``!!python/object``: refused, nothing runs), a key
repeated in one mapping or a document that is not a mapping raises ``ValueError``
with one line that names the file.

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
from typing import Any, NoReturn

import yaml

from xformjax.data.tasks import TASKS
from xformjax.field_checks import check_int, check_real
from xformjax.models.config import LMConfig
from xformjax.overrides import apply_overrides
from xformjax.train.profiling import parse_window

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
    ``tensorboard`` also writes every metrics record as TensorBoard scalars under
    ``WORKDIR/tensorboard/`` (:mod:`xformjax.train.tensorboard_log`); ``profile``
    (``"START:END"``) traces the steps ``START ≤ step < END`` with ``jax.profiler``
    into ``WORKDIR/profile/`` (:mod:`xformjax.train.profiling`).

    Checked at construction: the counts and intervals are integers ≥ 1;
    ``0 ≤ warmup_steps ≤ steps``; ``learning_rate`` finite > 0; ``min_lr_ratio`` in
    [0, 1]; ``weight_decay``, ``grad_clip`` and ``aux_loss_weight`` finite ≥ 0;
    ``seed`` in [0, 2**63 − 2] (validation uses ``seed + 1``); ``sample_tokens`` ≥ 0;
    ``tensorboard`` a bool; ``profile`` ``None`` or ``"START:END"`` with
    ``1 ≤ START < END`` and ``START ≤ steps`` (quote it in YAML: unquoted, ``2:3`` is
    read as a base-60 number).
    Intervals longer than ``steps`` are allowed (that event then never happens
    mid-run). A wrong type raises ``TypeError``, a bad value ``ValueError``.
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
    tensorboard: bool = True
    profile: str | None = None

    def __post_init__(self):
        for name in POSITIVE_INTS:
            check_int(f"train.{name}", getattr(self, name), low=1)
        check_int("train.warmup_steps", self.warmup_steps, low=0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"train.warmup_steps must be ≤ train.steps ({self.steps}); got {self.warmup_steps}"
            )
        check_int("train.seed", self.seed, low=0, high=2**63 - 2)  # seed + 1: validation
        check_real("train.learning_rate", self.learning_rate, low=0, low_open=True)
        check_real("train.min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        for name in ("weight_decay", "grad_clip", "aux_loss_weight"):
            check_real(f"train.{name}", getattr(self, name), low=0)
        if not isinstance(self.sample_prompt, str):
            raise TypeError(f"train.sample_prompt must be a str; got {self.sample_prompt!r}")
        check_int("train.sample_tokens", self.sample_tokens, low=0)
        if not isinstance(self.tensorboard, bool):
            raise TypeError(f"train.tensorboard must be a bool; got {self.tensorboard!r}")
        if self.profile is not None:
            start, _ = parse_window(self.profile, "train.profile")
            if start > self.steps:
                raise ValueError(
                    f"train.profile {self.profile!r} starts after the last step "
                    f"(train.steps={self.steps}): nothing would be traced"
                )


#: The :class:`TrainConfig` fields that count something and must be ≥ 1.
POSITIVE_INTS = (
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
)


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
    uses the task with ``seed + 1``. ``validation_fraction`` lies in (0, 1) (the split
    is by file); the options are checked by building the task once.
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
        for name in ("path", "data_dir", "pattern"):
            value = getattr(self, name)
            if value is None and name != "pattern":
                continue
            if not isinstance(value, str):
                raise TypeError(f"data.{name} must be a str; got {value!r}")
            if not value:
                raise ValueError(f"data.{name} must not be empty")
        # the split is by file: 0 leaves no validation file, 1 no training file
        check_real(
            "data.validation_fraction",
            self.validation_fraction,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
        if not isinstance(self.options, dict):
            raise TypeError(f"data.options must be a mapping; got {self.options!r}")
        if self.name == "text":
            if self.options:
                raise ValueError("data.options apply to synthetic tasks, not to data.name='text'")
            return
        task = TASKS[self.name]
        fields = {f.name for f in dataclasses.fields(task)}
        unknown = sorted(set(self.options) - fields)
        if unknown:
            raise ValueError(
                f"data.options {unknown} are not options of task "
                f"{self.name!r}; valid: {sorted(fields)}"
            )
        try:
            task(**self.options)  # the task checks its own fields
        except (TypeError, ValueError) as error:
            raise type(error)(f"data.options: {error}") from None

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
            check_int(f"mesh.{name}", size)
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

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise TypeError(
                    f"ExperimentConfig: `{name}` must be a {kind.__name__}; "
                    f"got {type(value).__name__}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The sections of an :class:`ExperimentConfig` and their types.
SECTIONS: dict[str, type] = {
    "model": LMConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
}


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train.steps=10"`` → ``("train.steps", 10)`` (the value is read as YAML)."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"--set expects key=value; got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ValueError(f"--set expects key=value with a dotted key before '='; got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def parse_assignments(items: list[str], *, unique: bool = False) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a.b": 1, "c": "x"}``. A key given twice keeps its
    last value, or with ``unique`` (the command's ``--set``) is an error: one of the two
    would be silently lost."""
    flat: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items:
        key, value = parse_assignment(item)
        if unique and key in given:
            raise ValueError(
                f"--set gives {key!r} twice ({given[key]!r} and {item!r}); give each key once"
            )
        given[key], flat[key] = item, value
    return flat


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags: nothing is constructed or run) that refuses
    a key repeated in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r}", key_node.start_mark
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line and column, from 1)."""
    if isinstance(error, yaml.MarkedYAMLError):
        problem = error.problem or error.context or "invalid YAML"
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return " ".join(f"invalid YAML at {where}{problem}".split())
    return " ".join(f"invalid YAML: {error}".split())


def read_yaml_tree(text: str, source: str) -> dict[str, Any]:
    """The mapping a config YAML document holds (empty: ``{}``); ``ValueError`` naming
    ``source`` for broken YAML, a Python tag, a repeated key or a document that is not
    a mapping."""
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python tags
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: {_yaml_problem(error)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ValueError(
            f"{source}: a config must be a mapping with the sections {', '.join(SECTIONS)}; "
            f"got a {type(tree).__name__}"
        )
    return tree


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
    ``default`` preset), with ``overrides`` (``"key=value"`` strings or a dict).

    Every problem — an unknown preset, a missing or unreadable file, broken YAML, an
    unknown key, a bad value — raises ``ValueError`` with a one-line message. (A key
    repeated in ``overrides`` keeps its last value; the command refuses it, see
    :func:`parse_assignments`.)"""
    name_or_path = name_or_path or "default"
    if pathlib.Path(name_or_path).suffix not in (".yaml", ".yml"):
        if name_or_path not in available_presets():
            raise ValueError(
                f"unknown config {name_or_path!r}; presets: {available_presets()} "
                "(or give a path to a .yaml file)"
            )
        source = f"preset {name_or_path!r}"
        text = (PRESETS_DIR / f"{name_or_path}.yaml").read_text()
    else:
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        source = str(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{source}: cannot read it: {error}") from None
    return config_from_tree(read_yaml_tree(text, source), overrides, source=source)


def config_from_tree(
    tree: dict[str, Any],
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    source: str | None = None,
) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a nested dict (a YAML document), then
    ``overrides`` (``"key=value"`` strings, the last of a repeated key winning, or a
    dict) applied on top.
    ``source`` (the file) prefixes the errors of ``tree``."""

    def bad(message: str) -> NoReturn:
        raise ValueError(f"{source}: {message}" if source else message)

    if not isinstance(tree, dict):
        bad(f"a config must be a mapping of sections; got {type(tree).__name__}")
    tree = dict(tree)
    model = tree.pop("model", None) or {}
    if not isinstance(model, dict):
        bad(f"'model' is a section: a mapping of its keys; got {model!r}")
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        bad(f"model.preset must be a preset name; got {preset!r}")
    try:
        base = ExperimentConfig()
        if preset is not None:
            base = dataclasses.replace(base, model=LMConfig.preset(preset))
        config = apply_overrides(base, _flatten({"model": model, **tree}))
    except ValueError as error:
        bad(str(error))
    if isinstance(overrides, dict):
        return apply_overrides(config, overrides)
    if isinstance(overrides, str):
        overrides = [overrides]
    return apply_overrides(config, parse_assignments(list(overrides or [])))


def config_to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
