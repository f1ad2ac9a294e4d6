"""What happened, per machine, in a window of the journal: the model behind ``teg audit``.

Theory: the journal records, per dispatched event, the transitions it caused
(machine, source, target, event) and the effects it issued (with ids); an
effect's outcome comes back later as an event of source ``effect`` whose data
names the ``effect_id``. It does not record which guard decided. That is
recovered from the machine's class: its transitions for (source, event) are
tried in declaration order and the first whose guards hold is taken, so the
recorded target names the row that was taken (its guards held) and the rows
tried before it (theirs did not). The class is the one the start record
names, when it is one we may import, else ours of the same machine name.

Journal contents are outside input: nothing here renders them, and rows of a
kind this module does not know (another version's summary or snapshot rows)
are skipped and counted, never guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from teg_fsm.cli import diagram_model as model
from teg_fsm.engine.events import STARTED, Source
from teg_fsm.engine.journal import JournalEntry
from teg_fsm.engine.machine import GatewayMachine

OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")
_SOURCES = frozenset(s.value for s in Source)
# Class paths a start record may name that we are willing to import: our machines
# (also under their pre-package name) and the test rig's fakes. Anything else in a
# journal is outside input and only matched by machine name.
_IMPORTABLE = ("teg_fsm.machines.", "machines.", "tests.machines.")


@attrs.frozen
class Outcome:
    """How an effect ended: the event that answered it."""

    name: str
    kind: str  # one of OUTCOMES, or "" when the event name says none of them
    seq: int
    ts_ms: int
    detail: Any  # the error text, else the result


@attrs.frozen
class EffectStep:
    """One effect a step issued, and its outcome when the journal holds it."""

    id: str
    type: str
    fields: dict[str, Any]
    awaits_reply: bool
    outcome: Outcome | None = None


@attrs.frozen
class Guard:
    """A guard of the row that was taken (it held) or of a row tried before it (not all held)."""

    expression: str  # "has_last_good", "!health_seen"
    meaning: str


@attrs.frozen
class PassedOver:
    """A row tried before the taken one: at least one of its guards did not hold."""

    target: str
    guards: tuple[Guard, ...]


@attrs.frozen
class Step:
    """One transition of one machine."""

    seq: int
    ts_ms: int
    machine: str
    source: str
    target: str
    event: str
    event_source: str
    data: dict[str, Any]
    error: str | None
    declared: bool  # the class has a row for it (False: class unknown or changed since)
    internal: bool  # a stay that re-runs no entry/exit: bookkeeping
    guards: tuple[Guard, ...]
    passed_over: tuple[PassedOver, ...]
    effects: tuple[EffectStep, ...]
    # Later rows to the same target: one of them may have been the one taken instead.
    or_guards: tuple[tuple[Guard, ...], ...] = ()

    @property
    def changes_state(self) -> bool:
        return self.source != self.target


@attrs.frozen
class Segment:
    """A machine in one state from ``start_ms`` to ``end_ms``."""

    state: str
    start_ms: int
    end_ms: int


@attrs.define
class MachineStory:
    name: str
    cls: type[GatewayMachine] | None
    class_path: str
    state_at_start: str | None = None
    state_at_end: str | None = None
    steps: list[Step] = attrs.Factory(list)
    segments: list[Segment] = attrs.Factory(list)

    def counts(self) -> dict[tuple[str, str, str], int]:
        """(source, event, target) -> how often it was taken in the window."""
        found: dict[tuple[str, str, str], int] = {}
        for step in self.steps:
            key = (step.source, step.event, step.target)
            found[key] = found.get(key, 0) + 1
        return found


@attrs.define
class Story:
    since_ms: int
    until_ms: int
    machines: dict[str, MachineStory]
    entries: int = 0  # rows of the window read
    skipped: dict[str, int] = attrs.Factory(dict)  # row kind -> how many were not understood
    starts: list[int] = attrs.Factory(list)  # gateway starts in the window (ts_ms)
    stopped_reading: str | None = None  # why reading ended early, if it did


def build(
    entries: Iterable[Any],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    machine: str | None = None,
    classes: Iterable[type[GatewayMachine]] = (),
) -> Story:
    """The story of ``entries`` (read from the journal's start, up to ``until_ms``) in the window.

    Entries before ``since_ms`` only tell the state each machine was in when the
    window opened; a machine with no earlier transition is taken to have been
    in the source state of its first one.
    """
    ours = {cls.machine_name: cls for cls in classes}
    reader = _Reader(since_ms, until_ms, machine, ours)
    reader.read(entries)
    return reader.finish()


class _Reader:
    def __init__(self, since_ms: int | None, until_ms: int | None, machine: str | None,
                 ours: dict[str, type[GatewayMachine]]) -> None:
        self.since_ms, self.until_ms, self.only = since_ms, until_ms, machine
        self.ours = ours
        self.classes: dict[str, tuple[type[GatewayMachine] | None, str]] = {}
        self.before: dict[str, str] = {}  # state at the window's start, from earlier transitions
        self.stories: dict[str, MachineStory] = {}
        self.tables: dict[type, list[model.Row]] = {}  # per class, built once per story
        self.meanings: dict[tuple[type, str], str] = {}  # (class, guard) -> meaning; describe() reads source
        self.window: list[JournalEntry] = []
        self.outcomes: dict[str, Outcome] = {}
        self.story = Story(0, 0, {})
        self.first_ts: int | None = None
        self.last_ts: int | None = None

    def read(self, entries: Iterable[Any]) -> None:
        iterator = iter(entries)
        while True:
            try:
                entry = next(iterator, None)
            except (ValueError, TypeError, KeyError, OSError, sqlite3.Error) as exc:
                # An unreadable line or a damaged file: the page shows what was read and where it stopped.
                self.story.stopped_reading = str(exc)
                return
            if entry is None:
                return
            kind = _unknown_kind(entry)
            if kind is not None:
                self.story.skipped[kind] = self.story.skipped.get(kind, 0) + 1
                continue
            self._take(entry)

    def _take(self, entry: JournalEntry) -> None:
        if entry.name == STARTED and entry.source == Source.SYSTEM.value:
            self._note_classes(entry.data)
        if self.until_ms is not None and entry.ts_ms > self.until_ms:
            return
        if self.since_ms is not None and entry.ts_ms < self.since_ms:
            for t in entry.transitions:
                self.before[t["machine"]] = t["target"]
            return
        self.first_ts = entry.ts_ms if self.first_ts is None else self.first_ts
        self.last_ts = entry.ts_ms
        self.story.entries += 1
        if entry.name == STARTED and entry.source == Source.SYSTEM.value:
            self.story.starts.append(entry.ts_ms)
        self.window.append(entry)
        outcome = _outcome(entry)
        if outcome is not None:
            self.outcomes.setdefault(str(entry.data.get("effect_id")), outcome)

    def _note_classes(self, data: Any) -> None:
        machines = data.get("machines") if isinstance(data, dict) else None
        if not isinstance(machines, dict):
            return
        for name, spec in machines.items():
            path = spec.get("class") if isinstance(spec, dict) else None
            self.classes[str(name)] = (_load(str(name), path, self.ours), str(path or ""))

    def finish(self) -> Story:
        story = self.story
        story.since_ms = self.since_ms if self.since_ms is not None else (self.first_ts or 0)
        story.until_ms = self.until_ms if self.until_ms is not None else (self.last_ts or story.since_ms)
        for entry in self.window:
            for index, record in enumerate(entry.transitions):
                name = record["machine"]
                if self.only is not None and name != self.only:
                    continue
                machine = self._machine(name)
                machine.steps.append(self._step(machine, entry, record, index))
        for name in [*self.before, *self.classes]:
            if self.only is None or name == self.only:
                self._machine(name)  # a machine that did not move in the window still has a state
        for machine in self.stories.values():
            _timeline(machine, self.before.get(machine.name), story.since_ms, story.until_ms)
        story.machines = dict(sorted(self.stories.items()))
        return story

    def _machine(self, name: str) -> MachineStory:
        if name not in self.stories:
            cls, path = self.classes.get(name, (self.ours.get(name), ""))
            self.stories[name] = MachineStory(name, cls, path or (_path(cls) if cls else ""))
        return self.stories[name]

    def _step(self, machine: MachineStory, entry: JournalEntry, record: dict[str, Any], index: int) -> Step:
        source, target, event = record["source"], record["target"], record["event"]
        table: list[model.Row] = []
        if machine.cls is not None:
            if machine.cls not in self.tables:
                self.tables[machine.cls] = model.rows(machine.cls)
            table = self.tables[machine.cls]
        taken, passed, alternatives = _decision(machine.cls, table, source, event, target, self._guards)
        prefix = f"{machine.name}:"
        # The effects of a step are those its machine issued for this event (ids "<machine>:<seq>:<n>").
        effects = tuple(
            _effect(e, self.outcomes) for e in entry.effects if str(e.get("id", "")).startswith(prefix)
        ) if index == _last_index(entry, machine.name) else ()
        data = entry.data if isinstance(entry.data, dict) else {"value": entry.data}
        return Step(
            entry.seq, entry.ts_ms, machine.name, source, target, event, entry.source, data,
            record.get("error"), taken is not None, bool(taken.internal) if taken else False,
            self._guards(machine.cls, taken.guards) if taken else (), passed, effects,
            tuple(self._guards(machine.cls, row.guards) for row in alternatives),
        )

    def _guards(self, cls: type[GatewayMachine] | None, expressions: tuple[str, ...]) -> tuple[Guard, ...]:
        found = []
        for expression in expressions:
            meanings = [self._meaning(cls, name) for name in model.guard_names(expression)] if cls else []
            found.append(Guard(expression, "; ".join(m for m in meanings if m)))
        return tuple(found)

    def _meaning(self, cls: type[GatewayMachine], name: str) -> str:
        if (cls, name) not in self.meanings:
            self.meanings[(cls, name)] = model.describe(cls, name).meaning
        return self.meanings[(cls, name)]


def _last_index(entry: JournalEntry, machine: str) -> int:
    """A machine moved twice by one event (rare) gets the effects on its last move."""
    return max(i for i, t in enumerate(entry.transitions) if t["machine"] == machine)


def _unknown_kind(entry: Any) -> str | None:
    """Why a row is not one this module understands (None: it is)."""
    if not isinstance(entry, JournalEntry):
        return type(entry).__name__
    if entry.source not in _SOURCES:
        return f"source {str(entry.source)[:40]!r}"
    if not isinstance(entry.transitions, list) or not isinstance(entry.effects, list):
        return "malformed row"
    for t in entry.transitions:
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("machine", "source", "target", "event")):
            return "malformed transition"
    if not all(isinstance(e, dict) for e in entry.effects):
        return "malformed effect"
    return None


def _outcome(entry: JournalEntry) -> Outcome | None:
    if entry.source != Source.EFFECT.value or not isinstance(entry.data, dict) or "effect_id" not in entry.data:
        return None
    kind = next((o for o in OUTCOMES if entry.name.endswith("_" + o)), "")
    detail = entry.data.get("error") if "error" in entry.data else entry.data.get("result")
    return Outcome(entry.name, kind, entry.seq, entry.ts_ms, detail)


def _effect(record: dict[str, Any], outcomes: dict[str, Outcome]) -> EffectStep:
    effect_id = str(record.get("id", ""))
    fields = {k: v for k, v in record.items() if k not in ("id", "type", "reply", "timeout_s")}
    reply = record.get("reply")
    return EffectStep(effect_id, str(record.get("type", "?")), fields, bool(reply), outcomes.get(effect_id))


def _load(name: str, path: Any, ours: dict[str, type[GatewayMachine]]) -> type[GatewayMachine] | None:
    """The class a start record names, if it is ours to import; else ours of that name."""
    if isinstance(path, str) and path.startswith(_IMPORTABLE):
        from teg_fsm.engine.dispatcher import load_class

        try:
            cls = load_class(path)
        except Exception:  # renamed or removed since the journal was written
            cls = None
        if isinstance(cls, type) and issubclass(cls, GatewayMachine):
            return cls
    return ours.get(name)


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__name__}"


def _rows(cls: type[GatewayMachine] | None, table: list[model.Row], source: str, event: str) -> list[model.Row]:
    """The rows tried for ``event`` in ``source`` (and in its enclosing states), in order."""
    if cls is None or source not in cls.states_map:
        return []
    chain = []
    state = cls.states_map[source]
    while state is not None:
        chain.append(state.id)
        state = state.parent
    return [row for sid in chain for row in table if row.source == sid and row.event == event]


def _decision(cls: type[GatewayMachine] | None, table: list[model.Row], source: str, event: str, target: str,
              guards: Callable[[type[GatewayMachine] | None, tuple[str, ...]], tuple[Guard, ...]],
              ) -> tuple[model.Row | None, tuple[PassedOver, ...], list[model.Row]]:
    """The row taken, the rows tried before it, and later rows to the same target.

    The journal names the target, not the row: the first row that leads there was
    reached (every row before it failed its guards); when a later row leads there
    too, either may have been taken.
    """
    rows = _rows(cls, table, source, event)
    leads = [i for i, row in enumerate(rows) if _leads_to(row, source, target)]
    if not leads:
        return None, (), []
    first = leads[0]
    passed = tuple(PassedOver(r.target, guards(cls, r.guards)) for r in rows[:first] if not _leads_to(r, source, target))
    later = [rows[i] for i in leads[1:]] if rows[first].guards else []
    return rows[first], passed, later


def _leads_to(row: model.Row, source: str, target: str) -> bool:
    return row.target == target or (row.target == row.source and target == source)


def _timeline(machine: MachineStory, before: str | None, since_ms: int, until_ms: int) -> None:
    state = before if before is not None else (machine.steps[0].source if machine.steps else None)
    machine.state_at_start = state
    start = since_ms
    segments: list[Segment] = []
    for step in machine.steps:
        if step.target == state:
            continue
        if state is not None:
            segments.append(Segment(state, start, step.ts_ms))
        state, start = step.target, step.ts_ms
    if state is not None:
        segments.append(Segment(state, start, max(until_ms, start)))
    machine.segments = segments
    machine.state_at_end = state

