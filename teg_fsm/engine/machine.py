"""What every gateway machine shares: outbox, transition log, resume data.

A machine is a python-statemachine ``StateChart`` driven only through
``handle(event)``, which returns the transitions the event caused and the
effect commands the machine issued. Machines read time from ``self.now_ms``
(the timestamp of the event being handled) and never from a clock.

Resume contract (Mender's StoreStateData / LoadStateFromDb): the engine stores
``state_name`` (the active atomic state, nested for a compound machine) and
``snapshot()`` after any step that changed them,
before handing out that step's effects. On start it re-enters
``resume_table[stored_state]``, calls ``restore(data)`` and sends the
``resumed`` event so the machine can re-issue the work of the state it is in.
A non-resting state found at start more than ``max_resumes`` times in a row is a
crash loop: the machine is re-entered in ``crash_loop_state`` instead.

Containment contract: a step that raises is dropped whole (no effects, the
state restored) and the machine is moved to ``error_state`` when it declares
one; the engine journals the failure and carries on with the next event.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableSet
from typing import Any, ClassVar

import cattrs
from statemachine import State, StateChart
from statemachine.orderedset import OrderedSet

from teg_fsm.engine.effects import Effect
from teg_fsm.engine.events import Event

_settings_converter = cattrs.Converter(forbid_extra_keys=True)


class NoSettings:
    """Settings type of a machine that needs none."""


class _TransitionRecorder:
    """Listener that logs each transition the library takes into the machine's transition log.

    ``after_transition`` runs for every transition, internal self-transitions
    included, once the machine is in the target, so the entry names the
    active atomic states before and after (a compound machine's nested states,
    not the compound state a transition may be declared on).
    """

    def __init__(self, machine: GatewayMachine) -> None:
        self._machine = machine
        self._source = ""

    def start(self, source: str) -> None:
        self._source = source

    def after_transition(self, event: str) -> None:
        target = self._machine.state_name
        self._machine.transition_log.append((self._source, target, str(event)))
        self._source = target


class GatewayMachine(StateChart):
    """Base of the gateway's machines."""

    catch_errors_as_events = False
    allow_event_without_transition = True
    # An internal transition (``s.to.itself(internal=True)``) runs no exit/entry
    # actions: the gateway's bookkeeping events rely on it.
    enable_self_transition_entries = False
    # Transition actions (before/on, and exit) see the source state, entry and
    # after actions the target: one configuration update between the two, as
    # the library's classic StateMachine does (the SCXML default leaves the
    # machine in no state while ``on_<event>`` runs, and actions such as the
    # uplink's planning compare the work with the current state).
    atomic_configuration_update = True

    machine_name: ClassVar[str] = ""
    settings_type: ClassVar[type] = NoSettings
    resume_table: ClassVar[dict[str, str]] = {}
    rest_states: ClassVar[frozenset[str]] = frozenset()
    crash_loop_state: ClassVar[str | None] = None
    max_resumes: ClassVar[int] = 3
    # Where the engine puts the machine when one of its steps raises; None keeps
    # it in the state it was in (the failed step is dropped whole either way).
    error_state: ClassVar[str | None] = None

    def __init__(self, settings: Mapping[str, Any] | None = None, *, start_value: str | None = None) -> None:
        self.settings = self.structure_settings(settings)
        self.outbox: list[Effect] = []
        self.transition_log: list[tuple[str, str, str]] = []
        self.now_ms = 0
        self.dirty = False
        self.setup()
        self._recorder = _TransitionRecorder(self)
        super().__init__(start_value=start_value, listeners=[self._recorder])
        self._event_names = {
            state.value: self._declared_event_names(state) for state in self.states_map.values() if state.is_atomic
        }

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
        """Run ``ev`` through the library's ``send``; return the transitions taken and the effects issued.

        Every transition is logged as (state before, state after, event), the
        states being the active atomic states (for a compound machine, the
        nested state; what ``state_name`` and the checkpoints say), internal
        self-transitions included. A step that raises leaves the state as
        the library restored it (before the failed transition; a failing
        ``after`` action runs once the machine is in the target) and its
        effects in the outbox, for the dispatcher to drop.
        """
        self.now_ms = ev.ts_ms
        if self._may_take(ev.name):
            self._recorder.start(self.state_name)
            self.send(ev.name, ev=ev)
        return self.take_transitions(), self.take_effects()

    def _may_take(self, event_name: str) -> bool:
        """False only when no active state declares ``event_name`` (so ``send`` would do nothing).

        Why: many events the dispatcher delivers find no transition in the
        machine's current state (broadcasts, outcomes that arrive late), and
        skipping ``send`` for them keeps a no-op cheap. It also keeps an event
        whose name happens to be a method of the machine (``send`` looks the
        name up as an attribute) from reaching the library at all.
        """
        names = self._event_names[self._leaf_value()]
        return names is None or "." in event_name or event_name in names

    @classmethod
    def _declared_event_names(cls, state: State) -> frozenset[str] | None:
        """Names of the events ``state`` or an ancestor has transitions for; None if one is a pattern."""
        names: set[str] = set()
        for holder in (state, *state.ancestors()):
            names.update(str(e) for e in holder.transitions.unique_events)
        if any("*" in name or "." in name for name in names):
            return None
        return frozenset(names)

    def take_effects(self) -> list[Effect]:
        if not self.outbox:
            return []
        effects = self.outbox[:]
        self.outbox.clear()
        return effects

    def take_transitions(self) -> list[tuple[str, str, str]]:
        if not self.transition_log:
            return []
        transitions = self.transition_log[:]
        self.transition_log.clear()
        return transitions

    @property
    def state_name(self) -> str:
        """The active atomic state's value: what checkpoints store and transitions name."""
        return str(self._leaf_value())

    def _leaf_value(self) -> Any:
        value = self.current_state_value
        if not isinstance(value, MutableSet):
            return value
        # A compound machine's configuration holds the nested state and its ancestors.
        leaves = [state.value for state in self.configuration if state.is_atomic]
        if len(leaves) != 1:
            raise ValueError(f"{type(self).__name__}: parallel states are not supported ({leaves})")
        return leaves[0]

    def place(self, state_value: str) -> None:
        """Put the machine in ``state_value`` without running any action (the engine's error_state).

        The configuration is the state with its ancestors; a compound state
        is placed in its initial descendant.
        """
        state = self.states_map[state_value]
        while state.is_compound:
            state = next(t.target for t in state.transitions if t.initial)
        chain = [*reversed(list(state.ancestors())), state]
        self.current_state_value = OrderedSet(s.value for s in chain) if len(chain) > 1 else state.value

    def snapshot(self) -> dict[str, Any]:
        """The data needed to resume; JSON-able."""
        return {}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back what ``snapshot`` returned, after a restart."""

    def can_take(self, event_name: str) -> bool:
        """True when ``event_name`` has a transition out of the current state."""
        return any(e.id == event_name for e in self.allowed_events)
