"""The registry of trainable model families (timm-style: a decorator on the class, looked up by name).

A family is everything training and evaluation need to know about one model beyond its network
(:mod:`pathvl.models` holds networks only):

- ``model_config`` / ``data_config``: dataclasses of the ``model:`` and ``data:`` config sections;
- ``loss_names``: the loss terms a config may weight;
- :meth:`Family.build_data`: batches for this rank (a :class:`~pathvl.data.loader.StepLoader`);
- :meth:`Family.build_losses`: ``{name: loss module}``;
- :meth:`Family.complete_config`: fills what the config leaves to the data (``feature_dim``), so the saved
  config describes the model completely;
- :meth:`Family.model_from_config`: the network from its config alone. **Pure: it reads no file of the
  user's data**, so :func:`pathvl.eval.loading.load_for_eval` rebuilds any checkpoint on a machine that
  has neither the dataset nor the texts it was trained on;
- :meth:`Family.init_for_training`: what only a fresh training run does (feature statistics from the
  dataset, stage-1 weights from ``init_from``); its results live in the state dict.

Example::

    @register_family
    class ToyFamily(Family):
        name = "toy"
        model_config = ToyConfig
        loss_names = ("mse",)
        def model_from_config(self, model_cfg, losses=None): return ToyModel(model_cfg)
        def build_data(self, cfg, dist): return StepLoader.from_config(ToyData(), cfg, dist)
        def build_losses(self, cfg, dist): return {"mse": MSE()}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from pathvl.config import ConfigError, DataConfig, FamilySchema, TrainConfig
from pathvl.config import config_from_dict as _config_from_dict
from pathvl.config import load_config as _load_config
from pathvl.dist import DistInfo

__all__ = [
    "Family",
    "config_from_dict",
    "families_of_kind",
    "get_family",
    "list_families",
    "load_config",
    "register_family",
    "schemas",
]


class Family:
    """Base class of a model family; subclass it and decorate the subclass with :func:`register_family`."""

    name: ClassVar[str] = ""
    model_config: ClassVar[type]
    data_config: ClassVar[type] = DataConfig
    loss_names: ClassVar[tuple[str, ...] | None] = None
    kind: ClassVar[str] = "tile"
    """``tile`` (the model embeds single patches: :class:`pathvl.eval.protocols.TileModel`) or ``slide``
    (it embeds whole slides: :class:`pathvl.eval.protocols.SlideModel`)."""

    @property
    def schema(self) -> FamilySchema:
        """What config validation needs (:class:`pathvl.config.FamilySchema`)."""
        return FamilySchema(self.name, self.model_config, self.data_config, self.loss_names)

    def build_data(self, cfg: TrainConfig, dist: DistInfo) -> Any:
        """Batches for this rank; give them ``state_dict``/``load_state_dict`` for an exact resume."""
        raise NotImplementedError

    def build_losses(self, cfg: TrainConfig, dist: DistInfo) -> dict[str, nn.Module]:
        """``{name: loss}``; each is called as ``loss(**outputs)``; only positively weighted terms are used."""
        raise NotImplementedError

    def model_from_config(self, model_cfg: Any, losses: Sequence[str] | None = None) -> nn.Module:
        """The network from its config (pure: reads no dataset, text or label file).

        Args:
            model_cfg: An instance of :attr:`model_config`, complete (e.g. ``feature_dim`` set).
            losses: Active loss names (parts of inactive losses are not built); None: all.
        """
        raise NotImplementedError

    def complete_config(self, cfg: TrainConfig, data: Any) -> None:
        """Fills config values left to the data; by default ``model.feature_dim`` from the dataset."""
        mc = cfg.model
        if dataclasses.is_dataclass(mc) and hasattr(mc, "feature_dim") and mc.feature_dim <= 0:
            dataset = getattr(data, "dataset", data)
            cfg.model = dataclasses.replace(mc, feature_dim=int(dataset.feature_dim))

    def init_for_training(self, model: nn.Module, cfg: TrainConfig, data: Any) -> None:
        """Initialisation only a fresh run does (statistics, stage-1 weights); nothing by default."""


_FAMILIES: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator registering a :class:`Family` subclass under ``cls.name``.

    Raises:
        TypeError: Not a Family subclass, or its config sections are not dataclasses.
        ValueError: Another class is already registered under that name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)) or not cls.name:
        raise TypeError(f"{cls!r}: register_family decorates Family subclasses that set a name")
    if not dataclasses.is_dataclass(cls.model_config):
        raise TypeError(f"model_config of family {cls.name!r} must be a dataclass")
    if not (isinstance(cls.data_config, type) and issubclass(cls.data_config, DataConfig)):
        raise TypeError(f"data_config of family {cls.name!r} must subclass DataConfig")
    old = _FAMILIES.get(cls.name)
    if old is not None and f"{type(old).__module__}.{type(old).__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
        raise ValueError(f"model family {cls.name!r} is already registered by {type(old).__qualname__}")
    _FAMILIES[cls.name] = cls()
    return cls


def get_family(name: str) -> Family:
    """The registered family ``name``.

    Raises:
        ConfigError: No such family (the message lists the known ones).
    """
    fam = _FAMILIES.get(name)
    if fam is None:
        raise ConfigError(f"family: unknown model family {name!r}; known families: {', '.join(list_families())}")
    return fam


def list_families() -> list[str]:
    """Names of the registered families."""
    return sorted(_FAMILIES)


def families_of_kind(kind: str) -> list[str]:
    """Names of the registered families of one kind (``tile`` or ``slide``)."""
    return sorted(n for n, f in _FAMILIES.items() if f.kind == kind)


def schemas() -> dict[str, FamilySchema]:
    """``{name: schema}`` of every registered family (what config validation takes)."""
    return {n: f.schema for n, f in _FAMILIES.items()}


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """:func:`pathvl.config.config_from_dict` against the registered families."""
    return _config_from_dict(raw, schemas())


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """:func:`pathvl.config.load_config` (YAML, ``base:``, overrides) against the registered families."""
    return _load_config(source, overrides, schemas())
