"""Machine states in ThingsBoard: every state change as telemetry, the current states as client attributes.

Theory of operation
-------------------
The reporter is a dispatcher observer: it runs in the dispatcher thread after
each event was journaled and its effects handed out, and sees the
transitions the event caused. Machines know nothing of it (they stay pure;
what they did is already in ``Dispatched``). Everything it says goes through
the durable outbox (``teg_fsm.adapters.outbox``): stored before it is sent,
deleted on PUBACK, sent within the rate limits the outbox keeps, so a state
change made offline reaches ThingsBoard after the next connect.

Keys (docs in tools/thingsboard/README.md):

- telemetry ``fsm_<machine>_state``: the state a machine entered, stamped with
  the ``ts`` of the event that moved it (one key per machine, so ThingsBoard's
  State chart draws one timeline per machine from string values). The outbox
  keeps ``ts`` strictly increasing per key: two moves of one machine in one
  millisecond are 1 ms apart.
- client attribute ``fsm_<machine>``: the machine's current state (the last
  value reported), for attribute cards and entity tables of a fleet.

What counts as a transition: a move to another state (``source != target``),
including a failed step's move to its safe state. Internal self-transitions
are bookkeeping (a packet acknowledged, a report settled) and change nothing
a timeline shows.

At ``gateway_started`` every machine's state after that event is reported, as
telemetry (a timeline must restart where the process restarted, a resumed
machine included) and as attributes. After every ``mqtt_connected`` the
current states are said again as attributes, so a ThingsBoard that lost or
never had them is told the present.

Bound: some machines move with the traffic. The uplink goes idle -> draining
-> idle for every batch it sends, dozens of times a second during a drain;
reported one by one that would be a data point per packet, charged to the
same ThingsBoard rate budget as the controller's rows. Such machines are
*coalesced*: a move is reported at once when the machine's last report is at
least ``interval_ms`` old; otherwise it is held, a later move replaces it,
and the held one goes out (with its own ``ts``) when the interval has passed.
The timeline is exact at that resolution (the state at the end of each
window) and costs at most one point per machine per interval. Machines whose
moves are decisions (connection, provisioning, OTA, controller, file sync,
RPC, health) are never coalesced: every move is kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping

from teg_fsm.engine.dispatcher import Dispatched
from teg_fsm.engine.effects.mqtt import ATTRIBUTES_TOPIC, TELEMETRY_TOPIC
from teg_fsm.engine.events import STARTED, Source

log = logging.getLogger(__name__)

COALESCED_MACHINES = frozenset({"uplink"})
CONNECTED = "mqtt_connected"
Say = Callable[[str, str, int], None]  # topic, payload, event time in ms


def state_key(machine: str) -> str:
    """The telemetry key of a machine's state timeline."""
    return f"fsm_{machine}_state"


def attribute_key(machine: str) -> str:
    """The client attribute carrying a machine's current state."""
    return f"fsm_{machine}"


class StateReporter:
    """Turns dispatched transitions into outbox reports (dispatcher thread only)."""

    def __init__(self, say: Say, states: Callable[[], Mapping[str, str]], *, interval_ms: int,
                 coalesced: frozenset[str] = COALESCED_MACHINES) -> None:
        self._say = say
        self._states = states
        self.interval_ms = interval_ms
        self.coalesced = coalesced
        self._last_report_ms: dict[str, int] = {}  # coalesced machines: ts of the last point sent
        self._reported: dict[str, str] = {}  # the state last sent per machine
        self._held: dict[str, tuple[int, str]] = {}  # coalesced moves waiting for their window

    def observe(self, dispatched: Dispatched) -> None:
        event = dispatched.event
        if event.name == STARTED and event.source == Source.SYSTEM.value:
            self._report(event.ts_ms, [(event.ts_ms, m, s) for m, s in self._states().items()])
            return
        points: list[tuple[int, str, str]] = []
        for t in dispatched.transitions:
            if t.source == t.target:
                continue
            if t.machine in self.coalesced and not self._window_passed(t.machine, event.ts_ms):
                self._held[t.machine] = (event.ts_ms, t.target)
                continue
            self._held.pop(t.machine, None)
            points.append((event.ts_ms, t.machine, t.target))
        points.extend(self._due(event.ts_ms))
        self._report(event.ts_ms, points)
        if event.name == CONNECTED:
            self._say_attributes({**self._states(), **self._reported_coalesced()}, event.ts_ms)

    def flush(self, now_ms: int) -> None:
        """Send held moves whose window has passed (the dispatcher's idle hook calls this)."""
        self._report(now_ms, self._due(now_ms))

    # -- inside -------------------------------------------------------------

    def _window_passed(self, machine: str, ts_ms: int) -> bool:
        last = self._last_report_ms.get(machine)
        return last is None or ts_ms - last >= self.interval_ms

    def _due(self, now_ms: int) -> list[tuple[int, str, str]]:
        due = [(ts, m, s) for m, (ts, s) in self._held.items() if self._window_passed(m, now_ms)]
        for _, machine, _ in due:
            del self._held[machine]
        # A machine back where its last report left it has nothing new to show.
        return [p for p in due if self._reported.get(p[1]) != p[2]]

    def _reported_coalesced(self) -> dict[str, str]:
        """Coalesced machines are shown as last reported: a held move is not yet told."""
        return {m: s for m, s in self._reported.items() if m in self.coalesced}

    def _report(self, now_ms: int, points: list[tuple[int, str, str]]) -> None:
        if not points:
            return
        elements = [{"ts": ts, "values": {state_key(machine): state}} for ts, machine, state in points]
        self._say(TELEMETRY_TOPIC, json.dumps(elements), now_ms)
        current: dict[str, str] = {}
        for ts, machine, state in points:
            self._reported[machine] = current[machine] = state
            if machine in self.coalesced:
                self._last_report_ms[machine] = max(ts, now_ms)
        self._say_attributes(current, now_ms)

    def _say_attributes(self, states: Mapping[str, str], now_ms: int) -> None:
        if states:
            self._say(ATTRIBUTES_TOPIC, json.dumps({attribute_key(m): s for m, s in sorted(states.items())}), now_ms)
