"""``teg status``: every machine's state from the checkpoints, diagrams with the active state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from teg_fsm.engine.journal import Checkpoint, Journal

REPO = Path(__file__).resolve().parents[2]


def _status(data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", "status", "--data", str(data), *extra],
                          cwd=REPO, capture_output=True, text=True)


def test_status_lists_every_checkpointed_machine_and_highlights_it_in_mermaid(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "teg_journal.db")
    journal.save_checkpoint(Checkpoint("ota", "probation", {}, 0), 1_700_000_000_000)
    journal.save_checkpoint(Checkpoint("connection", "online", {}, 0), 1_700_000_000_000)
    journal.close()
    plain = _status(tmp_path)
    assert plain.returncode == 0, plain.stderr
    machine_lines = [line for line in plain.stdout.splitlines() if " since " in line]
    assert machine_lines == [
        "connection     online                 since 2023-11-14T22:13:20.000+00:00",
        "ota            probation              since 2023-11-14T22:13:20.000+00:00",
    ]
    mermaid = _status(tmp_path, "--mermaid").stdout
    ota = mermaid[mermaid.index("%% ota: probation"):]
    ota = ota[: ota.index("%% provisioning")]
    assert "stateDiagram-v2" in ota and "probation:::active" in ota
    assert "%% connection: online" in mermaid and "%% uplink: offline" in mermaid  # no checkpoint: initial state


def test_status_without_a_journal_says_where_it_looked(tmp_path: Path) -> None:
    done = _status(tmp_path)
    assert done.returncode == 2
    assert f"no journal at {tmp_path / 'teg_journal.db'}" in done.stderr
