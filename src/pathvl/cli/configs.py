"""``pathvl configs [NAME]``: the packaged training configs, listed or printed."""

from __future__ import annotations

import argparse

from pathvl.cli import _Formatter


def _run(a: argparse.Namespace) -> int:
    from pathvl.config import PACKAGED_DIR, list_packaged_configs
    from pathvl.families import load_config

    names = list_packaged_configs()
    if not a.name:
        for name in names:
            first = (PACKAGED_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"{name:22s} {first}")
        print("\nprint one with `pathvl configs NAME` (--resolved for every default filled in)")
        return 0
    if a.name not in names:
        from pathvl.config import ConfigError

        raise ConfigError(f"no packaged config {a.name!r}; packaged configs: {', '.join(names)}")
    if a.resolved:
        from pathvl.config import config_to_yaml

        print(config_to_yaml(load_config(a.name)), end="")
    else:
        print((PACKAGED_DIR / f"{a.name}.yaml").read_text(encoding="utf-8"), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("configs", help="list the packaged training configs, or print one",
                       description="List the configs shipped with pathvl (usable as `pretrain --config NAME`), or "
                                   "print one as a starting point for your own YAML.",
                       epilog="example:\n  pathvl configs\n  pathvl configs pathflip-cpu > my.yaml\n"
                              "  pathvl configs mrplip-tiny --resolved\n", formatter_class=_Formatter)
    p.add_argument("name", nargs="?", help="a packaged config name")
    p.add_argument("--resolved", action="store_true", help="print the whole resolved config (every default)")
    p.set_defaults(func=_run)
