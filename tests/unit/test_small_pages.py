"""Page size of the gateway's own files: 1 KiB when new, kept when existing, converted by `teg migrate`.

At rest every commit writes whole pages to the WAL (docs/UPLINK.md "At rest"), so
the archive and the outbox are created with ``SMALL_PAGE_SIZE`` pages. A file left
by the existing gateway keeps its 4 KiB pages (drop-in) until ``teg migrate
--small-pages`` rewrites it; the controller's queue is never converted.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

from teg_fsm.adapters.gateway_logs import LogBuffer
from teg_fsm.adapters.outbox import OutboxStore
from teg_fsm.adapters.queue_store import QueueStore
from teg_fsm.engine.sqlite_files import SMALL_PAGE_SIZE
from tests.integration import uplink_rig as rig

TS0 = 1_700_000_000_000


def _page_size(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA page_size").fetchone()[0]


def _store(tmp_path: Path) -> QueueStore:
    return QueueStore(tmp_path / "communication_queue.db", tmp_path / "gateway_archive.db",
                      archive_max_rows=10**9, archive_max_bytes=10**12)


def _old_archive(path: Path, rows: int, page_size: int = 4096) -> None:
    """An archive as the existing gateway leaves it: SQLite's default 4 KiB pages, WAL."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(f"PRAGMA page_size={page_size}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE controller_archive (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "timestamp_ms INTEGER, message TEXT)")
        db.execute("CREATE INDEX controller_archive_timestamp_ms ON controller_archive (timestamp_ms)")
        db.execute("BEGIN")
        db.executemany("INSERT INTO controller_archive (timestamp_ms, message) VALUES (?, ?)",
                       ((TS0 + i, json.dumps({"seq": i, "co2": 400 + i % 100})) for i in range(rows)))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _rows(path: Path, table: str) -> list[tuple]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


# -- new files, existing files ----------------------------------------------------------


def test_a_new_archive_and_a_new_outbox_get_small_pages(tmp_path: Path) -> None:
    rig.create_queue(tmp_path / "communication_queue.db")
    _store(tmp_path).conn.close()
    OutboxStore(tmp_path / "outbox.db", 65536).close()
    LogBuffer(tmp_path / "logs.db").close()
    assert _page_size(tmp_path / "gateway_archive.db") == SMALL_PAGE_SIZE == 1024
    assert _page_size(tmp_path / "outbox.db") == 1024
    assert _page_size(tmp_path / "logs.db") == 1024
    assert _page_size(tmp_path / "communication_queue.db") == 4096  # the controller's, as it made it


def test_an_existing_4k_archive_is_opened_as_it_is_and_keeps_its_rows(tmp_path: Path) -> None:
    _old_archive(tmp_path / "gateway_archive.db", 500)
    before = _rows(tmp_path / "gateway_archive.db", "controller_archive")
    rig.create_queue(tmp_path / "communication_queue.db")
    store = _store(tmp_path)
    assert store.archive_rows == 500
    assert store.republish(TS0 - 1, TS0 + 10, 1000)["rows"] == 10
    store.conn.close()
    assert _page_size(tmp_path / "gateway_archive.db") == 4096
    assert _rows(tmp_path / "gateway_archive.db", "controller_archive") == before


def test_an_existing_4k_outbox_is_opened_as_it_is_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "gateway_logs_buffer.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE log_buffer (id INTEGER PRIMARY KEY AUTOINCREMENT, log_level TEXT, "
                   "message TEXT, timestamp_ms INTEGER)")
        db.execute("INSERT INTO log_buffer (log_level, message, timestamp_ms) VALUES ('INFO', 'kept', 1)")
    logs = LogBuffer(path)
    assert logs.top() == 1
    logs.close()
    store = OutboxStore(path, 65536)
    store.put("v1/devices/me/telemetry", json.dumps({"a": 1}), TS0)
    assert store.pending() == 1
    store.close()
    assert _page_size(path) == 4096
    assert _rows(path, "log_buffer")[0][2] == "kept"


def test_republish_and_discard_by_time_range_on_a_small_page_archive_with_many_rows(tmp_path: Path) -> None:
    _old_archive(tmp_path / "gateway_archive.db", 200_000, page_size=1024)
    rig.create_queue(tmp_path / "communication_queue.db")
    store = _store(tmp_path)
    assert store.archive_rows == 200_000
    got = store.republish(TS0 + 99_999, TS0 + 100_500, 10**6)  # exclusive bounds, as the RPC
    assert got["rows"] == 500 and got["skipped"] == 0
    pending = store.conn.execute("SELECT message FROM pending_mqtt_messages ORDER BY id").fetchall()
    assert [json.loads(m)["ts"] for (m,) in pending] == list(range(TS0 + 100_000, TS0 + 100_500))
    assert store.discard(TS0 - 1, TS0 + 150_000)["rows"] == 150_000
    assert store.archive_rows == 50_000
    store.conn.close()
    with closing(sqlite3.connect(tmp_path / "gateway_archive.db")) as db:
        assert db.execute("SELECT min(timestamp_ms) FROM controller_archive").fetchone()[0] == TS0 + 150_000
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
