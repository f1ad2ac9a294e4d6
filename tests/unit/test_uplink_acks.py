"""PUBACK deletes: batched when PUBACKs come together, never before their PUBACK.

Real SQLite files, real threads: PUBACKs come on other threads (as paho's) while the
uplink I/O thread moves batches and builds packets. What must hold whatever the
interleaving: every row reaches a packet exactly once (no resend here), in ts order
within its batch, nothing is deleted before its PUBACK, and a burst of PUBACKs is
one delete of exactly their rows.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.adapters.gateway_logs import BufferingLogHandler, LogBuffer
from teg_fsm.adapters.queue_store import QueueStore
from teg_fsm.adapters.uplink_io import UplinkIO
from teg_fsm.engine.effects.uplink import SendPacket
from tests.integration import uplink_rig as rig

WAIT_S = 20.0
BATCH = 500
TS0 = 1_700_000_000_000


def _fill_reversed_within_batches(db: Path, n: int) -> None:
    """Rows whose ts run backwards within each block of BATCH ids: a batch must reorder them."""
    rig.create_queue(db)
    conn = sqlite3.connect(db)
    rows = [("measurement", json.dumps({"ts": TS0 + (i // BATCH) * BATCH + (BATCH - 1 - i % BATCH),
                                        "values": {"seq": i}})) for i in range(n)]
    conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
    conn.commit()
    conn.close()


def _store(tmp_path: Path) -> QueueStore:
    return QueueStore(tmp_path / "communication_queue.db", tmp_path / "gateway_archive.db",
                      archive_max_rows=10**9, archive_max_bytes=10**12)


def _check_delivered(records: list[dict[str, Any]], n: int) -> None:
    seqs = [r["values"]["seq"] for r in records]
    assert sorted(seqs) == list(range(n)), "every row exactly once"
    for first in range(0, n, BATCH):  # each batch in ts order (ids within a batch follow ts)
        ts = [r["ts"] for r in records if first <= r["values"]["seq"] < first + BATCH]
        assert ts == sorted(ts)


def _counts(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM pending_mqtt_messages)"
                            ).fetchone()
    finally:
        conn.close()


def test_ack_ranges_deletes_touching_ranges_as_one_and_leaves_a_gap(tmp_path: Path) -> None:
    db = tmp_path / "communication_queue.db"
    rig.fill(db, 10)
    store = _store(tmp_path)
    try:
        store.transfer(10, 10**9)
        assert store.ack_ranges([(3, 5), (0, 3), (6, 8)]) == 7
        left = [r[0] for r in store.conn.execute("SELECT id FROM pending_mqtt_messages ORDER BY id")]
        assert left == [6, 9, 10]
        assert store.pending_rows == 3
    finally:
        store.close()


class _Completion:
    def __init__(self) -> None:
        self.outcome: tuple[str, Any] | None = None
        self.done = threading.Event()

    def succeed(self, result: Any = None) -> bool:
        self.outcome = ("succeeded", result)
        self.done.set()
        return True

    def fail(self, error: str, details: Any = None) -> bool:
        self.outcome = ("failed", error)
        self.done.set()
        return True

    def result(self) -> Any:
        assert self.done.wait(WAIT_S), "effect not settled"
        assert self.outcome is not None and self.outcome[0] == "succeeded", self.outcome
        return self.outcome[1]


def _io(tmp_path: Path) -> UplinkIO:
    io = UplinkIO(store=lambda: _store(tmp_path), logs=lambda: LogBuffer(tmp_path / "logs.db"),
                  handler=BufferingLogHandler(), post=lambda name, data: None)
    io.open()
    return io


def _transfer(io: UplinkIO) -> _Completion:
    completion = _Completion()

    def transfer() -> None:  # as the uplink component's TransferRows handler
        assert io.store is not None
        completion.succeed(io.store.transfer(BATCH, 10**9))

    io.submit(transfer)
    return completion


def _send(io: UplinkIO) -> _Completion:
    completion = _Completion()
    io.submit(lambda: io.send(SendPacket(max_payload_bytes=4_000), completion))  # type: ignore[arg-type]
    return completion


def test_a_drain_with_pubacks_from_another_thread_sends_every_row_once_and_deletes_only_after_its_puback(
        tmp_path: Path) -> None:
    n = 10 * BATCH
    db = tmp_path / "communication_queue.db"
    _fill_reversed_within_batches(db, n)
    io = _io(tmp_path)
    records: list[dict[str, Any]] = []
    early: list[str] = []
    rng = random.Random(16)
    check = sqlite3.connect(db, check_same_thread=False)
    check_lock = threading.Lock()  # the PUBACK timers each run on a thread of their own

    def publish(topic: str, payload: bytes, qos: int, on_done: Any) -> None:
        batch = json.loads(payload)
        records.extend(batch)

        def puback() -> None:  # paho's thread: the rows must all still be pending
            seqs = [r["values"]["seq"] for r in batch]
            with check_lock:
                texts = {json.loads(m)["values"]["seq"] for (m,) in check.execute(
                    "SELECT message FROM pending_mqtt_messages")}
            if not set(seqs) <= texts:
                early.append(f"rows {seqs[0]}..{seqs[-1]} deleted before their PUBACK")
            on_done(True, None)

        threading.Timer(rng.uniform(0, 0.004), puback).start()

    io.publish = publish
    io.start()
    try:
        transfer, moved_all = _transfer(io), False
        while True:
            last_round = moved_all  # these sends start after the last batch was booked
            results = [s.result() for s in [_send(io) for _ in range(4)]]
            if last_round and not any(r["rows"] for r in results):
                break
            if not moved_all and transfer.done.is_set():
                if transfer.result()["more"]:
                    transfer = _transfer(io)
                else:
                    moved_all = True
    finally:
        io.stop()
        check.close()
    assert not early
    _check_delivered(records, n)
    assert _counts(db) == (0, 0)


def test_pubacks_that_come_together_are_one_delete_of_exactly_their_rows(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "communication_queue.db"
    rig.fill(db, 40)
    io = _io(tmp_path)
    acks: list[Any] = []
    io.publish = lambda topic, payload, qos, on_done: acks.append(on_done)
    io.start()
    try:
        assert _transfer(io).result()["moved"] == 40
        store = io.store
        assert store is not None
        sent = [_send_rows(io, 800) for _ in range(3)]  # 3 packets of ~10 rows each; some left
        busy, release = threading.Event(), threading.Event()
        io.submit(lambda: (busy.set(), release.wait(WAIT_S)))  # the thread is moving a batch, say
        assert busy.wait(WAIT_S) and len(acks) == 3
        deletes: list[list[tuple[int, int]]] = []
        ack_ranges = store.ack_ranges
        monkeypatch.setattr(store, "ack_ranges", lambda ranges: deletes.append(ranges) or ack_ranges(ranges))
        for on_done in acks:
            on_done(True, None)
        release.set()
        results = [s.result() for s in sent]
        assert len(deletes) == 1 and len(deletes[0]) == 3  # one delete for the burst
        rows = sum(r["rows"] for r in results)
        assert _counts(db) == (0, 40 - rows) and rows < 40  # exactly their rows: the rest stays
        left = [i for (i,) in store.conn.execute("SELECT id FROM pending_mqtt_messages ORDER BY id")]
        assert left == list(range(rows + 1, 41))
    finally:
        io.stop()


def _send_rows(io: UplinkIO, max_bytes: int) -> _Completion:
    completion = _Completion()
    io.submit(lambda: io.send(SendPacket(max_payload_bytes=max_bytes), completion))  # type: ignore[arg-type]
    return completion
