"""No row can block the controller queue: hostile rows among valid ones (property tests).

Rows are written the way a controller could write them (TEXT, BLOB, bytes that
are not UTF-8 stored as TEXT, NULL), moved by the real ``QueueStore`` on real
SQLite files, packed into packets, and each packet is read back by the
stand-in's own telemetry parser (what ThingsBoard would accept). Whatever the
mix, every valid row is delivered exactly once with its values, every other
row ends in ``dead_letters``, and nothing is left behind in the queue.
"""

from __future__ import annotations

import json
import math
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teg_fsm.adapters.packets import MAX_NESTING, parse_values
from teg_fsm.adapters.queue_store import PENDING, USUAL_ROW, QueueStore
from tests.integration import uplink_rig as rig
from tools.tb_standin.model import parse_telemetry

MAX_PAYLOAD = 65504
LONG_MAX = 2**63 - 1


@attrs.frozen
class Row:
    """One row as the controller stores it, and what must become of it."""

    kind: Any  # the type column: text, NULL, a number or bytes
    message: Any  # str (TEXT), bytes (BLOB), ``Invalid`` (bytes stored as TEXT) or None
    seq: int | None  # the valid rows' key; None for a row that must be dead-lettered
    values: dict[str, Any] | None = None  # what ThingsBoard must receive for a valid row


@attrs.frozen
class Invalid:
    """Bytes stored as TEXT without being valid UTF-8 (SQLite stores them as they are)."""

    data: bytes


# -- valid rows -------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["\ud800", "\udfff x", "é", "\u2028", "}", "\\", '"']),  # lone surrogates as JSON escapes
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)
kinds = st.one_of(st.sampled_from(["measurement", "log", "debug_log", ""]), st.none(), st.integers(0, 9),
                  st.binary(max_size=4))


