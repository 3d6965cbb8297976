"""Progress lines in logs: periodic plain lines with rate and ETA, not carriage-return bars."""

from __future__ import annotations

import io

from pathvl.progress import PlainProgress, tqdm


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = tqdm(total=10, desc="embed", unit="patch", file=out, dynamic_ncols=True, leave=True)
    assert isinstance(bar, PlainProgress)
    bar.every = 0.0  # write on every update
    for _ in range(4):
        bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and "\r" not in out.getvalue()
    assert lines[0].startswith("embed: 1/10 patch (10%)") and "ETA" in lines[0]
    assert lines[4].endswith("loss=0.5") and lines[-1].startswith("embed: 5/10 patch (50%)")


def test_iteration_throttling_and_inner_bars():
    out = io.StringIO()
    items = list(PlainProgress(range(100), desc="x", every=3600, stream=out))
    assert items == list(range(100))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]] and "100/100" in out.getvalue()
    quiet = io.StringIO()
    list(PlainProgress(range(5), desc="inner", every=3600, stream=quiet, leave=False))
    assert quiet.getvalue() == ""
    none = io.StringIO()
    list(PlainProgress(range(5), desc="off", stream=none, disable=True))
    assert none.getvalue() == ""
