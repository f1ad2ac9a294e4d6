"""The gateway's own log records, forwarded to ThingsBoard as telemetry.

As the existing gateway does, each record becomes ``{"ts", "values":
{"severity": <LEVEL>, "message": "GATEWAY - <text>"}}`` with the existing
gateway's severities ``DEBUG``, ``INFO``, ``WARN``, ``ERROR`` (its dashboard
knows no ``WARNING`` or ``CRITICAL``). Records are buffered in
``gateway_logs_buffer.db`` (``log_buffer(id, log_level, message,
timestamp_ms)``) until ThingsBoard acknowledges them, so logs written while
offline arrive later.

ThingsBoard keeps one value per key and ts, so two records of one millisecond
would keep one row: each record's ts is made strictly increasing when it is
stored, through the ``last_ts`` table the gateway's outbox keeps for every key
it sends (``teg_fsm.adapters.outbox``), so it holds across restarts.

``BufferingLogHandler`` never does I/O on the logging thread: it keeps
redacted records in a bounded deque that the uplink I/O thread flushes into
``LogBuffer`` every tick. DEBUG records are never forwarded (they would
multiply the traffic and could describe the uplink's own sending).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from teg_fsm.adapters.logs import RedactSecrets
from teg_fsm.adapters.outbox import load_last_ts, save_last_ts, stamp
from teg_fsm.adapters.outbox import schema as outbox_schema
from teg_fsm.adapters.packets import Packet, build_packet
from teg_fsm.engine.sqlite_files import SMALL_PAGE_SIZE, open_checked

PREFIX = "GATEWAY - "
MAX_MEMORY_RECORDS = 10_000
MAX_MESSAGE_CHARS = 8_000
MAX_BUFFERED_ROWS = 100_000  # logs are not controller data: beyond this the oldest go
LOG_KEYS = ("severity", "message")
SEVERITIES = {"WARNING": "WARN", "CRITICAL": "ERROR", "FATAL": "ERROR"}


def severity(level_name: str) -> str:
    """The existing gateway's name for a Python level name."""
    return SEVERITIES.get(level_name, level_name)


def _schema(conn) -> None:  # type: ignore[no-untyped-def]
    conn.execute(
        "CREATE TABLE IF NOT EXISTS log_buffer "
        "(id INTEGER PRIMARY KEY AUTOINCREMENT, log_level TEXT, message TEXT, timestamp_ms INTEGER)"
    )
    outbox_schema(conn)


class BufferingLogHandler(logging.Handler):
    """Collects log records (INFO and above, secrets redacted) for the uplink."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(max(level, logging.INFO))
        self.addFilter(RedactSecrets())
        self._records: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=MAX_MEMORY_RECORDS)
        self._lock_records = threading.Lock()
        self.wake: Callable[[], None] = lambda: None  # set by the uplink I/O thread

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text = f"{text}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            with self._lock_records:
                first = not self._records
                self._records.append((severity(record.levelname), text, int(record.created * 1000)))
            if first:  # one wake-up per batch of records, not per record
                self.wake()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def take(self) -> list[tuple[str, str, int]]:
        with self._lock_records:
            records = list(self._records)
            self._records.clear()
        return records


class LogBuffer:
    """``gateway_logs_buffer.db``: buffered records, sent oldest first, deleted on PUBACK."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = open_checked(path, _schema, page_size=SMALL_PAGE_SIZE)  # shared with OutboxStore: either creates it
        self.cursor = 0
        self.dropped = 0

    def close(self) -> None:
        self.conn.close()

    def add(self, records: list[tuple[str, str, int]]) -> int:
        """Store records; returns the highest id now buffered."""
        conn = self.conn
        cut = [(lvl, m if len(m) <= MAX_MESSAGE_CHARS else m[:MAX_MESSAGE_CHARS] + " [cut]", ts) for lvl, m, ts in records]
        conn.execute("BEGIN IMMEDIATE")
        last = load_last_ts(conn, LOG_KEYS)
        stamped = stamp(((ts, dict.fromkeys(LOG_KEYS, 1)) for _, _, ts in cut), 0, last)
        save_last_ts(conn, last)
        conn.executemany("INSERT INTO log_buffer (log_level, message, timestamp_ms) VALUES (?, ?, ?)",
                         [(lvl, m, ts) for (lvl, m, _), (ts, _) in zip(cut, stamped, strict=True)])
        top = conn.execute("SELECT max(id) FROM log_buffer").fetchone()[0] or 0
        self.dropped += conn.execute(
            "DELETE FROM log_buffer WHERE id <= ?", (top - MAX_BUFFERED_ROWS,)).rowcount
        conn.execute("COMMIT")
        return int(top)

    def top(self) -> int:
        seq = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'log_buffer'").fetchone()
        return int(seq[0]) if seq else 0

    def next_packet(self, restart: bool, max_bytes: int, max_points: int | None, points_capacity: int | None) -> Packet:
        if restart:
            self.cursor = 0
        cur = self.conn.execute(
            "SELECT id, log_level, message, timestamp_ms FROM log_buffer WHERE id > ? ORDER BY id LIMIT 5000",
            (self.cursor,))
        rows = (
            (row_id, int(ts or 0), 2, to_record(level, message, ts)) for row_id, level, message, ts in cur
        )
        packet = build_packet(rows, self.cursor, max_bytes, max_points, points_capacity)
        cur.close()
        # Records are cut to MAX_MESSAGE_CHARS when stored, so none is "dead" unless
        # the packet limit is absurdly small; such a record goes with the ack range.
        packet.dead = []
        self.cursor = packet.last_id
        return packet

    def ack(self, after_id: int, last_id: int) -> int:
        return self.conn.execute("DELETE FROM log_buffer WHERE id > ? AND id <= ?", (after_id, last_id)).rowcount


def to_record(level: str, message: str, ts_ms: int | None) -> str:
    return json.dumps({"ts": int(ts_ms or time.time() * 1000),
                       "values": {"severity": severity(level), "message": PREFIX + (message or "")}})
