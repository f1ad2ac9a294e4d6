"""Snapshot policy: CI never updates snapshots and fails on unused ones (STYLE.md item 10).

syrupy 7 exits non-zero when a run that covers a snapshot file leaves some of
its snapshots unused, unless ``--snapshot-warn-unused`` is given. These tests
check that behaviour with the project's pytest settings, so an upgrade or an
addopts change that weakens it is caught.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_TEST = '''
from tests_syrupy_serializer import TegSnapshotExtension

def test_kept(snapshot):
    assert {"id": "ota:3:0", "path": "/tmp/teg-x/y"} == snapshot.use_extension(TegSnapshotExtension)
'''


def _run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on ``directory`` with the project's ini options (pyproject addopts)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(directory), "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(directory), "-p", "no:cacheprovider", "-q", *args],
        cwd=directory, capture_output=True, text=True, check=False, env={"PYTHONPATH": str(directory), "PATH": "/usr/bin:/bin"},
    )


def test_an_unused_snapshot_fails_the_run_and_a_used_one_passes(tmp_path: Path) -> None:
    (tmp_path / "tests_syrupy_serializer.py").write_text((REPO / "tests" / "syrupy_serializer.py").read_text())
    (tmp_path / "test_policy.py").write_text(_TEST)
    created = _run_pytest(tmp_path, "--snapshot-update")
    assert created.returncode == 0, created.stdout + created.stderr
    ambr = tmp_path / "__snapshots__" / "test_policy.ambr"
    assert "<effect-id>" in ambr.read_text() and "<tmp>/y" in ambr.read_text()
    assert _run_pytest(tmp_path).returncode == 0

    ambr.write_text(ambr.read_text() + "# name: test_removed_long_ago\n  'stale'\n# ---\n")
    stale = _run_pytest(tmp_path)
    assert stale.returncode == 1, stale.stdout
    assert "1 snapshot unused" in stale.stdout


def test_ci_test_command_never_updates_snapshots() -> None:
    ci = (REPO / "tools" / "ci" / "test.sh").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    for text in (ci, pyproject):
        assert "--snapshot-update" not in text
        assert "--snapshot-warn-unused" not in text
