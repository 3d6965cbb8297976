"""The README's walkthrough runs when pasted: every shell block under "## Walkthrough", in order, in a temp
folder, through the real `pathvl` command. Lines marked `# your ...` need the user's own weights or a GPU
and are skipped; nothing else is."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough_blocks(text: str) -> list[list[str]]:
    """The commands of each shell block between "## Walkthrough" and the next "## " heading."""
    m = re.search(r"^## Walkthrough\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README.md has no '## Walkthrough' section"
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", m.group(1), flags=re.S):
        cmds = []
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "# your" in line:
                continue
            cmds.append(line.split("  #")[0].strip())
        blocks.append(cmds)
    return blocks


def walkthrough_commands(text: str) -> list[str]:
    """Every command of the walkthrough, in the README's order."""
    return [c for block in walkthrough_blocks(text) for c in block]


def test_walkthrough_is_found_and_uses_only_pathvl():
    cmds = walkthrough_commands(README.read_text(encoding="utf-8"))
    assert len(cmds) >= 8
    assert all(c.startswith("pathvl ") for c in cmds), [c for c in cmds if not c.startswith("pathvl ")]


@pytest.mark.slow
def test_walkthrough_runs_when_pasted(tmp_path):
    """The first block, then the others. The README says the blocks after the first are independent of each
    other (different dataset and run folders), so they run side by side, each in its own order: a block that
    needed another's output would fail here, and the two cores halve the test's time."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATHVL_PROGRESS_EVERY": "3600"}

    def run_block(cmds: list[str]) -> None:
        for cmd in cmds:
            argv = [sys.executable, "-m", "pathvl.cli", *shlex.split(cmd)[1:]]
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"`{cmd}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"

    first, *rest = walkthrough_blocks(README.read_text(encoding="utf-8"))
    run_block(first)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for fut in [pool.submit(run_block, cmds) for cmds in rest]:
            fut.result()
