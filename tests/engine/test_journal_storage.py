"""What a group commit writes: small pages, no traffic index, no rewrite of an unchanged checkpoint."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from teg_fsm.engine import sqlite_files
from teg_fsm.engine.events import Event
from teg_fsm.engine.journal import PAGE_SIZE, Checkpoint, Journal, Transition, read_journal
from tools.bench_journal_frames import one_row, wal_frames

T0 = 1_800_000_000_000


def _checkpoint_rows(path: Path) -> dict[str, tuple[str, int]]:
    with closing(sqlite3.connect(path)) as db:
        return {m: (s, u) for m, s, u in db.execute("SELECT machine, state, updated_ms FROM checkpoints")}


def test_a_checkpoint_the_same_as_the_stored_one_is_not_rewritten(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "teg_journal.db")
    journal.save_checkpoint(Checkpoint("uplink", "idle", {}, 0), T0)
    # idle -> draining -> idle within one group: what reaches the file is the same idle.
    journal.save_checkpoint(Checkpoint("uplink", "draining", {}, 0), T0 + 1000, urgent=False)
    journal.save_checkpoint(Checkpoint("uplink", "idle", {}, 0), T0 + 1010, urgent=False)
    journal.flush()
    assert _checkpoint_rows(journal.path) == {"uplink": ("idle", T0)}
    # Any difference (state, data or resume count) is written.
    journal.save_checkpoint(Checkpoint("uplink", "idle", {"n": 1}, 0), T0 + 2000)
    journal.save_checkpoint(Checkpoint("uplink", "idle", {"n": 1}, 1), T0 + 3000)
    assert _checkpoint_rows(journal.path) == {"uplink": ("idle", T0 + 3000)}
    journal.save_checkpoint(Checkpoint("uplink", "draining", {"n": 1}, 1), T0 + 4000)
    journal.close()
    assert _checkpoint_rows(journal.path) == {"uplink": ("draining", T0 + 4000)}
    # A restart writes the first checkpoint of each machine again, even when it is the same.
    journal = Journal(tmp_path / "teg_journal.db")
    journal.save_checkpoint(Checkpoint("uplink", "draining", {"n": 1}, 1), T0 + 5000)
    journal.close()
    assert _checkpoint_rows(journal.path) == {"uplink": ("draining", T0 + 5000)}


def test_a_new_journal_has_small_pages_and_no_traffic_index(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "teg_journal.db")
    journal.close()
    with closing(sqlite3.connect(journal.path)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE == 1024
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert indexes == {"journal_ts", "journal_summary_ts", "sqlite_autoindex_checkpoints_1"}


def test_an_existing_journal_keeps_its_page_size_and_loses_the_traffic_index(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    old = sqlite_files.connect(path)  # SQLite's default page size, as older gateways created it
    old.executescript(
        "CREATE TABLE journal_traffic (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,"
        " source TEXT NOT NULL, name TEXT NOT NULL, target TEXT, data TEXT NOT NULL, transitions TEXT NOT NULL,"
        " effects TEXT NOT NULL);"
        "CREATE INDEX journal_traffic_ts ON journal_traffic(ts_ms);"
        "INSERT INTO journal_traffic VALUES (7, 7, 1800000000000, 'effect', 'transfer_succeeded', 'uplink',"
        " '{}', '[]', '[]');"
    )
    old.close()
    journal = Journal(path)
    assert journal.last_seq() == 7
    journal.record(Event(8, T0 + 1, "effect", "data_packet_succeeded", {}, "uplink"),
                   [Transition("uplink", "draining", "draining", "data_packet_succeeded")], [])
    journal.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'journal_traffic_ts'").fetchall() == []
    assert [e.seq for e in read_journal(path, since_ms=T0)] == [7, 8]


def test_a_controller_row_at_rest_costs_a_few_small_pages(tmp_path: Path) -> None:
    """The WAL frames of one group commit: the traffic table's tail, its parent, the header."""
    clock = [0.0]
    journal = Journal(tmp_path / "teg_journal.db", monotonic=lambda: clock[0])
    wal = Path(str(journal.path) + "-wal")
    seq, ts, frames = 1, T0, []
    for _ in range(50):
        before = wal_frames(wal)
        seq = one_row(journal, seq, ts)
        clock[0] += 1.0
        ts += 1000
        journal.flush_due()
        after = wal_frames(wal)
        if after[:len(before)] == before:  # not across a WAL checkpoint
            frames.append(len(after) - len(before))
    journal.close()
    # With 4 KiB pages, the ts index and the rewritten uplink checkpoint, the median was 3 frames
    # (12 KiB); now 5 of 1 KiB: the traffic table's new leaves, their parent and the header.
    frames.sort()
    assert frames[len(frames) // 2] * PAGE_SIZE <= 6 * 1024


def test_a_write_that_failed_on_a_taken_id_is_retried_with_the_next_free_one(tmp_path: Path) -> None:
    clock = [0.0]
    journal = Journal(tmp_path / "teg_journal.db", monotonic=lambda: clock[0])
    journal.record(Event(1, T0, "effect", "token_ready", {}, "connection"),
                   [Transition("connection", "offline", "connecting", "token_ready")], [])
    journal.flush()
    # Something else took the id this journal would use next (the file is the truth, not our count).
    with closing(sqlite3.connect(journal.path)) as other:
        other.execute("INSERT INTO journal (id, seq, ts_ms, source, name, target, data, transitions, effects)"
                      " VALUES (2, 99, ?, 'test', 'taken', NULL, '{}', '[]', '[]')", (T0,))
        other.commit()
    journal.record(Event(2, T0 + 1, "effect", "connect_succeeded", {}, "connection"),
                   [Transition("connection", "connecting", "online", "connect_succeeded")], [])
    journal.flush()
    assert journal.condition == "storage_error" and "UNIQUE" in journal.condition_detail
    clock[0] += 60  # past the retry backoff
    journal.flush()
    assert journal.condition is None
    journal.close()
    assert [(e.seq, e.name) for e in read_journal(journal.path)] == [(1, "token_ready"), (99, "taken"), (2, "connect_succeeded")]
