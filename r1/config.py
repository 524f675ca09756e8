"""Flat config dataclasses from YAML plus `key=value` overrides, checked before any compute.

    cfg = load_config(TrainConfig, "recipes/r1_zero.yaml", ["lr=3e-6", "beta=0.001"])

The YAML file and each override name fields of one flat dataclass. Values are parsed with
yaml.safe_load, so `flag=true`, `names=[a,b]`, `x=null` work on the command line. Every problem (an
unknown key, with the closest field suggested; a wrong type, with the expected type and the value; a
missing required field) is collected and raised as one ConfigError, so a typo costs seconds, not a
crashed run. Field types: int, float, str, bool, Literal[...], X | None, list[X], dict[str, X].
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be loaded: every problem found, one per line."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


# A coercer returns the checked value or raises TypeError with the reason; _coerce dispatches on the type
# (or its origin, for list[...], X | None, ...).


def _int(value: Any, tp: Any) -> int:
    # bool is a subclass of int: `steps: true` is a mistake, not 1
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError


def _float(value: Any, tp: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # YAML 1.1 (PyYAML) reads 3e-6 (no dot) as the string "3e-6"; accept what float() accepts
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise TypeError


def _str(value: Any, tp: Any) -> str:
    if isinstance(value, str):
        return value
    raise TypeError


def _bool(value: Any, tp: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError


def _literal(value: Any, tp: Any) -> Any:
    if value in typing.get_args(tp):
        return value
    raise TypeError


def _union(value: Any, tp: Any) -> Any:
    # only X | None is supported: try None, then X
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    (inner,) = [a for a in args if a is not type(None)]
    return _coerce(value, inner)


def _list(value: Any, tp: Any) -> list:
    if not isinstance(value, list):
        raise TypeError
    (inner,) = typing.get_args(tp) or (Any,)
    return [_coerce(v, inner) for v in value]


def _dict(value: Any, tp: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError
    key_tp, value_tp = typing.get_args(tp) or (Any, Any)
    return {_coerce(k, key_tp): _coerce(v, value_tp) for k, v in value.items()}


_COERCERS: dict[Any, Callable[[Any, Any], Any]] = {
    int: _int,
    float: _float,
    str: _str,
    bool: _bool,
    Literal: _literal,
    Union: _union,
    types.UnionType: _union,
    list: _list,
    dict: _dict,
    Any: lambda value, tp: value,
}


def _coerce(value: Any, tp: Any) -> Any:
    coercer = _COERCERS.get(typing.get_origin(tp) or tp)
    if coercer is None:  # a programming error in the dataclass, not in the user's config
        raise ConfigError(f"unsupported config field type {tp!r}; use {', '.join(map(str, _COERCERS))}")
    return coercer(value, tp)


def _parse_override(item: str, fields: dict[str, Any]) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:  # e.g. an unclosed "[a, b": keep the text; the type check reports it
        value = raw
    # a shell string for a str field stays as typed: run_name=2024 is "2024", not the int 2024
    tp = fields.get(key)
    if value is not None and not isinstance(value, str) and tp is not None and _accepts_str(tp):
        value = raw
    return key, value


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` (a flat dataclass) from the YAML file at `path` (if any), then `key=value` overrides.

    Overrides win over the file, the file over the dataclass defaults. Raises ConfigError listing every
    unknown key (with the closest field), wrong type (key, expected type, value) and missing field.
    """
    fields = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:  # one line: the problem and where, not the parser's multi-line report
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"{path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded or {})
    for item in overrides:
        key, value = _parse_override(item, fields)
        values[key] = value

    errors: list[str] = []
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            errors.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        try:
            checked[key] = _coerce(value, fields[key])
        except TypeError:
            errors.append(
                f"{key}: expected {_type_name(fields[key])}, got {value!r} ({type(value).__name__})"
            )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    errors += [f"missing required key {name!r}" for name in missing]
    if errors:
        source = f" ({path})" if path else ""
        sep = ": " if len(errors) == 1 else ":\n  "  # one problem, one line
        raise ConfigError(f"invalid {cls.__name__} config{source}{sep}" + "\n  ".join(errors))
    return cls(**checked)


def dump_config(obj: Any) -> dict[str, Any]:
    """The config as a plain dict (what load_config reads back)."""
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: str) -> None:
    """Write the config as YAML next to a run's outputs, so the run can be repeated exactly."""
    with open(path, "w") as f:
        yaml.safe_dump(dump_config(obj), f, sort_keys=False)
