"""Dotted-key overrides of nested frozen dataclass configs.

``apply_overrides(config, {"train.steps": 10, "model.mixer.num_heads": 4})`` walks
the sections, checks each value against the field's annotation (``int``,
``float``, ``str``, ``bool``, ``dict``, unions with ``None``) and rebuilds each
changed frozen dataclass once, innermost first, with all its new values, so its
``__post_init__`` validation sees the final combination (never a half-applied one).
An unknown key is rejected with the valid keys of its section, a bad value with the
reason. A ``dict`` field (``data.options``) takes sub-keys as entries.
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


class _Pending(dict):
    """Changes to one dataclass: field → new value, or a nested ``_Pending`` for a
    dataclass field; ``base`` is the instance they apply to."""

    def __init__(self, base):
        super().__init__()
        self.base = base


def _record(pending: _Pending, path: list[str], value: Any, prefix: str) -> None:
    """Check ``prefix + path = value`` against ``pending.base``'s fields and record it."""
    config = pending.base
    fields = [f.name for f in dataclasses.fields(config)]
    name = path[0]
    key = f"{prefix}{name}"
    if name not in fields:
        raise ValueError(
            f"unknown key {key!r}; valid keys under "
            f"{prefix[:-1] or 'the top level'!r}: {', '.join(fields)}"
        )
    current = pending.get(name, getattr(config, name))
    if isinstance(current, _Pending):
        current = current.base
    if len(path) > 1 and name == "options" and isinstance(current, dict):
        pending[name] = {**current, ".".join(path[1:]): value}
    elif dataclasses.is_dataclass(current) and len(path) == 1 and isinstance(value, type(current)):
        pending[name] = _Pending(value)  # a whole section replaced by a config of its type
    elif dataclasses.is_dataclass(current):
        if len(path) == 1:
            raise ValueError(
                f"{key!r} is a section; set one of its keys, e.g. "
                f"{key}.{dataclasses.fields(current)[0].name}=..."
            )
        section = pending.get(name)
        if not isinstance(section, _Pending):
            section = pending[name] = _Pending(current)
        _record(section, path[1:], value, f"{key}.")
    else:
        if len(path) > 1:
            raise ValueError(f"unknown key {prefix}{'.'.join(path)!r}: {key!r} has no sub-keys")
        pending[name] = _check_value(key, value, typing.get_type_hints(type(config))[name])


def _named(error: Exception, names: list[str], prefix: str) -> str:
    """``error``'s message, naming the key when it does not already."""
    message = str(error)
    keys = [f"{prefix}{name}" for name in names]
    if any(key in message for key in keys):
        return message
    mentioned = [key for key, name in zip(keys, names) if f"`{name}`" in message]
    if len(keys) == 1 or len(mentioned) == 1:
        return f"bad value for {(mentioned or keys)[0]!r}: {message}"
    return f"bad value in {prefix[:-1] or 'the config'!r}: {message}"


def _build(pending: _Pending, prefix: str):
    """``pending.base`` with the changes, nested sections first, so each dataclass is
    rebuilt (and validated) once, with all its new values together."""
    changes = {
        name: _build(change, f"{prefix}{name}.") if isinstance(change, _Pending) else change
        for name, change in pending.items()
    }
    if not changes:
        return pending.base
    try:
        return dataclasses.replace(pending.base, **changes)
    except (ValueError, TypeError) as error:
        raise ValueError(_named(error, list(changes), prefix)) from None


def apply_overrides(config: T, overrides: dict[str, Any]) -> T:
    """``config`` (a frozen dataclass, possibly nested) with dotted-key ``overrides``
    applied; values are checked against the fields' annotated types, then each changed
    dataclass is rebuilt once with all its new values, so its own validation sees the
    final combination (``train.steps`` and ``train.warmup_steps`` set together)."""
    pending = _Pending(config)
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ValueError(f"config keys must be strings; got {key!r}")
        _record(pending, key.split("."), value, "")
    return _build(pending, "")
