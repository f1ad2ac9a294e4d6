"""The dispatcher: order, run-to-completion, routing, timers, checkpoints."""

from __future__ import annotations

from pathlib import Path

from statemachine import State

from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects import Notify
from teg_fsm.engine.events import Event, Outcome
from teg_fsm.engine.journal import read_journal
from teg_fsm.engine.machine import GatewayMachine
from tests.engine.examples import CounterMachine, FetcherMachine, FetchThing
from tests.engine.harness import make_engine


class RelayMachine(GatewayMachine):
    """Hands every ping to the counter as a tick, to test ordering across machines."""

    machine_name = "relay"
    resume_table = {"ready": "ready"}
    ready = State(initial=True)
    ping = ready.to.itself(internal=True)

    def on_ping(self, ev: Event) -> None:
        self.emit(Notify(machine="counter", name="tick", data={"from": ev.seq}))


def test_events_are_handled_in_order_and_each_runs_to_completion(tmp_path: Path) -> None:
    dispatcher, _, _ = make_engine([MachineSpec(CounterMachine), MachineSpec(RelayMachine)], tmp_path / "j.db")
    for _ in range(3):
        dispatcher.post("test", "ping")
    dispatcher.post("test", "tick")
    done = dispatcher.run_until_idle()
    names = [d.event.name for d in done]
    # The three pings run first (each to completion), then the direct tick,
    # then the three ticks the pings caused, in the order they were posted.
    assert names == ["ping", "ping", "ping", "tick", "tick", "tick", "tick"]
    assert [d.event.seq for d in done] == sorted(d.event.seq for d in done)
    assert [d.event.data.get("from") for d in done[4:]] == [done[0].event.seq, done[1].event.seq, done[2].event.seq]
    assert dispatcher.machines["counter"].count == 4


def test_an_event_reaches_only_the_machines_that_declare_it(tmp_path: Path) -> None:
    dispatcher, _, _ = make_engine([MachineSpec(CounterMachine), MachineSpec(FetcherMachine)], None)
    dispatcher.post("test", "tick")
    [done] = dispatcher.run_until_idle()
    assert [t.machine for t in done.transitions] == ["counter"]
    assert dispatcher.machines["fetcher"].state_name == "idle"


def test_timer_fires_under_the_fake_clock_at_the_right_time() -> None:
    dispatcher, clock, _ = make_engine([MachineSpec(FetcherMachine, {"retry_s": 30})])
    dispatcher.post("test", "fetch_requested", {"url": "u"})
    [started] = dispatcher.run_until_idle()
    dispatcher.post_outcome("fetcher", started.effects[0], Outcome.FAILED, {"error": "down"})
    dispatcher.run_until_idle()
    assert dispatcher.machines["fetcher"].state_name == "waiting"
    assert dispatcher.advance(29.9) == []
    [fired] = dispatcher.advance(0.2)
    assert fired.event.name == "retry_elapsed" and fired.event.source == "timer"
    assert fired.event.ts_ms - started.event.ts_ms == 30_000
    assert dispatcher.machines["fetcher"].state_name == "fetching"


def test_a_cancelled_or_restarted_timer_never_fires_stale() -> None:
    dispatcher, _, _ = make_engine([MachineSpec(FetcherMachine, {"retry_s": 10})])
    dispatcher.post("test", "fetch_requested", {"url": "u"})
    [started] = dispatcher.run_until_idle()
    dispatcher.post_outcome("fetcher", started.effects[0], Outcome.FAILED, {"error": "x"})
    dispatcher.run_until_idle()
    # Re-arm the same timer: only the second arming may fire.
    dispatcher._timers.start("fetcher", "retry_elapsed", 20)
    fired = dispatcher.advance(30)
    assert [d.event.name for d in fired] == ["retry_elapsed"]
    assert fired[0].event.ts_ms - started.event.ts_ms == 20_000


def test_effects_get_deterministic_ids_and_outcomes_route_back_to_the_issuer() -> None:
    dispatcher, _, _ = make_engine([MachineSpec(FetcherMachine), MachineSpec(CounterMachine)])
    dispatcher.post("test", "fetch_requested", {"url": "u"})
    [done] = dispatcher.run_until_idle()
    [effect] = done.effects
    assert isinstance(effect, FetchThing)
    assert effect.id == f"fetcher:{done.event.seq}:0"
    dispatcher.post_outcome("fetcher", effect, Outcome.SUCCEEDED, {"result": {"bytes": 3}})
    [outcome] = dispatcher.run_until_idle()
    assert outcome.event.name == "fetch_succeeded" and outcome.event.target == "fetcher"
    assert dispatcher.machines["fetcher"].results == [{"bytes": 3}]


def test_state_changes_are_checkpointed_before_effects_go_out(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine)], tmp_path / "j.db")
    seen_checkpoint = []

    class Spy:
        def submit(self, origin, effect):  # type: ignore[no-untyped-def]
            seen_checkpoint.append(journal.load_checkpoints()["fetcher"].state)

    dispatcher.attach_runner(Spy())  # type: ignore[arg-type]
    dispatcher.post("test", "fetch_requested", {"url": "u"})
    dispatcher.run_until_idle()
    assert seen_checkpoint == ["fetching"]


def test_the_journal_records_event_transitions_and_effects(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine)], tmp_path / "j.db")
    dispatcher.post("test", "fetch_requested", {"url": "u"})
    dispatcher.run_until_idle()
    entries = list(read_journal(tmp_path / "j.db"))
    assert [e.name for e in entries] == ["gateway_started", "fetch_requested"]
    last = entries[-1]
    assert last.transitions == [{"machine": "fetcher", "source": "idle", "target": "fetching", "event": "fetch_requested"}]
    assert last.effects[0]["type"] == "FetchThing" and last.effects[0]["url"] == "u"
    assert list(read_journal(tmp_path / "j.db", machine="counter")) == []
