"""Replay: feed a recorded journal to the current machines and compare.

No adapters, no timers, no runner: the recorded events (with their recorded
sequence numbers and timestamps) are dispatched in order, and each event's
transitions and effects are compared with what was recorded. Events caused by
effects (outcomes, notifications, timer firings) are in the journal too, so
nothing needs to be re-executed.

Where replay starts: at a ``gateway_started`` (machines built as it
describes) or at a ``journal_snapshot`` (machines put back exactly as they
were, state and data), whichever comes first; earlier rows (a run whose start
was trimmed away) are skipped. ``since_ms``/``until_ms`` pick a window: replay
starts at the last start or snapshot at or before ``since_ms``.

Summarised traffic: a ``traffic_summary`` row stands for events that are no
longer there (uplink traffic, routine repeats), so the machines it names
cannot be followed through it. From there until the next snapshot re-syncs it (or the next start),
that machine is *not vouched for*: events addressed to it are skipped, and its
transitions and effects are left out of the comparison. Every other machine is
compared as usual; a snapshot whose state differs from the replayed one is a
divergence.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.codec import Codec
from teg_fsm.engine.dispatcher import Dispatcher
from teg_fsm.engine.events import STARTED, Event, Source
from teg_fsm.engine.journal import (
    SNAPSHOT,
    SUMMARY,
    JournalEntry,
    read_entries,
    read_journal,
    replay_start_id,
    transition_record,
)
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.timers import Timers


@attrs.frozen
class Divergence:
    seq: int
    name: str
    expected_transitions: list[Any]
    actual_transitions: list[Any]
    expected_effects: list[Any]
    actual_effects: list[Any]
    reason: str = ""  # set when the event could not be replayed at all

    def describe(self) -> str:
        lines = [f"divergence at event #{self.seq} ({self.name})"]
        if self.reason:
            lines.append(f"  {self.reason}")
        if self.expected_transitions != self.actual_transitions:
            lines.append(f"  expected transitions: {json.dumps(self.expected_transitions)}")
            lines.append(f"  actual transitions:   {json.dumps(self.actual_transitions)}")
        if self.expected_effects != self.actual_effects:
            lines.append(f"  expected effects: {json.dumps(self.expected_effects)}")
            lines.append(f"  actual effects:   {json.dumps(self.actual_effects)}")
        return "\n".join(lines)


@attrs.frozen
class ReplayResult:
    events: int
    divergence: Divergence | None
    trace: list[dict[str, Any]]

    @property
    def identical(self) -> bool:
        return self.divergence is None


def _normal(value: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal as they do on disk."""
    return json.loads(json.dumps(value, default=str))


def replay_entries(
    entries: Iterable[JournalEntry], overrides: Mapping[str, type[GatewayMachine]] | None = None
) -> ReplayResult:
    """Replay entries; stop at the first divergence.

    Total: whatever the journal holds (a machine error, an event no machine
    could take, a start record naming a class that no longer exists, an
    unreadable row) ends as "identical" or as a divergence that says why.
    """
    codec = Codec()
    clock = FakeClock()
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), codec=codec)
    dispatcher.replaying = True
    count = 0
    trace: list[dict[str, Any]] = []
    booted = False
    # Machines that summarised traffic took out of sight -> the last seq it summarised.
    unvouched: dict[str, int] = {}
    reading = iter(entries)
    last = (0, "start of journal")
    while True:
        try:
            entry = next(reading, None)
        except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
            return ReplayResult(count, _unreplayable(*last, f"the journal cannot be read past this event: {exc}"), trace)
        if entry is None:
            return ReplayResult(count, None, trace)
        last = (entry.seq, entry.name)
        if entry.name == SNAPSHOT and entry.source == Source.SYSTEM.value:
            try:
                if booted:
                    problem = _resync(dispatcher, entry, unvouched)
                    if problem:
                        return ReplayResult(count, _unreplayable(entry.seq, entry.name, problem), trace)
                else:
                    unvouched = {name: -1 for name in dispatcher.build_from_snapshot(entry.data, overrides)}
                    booted = True
            except Exception as exc:
                return ReplayResult(count, _unreplayable(entry.seq, entry.name, f"cannot take the snapshot back: {exc!r}"), trace)
            continue
        if entry.name == SUMMARY and entry.source == "journal":
            last_seq = int(entry.data.get("last_seq", entry.seq))
            for machine in entry.data.get("machines") or ([entry.target] if entry.target else []):
                unvouched[machine] = max(unvouched.get(machine, -1), last_seq)
            continue
        if entry.name == STARTED and entry.source == Source.SYSTEM.value:
            try:
                dispatcher.build_machines(entry.data, overrides)
            except Exception as exc:  # any class or settings problem is a finding, not a crash
                return ReplayResult(count, _unreplayable(entry.seq, entry.name, f"cannot rebuild the machines: {exc!r}"), trace)
            # A fresh start vouches for every machine again, unless a summary covers events after it.
            booted, unvouched = True, {m: last for m, last in unvouched.items() if last > entry.seq}
        elif not booted or entry.target in unvouched:
            continue  # pruned past this run's start, or addressed to a machine out of sight
        try:
            result = dispatcher.dispatch(_event(entry))
            actual_t = _normal([transition_record(t) for t in result.transitions]) if result else []
            actual_e = _normal([codec.effect_to_record(e) for e in result.effects]) if result else []
        except Exception as exc:
            return ReplayResult(count, _unreplayable(entry.seq, entry.name, f"cannot replay this event: {exc!r}"), trace)
        expected_t, expected_e = entry.transitions, entry.effects
        if unvouched:
            actual_t, expected_t = _vouched(actual_t, unvouched), _vouched(expected_t, unvouched)
            actual_e, expected_e = _vouched_effects(actual_e, unvouched), _vouched_effects(expected_e, unvouched)
        count += 1
        trace.append({"seq": entry.seq, "event": entry.name, "transitions": actual_t, "effects": actual_e})
        if actual_t != _normal(expected_t) or actual_e != _normal(expected_e):
            divergence = Divergence(entry.seq, entry.name, expected_t, actual_t, expected_e, actual_e)
            return ReplayResult(count, divergence, trace)


