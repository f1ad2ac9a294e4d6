"""The journal and the checkpoint store: one SQLite file, ``teg_journal.db``.

The journal is append-only: one row per dispatched event with the transitions
it caused and the effects it issued. Rows are written in the dispatcher thread
and committed in small groups (every ``flush_interval_s`` or when the queue runs
dry); WAL mode keeps every committed group readable after ``kill -9``.
It is bounded by age and size: the oldest rows go first.

Checkpoints hold each machine's state and resume data. They are committed
before the effects of the step that produced them are handed out (persist
before acting), together with any journal rows not yet committed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from teg_fsm.engine import sqlite_files
from teg_fsm.engine.events import Event

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_AGE_S = 30 * 24 * 3600
# Below this much free space the disk counts as full: the reserve is for the controller queue.
DEFAULT_RESERVE_BYTES = 1024 * 1024
MAX_PENDING_ROWS = 20_000  # rows kept in memory while they cannot be written
RETRY_MIN_S = 1.0
RETRY_MAX_S = 15.0
DISK_FULL = "disk_full"
_SYSTEM = "system"  # engine events (start records, conditions) are never detail
STORAGE_ERROR = "storage_error"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    target TEXT,
    data TEXT NOT NULL,
    transitions TEXT NOT NULL,
    effects TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_ts ON journal(ts_ms);
CREATE TABLE IF NOT EXISTS checkpoints (
    machine TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    resume_count INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL
);
"""


@attrs.frozen
class Transition:
    """A move of one machine; ``error`` says the step raised instead (the move is then to its safe state)."""

    machine: str
    source: str
    target: str
    event: str
    error: str | None = None


def transition_record(transition: Transition) -> dict[str, str]:
    """The journal's form of a transition (``error`` only when there was one)."""
    record = {
        "machine": transition.machine,
        "source": transition.source,
        "target": transition.target,
        "event": transition.event,
    }
    if transition.error is not None:
        record["error"] = transition.error
    return record


@attrs.frozen
class JournalEntry:
    seq: int
    ts_ms: int
    source: str
    name: str
    target: str | None
    data: dict[str, Any]
    transitions: list[dict[str, str]]
    effects: list[dict[str, Any]]


@attrs.frozen
class Checkpoint:
    machine: str
    state: str
    data: dict[str, Any]
    resume_count: int


def _transitions_json(transitions: list[Transition]) -> str:
    if any(t.error is not None for t in transitions):
        return json.dumps([transition_record(t) for t in transitions], separators=(",", ":"))
    # Machine, state and event names are Python identifiers: nothing to escape,
    # so formatting is safe and much cheaper than the encoder on the hot path.
    return "[" + ",".join(
        f'{{"machine":"{t.machine}","source":"{t.source}","target":"{t.target}","event":"{t.event}"}}'
        for t in transitions
    ) + "]"


