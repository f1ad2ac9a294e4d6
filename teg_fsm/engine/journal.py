"""The journal and the checkpoint store: one SQLite file, ``teg_journal.db``.

The journal is append-only: one row per dispatched event with the transitions
it caused and the effects it issued. Rows are written in the dispatcher thread
and committed in small groups: ``flush_interval_s`` (0.1 s) after the first row
not yet committed, whether the queue ran dry meanwhile or not, so the few events
of one burst (a controller row's notice, transfer, packet and PUBACK arrive
milliseconds apart, the queue running dry between them) share one transaction
instead of one each; WAL mode keeps every committed group readable after
``kill -9``, which loses at most the last ``flush_interval_s`` of rows.

Retention by meaning. Rows are kept by what they mean, not only by age:

- decisions (every other row: transitions of every machine, effect failures,
  degraded modes, starts) go to the table ``journal``, which older readers
  read as before, and are kept for the age bound (``max_age_s``, 450 days);
- traffic (the uplink's bookkeeping for rows that went out normally, see
  ``DEFAULT_TRAFFIC`` and ``classify``) and routine repeats (a decision the
  same as one kept in full less than ``ROUTINE_MEMORY_MS`` (a day) ago: same event,
  same moves, same kinds of effects, e.g. the file check every 30 s that finds
  nothing new, or the same failure retried every 10 s) go to
  ``journal_traffic`` in full detail for ``detail_window_s`` only; older ones
  are replaced by one ``traffic_summary`` row per minute and machine in
  ``journal_summary`` (counts per event, the moves, ranges of sequence
  numbers and times, sums of the rows/bytes/points moved), merged into one
  per hour once a day old. The first of each kind of decision per day stays
  in full, and of a kind that moves a machine to another state (a restart, a
  reconnect) the first ``MOVES_KEPT_PER_DAY``, so the "why" and the "when"
  are always there;
- snapshots (``journal_snapshot`` rows in ``journal``, written by the
  dispatcher) hold every machine's state and data, so a journal trimmed at its
  head, or any window of it, replays from its oldest snapshot; after a week
  only the first snapshot of each day is kept.

The three tables share one id space (ids are given here, in record order), so
a reader merges them by id (``read_journal``). Over the size bound the oldest
traffic detail goes first (summarised, not lost), then the oldest summaries,
and only then the oldest decisions. Each table is appended at its tail and
trimmed at its head, so trimming frees whole pages. tools/bench_retention.py
measures what each category costs per day.

Checkpoints hold each machine's state and resume data. They are committed
before the effects of the step that produced them are handed out (persist
before acting), together with any journal rows not yet committed. A checkpoint
that would resume the machine exactly as the one before it does (the
dispatcher decides: same state to re-enter, same data, same loop guard) is not
urgent: it goes with the next group, as a crash before that resumes the same.
One the same as the checkpoint this file holds (state, data, resume count) is
not written again: ``updated_ms`` is when the stored checkpoint last changed.

A group commit is written every second at rest, so it is kept small (see
docs/ENGINE.md, tools/bench_journal_frames.py): new files use ``PAGE_SIZE``
(1 KiB) pages, ``journal_traffic`` has no index on ``ts_ms``, and an unchanged
checkpoint is not rewritten.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import attrs

from teg_fsm.engine import sqlite_files
from teg_fsm.engine.events import Event

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Decisions are kept at least 400 days (an audit asks about last year); the size
# bound, sized in tools/bench_retention.py, holds them with room to spare.
DEFAULT_MAX_AGE_S = 450 * 24 * 3600
# Traffic in full detail: long enough to debug the drain going on now.
DEFAULT_DETAIL_WINDOW_S = 600
SUMMARY_INTERVAL_MS = 60_000
# Minute summaries older than a day are merged into one per hour and machine.
ROLLUP_AFTER_MS = 24 * 3600 * 1000
ROLLUP_INTERVAL_MS = 3600 * 1000
# Snapshots older than this are thinned to the first of each UTC day: an old window
# replays from the day's snapshot (a longer replay), and snapshots cost 1 a day, not 24.
SNAPSHOT_THIN_AFTER_MS = 7 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000
SUMMARISE_BATCH = 20_000
SNAPSHOT = "journal_snapshot"
SUMMARY = "traffic_summary"
DECISION, TRAFFIC, ROUTINE = "decision", "traffic", "routine"
# A repeat kept in full again once its day is over: stored as a decision, but no news (no snapshot is due).
KEPT_AGAIN = "kept_again"
# A decision repeated within this long of the one kept in full is routine (counted, summarised).
ROUTINE_MEMORY_MS = 24 * 3600 * 1000
# A repeat that moves a machine to another state (a restart, a reconnect) is what an
# auditor asks about by its time ("why at 03:12?"): the first this many of each kind
# per day stay in full; only a loop beyond that (a retry every 10 s) is counted.
MOVES_KEPT_PER_DAY = 48
_ROUTINE_PATTERNS = 4096  # distinct decisions remembered (the memory is cleared when full)
# Traffic: events of these machines that only move rows along (uplink bookkeeping
# of a normal drain). Such a row is traffic only when it moved nothing but its own
# machine, issued only these effects, and its result reports no dead letter or
# replaced file (see ``classify``); anything else about the uplink is a decision.
DEFAULT_TRAFFIC: dict[str, frozenset[str]] = {
    "uplink": frozenset({
        "rows_waiting", "logs_waiting", "transfer_succeeded", "data_packet_succeeded", "log_packet_succeeded",
        "work_changed", "hold_elapsed",
    }),
}
TRAFFIC_EFFECTS = frozenset({"TransferRows", "SendPacket", "Notify", "StartTimer", "CancelTimer"})
_SUMMED = ("moved", "dead", "rows", "bytes", "points")
# Below this much free space the disk counts as full: the reserve is for the controller queue.
DEFAULT_RESERVE_BYTES = 1024 * 1024
# Page size of a new journal file. Each group commit rewrites the tail pages of the
# tables it appends to and the checkpoints page, a few hundred bytes of news each:
# the WAL writes whole pages, so 1 KiB pages write a quarter of what SQLite's 4 KiB
# do at rest (tools/bench_journal_frames.py). An existing file keeps its page size.
PAGE_SIZE = 1024
MAX_PENDING_ROWS = 20_000  # rows kept in memory while they cannot be written
RETRY_MIN_S = 1.0
RETRY_MAX_S = 15.0
DISK_FULL = "disk_full"
_SYSTEM = "system"  # engine events (start records, conditions) are never detail
STORAGE_ERROR = "storage_error"

# The three journal tables share one row shape (and one id space, given in record order);
# ``journal`` keeps AUTOINCREMENT, as older readers and writers created it.
_ROWS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER PRIMARY KEY{autoincrement},
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    target TEXT,
    data TEXT NOT NULL,
    transitions TEXT NOT NULL,
    effects TEXT NOT NULL
);
"""
_TS_INDEX = "CREATE INDEX IF NOT EXISTS {table}_ts ON {table}(ts_ms);\n"
# journal_traffic has no index on ts_ms: it holds only the detail window (minutes), so its
# queries by time scan it, and an index would be one more page written by every group commit
# (the traffic of each controller row; tools/bench_journal_frames.py).
_SCHEMA = "".join(
    _ROWS_TABLE.format(table=table, autoincrement=" AUTOINCREMENT" if table == "journal" else "")
    + ("" if table == "journal_traffic" else _TS_INDEX.format(table=table))
    for table in ("journal", "journal_traffic", "journal_summary")
) + "DROP INDEX IF EXISTS journal_traffic_ts;\n" + """
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


def classify(
    event: Event,
    transitions: list[Transition],
    effects: list[dict[str, Any]],
    traffic: Mapping[str, frozenset[str]] = DEFAULT_TRAFFIC,
) -> str:
    """``TRAFFIC`` for uplink bookkeeping of rows that went out normally, else ``DECISION``."""
    machine = event.target
    names = traffic.get(machine) if machine is not None else None
    if names is None or event.name not in names:
        return DECISION
    if any(t.machine != machine or t.error is not None for t in transitions):
        return DECISION
    for effect in effects:
        if effect.get("type") not in TRAFFIC_EFFECTS:
            return DECISION  # a log line, a disconnect, a report: something to explain later
        if effect.get("type") == "Notify" and effect.get("machine") != machine:
            return DECISION
    result = event.data.get("result")
    if isinstance(result, dict) and (result.get("dead") or result.get("reopened")):
        return DECISION  # dead letters and a replaced queue file are findings, not traffic
    return TRAFFIC


def decision_pattern(
    event: Event, transitions: list[Transition], effects: list[dict[str, Any]]
) -> tuple[Any, ...]:
    """What makes two decisions "the same" for routine repeats: event, moves (with errors), kinds of effects."""
    return (
        event.source, event.name, event.target,
        tuple((t.machine, t.source, t.target, t.error) for t in transitions),
        tuple((e.get("type"), e.get("reply"), e.get("machine"), e.get("name")) for e in effects),
    )


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
        detail_window_s: float = DEFAULT_DETAIL_WINDOW_S,
        traffic: Mapping[str, frozenset[str]] = DEFAULT_TRAFFIC,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.path = Path(path)
        self._page_size = page_size
        self._max_bytes = max_bytes
        self._max_age_ms = int(max_age_s * 1000)
        self._detail_window_ms = int(detail_window_s * 1000)
        self._traffic = traffic
        self._next_id = 1
        # decision pattern -> (ts_ms of the first kept in full in its day, how many kept in full since)
        self._patterns: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._thinned_ms = 0  # snapshots before this day were thinned already
        self._flush_interval_s = flush_interval_s
        self.reserve_bytes = reserve_bytes
        self._monotonic = monotonic
        self._rows: list[tuple[Any, ...]] = []
        self._encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
        self._pending_since: float | None = None  # when the oldest row or checkpoint not yet committed came
        self._flushes = 0
        self._latest: dict[str, tuple[Checkpoint, int]] = {}
        self._due: set[str] = set()
        # machine -> (state, data, resume count) as last committed in this file: one the same is not rewritten
        self._written: dict[str, tuple[str, str, int]] = {}
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
        self._written = {}
        self._db = sqlite_files.open_checked(
            self.path, _apply_schema, on_quarantine=self.quarantined.append, page_size=self._page_size
        )
        self._next_id = _next_id(self._db)

    def last_seq(self) -> int:
        if self._db is None:
            return self._read_aside[0]
        try:
            # Traffic rows carry sequence numbers too: a restart must never reuse one.
            row = self._db.execute(
                "SELECT max(coalesce((SELECT MAX(seq) FROM journal), 0), coalesce((SELECT MAX(seq) FROM journal_traffic), 0))"
            ).fetchone()
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
    ) -> str:
        """Queue the row for the next commit; returns its kind (``DECISION``, ``TRAFFIC`` or ``ROUTINE``)."""
        kind = classify(event, transitions, effects, self._traffic)
        if kind == DECISION and transitions and event.source != _SYSTEM:
            kind = self._repeat_or_decision(event, transitions, effects)
        if self.condition == DISK_FULL and (kind != DECISION or not transitions and not effects) and event.source != _SYSTEM:
            self.dropped_rows += 1  # detail: the first thing to give up while the disk is full
            return kind
        encode = self._encode
        now = self._monotonic()
        if self._pending_since is None:
            self._pending_since = now
        self._rows.append(
            (
                kind,
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
        # Under a steady stream the queue never runs dry: commit the group once its oldest row is due.
        if len(self._rows) >= 2000 or now - self._pending_since >= self._flush_interval_s:
            self.flush()
        return kind

    def _repeat_or_decision(self, event: Event, transitions: list[Transition], effects: list[dict[str, Any]]) -> str:
        """``ROUTINE`` when the same decision was kept in full less than ``ROUTINE_MEMORY_MS`` ago
        (for one that moves a machine: ``MOVES_KEPT_PER_DAY`` times already).

        "The same" is the event's source, name and target, the moves (with any
        error) and the kinds of effects; data (times, counters, texts) is left
        out, so a check that found nothing new or a failure retried the same way
        is routine, while anything that moves a machine differently is not.
        """
        pattern = decision_pattern(event, transitions, effects)
        seen = self._patterns.get(pattern)
        if seen is not None and 0 <= event.ts_ms - seen[0] < ROUTINE_MEMORY_MS:
            moves = any(t.source != t.target for t in transitions)
            if not moves or seen[1] >= MOVES_KEPT_PER_DAY:
                return ROUTINE
            self._patterns[pattern] = (seen[0], seen[1] + 1)
            return KEPT_AGAIN
        if len(self._patterns) >= _ROUTINE_PATTERNS:
            self._patterns.clear()
        self._patterns[pattern] = (event.ts_ms, 1)
        return DECISION if seen is None else KEPT_AGAIN

    def record_snapshot(self, seq: int, ts_ms: int, data: dict[str, Any]) -> None:
        """A ``journal_snapshot`` row (every machine's state and data) after event ``seq``; it takes no seq."""
        if self._pending_since is None:
            self._pending_since = self._monotonic()
        self._rows.append((DECISION, seq, ts_ms, _SYSTEM, SNAPSHOT, None, self._encode(data), "[]", "[]"))

    def due_in(self) -> float | None:
        """Seconds until the pending rows are due for commit (0: now), None when nothing waits."""
        if self.condition is None and not self._rows and not self._due:
            return None
        now = self._monotonic()
        if self.condition is not None:
            return max(0.0, self._retry_at - now)
        since = now if self._pending_since is None else self._pending_since
        return max(0.0, since + self._flush_interval_s - now)

    def flush_due(self) -> None:
        """Commit if the group is due (the dispatcher calls this whenever its queue runs dry)."""
        due = self.due_in()
        if due is not None and due <= 0:
            self.flush()

    def flush(self) -> None:
        """Write what is pending; on failure keep it (bounded) and retry later."""
        now = self._monotonic()
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
        elif self.condition is not None:
            # A retry: the failure may have been an id already taken (UNIQUE), which would
            # repeat for ever; the file, not our count, says which id is next.
            self._next_id = _next_id(self._db)
        db = self._db
        assert db is not None
        if self.condition == DISK_FULL and self.free_bytes() < self.reserve_bytes:
            raise sqlite3.OperationalError(f"database or disk is full (less than {self.reserve_bytes} bytes free)")
        first = self._next_id
        written: dict[str, tuple[str, str, int]] = {}
        for machine in sorted(self._due):
            checkpoint, _ = self._latest[machine]
            stored = (checkpoint.state, json.dumps(checkpoint.data, sort_keys=True), checkpoint.resume_count)
            # Back where the stored one is (the uplink's idle -> draining -> idle within one group):
            # rewriting it would change only updated_ms, and cost a page per commit.
            if self._written.get(machine) != stored:
                written[machine] = stored
        if not self._rows and not written and self.condition is None:
            self._due, self._pending_since = set(), None
            return
        db.execute("BEGIN")
        try:
            if self._rows:
                self._insert_rows(db, first)
            for machine, stored in written.items():
                self._upsert_checkpoint(db, machine, stored, self._latest[machine][1])
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._written.update(written)
        self._next_id = first + len(self._rows)
        self._rows, self._due, self._pending_since = [], set(), None
        self._flushes += 1
        if self._flushes % 200 == 1:
            self._prune_quietly()

    def _insert_rows(self, db: sqlite3.Connection, first: int) -> None:
        """Decisions and snapshots into ``journal``, traffic into ``journal_traffic``; ids in record order."""
        decisions: list[tuple[Any, ...]] = []
        traffic: list[tuple[Any, ...]] = []
        for offset, row in enumerate(self._rows):
            (traffic if row[0] in (TRAFFIC, ROUTINE) else decisions).append((first + offset, *row[1:]))
        columns = "(id, seq, ts_ms, source, name, target, data, transitions, effects) VALUES (?,?,?,?,?,?,?,?,?)"
        if decisions:
            db.executemany("INSERT INTO journal" + columns, decisions)
        if traffic:
            db.executemany("INSERT INTO journal_traffic" + columns, traffic)

    def _prune_quietly(self) -> None:
        try:
            self.prune()
        except sqlite3.Error as exc:  # the rows are written; pruning can wait for the next round
            log.warning("journal: pruning failed: %s", exc)

    @staticmethod
    def _upsert_checkpoint(db: sqlite3.Connection, machine: str, stored: tuple[str, str, int], now_ms: int) -> None:
        state, data, resume_count = stored
        db.execute(
            "INSERT INTO checkpoints(machine, state, data, resume_count, updated_ms)"
            " VALUES (?,?,?,?,?) ON CONFLICT(machine) DO UPDATE SET state=excluded.state,"
            " data=excluded.data, resume_count=excluded.resume_count, updated_ms=excluded.updated_ms",
            (machine, state, data, resume_count, now_ms),
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
        detail = [i for i, row in enumerate(self._rows)
                  if row[0] in (TRAFFIC, ROUTINE) or row[7] == "[]" and row[8] == "[]" and row[3] != _SYSTEM][:excess]
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
        """Summarise traffic older than the detail window, drop rows over the age bound, then trim to size.

        Over the size bound the oldest traffic detail goes first (summarised
        before it goes), then the oldest summaries, then the oldest decisions.
        """
        if self._db is None:
            return 0
        db = self._db
        if now_ms is None:
            # Age is measured on the events' own clock, so a fake clock is honoured.
            now_ms = db.execute(
                "SELECT max(coalesce((SELECT MAX(ts_ms) FROM journal), 0),"
                " coalesce((SELECT MAX(ts_ms) FROM journal_traffic), 0))"
            ).fetchone()[0] or 0
        removed = self.summarise(now_ms - self._detail_window_ms)
        removed += self.roll_up(now_ms - ROLLUP_AFTER_MS)
        removed += self.thin_snapshots(now_ms - SNAPSHOT_THIN_AFTER_MS)
        for table in ("journal", "journal_traffic", "journal_summary"):
            removed += db.execute(f"DELETE FROM {table} WHERE ts_ms < ?", (now_ms - self._max_age_ms,)).rowcount
        while self._used_bytes() > self._max_bytes:
            trimmed = self._trim_oldest()
            if not trimmed:
                break
            removed += trimmed
            db.execute("PRAGMA incremental_vacuum")
        return removed

    def _trim_oldest(self) -> int:
        """One step towards the size bound: a tenth of the lowest-ranking rows there are."""
        db = self._db
        assert db is not None
        count = db.execute("SELECT COUNT(*) FROM journal_traffic").fetchone()[0]
        if count:
            (oldest_kept,) = db.execute(
                "SELECT ts_ms FROM journal_traffic ORDER BY id LIMIT 1 OFFSET ?", (max(1, count // 10) - 1,)
            ).fetchone()
            boundary = (oldest_kept // SUMMARY_INTERVAL_MS + 1) * SUMMARY_INTERVAL_MS
            return self.summarise(boundary) or db.execute(
                "DELETE FROM journal_traffic WHERE id IN (SELECT id FROM journal_traffic ORDER BY id LIMIT ?)",
                (max(1, count // 10),),
            ).rowcount
        for table in ("journal_summary", "journal"):
            count = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            if count:
                return db.execute(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)",
                    (max(1, count // 10),),
                ).rowcount
        return 0

    def thin_snapshots(self, before_ms: int) -> int:
        """Keep only the first snapshot of each whole UTC day before ``before_ms``; returns rows removed."""
        db = self._db
        assert db is not None
        cutoff = before_ms // DAY_MS * DAY_MS
        if cutoff <= self._thinned_ms:
            return 0
        removed = db.execute(
            "DELETE FROM journal WHERE source = ? AND name = ? AND ts_ms >= ? AND ts_ms < ? AND id NOT IN"
            " (SELECT min(id) FROM journal WHERE source = ? AND name = ? AND ts_ms >= ? AND ts_ms < ?"
            " GROUP BY ts_ms / ?)",
            (_SYSTEM, SNAPSHOT, self._thinned_ms, cutoff, _SYSTEM, SNAPSHOT, self._thinned_ms, cutoff, DAY_MS),
        ).rowcount
        self._thinned_ms = cutoff
        return removed

    def roll_up(self, before_ms: int) -> int:
        """Merge minute summaries of whole hours older than ``before_ms`` into hourly ones; returns rows removed."""
        db = self._db
        assert db is not None
        cutoff = before_ms // ROLLUP_INTERVAL_MS * ROLLUP_INTERVAL_MS
        rows = db.execute(
            "SELECT id, seq, ts_ms, target, data FROM journal_summary WHERE ts_ms < ?"
            " AND json_extract(data, '$.interval_s') = ? ORDER BY id LIMIT ?",
            (cutoff, SUMMARY_INTERVAL_MS // 1000, SUMMARISE_BATCH),
        ).fetchall()
        groups: dict[tuple[int, Any], list[tuple[Any, ...]]] = {}
        for row in rows:
            groups.setdefault((row[2] // ROLLUP_INTERVAL_MS, row[3]), []).append(row)
        merged = [_merged_summary(group) for group in groups.values() if len(group) > 1]
        if not merged:
            return 0
        gone = [(row[0],) for group in groups.values() if len(group) > 1 for row in group]
        db.execute("BEGIN")
        try:
            db.executemany("DELETE FROM journal_summary WHERE id = ?", gone)
            db.executemany(
                "INSERT INTO journal_summary(id, seq, ts_ms, source, name, target, data, transitions, effects)"
                " VALUES (?,?,?,?,?,?,?,'[]','[]')",
                merged,
            )
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return len(gone) - len(merged)

    def summarise(self, before_ms: int) -> int:
        """Replace traffic rows of whole intervals older than ``before_ms`` by summary rows; returns rows removed.

        One summary per interval (a minute) and machine, in one transaction with
        the deletion, so a crash leaves either the detail or its summary.
        """
        db = self._db
        assert db is not None
        cutoff = before_ms // SUMMARY_INTERVAL_MS * SUMMARY_INTERVAL_MS
        removed = 0
        while True:
            rows = db.execute(
                "SELECT id, seq, ts_ms, name, target, data, transitions FROM journal_traffic"
                " WHERE ts_ms < ? ORDER BY id LIMIT ?",
                (cutoff, SUMMARISE_BATCH),
            ).fetchall()
            if not rows:
                return removed
            groups = _group_by_interval(rows)
            if len(rows) == SUMMARISE_BATCH and len(groups) > 1:
                groups.pop()  # its interval may go on in the next batch
            done = [row for group in groups for row in group]
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT INTO journal_summary(id, seq, ts_ms, source, name, target, data, transitions, effects)"
                    " VALUES (?,?,?,?,?,?,?,'[]','[]')",
                    [_summary_row(group) for group in groups],
                )
                db.executemany("DELETE FROM journal_traffic WHERE id = ?", [(row[0],) for row in done])
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            removed += len(done)
            if len(rows) < SUMMARISE_BATCH:
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

    def save_checkpoint(self, checkpoint: Checkpoint, now_ms: int, *, urgent: bool = True) -> None:
        """Commit the checkpoint (and any pending journal rows) right now, or as soon as the disk allows;
        one that is not ``urgent`` goes with the next group."""
        self._latest[checkpoint.machine] = (checkpoint, now_ms)
        self._due.add(checkpoint.machine)
        if urgent:
            self.flush()
        elif self._pending_since is None:
            self._pending_since = self._monotonic()

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


def _group_by_interval(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Traffic rows (in id order) grouped by (interval, machine), groups ordered by their first id."""
    groups: dict[tuple[int, Any], list[tuple[Any, ...]]] = {}
    for row in rows:
        groups.setdefault((row[2] // SUMMARY_INTERVAL_MS, _machine_of(row)), []).append(row)
    return sorted(groups.values(), key=lambda group: group[0][0])


def _machine_of(row: tuple[Any, ...]) -> str | None:
    """The machine a traffic row is about: its target, else the first machine it moved."""
    if row[4] is not None:
        return str(row[4])
    if row[6] != "[]":
        return str(json.loads(row[6])[0]["machine"])
    return None


def _summary_row(group: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """The ``traffic_summary`` row of one interval's traffic of one machine (id of its first row).

    ``machines`` names every machine the summarised rows moved: replay cannot
    follow those through the summary (``teg_fsm.engine.replay``).
    """
    events: dict[str, int] = {}
    totals: dict[str, dict[str, int]] = {}
    moves: dict[str, int] = {}
    machines: set[str] = set()
    for _, _, _, name, target, data, transitions in group:
        events[name] = events.get(name, 0) + 1
        if target is not None:
            machines.add(str(target))
        result = json.loads(data).get("result") if data != "{}" else None
        if isinstance(result, dict):
            sums = totals.setdefault(name, {})
            for key in _SUMMED:
                value = result.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    sums[key] = sums.get(key, 0) + value
        if transitions != "[]":
            for move in json.loads(transitions):
                machines.add(move["machine"])
                if move["source"] != move["target"]:
                    key = f"{move['machine']}: {move['source']}->{move['target']}"
                    moves[key] = moves.get(key, 0) + 1
    first, last = group[0], group[-1]
    data = {
        "interval_s": SUMMARY_INTERVAL_MS // 1000,
        "from_ms": min(r[2] for r in group),
        "to_ms": max(r[2] for r in group),
        "first_seq": first[1],
        "last_seq": last[1],
        "last_id": last[0],
        "machines": sorted(machines),
        "events": events,
    }
    if any(totals.values()):
        data["totals"] = {name: sums for name, sums in totals.items() if sums}
    if moves:
        data["moves"] = moves
    return (first[0], first[1], data["from_ms"], "journal", SUMMARY, _machine_of(first),
            json.dumps(data, separators=(",", ":")))


def _merged_summary(group: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """One hourly summary row from the minute summaries of one hour and machine (id of the first)."""
    parts = [json.loads(row[4]) for row in group]
    data: dict[str, Any] = {
        "interval_s": ROLLUP_INTERVAL_MS // 1000,
        "from_ms": min(p["from_ms"] for p in parts),
        "to_ms": max(p["to_ms"] for p in parts),
        "first_seq": min(p["first_seq"] for p in parts),
        "last_seq": max(p["last_seq"] for p in parts),
        "last_id": max(p["last_id"] for p in parts),
        "machines": sorted({m for p in parts for m in p.get("machines", [])}),
        "events": _added(p.get("events", {}) for p in parts),
    }
    totals: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, sums in part.get("totals", {}).items():
            totals[name] = _added([totals.get(name, {}), sums])
    if totals:
        data["totals"] = totals
    moves = _added(p.get("moves", {}) for p in parts)
    if moves:
        data["moves"] = moves
    first = group[0]
    return (first[0], first[1], data["from_ms"], "journal", SUMMARY, first[3], json.dumps(data, separators=(",", ":")))


def _added(counts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return total


def _next_id(db: sqlite3.Connection) -> int:
    """The next id of the shared id space of ``journal``, ``journal_traffic`` and ``journal_summary``."""
    row = db.execute(
        "SELECT max(coalesce((SELECT MAX(id) FROM journal), 0), coalesce((SELECT MAX(id) FROM journal_traffic), 0),"
        " coalesce((SELECT MAX(id) FROM journal_summary), 0),"
        " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0))"
    ).fetchone()
    return int(row[0] or 0) + 1


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
            try:
                seq = max(seq, conn.execute("SELECT MAX(seq) FROM journal_traffic").fetchone()[0] or 0)
            except sqlite3.Error:
                pass  # a journal from before traffic had its own table
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
    from_id: int | None = None,
    snapshots: bool = False,
) -> Iterator[JournalEntry]:
    """Entries in order; ``machine`` keeps those that targeted or moved it; ``snapshots`` adds snapshot rows.

    Decisions, snapshots, traffic detail and traffic summaries are merged by
    id. A summary is shown only where its detail is gone (its rows are older
    than the oldest detail row kept), so nothing is counted twice. A file
    written before traffic had its own tables has only ``journal``.
    """
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        clauses, params = [], []
        if since_ms is not None:
            clauses.append("ts_ms >= ?")
            params.append(since_ms)
        if until_ms is not None:
            clauses.append("ts_ms <= ?")
            params.append(until_ms)
        if from_id is not None:
            clauses.append("id >= ?")
            params.append(from_id)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        columns = "SELECT id, seq, ts_ms, source, name, target, data, transitions, effects FROM "
        parts = [columns + table + where for table in ("journal", "journal_traffic", "journal_summary") if table in tables]
        oldest_detail = None
        if "journal_traffic" in tables:
            oldest_detail = db.execute("SELECT MIN(id) FROM journal_traffic").fetchone()[0]
        query = "SELECT * FROM (" + " UNION ALL ".join(parts) + ") ORDER BY id"
        for _, seq, ts, source, name, target, data, transitions, effects in db.execute(query, params * len(parts)):
            entry = JournalEntry(
                seq, ts, source, name, target, json.loads(data), json.loads(transitions), json.loads(effects)
            )
            if name == SNAPSHOT and source == _SYSTEM and not snapshots:
                continue
            if name == SUMMARY and source == "journal" and oldest_detail is not None:
                if int(entry.data.get("last_id", 0)) >= oldest_detail:
                    continue  # its detail is still here
            if machine is None or _concerns(entry, machine):
                yield entry
    finally:
        db.close()


def replay_start_id(path: Path, at_ms: int | None) -> int | None:
    """Id of the last start or snapshot row at or before ``at_ms`` (the first one after it if none); None: none at all."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        starts = f"FROM journal WHERE source = '{_SYSTEM}' AND name IN ('gateway_started', '{SNAPSHOT}')"
        row = None
        if at_ms is not None:
            row = db.execute(f"SELECT MAX(id) {starts} AND ts_ms <= ?", (at_ms,)).fetchone()
        if row is None or row[0] is None:
            row = db.execute(f"SELECT MIN(id) {starts}" + (" AND ts_ms > ?" if at_ms is not None else ""),
                             (at_ms,) if at_ms is not None else ()).fetchone()
        return None if row is None or row[0] is None else int(row[0])
    finally:
        db.close()


def read_entries(
    path: Path,
    *,
    machine: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    snapshots: bool = False,
) -> Iterator[JournalEntry]:
    """Entries of a journal database or of a ``.jsonl`` export, with the same filters."""
    if Path(path).suffix != ".jsonl":
        yield from read_journal(path, machine=machine, since_ms=since_ms, until_ms=until_ms, snapshots=snapshots)
        return
    for entry in read_jsonl(path):
        if not snapshots and entry.name == SNAPSHOT and entry.source == _SYSTEM:
            continue
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
