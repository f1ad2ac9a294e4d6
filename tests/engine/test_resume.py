"""Crash safety: the journal survives SIGKILL; machines resume by their table."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.journal import Checkpoint, Journal, read_journal
from tests.engine.examples import FetcherMachine, FetchThing
from tests.engine.harness import make_engine

REPO = Path(__file__).resolve().parents[2]


def _spawn(journal: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.engine.burst_writer", str(journal), mode],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )


def _kill_when(proc: subprocess.Popen[str], line: str) -> None:
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def test_journal_is_readable_after_sigkill_in_a_burst(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    _kill_when(_spawn(path, "burst"), "bursting")
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    entries = list(read_journal(path))
    assert len(entries) > 1000
    seqs = [e.seq for e in entries]
    assert seqs == list(range(1, len(seqs) + 1)), "committed rows must be a gap-free prefix"
    # Every tick flips the counter, so the journal alternates its transitions.
    ticks = [e for e in entries if e.name == "tick"]
    assert all(t.transitions[0]["source"] != t.transitions[0]["target"] for t in ticks)


def test_a_killed_machine_resumes_through_its_resume_table(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    _kill_when(_spawn(path, "fetch"), "in-fetching")
    dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine)], path, start_ms=time.time_ns() // 1_000_000)
    fetcher = dispatcher.machines["fetcher"]
    assert fetcher.state_name == "fetching"
    assert fetcher.url == "https://example.invalid/x"
    entries = list(read_journal(path))
    resumed = [e for e in entries if e.name == "resumed"]
    assert resumed[-1].data == {"from_state": "fetching", "crash_loop": False}
    assert resumed[-1].effects[0]["type"] == FetchThing.__name__, "the interrupted fetch is issued again"
    assert journal is not None and journal.load_checkpoints()["fetcher"].resume_count == 1


def test_the_loop_guard_turns_endless_crash_restarts_into_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    seed = Journal(path)
    seed.save_checkpoint(Checkpoint("fetcher", "fetching", {"url": "u", "attempts": 1}, 0), 0)
    seed.close()
    states = []
    for _ in range(FetcherMachine.max_resumes + 1):
        dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine)], path)
        states.append(dispatcher.machines["fetcher"].state_name)
        assert journal is not None
        journal.close()  # the "crash": nothing reaches a resting state
    assert states == ["fetching"] * FetcherMachine.max_resumes + ["failed"]
    crash = [e for e in read_journal(path) if e.name == "resumed"][-1]
    assert crash.data["crash_loop"] is True


def test_reaching_a_rest_state_resets_the_loop_guard(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine)], path)
    dispatcher.post("test", "fetch_requested", {"url": "u"})
    dispatcher.run_until_idle()
    assert journal is not None
    journal.close()
    dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine)], path)
    assert journal is not None and journal.load_checkpoints()["fetcher"].resume_count == 1
    fetch_id = [e for e in read_journal(path) if e.name == "resumed"][-1].effects[0]["id"]
    from teg_fsm.engine.events import Outcome

    dispatcher.post_outcome("fetcher", FetchThing(id=fetch_id, url="u", reply="fetch"), Outcome.SUCCEEDED, {"result": 1})
    dispatcher.run_until_idle()
    assert journal.load_checkpoints()["fetcher"] == Checkpoint("fetcher", "done", {"url": "u", "attempts": 2}, 0)