@st.composite
def valid_rows(draw: st.DrawFn, seq: int) -> Row:
    values = {"seq": seq, **draw(st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "seq"),
                                                 json_value, max_size=4))}
    ts = draw(st.one_of(st.integers(0, LONG_MAX), st.just(1_700_000_000_000 + seq)))
    shape = draw(st.sampled_from(["usual", "values_first", "ts_text", "extra_key", "spaced", "compact", "dup_key"]))
    if shape == "usual":
        text = json.dumps({"ts": ts, "values": values})
    elif shape == "values_first":
        text = json.dumps({"values": values, "ts": ts})
    elif shape == "ts_text":
        text = json.dumps({"ts": str(ts), "values": values})
    elif shape == "extra_key":
        text = json.dumps({"ts": ts, "values": values, "note": "kept out of ThingsBoard's reach"})
    elif shape == "spaced":
        text = "\n\t " + json.dumps({"ts": ts, "values": values}, indent=draw(st.integers(0, 3))) + " \r\n"
    elif shape == "compact":  # raw UTF-8 text, unless a lone surrogate needs its escape to be storable
        text = json.dumps({"ts": ts, "values": values}, separators=(",", ":"), ensure_ascii=False)
        if not _storable(text):
            text = json.dumps({"ts": ts, "values": values}, separators=(",", ":"))
    else:  # a key given twice: the last one counts, as in ThingsBoard's Gson and in Python
        inner = json.dumps(values)[1:-1]
        text = '{"ts": %d, "values": {"seq": "overwritten", %s}}' % (ts, inner)
    return Row(draw(kinds), text, seq, values)


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- hostile rows -----------------------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def hostile_rows(draw: st.DrawFn) -> Row:
    good = json.dumps({"ts": 1_700_000_000_000, "values": {"seq": -1, "x": "é"}})
    choice = draw(st.sampled_from([
        "invalid_json", "not_utf8", "surrogate_bytes", "blob", "null", "too_deep", "way_too_deep", "ts_huge",
        "ts_negative_huge", "ts_text_huge", "nan", "infinity", "non_object", "missing_ts", "missing_values",
        "values_not_object", "ts_bool", "ts_float", "ts_unicode_digits", "unicode_space", "huge", "empty",
    ]))
    ts = draw(st.integers(LONG_MAX + 1, 10**40))
    message: Any = {
        "invalid_json": "{" + draw(st.text(max_size=30)),
        "not_utf8": Invalid(good.encode()[:-2] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\xfe\xfe"])) + b"}}"),
        "surrogate_bytes": Invalid(b'{"ts": 1, "values": {"seq": -1, "s": "\xed\xa0\x80"}}'),
        "blob": good.encode(),
        "null": None,
        "too_deep": '{"ts": 1, "values": {"seq": -1, "deep": %s}}' % _nested(MAX_NESTING),
        "way_too_deep": '{"ts": 1, "values": {"seq": -1, "deep": %s}}' % _nested(draw(st.integers(1000, 50_000))),
        "ts_huge": '{"ts": %d, "values": {"seq": -1}}' % ts,
        # -(LONG_MAX + 1) is Java's Long.MIN_VALUE, still a long: one below it is the first that is not.
        "ts_negative_huge": '{"values": {"seq": -1}, "ts": %d}' % -(ts + 1),
        "ts_text_huge": '{"ts": "%d", "values": {"seq": -1}}' % ts,
        "nan": '{"ts": 1, "values": {"seq": -1, "v": NaN}}',
        "infinity": '{"ts": 1, "values": {"seq": -1, "v": %s}}' % draw(st.sampled_from(["Infinity", "-Infinity"])),
        "non_object": json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(),
                                                st.none()))),
        "missing_ts": json.dumps({"values": {"seq": -1}}),
        "missing_values": json.dumps({"ts": 1, "seq": -1}),
        "values_not_object": json.dumps({"ts": 1, "values": draw(st.one_of(st.lists(st.integers()), st.text()))}),
        "ts_bool": json.dumps({"ts": True, "values": {"seq": -1}}),
        "ts_float": json.dumps({"ts": 1.5, "values": {"seq": -1}}),
        "ts_unicode_digits": json.dumps({"ts": "١٢", "values": {"seq": -1}}),
        "unicode_space": "\u00a0" + good if draw(st.booleans()) else good[:-1] + "\u3000}",
        "huge": json.dumps({"ts": 1, "values": {"seq": -1, "blob": "x" * MAX_PAYLOAD}}),
        "empty": "",
    }[choice]
    return Row(draw(kinds), message, None)


@st.composite
def queues(draw: st.DrawFn) -> list[Row]:
    n_valid = draw(st.integers(0, 25))
    rows = [draw(valid_rows(seq)) for seq in range(n_valid)]
    rows += draw(st.lists(hostile_rows(), max_size=8))
    return draw(st.permutations(rows))


# -- the system under test: real SQLite, real packets, the stand-in's parser -----------

def write_rows(db: Path, rows: list[Row]) -> None:
    rig.create_queue(db)
    conn = sqlite3.connect(db)
    for row in rows:
        if isinstance(row.message, Invalid):
            conn.execute("INSERT INTO messages (type, message) VALUES (?, CAST(? AS TEXT))", (row.kind, row.message.data))
        else:
            conn.execute("INSERT INTO messages (type, message) VALUES (?, ?)", (row.kind, row.message))
    conn.commit()
    conn.close()


def drain(store: QueueStore, batch_rows: int) -> list[tuple[int, dict[str, Any]]]:
    """Move every row and send every packet as the uplink would; return what ThingsBoard stored."""
    for _ in range(10_000):
        result = store.transfer(batch_rows, 10**9)
        if not result["more"]:
            break
    received: list[tuple[int, dict[str, Any]]] = []
    restart = True
    for _ in range(10_000):
        packet = store.next_packet(restart, MAX_PAYLOAD, None, None)
        restart = False
        if packet.rows:
            records, _ = parse_telemetry(packet.payload)  # raises if ThingsBoard would refuse the packet
            json.loads(packet.payload, parse_constant=_refuse)  # strict JSON, as Gson reads numbers
            received += records
        if packet.last_id > packet.after_id:
            store.ack(packet.after_id, packet.last_id)
        if packet.last_id == packet.after_id and not packet.more:
            return received
    raise AssertionError("the queue never emptied: a row is stuck")


