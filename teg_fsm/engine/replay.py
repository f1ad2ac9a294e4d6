"""Replay: feed a recorded journal to the current machines and compare.

No adapters, no timers, no runner: the recorded events (with their recorded
sequence numbers and timestamps) are dispatched in order, and each event's
transitions and effects are compared with what was recorded. Events caused by
effects (outcomes, notifications, timer firings) are in the journal too, so
nothing needs to be re-executed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.codec import Codec
from teg_fsm.engine.dispatcher import Dispatcher
from teg_fsm.engine.events import STARTED, Event, Source
from teg_fsm.engine.journal import JournalEntry, read_entries, transition_record
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
        if entry.name == STARTED and entry.source == Source.SYSTEM.value:
            try:
                dispatcher.build_machines(entry.data, overrides)
            except Exception as exc:  # any class or settings problem is a finding, not a crash
                return ReplayResult(count, _unreplayable(entry.seq, entry.name, f"cannot rebuild the machines: {exc!r}"), trace)
            booted = True
        elif not booted:
            continue  # the journal was pruned past this run's start: nothing to rebuild from
        try:
            result = dispatcher.dispatch(_event(entry))
            actual_t = _normal([transition_record(t) for t in result.transitions]) if result else []
            actual_e = _normal([codec.effect_to_record(e) for e in result.effects]) if result else []
        except Exception as exc:
            return ReplayResult(count, _unreplayable(entry.seq, entry.name, f"cannot replay this event: {exc!r}"), trace)
        count += 1
        trace.append({"seq": entry.seq, "event": entry.name, "transitions": actual_t, "effects": actual_e})
        if actual_t != _normal(entry.transitions) or actual_e != _normal(entry.effects):
            divergence = Divergence(entry.seq, entry.name, entry.transitions, actual_t, entry.effects, actual_e)
            return ReplayResult(count, divergence, trace)


def _event(entry: JournalEntry) -> Event:
    data = entry.data if isinstance(entry.data, dict) else {"value": entry.data}
    return Event(entry.seq, entry.ts_ms, entry.source, entry.name, data, entry.target)


def _unreplayable(seq: int, name: str, reason: str) -> Divergence:
    return Divergence(seq, name, [], [], [], [], reason=reason)


def replay_journal(path: Path, overrides: Mapping[str, type[GatewayMachine]] | None = None) -> ReplayResult:
    """Replay a journal database or a ``.jsonl`` export of one."""
    return replay_entries(read_entries(path), overrides)
