"""The gateway's outbox: what the gateway itself says to ThingsBoard, stored before it is sent.

Theory of operation
-------------------
Controller rows travel the uplink; everything the gateway says on its own
account (its telemetry such as ``docker_engine_reachable`` and the health-check
ages, ``sw_state`` reports, client attributes such as ``sys_info`` and
``FILE_HASHES``) goes through here. The MQTT component hands each such
``Publish`` to ``Outbox.say``; one thread owned by the outbox then

1. stamps every telemetry element with an explicit ``ts`` that is strictly
   increasing per key (``ts = max(event time, last ts of any of its keys + 1)``),
   because ThingsBoard keeps one value per device, key and ts (``ts_kv``'s
   primary key, schema-ts-psql.sql:27): two reports stamped on arrival in the
   same millisecond would otherwise keep only one row;
2. stores the elements and the new last-ts values in one SQLite transaction;
3. when connected, publishes the oldest rows (consecutive telemetry rows as
   one JSON array, consecutive attribute rows merged into one object), one
   packet in flight, within the payload size and the configured rate limits;
4. deletes the rows only when their PUBACK arrives. A lost session leaves them
   for the next connect (at least once; a resend carries the same ``ts``, so
   ThingsBoard stores it once).

Storage lives in ``gateway_logs_buffer.db`` beside the existing gateway's
``log_buffer`` table (left as it is): tables ``outbox(id, topic, payload,
created_ms)`` and ``last_ts(key, ts)``. The gateway logs stamp their keys
(``severity``, ``message``) through the same ``last_ts`` table, so there is one
place that knows the last ts used for every key the gateway sends.

RPC answers are not stored here: they answer a live request.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.adapters.mqtt_link import Refused
from teg_fsm.engine.effects.mqtt import ATTRIBUTES_TOPIC, TELEMETRY_TOPIC
from teg_fsm.engine.rate_limits import LimitSpecError, TokenBuckets
from teg_fsm.engine.sqlite_files import SMALL_PAGE_SIZE, is_corruption, open_checked, quarantine

log = logging.getLogger(__name__)

OUTBOX_TOPICS = frozenset({TELEMETRY_TOPIC, ATTRIBUTES_TOPIC})
BATCH_ROWS = 500
RETRY_S = 5.0  # after a packet went unacknowledged on a session that is still up
MAX_STORED_ROWS = 200_000  # gateway reports, not controller data: beyond this the oldest go
OnDone = Callable[[bool, "str | None"], None]
Publish = Callable[[str, bytes, int, OnDone], None]
Stored = Callable[["str | None"], None]  # None when stored, else why not
Element = tuple["int | None", dict[str, Any]]


class OutboxError(ValueError):
    """A payload the outbox cannot take (not JSON ThingsBoard accepts, or too large)."""


def schema(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "topic TEXT NOT NULL, payload TEXT NOT NULL, created_ms INTEGER NOT NULL)")
    conn.execute("CREATE TABLE IF NOT EXISTS last_ts (key TEXT PRIMARY KEY, ts INTEGER NOT NULL) WITHOUT ROWID")


# -- stamping (pure) ---------------------------------------------------------------


def telemetry_elements(payload: str) -> list[Element]:
    """The elements of a telemetry payload as ThingsBoard reads them (PROTOCOL.md §1.1)."""
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise OutboxError(f"telemetry payload is not JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    elements: list[Element] = []
    for item in items:
        if not isinstance(item, dict):
            raise OutboxError(f"telemetry element is a JSON {type(item).__name__}, not an object")
        if "ts" in item and "values" in item:
            ts, values = item["ts"], item["values"]
            if isinstance(ts, bool) or not isinstance(ts, (int, str)) or not str(ts).isdigit():
                raise OutboxError(f"telemetry ts is not a number of milliseconds: {str(ts)[:40]!r}")
            if not isinstance(values, dict):
                raise OutboxError("telemetry values is not an object")
            elements.append((int(ts), values))
        else:
            elements.append((None, item))
    return elements


def stamp(elements: Iterable[Element], now_ms: int, last: dict[str, int]) -> list[tuple[int, dict[str, Any]]]:
    """Give every element a ts after the last one used for any of its keys; updates ``last``.

    An element without ts takes ``now_ms`` as its event time. Elements with no
    values are dropped (ThingsBoard would store nothing for them).
    """
    stamped = []
    for event_ts, values in elements:
        if not values:
            continue
        ts = max([now_ms if event_ts is None else event_ts] + [last[k] + 1 for k in values if k in last])
        for key in values:
            last[key] = ts
        stamped.append((ts, values))
    return stamped


def load_last_ts(conn: sqlite3.Connection, keys: Iterable[str]) -> dict[str, int]:
    keys = list(dict.fromkeys(keys))
    rows = conn.execute(f"SELECT key, ts FROM last_ts WHERE key IN ({','.join('?' * len(keys))})", keys)
    return {key: int(ts) for key, ts in rows}


def save_last_ts(conn: sqlite3.Connection, last: dict[str, int]) -> None:
    conn.executemany("INSERT INTO last_ts (key, ts) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET ts = "
                     "max(ts, excluded.ts)", list(last.items()))


def remaining_length(topic: str, payload_bytes: int) -> int:
    """ThingsBoard's size check counts the PUBLISH's remaining length (PROTOCOL.md §1.2)."""
    return 2 + len(topic.encode("utf-8")) + 2 + payload_bytes


# -- storage -----------------------------------------------------------------------


@attrs.frozen
class Batch:
    """Consecutive rows of one topic, as one payload."""

    topic: str
    ids: tuple[int, ...]
    payload: bytes
    points: int


class OutboxStore:
    """The ``outbox`` and ``last_ts`` tables; used by one thread at a time."""

    def __init__(self, path: Path, max_payload_bytes: int) -> None:
        self.path = path
        self.max_payload_bytes = max_payload_bytes
        self.conn = open_checked(path, schema, page_size=SMALL_PAGE_SIZE)  # shared with LogBuffer: either creates it
        self.dropped = 0

    def close(self) -> None:
        self.conn.close()

    def put(self, topic: str, payload: str, now_ms: int) -> int:
        """Store one publish (telemetry stamped); returns the rows stored. Raises OutboxError."""
        rows = self._rows(topic, payload, now_ms)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if topic == TELEMETRY_TOPIC:
                rows = self._stamped_rows(payload, now_ms)
            conn.executemany("INSERT INTO outbox (topic, payload, created_ms) VALUES (?, ?, ?)",
                             [(topic, text, now_ms) for text in rows])
            self._trim()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(rows)

    def _rows(self, topic: str, payload: str, now_ms: int) -> list[str]:
        """Validate before the transaction: the payload is JSON of the shape its topic needs."""
        if topic == TELEMETRY_TOPIC:
            rows = [json.dumps({"ts": ts, "values": v}) for ts, v in stamp(telemetry_elements(payload), now_ms, {})]
        elif topic == ATTRIBUTES_TOPIC:
            rows = self.attribute_rows(payload)
        else:
            raise OutboxError(f"the outbox does not carry {topic}")
        for text in rows:
            size = remaining_length(topic, len(text.encode("utf-8")) + 2)
            if size > self.max_payload_bytes:
                raise OutboxError(f"a {topic} report of {size} bytes exceeds the {self.max_payload_bytes} byte limit")
        return rows

    @staticmethod
    def attribute_rows(payload: str) -> list[str]:
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise OutboxError(f"attributes payload is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise OutboxError(f"attributes payload is a JSON {type(data).__name__}, not an object")
        return [json.dumps(data)] if data else []

    def _stamped_rows(self, payload: str, now_ms: int) -> list[str]:
        elements = telemetry_elements(payload)
        last = load_last_ts(self.conn, (k for _, values in elements for k in values))
        stamped = stamp(elements, now_ms, last)
        save_last_ts(self.conn, last)
        return [json.dumps({"ts": ts, "values": values}) for ts, values in stamped]

    def _trim(self) -> None:
        top = self.conn.execute("SELECT max(id) FROM outbox").fetchone()[0] or 0
        self.dropped += self.conn.execute("DELETE FROM outbox WHERE id <= ?", (top - MAX_STORED_ROWS,)).rowcount

    def pending(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def next_batch(self, max_points: float) -> Batch | None:
        """The oldest rows of one topic that fit one packet (always at least one row)."""
        rows = self.conn.execute("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (BATCH_ROWS,)).fetchall()
        if not rows:
            return None
        topic = rows[0][1]
        taken: list[tuple[int, str]] = []
        points = 0
        size = 0
        for row_id, row_topic, text in rows:
            if row_topic != topic:
                break
            cost = _points(topic, text)
            grown = size + len(text.encode("utf-8")) + 1
            if taken and (points + cost > max_points or remaining_length(topic, grown + 1) > self.max_payload_bytes):
                break
            taken.append((row_id, text))
            points += cost
            size = grown
        return Batch(topic, tuple(i for i, _ in taken), _payload(topic, [t for _, t in taken]), points)

    def ack(self, ids: tuple[int, ...]) -> int:
        return self.conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids]).rowcount


def _points(topic: str, text: str) -> int:
    """Data points ThingsBoard charges for a stored row (attributes count as telemetry, PROTOCOL.md §6.2)."""
    data = json.loads(text)
    return len(data["values"]) if topic == TELEMETRY_TOPIC else len(data)


def _payload(topic: str, texts: list[str]) -> bytes:
    if topic == TELEMETRY_TOPIC:
        return ("[" + ",".join(texts) + "]").encode("utf-8")
    merged: dict[str, Any] = {}
    for text in texts:  # later reports of a key win, as they would one by one
        merged.update(json.loads(text))
    return json.dumps(merged).encode("utf-8")


# -- the sender thread -------------------------------------------------------------


class Outbox:
    """Owns the ``OutboxStore`` on one thread; stores, sends, deletes on PUBACK."""

    def __init__(self, path: Path, *, max_payload_bytes: int, rate_telemetry_messages: str = "",
                 rate_data_points: str = "", now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.path = path
        self.max_payload_bytes = max_payload_bytes
        self._now_ms = now_ms
        self._messages = _buckets(rate_telemetry_messages, "TEG_RATE_LIMIT_TELEMETRY_MESSAGES", now_ms())
        self._points = _buckets(rate_data_points, "TEG_RATE_LIMIT_DATA_POINTS", now_ms())
        self.publish: Publish | None = None
        self.online: Callable[[], bool] = lambda: True  # the link's "a device session is up"
        self.store: OutboxStore | None = None
        self.in_flight: Batch | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._retry_at: float | None = None  # monotonic; a rate-limit pause
        self._lock = threading.Lock()
        self._closed = False  # after stop(): reports are stored by the caller
        self._live_last_ts: dict[str, int] = {}  # ts of reports sent live while storage was unavailable
        self._storage_unavailable = False

    def open(self) -> None:
        store: OutboxStore | None = None
        try:
            store = OutboxStore(self.path, self.max_payload_bytes)
            if self._live_last_ts:  # reports sent live meanwhile: later stored ones must come after them
                save_last_ts(store.conn, self._live_last_ts)
                self._live_last_ts.clear()
        except sqlite3.DatabaseError as exc:
            if store is not None:
                store.close()
            if is_corruption(exc):
                raise
            # A full disk or an I/O error is a condition the engine reports; the gateway's
            # reports then go out live (below) and the store is opened again on the next try.
            if not self._storage_unavailable:
                log.warning("outbox storage unavailable (%s): reports are sent live while connected", exc)
            self._storage_unavailable = True
            self.store = None
            return
        if self._storage_unavailable:
            log.info("outbox storage available again")
        self._storage_unavailable = False
        self.store = store

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="teg-outbox", daemon=True)
        self._thread.start()
        self.wake()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.store is not None:
            self.store.close()

    def quiesce(self, deadline: float) -> None:
        """Before the link closes: give the packet in flight until ``deadline`` (monotonic) for its PUBACK."""
        while self.in_flight is not None and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- any thread --------------------------------------------------------------

    def say(self, topic: str, payload: str, now_ms: int, stored: Stored) -> None:
        """Store ``payload`` for ``topic`` durably, then send it; ``stored`` tells the outcome of storing."""
        with self._lock:
            if not self._closed:
                self._jobs.put(lambda: self._put(topic, payload, now_ms, stored))
                return
        self._put_after_stop(topic, payload, now_ms, stored)

    def _put_after_stop(self, topic: str, payload: str, now_ms: int, stored: Stored) -> None:
        """A report made while the gateway shuts down: stored at once, sent after the next start."""
        store = OutboxStore(self.path, self.max_payload_bytes)
        try:
            store.put(topic, payload, now_ms)
        except (OutboxError, sqlite3.DatabaseError) as exc:
            log.error("not storing a gateway report on %s made during shutdown: %s", topic, exc)
            stored(str(exc))
            return
        finally:
            store.close()
        stored(None)

    def wake(self) -> None:
        """Something may be sendable now (a connect, a new row)."""
        self._jobs.put(self._send_next)

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = None if self._retry_at is None else max(self._retry_at - time.monotonic(), 0.0)
            try:
                job = self._jobs.get(timeout=timeout)
            except queue.Empty:
                self._retry_at = None
                job = self._send_next
            if job is None:
                return
            try:
                job()
            except sqlite3.DatabaseError as exc:
                log.error("outbox storage error: %s", exc)
                if is_corruption(exc):
                    self._recover()
            except Exception:
                log.exception("outbox job failed")

    def _recover(self) -> None:
        """A storage error that looks like damage: quarantine the file if it fails a check (never delete)."""
        assert self.store is not None
        self.store.close()
        try:
            conn = sqlite3.connect(str(self.path))
            ok = conn.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok"
            conn.close()
        except sqlite3.DatabaseError as exc:
            ok = not is_corruption(exc)
        if not ok:
            quarantine(self.path, "failed a quick check after an outbox storage error")
        self.in_flight = None
        self.open()

    def _put(self, topic: str, payload: str, now_ms: int, stored: Stored) -> None:
        if self.store is None:
            self.open()
        if self.store is None:
            self._send_live(topic, payload, now_ms, stored)
            return
        try:
            self.store.put(topic, payload, now_ms)
        except OutboxError as exc:
            log.error("not sending a gateway report on %s: %s", topic, exc)
            stored(str(exc))
            return
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                stored(f"storing the report failed: {exc}")
                raise
            log.warning("outbox cannot store a report on %s (%s); sending it live", topic, exc)
            self._send_live(topic, payload, now_ms, stored)
            return
        stored(None)
        self._send_next()

    def _send_live(self, topic: str, payload: str, now_ms: int, stored: Stored) -> None:
        """Storage is unavailable (a full disk): what the gateway says goes out without a durable copy.

        The reports that matter in that condition (the health machine's) are sent
        again after every reconnect until acknowledged, so a report lost here is
        repeated; ts stay strictly increasing per key from the memory of this run.
        """
        publish = self.publish
        if publish is None or not self.online():
            stored("not stored (storage unavailable) and ThingsBoard is not connected")
            return
        try:
            if topic == TELEMETRY_TOPIC:
                stamped = stamp(telemetry_elements(payload), now_ms, self._live_last_ts)
                body = _payload(topic, [json.dumps({"ts": ts, "values": values}) for ts, values in stamped])
            else:
                body = _payload(topic, OutboxStore.attribute_rows(payload))
        except OutboxError as exc:
            stored(str(exc))
            return
        publish(topic, body, 1, lambda ok, error: stored(None if ok else error or "not acknowledged"))

    def _send_next(self) -> None:
        if self.store is None:
            self.open()
        store, publish = self.store, self.publish
        if self.in_flight is not None or store is None or publish is None or not self.online():
            return  # offline: nothing is read or tried until the next connect wakes us
        now = self._now_ms()
        batch = store.next_batch(max(self._points.available(now), 1.0) if not self._points.unlimited else float("inf"))
        if batch is None or not self._may_send(batch, now):
            return
        self.in_flight = batch
        self._messages.take(1, now)
        self._points.take(batch.points, now)
        publish(batch.topic, batch.payload, 1, lambda ok, error: self._jobs.put(lambda: self._done(batch, ok, error)))

    def _may_send(self, batch: Batch, now: int) -> bool:
        wait = max(self._messages.wait_s(1, now), self._points.wait_s(min(batch.points, self._points.capacity), now))
        self._retry_at = time.monotonic() + wait if wait > 0 else None
        return wait <= 0

    def _done(self, batch: Batch, ok: bool, error: str | None) -> None:
        if self.in_flight is batch:
            self.in_flight = None
        if isinstance(error, Refused):  # MQTT 5: ThingsBoard turned it down; resending cannot help
            log.warning("outbox packet of %d rows on %s %s: dropped", len(batch.ids), batch.topic, error)
            assert self.store is not None
            self.store.ack(batch.ids)
            self._send_next()
            return
        if not ok:  # kept: sent again on the next connect (or after a pause if this session is up)
            log.debug("outbox packet of %d rows not acknowledged: %s", len(batch.ids), error)
            if self.online():
                self._retry_at = time.monotonic() + RETRY_S
            return
        assert self.store is not None
        self.store.ack(batch.ids)
        self._send_next()


def _buckets(spec: str, variable: str, now_ms: int) -> TokenBuckets:
    try:
        return TokenBuckets(spec, now_ms, start_full=True)
    except LimitSpecError as exc:
        log.error("%s: %s; the outbox sends without that limit", variable, exc)
        return TokenBuckets("", now_ms)
