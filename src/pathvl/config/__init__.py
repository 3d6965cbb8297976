"""Typed training configuration: dataclass defaults, YAML experiment files, ``key=value`` overrides.

Defaults are written once, in the dataclasses of :mod:`pathvl.config.sections` (engine sections) and in
each model family's own config dataclasses (``model:`` and ``data:``, see :mod:`pathvl.families`). A YAML
file states only the delta and may inherit from another file with ``base:``; command-line overrides come
last. Every key is checked against the dataclasses before any work starts: an unknown key or a wrong type
raises :class:`ConfigError` naming the full dotted key (the approach of dinov2's ``utils/config.py``, with
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

This package sits below the model families: validation takes the families' schemas as an argument.
:func:`pathvl.families.load_config` is the entry point that knows the registered families.
"""

from pathvl.config.files import (
    PACKAGED_DIR,
    config_hash,
    config_to_dict,
    config_to_yaml,
    list_packaged_configs,
    load_config,
    parse_override,
    resolve_paths,
    save_config,
)
from pathvl.config.sections import (
    ConfigError,
    DataConfig,
    FamilySchema,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from pathvl.config.validate import config_from_dict

__all__ = [
    "PACKAGED_DIR",
    "ConfigError",
    "DataConfig",
    "FamilySchema",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "config_to_yaml",
    "list_packaged_configs",
    "load_config",
    "parse_override",
    "resolve_paths",
    "save_config",
]