class Journal:
    """Writes the journal and checkpoints; used only by the dispatcher thread.

    It never raises. A write that fails is a declared condition, not an
    exception: ``condition`` says which (``disk_full``, ``storage_error``), the
    rows and checkpoints not yet written stay in memory (bounded) and the write
    is retried with backoff. While the disk is full, rows that carry no
    transition and no effect (journal detail) are not kept at all: they are
    the first thing the gateway can afford to lose. A file SQLite reports as
    corrupt is quarantined (moved aside, timestamped) and replaced, at start
    or later, and the latest checkpoints are written again into the new file.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        flush_interval_s: float = 0.1,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._max_age_ms = int(max_age_s * 1000)
        self._flush_interval_s = flush_interval_s
        self.reserve_bytes = reserve_bytes
        self._monotonic = monotonic
        self._rows: list[tuple[Any, ...]] = []
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._last_flush = monotonic()
        self._flushes = 0
        self._latest: dict[str, tuple[Checkpoint, int]] = {}
        self._due: set[str] = set()
        self.condition: str | None = None
        self.condition_detail = ""
        self.dropped_rows = 0
        self.quarantined: list[Path] = []
        self._retry_at = 0.0
        self._retry_s = RETRY_MIN_S
        self._db: sqlite3.Connection | None = None
        self._read_aside: tuple[int, list[tuple[Any, ...]]] = (0, [])
        try:
            self._open()
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            self._read_aside = _read_without_shared_memory(self.path)

    # -- opening ----------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite_files.open_checked(self.path, _apply_schema, on_quarantine=self.quarantined.append)

    def last_seq(self) -> int:
        if self._db is None:
            return self._read_aside[0]
        try:
            row = self._db.execute("SELECT MAX(seq) FROM journal").fetchone()
        except sqlite3.Error as exc:
            log.error("journal: cannot read the last sequence number: %s", exc)
            return 0
        return int(row[0] or 0) if row else 0

    # -- writing ----------------------------------------------------------

    def record(
        self,
        event: Event,
        transitions: list[Transition],
        effects: list[dict[str, Any]],
    ) -> None:
        if self.condition == DISK_FULL and not transitions and not effects and event.source != _SYSTEM:
            self.dropped_rows += 1  # detail: the first thing to give up while the disk is full
            return
        encode = self._encode
        self._rows.append(
            (
                event.seq,
                event.ts_ms,
                event.source,
                event.name,
                event.target,
                encode(event.data) if event.data else "{}",
                _transitions_json(transitions) if transitions else "[]",
                encode(effects) if effects else "[]",
            )
        )
        if len(self._rows) >= 2000 or self._monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Write what is pending; on failure keep it (bounded) and retry later."""
        now = self._monotonic()
        self._last_flush = now
        if self.condition is None and not self._rows and not self._due:
            return
        if self.condition is not None and now < self._retry_at:
            self._bound_memory()
            return
        try:
            self._write()
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            self._bound_memory()
            return
        if self.condition is not None:
            self._recovered()

    def _write(self) -> None:
        if self._db is None:
            self._open()
            self._due |= set(self._latest)
        db = self._db
        assert db is not None
        if self.condition == DISK_FULL and self.free_bytes() < self.reserve_bytes:
            raise sqlite3.OperationalError(f"database or disk is full (less than {self.reserve_bytes} bytes free)")
        db.execute("BEGIN")
        try:
            if self._rows:
                db.executemany(
                    "INSERT INTO journal(seq, ts_ms, source, name, target, data, transitions, effects)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    self._rows,
                )
            for machine in sorted(self._due):
                self._upsert_checkpoint(db, *self._latest[machine])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._rows, self._due = [], set()
        self._flushes += 1
        if self._flushes % 200 == 1:
            self._prune_quietly()

    def _prune_quietly(self) -> None:
        try:
            self.prune()
        except sqlite3.Error as exc:  # the rows are written; pruning can wait for the next round
            log.warning("journal: pruning failed: %s", exc)

    @staticmethod
    def _upsert_checkpoint(db: sqlite3.Connection, checkpoint: Checkpoint, now_ms: int) -> None:
        db.execute(
            "INSERT INTO checkpoints(machine, state, data, resume_count, updated_ms)"
            " VALUES (?,?,?,?,?) ON CONFLICT(machine) DO UPDATE SET state=excluded.state,"
            " data=excluded.data, resume_count=excluded.resume_count, updated_ms=excluded.updated_ms",
            (
                checkpoint.machine,
                checkpoint.state,
                json.dumps(checkpoint.data, sort_keys=True),
                checkpoint.resume_count,
                now_ms,
            ),
        )

    # -- conditions -------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        condition = _classify(exc)
        if condition == STORAGE_ERROR and self.free_bytes() < self.reserve_bytes:
            condition = DISK_FULL  # SQLite says "disk I/O error" when it cannot even map its -shm file
        if sqlite_files.is_corruption(exc):
            self._quarantine_live(str(exc))
        now = self._monotonic()
        self._retry_at = now + self._retry_s
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        if condition != self.condition:
            log.error("journal: %s (%s); keeping decisions in memory and retrying", condition.replace("_", " "), exc)
        self.condition, self.condition_detail = condition, str(exc)

    def _quarantine_live(self, reason: str) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        try:
            self.quarantined.append(sqlite_files.quarantine(self.path, reason))
        except OSError as exc:
            log.error("journal: cannot move the damaged file aside: %s", exc)

    def _recovered(self) -> None:
        log.warning(
            "journal: writing again after %s; %d detail rows were not kept",
            self.condition.replace("_", " ") if self.condition else "a failure",
            self.dropped_rows,
        )
        self.condition, self.condition_detail = None, ""
        self._retry_s = RETRY_MIN_S

    def _bound_memory(self) -> None:
        excess = len(self._rows) - MAX_PENDING_ROWS
        if excess <= 0:
            return
        detail = [i for i, row in enumerate(self._rows) if row[6] == "[]" and row[7] == "[]"][:excess]
        dropped = set(detail)
        kept = [row for i, row in enumerate(self._rows) if i not in dropped]
        excess -= len(dropped)
        if excess > 0:
            kept = kept[excess:]
        self.dropped_rows += len(self._rows) - len(kept)
        self._rows = kept

    def free_bytes(self) -> int:
        """Space left for unprivileged writes on the journal's file system."""
        try:
            stats = os.statvfs(self.path.parent)
        except OSError:
            return self.reserve_bytes
        return stats.f_bavail * stats.f_frsize

    def check_space(self) -> None:
        """Declare the disk full before SQLite does, and try again when it is not."""
        if self.condition is None and self.free_bytes() < self.reserve_bytes:
            self._failed(sqlite3.OperationalError("database or disk is full (free space below the reserve)"))
        elif self.condition is not None:
            self.flush()

    # -- pruning and reading -----------------------------------------------

    def prune(self, now_ms: int | None = None) -> int:
        """Drop rows older than the age bound, then oldest rows over the size bound."""
        if self._db is None:
            return 0
        if now_ms is None:
            # Age is measured on the events' own clock, so a fake clock is honoured.
            now_ms = self._db.execute("SELECT MAX(ts_ms) FROM journal").fetchone()[0] or 0
        removed = self._db.execute(
            "DELETE FROM journal WHERE ts_ms < ?", (now_ms - self._max_age_ms,)
        ).rowcount
        while self._used_bytes() > self._max_bytes:
            count = self._db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
            if count == 0:
                break
            batch = max(1, count // 10)
            removed += self._db.execute(
                "DELETE FROM journal WHERE id IN (SELECT id FROM journal ORDER BY id LIMIT ?)",
                (batch,),
            ).rowcount
            self._db.execute("PRAGMA incremental_vacuum")
        return removed

    def _used_bytes(self) -> int:
        assert self._db is not None
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page_size * (pages - free))

    def load_checkpoints(self) -> dict[str, Checkpoint]:
        """Stored checkpoints; an unreadable one is logged and skipped (that machine starts fresh)."""
        if self._db is None:
            rows = self._read_aside[1]
        else:
            try:
                rows = self._db.execute("SELECT machine, state, data, resume_count FROM checkpoints").fetchall()
            except sqlite3.Error as exc:
                log.error("journal: cannot read the checkpoints, every machine starts fresh: %s", exc)
                return {}
        found: dict[str, Checkpoint] = {}
        for machine, state, data, count in rows:
            try:
                found[machine] = Checkpoint(str(machine), str(state), dict(json.loads(data)), int(count))
            except (TypeError, ValueError) as exc:
                log.error("journal: checkpoint of %s is unreadable, it starts fresh: %s", machine, exc)
        return found

    def save_checkpoint(self, checkpoint: Checkpoint, now_ms: int) -> None:
        """Commit the checkpoint (and any pending journal rows) right now, or as soon as the disk allows."""
        self._latest[checkpoint.machine] = (checkpoint, now_ms)
        self._due.add(checkpoint.machine)
        self.flush()

    def close(self) -> None:
        self._retry_at = 0.0  # one last attempt, whatever the backoff says
        self.flush()
        if self._rows or self._due:
            log.error("journal: closing with %d rows and %d checkpoints not written (%s)",
                      len(self._rows), len(self._due), self.condition)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None


