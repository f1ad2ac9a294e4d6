"""Every tool in tools/ runs the way the README names it: ``python tools/<name>.py``
from the repository root, with no package context (a tool that imports the test
rigs must put the root on its path itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py") if p.name != "__init__.py")


def test_the_list_of_tools_is_not_empty() -> None:
    assert "bench_uplink.py" in TOOLS and len(TOOLS) >= 8


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_starts_from_the_repository_root(tool: str) -> None:
    done = subprocess.run([sys.executable, f"tools/{tool}", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
