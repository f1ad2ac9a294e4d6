"""Files that change under the gateway: a replaced queue file, tables of another shape (real SQLite)."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from teg_fsm.adapters.queue_store import PENDING, QueueStore
from tests.integration import uplink_rig as rig


def _store(tmp_path: Path) -> QueueStore:
    return QueueStore(tmp_path / "communication_queue.db", tmp_path / "gateway_archive.db",
                      archive_max_rows=10**9, archive_max_bytes=10**12)


def _sent(store: QueueStore) -> list[int]:
    """Drain pending as the uplink does; the ``seq`` of every record sent."""
    seqs: list[int] = []
    restart = True
    while True:
        packet = store.next_packet(restart, 65_000, None, None)
        restart = False
        if packet.rows:
            seqs += [record["values"]["seq"] for record in json.loads(packet.payload)]
        if packet.last_id > packet.after_id:
            store.ack(packet.after_id, packet.last_id)
        if packet.last_id == packet.after_id and not packet.more:
            return seqs


def _tables(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    finally:
        conn.close()


def _remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_a_queue_file_deleted_and_recreated_is_reopened_and_no_row_is_lost(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "communication_queue.db"
    rig.fill(db, 10)
    store = _store(tmp_path)
    try:
        store.transfer(5, 10**9)  # rows 0-4 pending in the old file, 5-9 still queued there
        generation = store.generation
        _remove_db(db)
        rig.fill(db, 5, start=100)  # the controller starts a new file
        with caplog.at_level(logging.WARNING):
            while store.transfer(1000, 10**9)["more"]:
                pass
        assert store.generation > generation
        assert "was replaced" in caplog.text and "carried 5 pending and 5 queued rows" in caplog.text
        assert sorted(_sent(store)) == [*range(10), *range(100, 105)]
    finally:
        store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_a_deleted_queue_file_is_reported_once_while_the_rows_held_still_go_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "communication_queue.db"
    rig.fill(db, 3)
    store = _store(tmp_path)
    try:
        store.transfer(100, 10**9)
        _remove_db(db)
        with caplog.at_level(logging.WARNING):
            store.transfer(100, 10**9)
            store.transfer(100, 10**9)
        assert caplog.text.count("was deleted") == 1
        assert sorted(_sent(store)) == [0, 1, 2]
    finally:
        store.close()


def test_a_messages_table_without_type_is_read_and_reported_once(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "communication_queue.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, message TEXT)")
    conn.executemany("INSERT INTO messages (message) VALUES (?)", [(rig.record(i),) for i in range(4)])
    conn.commit()
    conn.close()
    with caplog.at_level(logging.ERROR):
        store = _store(tmp_path)
        try:
            store.transfer(2, 10**9)
            store.reopen()
            store.transfer(100, 10**9)
            assert sorted(_sent(store)) == [0, 1, 2, 3]
        finally:
            store.close()
    assert caplog.text.count("table messages has no column 'type'") == 1


def test_a_messages_table_without_message_leaves_its_rows_and_says_why(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "communication_queue.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, payload TEXT)")
    conn.execute("INSERT INTO messages (type, payload) VALUES ('m', '{}')")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.ERROR):
        store = _store(tmp_path)
        try:
            assert store.transfer(100, 10**9)["moved"] == 0
        finally:
            store.close()
    assert "no column 'message'" in caplog.text and "stay in the queue" in caplog.text
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    conn.close()


@pytest.mark.parametrize("foreign", [
    "CREATE TABLE pending_mqtt_messages (id INTEGER PRIMARY KEY, message TEXT)",
    "CREATE TABLE pending_mqtt_messages (id TEXT, type TEXT, message TEXT)",
    "CREATE TABLE pending_mqtt_messages (topic TEXT, message TEXT, type TEXT)",
])
def test_a_pending_table_of_another_shape_is_quarantined_and_its_rows_carried_over(
        tmp_path: Path, foreign: str, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "communication_queue.db"
    rig.create_queue(db)
    conn = sqlite3.connect(db)
    conn.execute(foreign)
    conn.executemany("INSERT INTO pending_mqtt_messages (message) VALUES (?)", [(rig.record(i),) for i in (1, 2)])
    conn.commit()
    conn.close()
    with caplog.at_level(logging.ERROR):
        store = _store(tmp_path)
    try:
        aside = [t for t in _tables(db) if t.startswith(f"{PENDING}_quarantined_")]
        assert len(aside) == 1 and aside[0] in caplog.text and "2 of its rows carried over" in caplog.text
        rig.fill(db, 1, start=3)
        store.transfer(100, 10**9)
        assert sorted(_sent(store)) == [1, 2, 3]
    finally:
        store.close()
    # The next start finds a usable table: nothing more is renamed.
    _store(tmp_path).close()
    assert len([t for t in _tables(db) if t.startswith(f"{PENDING}_quarantined_")]) == 1


class _Completion:
    """Records how an effect settled (the runner's Completion, minus the runner)."""

    def __init__(self) -> None:
        self.outcome: tuple[str, object] | None = None

    def succeed(self, result: object = None) -> bool:
        self.outcome = ("succeeded", result)
        return True

    def fail(self, error: str, details: object = None) -> bool:
        self.outcome = ("failed", error)
        return True


def test_a_puback_for_a_packet_of_the_replaced_file_deletes_nothing_in_the_new_one(tmp_path: Path) -> None:
    from teg_fsm.adapters.gateway_logs import BufferingLogHandler, LogBuffer
    from teg_fsm.adapters.uplink_io import UplinkIO
    from teg_fsm.engine.effects.uplink import SendPacket

    db = tmp_path / "communication_queue.db"
    rig.fill(db, 5)
    io = UplinkIO(store=lambda: _store(tmp_path), logs=lambda: LogBuffer(tmp_path / "logs.db"),
                  handler=BufferingLogHandler(), post=lambda name, data: None)
    io.open()
    assert io.store is not None
    published: list[object] = []
    io.publish = lambda topic, payload, qos, on_done: published.append(on_done)
    try:
        io.store.transfer(100, 10**9)
        completion = _Completion()
        io.send(SendPacket(max_payload_bytes=65_000, restart=True), completion)  # type: ignore[arg-type]
        _remove_db(db)
        rig.fill(db, 5, start=100)
        io.store.transfer(100, 10**9)  # reopens; the 5 pending rows are carried over
        [on_done] = published
        on_done(True, None)  # the PUBACK of the packet sent from the old file
        io._jobs.get()()  # the acknowledgement job the PUBACK enqueued
        assert completion.outcome is not None and completion.outcome[0] == "succeeded"
        assert sorted(_sent(io.store)) == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]  # sent again, none deleted
    finally:
        io.store.close()
        assert io.logs is not None
        io.logs.close()