def _refuse(name: str) -> Any:
    raise AssertionError(f"{name} reached a packet")


def count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=queues(), batch_rows=st.integers(1, 40))
def test_every_valid_row_is_delivered_once_and_every_other_row_dead_lettered(rows: list[Row], batch_rows: int) -> None:
    with tempfile.TemporaryDirectory(prefix="teg-poison-") as tmp:
        db = Path(tmp) / "communication_queue.db"
        write_rows(db, rows)
        store = QueueStore(db, Path(tmp) / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
        try:
            received = drain(store, batch_rows)
        finally:
            store.close()
        valid = {row.seq: row.values for row in rows if row.seq is not None}
        delivered = {int(values["seq"]): values for _, values in received}
        assert len(received) == len(valid) and delivered.keys() == valid.keys()
        for seq, values in valid.items():
            assert _same(delivered[seq], values)
        assert count(db, "dead_letters") == len(rows) - len(valid)
        assert count(db, "messages") == 0 and count(db, PENDING) == 0


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(row=st.one_of(valid_rows(0), hostile_rows()))
def test_a_row_sqlite_vouches_for_is_one_the_parser_accepts_with_the_same_ts_and_values(row: Row) -> None:
    """SQLite moves a batch alone only when every row is ``USUAL_ROW``: that must never let a bad row by."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE messages (message TEXT)")
    if isinstance(row.message, Invalid):
        conn.execute("INSERT INTO messages VALUES (CAST(? AS TEXT))", (row.message.data,))
    else:
        conn.execute("INSERT INTO messages VALUES (?)", (row.message,))
    (usual,) = conn.execute(f"SELECT {USUAL_ROW} FROM messages").fetchone()
    if not usual:
        return
    (raw,) = conn.execute("SELECT CAST(message AS BLOB) FROM messages").fetchone()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # the transfer reads the batch's text as str: text that is not UTF-8 falls back to the parser
    ts, values = conn.execute("SELECT json_extract(message, '$.ts'), json_extract(message, '$.values') "
                              "FROM messages").fetchone()
    conn.close()
    parsed = parse_values(text)
    assert not isinstance(parsed, str), parsed
    assert parsed[0] == ts and _same(json.loads(values), json.loads(parsed[2]))


def _same(a: Any, b: Any) -> bool:
    """JSON equality where -0.0 == 0.0 and floats compare by value (what a round trip keeps)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=0, abs_tol=0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) and type(a) is type(b)


# -- the classes the field saw, one by one, with their reasons ---------------------------

FIELD_POISON = {
    "integer beyond 64 bits": ('{"ts": %d, "values": {"seq": -1}}' % 2**64, "64-bit"),
    "deeply nested JSON": ('{"ts": 1, "values": {"deep": %s}}' % _nested(100_000), "nested deeper"),
    "invalid UTF-8": (Invalid(b'{"ts": 1, "values": {"s": "\xff"}}'), "not valid UTF-8"),
    "lone surrogate bytes": (Invalid(b'{"ts": 1, "values": {"s": "\xed\xb0\x80"}}'), "not valid UTF-8"),
}


@pytest.mark.parametrize("label", FIELD_POISON)
def test_a_poison_row_of_each_field_class_is_dead_lettered_and_its_batch_goes_out_in_ts_order(
        tmp_path: Path, label: str) -> None:
    message, reason = FIELD_POISON[label]
    rows = [Row("measurement", rig.record(i), i) for i in (5, 3)]
    rows += [Row("measurement", message, None)]
    rows += [Row("measurement", rig.record(i), i) for i in (4, 1, 2)]
    db = tmp_path / "communication_queue.db"
    write_rows(db, rows)
    store = QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
    try:
        result = store.transfer(100, 10**9)
        assert (result["moved"], result["dead"], result["more"]) == (5, 1, False)
        conn = sqlite3.connect(db)
        order = [json.loads(m)["values"]["seq"] for (m,) in conn.execute(f"SELECT message FROM {PENDING} ORDER BY id")]
        [(source_id, stored_reason)] = conn.execute("SELECT source_id, reason FROM dead_letters").fetchall()
        conn.close()
        assert order == [1, 2, 3, 4, 5]
        assert source_id == 3 and reason in stored_reason
    finally:
        store.close()


