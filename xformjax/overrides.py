"""Dotted-key overrides of nested frozen dataclass configs.

``apply_overrides(config, {"train.steps": 10, "model.mixer.num_heads": 4})`` walks
the sections, checks each value against the field's annotation (``int``,
``float``, ``str``, ``bool``, ``dict``, unions with ``None``) and rebuilds the
frozen dataclasses, so their ``__post_init__`` validation runs. An unknown key is
rejected with the valid keys of its section, a bad value with the reason. A
``dict`` field (``data.options``) takes sub-keys as entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp) -> Any:
    """``value`` converted to the annotated type ``tp`` or a ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e9" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _apply(config, path: list[str], value: Any, prefix: str):
    hints = typing.get_type_hints(type(config))
    fields = [f.name for f in dataclasses.fields(config)]
    name = path[0]
    key = f"{prefix}{name}"
    if name not in fields:
        raise ValueError(
            f"unknown key {key!r}; valid keys under "
            f"{prefix[:-1] or 'the top level'!r}: {', '.join(fields)}"
        )
    current = getattr(config, name)
    if len(path) > 1 and name == "options" and isinstance(current, dict):
        new = {**current, ".".join(path[1:]): value}
    elif dataclasses.is_dataclass(current) and len(path) == 1 and isinstance(value, type(current)):
        new = value  # a whole section replaced by a config of its type
    elif dataclasses.is_dataclass(current):
        if len(path) == 1:
            raise ValueError(
                f"{key!r} is a section; set one of its keys, e.g. "
                f"{key}.{dataclasses.fields(current)[0].name}=..."
            )
        new = _apply(current, path[1:], value, f"{key}.")
    else:
        if len(path) > 1:
            raise ValueError(f"unknown key {prefix}{'.'.join(path)!r}: {key!r} has no sub-keys")
        new = _check_value(key, value, hints[name])
    try:
        return dataclasses.replace(config, **{name: new})
    except ValueError as error:
        raise ValueError(f"bad value for {key!r}: {error}") from None


def apply_overrides(config: T, overrides: dict[str, Any]) -> T:
    """``config`` (a frozen dataclass, possibly nested) with dotted-key ``overrides``
    applied in order; values are checked against the fields' annotated types and the
    dataclasses' own validation."""
    for key, value in overrides.items():
        config = _apply(config, key.split("."), value, "")
    return config
