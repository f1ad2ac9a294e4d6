"""The journal commits the events of one burst together, and a checkpoint only when it matters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from statemachine import State

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatcher, MachineSpec
from teg_fsm.engine.events import Event
from teg_fsm.engine.journal import Journal, read_journal
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.timers import Timers
from tests.engine.examples import CounterMachine


class ShuttleMachine(GatewayMachine):
    """Moves between ``idle`` and ``busy``; both resume in ``offline`` with no data (like the uplink)."""

    machine_name = "shuttle"
    resume_table = {"offline": "offline", "idle": "offline", "busy": "offline"}
    rest_states = frozenset({"offline", "idle"})

    offline = State(initial=True)
    idle = State()
    busy = State()
    up = offline.to(idle)
    go = idle.to(busy)
    done = busy.to(idle)


def _engine(tmp_path: Path) -> tuple[Dispatcher, Journal, FakeClock]:
    clock = FakeClock()
    journal = Journal(tmp_path / "teg_journal.db", monotonic=clock.monotonic)
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal)
    dispatcher.boot([MachineSpec(ShuttleMachine), MachineSpec(CounterMachine)])
    dispatcher.run_until_idle()
    return dispatcher, journal, clock


def _send(dispatcher: Dispatcher, name: str, target: str) -> None:
    dispatcher.dispatch(Event(0, 0, "system", name, {}, target))


def _stored(journal: Journal) -> tuple[int, dict[str, str]]:
    """What another reader (a restart) sees: committed rows and checkpoint states."""
    conn = sqlite3.connect(journal.path)
    try:
        states = dict(conn.execute("SELECT machine, state FROM checkpoints").fetchall())
    finally:
        conn.close()
    return len(list(read_journal(journal.path))), states


def test_the_events_of_a_burst_share_one_commit_due_a_group_interval_after_the_first(tmp_path: Path) -> None:
    dispatcher, journal, clock = _engine(tmp_path)
    rows, _ = _stored(journal)
    _send(dispatcher, "up", "shuttle")  # urgent: the shuttle's first checkpoint since boot
    assert _stored(journal) == (rows, {"shuttle": "idle"})  # the event's own row waits for its group
    start = clock.monotonic()
    for name in ("go", "done", "go"):  # the queue runs dry between them, as at rest
        clock.set_elapsed(clock.monotonic() + 0.02)  # type: ignore[attr-defined]
        _send(dispatcher, name, "shuttle")
        dispatcher.idle()
        assert 0 < journal.due_in() <= 0.1  # type: ignore[operator]
    # idle <-> busy resume the same (offline, no data): not urgent, nothing committed yet.
    assert _stored(journal) == (rows, {"shuttle": "idle"})
    clock.set_elapsed(start + 0.1)  # type: ignore[attr-defined]
    dispatcher.idle()
    assert journal.due_in() is None
    assert _stored(journal) == (rows + 4, {"shuttle": "busy"})  # one commit for the four
    journal.close()


def test_a_checkpoint_that_resumes_differently_is_committed_before_the_effects(tmp_path: Path) -> None:
    dispatcher, journal, _ = _engine(tmp_path)
    rows, _ = _stored(journal)
    _send(dispatcher, "up", "shuttle")
    _send(dispatcher, "go", "shuttle")  # deferred: resumes in offline either way
    assert _stored(journal) == (rows, {"shuttle": "idle"})
    _send(dispatcher, "tick", "counter")  # even -> odd resume differently: urgent, takes the rest along
    assert _stored(journal) == (rows + 2, {"counter": "odd", "shuttle": "busy"})
    journal.close()


def test_with_no_effect_in_flight_the_group_is_committed_at_once(tmp_path: Path) -> None:
    from teg_fsm.engine.runner import Completion, EffectRunner
    from tests.engine.examples import FetchThing

    dispatcher, journal, clock = _engine(tmp_path)
    outcomes: list[str] = []
    runner = EffectRunner(lambda origin, effect, outcome, payload: outcomes.append(outcome.value), workers=1)
    held: list[Completion] = []
    runner.register(FetchThing, lambda effect, completion: held.append(completion))
    dispatcher.attach_runner(runner)
    try:
        rows, _ = _stored(journal)
        _send(dispatcher, "up", "shuttle")  # its checkpoint is urgent; its row waits for the group
        # An effect in flight: its outcome will come and share the group, so the group waits.
        runner.submit("shuttle", FetchThing(id="shuttle:1:0", url="x", reply="fetch", timeout_s=None))
        _send(dispatcher, "go", "shuttle")
        dispatcher.idle()
        assert _stored(journal)[0] == rows and 0 < journal.due_in() <= 0.1  # type: ignore[operator]
        # Settled: nothing more is coming, so the group is committed now, not 0.1 s later.
        held[0].succeed()
        _send(dispatcher, "done", "shuttle")
        dispatcher.idle()
        assert journal.due_in() is None
        assert _stored(journal)[0] == rows + 3 and clock.monotonic() == 0.0  # up, go and done
    finally:
        runner.shutdown()
        journal.close()
