"""Trainable model families: one module per family, registered by :func:`register_family`.

``mrplip`` (tile level), ``pathflip``, ``pathflip-instruct`` and ``pathalign`` (slide level) register on import
of this package.
See :mod:`pathvl.families.registry` for what a family provides.
"""

from pathvl.families import mrplip, pathalign, pathflip, pathflip_instruct  # noqa: F401  (registration)
from pathvl.families.registry import (
    Family,
    config_from_dict,
    families_of_kind,
    get_family,
    list_families,
    load_config,
    register_family,
    schemas,
)

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
