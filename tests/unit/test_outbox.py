"""The outbox's storage and stamping: strictly increasing ts per key, kept across reopening, deleted on ack.

The sending side runs against the stand-in in tests/integration/test_outbox.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teg_fsm.adapters.gateway_logs import BufferingLogHandler, LogBuffer
from teg_fsm.adapters.mqtt_link import Refused
from teg_fsm.adapters.outbox import OnDone, Outbox, OutboxError, OutboxStore, stamp, telemetry_elements
from teg_fsm.adapters.sys_info import parse_proc_stat
from teg_fsm.engine.effects.mqtt import ATTRIBUTES_TOPIC, TELEMETRY_TOPIC
from tests.rig.waiting import wait_for

T0 = 1_700_000_000_000

keys = st.lists(st.sampled_from(["a", "b", "c", "sw_state"]), min_size=1, max_size=3, unique=True)
elements = st.lists(st.tuples(st.one_of(st.none(), st.integers(T0 - 5, T0 + 5)), keys), max_size=30)


@given(elements, st.integers(T0 - 5, T0 + 5))
def test_stamped_ts_are_strictly_increasing_per_key_and_never_before_the_event(
        items: list[tuple[int | None, list[str]]], now_ms: int) -> None:
    last: dict[str, int] = {}
    stamped = stamp([(ts, dict.fromkeys(ks, 1)) for ts, ks in items], now_ms, last)
    seen: dict[str, int] = {}
    for (event_ts, _), (ts, values) in zip(items, stamped, strict=True):
        assert ts >= (now_ms if event_ts is None else event_ts)
        for key in values:
            assert ts > seen.get(key, -1)
            seen[key] = ts
    assert last == seen


@given(st.text(max_size=60))
def test_any_text_either_parses_as_telemetry_or_is_refused_with_a_reason(text: str) -> None:
    try:
        parsed = telemetry_elements(text)
    except OutboxError as exc:
        assert str(exc)
    else:
        assert all(isinstance(values, dict) for _, values in parsed)


def _rows(store: OutboxStore) -> list[tuple[str, dict]]:
    return [(t, json.loads(p)) for t, p in store.conn.execute("SELECT topic, payload FROM outbox ORDER BY id")]


def test_two_reports_in_one_millisecond_get_distinct_timestamps(tmp_path: Path) -> None:
    store = OutboxStore(tmp_path / "gateway_logs_buffer.db", 65536)
    store.put(TELEMETRY_TOPIC, json.dumps({"sw_state": "DOWNLOADING"}), T0)
    store.put(TELEMETRY_TOPIC, json.dumps({"sw_state": "FAILED", "sw_error": "no such tag"}), T0)
    assert [r for _, r in _rows(store)] == [{"ts": T0, "values": {"sw_state": "DOWNLOADING"}},
                                            {"ts": T0 + 1, "values": {"sw_state": "FAILED", "sw_error": "no such tag"}}]
    store.close()


def test_last_ts_per_key_holds_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "gateway_logs_buffer.db"
    store = OutboxStore(path, 65536)
    store.put(TELEMETRY_TOPIC, json.dumps({"ts": T0 + 50, "values": {"docker_engine_reachable": False}}), T0)
    batch = store.next_batch(float("inf"))
    assert batch is not None
    store.ack(batch.ids)
    store.close()
    reopened = OutboxStore(path, 65536)  # a restart with the clock behind the last report
    reopened.put(TELEMETRY_TOPIC, json.dumps({"ts": T0, "values": {"docker_engine_reachable": True}}), T0)
    assert _rows(reopened) == [(TELEMETRY_TOPIC, {"ts": T0 + 51, "values": {"docker_engine_reachable": True}})]
    reopened.close()


def test_batches_keep_order_split_by_topic_and_merge_attributes(tmp_path: Path) -> None:
    store = OutboxStore(tmp_path / "gateway_logs_buffer.db", 65536)
    store.put(TELEMETRY_TOPIC, json.dumps([{"a": 1}, {"a": 2}]), T0)
    store.put(ATTRIBUTES_TOPIC, json.dumps({"x": 1, "y": 1}), T0)
    store.put(ATTRIBUTES_TOPIC, json.dumps({"x": 2}), T0)
    store.put(TELEMETRY_TOPIC, json.dumps({"a": 3}), T0)
    sent = []
    while (batch := store.next_batch(float("inf"))) is not None:
        sent.append((batch.topic, json.loads(batch.payload), batch.points))
        assert store.ack(batch.ids) == len(batch.ids)
    assert sent == [
        (TELEMETRY_TOPIC, [{"ts": T0, "values": {"a": 1}}, {"ts": T0 + 1, "values": {"a": 2}}], 2),
        (ATTRIBUTES_TOPIC, {"x": 2, "y": 1}, 3),
        (TELEMETRY_TOPIC, [{"ts": T0 + 2, "values": {"a": 3}}], 1),
    ]
    assert store.pending() == 0
    store.close()


def test_a_batch_respects_the_payload_size_and_point_limits(tmp_path: Path) -> None:
    store = OutboxStore(tmp_path / "gateway_logs_buffer.db", 2000)
    for i in range(100):
        store.put(TELEMETRY_TOPIC, json.dumps({"k": "v" * 50, "i": i}), T0 + i)
    batch = store.next_batch(float("inf"))
    assert batch is not None and 0 < len(batch.ids) < 100
    assert 2 + len(TELEMETRY_TOPIC) + 2 + len(batch.payload) <= 2000
    small = store.next_batch(5)
    assert small is not None and small.points <= 5 and len(small.ids) == 2
    store.close()


@pytest.mark.parametrize("topic,payload", [
    (TELEMETRY_TOPIC, "not json"), (TELEMETRY_TOPIC, "[1]"), (TELEMETRY_TOPIC, '{"ts": "x", "values": {}}'),
    (ATTRIBUTES_TOPIC, "[]"), (TELEMETRY_TOPIC, json.dumps({"big": "x" * 70_000})),
    ("v1/devices/me/rpc/response/1", "{}"),
], ids=["invalid-json", "non-object", "bad-ts", "attributes-array", "too-large", "rpc-topic"])
def test_a_report_that_cannot_be_sent_is_refused_and_nothing_is_stored(tmp_path: Path, topic: str,
                                                                       payload: str) -> None:
    store = OutboxStore(tmp_path / "gateway_logs_buffer.db", 65536)
    with pytest.raises(OutboxError):
        store.put(topic, payload, T0)
    assert store.pending() == 0
    store.close()


def test_log_records_of_one_millisecond_get_distinct_ts_and_the_existing_severity_names(tmp_path: Path) -> None:
    handler = BufferingLogHandler()
    logger = logging.getLogger("teg.test_outbox")
    logger.addHandler(handler)
    try:
        for level in (logging.WARNING, logging.ERROR, logging.CRITICAL, logging.INFO):
            record = logger.makeRecord(logger.name, level, __file__, 1, "same ms", (), None)
            record.created = T0 / 1000
            handler.handle(record)
    finally:
        logger.removeHandler(handler)
    path = tmp_path / "gateway_logs_buffer.db"
    buffer = LogBuffer(path)
    buffer.add(handler.take())
    buffer.close()
    buffer = LogBuffer(path)  # the last ts holds across reopening
    buffer.add([("INFO", "after a restart", T0)])
    records = json.loads(buffer.next_packet(True, 60_000, None, None).payload)
    buffer.close()
    assert [r["values"]["severity"] for r in records] == ["WARN", "ERROR", "ERROR", "INFO", "INFO"]
    assert [r["ts"] for r in records] == [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4]


def test_sys_info_reads_the_existing_gateways_fields_from_proc_stat() -> None:
    text = ("cpu  10 0 20 300 4 0 1 0 0 0\ncpu0 5 0 10 150 2 0 0 0 0 0\nintr 1 2\nctxt 99\n"
            "btime 1700000000\nprocesses 4242\nprocs_running 3\nprocs_blocked 0\n")
    assert parse_proc_stat(text) == {"cpu": [10, 0, 20, 300, 4, 0, 1, 0, 0, 0], "btime": 1_700_000_000,
                                     "processes": 4242, "procs_running": 3}
    assert set(parse_proc_stat(Path("/proc/stat").read_text())) == {"cpu", "btime", "processes", "procs_running"}


def _pending(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def test_the_sender_tries_nothing_offline_deletes_only_on_puback_and_resends_after_a_lost_session(
        tmp_path: Path) -> None:
    path = tmp_path / "gateway_logs_buffer.db"
    outbox = Outbox(path, max_payload_bytes=65536, now_ms=lambda: T0)
    sent: list[tuple[str, bytes, OnDone]] = []
    online = threading.Event()
    outbox.publish = lambda topic, payload, qos, on_done: sent.append((topic, payload, on_done))
    outbox.online = online.is_set
    stored: list[str | None] = []
    outbox.open()
    outbox.start()
    try:
        for state in ("DOWNLOADING", "FAILED"):
            outbox.say(TELEMETRY_TOPIC, json.dumps({"sw_state": state}), T0, stored.append)
        wait_for(lambda: len(stored) == 2, 5, "stored")
        assert stored == [None, None] and sent == [] and _pending(path) == 2
        online.set()
        outbox.wake()
        wait_for(lambda: len(sent) == 1, 5, "the first packet")
        assert json.loads(sent[0][1]) == [{"ts": T0, "values": {"sw_state": "DOWNLOADING"}},
                                          {"ts": T0 + 1, "values": {"sw_state": "FAILED"}}]
        online.clear()
        sent[0][2](False, "session lost before the acknowledgement")
        outbox.wake()  # a wake while offline reads and sends nothing
        assert _pending(path) == 2
        online.set()
        outbox.wake()  # the next connect
        wait_for(lambda: len(sent) == 2, 5, "the packet sent again")
        assert sent[1][1] == sent[0][1]  # the same ts: ThingsBoard stores it once
        sent[1][2](True, None)
        wait_for(lambda: _pending(path) == 0, 5, "rows deleted on PUBACK")
    finally:
        outbox.stop()
    assert len(sent) == 2


def test_a_report_thingsboard_refuses_is_dropped_with_a_log_line_and_the_next_goes_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gateway_logs_buffer.db"
    outbox = Outbox(path, max_payload_bytes=65536, now_ms=lambda: T0)
    sent: list[tuple[str, bytes, OnDone]] = []
    outbox.publish = lambda topic, payload, qos, on_done: sent.append((topic, payload, on_done))
    outbox.online = lambda: True
    outbox.open()
    outbox.start()
    try:
        outbox.say(TELEMETRY_TOPIC, json.dumps({"sw_state": "FAILED"}), T0, lambda error: None)
        wait_for(lambda: len(sent) == 1, 5, "the first packet")
        outbox.say(ATTRIBUTES_TOPIC, json.dumps({"teg_version": "1"}), T0, lambda error: None)
        sent[0][2](False, Refused("Payload format invalid", 0x99))  # MQTT 5 PUBACK 0x99
        wait_for(lambda: len(sent) == 2, 5, "the next report, not the refused one again")
        assert sent[1][0] == ATTRIBUTES_TOPIC
        sent[1][2](True, None)
        wait_for(lambda: _pending(path) == 0, 5, "nothing left")
    finally:
        outbox.stop()
    assert len(sent) == 2
    assert ("outbox packet of 1 rows on v1/devices/me/telemetry refused by ThingsBoard: "
            "Payload format invalid (0x99): dropped") in caplog.text


def test_a_report_made_after_the_outbox_stopped_is_still_stored(tmp_path: Path) -> None:
    path = tmp_path / "gateway_logs_buffer.db"
    outbox = Outbox(path, max_payload_bytes=65536, now_ms=lambda: T0)
    outbox.open()
    outbox.start()
    outbox.stop()
    stored: list[str | None] = []
    outbox.say(TELEMETRY_TOPIC, json.dumps({"sw_state": "FAILED"}), T0, stored.append)
    assert stored == [None] and _pending(path) == 1
