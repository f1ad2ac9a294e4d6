"""The controller queue, the pending table, the archive and the dead letters (SQLite).

Files and tables are contracts shared with the controller and the existing
gateway (DESIGN.md): ``communication_queue.db`` holds ``messages`` (written by
the controller), ``health_check``, ``pending_mqtt_messages`` and our
``dead_letters``; ``gateway_archive.db`` holds ``controller_archive``. Missing
tables are created, existing rows are never touched by schema work, and an
unreadable file is quarantined (``teg_fsm.engine.sqlite_files``), never deleted.

Only the uplink I/O thread uses a ``QueueStore``. The archive is ATTACHed to
the queue connection so one transaction covers a batch: archive copy, pending
insert, dead letters, delete from ``messages``. (SQLite makes a WAL-mode
multi-file commit atomic per file: a crash inside that commit can leave a
batch archived twice, never lost from pending.)

Python reads no row on the normal path: a batch whose every row SQLite can
vouch for (``USUAL_ROW``) is checked, archived, queued in ts order and deleted
by SQL statements, and packets of rows we validated are joined by SQLite.

No row can block the queue. Any other batch is moved in one go by Python (one
parse per row); if that raises, the batch is bisected inside savepoints until
each row that makes it fail is isolated, those rows go to ``dead_letters``
with the reason, and the rest of the batch is moved, still in ts order.

Files change under us. The queue file may be deleted and re-created by the
controller: its inode is compared before each transfer, and a replaced file
is reopened, taking along the rows still held in the old one. A ``messages``
table of another shape is read as far as it can be (reported once); a
``pending_mqtt_messages`` or ``dead_letters`` table we cannot use is renamed
aside with a timestamp (its readable rows are carried over) and recreated.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Generator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from teg_fsm.adapters.packets import MAX_NESTING, Packet, archived_values, build_packet, parse_record, parse_values
from teg_fsm.engine import sqlite_files
from teg_fsm.engine.sqlite_files import is_corruption, open_checked

T = TypeVar("T")
log = logging.getLogger(__name__)

PENDING = "pending_mqtt_messages"
_SCAN_LIMIT = 20_000  # rows looked at per packet; far more than 64 KiB holds
# Columns our own tables must have; one that lacks any is quarantined (renamed aside).
_OUR_TABLES = {
    PENDING: ("id", "type", "message"),
    "dead_letters": ("id", "source", "source_id", "type", "message", "reason"),
}
_REASON_CHARS = 300
# A row SQLite can vouch for without Python: strict JSON (SQLite 3.40's json_valid refuses
# NaN/Infinity, trailing commas and non-JSON whitespace), an object whose ``ts`` is an integer
# within 64 bits (json_type says integer, not true/false, which json_extract reads as 1/0; one
# beyond 64 bits json_extract reads as a real), whose ``values`` is an object, with no other
# or repeated top-level key (json_remove takes the first of each: a repeated ``ts`` stays, and
# ThingsBoard would read the last one), and with at most MAX_NESTING brackets in all (so no
# deeper nesting). Every such row passes ``parse_values`` too; any other row is left to it.
# CASE, not AND: json_type raises on text that is not JSON, and only CASE is sure to be lazy.
# The brackets are counted only in a row longer than MAX_NESTING characters (a shorter one
# cannot hold more; CASE again, as OR computed both sides): the two replace() copies were
# 40 % of this check for the usual short row.
USUAL_ROW = (
    "CASE WHEN typeof(message) = 'text' AND json_valid(message) THEN "
    "json_type(message, '$.ts') = 'integer' AND typeof(json_extract(message, '$.ts')) = 'integer' "
    "AND json_type(message, '$.values') = 'object' "
    "AND json_remove(message, '$.ts', '$.values') = '{}' "
    f"AND CASE WHEN length(message) <= {MAX_NESTING} THEN 1 "
    f"ELSE length(message) - length(replace(replace(message, '{{', ''), '[', '')) <= {MAX_NESTING} END "
    "ELSE 0 END"
)
# Rows whose type (text) contains "log" are not archived (case-sensitive, as ``_stage``).
_ARCHIVED_TYPE_SQL = "(typeof({t}) <> 'text' OR instr({t}, 'log') = 0)"
Row = tuple[Any, Any, Any]


def is_row_fault(exc: BaseException) -> bool:
    """True when ``exc`` comes from the rows being moved (a poison row), not from the files.

    Locks, I/O, a full disk, a missing table and corruption are about the files:
    retrying later is right and no row is to blame. Anything else that a batch
    raises (a value SQLite refuses, text it cannot decode, a parser limit) is.
    """
    if isinstance(exc, sqlite3.OperationalError):
        return "could not decode" in str(exc).lower()
    return isinstance(exc, Exception) and not is_corruption(exc)


def is_file_fault(exc: sqlite3.Error) -> bool:
    """True when ``exc`` is about the files (retry later), whatever the rows hold."""
    text = str(exc).lower()
    if "malformed json" in text:  # a row's text, not a "malformed" database image
        return False
    return is_corruption(exc) or (isinstance(exc, sqlite3.OperationalError) and any(
        words in text for words in ("locked", "busy", "disk", "full", "readonly", "unable to open", "no such",
                                    "has no column", "interrupt", "out of memory")))


def row_fault_reason(exc: BaseException) -> str:
    """A short reason for a dead letter; never the row's content (it may be private or huge)."""
    text = str(exc)
    column = re.search(r"could not decode to UTF-8 column '([^']*)'", text, re.IGNORECASE)
    if column:
        return f"column {column.group(1)} holds text that is not valid UTF-8"
    if isinstance(exc, UnicodeError):
        return f"text SQLite cannot store: {type(exc).__name__} ({getattr(exc, 'reason', '')})"
    return f"{type(exc).__name__}: {text}"[:_REASON_CHARS]


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


