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

At ``gateway_started`` every machine's state after that event is reported as
telemetry (a timeline must restart where the process restarted, a resumed
machine included). After every ``mqtt_connected`` the current states of all
machines are said as attributes, so a ThingsBoard that lost or never had them
is told the present.

Bound, in packets: ThingsBoard charges every telemetry or attribute message
to the same per-device budget as the controller's rows, and the uplink spends
that budget to the last token during a drain (PROTOCOL.md §6.3: a message over
the limit closes the session). So the reporter adds few messages:

- telemetry points are collected and said at most once per second (one JSON
  array, one outbox row, one packet), so the dozen moves around a connect are
  one message, not a dozen;
- attribute changes are said at once when the last attributes went out at
  least ``interval_ms`` ago, else merged and said when that interval has
  passed (the fleet view lags by at most one interval; on connect all of them
  go out at once anyway);
- some machines move with the traffic: the uplink goes idle -> draining ->
  idle for every batch it sends, dozens of times a second during a drain.
  Such machines are *coalesced*: a move is reported at once when the
  machine's last report is at least ``interval_ms`` old; otherwise it is held,
  a later move replaces it, and the held one goes out (with its own ``ts``)
  when the interval has passed. Their timeline is exact at that resolution
  (the state at the end of each window) and costs at most one point per
  interval. Machines whose moves are decisions (connection, provisioning,
  OTA, controller, file sync, RPC, health) are never coalesced.

Held reports live in memory: telemetry until the first idle moment a second
after the last batch (the idle hook runs at least every watchdog interval,
5 s by default), attributes and coalesced moves for an interval (the next
connect repeats the attributes); from
``gateway_stopping`` on, everything is said at once, so a clean stop loses
nothing. A crash loses what is held (the state points of the last seconds);
the journal, committed whenever the dispatcher idles, still has them.
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
TELEMETRY_BATCH_MS = 1000
CONNECTED = "mqtt_connected"
STOPPING = "gateway_stopping"
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
                 batch_ms: int = TELEMETRY_BATCH_MS, coalesced: frozenset[str] = COALESCED_MACHINES) -> None:
        self._say = say
        self._states = states
        self.interval_ms = interval_ms
        self.batch_ms = batch_ms
        self.coalesced = coalesced
        self._points: list[tuple[int, str, str]] = []  # telemetry not yet said
        self._points_said_ms: int | None = None
        self._attributes: dict[str, str] = {}  # attribute changes not yet said
        self._attributes_said_ms: int | None = None
        self._last_report_ms: dict[str, int] = {}  # coalesced machines: when their last point was taken
        self._reported: dict[str, str] = {}  # the state last reported per machine
        self._held: dict[str, tuple[int, str]] = {}  # coalesced moves waiting for their window
        self._at_once = False  # stopping: nothing is held any more

    def observe(self, dispatched: Dispatched) -> None:
        event = dispatched.event
        now = event.ts_ms
        if event.name == STARTED and event.source == Source.SYSTEM.value:
            for machine, state in self._states().items():
                self._take(now, machine, state, now)
            self._attributes.clear()  # nothing reaches ThingsBoard before a connect, which says them all
        else:
            for t in dispatched.transitions:
                if t.source == t.target:
                    continue
                if t.machine in self.coalesced and not self._passed(self._last_report_ms.get(t.machine), now):
                    self._held[t.machine] = (now, t.target)
                    continue
                self._held.pop(t.machine, None)
                self._take(now, t.machine, t.target, now)
        if event.name == STOPPING:
            self._at_once = True
        if event.name == CONNECTED:
            # Coalesced machines as last reported: a held move is not told before its point.
            current = {**self._states(), **{m: s for m, s in self._reported.items() if m in self.coalesced}}
            self._attributes.update(current)
            self._attributes_said_ms = None
        self.flush(now)

    def flush(self, now_ms: int) -> float | None:
        """Say what is due (the dispatcher's idle hook calls this too).

        Returns the seconds until something held becomes due (None: nothing is held)."""
        for machine, (ts, state) in list(self._held.items()):
            if self._passed(self._last_report_ms.get(machine), now_ms):
                del self._held[machine]
                if self._reported.get(machine) != state:  # back where its last report left it: nothing new
                    self._take(ts, machine, state, now_ms)
        if self._points and (self._at_once or self._passed(self._points_said_ms, now_ms, self.batch_ms)):
            elements = [{"ts": ts, "values": {state_key(m): s}} for ts, m, s in self._points]
            self._say(TELEMETRY_TOPIC, json.dumps(elements), now_ms)
            self._points, self._points_said_ms = [], now_ms
        if self._attributes and (self._at_once or self._passed(self._attributes_said_ms, now_ms)):
            values = {attribute_key(m): s for m, s in sorted(self._attributes.items())}
            self._say(ATTRIBUTES_TOPIC, json.dumps(values), now_ms)
            self._attributes, self._attributes_said_ms = {}, now_ms
        return self._due_in_s(now_ms)

    def _due_in_s(self, now_ms: int) -> float | None:
        dues = [self._due_ms(self._last_report_ms.get(machine)) for machine in self._held]
        if self._points:
            dues.append(self._due_ms(self._points_said_ms, self.batch_ms))
        if self._attributes:
            dues.append(self._due_ms(self._attributes_said_ms))
        return max(0.0, (min(dues) - now_ms) / 1000) if dues else None

    def _due_ms(self, since_ms: int | None, interval_ms: int | None = None) -> int:
        if since_ms is None or self._at_once:
            return 0
        return since_ms + (self.interval_ms if interval_ms is None else interval_ms)

    # -- inside -------------------------------------------------------------

    def _passed(self, since_ms: int | None, now_ms: int, interval_ms: int | None = None) -> bool:
        return since_ms is None or now_ms - since_ms >= (self.interval_ms if interval_ms is None else interval_ms)

    def _take(self, ts: int, machine: str, state: str, now_ms: int) -> None:
        self._points.append((ts, machine, state))
        self._reported[machine] = self._attributes[machine] = state
        if machine in self.coalesced:
            self._last_report_ms[machine] = now_ms
