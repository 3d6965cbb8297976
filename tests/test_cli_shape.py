"""One CLI shape (issue 15): every --help parses, --dataset everywhere, no flag prefixes, old spellings warn."""

from __future__ import annotations

import argparse

import pytest

from pathvl.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("cmd", _subcommands())
def test_every_help_parses(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["embed", "caption"])
def test_dataset_flag_and_deprecated_positional(cmd, tmp_path, capsys):
    extra = {"embed": ["--encoder", "colour-texture"], "caption": ["--captioner", "template"]}[cmd]
    missing = str(tmp_path / "nope")
    assert main([cmd, "--dataset", missing, *extra]) == 2
    assert "deprecated" not in capsys.readouterr().err
    assert main([cmd, missing, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("deprecated: the positional DATASET; write --dataset") == 1


def test_a_flag_prefix_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tile", "x.svs", "--out", "o", "--patch", "256"])
    assert e.value.code == 2