def _identity(path: Path) -> tuple[int, int]:
    """Which file ``path`` names now (device, inode): a re-created file has another."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _close(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        log.debug("closing a queue connection failed", exc_info=True)


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
        self.generation = 0  # bumped when the queue file is reopened; acks of older packets are void
        self._reopened = False
        self._reported: set[str] = set()
        self._replaced: list[sqlite3.Connection] = []  # connections to replaced files with rows to carry over
        self._open()

    def _open(self) -> None:
        # Created (with its small pages) by its own connection: the ATTACH below only ever
        # meets an existing file, whose page size SQLite keeps.
        open_checked(self.archive_path, _archive_schema, page_size=sqlite_files.SMALL_PAGE_SIZE).close()
        self.conn = open_checked(self.queue_path, _queue_schema)
        self.identity = _identity(self.queue_path)
        self._quarantine_foreign_tables()
        self._read_messages_shape()
        self.conn.execute("ATTACH DATABASE ? AS arc", (str(self.archive_path),))
        # An attached schema gets SQLite's defaults, not the main one's: synchronous=FULL
        # fsynced the archive's WAL on every transfer (one fsync per controller row at rest,
        # each also an ext4 journal commit). NORMAL, like every other file of ours: a killed
        # process loses nothing committed; a power cut can lose the archive copies of the last
        # commits before the next checkpoint (rows already moved to pending are still sent).
        self.conn.execute("PRAGMA arc.synchronous=NORMAL")
        self.conn.execute(f"PRAGMA arc.cache_size=-{sqlite_files.CACHE_KIB}")
        # The batch SQLite moves (see _move_usual_batch): in memory, never in a file.
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS teg_batch "
                          "(id INTEGER PRIMARY KEY, type, message, usual, ts, vals)")
        self.pending_rows = self._scalar(f"SELECT count(*) FROM {PENDING}")
        self.archive_rows = self._scalar("SELECT count(*) FROM arc.controller_archive")
        self.cursor = 0
        self._scanned = 0
        self._scan_rows = 256  # rows _joined_packet takes; follows the rows that fit the last packet
        # What the last look at ``messages`` saw (see ``has_news``): None is "not looked yet".
        self._data_version: int | None = None
        self._seen_top: int | None = -1
        # Pending rows above this id were validated (and ts-ordered) by our transfer;
        # rows at or below it may come from the previous gateway and are checked when sent.
        self.conn.execute("INSERT OR IGNORE INTO teg_meta (key, value) VALUES ('pending_checked_above', ?)",
                          (self.pending_top(),))
        self.checked_above = self._scalar("SELECT value FROM teg_meta WHERE key = 'pending_checked_above'")

    def reopen(self) -> None:
        """Open the file again (a table changed shape under us); the next transfer says so."""
        _close(self.conn)
        self.generation += 1
        self._open()
        self._reopened = True

    def report_once(self, key: str, message: str, *args: Any, level: int = logging.ERROR) -> None:
        """Log a condition once per store (a foreign schema is not news every second)."""
        if key not in self._reported:
            self._reported.add(key)
            log.log(level, message, *args)

    # -- the shape of the tables ----------------------------------------------------

    def _columns(self, table: str, schema: str = "main") -> dict[str, tuple[str, int]]:
        """``{column: (declared type, pk)}`` of ``table``."""
        rows = self.conn.execute(f"PRAGMA {schema}.table_info({table})").fetchall()
        return {name: (str(decl or "").upper(), int(pk)) for _, name, decl, _, _, pk in rows}

    def _read_messages_shape(self) -> None:
        """How to read the controller's ``messages``, whatever shape it has; reported once."""
        cols = self._columns("messages")
        self.msg_id = "id" if "id" in cols else "rowid"
        self.msg_type = "type" if "type" in cols else "NULL"
        self._msg_type_sql = "m.type" if "type" in cols else "NULL"
        self.msg_readable = "message" in cols
        for column in ("id", "type", "message"):
            if column not in cols:
                consequence = {"id": "rows are taken in rowid order", "type": "rows are sent with no type",
                               "message": "no row can be read; they stay in the queue"}[column]
                self.report_once(f"messages.{column}", "controller queue %s: table messages has no column %r (columns: %s); %s",
                                 self.queue_path, column, ", ".join(cols) or "none", consequence)

    def _quarantine_foreign_tables(self) -> None:
        for table, needed in _OUR_TABLES.items():
            cols = self._columns(table)
            usable = all(c in cols for c in needed) and cols["id"] == ("INTEGER", 1)
            if not usable:
                self._quarantine_table(table, cols)

    def _quarantine_table(self, table: str, cols: dict[str, tuple[str, int]]) -> None:
        """Rename ``table`` aside with a timestamp, recreate it, carry over the rows it can."""
        base = aside = f"{table}_quarantined_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        n = 1
        while self._columns(aside):
            n += 1
            aside = f"{base}_{n}"
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f'ALTER TABLE {table} RENAME TO "{aside}"')
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        _queue_schema(conn)
        carried = 0
        if table == PENDING and "message" in cols:
            kind = "type" if "type" in cols else "NULL"
            order = "id" if "id" in cols else "rowid"
            carried = conn.execute(f'INSERT INTO {PENDING} (type, message) SELECT {kind}, message FROM "{aside}" '
                                   f"ORDER BY {order}").rowcount
            # Rows we did not validate: they are parsed again when sent.
            conn.execute("INSERT OR REPLACE INTO teg_meta (key, value) VALUES ('pending_checked_above', ?)",
                         (self.pending_top(),))
        log.error("controller queue %s: table %s has a shape the gateway cannot use (columns: %s); renamed to %s "
                  "and recreated, %d of its rows carried over", self.queue_path, table,
                  ", ".join(f"{c} {d}".strip() for c, (d, _) in cols.items()) or "none", aside, carried)

    # -- following the file ---------------------------------------------------------

    def follow_file(self) -> bool:
        """Reopen the queue file if it was replaced (deleted and re-created); True if it was."""
        try:
            identity = _identity(self.queue_path)
        except FileNotFoundError:
            self.report_once(f"missing:{self.identity}", "controller queue %s was deleted; sending the rows we hold "
                             "and waiting for the file to come back", self.queue_path, level=logging.WARNING)
            return False
        replaced = identity != self.identity
        if replaced:
            log.warning("controller queue %s was replaced (inode %d -> %d); reopening it", self.queue_path,
                        self.identity[1], identity[1])
            self._replaced.append(self.conn)  # still open: its rows are carried over first
            self.generation += 1
            self._open()
        self._carry_over_replaced()
        return replaced

    def _carry_over_replaced(self) -> None:
        """Carry the rows of replaced files over; one that cannot be done now is tried at the next transfer."""
        for old in list(self._replaced):
            try:
                carried = self._carry_over(old)
            except sqlite3.Error as exc:
                self.report_once(f"carry:{id(old)}", "cannot carry rows over from the replaced queue file yet (%s); "
                                 "trying again with the next transfer", exc)
                continue
            old.close()
            self._replaced.remove(old)
            if any(carried):
                log.warning("carried %d pending and %d queued rows over from the replaced queue file", *carried)

    def _carry_over(self, old: sqlite3.Connection) -> tuple[int, int]:
        """Move the rows the replaced file still holds into the new one (nothing is lost with it)."""
        old_cols = {r[1] for r in old.execute("PRAGMA main.table_info(messages)")}
        old.execute("ATTACH DATABASE ? AS fresh", (str(self.queue_path),))
        try:
            moved = self._copy_rows(old, old_cols)
        finally:
            old.execute("DETACH DATABASE fresh")
        self.pending_rows = self._scalar(f"SELECT count(*) FROM {PENDING}")
        self.checked_above = self._scalar("SELECT value FROM teg_meta WHERE key = 'pending_checked_above'")
        return moved

    def _copy_rows(self, old: sqlite3.Connection, old_cols: set[str]) -> tuple[int, int]:
        """One transaction: old pending -> new pending (checked again when sent), old messages -> new messages."""
        old.execute("BEGIN IMMEDIATE")
        try:
            pending = old.execute(f"INSERT INTO fresh.{PENDING} (type, message) "
                                  f"SELECT type, message FROM main.{PENDING} ORDER BY id").rowcount
            queued = 0
            if "message" in old_cols and self.msg_readable:
                old_kind = "type" if "type" in old_cols else "NULL"
                into = "(type, message)" if self.msg_type == "type" else "(message)"
                what = f"{old_kind}, message" if self.msg_type == "type" else "message"
                queued = old.execute(f"INSERT INTO fresh.messages {into} SELECT {what} FROM main.messages "
                                     f"ORDER BY {'id' if 'id' in old_cols else 'rowid'}").rowcount
            if pending:
                old.execute("INSERT OR REPLACE INTO fresh.teg_meta (key, value) VALUES ('pending_checked_above', "
                            f"(SELECT max(id) FROM fresh.{PENDING}))")
            # Emptied, so rows are never carried twice should the old file be looked at again.
            old.execute(f"DELETE FROM main.{PENDING}")
            if queued:
                old.execute("DELETE FROM main.messages")
            old.execute("COMMIT")
        except BaseException:
            old.execute("ROLLBACK")
            raise
        return pending, queued

    def close(self) -> None:
        for conn in (self.conn, *self._replaced):
            _close(conn)

    def _scalar(self, sql: str, *args: Any) -> int:
        row = self.conn.execute(sql, args).fetchone()
        return int(row[0] or 0) if row else 0

    def depth(self) -> dict[str, int]:
        """Rows not yet delivered (controller queue plus pending) and rows kept as dead letters."""
        waiting = self._scalar("SELECT count(*) FROM messages") if self.msg_readable else 0
        return {"queue_depth": waiting + self.pending_rows,
                "queue_dead_letters": self._scalar("SELECT count(*) FROM dead_letters")}

    def pending_top(self) -> int:
        """The highest id pending has ever used (AUTOINCREMENT), or its max id."""
        seq = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (PENDING,)).fetchone()
        return max(int(seq[0]) if seq else 0, self._scalar(f"SELECT max(id) FROM {PENDING}"))

    # -- is there anything new? ------------------------------------------------------

    def has_news(self) -> bool:
        """True when the controller may have added rows since we last looked; no transaction, no write.

        A controller that opens and closes the queue file (or checkpoints its WAL,
        or writes ``health_check``) wakes the file watch without adding a row; that
        must cost nothing. ``PRAGMA data_version`` changes only when another
        connection committed, and the highest id in ``messages`` says whether that
        commit added a row; only then is the uplink machine told. A replaced file
        is always news (the transfer follows it).
        """
        try:
            if _identity(self.queue_path) != self.identity:
                return True
        except FileNotFoundError:
            return False
        version = self._scalar("PRAGMA data_version")
        if version == self._data_version:
            return False
        self._data_version = version
        if not self.msg_readable:
            return False
        top = self._messages_top()
        if top == self._seen_top:
            return False
        self._seen_top = top
        return top is not None

    def _messages_top(self) -> int | None:
        row = self.conn.execute(f"SELECT max({self.msg_id}) FROM messages").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # -- controller queue -> pending + archive ------------------------------------

    def transfer(self, max_rows: int, pending_max_rows: int) -> dict[str, Any]:
        reopened = self.follow_file() or self._reopened
        self._reopened = False
        room = pending_max_rows - self.pending_rows
        if room <= 0 or not self.msg_readable:
            return self._transfer_result(0, 0, more=room <= 0, full=room <= 0, reopened=reopened)
        limit = min(max_rows, room)
        try:
            taken, moved, dead, archived = self._in_transaction(lambda: self._move_batch(limit))
        except Exception as exc:
            if not is_row_fault(exc):
                raise
            log.warning("moving a batch of controller rows failed (%s); isolating the rows that cause it",
                        row_fault_reason(exc))
            taken, moved, dead, archived = self._in_transaction(lambda: self._move_isolating(limit))
        self.pending_rows += moved
        self.archive_rows += archived
        if archived:
            self._trim_archive()
        full = self.pending_rows >= pending_max_rows
        return self._transfer_result(moved, dead, more=taken == limit, full=full, reopened=reopened)

    def _in_transaction(self, work: Callable[[], T]) -> T:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    def _select_messages(self, where: str = "") -> str:
        return f"SELECT {self.msg_id}, {self.msg_type}, message FROM messages {where} ORDER BY {self.msg_id}"

    def _move_batch(self, limit: int) -> tuple[int, int, int, int]:
        """The next ``limit`` rows: by SQLite alone when all are of the usual shape, else one parse each."""
        moved_by_sql = self._move_usual_batch(limit)
        if moved_by_sql is not None:
            return moved_by_sql
        rows = self.conn.execute(self._select_messages() + " LIMIT ?", (limit,)).fetchall()
        moved, dead, archived = self._stage(rows)
        if rows:
            self.conn.execute(f"DELETE FROM messages WHERE {self.msg_id} <= ?", (rows[-1][0],))
        # Rows left behind (batch limit, full pending) are known to the machine ("more", "full"):
        # only a row above them is news. Never data_version here: a commit racing this
        # transaction must still be seen by the next look.
        self._seen_top = self._messages_top()
        return len(rows), moved, dead, archived

    def _move_usual_batch(self, limit: int) -> tuple[int, int, int, int] | None:
        """Move a batch whose every row is of the usual shape without Python reading a row.

        The usual shape is ``{"ts": <integer>, "values": {...}}``: SQLite checks it
        (``USUAL_ROW``), fills the archive (``values`` as SQLite writes it: compact) and
        pending (in ts order) with ``INSERT ... SELECT`` and deletes the batch.
        Python only sees the batch's text once, joined, because reading text as ``str``
        is what proves it is UTF-8 (SQLite's JSON functions do not check that). Returns
        None, having written nothing, when any row is otherwise: then ``_stage`` decides
        row by row, as it always did.
        """
        conn, msg_id = self.conn, self.msg_id
        try:
            # Each row's JSON is parsed once here (the later json_extract calls of a row reuse
            # SQLite's parse); the statements after this one read the temp table.
            conn.execute(f"INSERT INTO temp.teg_batch (id, type, message, usual, ts, vals) "
                         f"SELECT {msg_id}, {self.msg_type}, message, {USUAL_ROW}, json_extract(message, '$.ts'), "
                         f"json_extract(message, '$.values') FROM messages ORDER BY {msg_id} LIMIT ?", (limit,))
            count, last, usual, _ = conn.execute(
                "SELECT count(*), max(id), total(usual), group_concat(message, '') FROM temp.teg_batch").fetchone()
        except sqlite3.Error as exc:
            conn.execute("DELETE FROM temp.teg_batch")
            if is_file_fault(exc):
                raise
            return None  # text that is not JSON or not UTF-8, a batch too large to join...: row by row copes
        try:
            if count == 0 or usual != count:
                return None
            archived = conn.execute(
                "INSERT INTO arc.controller_archive (timestamp_ms, message) SELECT ts, vals FROM temp.teg_batch "
                f"WHERE {_ARCHIVED_TYPE_SQL.format(t='type')} ORDER BY id").rowcount
            conn.execute(f"INSERT INTO {PENDING} (type, message) SELECT type, message FROM temp.teg_batch ORDER BY ts, id")
            conn.execute(f"DELETE FROM messages WHERE {msg_id} <= ?", (last,))
        finally:
            conn.execute("DELETE FROM temp.teg_batch")
        self._seen_top = self._messages_top()  # as in _move_batch
        return count, count, 0, archived

    def _stage(self, rows: Sequence[Row], *, probe: bool = False) -> tuple[int, int, int]:
        """Archive and queue the valid rows (in ts order), dead-letter the malformed ones.

        Python parses each row once (the poison rules live in ``parse_values``) but
        does not hand the rows' text back: SQLite copies the pending rows from
        ``messages`` itself, in the ts order Python found (binding 2,000 texts cost
        about twice the copy).
        Returns ``(queued, dead, archived)``; a ``probe`` (to be rolled back) writes no dead letters.
        """
        archive, pending, dead = [], [], []
        for row_id, kind, text in rows:
            parsed = parse_values(text)
            if isinstance(parsed, str):
                dead.append(("messages", row_id, kind, text, parsed))
                continue
            pending.append((parsed[0], row_id))
            if kind.__class__ is not str or "log" not in kind:
                archive.append((parsed[0], archived_values(parsed[2])))
        conn = self.conn
        conn.executemany("INSERT INTO arc.controller_archive (timestamp_ms, message) VALUES (?, ?)", archive)
        self._copy_to_pending(pending)
        if not probe:
            self._dead_letter(dead)
        return len(pending), len(dead), len(archive)

    def _copy_to_pending(self, pending: list[tuple[int, int]]) -> None:
        """Copy the ``(ts, id)`` rows of ``messages`` to pending in ts order (equal ts: id order).

        ts order within a batch, so packets (built in id order) need no sort or parse.
        Usually the batch is already in ts order with no row missing: one range copy.
        Otherwise the ids travel in ts order as one JSON array (``json_each``).
        """
        if not pending:
            return
        select = f"INSERT INTO {PENDING} (type, message) SELECT {self.msg_type}, message FROM messages"
        first, last = pending[0][1], pending[-1][1]
        in_order = all(a[0] <= b[0] for a, b in zip(pending, pending[1:]))
        if in_order and last - first + 1 == len(pending):
            self.conn.execute(f"{select} WHERE {self.msg_id} BETWEEN ? AND ? ORDER BY {self.msg_id}", (first, last))
            return
        pending.sort(key=itemgetter(0))
        self.conn.execute(f"INSERT INTO {PENDING} (type, message) SELECT {self._msg_type_sql}, m.message "
                          f"FROM json_each(?) AS j JOIN messages AS m ON m.{self.msg_id} = j.value ORDER BY j.key",
                          (json.dumps([row_id for _, row_id in pending]),))

    # -- isolating poison rows (only after a batch failed) ------------------------------

    def _move_isolating(self, limit: int) -> tuple[int, int, int, int]:
        """Bisect the batch until each row that breaks it is found; move the others in one piece."""
        ids = [r[0] for r in self.conn.execute(f"SELECT {self.msg_id} FROM messages ORDER BY {self.msg_id} LIMIT ?",
                                               (limit,))]
        poison: dict[int, str] = {}
        self._isolate(ids, poison)
        good = [i for i in ids if i not in poison]
        try:
            moved, dead, archived = self._probe_or_stage(good, keep=True)
        except Exception as exc:  # rows that fail only together: one by one, in id order
            if not is_row_fault(exc):
                raise
            moved, dead, archived = self._move_one_by_one(good, poison)
        self._dead_letter([self._poison_letter(i, reason) for i, reason in sorted(poison.items())])
        if ids:
            self.conn.execute(f"DELETE FROM messages WHERE {self.msg_id} <= ?", (ids[-1],))
        self._seen_top = self._messages_top()
        return len(ids), moved, dead + len(poison), archived

    def _isolate(self, ids: list[int], poison: dict[int, str]) -> None:
        if not ids:
            return
        try:
            self._probe_or_stage(ids, keep=False)
            return
        except Exception as exc:
            if not is_row_fault(exc):
                raise
            if len(ids) == 1:
                poison[ids[0]] = row_fault_reason(exc)
                return
        half = len(ids) // 2
        self._isolate(ids[:half], poison)
        self._isolate(ids[half:], poison)

    def _probe_or_stage(self, ids: list[int], *, keep: bool) -> tuple[int, int, int]:
        """Stage the rows ``ids`` inside a savepoint; roll it back unless ``keep``."""
        conn = self.conn
        conn.execute("SAVEPOINT probe")
        try:
            rows = self._fetch(ids)
            result = self._stage(rows, probe=not keep)
        except BaseException:
            conn.execute("ROLLBACK TO probe")
            conn.execute("RELEASE probe")
            raise
        if not keep:
            conn.execute("ROLLBACK TO probe")
        conn.execute("RELEASE probe")
        return result

    def _fetch(self, ids: list[int]) -> list[Row]:
        """The rows ``ids`` of ``messages``, in id order (never a known poison row: it may not decode)."""
        rows: list[Row] = []
        for first in range(0, len(ids), 500):
            chunk = ids[first:first + 500]
            where = f"WHERE {self.msg_id} IN ({','.join('?' * len(chunk))})"
            rows += self.conn.execute(self._select_messages(where), chunk).fetchall()
        return rows

    def _move_one_by_one(self, ids: list[int], poison: dict[int, str]) -> tuple[int, int, int]:
        moved = dead = archived = 0
        for row_id in ids:
            try:
                m, d, a = self._probe_or_stage([row_id], keep=True)
                moved, dead, archived = moved + m, dead + d, archived + a
            except Exception as exc:
                if not is_row_fault(exc):
                    raise
                poison[row_id] = row_fault_reason(exc)
        return moved, dead, archived

    def _poison_letter(self, row_id: int, reason: str) -> tuple[str, int, Any, Any, str]:
        """A dead letter for a row that broke its batch: its text, or its bytes when it has no valid text."""
        kind, text = self._raw_row("messages", self.msg_id, self.msg_type, row_id) or (None, None)
        return ("messages", row_id, kind, text, reason)

    def _transfer_result(self, moved: int, dead: int, *, more: bool, full: bool, reopened: bool) -> dict[str, Any]:
        result = {"moved": moved, "dead": dead, "more": more, "full": full,
                  "pending_rows": self.pending_rows, "pending_top": self.pending_top()}
        if reopened:
            result["reopened"] = True
        return result

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
        if max_points is None and points_capacity is None:
            joined = self._joined_packet(max_bytes)
            if joined is not None:
                self.cursor = joined.last_id
                return joined
        try:
            packet = self._build_packet(self._pending_rows, max_bytes, max_points, points_capacity)
        except Exception as exc:
            if not is_row_fault(exc):
                raise
            log.warning("reading pending rows after id %d failed (%s); reading them one by one", self.cursor,
                        row_fault_reason(exc))
            packet = self._build_packet(self._pending_rows_one_by_one, max_bytes, max_points, points_capacity)
        if packet.dead:
            self._dead_letter_pending(packet.dead)
        self.cursor = packet.last_id
        return packet

    def _joined_packet(self, max_bytes: int) -> Packet | None:
        """The next rows as one packet joined by SQLite, when no row needs Python.

        That is when every row after the cursor was validated by our transfer and no
        data points are counted (no rate limit on them): the payload is the rows' own
        text, ``[`` + rows joined by ``,`` + ``]``, cut where the running size would
        pass ``max_bytes`` (as ``build_packet``). None when Python must look: rows from
        a previous gateway, or a first row too large to ever fit (a dead letter).
        """
        conn, cursor = self.conn, self.cursor
        if cursor < self.checked_above and conn.execute(
                f"SELECT 1 FROM {PENDING} WHERE id > ? AND id <= ? LIMIT 1", (cursor, self.checked_above)).fetchone():
            return None
        # How many rows fit is guessed from the last packet's record size, and the guess shrunk
        # until they do: one pass over the rows, where a running sum (a window) took two.
        rows = self._scan_rows
        while True:
            count, texts, last, nbytes, payload = conn.execute(
                "SELECT count(*), count(message), max(id), sum(length(CAST(message AS BLOB))), "
                "CAST('[' || group_concat(message, ',') || ']' AS BLOB) "
                f"FROM (SELECT id, message FROM {PENDING} WHERE id > ? ORDER BY id LIMIT ?)", (cursor, rows)).fetchone()
            if not count or texts != count:
                return None  # nothing pending (the usual path says so), or a NULL row (group_concat would skip it)
            size = nbytes + count + 1  # "[", the records, a comma between two, "]" (as build_packet)
            if size <= max_bytes:
                break
            if count == 1:
                return None  # a row too large for any packet: build_packet makes it a dead letter
            rows = max(1, min(count - 1, count * max_bytes * 31 // (size * 32)))
        # Aim a little below the limit at this packet's record size, so the next guess fits.
        self._scan_rows = max(1, min(_SCAN_LIMIT, int(max_bytes * 0.985 * count / size)))
        more = conn.execute(f"SELECT 1 FROM {PENDING} WHERE id > ? LIMIT 1", (last,)).fetchone() is not None
        return Packet(after_id=cursor, last_id=last, payload=payload, rows=count, more=more)

    def _build_packet(self, rows: Callable[[bool], Generator[Any, None, None]], max_bytes: int, max_points: int | None,
                      points_capacity: int | None) -> Packet:
        source = rows(max_points is not None or points_capacity is not None)
        try:
            packet = build_packet(source, self.cursor, max_bytes, max_points, points_capacity)
            packet.more = packet.more or self._scanned == _SCAN_LIMIT
        finally:
            source.close()
        return packet

    def _pending_rows(self, count_points: bool) -> Generator[Any, None, None]:
        """The usual read: one statement; only rows we did not validate ourselves are parsed."""
        self._scanned = 0
        checked_above = self.checked_above
        cur = self.conn.execute(f"SELECT id, message FROM {PENDING} WHERE id > ? ORDER BY id LIMIT ?",
                                (self.cursor, _SCAN_LIMIT))
        try:
            for row_id, text in cur:
                self._scanned += 1
                if row_id > checked_above and not count_points:
                    yield row_id, 0, 0, text  # validated at transfer; parsing costs ~40 % of a send
                    continue
                parsed = parse_record(text)
                yield (row_id, parsed) if isinstance(parsed, str) else (row_id, parsed[0], parsed[1], text)
        finally:
            cur.close()

    def _pending_rows_one_by_one(self, count_points: bool) -> Generator[Any, None, None]:
        """After a read failed: each row on its own and parsed, so a bad one is dead, not in the way."""
        self._scanned = 0
        ids = [r[0] for r in self.conn.execute(f"SELECT id FROM {PENDING} WHERE id > ? ORDER BY id LIMIT ?",
                                               (self.cursor, _SCAN_LIMIT))]
        for row_id in ids:
            self._scanned += 1
            try:
                (text,) = self.conn.execute(f"SELECT message FROM {PENDING} WHERE id = ?", (row_id,)).fetchone()
                parsed = parse_record(text)
            except Exception as exc:
                if not is_row_fault(exc):
                    raise
                parsed = row_fault_reason(exc)
            yield (row_id, parsed) if isinstance(parsed, str) else (row_id, parsed[0], parsed[1], text)

    def _dead_letter_pending(self, dead: list[tuple[int, str]]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            letters = []
            for row_id, reason in dead:
                row = self._raw_row(PENDING, "id", "type", row_id)
                if row is not None:
                    letters.append((PENDING, row_id, row[0], row[1], reason))
            self._dead_letter(letters)
            conn.executemany(f"DELETE FROM {PENDING} WHERE id = ?", [(i,) for i, _ in dead])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.pending_rows = max(0, self.pending_rows - len(letters))

    def _raw_row(self, table: str, id_col: str, type_col: str, row_id: int) -> tuple[Any, Any] | None:
        """``(type, message)`` of one row: as text, or as bytes when it has no valid text."""
        try:
            row = self.conn.execute(f"SELECT {type_col}, message FROM {table} WHERE {id_col} = ?", (row_id,)).fetchone()
        except sqlite3.OperationalError as exc:
            if not is_row_fault(exc):
                raise
            blob = f"CAST({type_col} AS BLOB)" if type_col != "NULL" else "NULL"
            row = self.conn.execute(f"SELECT {blob}, CAST(message AS BLOB) FROM {table} WHERE {id_col} = ?",
                                    (row_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def refused(self, after_id: int, last_id: int, reason: str) -> int:
        """Move the rows of a packet ThingsBoard refused (MQTT 5 PUBACK >= 0x80) to ``dead_letters``.

        One statement pair in one transaction, and no line per row (a packet holds up to
        thousands): the uplink machine logs the refusal once, with the row count.
        """
        def move() -> int:
            self.conn.execute(
                "INSERT INTO dead_letters (source, source_id, type, message, reason) "
                f"SELECT ?, id, type, message, ? FROM {PENDING} WHERE id > ? AND id <= ? ORDER BY id",
                (PENDING, reason[:_REASON_CHARS], after_id, last_id))
            return self._delete_range(after_id, last_id)

        return self._forget(self._in_transaction(move))

    def ack(self, after_id: int, last_id: int) -> int:
        """Delete the rows of an acknowledged packet."""
        return self._forget(self._delete_range(after_id, last_id))

    def _delete_range(self, after_id: int, last_id: int) -> int:
        return self.conn.execute(f"DELETE FROM {PENDING} WHERE id > ? AND id <= ?", (after_id, last_id)).rowcount

    def _forget(self, deleted: int) -> int:
        """Count ``deleted`` pending rows as gone (once their delete is committed)."""
        self.pending_rows = max(0, self.pending_rows - deleted)
        return deleted

    def ack_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Delete the rows of several acknowledged packets ``(after_id, last_id]`` in one transaction.

        Ranges that touch (consecutive packets) are deleted as one; a gap between two stays.
        """
        merged: list[tuple[int, int]] = []
        for after_id, last_id in sorted(ranges):
            if merged and after_id <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last_id))
            else:
                merged.append((after_id, last_id))
        if len(merged) <= 1:
            return self.ack(*merged[0]) if merged else 0
        return self._forget(self._in_transaction(lambda: sum(self._delete_range(*r) for r in merged)))

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
