"""The controller queue, the pending table, the archive and the dead letters (SQLite).

Files and tables are contracts shared with the controller and the existing
gateway (DESIGN.md): ``communication_queue.db`` holds ``messages`` (written by
the controller), ``health_check``, ``pending_mqtt_messages`` and our
``dead_letters``; ``gateway_archive.db`` holds ``controller_archive``. Missing
tables are created, existing rows are never touched by schema work, and an
unreadable file is quarantined (``teg_fsm.sqlite_files``), never deleted.

Only the uplink I/O thread uses a ``QueueStore``. The archive is ATTACHed to
the queue connection so one transaction covers a batch: archive copy, pending
insert, dead letters, delete from ``messages``. (SQLite makes a WAL-mode
multi-file commit atomic per file: a crash inside that commit can leave a
batch archived twice, never lost from pending.)
"""

from __future__ import annotations

import logging
import sqlite3
from operator import itemgetter
from pathlib import Path
from typing import Any

from teg_fsm import sqlite_files
from teg_fsm.packets import Packet, archived_values, build_packet, parse_record, parse_values
from teg_fsm.sqlite_files import open_checked

log = logging.getLogger(__name__)

PENDING = "pending_mqtt_messages"
_SCAN_LIMIT = 20_000  # rows looked at per packet; far more than 64 KiB holds


def _queue_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
        CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER);
        CREATE TABLE IF NOT EXISTS pending_mqtt_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT);
        CREATE TABLE IF NOT EXISTS teg_meta (key TEXT PRIMARY KEY, value INTEGER);
        CREATE TABLE IF NOT EXISTS dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT, source_id INTEGER, type TEXT,
            message TEXT, reason TEXT, timestamp_ms INTEGER DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)));
        """
    )


def _archive_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS controller_archive (
            id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp_ms INTEGER, message TEXT);
        CREATE INDEX IF NOT EXISTS controller_archive_timestamp_ms ON controller_archive (timestamp_ms);
        """
    )


