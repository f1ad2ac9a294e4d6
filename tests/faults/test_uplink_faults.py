"""Uplink faults against the real ``teg run``: poison rows, a replaced queue file, foreign
tables, withheld PUBACKs. Each test prints its figures (rows lost, duplicates, time to
recover; never asserted as timing) and ends with ``rig.finish``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

POISON: dict[str, tuple[str, Any]] = {
    # class: (how it is stored, the value) - "text" as is, "bytes-as-text" bytes stored as TEXT
    "integer beyond 64 bits": ("text", '{"ts": %d, "values": {"seq": -1}}' % 2**70),
    "deeply nested JSON": ("text", '{"ts": 1, "values": {"deep": %s}}' % ("[" * 200_000 + "]" * 200_000)),
    "invalid UTF-8": ("bytes-as-text", b'{"ts": 1, "values": {"seq": -1, "s": "\xff\xfe"}}'),
    "lone surrogate (UTF-8 bytes)": ("bytes-as-text", b'{"ts": 1, "values": {"seq": -1, "s": "\xed\xa0\x80"}}'),
    "NaN": ("text", '{"ts": 1, "values": {"seq": -1, "v": NaN}}'),
    "not an object": ("text", "[1, 2, 3]"),
    "missing ts": ("text", '{"values": {"seq": -1}}'),
    "larger than any packet": ("text", json.dumps({"ts": 1, "values": {"seq": -1, "x": "y" * 70_000}})),
}


def _figures(name: str, expected: set[int], seqs: list[int], recovered_s: float | None, **extra: Any) -> None:
    counts = Counter(seqs)
    lost = len(expected - set(counts))
    duplicates = sum(n - 1 for seq, n in counts.items() if seq in expected and n > 1)
    took = "n/a" if recovered_s is None else f"{recovered_s:.2f} s"
    more = "".join(f", {k} {v}" for k, v in extra.items())
    print(f"\nFIGURES {name}: rows lost {lost}, duplicates {duplicates}, time to recover {took}{more}")


def _insert(db: Path, rows: list[tuple[str, Any]]) -> None:
    conn = sqlite3.connect(db, timeout=30)
    for kind, value in rows:
        if kind == "bytes-as-text":
            conn.execute("INSERT INTO messages (type, message) VALUES ('measurement', CAST(? AS TEXT))", (value,))
        else:
            conn.execute("INSERT INTO messages (type, message) VALUES ('measurement', ?)", (value,))
    conn.commit()
    conn.close()


def _dead_letters(db: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT source_id, reason FROM dead_letters ORDER BY id").fetchall()
    finally:
        conn.close()


def _pending(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM pending_mqtt_messages").fetchone()[0])
    finally:
        conn.close()


def _delivered(gateway: rig.FaultedGateway, expected: set[int], timeout: float = 60.0) -> float:
    started = time.monotonic()
    wait_for(lambda: expected <= set(uplink_rig.seqs(gateway.tb, gateway.device)), timeout,
             f"{len(expected)} rows delivered")
    return time.monotonic() - started


def test_poison_rows_of_every_class_are_dead_lettered_and_the_rows_around_them_go_out(
        tb: StandIn, tmp_path: Path) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        rows: list[tuple[str, Any]] = []
        seq = 0
        for stored in POISON.values():  # each poison row between valid ones, in the same batch
            rows += [("text", uplink_rig.record(i)) for i in range(seq, seq + 20)]
            rows.append(stored)
            seq += 20
        rows += [("text", uplink_rig.record(i)) for i in range(seq, seq + 20)]
        expected = set(range(seq + 20))
        _insert(gateway.queue, rows)
        took = _delivered(gateway, expected)
        dead = _dead_letters(gateway.queue)
        assert len(dead) == len(POISON), dead
        assert all(reason for _, reason in dead)
        _figures("poison rows", expected, uplink_rig.seqs(tb, gateway.device), took, dead_letters=len(dead))
        rig.finish(gateway, expected)
    finally:
        uplink_rig.stop(gateway.proc)


def test_a_queue_file_deleted_and_recreated_while_running_is_followed(tb: StandIn, tmp_path: Path) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        uplink_rig.fill(gateway.queue, 50)
        _delivered(gateway, set(range(50)))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{gateway.queue}{suffix}").unlink(missing_ok=True)
        recreated = time.monotonic()
        uplink_rig.fill(gateway.queue, 50, start=1000)  # the controller's new file
        expected = set(range(50)) | set(range(1000, 1050))
        _delivered(gateway, expected)
        took = time.monotonic() - recreated
        assert "was replaced" in gateway.log_text()
        _figures("queue file replaced", expected, uplink_rig.seqs(tb, gateway.device), took)
        rig.finish(gateway, expected)
    finally:
        uplink_rig.stop(gateway.proc)


def test_a_queue_without_the_type_column_is_read_and_reported_once(tb: StandIn, tmp_path: Path) -> None:
    queue = tmp_path / "data" / "communication_queue.db"
    queue.parent.mkdir(parents=True)
    conn = sqlite3.connect(queue)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, message TEXT)")
    conn.executemany("INSERT INTO messages (message) VALUES (?)", [(uplink_rig.record(i),) for i in range(100)])
    conn.commit()
    conn.close()
    started = time.monotonic()
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        expected = set(range(100))
        _delivered(gateway, expected)
        took = time.monotonic() - started
        conn = sqlite3.connect(queue, timeout=30)
        conn.executemany("INSERT INTO messages (message) VALUES (?)", [(uplink_rig.record(i),) for i in range(100, 150)])
        conn.commit()
        conn.close()
        expected |= set(range(100, 150))
        _delivered(gateway, expected)
        assert gateway.log_text().count("table messages has no column 'type'") == 1
        _figures("queue without type column", expected, uplink_rig.seqs(tb, gateway.device), took)
        rig.finish(gateway, expected)
    finally:
        uplink_rig.stop(gateway.proc)


def test_a_foreign_pending_table_is_quarantined_once_and_its_rows_still_go_out(tb: StandIn, tmp_path: Path) -> None:
    queue = tmp_path / "data" / "communication_queue.db"
    uplink_rig.create_queue(queue)
    conn = sqlite3.connect(queue)
    conn.execute("CREATE TABLE pending_mqtt_messages (id INTEGER PRIMARY KEY, topic TEXT, message TEXT)")
    conn.executemany("INSERT INTO pending_mqtt_messages (topic, message) VALUES ('v1/devices/me/telemetry', ?)",
                     [(uplink_rig.record(i),) for i in range(500, 520)])
    conn.commit()
    conn.close()
    started = time.monotonic()
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        uplink_rig.fill(queue, 30)
        expected = set(range(30)) | set(range(500, 520))
        _delivered(gateway, expected)
        took = time.monotonic() - started
        conn = sqlite3.connect(queue, timeout=30)
        aside = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'pending_mqtt_messages_quarantined_%'")]
        conn.close()
        assert len(aside) == 1
        assert gateway.log_text().count("renamed to " + aside[0]) == 1
        _figures("foreign pending table", expected, uplink_rig.seqs(tb, gateway.device), took)
        rig.finish(gateway, expected)
    finally:
        uplink_rig.stop(gateway.proc)


def test_withheld_pubacks_on_a_live_session_lead_to_a_reconnect_and_no_loss(tb: StandIn, tmp_path: Path) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        # The session's own start-up publishes are done first, so the withheld PUBACKs are telemetry's.
        uplink_rig.fill(gateway.queue, 10, start=10_000)
        _delivered(gateway, set(range(10_000, 10_010)))
        wait_for(lambda: "teg_gateway" in tb.client_attributes(gateway.device) and tb.client_rpcs(gateway.device),
                 20, "the session's start-up publishes acknowledged")
        connects_before = len(tb.events(gateway.device, "connected"))
        tb.drop_pubacks(3, device=gateway.device)
        withheld = time.monotonic()
        uplink_rig.fill(gateway.queue, 5000)
        expected = set(range(5000)) | set(range(10_000, 10_010))
        # The withheld PUBACKs may be of data or of log packets; either way the session is dropped.
        wait_for(lambda: "no PUBACK for 10 s on a live session" in gateway.log_text(), 60, "the stuck session seen")
        wait_for(lambda: len(tb.events(gateway.device, "connected")) > connects_before, 30, "a new session")
        _delivered(gateway, expected, timeout=90)
        took = time.monotonic() - withheld
        wait_for(lambda: tb.telemetry(gateway.device, "uplink_stuck_sessions"), 20, "stuck session reported")
        seqs = uplink_rig.seqs(tb, gateway.device)
        assert max(Counter(seqs).values()) <= 2  # duplicates bounded: a row goes out at most twice
        reconnects = len(tb.events(gateway.device, "connected")) - connects_before
        assert [e.kind for e in tb.events(gateway.device, "puback_dropped")].count("puback_dropped") == 3
        _figures("PUBACKs withheld", expected, seqs, took, reconnects=reconnects)
        rig.finish(gateway, expected)
    finally:
        uplink_rig.stop(gateway.proc)


def test_a_slow_server_is_not_reconnected_to_in_a_loop(tb: StandIn, tmp_path: Path) -> None:
    """PUBACKs later than the bound (but coming): the bound doubles after each drop until they fit."""
    gateway = rig.start_gateway(tb, tmp_path, TEG_UPLINK_PUBACK_TIMEOUT_S="2")
    try:
        uplink_rig.fill(gateway.queue, 10, start=10_000)
        _delivered(gateway, set(range(10_000, 10_010)))
        connects_before = len(tb.events(gateway.device, "connected"))
        tb.delay_pubacks(3.0)
        slowed = time.monotonic()
        uplink_rig.fill(gateway.queue, 3000)
        expected = set(range(3000)) | set(range(10_000, 10_010))
        wait_for(lambda: "no PUBACK for 2 s on a live session" in gateway.log_text(), 30, "the first drop")
        _delivered(gateway, expected, timeout=120)
        wait_for(lambda: _pending(gateway.queue) == 0, 120, "every row acknowledged despite the slow PUBACKs")
        took = time.monotonic() - slowed
        tb.delay_pubacks(0)
        reconnects = len(tb.events(gateway.device, "connected")) - connects_before
        assert 1 <= reconnects <= 5  # 2 s doubling to 60 s at most: never a reconnect per packet
        seqs = uplink_rig.seqs(tb, gateway.device)
        _figures("PUBACKs 3 s late, bound 2 s", expected, seqs, took, reconnects=reconnects)
        rig.finish(gateway, expected)
    finally:
        uplink_rig.stop(gateway.proc)


def _dead_seqs(db: Path) -> tuple[list[int], set[str]]:
    """The controller ``seq`` of every dead-lettered row, and their reasons."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("SELECT message, reason FROM dead_letters ORDER BY id").fetchall()
    finally:
        conn.close()
    return [json.loads(text)["values"]["seq"] for text, _ in rows], {reason for _, reason in rows}


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_packet_thingsboard_refuses_is_dead_lettered_on_mqtt5_and_sent_again_on_3_1_1(
        tb: StandIn, tmp_path: Path, protocol: str) -> None:
    """ThingsBoard refuses a payload it cannot parse (MTH:668-676): on MQTT 5 with PUBACK 0x99, so
    the gateway knows the packet arrived and was turned down, and dead-letters exactly its rows; on
    3.1.1 by closing the session, which looks like a loss, so the packet goes out again."""
    gateway = rig.start_gateway(tb, tmp_path, TEG_MQTT_PROTOCOL=protocol)
    try:
        tb.refuse_pubacks(1, code=0x99, device=gateway.device, contains='"seq": 2500, ')
        uplink_rig.fill(gateway.queue, 5_000)
        if protocol == "5":
            wait_for(lambda: _dead_seqs(gateway.queue)[0], 30, "the refused packet dead-lettered")
            uplink_rig.fill(gateway.queue, 1_000, start=5_000)  # the drain goes on after a refusal
            dead, reasons = _dead_seqs(gateway.queue)
            assert 2500 in dead and dead == list(range(dead[0], dead[-1] + 1)) and len(dead) < 5_000
            assert reasons == {"refused by ThingsBoard: Payload format invalid (0x99)"}
            expected = set(range(6_000)) - set(dead)
            assert "invalid_payload" not in tb.disconnect_reasons(gateway.device)
            rig.finish(gateway, expected)
            assert not set(dead) & set(uplink_rig.seqs(tb, gateway.device))  # never stored, never resent
            assert _pending(gateway.queue) == 0
            assert "its %d rows moved to dead_letters" % len(dead) in gateway.log_text()
            _figures("refused packet (MQTT 5)", expected, uplink_rig.seqs(tb, gateway.device), None,
                     dead_letters=len(dead))
        else:
            uplink_rig.fill(gateway.queue, 1_000, start=5_000)
            rig.finish(gateway, range(6_000))
            assert "invalid_payload" in tb.disconnect_reasons(gateway.device)
            assert _dead_seqs(gateway.queue) == ([], set())
            _figures("refused packet (3.1.1)", set(range(6_000)), uplink_rig.seqs(tb, gateway.device), None)
        assert [e.detail for e in tb.events(gateway.device, "puback_refused")] == ["0x99"]
    finally:
        uplink_rig.stop(gateway.proc)


