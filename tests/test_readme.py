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


def walkthrough_commands(text: str) -> list[str]:
    """The commands of the shell blocks between "## Walkthrough" and the next "## " heading."""
    m = re.search(r"^## Walkthrough\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README.md has no '## Walkthrough' section"
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", m.group(1), flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "# your" in line:
                continue
            cmds.append(line.split("  #")[0].strip())
    return cmds


def test_walkthrough_is_found_and_uses_only_pathvl():
    cmds = walkthrough_commands(README.read_text(encoding="utf-8"))
    assert len(cmds) >= 8
    assert all(c.startswith("pathvl ") for c in cmds), [c for c in cmds if not c.startswith("pathvl ")]


@pytest.mark.slow
def test_walkthrough_runs_when_pasted(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATHVL_PROGRESS_EVERY": "3600"}
    for cmd in walkthrough_commands(README.read_text(encoding="utf-8")):
        argv = [sys.executable, "-m", "pathvl.cli", *shlex.split(cmd)[1:]]
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"`{cmd}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
