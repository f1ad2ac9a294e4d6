"""The queue watch: what wakes the uplink's I/O thread, on real inotify.

The queue's directory is by default the gateway's own data directory, so its
journal, outbox and archive are written beside the controller's queue. Those
writes must not count as changes (each one woke the I/O thread); the queue
file and its -wal must, including after they are deleted and created again.
"""

from __future__ import annotations

import os
import select
import sqlite3
from pathlib import Path

import pytest

from teg_fsm.adapters.file_watch import FileWatch


def readable(watch: FileWatch, timeout: float = 0.2) -> bool:
    return bool(select.select([watch.fileno()], [], [], timeout)[0])


def append(path: Path, data: bytes = b"frame") -> None:
    with path.open("ab") as f:
        f.write(data)


@pytest.fixture()
def queue_watch(tmp_path: Path):
    db = tmp_path / "communication_queue.db"
    db.write_bytes(b"")
    watch = FileWatch(tmp_path, (db, Path(f"{db}-wal")))
    if not watch.uses_inotify:
        pytest.skip("no inotify here: the stat-polling fallback has its own tests")
    yield tmp_path, db, watch
    watch.close()


def test_writes_to_other_files_in_the_directory_do_not_wake_the_watch(queue_watch) -> None:
    directory, _, watch = queue_watch
    journal = directory / "teg_journal.db-wal"
    journal.write_bytes(b"x")  # created: a name the watch does not care about
    watch.changed()
    for _ in range(20):
        append(journal)
    assert not readable(watch), "a journal write woke the queue watch"
    assert not watch.changed()


def test_a_write_to_the_queue_or_its_wal_is_a_change(queue_watch) -> None:
    _, db, watch = queue_watch
    append(db, b"row")
    assert readable(watch) and watch.changed()
    assert not watch.changed(), "one write, one change"
    wal = Path(f"{db}-wal")
    wal.write_bytes(b"")  # SQLite creates the -wal when the first writer opens the file
    assert watch.changed()
    append(wal)
    assert readable(watch) and watch.changed(), "the -wal created after the watch started is watched"


def test_a_replaced_queue_file_is_watched_again(queue_watch) -> None:
    directory, db, watch = queue_watch
    db.unlink()
    assert watch.changed(), "the queue going away is a change"
    replacement = directory / "communication_queue.db.new"
    replacement.write_bytes(b"")
    os.rename(replacement, db)
    assert watch.changed(), "a file renamed over the queue is a change"
    append(db, b"row")
    assert readable(watch) and watch.changed(), "the new file's writes are seen"


def test_a_controller_commit_through_sqlite_wakes_the_watch(queue_watch) -> None:
    _, db, watch = queue_watch
    db.unlink()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, type TEXT, message TEXT)")
    conn.commit()
    watch.changed()
    conn.execute("INSERT INTO messages (type, message) VALUES ('measurement', '{}')")
    conn.commit()
    conn.close()
    assert readable(watch) and watch.changed()