def test_the_receive_maximum_of_an_mqtt5_server_caps_the_uplinks_packets_in_flight(
        tb: StandIn, tmp_path: Path) -> None:
    """A Receive Maximum in the CONNACK (TB sends none; a proxy or another server may) bounds
    the QoS 1 publishes in flight: the stand-in would DISCONNECT 0x93 above it."""
    tb.set_receive_maximum(3)
    tb.delay_pubacks(0.2)  # PUBACKs late, so the window fills
    gateway = rig.start_gateway(tb, tmp_path, TEG_MQTT_PROTOCOL="5", TEG_UPLINK_MAX_INFLIGHT="16")
    try:
        uplink_rig.fill(gateway.queue, 20_000)
        took = _delivered(gateway, set(range(20_000)))
        tb.delay_pubacks(0)
        assert 2 <= tb.peak_unacked(gateway.device) <= 3  # the window was used, and never beyond 3
        assert "receive_maximum_exceeded" not in tb.disconnect_reasons(gateway.device)
        assert "ThingsBoard's Receive Maximum is 3" in gateway.log_text()
        _figures("receive maximum 3", set(range(20_000)), uplink_rig.seqs(tb, gateway.device), took,
                 peak_in_flight=tb.peak_unacked(gateway.device))
        rig.finish(gateway, range(20_000))
    finally:
        uplink_rig.stop(gateway.proc)
