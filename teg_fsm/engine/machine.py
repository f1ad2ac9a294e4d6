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

Containment contract: a step that raises is dropped whole (no effects, the
state restored) and the machine is moved to ``error_state`` when it declares
one; the engine journals the failure and carries on with the next event.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableSet
from typing import Any, ClassVar

import cattrs
from statemachine import StateChart

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
    # "internal" means no exit/entry, as the microstep runs it (the library re-enters by default).
    enable_self_transition_entries = False

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
        # Flat machines log their own microstep; the others log what ``send`` takes.
        self._recorder = None if self._is_flat() else _TransitionRecorder(self)
        super().__init__(start_value=start_value, listeners=[self._recorder] if self._recorder else [])

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
        if self._flat:
            self._microstep(ev)
        elif self._recorder is not None:
            self._recorder.start(self.state_name)
            self.send(ev.name, ev=ev)
        return self.take_transitions(), self.take_effects()

    # -- the flat-machine microstep ---------------------------------------
    # Why: the library's SCXML processing loop (queues, macrosteps, eventless
    # transitions) costs ~200 us per event, ten times the gateway's budget. A
    # flat machine needs exactly one microstep: pick the first enabled
    # transition of the active state, then before -> exit -> on -> enter ->
    # after. This runs that step on the library's own resolved callbacks
    # (same keys, same argument injection), so declarations, conventions and
    # diagrams stay the library's; tests/engine/test_microstep.py checks it
    # against ``send`` on every machine.

    @property
    def _flat(self) -> bool:
        return type(self)._is_flat()

    @classmethod
    def _is_flat(cls) -> bool:
        flat = cls.__dict__.get("_flat_cache")
        if flat is None:
            flat = all(s.is_atomic and s.parent is None and not s.final for s in cls.states_map.values())
            flat = flat and not any(t.is_eventless for s in cls.states for t in s.transitions)
            cls._flat_cache = flat
        return flat

    @classmethod
    def _candidates(cls, state_id: str, event_name: str) -> list[Any]:
        table = cls.__dict__.get("_candidates_cache")
        if table is None:
            table = {}
            cls._candidates_cache = table
        key = (state_id, event_name)
        if key not in table:
            state = cls.states_map[state_id]
            table[key] = [t for t in state.transitions if not t.initial and t.match(event_name)]
        return table[key]

    def _microstep(self, ev: Event) -> None:
        state = self.states_map[self.current_state_value]
        candidates = self._candidates(state.id, ev.name)
        if not candidates:
            return
        callbacks = self._callbacks
        kwargs = {"ev": ev, "machine": self, "model": self.model, "event": self._event_objects()[ev.name],
                  "event_data": None, "state": state, "source": state}
        for transition in candidates:
            kwargs["transition"] = transition
            kwargs["target"] = transition.target
            validators, cond = transition.validators.key, transition.cond.key
            if validators in callbacks:
                callbacks.call(validators, **kwargs)
            if cond not in callbacks or callbacks.all(cond, **kwargs):
                self._take(transition, state, kwargs)
                return

    def _take(self, transition: Any, state: Any, kwargs: dict[str, Any]) -> None:
        callbacks = self._callbacks
        target = transition.target
        previous = self.current_state_value
        internal = transition.internal
        try:
            for key in (transition.before.key, None if internal else state.exit.key, transition.on.key):
                if key in callbacks:
                    callbacks.call(key, **kwargs)
            if not internal:
                self.current_state_value = target.value
                kwargs["state"] = target
                if target.enter.key in callbacks:
                    callbacks.call(target.enter.key, **kwargs)
        except Exception:
            self.current_state_value = previous
            raise
        self.transition_log.append((state.id, target.id, kwargs["event"].id))
        kwargs["state"] = target
        if transition.after.key in callbacks:
            callbacks.call(transition.after.key, **kwargs)

    def _event_objects(self) -> dict[str, Any]:
        cls = type(self)
        table = cls.__dict__.get("_event_objects_cache")
        if table is None:
            table = {e.id: e for e in self.events}
            cls._event_objects_cache = table
        return table

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

    def snapshot(self) -> dict[str, Any]:
        """The data needed to resume; JSON-able."""
        return {}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back what ``snapshot`` returned, after a restart."""

    def can_take(self, event_name: str) -> bool:
        """True when ``event_name`` has a transition out of the current state."""
        return any(e.id == event_name for e in self.allowed_events)
