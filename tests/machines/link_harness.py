"""A fake-clock engine around the connection and provisioning machines (pure tests).

Effects are not executed: the test plays the world by answering them with
outcome events. Every effect issued with a ``reply`` is remembered with the
state it was issued in, so a test can check that the state declares a
transition for each outcome the effect can end in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatched, Dispatcher, MachineSpec
from teg_fsm.engine.effects import Effect
from teg_fsm.engine.events import Outcome, Source
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.timers import Timers
from teg_fsm.machines.connection import ConnectionMachine
from teg_fsm.machines.provisioning import ProvisioningMachine

E = TypeVar("E", bound=Effect)


class LinkRig:
    """Both machines on one dispatcher with a FakeClock; effects recorded, not run."""

    def __init__(
        self,
        connection: Mapping[str, Any] | None = None,
        provisioning: Mapping[str, Any] | None = None,
        journal_path: Path | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.journal = Journal(journal_path) if journal_path else None
        self.dispatcher = Dispatcher(clock=self.clock, timers=Timers(self.clock), journal=self.journal)
        self.effects: list[Effect] = []
        self.events: list[str] = []
        self.issued_in: list[tuple[str, str, Effect]] = []  # (machine, state, effect)
        self.dispatcher.observers.append(self._observe)
        specs = [
            MachineSpec(ConnectionMachine, {"jitter": 0.0, **(connection or {})}),
            MachineSpec(ProvisioningMachine, {"jitter": 0.0, **(provisioning or {})}),
        ]
        self.dispatcher.boot(specs, self.journal.load_checkpoints() if self.journal else None)
        self.dispatcher.run_until_idle()

    def _observe(self, done: Dispatched) -> None:
        self.events.append(done.event.name)
        for effect in done.effects:
            machine = effect.id.partition(":")[0]
            self.effects.append(effect)
            self.issued_in.append((machine, self.state(machine), effect))

    def state(self, machine: str) -> str:
        return self.dispatcher.machines[machine].state_name

    def all(self, kind: type[E]) -> list[E]:
        return [e for e in self.effects if isinstance(e, kind)]

    def last(self, kind: type[E]) -> E:
        found = self.all(kind)
        assert found, f"no {kind.__name__} was issued"
        return found[-1]

    def answer(self, effect: Effect, outcome: str = "succeeded", **payload: Any) -> list[Dispatched]:
        """Settle ``effect`` as the runner would, then run the machines."""
        machine = effect.id.partition(":")[0]
        self.dispatcher.post_outcome(machine, effect, Outcome(outcome), payload)
        return self.dispatcher.run_until_idle()

    def post(self, name: str, data: dict[str, Any] | None = None, source: Source = Source.MQTT) -> list[Dispatched]:
        self.dispatcher.post(source, name, data or {})
        return self.dispatcher.run_until_idle()

    def advance(self, seconds: float) -> list[Dispatched]:
        return self.dispatcher.advance(seconds)

    def uncovered_outcomes(self) -> list[str]:
        """Effects whose issuing state lacks a transition for one of their possible outcomes."""
        missing = []
        for machine_name, state_id, effect in self.issued_in:
            if effect.reply is None:
                continue
            cls = type(self.dispatcher.machines[machine_name])
            state = next(s for s in cls.states if s.id == state_id)
            declared = {e.id for t in state.transitions for e in t.events}
            outcomes = ["succeeded", "failed", "cancelled"] + (["timed_out"] if effect.timeout_s else [])
            missing += [
                f"{machine_name}.{state_id}: {effect.reply}_{o}" for o in outcomes if f"{effect.reply}_{o}" not in declared
            ]
        return sorted(set(missing))

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
