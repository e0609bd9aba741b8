"""Typed plug-in configurations, config files and ``--set section.key=value`` overrides.

Each plug-in declares a dataclass whose defaults are its reference method's. A field may carry
bounds or a fixed set of choices in its metadata::

    @dataclass
    class Config:
        lr: float = field(default=0.01, metadata=bounds(min=0))
        loss: str = field(default="l2", metadata=bounds(choices=("l1", "l2")))

``build_config`` checks every key and value and names the offending key and the valid ones.
Values from several layers (method defaults, the model's budget, the concept, the config file,
the command line) are merged in that order, later layers winning.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


def bounds(*, min: float | None = None, max: float | None = None, choices: tuple | None = None,
           result_neutral: bool = False) -> dict:
    """Field metadata: inclusive numeric bounds or a fixed set of valid values.

    ``result_neutral`` marks a field that cannot change results, such as a checkpoint interval:
    it is recorded with the config but left out of the run key and the erasure cache key.
    """
    return {"min": min, "max": max, "choices": choices, "result_neutral": result_neutral}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` as ``annotation``, or raise ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for option in arguments:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")

    if origin in (tuple, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = arguments[0] if arguments else Any
        items = [_coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if origin is tuple else items

    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)

    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(annotation)}")


def _check_bounds(value: Any, metadata: Mapping, key: str) -> None:
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: invalid value {value!r}; valid: {', '.join(map(str, choices))}")
    low, high = metadata.get("min"), metadata.get("max")
    if low is not None and value is not None and value < low:
        raise ConfigError(f"{key}: {value!r} is below the minimum {low}")
    if high is not None and value is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is above the maximum {high}")


def _unknown_key_message(key: str, section: str, valid: list[str], plugin: str | None = None) -> str:
    if not valid:
        owner = f"{section} {plugin!r}" if plugin else f"this {section}"
        return (f"unknown key {section}.{key}: {owner} takes no settings; to set {key} for one {section} only, "
                f"use {section}/<name>.{key}")
    message = f"unknown key {section}.{key}; valid keys of {section}: {', '.join(valid)}"
    prefixed = [name for name in valid if key.startswith(name + "_") or name.startswith(key + "_")]
    close = prefixed or difflib.get_close_matches(key, valid, n=1)
    if close:
        message += f". Did you mean {section}.{close[0]}?"
    return message


def build_config(config_class: type, values: Mapping[str, Any] | None, section: str, plugin: str | None = None):
    """Create ``config_class`` from ``values``, checking every key, type and bound.

    ``plugin`` is the name of the plug-in the config belongs to, for error messages.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    values = dict(values or {})

    for key in values:
        if key not in fields:
            raise ConfigError(_unknown_key_message(key, section, sorted(fields), plugin))

    arguments = {}
    for name, field in fields.items():
        if name in values:
            value = _coerce(values[name], hints[name], f"{section}.{name}")
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            raise ConfigError(f"missing required key {section}.{name}")
        _check_bounds(value, field.metadata, f"{section}.{name}")
        arguments[name] = value
    return config_class(**arguments)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def identity_settings(config: Any) -> dict[str, Any]:
    """Return ``config_to_dict(config)`` without the fields marked ``result_neutral``."""
    settings = config_to_dict(config)
    if dataclasses.is_dataclass(config):
        for field in dataclasses.fields(config):
            if field.metadata.get("result_neutral"):
                settings.pop(field.name, None)
    return settings


def config_hash_source(config: Any) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


# ----------------------------------------------------------------------------------------
# Files and overrides


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML or TOML file of sections, e.g. ``{"attack": {"k": 5}, "run": {"seed": 1}}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"config file {path} must end in .yaml, .yml, .toml or .json")

    if not isinstance(data, dict) or not all(isinstance(value, dict) for value in data.values()):
        raise ConfigError(f"config file {path} must contain sections of key: value pairs, e.g. 'attack: {{k: 5}}'")
    return data


def parse_set_option(option: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as YAML, so ``1e-5``, ``true`` and ``[1, 2]`` work."""
    if "=" not in option:
        raise ConfigError(f"invalid --set {option!r}; expected section.key=value, e.g. attack.k=5")
    dotted, raw_value = option.split("=", 1)
    if "." not in dotted:
        raise ConfigError(f"invalid --set {option!r}; the key needs a section, e.g. attack.k=5")
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid value in --set {option!r}: {error}") from error
    # YAML reads 1e-5 as a string; numbers in that form are what users type for learning rates.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return section.strip(), key.strip(), value


def merge_layers(*layers: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Merge section dicts; keys in later layers replace those in earlier ones."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            merged.setdefault(section, {}).update(values or {})
    return merged
