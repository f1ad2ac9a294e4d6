"""QueueStore, LogBuffer and packets on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from teg_fsm.adapters.gateway_logs import LogBuffer
from teg_fsm.adapters.packets import build_packet, parse_record, parse_values
from teg_fsm.adapters.queue_store import QueueStore
from tests.integration import uplink_rig as rig


def _store(tmp_path: Path, **caps: int) -> QueueStore:
    return QueueStore(tmp_path / "communication_queue.db", tmp_path / "gateway_archive.db",
                      archive_max_rows=caps.get("rows", 10**9), archive_max_bytes=caps.get("bytes", 10**12))


def _insert(tmp_path: Path, rows: list[tuple[str, str]]) -> None:
    rig.create_queue(tmp_path / "communication_queue.db")
    conn = sqlite3.connect(tmp_path / "communication_queue.db")
    conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
    conn.commit()
    conn.close()


def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_transfer_archives_non_log_rows_and_moves_all_valid_rows_to_pending(tmp_path: Path) -> None:
    _insert(tmp_path, [("measurement", rig.record(1)), ("log", rig.record(2)), ("debug_log", rig.record(3))])
    store = _store(tmp_path)
    result = store.transfer(100, 1000)
    assert result["moved"] == 3 and not result["more"]
    assert _count(tmp_path / "gateway_archive.db", "controller_archive") == 1
    assert _count(tmp_path / "communication_queue.db", "pending_mqtt_messages") == 3
    assert _count(tmp_path / "communication_queue.db", "messages") == 0


def test_malformed_rows_become_dead_letters_with_a_reason(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", "{oops"), ("m", json.dumps({"values": {}})), ("m", json.dumps([1])),
                       ("m", rig.record(4))])
    store = _store(tmp_path)
    assert store.transfer(100, 1000)["dead"] == 3
    conn = sqlite3.connect(tmp_path / "communication_queue.db")
    reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letters ORDER BY id")]
    assert reasons[0].startswith("invalid JSON") and reasons[1] == "message lacks ts" and "list" in reasons[2]
    assert store.pending_rows == 1


def test_a_batch_is_stored_in_ts_order(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(i)) for i in (5, 3, 4)])
    store = _store(tmp_path)
    store.transfer(100, 1000)
    packet = store.next_packet(True, 60_000, None, None)
    assert [r["values"]["seq"] for r in json.loads(packet.payload)] == [3, 4, 5]


def test_pending_cap_leaves_rows_in_the_controller_queue(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(i)) for i in range(10)])
    store = _store(tmp_path)
    assert store.transfer(100, 4)["full"]
    assert store.transfer(100, 4)["moved"] == 0
    assert _count(tmp_path / "communication_queue.db", "messages") == 6


def test_packets_stay_under_the_byte_and_point_limits_and_ack_deletes_only_their_rows(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(i)) for i in range(1000)])
    store = _store(tmp_path)
    store.transfer(1000, 10**6)
    first = store.next_packet(True, 4096, None, None)
    assert len(first.payload) <= 4096 and first.more
    second = store.next_packet(False, 60_000, 30, 1000)
    assert second.points <= 30 and second.rows == 10  # 3 points per record
    store.ack(first.after_id, first.last_id)
    left = _count(tmp_path / "communication_queue.db", "pending_mqtt_messages")
    assert left == 1000 - first.rows


def test_archive_row_cap_discards_the_oldest_rows_first(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(i)) for i in range(50)])
    store = _store(tmp_path, rows=20)
    store.transfer(100, 1000)
    conn = sqlite3.connect(tmp_path / "gateway_archive.db")
    kept = [json.loads(m)["seq"] for (m,) in conn.execute("SELECT message FROM controller_archive")]
    assert kept == list(range(30, 50))
    assert store.trimmed_archive_rows == 30


def test_archive_byte_cap_keeps_the_archive_under_the_cap(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(i)) for i in range(5000)])
    store = _store(tmp_path, bytes=200_000)
    for _ in range(5):
        store.transfer(1000, 10**6)
    assert store.archive_bytes() <= 200_000 + 4096 * 4
    assert 0 < store.archive_rows < 5000


def test_republish_copies_a_time_range_back_to_pending_and_discard_deletes_it(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(i)) for i in range(10)])
    store = _store(tmp_path)
    store.transfer(100, 1000)
    packet = store.next_packet(True, 60_000, None, None)
    store.ack(packet.after_id, packet.last_id)
    ts0 = 1_700_000_000_000
    # Bounds are exclusive, as in the existing gateway's RPCs.
    assert store.republish(ts0 + 1, ts0 + 5, 1000)["rows"] == 3
    again = store.next_packet(False, 60_000, None, None)
    assert [r["values"]["seq"] for r in json.loads(again.payload)] == [2, 3, 4]
    assert store.discard(ts0 - 1, ts0 + 5)["rows"] == 5
    assert _count(tmp_path / "gateway_archive.db", "controller_archive") == 5


def test_the_archive_keeps_the_existing_gateways_format_and_republishes_its_rows(tmp_path: Path) -> None:
    archive = sqlite3.connect(tmp_path / "gateway_archive.db")
    archive.execute("CREATE TABLE controller_archive (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp_ms INTEGER, message TEXT)")
    # A row the existing gateway archived: json.dumps(values) beside the timestamp.
    archive.execute("INSERT INTO controller_archive (timestamp_ms, message) VALUES (?, ?)", (1_700_000_000_500, '{"co2": 415.5}'))
    archive.commit()
    archive.close()
    _insert(tmp_path, [("measurement", json.dumps({"ts": 1_700_000_000_600, "values": {"co2": 420}}))])
    store = _store(tmp_path)
    store.transfer(100, 1000)
    rows = sqlite3.connect(tmp_path / "gateway_archive.db").execute(
        "SELECT timestamp_ms, message FROM controller_archive ORDER BY id").fetchall()
    assert [(ts, json.loads(m)) for ts, m in rows] == [(1_700_000_000_500, {"co2": 415.5}), (1_700_000_000_600, {"co2": 420})]
    packet = store.next_packet(True, 60_000, None, None)
    store.ack(packet.after_id, packet.last_id)
    assert store.republish(1_700_000_000_000, 1_700_000_001_000, 1000)["rows"] == 2
    again = store.next_packet(False, 60_000, None, None)
    assert json.loads(again.payload) == [
        {"ts": 1_700_000_000_500, "values": {"co2": 415.5}}, {"ts": 1_700_000_000_600, "values": {"co2": 420}}]


def test_a_corrupt_queue_file_is_quarantined_not_deleted(tmp_path: Path) -> None:
    queue = tmp_path / "communication_queue.db"
    queue.write_bytes(b"this is not sqlite" * 100)
    store = _store(tmp_path)
    moved = list(tmp_path.glob("communication_queue.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not sqlite")
    assert store.transfer(10, 10)["moved"] == 0


def test_existing_rows_and_tables_survive_opening(tmp_path: Path) -> None:
    _insert(tmp_path, [("m", rig.record(1))])
    _store(tmp_path).close()
    assert _count(tmp_path / "communication_queue.db", "messages") == 1


def test_log_buffer_packets_carry_severity_and_the_gateway_prefix(tmp_path: Path) -> None:
    buffer = LogBuffer(tmp_path / "gateway_logs_buffer.db")
    top = buffer.add([("WARNING", "disk low", 1_700_000_000_000), ("INFO", "x" * 20_000, 1_700_000_000_001)])
    assert top == 2
    packet = buffer.next_packet(True, 60_000, None, None)
    records = json.loads(packet.payload)
    assert records[0] == {"ts": 1_700_000_000_000, "values": {"severity": "WARN", "message": "GATEWAY - disk low"}}
    assert records[1]["values"]["message"].endswith("[cut]")
    buffer.ack(packet.after_id, packet.last_id)
    assert buffer.next_packet(False, 60_000, None, None).rows == 0


@pytest.mark.parametrize("text,ok", [
    ('{"ts": 1, "values": {"a": 1}}', True), ('{"ts": "12", "values": {}}', True),
    ('{"ts": true, "values": {}}', False), ('{"ts": 1, "values": []}', False), (None, False)])
def test_parse_record_accepts_only_timestamped_objects(text: str | None, ok: bool) -> None:
    assert isinstance(parse_record(text), tuple) is ok


def test_a_record_larger_than_any_packet_is_dead_not_stuck() -> None:
    packet = build_packet([(1, 1, 1, "x" * 100), (2, 2, 1, '{"ts":2,"values":{"a":1}}')], 0, 50, None, None)
    assert [row_id for row_id, _ in packet.dead] == [1] and packet.rows == 1 and packet.last_id == 2


@pytest.mark.parametrize("text", [
    '{"ts": 1700000000000, "values": {"co2": 415.5, "tags": ["a", {"b": "}"}]}}',
    '  {"ts":12,"values":{}}  ', '{"values": {"a": 1}, "ts": 5}', '{"ts": "12", "values": {"a": null}}',
    '{"ts": 1, "values": {"a": 1}, "extra": true}', '{"ts": 1, "values": {"a": 1}, "values": {"b": 2}}',
])
def test_archived_values_are_the_rows_values_whichever_way_the_row_is_written(text: str) -> None:
    ts, points, values_text = parse_values(text)
    row = json.loads(text)
    assert (ts, points) == (int(row["ts"]), len(row["values"]))
    assert json.loads(values_text) == row["values"]
