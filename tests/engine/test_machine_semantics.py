"""How ``GatewayMachine.handle`` runs a step: the library's ``send``, as the gateway relies on it.

The journal records what ``handle`` returns, so these pin the semantics the
machines are written against: internal transitions run no exit/entry,
the first enabled transition of an event wins in declaration order, guards
and actions receive the event as ``ev``, and every transition is logged,
internal ones included.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from statemachine import State

from teg_fsm.cli.diagrams import machine_classes
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from tests.engine.examples import CounterMachine, FetcherMachine, UpdaterMachine


def _ev(name: str, data: dict[str, Any] | None = None, seq: int = 1) -> Event:
    return Event(seq, 1_700_000_000_000 + seq, "test", name, data or {})


class Loops(GatewayMachine):
    """Counts entries and exits around its self-transitions."""

    machine_name = "loops"
    resume_table = {"here": "here", "there": "there"}

    here = State(initial=True)
    there = State()

    bookkeeping = here.to.itself(internal=True)
    restart = here.to.itself()
    leave = here.to(there) | there.to(here)

    def setup(self) -> None:
        self.calls: list[str] = []

    def on_enter_here(self) -> None:
        self.calls.append("enter")

    def on_exit_here(self) -> None:
        self.calls.append("exit")

    def on_bookkeeping(self) -> None:
        self.calls.append("bookkeeping")

    def on_restart(self) -> None:
        self.calls.append("restart")


class Picker(GatewayMachine):
    """Three transitions for one event; guards read the event."""

    machine_name = "picker"
    resume_table = {"start": "start", "first": "first", "second": "second", "fallback": "fallback"}

    start = State(initial=True)
    first = State()
    second = State()
    fallback = State()

    pick = start.to(first, cond="wants_first") | start.to(second, cond="always") | start.to(fallback)
    back = first.to(start) | second.to(start) | fallback.to(start)

    def setup(self) -> None:
        self.checked: list[str] = []

    def wants_first(self, ev: Event) -> bool:
        self.checked.append("wants_first")
        return ev.data.get("to") == "first"

    def always(self, ev: Event) -> bool:
        self.checked.append("always")
        return ev.data.get("to") != "nowhere"


def test_an_internal_self_transition_runs_its_action_without_exit_or_entry() -> None:
    machine = Loops()
    machine.calls.clear()
    assert machine.handle(_ev("bookkeeping")) == ([("here", "here", "bookkeeping")], [])
    assert machine.calls == ["bookkeeping"]


def test_an_external_self_transition_exits_and_enters_again() -> None:
    machine = Loops()
    machine.calls.clear()
    assert machine.handle(_ev("restart"))[0] == [("here", "here", "restart")]
    assert machine.calls == ["exit", "restart", "enter"]


def test_the_first_enabled_transition_wins_in_declaration_order() -> None:
    machine = Picker()
    assert machine.handle(_ev("pick", {"to": "first"}))[0] == [("start", "first", "pick")]
    assert machine.checked == ["wants_first"]  # the later guards are not even asked
    machine.handle(_ev("back"))
    machine.checked.clear()
    assert machine.handle(_ev("pick", {"to": "second"}))[0] == [("start", "second", "pick")]
    assert machine.checked == ["wants_first", "always"]
    machine.handle(_ev("back"))
    assert machine.handle(_ev("pick", {"to": "nowhere"}))[0] == [("start", "fallback", "pick")]


def test_actions_and_guards_receive_the_event_and_now_ms_is_its_time() -> None:
    machine = FetcherMachine({})
    machine.take_effects()
    ev = _ev("fetch_requested", {"url": "https://example.invalid/a"}, seq=7)
    moves, effects = machine.handle(ev)
    assert moves == [("idle", "fetching", "fetch_requested")]
    assert [e.url for e in effects] == ["https://example.invalid/a"]  # type: ignore[attr-defined]
    assert machine.now_ms == ev.ts_ms


def test_an_event_with_no_transition_here_changes_nothing_even_if_it_names_a_method() -> None:
    machine = FetcherMachine({})
    machine.take_effects()
    for name in ("fetch_succeeded", "snapshot", "setup", "no_such_event"):
        assert machine.handle(_ev(name)) == ([], [])
        assert machine.state_name == "idle"


def test_a_raising_guard_raises_out_of_handle_and_leaves_the_state() -> None:
    machine = Picker()
    with pytest.raises(AttributeError):
        machine.handle(Event(1, 0, "test", "pick", None))  # type: ignore[arg-type]
    assert machine.state_name == "start"


def _declared(cls: type[GatewayMachine], source: str, event: str) -> bool:
    state = cls.states_map[source]
    return any(t.match(event) for s in (state, *state.ancestors()) for t in s.transitions)


@pytest.mark.parametrize(
    "cls", [FetcherMachine, CounterMachine, UpdaterMachine, Loops, *machine_classes()], ids=lambda c: c.__name__
)
def test_every_step_logs_a_chain_of_declared_transitions_from_the_state_before_to_the_state_after(
    cls: type[GatewayMachine],
) -> None:
    names = sorted(cls.takes())
    rng = random.Random(cls.__name__)
    for run in range(10):
        machine = cls({})
        machine.take_effects()
        for seq in range(40):
            name = rng.choice(names)
            data = rng.choice([{}, {"url": "u", "version": "v1.0.0", "error": "x", "result": {}}])
            before = machine.state_name
            try:
                moves, _ = machine.handle(_ev(name, data, seq))
            except Exception:  # random data may break an action; the dispatcher contains that
                machine.take_effects(), machine.take_transitions()
                continue
            if not moves:
                assert machine.state_name == before, (run, seq, name)
                continue
            assert moves[0][0] == before and moves[-1][1] == machine.state_name, (run, seq, moves)
            for source, _, event in moves:
                assert _declared(cls, source, event), (source, event)
            assert all(a[1] == b[0] for a, b in zip(moves, moves[1:])), moves


@pytest.mark.parametrize("cls", machine_classes(), ids=lambda c: c.__name__)
def test_no_gateway_machine_declares_an_internal_self_transition_on_a_nested_or_compound_state(
    cls: type[GatewayMachine],
) -> None:
    # python-statemachine 3.2.2 runs the ancestors' entry actions on an internal
    # self-transition of a nested state, and exits the nested states of a compound
    # one: neither is "no exit/entry". A targetless transition (``s.to(None)``) is.
    wrong = [
        f"{state.id} on {event}"
        for state in cls.states_map.values()
        for t in state.transitions
        if t.internal and t.is_self and (state.parent is not None or state.is_compound)
        for event in t.events
    ]
    assert wrong == [], f"{cls.__name__}: use a targetless transition instead (docs/ENGINE.md): {wrong}"


class Witness(GatewayMachine):
    """Records the state each kind of action sees."""

    machine_name = "witness"
    resume_table = {"a": "a", "b": "b"}

    a = State(initial=True)
    b = State()
    go = a.to(b) | b.to(a)

    def setup(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def before_go(self) -> None:
        self.seen.append(("before", self.state_name))

    def on_exit_a(self) -> None:
        self.seen.append(("exit", self.state_name))

    def on_go(self) -> None:
        self.seen.append(("on", self.state_name))

    def on_enter_b(self) -> None:
        self.seen.append(("enter", self.state_name))

    def after_go(self) -> None:
        self.seen.append(("after", self.state_name))


def test_transition_actions_see_the_source_state_and_entry_actions_the_target() -> None:
    machine = Witness()
    machine.handle(_ev("go"))
    assert machine.seen == [("before", "a"), ("exit", "a"), ("on", "a"), ("enter", "b"), ("after", "b")]
