"""Page size of the gateway's own files: 1 KiB when new, kept when existing, converted by `teg migrate`.

At rest every commit writes whole pages to the WAL (docs/UPLINK.md "At rest"), so
the archive and the outbox are created with ``SMALL_PAGE_SIZE`` pages. A file left
by the existing gateway keeps its 4 KiB pages (drop-in) until ``teg migrate
--small-pages`` rewrites it; the controller's queue is never converted.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from teg_fsm.adapters.gateway_logs import LogBuffer
from teg_fsm.adapters.outbox import OutboxStore
from teg_fsm.adapters.queue_store import QueueStore
from teg_fsm.cli import main as cli
from teg_fsm.cli import migrate
from teg_fsm.cli.migrate import COPY_MARK, convert_data_dir, convert_file
from teg_fsm.cli.status import RunMarker
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


# -- teg migrate --small-pages ----------------------------------------------------------


def test_migrate_converts_the_gateways_files_and_keeps_every_row(tmp_path: Path) -> None:
    _old_archive(tmp_path / "gateway_archive.db", 20_000)
    before = _rows(tmp_path / "gateway_archive.db", "controller_archive")
    lines, ok = convert_data_dir(tmp_path, controller_queue=tmp_path / "communication_queue.db", blockers=[])
    assert ok, lines
    assert "4096 -> 1024 B pages, 20000 rows" in lines[0]
    assert "not there" in lines[1] and "not there" in lines[2]  # outbox, journal: new ones are small
    path = tmp_path / "gateway_archive.db"
    assert _page_size(path) == 1024
    assert _rows(path, "controller_archive") == before
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # AUTOINCREMENT goes on from where it was: ids are never reused
        assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'controller_archive'").fetchone()[0] == 20_000
    assert not list(tmp_path.glob(f"*{COPY_MARK}*"))
    assert convert_file(path).line.endswith("already 1024 B pages, unchanged")


def test_migrate_keeps_rows_still_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "gateway_archive.db"
    _old_archive(path, 100)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO controller_archive (timestamp_ms, message) VALUES (1, 'only in the wal')")
    # The writer's process ends without a checkpoint (as a killed gateway): copy its -wal aside.
    wal = Path(f"{path}-wal").read_bytes()
    writer.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("DELETE FROM controller_archive WHERE timestamp_ms = 1")
        db.execute("PRAGMA journal_mode=WAL")
    Path(f"{path}-wal").write_bytes(wal)
    assert convert_file(path).ok
    assert _rows(path, "controller_archive")[-1][2] == "only in the wal"


def test_migrate_refuses_the_controllers_queue_file(tmp_path: Path) -> None:
    queue = tmp_path / "communication_queue.db"
    rig.fill(queue, 100)
    before = queue.read_bytes()
    result = convert_file(queue)
    assert not result.ok and "controller's queue" in result.line
    assert queue.read_bytes() == before and _page_size(queue) == 4096
    # the same file under another name (a data directory that is also the controller's)
    os.link(queue, tmp_path / "gateway_archive.db")
    assert not convert_file(tmp_path / "gateway_archive.db", protected=queue).ok
    assert _page_size(queue) == 4096


def test_migrate_does_nothing_while_the_gateway_runs(tmp_path: Path) -> None:
    _old_archive(tmp_path / "gateway_archive.db", 10)
    running = RunMarker(tmp_path)
    running.acquire(0)
    try:
        lines, ok = convert_data_dir(tmp_path, controller_queue=None, blockers=[])
    finally:
        running.release()
    assert not ok and "another gateway uses" in lines[0] and "systemctl stop teg-fsm" in lines[0]
    assert _page_size(tmp_path / "gateway_archive.db") == 4096
    lines, ok = convert_data_dir(tmp_path, controller_queue=None, blockers=["thingsboard-edge-gateway-runner is running"])
    assert not ok and lines == ["not converted: thingsboard-edge-gateway-runner is running"]
    assert _page_size(tmp_path / "gateway_archive.db") == 4096


def _hold_open(path: str, opened: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event) -> None:
    db = sqlite3.connect(path)
    db.execute("SELECT count(*) FROM controller_archive").fetchone()
    opened.set()
    done.wait(30)
    db.close()


def test_migrate_leaves_a_file_another_process_has_open(tmp_path: Path) -> None:
    path = tmp_path / "gateway_archive.db"
    _old_archive(path, 10)
    opened, done = multiprocessing.Event(), multiprocessing.Event()
    other = multiprocessing.Process(target=_hold_open, args=(str(path), opened, done))
    other.start()
    try:
        assert opened.wait(30)
        result = convert_file(path)
    finally:
        done.set()
        other.join(30)
    assert not result.ok and "database is locked" in result.line and "left as it was" in result.line
    assert _page_size(path) == 4096 and len(_rows(path, "controller_archive")) == 10


def test_migrate_leaves_a_damaged_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "gateway_archive.db"
    _old_archive(path, 5000)
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'controller_archive_timestamp_ms'").fetchone()[0]
    with path.open("r+b") as f:  # scribble over the index's root page: the table is intact, the file is not
        f.seek((root - 1) * 4096)
        f.write(b"\xff" * 200)
    before = path.read_bytes()
    result = convert_file(path)
    assert not result.ok and "damaged, left alone" in result.line
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(f"*{COPY_MARK}*"))


def test_migrate_without_room_for_the_copy_says_so_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway_archive.db"
    _old_archive(path, 2000)
    before = _rows(path, "controller_archive")
    result = convert_file(path, free_bytes=lambda _d: 100_000)
    assert not result.ok and "the copy needs" in result.line and "has 0.1 MB" in result.line
    assert _page_size(path) == 4096 and _rows(path, "controller_archive") == before
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # as it was


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/disk`` on its own 4 MB tmpfs (as tests/faults does), unmounted whatever happens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_migrate_on_a_full_disk_fails_cleanly_and_leaves_the_file_untouched(small_disk: Path) -> None:
    path = small_disk / "gateway_archive.db"
    _old_archive(path, 12_000)  # about 1.3 MB
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = _rows(path, "controller_archive")
    filler = small_disk / "filler"
    with filler.open("wb") as f:  # leave less than the copy needs
        f.write(b"\0" * (4 * 2**20 - path.stat().st_size - 600 * 1024))
    # The space check passes (as if the disk filled after it): SQLite itself meets ENOSPC.
    result = convert_file(path, free_bytes=lambda _d: 10**12)
    assert not result.ok and "left as it was" in result.line and "full" in result.line, result.line
    assert not list(small_disk.glob(f"*{COPY_MARK}*"))
    assert _page_size(path) == 4096 and _rows(path, "controller_archive") == before
    # and the real space check says so before trying
    result = convert_file(path)
    assert not result.ok and "the copy needs" in result.line
    filler.unlink()
    assert convert_file(path).ok and _rows(path, "controller_archive") == before


def test_teg_migrate_small_pages_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _old_archive(tmp_path / "gateway_archive.db", 100)
    monkeypatch.setattr(migrate, "old_runner_blockers", lambda: [])
    monkeypatch.setenv("TEG_DATA_PATH", str(tmp_path))
    assert cli.main(["migrate", "--small-pages"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'gateway_archive.db'}: 4096 -> 1024 B pages, 100 rows" in out
    monkeypatch.setattr(migrate, "old_runner_blockers", lambda: ["cannot tell whether the existing gateway runs"])
    assert cli.main(["migrate", "--small-pages", "--data", str(tmp_path)]) == 1
    assert "not converted: cannot tell" in capsys.readouterr().out
    after = RunMarker(tmp_path)  # the command holds no lock once it returned
    after.acquire(0)
    after.release()


def test_migrate_check_notes_files_with_large_pages(tmp_path: Path) -> None:
    _old_archive(tmp_path / "gateway_archive.db", 10)
    OutboxStore(tmp_path / "gateway_logs_buffer.db", 65536).close()
    findings = migrate.Findings()
    migrate._inspect_files({"TEG_DATA_PATH": str(tmp_path)}, findings)
    notes = [n for n in findings.notes if "--small-pages" in n]
    assert len(notes) == 1 and notes[0].startswith("gateway_archive.db in ")  # the outbox is small already
    assert convert_file(tmp_path / "gateway_archive.db").ok
    findings = migrate.Findings()
    migrate._inspect_files({"TEG_DATA_PATH": str(tmp_path)}, findings)
    assert not [n for n in findings.notes if "--small-pages" in n]
