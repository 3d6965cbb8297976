"""The captioner interface and its registry: :class:`Captioner`, :func:`register_captioner`,
:func:`build_captioner` (see :mod:`pathvl.data.captioners` for what a captioner receives and returns)."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class Captioner:
    """Base class of captioners (subclass and decorate with :func:`register_captioner`).

    Attributes:
        name: Registry name (set by :func:`register_captioner`).
        kind: ``"template"``, ``"import"`` or ``"model"``.
        needs_pixels: Whether :meth:`caption` needs the patches' pixels.
        batch_size: Patches per :meth:`caption` call.
        counts: Running counts of noteworthy cases, reported by ``pathvl caption``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    needs_pixels: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self) -> None:
        self.batch_size = 1024
        self.counts: Counter[str] = Counter()

    def prepare(self) -> None:
        """Load what the captioner needs (a model...); called once before the first patch."""

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        """One caption per patch.

        Args:
            patches: ``(H, W, 3)`` uint8 arrays, or ``None`` each when ``needs_pixels`` is False.
            meta: One dict per patch (see the module docstring).

        Returns:
            The captions, in order.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The options the captioner was built with (JSON-serialisable)."""
        return {}

    def identity(self) -> dict[str, str]:
        """Attributes that must match for stored captions to count as this captioner's (resume check)."""
        return {"captioner": self.name}

    def info(self) -> dict[str, Any]:
        """What the captioner is, written as attributes of every captions dataset it produces."""
        return {"captioner": self.name, "kind": self.kind, "description": self.description,
                "options": json.dumps(self.options(), sort_keys=True, default=str)}

    def finish(self, processed: Collection[str], known: Collection[str]) -> dict[str, int]:
        """Run-level counts once every slide is done (e.g. rows of an imported file never used).

        Args:
            processed: Slide ids captioned in this run.
            known: Every slide id of the dataset.
        """
        return {}


_REGISTRY: dict[str, type[Captioner]] = {}


def register_captioner(name: str) -> Callable[[type[Captioner]], type[Captioner]]:
    """Class decorator adding a :class:`Captioner` subclass to the registry under ``name``."""

    def decorator(cls: type[Captioner]) -> type[Captioner]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"captioner {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_captioners() -> list[str]:
    """Registered captioner names."""
    return sorted(_REGISTRY)


def captioner_class(name: str) -> type[Captioner]:
    """The class registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown captioner {name!r}; available: {', '.join(list_captioners())}")
    return _REGISTRY[name]


def build_captioner(name: str, **opts: Any) -> Captioner:
    """Build a registered captioner.

    Args:
        name: Registry name (``template``, ``import``, ``llava``, ...).
        **opts: The captioner's options; ``None`` values are dropped so callers can pass every CLI
            option through.

    Raises:
        ValueError: Unknown captioner, or an option it does not take (the message lists valid ones).
    """
    cls = captioner_class(name)
    opts = {k: v for k, v in opts.items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"captioner {name!r} takes no option(s) {unknown}; valid options: {', '.join(valid)}")
    return cls(**opts)


def _mag_text(mag: float) -> str:
    return f"{float(mag):g}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()
