"""The journal stays within its age and size bounds, oldest rows first."""

from __future__ import annotations

from pathlib import Path

from teg_fsm.engine.events import Event
from teg_fsm.engine.journal import Journal, Transition, read_journal


def _event(seq: int, ts_ms: int, blob: str = "") -> Event:
    return Event(seq, ts_ms, "test", "tick", {"blob": blob})


def test_rows_older_than_the_age_bound_are_pruned(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", max_age_s=60)
    for seq, ts in enumerate([0, 30_000, 90_000, 120_000], start=1):
        journal.record(_event(seq, ts), [Transition("m", "a", "b", "tick")], [])
    journal.flush()
    journal.prune()
    assert [e.seq for e in read_journal(tmp_path / "j.db")] == [3, 4]
    journal.close()


def test_the_oldest_rows_go_first_when_the_size_bound_is_hit(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", max_bytes=512 * 1024)
    for seq in range(1, 3001):
        journal.record(_event(seq, seq, "x" * 500), [], [])
    journal.flush()
    journal.prune()
    seqs = [e.seq for e in read_journal(tmp_path / "j.db")]
    assert 0 < len(seqs) < 3000
    assert seqs == list(range(seqs[0], 3001)), "what remains is the newest, contiguous"
    assert journal._used_bytes() <= 512 * 1024
    journal.close()
