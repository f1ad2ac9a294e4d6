"""The uplink: drains the controller queue to ThingsBoard, acknowledged and throttled.

What it is for: rows the controller writes into its SQLite queue, and the
gateway's own log records, reach ThingsBoard as telemetry arrays (QoS 1), at
least once, in order, without ever tripping ThingsBoard's payload or rate
limits (a tripped limit closes the session: PROTOCOL.md §1.2, §6.3).

Two pipelines, decided by this machine (its last sections: the rate budget and
the planning) and carried out by the queue adapter:
- transfer: ``TransferRows`` moves a batch from ``messages`` to the archive and
  ``pending_mqtt_messages`` (one transaction), while pending is below its cap.
  Runs online and offline, one batch at a time.
- send: ``SendPacket`` publishes the next pending rows (or buffered log
  records) as one packet; the adapter deletes them after the PUBACK. Up to
  ``max_inflight`` packets are out at once; logs go first, one packet at a time.

Cost per packet: 1 telemetry message (also charged to ``messages`` to be safe
on servers that count it there) + one data point per key. The buckets of
``teg_fsm.engine.rate_limits`` are spent when a packet leaves; a packet reserves
points and gets the unused ones back with its PUBACK.

States: ``offline`` (no session; sending paused), ``idle`` (online, nothing to
send), ``draining`` (packets in flight), ``throttled`` (work waiting for
tokens, or a pause after a failed packet; timer ``hold_elapsed`` ends it).
Bookkeeping events are internal self-transitions; each one re-plans, and when
the state no longer matches the work the machine raises ``work_changed`` on
the library's internal queue, whose guarded transitions pick the state within
the same step (same macrostep, so no second dispatched event, journal row or
wake-up: a controller window is three events, not five).

Events taken: ``mqtt_connected`` {session, receive_maximum?}, ``mqtt_disconnected``, ``session_limits_received``,
``rows_waiting`` (adapter: the controller queue changed), ``logs_waiting``
{top}, ``pending_refilled`` {top} (archive republish), outcomes of
``transfer`` / ``data_packet`` / ``log_packet``, timers ``hold_elapsed`` and
``transfer_retry_elapsed``, ``work_changed`` (raised by itself inside a step;
one arriving from outside, as in journals recorded before, re-checks the state),
``gateway_stopping`` (start nothing new; the component waits for the packets in flight).
Effects: ``TransferRows``, ``SendPacket``, ``StartTimer``/``CancelTimer``, ``Log``,
``Disconnect`` (a stuck session), ``Publish`` (its report).

A stuck session is a broken session: a packet without PUBACK after
``packet_timeout_s`` (``TEG_UPLINK_PUBACK_TIMEOUT_S``, 10 s) while the session
is up makes the machine drop the session (``Disconnect``); the connection
machine reconnects and the unacknowledged rows go out again (duplicates
bounded by the packets in flight, nothing lost). The bound doubles after each
such drop (up to ``stall_timeout_max_s``), so a server that is merely slow is
not reconnected to in a loop, and returns to its setting after 100 packets
acknowledged in time. The drop is logged and, once reconnected, reported as
gateway telemetry (``uplink_stuck_sessions``, ``uplink_puback_wait_s``).

A packet ThingsBoard refuses (MQTT 5 PUBACK >= 0x80: its outcome is a failure
carrying ``refused``) is not lost: the adapter has moved its rows to the dead
letters, so the machine logs ThingsBoard's reason and goes on draining, as
after an acknowledgement. A ``receive_maximum`` in ``mqtt_connected`` (MQTT 5
CONNACK) caps the in-flight window for that session.

A transfer result with ``reopened`` (the controller replaced the queue file)
starts the data stream afresh: pending ids now name other rows.

Persistence: nothing but the state; every row lives in SQLite, so a restart
re-enters ``offline`` and, once connected, sends again from the oldest pending
row (rows sent but not acknowledged before a crash go out twice, never zero
times). Rate buckets restart empty: we cannot know what the last run spent.
Outcomes of packets issued before the current session (effect id
``uplink:<seq>:<n>`` with seq below the session's first event) are stale and
ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from statemachine import State

from teg_fsm.engine.effects import CancelTimer, Log, StartTimer
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC, Disconnect, Publish
from teg_fsm.engine.effects.uplink import DATA, LOGS, SendPacket, TransferRows
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.rate_limits import TokenBuckets
from teg_fsm.machines.uplink_rules import PACKET_OVERHEAD, Stream, UplinkSettings, loops


class UplinkMachine(GatewayMachine):
    """Controller queue and gateway logs -> ThingsBoard telemetry.

    The table, then its data, guards and event handlers, then the rate budget
    and the planning the handlers call. ``UplinkSettings``, ``Stream`` and the
    table helper ``loops`` are in ``machines/uplink_rules.py``.
    """

    machine_name = "uplink"
    settings_type = UplinkSettings
    resume_table = {"offline": "offline", "idle": "offline", "draining": "offline", "throttled": "offline"}
    rest_states = frozenset({"offline", "idle", "draining", "throttled"})

    offline = State(initial=True)
    idle = State()
    draining = State()
    throttled = State()

    mqtt_connected = offline.to(idle)
    mqtt_disconnected = idle.to(offline) | draining.to(offline) | throttled.to(offline)
    work_changed = (
        idle.to(draining, cond="is_draining") | idle.to(throttled, cond="is_throttled")
        | draining.to(idle, cond="is_idle") | draining.to(throttled, cond="is_throttled")
        | throttled.to(draining, cond="is_draining") | throttled.to(idle, cond="is_idle")
        | loops(offline, idle, draining, throttled)  # already where the work says
    )
    session_limits_received = loops(offline, idle, draining, throttled)
    gateway_stopping = loops(offline, idle, draining, throttled)
    rows_waiting = loops(offline, idle, draining, throttled)
    logs_waiting = loops(offline, idle, draining, throttled)
    pending_refilled = loops(offline, idle, draining, throttled)
    hold_elapsed = loops(idle, draining, throttled)
    transfer_retry_elapsed = loops(offline, idle, draining, throttled)
    transfer_succeeded = loops(offline, idle, draining, throttled)
    transfer_failed = loops(offline, idle, draining, throttled)
    transfer_timed_out = loops(offline, idle, draining, throttled)
    transfer_cancelled = loops(offline, idle, draining, throttled)  # only at shutdown
    # Packets exist only online; in offline their outcomes are stale and dropped.
    data_packet_succeeded = loops(offline, idle, draining, throttled)
    data_packet_failed = loops(offline, idle, draining, throttled)
    data_packet_timed_out = loops(offline, idle, draining, throttled)
    data_packet_cancelled = loops(offline, idle, draining, throttled)
    log_packet_succeeded = loops(offline, idle, draining, throttled)
    log_packet_failed = loops(offline, idle, draining, throttled)
    log_packet_timed_out = loops(offline, idle, draining, throttled)
    log_packet_cancelled = loops(offline, idle, draining, throttled)

    # -- data ---------------------------------------------------------------

    def setup(self) -> None:
        s = self.settings
        self.data = Stream("data_packet")
        self.logs = Stream("log_packet", restart=True)
        self.connected = False
        self.settle_pending = False
        self.session_seq = 0
        self.rows_maybe_waiting = True
        self.transfer_in_flight = False
        self.transfer_held = False
        self.pending_rows = 0
        self.pending_full = False
        self.holding = False
        self.need_points = 0
        self.points_per_byte: float | None = None
        self.rows_per_packet = 0
        self.max_payload_size = s.max_payload_size
        self.session_inflight: int | None = None
        self.receive_maximum: int | None = None  # MQTT 5: the server's bound on publishes in flight
        self.stopping = False
        self.data_epoch_seq = 0  # data packets issued before it belong to a replaced queue file
        self.stall_timeout_s = s.packet_timeout_s
        self.acks_since_stall = 0
        self.stuck_sessions = 0
        self.dropped_session_seq = -1
        self.dropped_at_ms = 0
        self.stall_report: dict[str, Any] | None = None
        self._set_limits(s.rate_messages, s.rate_telemetry_messages, s.rate_data_points, 0)

    # -- guards ---------------------------------------------------------------

    def is_idle(self) -> bool:
        """Nothing held back and no packet in flight."""
        return not self.holding and self._in_flight() == 0

    def is_draining(self) -> bool:
        """Nothing held back and packets in flight."""
        return not self.holding and self._in_flight() > 0

    def is_throttled(self) -> bool:
        """Sending is held back (waiting for rate tokens, or pausing after a failed packet)."""
        return self.holding

    def on_work_changed(self) -> None:
        self.settle_pending = False

    # -- session --------------------------------------------------------------

    def on_mqtt_connected(self, ev: Event) -> None:
        self.connected = True
        maximum = ev.data.get("receive_maximum")
        self.receive_maximum = int(maximum) if maximum else None
        self._new_session(ev)
        if self.stall_report is not None:
            values, self.stall_report = self.stall_report, None
            self.emit(Publish(topic=TELEMETRY_TOPIC, payload=json.dumps({"ts": self.now_ms, "values": values})))
        self._plan()

    def on_mqtt_disconnected(self, ev: Event) -> None:
        self.connected = False
        self._new_session(ev)
        if self.holding:
            self.holding = False
            self.emit(CancelTimer(name="hold_elapsed"))

    def _new_session(self, ev: Event) -> None:
        """Everything in flight belongs to the old session; send again from the oldest row."""
        self.session_seq = ev.seq
        for stream in (self.data, self.logs):
            stream.in_flight, stream.sent_top, stream.restart = 0, 0, True

    def on_session_limits_received(self, ev: Event) -> None:
        self._take_session_limits(ev.data)
        self._plan()

    # -- transfer -------------------------------------------------------------

    def on_rows_waiting(self) -> None:
        self.rows_maybe_waiting = True
        self._plan()

    def on_transfer_succeeded(self, ev: Event) -> None:
        result = ev.data.get("result") or {}
        self.transfer_in_flight = False
        self.rows_maybe_waiting = bool(result.get("more") or result.get("full"))
        self.pending_rows = int(result.get("pending_rows", self.pending_rows))
        full = bool(result.get("full"))
        if full and not self.pending_full:
            self.emit(Log(level="WARNING", message=(
                f"pending buffer full ({self.pending_rows} rows): new controller rows wait in its queue")))
        self.pending_full = full
        if result.get("reopened"):
            self._new_data_epoch(ev)
        if result.get("moved"):
            self.data.known_top = max(self.data.known_top or 0, int(result.get("pending_top", 0)))
        self._plan()

    def _new_data_epoch(self, ev: Event) -> None:
        """The queue file was reopened: forget what the data stream knew, send from its oldest row."""
        self.data_epoch_seq = ev.seq
        self.data.in_flight, self.data.sent_top, self.data.known_top, self.data.restart = 0, 0, None, True

    def on_transfer_failed(self, ev: Event) -> None:
        self._transfer_ended_badly(ev, "failed")

    def on_transfer_timed_out(self, ev: Event) -> None:
        self._transfer_ended_badly(ev, "timed out")

    def _transfer_ended_badly(self, ev: Event, how: str) -> None:
        self.transfer_in_flight = False
        self.transfer_held = True
        self.emit(
            Log(level="ERROR", message=f"moving controller rows {how}: {ev.data.get('error')}; retrying"),
            StartTimer(name="transfer_retry_elapsed", seconds=self.settings.transfer_retry_s),
        )
        self._plan()

    def on_transfer_cancelled(self) -> None:
        self.transfer_in_flight = False

    def on_transfer_retry_elapsed(self) -> None:
        self.transfer_held = False
        self._plan()

    def on_pending_refilled(self, ev: Event) -> None:
        self.data.known_top = max(self.data.known_top or 0, int(ev.data.get("top", 0)))
        self._plan()

    def on_logs_waiting(self, ev: Event) -> None:
        self.logs.known_top = max(self.logs.known_top or 0, int(ev.data.get("top", 0)))
        self._plan()

    # -- packets --------------------------------------------------------------

    def on_data_packet_succeeded(self, ev: Event) -> None:
        self._packet_acked(self.data, ev)

    def on_log_packet_succeeded(self, ev: Event) -> None:
        self._packet_acked(self.logs, ev)

    def on_data_packet_failed(self, ev: Event) -> None:
        self._packet_lost(self.data, ev, "failed")

    def on_data_packet_timed_out(self, ev: Event) -> None:
        self._packet_stuck(self.data, ev)

    def on_data_packet_cancelled(self, ev: Event) -> None:
        self._packet_lost(self.data, ev, None)

    def on_log_packet_failed(self, ev: Event) -> None:
        self._packet_lost(self.logs, ev, "failed")

    def on_log_packet_timed_out(self, ev: Event) -> None:
        self._packet_stuck(self.logs, ev)

    def on_log_packet_cancelled(self, ev: Event) -> None:
        self._packet_lost(self.logs, ev, None)

    def _stale(self, ev: Event, stream: Stream) -> bool:
        """True for outcomes of packets sent before the current session (or queue file) began."""
        try:
            issued_at = int(str(ev.data.get("effect_id", "")).split(":")[1])
        except (IndexError, ValueError):
            return True
        epoch = max(self.session_seq, self.data_epoch_seq) if stream is self.data else self.session_seq
        return not self.connected or issued_at < epoch

    def _packet_acked(self, stream: Stream, ev: Event) -> None:
        if self._stale(ev, stream):
            return
        r = ev.data.get("result") or {}
        stream.in_flight -= 1
        self.acks_since_stall += 1
        if self.acks_since_stall >= 100:
            self.stall_timeout_s = self.settings.packet_timeout_s
        if r.get("rows") and stream is self.data:
            self.pending_rows = max(0, self.pending_rows - r["rows"])
            self.rows_per_packet = max(self.rows_per_packet, int(r["rows"]))
        self._settle_budget(r)
        top = int(r.get("top") or 0)
        stream.sent_top = max(stream.sent_top, top)
        if not r.get("more"):
            stream.known_top = max(stream.known_top or 0, top)
        self._plan()

    def _packet_lost(self, stream: Stream, ev: Event, how: str | None) -> None:
        if self._stale(ev, stream):
            return
        if ev.data.get("refused") is not None:
            self._packet_refused(stream, ev)
            return
        stream.in_flight -= 1
        if how is None:  # cancelled: the gateway is stopping
            return
        # Its rows are still pending; the cursor goes back so they are sent again.
        stream.restart = True
        stream.sent_top = 0
        self.emit(Log(level="WARNING", message=f"telemetry packet {how}: {ev.data.get('error')}; sending again"))
        self._hold(self.settings.retry_s)
        self._plan()

    def _packet_refused(self, stream: Stream, ev: Event) -> None:
        """ThingsBoard turned the packet down: its rows are dead letters now, the drain goes on."""
        what = "telemetry packet" if stream is self.data else "gateway log packet"
        rows = (ev.data.get("result") or {}).get("rows")
        where = "moved to dead_letters" if stream is self.data else "dropped"
        self.emit(Log(level="WARNING", message=f"{what} {ev.data.get('error')}: its {rows} rows {where}"))
        self._packet_acked(stream, ev)

    def _packet_stuck(self, stream: Stream, ev: Event) -> None:
        """No PUBACK within the bound while the session is up: drop the session, not just the packet."""
        if self._stale(ev, stream):
            return
        stream.in_flight -= 1
        stream.restart, stream.sent_top = True, 0
        waited = self.stall_timeout_s
        if self.dropped_session_seq == self.session_seq and self.now_ms - self.dropped_at_ms < waited * 1000:
            return  # this session is already being dropped
        self.dropped_session_seq, self.dropped_at_ms = self.session_seq, self.now_ms
        self.stuck_sessions += 1
        self.stall_timeout_s = min(max(self.settings.stall_timeout_max_s, waited), waited * 2)
        self.acks_since_stall = 0
        self.stall_report = {"uplink_stuck_sessions": self.stuck_sessions, "uplink_puback_wait_s": waited}
        self.emit(
            Log(level="WARNING", message=(
                f"no PUBACK for {waited:g} s on a live session (stuck session #{self.stuck_sessions}): "
                "dropping it to reconnect; its unacknowledged rows go out again")),
            Disconnect(),
        )
        self._plan()

    # -- pause and shutdown ---------------------------------------------------

    def on_hold_elapsed(self) -> None:
        self.holding = False
        self._plan()

    def on_gateway_stopping(self) -> None:
        # Shutdown: start nothing new, so the packets in flight can get their
        # PUBACKs before the session closes (fewer rows sent twice).
        self.stopping = True

    # -- limits ---------------------------------------------------------------

    def _set_limits(self, messages: str, telemetry: str, points: str, now_ms: int) -> None:
        self.limits_spec = (messages, telemetry, points)
        self.messages = TokenBuckets(messages, now_ms)
        self.telemetry = TokenBuckets(telemetry, now_ms)
        self.points = TokenBuckets(points, now_ms)

    def _take_session_limits(self, data: Mapping[str, Any]) -> None:
        """Adopt the limits the server sent for this session (its rates only when they parse)."""
        s = self.settings
        rates = data.get("rateLimits") or {}
        spec = (
            rates.get("messages") or s.rate_messages,
            rates.get("telemetryMessages") or s.rate_telemetry_messages,
            rates.get("telemetryDataPoints") or s.rate_data_points,
        )
        if spec != self.limits_spec:
            try:
                self._set_limits(*spec, self.now_ms)
            except ValueError as exc:
                self.emit(Log(level="WARNING", message=f"ignoring session limits: {exc}"))
        size = data.get("maxPayloadSize")
        self.max_payload_size = min(s.max_payload_size, int(size)) if size else s.max_payload_size
        inflight = data.get("maxInflightMessages")
        # As ThingsBoard's SDK does: 80 % of what the server reports.
        self.session_inflight = max(1, int(inflight) * 8 // 10) if inflight else None

    def _settle_budget(self, result: Mapping[str, Any]) -> None:
        """A packet was acknowledged: refund what it did not spend, learn its cost."""
        reserved = result.get("max_points")
        if reserved is not None:
            self.points.give_back(max(0, reserved - result.get("points", 0)), self.now_ms)
        if not result.get("rows"):  # nothing went out: the packet's tokens were not spent
            self.messages.give_back(1, self.now_ms)
            self.telemetry.give_back(1, self.now_ms)
        elif result.get("bytes") and reserved is not None:  # points are counted only under a limit
            self.points_per_byte = result.get("points", 0) / result["bytes"]
        self.need_points = int(result.get("needs_points") or 0)

    # -- planning -------------------------------------------------------------

    def _plan(self) -> None:
        """Issue the work that can go now, then let ``work_changed`` (internal) pick the state."""
        if self.stopping:
            return
        self._plan_transfer()
        if self.connected:
            self._plan_packets()
        if self._wanted_state() != self.current_state_value and not self.settle_pending:
            # Internal queue: the state follows the work before this step ends,
            # instead of one more event through the dispatcher and the journal.
            self.settle_pending = True
            self.raise_("work_changed")

    def _wanted_state(self) -> str:
        """The state the work calls for (the guards of ``work_changed`` agree with it)."""
        if not self.connected:
            return "offline"
        if self.holding:
            return "throttled"
        return "draining" if self._in_flight() else "idle"

    def _in_flight(self) -> int:
        return self.data.in_flight + self.logs.in_flight

    def _window(self) -> int:
        bounds = [b for b in (self.session_inflight, self.receive_maximum) if b is not None]
        return max(1, min([self.settings.max_inflight, *bounds]))

    def _hold(self, seconds: float) -> None:
        if not self.holding:
            self.holding = True
            self.emit(StartTimer(name="hold_elapsed", seconds=max(seconds, 0.01)))

    def _plan_transfer(self) -> None:
        if self.transfer_in_flight or self.transfer_held or not self.rows_maybe_waiting:
            return
        if self.pending_full and self.pending_rows >= self.settings.pending_max_rows:
            return
        s = self.settings
        self.transfer_in_flight = True
        self.emit(TransferRows(max_rows=s.batch_rows, pending_max_rows=s.pending_max_rows,
                               reply="transfer", timeout_s=s.transfer_timeout_s))

    def _plan_packets(self) -> None:
        while not self.holding and self._in_flight() < self._window():
            if self.logs.waiting and self.logs.in_flight == 0:
                stream = self.logs
            elif self.data.waiting and self._data_packets_useful():
                stream = self.data
            else:
                return
            budget = self._points_budget()
            if budget is None:
                return
            self._send(stream, budget)

    def _data_packets_useful(self) -> bool:
        """Another data packet has rows to carry (probe with one while the size is unknown)."""
        if self.data.in_flight == 0:
            return True
        if self.data.known_top is None or self.rows_per_packet == 0:
            return False
        return self.data.in_flight < -(-self.pending_rows // self.rows_per_packet)

    def _points_budget(self) -> int | None:
        """Points the next packet may carry (-1: no limit); None when it must wait (then holds)."""
        now = self.now_ms
        if self.messages.available(now) < 1 or self.telemetry.available(now) < 1:
            self._hold(max(self.messages.wait_s(1, now), self.telemetry.wait_s(1, now)))
            return None
        if self.points.unlimited:
            return -1
        wanted = min(self.points.capacity, max(self.need_points, self._points_per_packet()))
        available = self.points.available(now)
        if available < wanted:
            self._hold(self.points.wait_s(wanted, now))
            return None
        return int(wanted)

    def _points_per_packet(self) -> float:
        if self.points_per_byte is None:
            return self.points.capacity
        return math.ceil(self.points_per_byte * (self.max_payload_size - PACKET_OVERHEAD) * 1.1) + 1

    def _send(self, stream: Stream, budget: int) -> None:
        now = self.now_ms
        self.messages.take(1, now)
        self.telemetry.take(1, now)
        if budget >= 0:
            self.points.take(budget, now)
        capacity = None if self.points.unlimited else int(self.points.capacity)
        self.emit(SendPacket(
            stream=DATA if stream is self.data else LOGS,
            restart=stream.restart,
            max_payload_bytes=self.max_payload_size - PACKET_OVERHEAD,
            max_points=budget if budget >= 0 else None,
            points_capacity=capacity,
            reply=stream.reply,
            timeout_s=self.stall_timeout_s,
        ))
        stream.restart = False
        stream.in_flight += 1

    # -- read by the component and the journal ----------------------------------

    def in_flight(self) -> int:
        """Packets awaiting PUBACK (read by the component while the gateway stops)."""
        return self._in_flight()

    def snapshot(self) -> dict[str, Any]:
        return {}
