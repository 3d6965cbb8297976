"""Config files: YAML with ``base:`` inheritance, ``key=value`` overrides, the saved resolved config."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pathvl.config.sections import ConfigError, FamilySchema, TrainConfig
from pathvl.config.validate import _SECTIONS, _describe, config_from_dict

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Folder of the configs shipped with the package (``load_config("mrplip-tiny")``)."""

# ---------------------------------------------------------------------------------------- YAML + CLI
def list_packaged_configs() -> list[str]:
    """Names of the configs shipped in ``pathvl/configs`` (usable as ``--config NAME`` or ``base: NAME``)."""
    if not PACKAGED_DIR.is_dir():
        return []
    return sorted(p.stem for p in PACKAGED_DIR.glob("*.yaml"))


def _resolve_config_path(ref: str | Path, relative_to: Path | None) -> Path:
    ref_path = Path(ref).expanduser()
    candidates = []
    if relative_to is not None and not ref_path.is_absolute():
        candidates.append(relative_to / ref_path)
    candidates.append(ref_path)
    name = str(ref)
    if "/" not in name and "\\" not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        candidates.append(PACKAGED_DIR / f"{stem}.yaml")
    for path in candidates:
        if path.is_file():
            return path.resolve()
    packaged = ", ".join(list_packaged_configs()) or "none"
    raise FileNotFoundError(f"config {str(ref)!r} not found (a YAML file, or a packaged config: {packaged})")


def _merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in ``delta`` replaces."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files include each other in a cycle: {cycle}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {_describe(raw)}")
    raw = dict(raw)
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of them, got {_describe(bases)}")
    merged: dict[str, Any] = {}
    for ref in bases:
        merged = _merge(merged, _read_yaml_tree(_resolve_config_path(ref, path.parent), (*chain, path)))
    return _merge(merged, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value`` into the key path and the YAML-parsed value.

    ``optim.lr=3e-4`` gives ``(['optim', 'lr'], '3e-4')`` (turned into a float by validation, since YAML
    1.1 reads exponent notation without a dot as a string); ``data.mags=[20]`` gives ``[20]``;
    ``run.backend=null`` gives None; a value YAML cannot parse stays a string.

    Raises:
        ConfigError: No ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value (e.g. optim.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def _apply_override(raw: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            dotted = ".".join(parts[: i + 1])
            raise ConfigError(f"override {text!r}: '{dotted}' is a value ({_describe(child)}), not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    source: str | Path | Mapping[str, Any] | None, overrides: Sequence[str], schemas: Mapping[str, FamilySchema]
) -> TrainConfig:
    """Loads a YAML config (following ``base:``), applies ``key=value`` overrides and validates.

    Args:
        source: A YAML path, the name of a packaged config (``mrplip-tiny``), an already-parsed mapping,
            or None (defaults only; then the overrides must at least give ``family=...``).
        overrides: Dotted ``key=value`` strings, applied in order after the files.
        schemas: The known families (:func:`pathvl.families.load_config` passes the registry).

    Returns:
        The validated config.

    Raises:
        ConfigError: Unknown keys, wrong types, invalid values or malformed overrides.
        FileNotFoundError: The config file (or a base) does not exist.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
        if "base" in raw:
            bases = raw.pop("base")
            bases = [bases] if isinstance(bases, str) else list(bases)
            merged: dict[str, Any] = {}
            for ref in bases:
                merged = _merge(merged, _read_yaml_tree(_resolve_config_path(ref, None)))
            raw = _merge(merged, raw)
    else:
        raw = _read_yaml_tree(_resolve_config_path(source, None))
    raw = copy.deepcopy(raw)  # overrides must not touch the caller's mapping
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(raw, parts, value, text)
    return config_from_dict(raw, schemas)


def resolve_paths(cfg: TrainConfig, base: Path | None = None) -> TrainConfig:
    """A copy of ``cfg`` with every path-valued field absolute (relative to ``base``, default the working
    directory), so a saved config means the same files from any directory (``--resume`` elsewhere).

    Path fields are those whose dataclass field metadata has ``path=True`` (a prefix such as ``bert:``
    given as ``path_prefix`` is kept); empty strings and non-path values (``tiny``) are left alone.
    """
    base = Path.cwd() if base is None else base

    def fix(obj: Any) -> None:
        if not dataclasses.is_dataclass(obj):
            return
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            prefix = f.metadata.get("path_prefix")
            if isinstance(value, str) and value and (f.metadata.get("path") or (prefix and value.startswith(prefix))):
                head = prefix if prefix and value.startswith(prefix) else ""
                rest = value[len(head):]
                if rest in f.metadata.get("not_paths", ()):
                    continue
                p = Path(rest).expanduser()
                object.__setattr__(obj, f.name, head + str(p if p.is_absolute() else (base / p).resolve()))
            elif dataclasses.is_dataclass(value):
                fix(value)

    cfg = copy.deepcopy(cfg)
    for section in (cfg.run, cfg.data, cfg.model):
        fix(section)
    return cfg


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain YAML/JSON types (tuples become lists), sections in a fixed order."""
    return {name: _plain(getattr(cfg, name)) for name in _SECTIONS}


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text that :func:`load_config` reads back to an equal object."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Writes the resolved config, its paths made absolute (atomically: ``*.tmp`` then rename), and
    returns its path."""
    from pathvl import __version__

    cfg = resolve_paths(cfg)  # the saved file means the same files from any directory
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    header = f"# resolved config written by pathvl {__version__}; rerun with: pathvl pretrain --config {path.name}\n"
    tmp.write_text(header + config_to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def config_hash(cfg: TrainConfig) -> str:
    """Short sha256 of the resolved config (recorded in checkpoints)."""
    text = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