def test_rows_a_previous_gateway_left_in_pending_cannot_block_sending(tmp_path: Path) -> None:
    db = tmp_path / "communication_queue.db"
    rig.create_queue(db)
    conn = sqlite3.connect(db)
    conn.execute(f"CREATE TABLE {PENDING} (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
    conn.execute(f"INSERT INTO {PENDING} (type, message) VALUES ('m', ?)", (rig.record(1),))
    conn.execute(f"INSERT INTO {PENDING} (type, message) VALUES ('m', CAST(? AS TEXT))", (b'{"ts": 2, "values": {"a": "\xff"}}',))
    conn.execute(f"INSERT INTO {PENDING} (type, message) VALUES ('m', ?)", ('{"ts": 3, "values": {"v": NaN}}',))
    conn.execute(f"INSERT INTO {PENDING} (type, message) VALUES ('m', ?)", (rig.record(4),))
    conn.commit()
    conn.close()
    store = QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
    try:
        received = drain(store, 10)
    finally:
        store.close()
    assert sorted(v["seq"] for _, v in received) == [1, 4]
    conn = sqlite3.connect(db)
    dead = conn.execute("SELECT source, source_id, typeof(message) FROM dead_letters ORDER BY source_id").fetchall()
    conn.close()
    assert dead == [(PENDING, 2, "blob"), (PENDING, 3, "text")]


def test_parse_values_never_raises_on_text() -> None:
    @given(st.text(max_size=200) | st.sampled_from(['{"ts":1,"values":' + _nested(5000) + "}"]))
    @settings(max_examples=300, deadline=None, database=None)
    def check(text: str) -> None:
        parse_values(text)

    check()


@pytest.mark.parametrize("failure", [
    OverflowError("Python int too large to convert to SQLite INTEGER"), RecursionError("maximum recursion depth"),
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), sqlite3.InterfaceError("bad binding"),
])
def test_a_failure_nobody_foresaw_is_pinned_on_its_row_by_bisection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    """The safety net under the parser: whatever a row makes the batch raise, only that row stops."""
    import teg_fsm.adapters.queue_store as queue_store

    real = queue_store.parse_values

    def parse_values_that_breaks_on_seq_7(text: object) -> Any:
        if isinstance(text, str) and '"seq": 7,' in text:
            raise failure
        return real(text)

    monkeypatch.setattr(queue_store, "parse_values", parse_values_that_breaks_on_seq_7)
    monkeypatch.setattr(queue_store, "USUAL_ROW", "0")  # SQLite vouches for no row: every row meets the parser
    db = tmp_path / "communication_queue.db"
    moved, received = _forty_rows_in_reverse_ts_order_moved_and_drained(tmp_path)
    assert moved == 39
    assert [v["seq"] for _, v in received] == [i for i in range(40) if i != 7]  # ts order within the batch
    conn = sqlite3.connect(db)
    [(reason,)] = conn.execute("SELECT reason FROM dead_letters").fetchall()
    conn.close()
    assert type(failure).__name__ in reason


@pytest.mark.parametrize("check", [
    "CASE WHEN instr(message, '\"seq\": 7,') THEN json('not json') ELSE 1 END",  # SQLite raises on one row
    "CASE WHEN instr(message, '\"seq\": 7,') THEN 0 ELSE 1 END",  # SQLite cannot vouch for one row
])
def test_a_batch_sqlite_cannot_vouch_for_is_moved_by_the_parser_whole_and_in_ts_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    import teg_fsm.adapters.queue_store as queue_store

    monkeypatch.setattr(queue_store, "USUAL_ROW", check)
    db = tmp_path / "communication_queue.db"
    moved, received = _forty_rows_in_reverse_ts_order_moved_and_drained(tmp_path)
    assert moved == 40
    assert [v["seq"] for _, v in received] == list(range(40))
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
    # The parser archived the values as the row wrote them (SQLite writes them compactly).
    archived = sqlite3.connect(tmp_path / "gateway_archive.db").execute(
        "SELECT message FROM controller_archive WHERE message LIKE '%\"seq\": 7,%'").fetchall()
    conn.close()
    assert len(archived) == 1


