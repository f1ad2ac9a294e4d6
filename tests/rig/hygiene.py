"""Fail the run when tests leave files behind in the repository working tree.

Tests write to tmp dirs. At session start and finish we take the working tree's
``git status`` (untracked and ignored files included, each with its size and
mtime so edits to an already-dirty file count too) and compare. Paths that a
normal run creates (.venv, caches, egg-info) are left out.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_NOISE_PARTS = {".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".git"}  # .hypothesis: its cache, self-gitignored
_snapshot_key = pytest.StashKey["dict[str, tuple[str, int, int]] | None"]()


def _is_noise(path: str) -> bool:
    parts = Path(path).parts
    return bool(_NOISE_PARTS.intersection(parts)) or any(p.endswith(".egg-info") for p in parts)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def working_tree_snapshot(root: Path = REPO_ROOT) -> dict[str, tuple[str, int, int]] | None:
    """path -> (git status code, size, mtime) for every non-clean path; None if not a repo."""
    proc = subprocess.run(
        ["git", "status", "--porcelain=v1", "-z", "--ignored", "--untracked-files=all",
         "--", ".", ":(exclude).venv"],
        cwd=root, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        return None
    entries: dict[str, tuple[str, int, int]] = {}
    fields = iter(proc.stdout.split("\0"))
    for field in fields:
        if not field:
            continue
        code, path = field[:2], field[3:]
        if code[0] in "RC":
            next(fields, None)  # renames/copies carry the old path as a second field
        if not _is_noise(path):
            entries[path] = (code, *_stat(root / path))
    return entries


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_snapshot_key] = working_tree_snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_snapshot_key, None)
    if before is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    after = working_tree_snapshot() or {}
    # Only paths dirty now count: one that left the status became clean (e.g.
    # committed meanwhile), which is no leftover.
    changed = sorted(p for p, entry in after.items() if before.get(p) != entry)
    if not changed:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["tests left files behind in the working tree (write to tmp_path instead;",
             "or the checkout was edited while the tests ran):"]
    lines += [f"  {after[p][0]} {p}" for p in changed]
    if reporter is not None:
        reporter.write("\n")  # -q leaves the progress line open
        reporter.write_sep("=", "working tree changed", red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