def _apply_schema(conn: sqlite3.Connection) -> None:
    # auto_vacuum only takes effect before the first table exists.
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.executescript(_SCHEMA)
    # Reading both tables here makes a damaged file fail while it can still be quarantined.
    conn.execute("SELECT MAX(seq) FROM journal").fetchone()
    conn.execute("SELECT count(*) FROM checkpoints").fetchone()


def _read_without_shared_memory(path: Path) -> tuple[int, list[tuple[Any, ...]]]:
    """(last seq, checkpoint rows) of a journal that cannot be opened normally, e.g. on a full disk.

    SQLite cannot create the -shm file there ("disk I/O error"); in EXCLUSIVE locking mode,
    set before the first read, it keeps the WAL index in memory instead, so the checkpoints
    (WAL frames included) can still be read and the machines resume rather than start fresh.
    """
    if not path.exists():
        return 0, []
    try:
        conn = sqlite3.connect(str(path), timeout=1.0)
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            seq = conn.execute("SELECT MAX(seq) FROM journal").fetchone()[0] or 0
            rows = conn.execute("SELECT machine, state, data, resume_count FROM checkpoints").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.error("journal: cannot read the checkpoints either, every machine starts fresh: %s", exc)
        return 0, []
    log.warning("journal: read %d checkpoints without writing; the journal resumes when the disk allows", len(rows))
    return int(seq), rows


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # the failed statement already rolled the transaction back


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "disk is full" in text or "no space" in text:
        return DISK_FULL
    return STORAGE_ERROR