def test_usual_rows_move_and_go_out_without_python_reading_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The normal path: SQLite checks, archives, orders and joins the rows; Python parses none."""
    import teg_fsm.adapters.queue_store as queue_store

    def no_parsing(text: object) -> Any:
        raise AssertionError("a usual row was parsed in Python")

    monkeypatch.setattr(queue_store, "parse_values", no_parsing)
    monkeypatch.setattr(queue_store, "parse_record", no_parsing)
    db = tmp_path / "communication_queue.db"
    kinds = ["measurement", "log", "debug_log", None]
    write_rows(db, [Row(kinds[i % 4], rig.record(i), i) for i in reversed(range(300))])
    store = QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
    try:
        assert store.transfer(1000, 10**9)["moved"] == 300
        payloads = []
        restart = True
        while (packet := store.next_packet(restart, 1000, None, None)).rows:
            restart = False
            assert len(packet.payload) <= 1000 and not packet.dead
            payloads.append(packet.payload)
            store.ack(packet.after_id, packet.last_id)
        assert not packet.more
    finally:
        store.close()
    received = [record for p in payloads for record in parse_telemetry(p)[0]]
    assert [v["seq"] for _, v in received] == list(range(300))  # ts order within the batch
    assert sum(len(p) for p in payloads) > 0.9 * 1000 * len(payloads)  # packets are filled
    archive = sqlite3.connect(tmp_path / "gateway_archive.db")
    archived = archive.execute("SELECT timestamp_ms, message FROM controller_archive ORDER BY id").fetchall()
    archive.close()
    assert [json.loads(m)["seq"] for _, m in archived] == [i for i in reversed(range(300)) if i % 4 in (0, 3)]
    assert all(ts == 1_700_000_000_000 + json.loads(m)["seq"] for ts, m in archived)
    assert count(db, "messages") == 0 and count(db, PENDING) == 0


def test_a_null_row_republished_into_pending_is_dead_lettered_not_skipped(tmp_path: Path) -> None:
    """A NULL message above the validated mark (an archive row without text, republished) must not vanish."""
    db = tmp_path / "communication_queue.db"
    write_rows(db, [Row("m", rig.record(i), i) for i in range(3)])
    store = QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
    try:
        store.transfer(100, 10**9)
        store.conn.execute(f"INSERT INTO {PENDING} (type, message) VALUES ('archive', NULL)")
        received = drain(store, 100)
    finally:
        store.close()
    assert [v["seq"] for _, v in received] == [0, 1, 2]
    assert count(db, "dead_letters") == 1 and count(db, PENDING) == 0


def test_a_locked_queue_is_not_blamed_on_a_row(tmp_path: Path) -> None:
    db = tmp_path / "communication_queue.db"
    write_rows(db, [Row("m", rig.record(i), i) for i in range(5)])
    store = QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
    store.conn.execute("PRAGMA busy_timeout=50")
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.transfer(100, 10**9)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    try:
        assert store.transfer(100, 10**9)["moved"] == 5
        assert count(db, "dead_letters") == 0
    finally:
        store.close()


def _forty_rows_in_reverse_ts_order_moved_and_drained(tmp_path: Path) -> tuple[int, list[Any]]:
    """Rows 39..0 written newest first, one transfer, then drained: (rows moved, what was sent)."""
    db = tmp_path / "communication_queue.db"
    write_rows(db, [Row("m", rig.record(i), i) for i in reversed(range(40))])
    store = QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9, archive_max_bytes=10**12)
    try:
        moved = store.transfer(100, 10**9)["moved"]
        return moved, drain(store, 100)
    finally:
        store.close()
