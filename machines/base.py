"""What every gateway machine shares: outbox, transition log, resume data.

A machine is a python-statemachine ``StateChart`` driven only through
``handle(event)``, which returns the transitions the event caused and the
effect commands the machine issued. Machines read time from ``self.now_ms``
(the timestamp of the event being handled) and never from a clock.

Resume contract (Mender's StoreStateData / LoadStateFromDb): the engine stores
``current_state_value`` and ``snapshot()`` after any step that changed them,
before handing out that step's effects. On start it re-enters
``resume_table[stored_state]``, calls ``restore(data)`` and sends the
``resumed`` event so the machine can re-issue the work of the state it is in.
A non-resting state found at start more than ``max_resumes`` times in a row is a
crash loop: the machine is re-entered in ``crash_loop_state`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import cattrs
from statemachine import StateChart

from teg_fsm.effects import Effect
from teg_fsm.events import Event

_settings_converter = cattrs.Converter(forbid_extra_keys=True)


class NoSettings:
    """Settings type of a machine that needs none."""


class GatewayMachine(StateChart):
    """Base of the gateway's machines."""

    catch_errors_as_events = False
    allow_event_without_transition = True

    machine_name: ClassVar[str] = ""
    settings_type: ClassVar[type] = NoSettings
    resume_table: ClassVar[dict[str, str]] = {}
    rest_states: ClassVar[frozenset[str]] = frozenset()
    crash_loop_state: ClassVar[str | None] = None
    max_resumes: ClassVar[int] = 3

    def __init__(self, settings: Mapping[str, Any] | None = None, *, start_value: str | None = None) -> None:
        self.settings = self.structure_settings(settings)
        self.outbox: list[Effect] = []
        self.transition_log: list[tuple[str, str, str]] = []
        self.now_ms = 0
        self.dirty = False
        self.setup()
        super().__init__(start_value=start_value)

    @classmethod
    def structure_settings(cls, settings: Mapping[str, Any] | None) -> Any:
        if cls.settings_type is NoSettings:
            return NoSettings()
        return _settings_converter.structure(dict(settings or {}), cls.settings_type)

    def unstructured_settings(self) -> dict[str, Any]:
        if isinstance(self.settings, NoSettings):
            return {}
        return _settings_converter.unstructure(self.settings)

    def setup(self) -> None:
        """Initialise the machine's own data (called before the initial state is entered)."""

    @classmethod
    def takes(cls) -> frozenset[str]:
        """Names of the events this machine declares transitions for."""
        return frozenset(event.id for event in cls.events)

    def emit(self, *effects: Effect) -> None:
        self.outbox.extend(effects)

    def mark_dirty(self) -> None:
        """Say that resume data changed without a state change, so it gets checkpointed."""
        self.dirty = True

    def handle(self, ev: Event) -> tuple[list[tuple[str, str, str]], list[Effect]]:
        self.now_ms = ev.ts_ms
        self.send(ev.name, ev=ev)
        return self.take_transitions(), self.take_effects()

    def take_effects(self) -> list[Effect]:
        effects, self.outbox = self.outbox, []
        return effects

    def take_transitions(self) -> list[tuple[str, str, str]]:
        transitions, self.transition_log = self.transition_log, []
        return transitions

    def after_transition(self, event: Any, source: Any, target: Any) -> None:
        if source is not None and target is not None:
            self.transition_log.append((source.id, target.id, str(event)))

    @property
    def state_name(self) -> str:
        return str(self.current_state_value)

    def snapshot(self) -> dict[str, Any]:
        """The data needed to resume; JSON-able."""
        return {}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back what ``snapshot`` returned, after a restart."""

    def can_take(self, event_name: str) -> bool:
        """True when ``event_name`` has a transition out of the current state."""
        return any(e.id == event_name for e in self.allowed_events)
