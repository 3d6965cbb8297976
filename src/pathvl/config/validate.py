"""Validation of a merged config mapping against the typed sections (unknown keys and wrong types fail)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pathvl.config.sections import ConfigError, FamilySchema, OptimConfig, RunConfig, TrainConfig


# ----------------------------------------------------------------------------------------- validation
class _MismatchError(Exception):
    """A value that does not fit the declared type (message: what was expected)."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    text = str(tp).replace("typing.", "")
    return text.replace("NoneType", "None")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Checks ``value`` against annotation ``tp``, converting YAML forms (list -> tuple, '3e-4' -> float).

    Type mismatches of scalars raise :class:`_MismatchError`; problems inside nested dataclasses are
    appended to ``errors`` with their own dotted keys.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            trial: list[str] = []
            try:
                out = _convert(value, arm, key, trial)
            except _MismatchError:
                continue
            if not trial:
                return out
        raise _MismatchError(_type_name(tp))
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _MismatchError("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _MismatchError(f"a mapping ({tp.__name__})")
        return _build_dataclass(tp, value, key + ".", errors)
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, list | tuple):
            raise _MismatchError(_type_name(tp))
        item = args[0] if args else Any
        return [_convert_item(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, list | tuple):
            raise _MismatchError(_type_name(tp))
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert_item(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _MismatchError(f"{_type_name(tp)} ({len(args)} items)")
        return tuple(_convert_item(v, a, f"{key}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _MismatchError(_type_name(tp))
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if kt is str and not isinstance(k, str):
                errors.append(f"{key}.{k}: keys must be strings, got {_describe(k)}")
                continue
            out[k] = _convert_item(v, vt, f"{key}.{k}", errors)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _MismatchError("bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise _MismatchError("int")
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)  # 1e3 (PyYAML reads it as the string '1e3') or 1000.0
        raise _MismatchError("int")
    if tp is float:
        if isinstance(value, bool):
            raise _MismatchError("float")
        number = _as_float(value)
        if number is None:
            raise _MismatchError("float")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # run.name=2024
        raise _MismatchError("str")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _MismatchError(tp.__name__)
    return value


def _convert_item(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    try:
        return _convert(value, tp, key, errors)
    except _MismatchError as exc:
        errors.append(f"{key}: expected {exc}, got {_describe(value)}")
        return value


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # YAML 1.1 reads '3e-4' (no dot) as a string
        except ValueError:
            return None
    return None


def _unknown_key(dotted: str, valid: Sequence[str], section: str) -> str:
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{section + '.' if section else ''}{close[0]}'?)" if close else ""
    where = f"under '{section}'" if section else "at the top level"
    return f"unknown key '{dotted}'{hint}; valid keys {where}: {', '.join(sorted(valid))}"


def _build_dataclass(cls: type, data: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    """Builds dataclass ``cls`` from ``data``; problems go to ``errors`` with keys ``prefix + name``."""
    hints = typing.get_type_hints(cls)
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in init_fields]
    section = prefix[:-1]
    n_errors = len(errors)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            errors.append(_unknown_key(dotted, names, section))
            continue
        kwargs[key] = _convert_item(value, hints.get(key, Any), dotted, errors)
    for f in init_fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            errors.append(f"{prefix}{f.name}: missing (required, {_type_name(hints.get(f.name, Any))})")
    if len(errors) > n_errors:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{section or 'config'}: {exc}")
        return None


_SECTIONS = ("family", "run", "optim", "data", "model", "losses")


def config_from_dict(raw: Mapping[str, Any], schemas: Mapping[str, FamilySchema]) -> TrainConfig:
    """Validates a merged config mapping into a :class:`TrainConfig`.

    Args:
        raw: Mapping with the keys ``family``, ``run``, ``optim``, ``data``, ``model``, ``losses``
            (all but ``family`` optional).

    Raises:
        ConfigError: Listing every unknown key, wrong type, missing or invalid value, one per line.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping, got {_describe(raw)}")
    errors: list[str] = []
    for key in raw:
        if key not in _SECTIONS:
            errors.append(_unknown_key(str(key), _SECTIONS, ""))
    family = raw.get("family")
    spec: FamilySchema | None = None
    if not family:
        errors.append(f"family: missing; set it to one of: {', '.join(sorted(schemas))}")
    elif not isinstance(family, str):
        errors.append(f"family: expected str, got {_describe(family)}")
    else:
        spec = schemas.get(family)
        if spec is None:
            errors.append(f"family: unknown model family {family!r}; known families: {', '.join(sorted(schemas))}")

    def section(name: str, cls: type) -> Any:
        value = raw.get(name)
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            errors.append(f"{name}: expected a mapping of keys, got {_describe(value)}")
            return None
        return _build_dataclass(cls, value, name + ".", errors)

    run = section("run", RunConfig)
    optim = section("optim", OptimConfig)
    data = model = None
    losses: dict[str, float] = {}
    if spec is not None:
        data = section("data", spec.data_config)
        model = section("model", spec.model_config)
        losses = _convert_item(raw.get("losses") or {}, dict[str, float], "losses", errors)
        if isinstance(losses, Mapping):
            for name, weight in losses.items():
                if spec.loss_names is not None and name not in spec.loss_names:
                    errors.append(_unknown_key(f"losses.{name}", spec.loss_names, "losses"))
                elif isinstance(weight, float) and not (math.isfinite(weight) and weight >= 0):
                    errors.append(f"losses.{name}: weight must be a finite number >= 0, got {weight}")
            if not errors and not any(w > 0 for w in losses.values()):
                errors.append("losses: no loss term has a positive weight (e.g. losses.itc=1)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    assert spec is not None and isinstance(family, str)
    return TrainConfig(family=family, run=run, optim=optim, data=data, model=model, losses=dict(losses))