def read_journal(
    path: Path,
    *,
    machine: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Iterator[JournalEntry]:
    """Entries in order; ``machine`` keeps those that targeted or moved it."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        query = "SELECT seq, ts_ms, source, name, target, data, transitions, effects FROM journal"
        clauses, params = [], []
        if since_ms is not None:
            clauses.append("ts_ms >= ?")
            params.append(since_ms)
        if until_ms is not None:
            clauses.append("ts_ms <= ?")
            params.append(until_ms)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        for seq, ts, source, name, target, data, transitions, effects in db.execute(
            query + " ORDER BY id", params
        ):
            entry = JournalEntry(
                seq, ts, source, name, target, json.loads(data), json.loads(transitions), json.loads(effects)
            )
            if machine is None or _concerns(entry, machine):
                yield entry
    finally:
        db.close()


def read_entries(
    path: Path,
    *,
    machine: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Iterator[JournalEntry]:
    """Entries of a journal database or of a ``.jsonl`` export, with the same filters."""
    if Path(path).suffix != ".jsonl":
        yield from read_journal(path, machine=machine, since_ms=since_ms, until_ms=until_ms)
        return
    for entry in read_jsonl(path):
        if since_ms is not None and entry.ts_ms < since_ms or until_ms is not None and entry.ts_ms > until_ms:
            continue
        if machine is None or _concerns(entry, machine):
            yield entry


def entry_to_jsonl(entry: JournalEntry) -> str:
    """One entry as one JSON line, fields in journal column order (diffable)."""
    return json.dumps(attrs.asdict(entry), ensure_ascii=False, separators=(",", ":"), default=str)


def write_jsonl(entries: Iterable[JournalEntry], out: TextIO) -> int:
    """Write entries one per line; returns how many."""
    count = 0
    for entry in entries:
        out.write(entry_to_jsonl(entry) + "\n")
        count += 1
    return count


def read_jsonl(path: Path) -> Iterator[JournalEntry]:
    """Entries of a JSON Lines export (blank lines skipped); a bad line names its number."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield JournalEntry(**json.loads(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a journal entry: {exc}") from exc


def _concerns(entry: JournalEntry, machine: str) -> bool:
    if entry.target == machine:
        return True
    if any(t["machine"] == machine for t in entry.transitions):
        return True
    return any(str(e.get("id", "")).startswith(f"{machine}:") for e in entry.effects)
