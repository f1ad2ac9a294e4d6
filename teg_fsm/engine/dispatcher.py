"""The dispatcher: the one thread that runs the machines.

Theory of operation
-------------------
Everything that can change a machine arrives as an ``Event`` on one queue:
MQTT messages (paho's thread), timer firings, effect outcomes (worker
threads), controller-queue notices, signals, RPCs. ``post`` stamps each
event with the next sequence number and the clock's wall time under one lock,
so queue order is sequence order.

The dispatcher thread takes one event at a time and runs it to completion:
it delivers the event to its target machine, or to every machine that declares
its name, in a fixed machine order. Each machine returns the transitions it
took and the effect commands it issued. Then, in this order:

1. machines whose state or resume data changed are checkpointed (persist
   before acting);
2. the event, transitions and effects are appended to the journal;
3. the effects go out: engine effects (timers, notifications to another
   machine) are applied at once, the rest go to the effect runner, which
   never blocks this thread.

Nothing a machine does can reach another machine except through a new event
on the queue, so a journal of events replays to the same transitions and
effects. When the queue is empty the idle hooks (systemd watchdog, status)
run, and the journal commits its group once due (``Journal.due_in``: the
events of one burst share a transaction), or at once when no effect is in
flight (no outcome is coming to join the group).

The same thread drives the timers (``Timers.plan`` / ``fire_due``: machine
timers and the effect runner's timeouts): its queue wait ends at the earliest
of the next timer or effect deadline, the journal's commit and the time an idle
hook asked to run again, and with none of those it blocks until an event
comes. A gateway at rest wakes for its work, not on a tick, and a timer or
effect started here costs no hand-over to another thread.

Nothing stops this thread (field rule "never wedge"). A machine step that
raises is dropped whole, the machine goes to its declared ``error_state`` (or
stays where it was), and the failure is journaled as a transition carrying
``error``, so a replay meets the same failure. The journal never raises: a
write it cannot make is a declared condition (``disk_full``,
``storage_error``) that it retries with backoff while the rows wait in memory;
the idle watch announces each change as ``condition_raised`` /
``condition_cleared`` and each damaged file moved aside as
``file_quarantined``, for the health machine to log and report. Checkpoints
that cannot be written while the disk is full do not hold effects back:
acting without the checkpoint beats a gateway that stops answering.
Effect hand-out, observers and idle hooks are each guarded the same way.

Snapshots: right after each ``gateway_started`` and then periodically (after
``snapshot_every_decisions`` decisions, after an hour with any decision, at
least daily) the dispatcher journals a ``journal_snapshot`` row: every
machine's class, settings, state and image (all its own data,
``teg_fsm.engine.images``), taken between two events. A journal trimmed at its
head, or a window of it, replays from its oldest snapshot (``replay``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.engine.clock import Clock
from teg_fsm.engine.codec import Codec
from teg_fsm.engine.effects import CancelEffect, CancelTimer, Effect, Notify, StartTimer
from teg_fsm.engine.events import RESUMED, STARTED, Event, JsonDict, Outcome, Source, outcome_event_name
from teg_fsm.engine.images import ImageError, machine_image, restore_image
from teg_fsm.engine.journal import DECISION, Checkpoint, Journal, Transition
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.runner import EffectRunner
from teg_fsm.engine.timers import Timers

log = logging.getLogger(__name__)

_STOP = object()
MAX_ERROR_CHARS = 300
STORAGE_CHECK_S = 1.0
# With nothing else to do the free space is still looked at this often (a disk others fill).
STORAGE_IDLE_CHECK_S = 60.0
IDLE_RETRY_S = 5.0  # idle work that raised runs again this soon
_WAKE = object()  # a no-op on the queue: another thread's deadline is earlier than the loop's wait
CONDITION_RAISED = "condition_raised"
CONDITION_CLEARED = "condition_cleared"
FILE_QUARANTINED = "file_quarantined"
# Snapshot policy (see the theory above); sizes per day in tools/bench_retention.py.
SNAPSHOT_EVERY_DECISIONS = 1000
SNAPSHOT_INTERVAL_MS = 3600 * 1000
SNAPSHOT_MAX_INTERVAL_MS = 24 * 3600 * 1000
SNAPSHOT_FORMAT = 1


@attrs.frozen
class MachineSpec:
    """A machine class and its settings, as the composition root chose them."""

    cls: type[GatewayMachine]
    settings: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Dispatched:
    """What one event did."""

    event: Event
    transitions: list[Transition]
    effects: list[Effect]


Observer = Callable[[Dispatched], None]


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# Journals and checkpoints written before the machines moved under the project's
# namespace name them "machines.<module>:<Class>"; stored values are a contract.
_LEGACY_MACHINES_PREFIX = "machines."


def load_class(path: str) -> type[GatewayMachine]:
    module, _, name = path.partition(":")
    if module.startswith(_LEGACY_MACHINES_PREFIX):
        module = f"teg_fsm.{module}"
    return getattr(import_module(module), name)


class Dispatcher:
    """Routes events to machines, journals them, and hands out effects."""

    def __init__(
        self,
        *,
        clock: Clock,
        timers: Timers,
        journal: Journal | None = None,
        runner: EffectRunner | None = None,
        codec: Codec | None = None,
    ) -> None:
        self._clock = clock
        self._timers = timers
        self._journal = journal
        self._runner = runner
        self._codec = codec or Codec()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._post_lock = threading.Lock()
        self._seq = journal.last_seq() if journal else 0
        self.machines: dict[str, GatewayMachine] = {}
        self._routes: dict[str, list[GatewayMachine]] = {}
        self._saved: dict[str, tuple[str, Any]] = {}
        self._resumes_as: dict[str, tuple[Any, ...]] = {}  # per machine: how its last checkpoint resumes
        self._resume_counts: dict[str, int] = {}
        self.since_ms: dict[str, int] = {}
        self.observers: list[Observer] = []
        # Each returns the seconds until it wants to run again, or None: only after the next event.
        self.idle_hooks: list[Callable[[], float | None]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dispatched_count = 0
        self.replaying = False
        self._pending_construction: list[tuple[GatewayMachine, list[Effect]]] = []
        self.condition: str | None = None  # the storage condition last announced
        self._storage_checked = float("-inf")
        self._quarantines_reported = 0
        self.snapshot_every_decisions = SNAPSHOT_EVERY_DECISIONS
        self.snapshot_interval_ms = SNAPSHOT_INTERVAL_MS
        self.snapshot_max_interval_ms = SNAPSHOT_MAX_INTERVAL_MS
        self._snapshot_ms: int | None = None
        self._decisions_since_snapshot = 0

    def attach_runner(self, runner: EffectRunner) -> None:
        """The runner needs the dispatcher as its sink, so it is attached after both exist."""
        self._runner = runner

    # -- start-up ---------------------------------------------------------

    def boot(self, specs: Sequence[MachineSpec], checkpoints: Mapping[str, Checkpoint] | None = None) -> Event:
        """Build the machines, re-entering checkpointed ones through their resume tables."""
        plan: dict[str, JsonDict] = {}
        for spec in specs:
            cp = (checkpoints or {}).get(spec.cls.machine_name)
            entry = _resume_plan(spec.cls, cp) if cp is not None else None
            if entry is not None and _resumable(spec, entry):
                plan[spec.cls.machine_name] = entry
        record = {
            "machines": {
                s.cls.machine_name: {"class": class_path(s.cls), "settings": dict(s.settings)} for s in specs
            },
            "resumed": plan,
        }
        started = self.boot_from_record(record)
        if self._journal is not None:
            # The loop guard counts boots, so the count must be stored before
            # the machine can crash again.
            for name, entry in plan.items():
                self._journal.save_checkpoint(
                    Checkpoint(name, entry["state"], entry["data"], entry["resume_count"]), self._clock.now_ms()
                )
        return started

    def boot_from_record(
        self, record: JsonDict, overrides: Mapping[str, type[GatewayMachine]] | None = None
    ) -> Event:
        """Build machines exactly as a ``gateway_started`` event describes, then post it."""
        self.build_machines(record, overrides)
        started = self.post(Source.SYSTEM, STARTED, record)
        for name, plan in record.get("resumed", {}).items():
            self.post(Source.SYSTEM, RESUMED, {"from_state": plan["stored_state"], "crash_loop": plan["crash_loop"]}, target=name)
        return started

    def build_machines(
        self, record: JsonDict, overrides: Mapping[str, type[GatewayMachine]] | None = None
    ) -> None:
        """(Re)create every machine from a ``gateway_started`` record (replay uses this directly)."""
        self.machines, self._routes, self._saved, self._resumes_as = {}, {}, {}, {}
        resumed: Mapping[str, JsonDict] = record.get("resumed", {})
        self._pending_construction = []
        for name, entry in record["machines"].items():
            cls = (overrides or {}).get(name) or load_class(entry["class"])
            plan = resumed.get(name)
            machine = cls(entry.get("settings", {}), start_value=plan["state"] if plan else None)
            if plan:
                machine.restore(plan["data"])
                self._resume_counts[name] = plan["resume_count"]
            machine.take_transitions()
            self._pending_construction.append((machine, machine.take_effects()))
            self._add_machine(machine)

    def _add_machine(self, machine: GatewayMachine) -> None:
        name = machine.machine_name
        if not name or name in self.machines:
            raise ValueError(f"machine name {name!r} missing or used twice")
        self.machines[name] = machine
        for event_name in type(machine).takes():
            self._routes.setdefault(event_name, []).append(machine)
        self._saved[name] = (machine.state_name, machine.snapshot())
        self.since_ms[name] = self._clock.now_ms()

    # -- posting ----------------------------------------------------------

    def post(self, source: str | Source, name: str, data: JsonDict | None = None, target: str | None = None) -> Event:
        """Queue an event; safe from any thread."""
        with self._post_lock:
            self._seq += 1
            event = Event(self._seq, self._clock.now_ms(), str(getattr(source, "value", source)), name, data or {}, target)
            self._queue.put(event)
        return event

    def post_outcome(self, origin: str, effect: Effect, outcome: Outcome, payload: JsonDict) -> None:
        """The effect runner's sink: post the outcome event if the machine asked for one."""
        if effect.reply is None:
            return
        self.post(Source.EFFECT, outcome_event_name(effect.reply, outcome), {"effect_id": effect.id, **payload}, target=origin)

    def fire_timer(self, machine: str, name: str, generation: int) -> None:
        self.post(Source.TIMER, name, {"timer": name, "generation": generation}, target=machine)

    # -- running ----------------------------------------------------------

    def dispatch(self, event: Event) -> Dispatched | None:
        """Run one event to completion; None when it was a stale timer firing."""
        if not self.replaying and event.source == Source.TIMER.value and event.target is not None:
            if not self._timers.consume(event.target, event.name, int(event.data.get("generation", -1))):
                return None
        transitions: list[Transition] = []
        issued: list[tuple[GatewayMachine, Effect]] = []
        if event.name == STARTED and event.source == Source.SYSTEM.value:
            for machine, effects in self._pending_construction:
                issued.extend((machine, e) for e in self._number(machine, event, effects, 0))
            self._pending_construction = []
        for machine in self._recipients(event):
            moved, effects = self._step(machine, event)
            transitions.extend(moved)
            if moved:
                self.since_ms[machine.machine_name] = event.ts_ms
            issued.extend((machine, e) for e in self._number(machine, event, effects, len(issued)))
            self._guarded(self._checkpoint_if_changed, machine, event.ts_ms)
        result = Dispatched(event, transitions, [e for _, e in issued])
        if self._journal is not None:
            self._guarded(self._record, result)
            self._guarded(self._snapshot_if_due, event)
        if not self.replaying:  # a replay feeds recorded consequences instead of causing them
            for machine, effect in issued:
                self._guarded(self._apply, machine.machine_name, effect)
        self.dispatched_count += 1
        for observer in self.observers:
            self._guarded(observer, result)
        return result

    def _step(self, machine: GatewayMachine, event: Event) -> tuple[list[Transition], list[Effect]]:
        """One machine takes one event; a step that raises is contained, never propagated."""
        name, before = machine.machine_name, machine.state_name
        try:
            moved, effects = machine.handle(event)
        except Exception as exc:
            # A machine bug must not stop the gateway. The step's effects are
            # dropped whole (the library already restored the state), the
            # machine goes to its declared safe state, and the failure is
            # journaled as what this event did, so a replay meets it again.
            machine.take_effects(), machine.take_transitions()
            if not self.replaying:  # a replay reports divergences, not tracebacks
                log.exception("%s failed on event #%s %s", name, event.seq, event.name)
            safe = type(machine).error_state
            if safe is not None:
                machine.place(safe)
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            return [Transition(name, before, machine.state_name, event.name, error)], []
        return [Transition(name, source, target, trigger) for source, target, trigger in moved], effects

    def _record(self, result: Dispatched) -> None:
        assert self._journal is not None
        kind = self._journal.record(
            result.event, result.transitions, [self._codec.effect_to_record(e) for e in result.effects]
        )
        if kind == DECISION:
            self._decisions_since_snapshot += 1

    # -- snapshots ----------------------------------------------------------

    def _snapshot_if_due(self, event: Event) -> None:
        """Journal a snapshot after a start, then per the policy in the theory of operation."""
        assert self._journal is not None
        started = event.name == STARTED and event.source == Source.SYSTEM.value
        if not started:
            if self._snapshot_ms is None:
                self._snapshot_ms = event.ts_ms
            age = event.ts_ms - self._snapshot_ms
            decisions = self._decisions_since_snapshot
            if not (decisions >= self.snapshot_every_decisions or decisions and age >= self.snapshot_interval_ms
                    or age >= self.snapshot_max_interval_ms):
                return
        self._journal.record_snapshot(event.seq, event.ts_ms, self.snapshot_record())
        self._snapshot_ms, self._decisions_since_snapshot = event.ts_ms, 0

    def snapshot_record(self) -> JsonDict:
        """Every machine as it is now: class, settings, state, resume count and image (None if it has none)."""
        machines: JsonDict = {}
        for name, machine in self.machines.items():
            entry: JsonDict = {
                "class": class_path(type(machine)),
                "settings": machine.unstructured_settings(),
                "state": machine.state_name,
                "resume_count": self._resume_counts.get(name, 0),
            }
            try:
                entry["image"] = machine_image(machine)
            except ImageError as exc:
                entry["image"], entry["image_error"] = None, str(exc)
            machines[name] = entry
        return {"format": SNAPSHOT_FORMAT, "machines": machines}

    def build_from_snapshot(
        self, record: JsonDict, overrides: Mapping[str, type[GatewayMachine]] | None = None
    ) -> list[str]:
        """(Re)create every machine as a ``journal_snapshot`` row describes (replay); returns those without an image."""
        self.machines, self._routes, self._saved, self._resumes_as = {}, {}, {}, {}
        self._pending_construction = []
        missing = []
        for name, entry in record["machines"].items():
            cls = (overrides or {}).get(name) or load_class(entry["class"])
            # Built in its initial state, not in the stored one: entering a state runs its
            # entry actions, which may need data only the image brings; the image sets both.
            machine = cls(entry.get("settings", {}))
            machine.take_transitions(), machine.take_effects()
            if not self.restore_machine(machine, entry):
                missing.append(name)
            self._resume_counts[name] = int(entry.get("resume_count", 0))
            self._add_machine(machine)
        return missing

    @staticmethod
    def restore_machine(machine: GatewayMachine, entry: JsonDict) -> bool:
        """Put one machine where a snapshot entry says; False when the entry has no image."""
        if not entry.get("image"):
            return False
        restore_image(machine, entry["image"])
        return True

    @staticmethod
    def _guarded(call: Callable[..., Any], *args: Any) -> None:
        """Run one piece of the step; whatever it raises is logged and the step goes on."""
        try:
            call(*args)
        except Exception:
            log.exception("%s failed", getattr(call, "__name__", call))

    def _recipients(self, event: Event) -> Iterable[GatewayMachine]:
        if event.target is not None:
            machine = self.machines.get(event.target)
            return [machine] if machine is not None else []
        return self._routes.get(event.name, ())

    @staticmethod
    def _number(machine: GatewayMachine, event: Event, effects: list[Effect], start: int) -> list[Effect]:
        return [
            attrs.evolve(e, id=f"{machine.machine_name}:{event.seq}:{start + i}") for i, e in enumerate(effects)
        ]

    def _checkpoint_if_changed(self, machine: GatewayMachine, now_ms: int) -> None:
        name = machine.machine_name
        state = machine.state_name
        previous_state, previous_data = self._saved[name]
        if state == previous_state and not machine.dirty:
            return
        data = machine.snapshot()
        machine.dirty = False
        if (state, data) == (previous_state, previous_data):
            return
        if state in type(machine).rest_states:
            self._resume_counts[name] = 0
        self._saved[name] = (state, data)
        checkpoint = Checkpoint(name, state, data, self._resume_counts.get(name, 0))
        resumes_as = _resumes_as(type(machine), checkpoint)
        # Persist before acting, unless a crash before the next group commit would resume the
        # machine just as the stored checkpoint does (the uplink's idle <-> draining: both
        # resume in offline with no data): then it rides with that commit.
        urgent = resumes_as != self._resumes_as.get(name)
        self._resumes_as[name] = resumes_as
        if self._journal is not None:
            self._journal.save_checkpoint(checkpoint, now_ms, urgent=urgent)

    def _apply(self, origin: str, effect: Effect) -> None:
        if isinstance(effect, StartTimer):
            self._timers.start(origin, effect.name, effect.seconds, effect.jitter)
        elif isinstance(effect, CancelTimer):
            self._timers.cancel(origin, effect.name)
        elif isinstance(effect, Notify):
            self.post(Source.SYSTEM, effect.name, dict(effect.data), target=effect.machine)
        elif isinstance(effect, CancelEffect):
            if self._runner is not None:
                self._runner.cancel(effect.effect_id)
        elif self._runner is not None:
            self._runner.submit(origin, effect)

    def run_until_idle(self, max_events: int | None = None) -> list[Dispatched]:
        """Process queued events in the calling thread (tests, replay)."""
        done: list[Dispatched] = []
        while max_events is None or len(done) < max_events:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                break
            result = self.dispatch(item)
            if result is not None:
                done.append(result)
        if self._journal is not None:
            self._journal.flush()
        return done

    def advance(self, seconds: float) -> list[Dispatched]:
        """With a FakeClock: move time forward, firing due timers in order."""
        clock = self._clock
        target = clock.monotonic() + seconds
        done = self.run_until_idle()
        while True:
            deadline = self._timers.next_deadline()
            if deadline is None or deadline > target:
                break
            clock.set_elapsed(deadline)  # type: ignore[attr-defined]
            for machine, name, generation in self._timers.pop_due(deadline):
                self.fire_timer(machine, name, generation)
            done.extend(self.run_until_idle())
        clock.set_elapsed(target)  # type: ignore[attr-defined]
        return done

    def start(self) -> None:
        """Run the dispatcher thread, which also drives the timers (production)."""
        self._stop.clear()
        self._timers.waker = lambda: self._queue.put(_WAKE)
        self._thread = threading.Thread(target=self._loop, name="teg-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._journal is not None:
            self._journal.flush()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _loop(self) -> None:
        timers = self._timers
        timers.drive_from_this_thread()
        idle_wait: float | None = None  # when the idle work wants to run again, from its last run
        idle_planned = self._clock.monotonic()
        while not self._stop.is_set():
            wait = None if idle_wait is None else max(0.0, idle_planned + idle_wait - self._clock.monotonic())
            due = self._journal.due_in() if self._journal is not None else None
            if due is not None and (wait is None or due < wait):
                wait = due
            try:
                item = self._queue.get(timeout=timers.plan(wait))
            except queue.Empty:
                item = None
            timers.awake()
            self._guarded(timers.fire_due, self.fire_timer)
            if item is _STOP:
                break
            if item is not None and item is not _WAKE:
                self._guarded(self.dispatch, item)
            if self._queue.empty():
                try:
                    idle_wait = self.idle()
                except Exception:
                    log.exception("idle work failed")
                    idle_wait = IDLE_RETRY_S
                idle_planned = self._clock.monotonic()

    def idle(self) -> float | None:
        """Idle work (the loop runs it whenever the queue runs dry): commit when due, watch storage, hooks.

        Returns the seconds until it wants to run again (the earliest its hooks asked for), or
        None when only the next event needs it.
        """
        waits: list[float] = []
        if self._journal is not None:
            if self._runner is not None and not self._runner.busy():
                # No effect in flight, so no outcome is coming to share the group: commit now
                # rather than a group interval later (at rest, the wake-up that ends each window).
                self._journal.flush()
            else:
                self._journal.flush_due()
            self._watch_storage()
            waits.append(STORAGE_IDLE_CHECK_S)
        for hook in self.idle_hooks:
            try:
                wait = hook()
            except Exception:  # asked again soon, as if it had said so
                log.exception("idle hook %s failed", getattr(hook, "__name__", hook))
                wait = IDLE_RETRY_S
            if wait is not None:
                waits.append(wait)
        return min(waits) if waits else None

    # -- declared conditions ------------------------------------------------

    def _watch_storage(self) -> None:
        """Turn the journal's storage condition and quarantined files into events (once each)."""
        journal = self._journal
        assert journal is not None
        now = self._clock.monotonic()
        if now - self._storage_checked < STORAGE_CHECK_S:
            return
        self._storage_checked = now
        journal.check_space()
        if journal.condition != self.condition:
            if self.condition is not None:
                self.post(Source.SYSTEM, CONDITION_CLEARED,
                          {"condition": self.condition, "dropped_rows": journal.dropped_rows})
            if journal.condition is not None:
                self.post(Source.SYSTEM, CONDITION_RAISED,
                          {"condition": journal.condition, "detail": journal.condition_detail})
            self.condition = journal.condition
        for path in journal.quarantined[self._quarantines_reported:]:
            self.report_quarantine(Path(path))
        self._quarantines_reported = len(journal.quarantined)

    def report_quarantine(self, path: Path) -> None:
        """Tell the machines (and so ThingsBoard) that a damaged file was moved aside."""
        self.post(Source.SYSTEM, FILE_QUARANTINED, {"file": path.name, "path": str(path)})

    def states(self) -> dict[str, JsonDict]:
        return {
            name: {"state": m.state_name, "since_ms": self.since_ms.get(name)} for name, m in self.machines.items()
        }


def _resumable(spec: MachineSpec, plan: JsonDict) -> bool:
    """A checkpoint the current machine cannot take back (renamed state, damaged data) means a fresh start."""
    try:
        spec.cls(spec.settings, start_value=plan["state"]).restore(plan["data"])
        return True
    except Exception as exc:
        log.error("checkpoint of %s (state %s) cannot be resumed, it starts fresh: %r",
                  spec.cls.machine_name, plan["stored_state"], exc)
        return False


def _resumes_as(cls: type[GatewayMachine], cp: Checkpoint) -> tuple[Any, ...]:
    """What a restart from ``cp`` would do: the state it re-enters, the data, the loop guard.

    The resume count only counts where a crash loop guard can act on it.
    """
    plan = _resume_plan(cls, cp)
    count = plan["resume_count"] if cls.crash_loop_state is not None else None
    return plan["state"], plan["data"], plan["crash_loop"], count


def _resume_plan(cls: type[GatewayMachine], cp: Checkpoint) -> JsonDict:
    """Where a machine re-enters after a restart, per its resume table and loop guard."""
    target = cls.resume_table.get(cp.state)
    if target is None:
        target = cls.initial_state.id if cls.initial_state is not None else cp.state
    resting = cp.state in cls.rest_states
    count = 0 if resting else cp.resume_count + 1
    crash_loop = not resting and count > cls.max_resumes and cls.crash_loop_state is not None
    if crash_loop:
        target = cls.crash_loop_state  # type: ignore[assignment]
    return {
        "stored_state": cp.state,
        "state": target,
        "data": cp.data,
        "resume_count": count,
        "crash_loop": crash_loop,
    }