def _resync(dispatcher: Dispatcher, snapshot: JournalEntry, unvouched: dict[str, int]) -> str:
    """A snapshot met while replaying: check states, take machines out of sight back; a problem or "".

    A machine is taken back only by a snapshot taken after the last event its
    summaries stand for (a summary covers a minute, snapshots may fall inside it).
    """
    for name, entry in snapshot.data.get("machines", {}).items():
        machine = dispatcher.machines.get(name)
        if machine is None:
            continue
        if name in unvouched:
            if snapshot.seq >= unvouched[name] and dispatcher.restore_machine(machine, entry):
                del unvouched[name]
        elif machine.state_name != entry.get("state"):
            return f"the snapshot has {name} in {entry.get('state')!r}, the replay in {machine.state_name!r}"
    return ""


def _vouched(transitions: list[Any], unvouched: Mapping[str, int]) -> list[Any]:
    return [t for t in transitions if t.get("machine") not in unvouched]


def _vouched_effects(effects: list[Any], unvouched: Mapping[str, int]) -> list[Any]:
    return [e for e in effects if str(e.get("id", "")).split(":", 1)[0] not in unvouched]


def _event(entry: JournalEntry) -> Event:
    data = entry.data if isinstance(entry.data, dict) else {"value": entry.data}
    return Event(entry.seq, entry.ts_ms, entry.source, entry.name, data, entry.target)


def _unreplayable(seq: int, name: str, reason: str) -> Divergence:
    return Divergence(seq, name, [], [], [], [], reason=reason)


def replay_journal(
    path: Path,
    overrides: Mapping[str, type[GatewayMachine]] | None = None,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> ReplayResult:
    """Replay a journal database or a ``.jsonl`` export of one, whole or a window of it."""
    return replay_entries(window_entries(path, since_ms, until_ms), overrides)


def window_entries(path: Path, since_ms: int | None, until_ms: int | None) -> Iterable[JournalEntry]:
    """Entries from the last start or snapshot at or before ``since_ms`` up to ``until_ms``."""
    if since_ms is None:
        return read_entries(path, until_ms=until_ms, snapshots=True)
    if Path(path).suffix != ".jsonl":
        start = replay_start_id(path, since_ms) if since_ms is not None else None
        return read_journal(path, until_ms=until_ms, from_id=start, snapshots=True)
    return _jsonl_window(read_entries(path, until_ms=until_ms, snapshots=True), since_ms)


def _jsonl_window(entries: Iterable[JournalEntry], since_ms: int) -> list[JournalEntry]:
    kept: list[JournalEntry] = []
    for entry in entries:
        starts = entry.source == Source.SYSTEM.value and entry.name in (STARTED, SNAPSHOT)
        if starts and entry.ts_ms <= since_ms:
            kept = []  # a later starting point at or before the window: replay from it
        kept.append(entry)
    return kept