class QueueStore:
    """Moves rows queue -> pending/archive, builds packets, deletes acknowledged rows."""

    def __init__(self, queue_path: Path, archive_path: Path, *, archive_max_rows: int, archive_max_bytes: int) -> None:
        self.queue_path, self.archive_path = queue_path, archive_path
        self.archive_max_rows, self.archive_max_bytes = archive_max_rows, archive_max_bytes
        self.trimmed_archive_rows = 0  # discarded for the caps since the last report
        self._open()

    def _open(self) -> None:
        open_checked(self.archive_path, _archive_schema).close()
        self.conn = open_checked(self.queue_path, _queue_schema)
        self.conn.execute("ATTACH DATABASE ? AS arc", (str(self.archive_path),))
        self.conn.execute(f"PRAGMA arc.cache_size=-{sqlite_files.CACHE_KIB}")  # an attached schema gets the default
        self.pending_rows = self._scalar(f"SELECT count(*) FROM {PENDING}")
        self.archive_rows = self._scalar("SELECT count(*) FROM arc.controller_archive")
        self.cursor = 0
        # Pending rows above this id were validated (and ts-ordered) by our transfer;
        # rows at or below it may come from the previous gateway and are checked when sent.
        self.conn.execute("INSERT OR IGNORE INTO teg_meta (key, value) VALUES ('pending_checked_above', ?)",
                          (self.pending_top(),))
        self.checked_above = self._scalar("SELECT value FROM teg_meta WHERE key = 'pending_checked_above'")

    def reopen(self) -> None:
        self.close()
        self._open()

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            log.debug("closing the queue store failed", exc_info=True)

    def _scalar(self, sql: str, *args: Any) -> int:
        row = self.conn.execute(sql, args).fetchone()
        return int(row[0] or 0) if row else 0

    def pending_top(self) -> int:
        """The highest id pending has ever used (AUTOINCREMENT), or its max id."""
        seq = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (PENDING,)).fetchone()
        return max(int(seq[0]) if seq else 0, self._scalar(f"SELECT max(id) FROM {PENDING}"))

    # -- controller queue -> pending + archive ------------------------------------

    def transfer(self, max_rows: int, pending_max_rows: int) -> dict[str, Any]:
        room = pending_max_rows - self.pending_rows
        if room <= 0:
            return self._transfer_result(0, 0, more=True, full=True)
        limit = min(max_rows, room)
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows = conn.execute("SELECT id, type, message FROM messages ORDER BY id LIMIT ?", (limit,)).fetchall()
            archive, pending, dead = [], [], []
            for row_id, kind, text in rows:
                parsed = parse_values(text)
                if isinstance(parsed, str):
                    dead.append(("messages", row_id, kind, text, parsed))
                    continue
                pending.append((parsed[0], kind, text))
                if "log" not in (kind or ""):
                    archive.append((parsed[0], archived_values(parsed[2])))
            # ts order within a batch, so packets (built in id order) need no sort or parse.
            pending.sort(key=itemgetter(0))
            conn.executemany("INSERT INTO arc.controller_archive (timestamp_ms, message) VALUES (?, ?)", archive)
            conn.executemany(f"INSERT INTO {PENDING} (type, message) VALUES (?, ?)", [p[1:] for p in pending])
            self._dead_letter(dead)
            if rows:
                conn.execute("DELETE FROM messages WHERE id <= ?", (rows[-1][0],))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.pending_rows += len(pending)
        self.archive_rows += len(archive)
        if archive:
            self._trim_archive()
        full = self.pending_rows >= pending_max_rows
        return self._transfer_result(len(pending), len(dead), more=len(rows) == limit, full=full)

    def _transfer_result(self, moved: int, dead: int, *, more: bool, full: bool) -> dict[str, Any]:
        return {"moved": moved, "dead": dead, "more": more, "full": full,
                "pending_rows": self.pending_rows, "pending_top": self.pending_top()}

    def _dead_letter(self, dead: list[tuple[str, int, Any, Any, str]]) -> None:
        if not dead:
            return
        self.conn.executemany(
            "INSERT INTO dead_letters (source, source_id, type, message, reason) VALUES (?, ?, ?, ?, ?)", dead)
        for source, row_id, kind, _, reason in dead:
            # The row's content stays out of the log: it may be large or private.
            log.warning("queue row %s of %s (type %r) moved to dead_letters: %s", row_id, source, kind, reason)

    # -- pending -> packets ---------------------------------------------------------

    def next_packet(self, restart: bool, max_bytes: int, max_points: int | None, points_capacity: int | None) -> Packet:
        """The next rows after the cursor as one packet; the cursor moves past them."""
        if restart:
            self.cursor = 0
        cur = self.conn.execute(f"SELECT id, message FROM {PENDING} WHERE id > ? ORDER BY id LIMIT ?",
                                (self.cursor, _SCAN_LIMIT))
        seen = 0
        count_points = max_points is not None or points_capacity is not None
        checked_above = self.checked_above

        def rows():  # type: ignore[no-untyped-def]
            nonlocal seen
            for row_id, text in cur:
                seen += 1
                if row_id > checked_above and not count_points:
                    yield row_id, 0, 0, text  # validated at transfer; parsing costs ~40 % of a send
                    continue
                parsed = parse_record(text)
                yield (row_id, parsed) if isinstance(parsed, str) else (row_id, parsed[0], parsed[1], text)

        packet = build_packet(rows(), self.cursor, max_bytes, max_points, points_capacity)
        cur.close()
        packet.more = packet.more or seen == _SCAN_LIMIT
        if packet.dead:
            self._dead_letter_pending(packet.dead)
        self.cursor = packet.last_id
        return packet

    def _dead_letter_pending(self, dead: list[tuple[int, str]]) -> None:
        conn = self.conn
        ids = [row_id for row_id, _ in dead]
        reasons = dict(dead)
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(
                f"SELECT id, type, message FROM {PENDING} WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
            self._dead_letter([(PENDING, i, kind, text, reasons[i]) for i, kind, text in found])
            conn.executemany(f"DELETE FROM {PENDING} WHERE id = ?", [(i,) for i in ids])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.pending_rows = max(0, self.pending_rows - len(found))

    def ack(self, after_id: int, last_id: int) -> int:
        """Delete the rows of an acknowledged packet."""
        deleted = self.conn.execute(f"DELETE FROM {PENDING} WHERE id > ? AND id <= ?", (after_id, last_id)).rowcount
        self.pending_rows = max(0, self.pending_rows - deleted)
        return deleted

    # -- archive ------------------------------------------------------------------------

    def republish(self, start_ms: int, end_ms: int, pending_max_rows: int) -> dict[str, int]:
        """Copy archived rows of ``[start_ms, end_ms]`` back into pending (oldest first, up to the cap)."""
        room = max(0, pending_max_rows - self.pending_rows)
        total = self._scalar(
            "SELECT count(*) FROM arc.controller_archive WHERE timestamp_ms > ? AND timestamp_ms < ?", start_ms, end_ms)
        copied = self.conn.execute(
            f"INSERT INTO {PENDING} (type, message) SELECT 'archive', "
            "'{\"ts\":' || timestamp_ms || ',\"values\":' || message || '}' FROM arc.controller_archive "
            "WHERE timestamp_ms > ? AND timestamp_ms < ? ORDER BY timestamp_ms, id LIMIT ?", (start_ms, end_ms, room)).rowcount
        self.pending_rows += copied
        if copied < total:
            log.warning("republish: %d archived rows not copied, the pending buffer is full", total - copied)
        return {"rows": copied, "skipped": total - copied, "top": self.pending_top()}

    def discard(self, start_ms: int, end_ms: int) -> dict[str, int]:
        """Delete archived rows of ``[start_ms, end_ms]``."""
        deleted = self.conn.execute(
            "DELETE FROM arc.controller_archive WHERE timestamp_ms > ? AND timestamp_ms < ?", (start_ms, end_ms)).rowcount
        self.archive_rows = max(0, self.archive_rows - deleted)
        return {"rows": deleted}

    def archive_bytes(self) -> int:
        """Bytes the archive's live pages take (free pages are reused, so they do not count)."""
        pages = self._scalar("PRAGMA arc.page_count") - self._scalar("PRAGMA arc.freelist_count")
        return pages * self._scalar("PRAGMA arc.page_size")

    def _trim_archive(self) -> None:
        """Enforce the archive caps: the oldest archived rows go first."""
        excess = self.archive_rows - self.archive_max_rows
        used = self.archive_bytes()
        if used > self.archive_max_bytes and self.archive_rows:
            # Aim 5 % below the cap so trimming does not run on every batch.
            share = (used - self.archive_max_bytes * 0.95) / used
            excess = max(excess, int(self.archive_rows * share) + 1)
        if excess <= 0:
            return
        deleted = self.conn.execute(
            "DELETE FROM arc.controller_archive WHERE id IN "
            "(SELECT id FROM arc.controller_archive ORDER BY id LIMIT ?)", (excess,)).rowcount
        self.archive_rows = max(0, self.archive_rows - deleted)
        self.trimmed_archive_rows += deleted
