"""The flat-machine microstep behaves exactly like python-statemachine's ``send``.

Every machine (the gateway's and the examples) gets the same random event
sequences through both paths; state, effects, transitions and raised errors
must match after every event.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from statemachine import State

from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.cli.diagrams import machine_classes
from teg_fsm.engine.events import Event
from tests.engine.examples import CounterMachine, FetcherMachine


def _outcome(machine: GatewayMachine, ev: Event, slow: bool) -> tuple[Any, ...]:
    before = machine.state_name
    error = None
    moves: list[tuple[str, str, str]] = []
    try:
        if slow:
            machine.now_ms = ev.ts_ms
            machine.send(ev.name, ev=ev)
        else:
            moves, effects = machine.handle(ev)
            machine.outbox[:0] = effects
    except Exception as exc:  # both paths must fail alike
        error = type(exc).__name__
    machine.take_transitions()
    # The library reports no self-transitions, so compare real state changes only.
    changed = [(s, t) for s, t, _ in moves if s != t]
    if slow and machine.state_name != before:
        changed = [(before, machine.state_name)]
    return machine.state_name, error, machine.take_effects(), changed


# The OTA machine has compound phases: the engine runs it through ``send`` itself.
COMPOUND = {"OtaMachine"}


@pytest.mark.parametrize(
    "cls", [FetcherMachine, CounterMachine, *(c for c in machine_classes() if c.__name__ not in COMPOUND)],
    ids=lambda c: c.__name__,
)
def test_microstep_matches_the_library_engine(cls: type[GatewayMachine]) -> None:
    assert cls._is_flat(), f"{cls.__name__} must be flat (see docs/ENGINE.md)"
    names = sorted(cls.takes())
    rng = random.Random(cls.__name__)
    for run in range(20):
        fast, slow = cls({}), cls({})
        fast.take_effects(), slow.take_effects()
        for seq in range(40):
            name = rng.choice(names)
            data = rng.choice([{}, {"url": "u", "version": "v1.0.0", "error": "x", "result": {}}])
            ev = Event(seq, 1_700_000_000_000 + seq * 1000, "test", name, data)
            assert _outcome(fast, ev, slow=False) == _outcome(slow, ev, slow=True), (run, seq, name)


class _PhasedMachine(GatewayMachine):
    machine_name = "phased_example"

    idle = State(initial=True)
    fetching = State()
    building = State()
    installing = State(states=[fetching, building])
    failed = State()

    start = idle.to(fetching)
    fetched = fetching.to(building)
    poke = fetching.to.itself(internal=True) | building.to.itself(internal=True)
    build_failed = installing.to(failed)
    retry = failed.to(idle)


def test_a_compound_machine_logs_every_transition_by_its_nested_states() -> None:
    machine = _PhasedMachine({})
    steps = [machine.handle(Event(seq, seq, "test", name, {}))[0]
             for seq, name in enumerate(["start", "poke", "fetched", "build_failed", "poke"])]
    assert steps == [
        [("idle", "fetching", "start")], [("fetching", "fetching", "poke")], [("fetching", "building", "fetched")],
        [("building", "failed", "build_failed")], [],
    ]
    assert _PhasedMachine({}, start_value="building").state_name == "building"
