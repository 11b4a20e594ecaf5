"""Typed, frozen parameters loaded from ``params.yaml`` plus an optional profile override.

Every knob of the pipeline lives in ``params.yaml``. A profile (``profiles/<name>.yaml``)
overrides some of them; the active profile is the top-level ``profile`` key, so DVC sees a
profile switch as a parameter change (``dvc exp run -S profile=quickstart``). Loading turns
the merged mapping into frozen dataclasses and rejects unknown keys and bad values with a
one-line ``ConfigError`` that names the offending key, so a typo never silently falls back
to a default.

The sections themselves, with their checks, are :mod:`braintumor.core.schema`; this
module reads the files and builds them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from braintumor.core.schema import BASE_PROFILE, PROFILE_NAME, ConfigError, Params


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ``ConfigError`` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return section_from_mapping(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0]
        return tuple(_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = args
        return {
            _convert(key_type, k, f"{key}.{k}"): _convert(value_type, v, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            # NaN compares false with everything, so it would slip past every range check.
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # a bug in this module, not the file


def section_from_mapping(cls: type, data: Any, prefix: str) -> Any:
    """One section (a schema dataclass) from a mapping, every value converted and checked;
    ``prefix`` is its dotted key for the messages. Also builds a section read from
    elsewhere than params.yaml (a registered model's serving settings)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{prefix or 'params'}: {error}") from None
    except ConfigError as error:
        # Section validators name keys relative to themselves; make them absolute.
        raise ConfigError(f"{prefix}.{error}" if prefix else str(error)) from None


def params_from_mapping(raw: Mapping[str, Any], profile_dir: Path | None = None) -> Params:
    """Build ``Params`` from a parsed ``params.yaml``, applying its profile's overrides."""
    profile = raw.get("profile", BASE_PROFILE)
    if not isinstance(profile, str):
        raise ConfigError(f"profile: expected a profile name, got {profile!r}")
    if not PROFILE_NAME.fullmatch(profile):
        raise ConfigError(
            f"profile: {profile!r} is not a plain profile name (letters, digits, '-', '_'; "
            "it names profiles/<profile>.yaml)"
        )
    merged = dict(raw)
    if profile != BASE_PROFILE:
        if profile_dir is None:
            raise ConfigError(f"profile: {profile!r} needs a profiles folder")
        override_path = profile_dir / f"{profile}.yaml"
        if not override_path.resolve().is_relative_to(profile_dir.resolve()):
            raise ConfigError(f"profile: {override_path} resolves outside {profile_dir}")
        if not override_path.is_file():
            raise ConfigError(f"profile: no profile file {override_path}")
        override = _read_yaml(override_path)
        merged = deep_merge(merged, override)
    return section_from_mapping(Params, merged, "")


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``3e-05`` is a number, not a string.
    ``dvc exp run -S train.finetune.learning_rate=3e-5`` writes exactly that (its writer
    speaks YAML 1.2, PyYAML's resolver wants a dot in the mantissa)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamsLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load ``params.yaml`` (and ``profiles/<profile>.yaml`` beside it) into ``Params``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    return params_from_mapping(_read_yaml(path), path.parent / "profiles")


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params into dotted keys (for MLflow ``log_params``)."""
    if dataclasses.is_dataclass(params):
        params = dataclasses.asdict(params)
    flat: dict[str, Any] = {}
    if isinstance(params, Mapping):
        for key, value in params.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(params, list | tuple) and params and isinstance(params[0], Mapping):
        for index, value in enumerate(params):
            name = value.get("name", index)
            flat.update(flatten(value, f"{prefix}.{name}"))
    else:
        flat[prefix] = params
    return flat
