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

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from teg_fsm.events import Event

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_AGE_S = 30 * 24 * 3600

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
    machine: str
    source: str
    target: str
    event: str


JOURNAL_CACHE_KIB = 512  # page cache bound (SQLite's default, 2000 KiB, fills slowly and reads as a leak)


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
    # Machine, state and event names are Python identifiers: nothing to escape,
    # so formatting is safe and much cheaper than the encoder on the hot path.
    return "[" + ",".join(
        f'{{"machine":"{t.machine}","source":"{t.source}","target":"{t.target}","event":"{t.event}"}}'
        for t in transitions
    ) + "]"


class Journal:
    """Writes the journal and checkpoints; used only by the dispatcher thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        flush_interval_s: float = 0.1,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._max_age_ms = int(max_age_s * 1000)
        self._flush_interval_s = flush_interval_s
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA cache_size=-{JOURNAL_CACHE_KIB}")
        self._db.executescript(_SCHEMA)
        self._rows: list[tuple[Any, ...]] = []
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._last_flush = time.monotonic()
        self._flushes = 0

    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM journal").fetchone()
        return int(row[0] or 0)

    def record(
        self,
        event: Event,
        transitions: list[Transition],
        effects: list[dict[str, Any]],
    ) -> None:
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
        if len(self._rows) >= 2000 or time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO journal(seq, ts_ms, source, name, target, data, transitions, effects)"
            " VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
        self._db.execute("COMMIT")
        self._flushes += 1
        if self._flushes % 200 == 1:
            self.prune()

    def prune(self, now_ms: int | None = None) -> int:
        """Drop rows older than the age bound, then oldest rows over the size bound."""
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
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(page_size * (pages - free))

    def load_checkpoints(self) -> dict[str, Checkpoint]:
        rows = self._db.execute("SELECT machine, state, data, resume_count FROM checkpoints")
        return {m: Checkpoint(m, s, json.loads(d), int(c)) for m, s, d, c in rows}

    def save_checkpoint(self, checkpoint: Checkpoint, now_ms: int) -> None:
        """Commit the checkpoint (and any pending journal rows) right now."""
        self.flush()
        self._db.execute(
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

    def close(self) -> None:
        self.flush()
        self._db.close()


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
