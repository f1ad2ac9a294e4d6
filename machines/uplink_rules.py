"""The uplink's planning: what goes out next, and what ThingsBoard's limits allow.

``UplinkPlanning`` is a mixin of ``machines.uplink.UplinkMachine``: the machine
keeps the table, the data and the event handlers; the methods here read that
data and decide the work to issue now (a ``TransferRows`` batch, ``SendPacket``
packets), spend and refund the rate buckets, hold the machine when tokens run
out, and notify ``work_changed`` when the state no longer fits the work. Like
the machine, pure: no I/O, and time only from ``now_ms``.
Also here: the machine's settings and ``Stream``, the state of one send pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from teg_fsm.engine.effects import Log, Notify, StartTimer
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC
from teg_fsm.engine.effects.uplink import DATA, LOGS, SendPacket, TransferRows
from teg_fsm.engine.rate_limits import TokenBuckets

# MQTT remaining length = 2 + topic + 2 (packet id) [+ MQTT 5 property length]; the
# limit counts all of it (PROTOCOL.md §1.2). A few bytes of slack on top.
PACKET_OVERHEAD = 2 + len(TELEMETRY_TOPIC) + 2 + 1 + 4


@attrs.define
class UplinkSettings:
    batch_rows: int = 2000
    pending_max_rows: int = 5_000_000
    max_inflight: int = 16
    max_payload_size: int = 65536
    rate_messages: str = ""
    rate_telemetry_messages: str = ""
    rate_data_points: str = ""
    # A PUBACK later than this on a live session: the session is stuck. The gateway passes
    # TEG_UPLINK_PUBACK_TIMEOUT_S (10 s); 60 stays the default so journals recorded before
    # that setting existed replay unchanged.
    packet_timeout_s: float = 60.0
    stall_timeout_max_s: float = 60.0  # the bound doubles after each stuck session, up to this
    transfer_timeout_s: float = 120.0
    retry_s: float = 1.0
    transfer_retry_s: float = 5.0


@attrs.define
class Stream:
    """Where one send pipeline stands: ids known to exist vs. ids already taken."""

    reply: str
    known_top: int | None = None  # highest id known to be pending; None: unknown, probe
    sent_top: int = 0  # highest id the adapter has looked at since the cursor restarted
    in_flight: int = 0
    restart: bool = True

    @property
    def waiting(self) -> bool:
        return self.known_top is None or self.known_top > self.sent_top


class UplinkPlanning:
    """Transfer and packet planning, and the rate budget, of the uplink machine."""

    # What the mixin needs from its machine, as annotations only: a value or stub
    # here would shadow the machine's (this class comes first in the MRO).
    # Data set in the machine's ``setup`` and event handlers:
    settings: UplinkSettings
    connected: bool
    stopping: bool
    settle_pending: bool
    data: Stream
    logs: Stream
    rows_maybe_waiting: bool
    transfer_in_flight: bool
    transfer_held: bool
    pending_rows: int
    pending_full: bool
    holding: bool
    need_points: int
    points_per_byte: float | None
    rows_per_packet: int
    max_payload_size: int
    session_inflight: int | None
    stall_timeout_s: float
    limits_spec: tuple[str, str, str]
    messages: TokenBuckets
    telemetry: TokenBuckets
    points: TokenBuckets
    # From GatewayMachine.
    machine_name: str
    current_state_value: Any
    now_ms: int
    emit: Callable[..., None]

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
        """Issue the work that can go now, then let ``work_changed`` pick the state."""
        if self.stopping:
            return
        self._plan_transfer()
        if self.connected:
            self._plan_packets()
        if self._wanted_state() != self.current_state_value and not self.settle_pending:
            self.settle_pending = True
            self.emit(Notify(machine=self.machine_name, name="work_changed"))

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
        if self.session_inflight is None:
            return self.settings.max_inflight
        return max(1, min(self.settings.max_inflight, self.session_inflight))

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
