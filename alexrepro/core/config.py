"""Strict loading of stage parameters.

Each stage owns one frozen dataclass whose defaults are the paper's values. `load_config` builds it from an
optional YAML file (`stages/<stage>.yaml`) and then from command-line overrides, in that order. An unknown key or
a value of the wrong type is an error that names the key and the file, never silently ignored (fastargs and timm
ignore a mistyped key; a typo in an ablation would then run the baseline under the ablation's name).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from alexrepro.core.errors import ConfigError
from alexrepro.core.files import read_utf8

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a config dataclass


def load_config(cls: type[C], path: Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build `cls` from defaults, then the YAML mapping in `path`, then `overrides` (None values are skipped)."""
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        values.update(_read_yaml_mapping(Path(path)))
        source = str(path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        checked[key] = _check_field(cls, fields, hints, key, value, source)
    for key, value in (overrides or {}).items():
        if value is not None:
            checked[key] = _check_field(cls, fields, hints, key, value, "command line")
    given = {key for key, value in (overrides or {}).items() if value is not None}
    try:
        return cls(**checked)
    except (ValueError, TypeError) as exc:  # __post_init__ range checks raise ValueError naming the key
        raise ConfigError(_attributed(str(exc), source, path, set(values) - given, given)) from None


def _attributed(message: str, source: str, path: Path | None, file_keys: set[str], given: set[str]) -> str:
    """`message` prefixed with where its first key was set; a later key set elsewhere says where, so that a
    conflict between a flag and the config file names both (`… goes beyond key 'epochs' (from the command line)`)."""

    def origin(key: str) -> str:
        if key in given:
            return "command line"
        return str(path) if key in file_keys and path is not None else "default"

    keys = list(dict.fromkeys(re.findall(r"key '(\w+)'", message)))
    if not keys:
        return f"{source}: {message}"
    first = origin(keys[0])
    for key in keys[1:]:
        if origin(key) != first:
            where = "the default" if origin(key) == "default" else origin(key)
            message = message.replace(f"key '{key}'", f"key '{key}' (from {where})", 1)
    return f"{first}: {message}"


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-container view of a config dataclass (tuples as lists), for JSON, YAML and checkpoints."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(cls: type[C], values: dict[str, Any], source: str) -> C:
    """Inverse of `config_to_dict`, with the same strict checks (used for configs stored in checkpoints)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    checked = {k: _check_field(cls, fields, hints, k, v, source) for k, v in values.items()}
    try:
        return cls(**checked)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
    text = read_utf8(path, ConfigError, "config file", "save the file as UTF-8")
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: key '{exc.key}' appears twice (line {exc.line}); keep one of them") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values at the top level")
    return data


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so the first value, which a reader of the file may take for the setting, would be ignored."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _check_field(cls, fields, hints, key, value, source):
    if key not in fields:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key '{key}' for {cls.__name__}; known keys: {known}")
    try:
        return _coerce(hints[key], value)
    except TypeError:
        raise ConfigError(
            f"{source}: key '{key}' must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})"
        ) from None


def _coerce(tp, value):
    """Return `value` converted to type `tp` where the conversion is lossless; raise TypeError otherwise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(option, value)
            except TypeError:
                continue
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is Literal:
        # Compare type as well as value: YAML's `true` must not match a Literal[1].
        if any(value == allowed and type(value) is type(allowed) for allowed in get_args(tp)):
            return value
        raise TypeError
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise TypeError
            return tuple(_coerce(a, v) for a, v in zip(args, value, strict=True))
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value) if origin is tuple else [_coerce(inner, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise TypeError from None
        else:
            raise TypeError
        # NaN compares false with every bound, so `lighting_std=nan` would pass `>= 0` checks and silently turn
        # the feature off; inf is never a learning rate or a standard deviation either.
        if not math.isfinite(number):
            raise TypeError
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise TypeError
    raise TypeError


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if tp is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )
