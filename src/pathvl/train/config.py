"""Typed training configuration: dataclass defaults, YAML experiment files, ``key=value`` overrides.

Defaults are written once, in the dataclasses below (engine sections) and in each model family's own
config dataclass (``model:`` and, optionally, ``data:``). A YAML file states only the delta and may
inherit from another file with ``base:``; command-line overrides come last. Every key is checked
against the dataclasses before any work starts: an unknown key or a wrong type raises
:class:`ConfigError` naming the full dotted key (the approach of dinov2's ``utils/config.py``, with
dataclasses in place of OmegaConf).

A config file::

    base: mrplip-tiny            # a packaged config (src/pathvl/configs/*.yaml) or a relative path
    family: mrplip               # which registered model family builds model, data and losses
    run: {name: mrplip-demo, steps: 2000, ckpt_every: 500}
    optim: {lr: 3.0e-4, warmup_steps: 100, accum_steps: 2}
    data: {dataset: data/mrplip, batch_size: 64}
    model: {text_layers: 2}      # checked against the family's model config dataclass
    losses: {itc: 1.0, cvta: 1.0, mrtva: 0.5}   # name -> weight; 0 or absent switches a term off

Overrides use dotted keys and YAML scalar rules: ``optim.lr=3e-4 losses.mrtva=0 model.text_layers=2
data.mags=[20]``.

Model families register themselves with :func:`register_family`; a config names one with ``family:``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "FamilySpec",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "config_to_yaml",
    "get_family",
    "list_families",
    "list_packaged_configs",
    "load_config",
    "parse_override",
    "register_family",
    "save_config",
]

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Folder of the configs shipped with the package (``load_config("mrplip-tiny")``)."""

# Where the built-in families register themselves; imported on first use (no import-time cost).
_BUILTIN_FAMILY_MODULES: dict[str, tuple[str, ...]] = {
    "mrplip": ("pathvl.models.mrplip",),
    "pathflip": ("pathvl.models.pathflip",),
    "pathalign": ("pathvl.models.pathalign",),
}


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, missing value, bad override."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """Where the run lives and how long it lasts.

    Attributes:
        name: Run name; the run folder is ``out_dir/name``.
        out_dir: Parent folder of run folders.
        seed: Seed of python, numpy and torch (the model is initialised from it on every rank; each
            rank then continues from ``seed + rank``).
        steps: Number of optimizer steps (the length of the learning-rate schedule).
        log_every: Write a line to ``metrics.jsonl`` every this many steps.
        ckpt_every: Save a checkpoint every this many steps (0: only at the end).
        keep_last: Number of checkpoints kept on disk (older ones are deleted).
        device: ``auto`` (the local GPU when present, else the CPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` (autocast anywhere) or ``fp32``.
        backend: torch.distributed backend; default ``nccl`` on GPUs, ``gloo`` on CPUs.
        find_unused_parameters: Passed to DDP (set it when some parameters get no gradient in a step).
        save_frozen: Also store parameters with ``requires_grad=False`` in ``model.safetensors`` (turn it
            off when a large frozen language model is rebuilt from its own weights anyway).
        progress: Show a progress bar on rank 0.
    """

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    backend: str | None = None
    find_unused_parameters: bool = False
    save_frozen: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps must be >= 1")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _check(self.ckpt_every >= 0, "ckpt_every must be >= 0 (0: only at the end)")
        _check(self.keep_last >= 1, "keep_last must be >= 1")
        _check(bool(self.name) and "/" not in self.name, "name must be a non-empty folder name")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (see :mod:`pathvl.train.schedule`).

    Attributes:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay of matrices; biases, norms, scalars (temperatures) and names
            listed by a module's ``no_weight_decay()`` get none.
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear-warmup steps.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        grad_clip: Maximum global gradient norm (0 disables clipping; the norm is still logged).
        accum_steps: Micro-batches per optimizer step (effective batch = batch_size * accum_steps * world).
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accum_steps: int = 1

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas must lie in [0, 1)")
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")
        _check(self.accum_steps >= 1, "accum_steps must be >= 1")


@dataclass
class DataConfig:
    """Fields every family's data section has; a family may register a subclass with more.

    Attributes:
        dataset: Path of the dataset folder.
        batch_size: Micro-batch size per process.
        num_workers: DataLoader worker processes.
        shuffle: Shuffle each epoch (deterministically, from ``run.seed`` and the epoch).
    """

    dataset: str = ""
    batch_size: int = 32
    num_workers: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.num_workers >= 0, "num_workers must be >= 0")


@dataclass
class TrainConfig:
    """The whole resolved configuration of a training run.

    ``model`` holds an instance of the family's model config dataclass and ``data`` an instance of its
    data config (a :class:`DataConfig` subclass) once built by :func:`config_from_dict`.
    """

    family: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def active_losses(self) -> dict[str, float]:
        """Loss terms with a positive weight, in config order."""
        return {name: w for name, w in self.losses.items() if w > 0}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class FamilySpec:
    """What a model family contributes to training (see :func:`register_family`)."""

    name: str
    model_config_cls: type
    build_model: Callable[..., Any]
    build_data: Callable[..., Any]
    build_losses: Callable[..., Any]
    data_config_cls: type = DataConfig
    loss_names: tuple[str, ...] | None = None


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(
    name: str,
    model_config_cls: type,
    build_model: Callable[..., Any],
    build_data: Callable[..., Any],
    build_losses: Callable[..., Any],
    *,
    data_config_cls: type = DataConfig,
    loss_names: Iterable[str] | None = None,
    replace: bool = False,
) -> FamilySpec:
    """Registers a model family so that configs with ``family: <name>`` can be validated and trained.

    The three build functions are called by :func:`pathvl.train.engine.train` with
    ``(cfg: TrainConfig, dist: DistInfo)`` after the model section has been validated into
    ``model_config_cls`` and the data section into ``data_config_cls``:

    * ``build_model(cfg, dist) -> nn.Module`` whose ``forward(batch)`` returns a dict of named tensors;
    * ``build_data(cfg, dist)`` -> an iterable of batches (dicts of tensors) for this rank; for an
      exact resume give it ``state_dict()`` / ``load_state_dict()`` (:class:`pathvl.train.engine.StepLoader`
      does this for any map-style dataset);
    * ``build_losses(cfg, dist) -> dict[str, nn.Module]``; each is called as ``loss(**outputs)`` and
      returns a scalar. Only the terms with a positive weight in ``cfg.losses`` are used.

    Args:
        name: Family name used in configs (``mrplip``, ``pathflip``, ``pathalign``).
        model_config_cls: Dataclass of the ``model:`` section (defaults written there, once).
        build_model: See above.
        build_data: See above.
        build_losses: See above.
        data_config_cls: Dataclass of the ``data:`` section, a subclass of :class:`DataConfig`.
        loss_names: Loss names the family can build; configs naming others fail before any work.
        replace: Allow replacing an existing family of the same name.

    Returns:
        The registered spec.
    """
    if not dataclasses.is_dataclass(model_config_cls):
        raise TypeError(f"model_config_cls of family {name!r} must be a dataclass, got {model_config_cls!r}")
    if not (isinstance(data_config_cls, type) and issubclass(data_config_cls, DataConfig)):
        raise TypeError(f"data_config_cls of family {name!r} must subclass DataConfig")
    spec = FamilySpec(
        name=name,
        model_config_cls=model_config_cls,
        build_model=build_model,
        build_data=build_data,
        build_losses=build_losses,
        data_config_cls=data_config_cls,
        loss_names=tuple(loss_names) if loss_names is not None else None,
    )
    old = _FAMILIES.get(name)
    if old is not None and not replace and _spec_key(old) != _spec_key(spec):
        raise ValueError(f"model family {name!r} is already registered (pass replace=True to override)")
    _FAMILIES[name] = spec
    return spec


def _spec_key(spec: FamilySpec) -> tuple:
    # A module imported twice (e.g. as a script and as a module) registers equal-named objects.
    def qual(obj: Any) -> str:
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"

    return (qual(spec.model_config_cls), qual(spec.build_model), qual(spec.build_data),
            qual(spec.build_losses), qual(spec.data_config_cls), spec.loss_names)


def list_families() -> list[str]:
    """Names of the registered families plus the built-in ones (imported lazily)."""
    return sorted(set(_FAMILIES) | set(_BUILTIN_FAMILY_MODULES))


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``, importing a built-in family's module on first use.

    Raises:
        ConfigError: No such family.
    """
    if name not in _FAMILIES:
        for module in _BUILTIN_FAMILY_MODULES.get(name, ()):
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:  # the module exists but one of its imports is missing
                    raise
    if name not in _FAMILIES:
        raise ConfigError(f"family: unknown model family {name!r}; known families: {', '.join(list_families())}")
    return _FAMILIES[name]


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


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
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
    spec: FamilySpec | None = None
    if not family:
        errors.append(f"family: missing; set it to one of: {', '.join(list_families())}")
    elif not isinstance(family, str):
        errors.append(f"family: expected str, got {_describe(family)}")
    else:
        try:
            spec = get_family(family)
        except ConfigError as exc:
            errors.append(str(exc))

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
        data = section("data", spec.data_config_cls)
        model = section("model", spec.model_config_cls)
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
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """Loads a YAML config (following ``base:``), applies ``key=value`` overrides and validates.

    Args:
        source: A YAML path, the name of a packaged config (``mrplip-tiny``), an already-parsed mapping,
            or None (defaults only; then the overrides must at least give ``family=...``).
        overrides: Dotted ``key=value`` strings, applied in order after the files.

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
    return config_from_dict(raw)


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
    """Writes the resolved config (atomically: ``*.tmp`` then rename) and returns its path."""
    from pathvl import __version__

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
