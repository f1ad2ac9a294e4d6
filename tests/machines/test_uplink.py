"""The uplink machine against a fake queue and a fake ThingsBoard (pure: no SQLite, no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from teg_fsm.engine.dispatcher import Dispatched, Dispatcher, MachineSpec
from teg_fsm.engine.effects import Log
from teg_fsm.engine.effects.mqtt import Disconnect, Publish
from teg_fsm.engine.effects.uplink import DATA, SendPacket, TransferRows
from teg_fsm.engine.events import Outcome
from teg_fsm.machines.uplink import UplinkMachine
from tests.engine.harness import make_engine
from tools.tb_standin.ratelimit import DeviceLimits


class FakeWorld:
    """Answers the uplink's effects like the queue adapter and ThingsBoard would."""

    def __init__(self, dispatcher: Dispatcher, clock: Any, points_per_row: int = 2, rows_per_packet: int = 100) -> None:
        self.d, self.clock = dispatcher, clock
        self.messages: list[int] = []  # controller rows, by id
        self.pending: list[int] = []
        self.next_id = 0
        self.cursor = 0
        self.points_per_row, self.rows_per_packet = points_per_row, rows_per_packet
        self.delivered: list[int] = []
        self.packets: list[SendPacket] = []
        self.logs: list[Log] = []
        self.ack = True  # False: packets are lost (session dropping)
        self.held: list[tuple[SendPacket, dict[str, Any]]] = []
        self.server: DeviceLimits | None = None
        self.refused = 0
        self.disconnects = 0
        self.reopen_next = False  # the next transfer reports a reopened queue file
        self.published: list[Publish] = []
        self.refuse_next = 0  # MQTT 5: ThingsBoard answers the next n data packets with PUBACK 0x99
        self.dead: list[int] = []  # rows the adapter moved to dead_letters

    def write(self, n: int) -> None:
        for _ in range(n):
            self.next_id += 1
            self.messages.append(self.next_id)
        self.d.post("queue", "rows_waiting", {}, target="uplink")

    def advance(self, seconds: float) -> None:
        """Move the fake clock (timers fire) and answer what the machine issued meanwhile."""
        self.run(first=self.d.advance(seconds))

    def run(self, rounds: int = 1000, first: list[Dispatched] | None = None) -> list[Dispatched]:
        seen: list[Dispatched] = []
        for _ in range(rounds):
            done, first = (first if first is not None else self.d.run_until_idle()), None
            if not done:
                return seen
            seen.extend(done)
            for item in done:
                for effect in item.effects:
                    self._answer(effect)
        raise AssertionError("the machine never settled")

    def _answer(self, effect: Any) -> None:
        if isinstance(effect, TransferRows):
            moved = self.messages[: effect.max_rows]
            del self.messages[: effect.max_rows]
            self.pending.extend(moved)
            result = {"moved": len(moved), "dead": 0, "more": bool(self.messages), "full": False,
                      "pending_rows": len(self.pending), "pending_top": max(self.pending, default=0)}
            if self.reopen_next:
                result["reopened"], self.reopen_next = True, False
            self.d.post_outcome("uplink", effect, Outcome.SUCCEEDED, {"result": result})
        elif isinstance(effect, SendPacket):
            self.packets.append(effect)
            self._send(effect)
        elif isinstance(effect, Log):
            self.logs.append(effect)
        elif isinstance(effect, Disconnect):
            self.disconnects += 1
        elif isinstance(effect, Publish):
            self.published.append(effect)

    def _send(self, effect: SendPacket) -> None:
        if effect.stream != DATA:
            self.d.post_outcome("uplink", effect, Outcome.SUCCEEDED, {"result": {"rows": 0, "top": 0, "more": False}})
            return
        if effect.restart:
            self.cursor = 0
        rows = [i for i in self.pending if i > self.cursor][: self.rows_per_packet]
        if effect.max_points is not None:
            rows = rows[: effect.max_points // self.points_per_row]
        after = self.cursor
        self.cursor = rows[-1] if rows else self.cursor
        more = any(i > self.cursor for i in self.pending)
        points = len(rows) * self.points_per_row
        result = {"rows": len(rows), "points": points, "bytes": len(rows) * 50, "first_id": after,
                  "last_id": self.cursor, "more": more, "top": self.cursor if more else max(self.pending, default=0),
                  "needs_points": None, "max_points": effect.max_points}
        if rows and self.server is not None and not self.server.allow_telemetry(points):
            self.refused += 1
        if rows and not self.ack:
            self.held.append((effect, result))
            return
        if rows and self.refuse_next:
            self.refuse_next -= 1
            self.dead.extend(rows)  # as UplinkIO._refused does: the rows leave pending
            self.pending = [i for i in self.pending if not after < i <= self.cursor]
            self.d.post_outcome("uplink", effect, Outcome.FAILED, {
                "error": "refused by ThingsBoard: Payload format invalid (0x99)",
                "refused": "Payload format invalid", "result": result})
            return
        self.delivered.extend(rows)
        self.pending = [i for i in self.pending if not after < i <= self.cursor]
        self.d.post_outcome("uplink", effect, Outcome.SUCCEEDED, {"result": result})


@pytest.fixture
def world() -> FakeWorld:
    dispatcher, clock, _ = make_engine([MachineSpec(UplinkMachine, {"batch_rows": 500, "packet_timeout_s": 10.0})])
    return FakeWorld(dispatcher, clock)


def state(world: FakeWorld) -> str:
    return world.d.machines["uplink"].state_name


def test_connected_uplink_drains_every_row_once_in_order_and_goes_idle(world: FakeWorld) -> None:
    world.write(2_000)
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    assert world.delivered == list(range(1, 2_001))
    assert state(world) == "idle"


def test_a_controller_window_at_rest_is_three_events_and_the_state_follows_within_each(world: FakeWorld) -> None:
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    world.write(2)
    seen = world.run()
    assert [item.event.name for item in seen] == ["rows_waiting", "transfer_succeeded", "data_packet_succeeded"]
    # The state changes inside the step that changed the work, not in a later event.
    assert [(t.source, t.target, t.event) for t in seen[1].transitions if t.source != t.target] == [
        ("idle", "draining", "work_changed")]
    assert [(t.source, t.target, t.event) for t in seen[2].transitions if t.source != t.target] == [
        ("draining", "idle", "work_changed")]
    assert world.delivered == [1, 2] and state(world) == "idle"


def test_offline_uplink_moves_rows_to_pending_but_sends_nothing(world: FakeWorld) -> None:
    world.write(1_200)
    world.run()
    assert state(world) == "offline"
    assert world.packets == [] and len(world.pending) == 1_200 and world.messages == []


def test_draining_state_is_entered_while_packets_are_in_flight(world: FakeWorld) -> None:
    world.write(300)
    world.ack = False
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    assert state(world) == "draining"
    assert len(world.held) >= 1


def test_reconnect_sends_again_from_the_oldest_unacknowledged_row(world: FakeWorld) -> None:
    world.write(1_000)
    world.ack = False
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    lost = list(world.held)
    world.d.post("mqtt", "mqtt_disconnected", {"session": 1, "reason": "gone"})
    world.run()
    assert state(world) == "offline"
    # The old session's packets fail late; the machine must ignore them.
    for effect, _ in lost:
        world.d.post_outcome("uplink", effect, Outcome.FAILED, {"error": "session lost"})
    world.run()
    world.ack, world.held = True, []
    world.d.post("mqtt", "mqtt_connected", {"session": 2})
    world.run()
    assert sorted(set(world.delivered)) == list(range(1, 1_001))
    first_after_reconnect = [p for p in world.packets if p.stream == DATA and p.restart]
    assert len(first_after_reconnect) == 2  # one per session
    assert state(world) == "idle"


def test_a_failed_packet_holds_sending_then_resends_from_the_oldest_row(world: FakeWorld) -> None:
    world.write(200)
    world.ack = False
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    [(effect, _)] = world.held[:1]
    world.ack = True
    world.d.post_outcome("uplink", effect, Outcome.FAILED, {"error": "refused by the server"})
    world.run()
    assert state(world) == "throttled"
    world.advance(2)
    world.run()
    assert sorted(set(world.delivered)) == list(range(1, 201))
    assert any(log.level == "WARNING" and "failed" in log.message for log in world.logs)


def test_a_missing_puback_on_a_live_session_drops_the_session_and_resends_after_reconnect(world: FakeWorld) -> None:
    world.write(200)
    world.ack = False
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    assert {p.timeout_s for p in world.packets} == {10.0}  # the PUBACK bound, not 60 s
    held, world.held = world.held, []
    for effect, _ in held:
        world.d.post_outcome("uplink", effect, Outcome.TIMED_OUT, {"error": "no PUBACK"})
    world.run()
    assert world.disconnects == 1  # one drop for the session, however many packets were stuck
    assert any(log.level == "WARNING" and "no PUBACK for 10 s" in log.message for log in world.logs)
    world.ack = True
    world.d.post("mqtt", "mqtt_disconnected", {"session": 1})
    world.d.post("mqtt", "mqtt_connected", {"session": 2})
    world.run()
    assert sorted(set(world.delivered)) == list(range(1, 201))
    [report] = world.published
    assert json.loads(report.payload)["values"] == {"uplink_stuck_sessions": 1, "uplink_puback_wait_s": 10.0}
    # The bound doubled after the drop, so a merely slow server is not dropped in a loop.
    assert world.packets[-1].timeout_s == 20.0


def test_a_reopened_queue_file_restarts_the_data_stream_from_its_oldest_row(world: FakeWorld) -> None:
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.write(300)
    world.run()
    assert sorted(world.delivered) == list(range(1, 301))
    # The controller re-created its queue: ids start again from 1 in the new file.
    world.pending, world.cursor, world.next_id, world.delivered = [], 0, 0, []
    world.messages = []
    world.reopen_next = True
    world.write(50)
    world.run()
    machine = world.d.machines["uplink"]
    assert machine.data.restart is False and sorted(world.delivered) == list(range(1, 51))


def test_session_limits_throttle_the_drain_below_thingsboards_buckets() -> None:
    dispatcher, clock, _ = make_engine([MachineSpec(UplinkMachine, {"batch_rows": 500})])
    world = FakeWorld(dispatcher, clock, points_per_row=3, rows_per_packet=1000)
    world.server = DeviceLimits(None, "5:1,50:60", "300:1,3000:60", )
    for bucket in (world.server.telemetry_messages, world.server.telemetry_data_points):
        bucket._clock = clock.monotonic  # the server's buckets on the fake clock
        for window in bucket._windows:
            window[3] = clock.monotonic()
    world.write(2_000)
    limits = {"maxPayloadSize": 65536, "maxInflightMessages": 100,
              "rateLimits": {"messages": None, "telemetryMessages": "5:1,50:60", "telemetryDataPoints": "300:1,3000:60"}}
    world.d.post("mqtt", "session_limits_received", limits)
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    assert state(world) == "throttled"
    for _ in range(200):
        world.advance(1)
        world.run()
    assert world.refused == 0
    assert sorted(world.delivered) == list(range(1, 2_001))


def test_transfer_failure_is_logged_and_retried_after_a_pause(world: FakeWorld) -> None:
    world.d.post("queue", "rows_waiting", {}, target="uplink")
    [done] = world.d.run_until_idle()
    [transfer] = [e for e in done.effects if isinstance(e, TransferRows)]
    world.d.post_outcome("uplink", transfer, Outcome.FAILED, {"error": "database is locked"})
    retried = [e for d in world.d.run_until_idle() for e in d.effects if isinstance(e, TransferRows)]
    assert retried == []
    world.write(10)
    world.run()
    world.advance(6)
    world.run()
    assert len(world.pending) == 10


def test_pending_buffer_full_is_reported_once_and_transfers_stop() -> None:
    dispatcher, clock, _ = make_engine([MachineSpec(UplinkMachine, {"pending_max_rows": 100})])
    dispatcher.post("queue", "rows_waiting", {}, target="uplink")
    for _ in range(3):
        [transfer] = [e for d in dispatcher.run_until_idle() for e in d.effects if isinstance(e, TransferRows)]
        result = {"moved": 0, "dead": 0, "more": True, "full": True, "pending_rows": 100, "pending_top": 100}
        dispatcher.post_outcome("uplink", transfer, Outcome.SUCCEEDED, {"result": result})
        done = dispatcher.run_until_idle()
        dispatcher.post("queue", "rows_waiting", {}, target="uplink")
        if not any(isinstance(e, TransferRows) for d in done for e in d.effects):
            break
    logs = [e for d in done for e in d.effects if isinstance(e, Log)]
    assert [log.message for log in logs if "full" in log.message][:1]
    later = [e for d in dispatcher.run_until_idle() for e in d.effects]
    assert not any(isinstance(e, TransferRows) for e in later)


def test_every_packet_respects_the_payload_limit_thingsboard_reports(world: FakeWorld) -> None:
    world.d.post("mqtt", "session_limits_received", {"maxPayloadSize": 8192, "maxInflightMessages": 10})
    world.write(50)
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    assert world.packets and all(p.max_payload_bytes <= 8192 - 27 for p in world.packets)


def test_a_packet_thingsboard_refuses_is_not_sent_again_and_the_drain_goes_on(world: FakeWorld) -> None:
    world.write(500)
    world.refuse_next = 1
    world.d.post("mqtt", "mqtt_connected", {"session": 1})
    world.run()
    assert world.dead == list(range(1, 101))  # the first packet's rows, dead-lettered once
    assert world.delivered == list(range(101, 501))  # every other row once, none of the refused ones
    data_packets = [p for p in world.packets if p.stream == DATA]
    assert len(data_packets) == 5 and not any(p.restart for p in data_packets[1:])  # no resend from the oldest row
    assert state(world) == "idle"  # no pause either: the refusal was an answer, not a loss
    [warning] = [log for log in world.logs if log.level == "WARNING"]
    assert warning.message == ("telemetry packet refused by ThingsBoard: Payload format invalid (0x99): "
                               "its 100 rows moved to dead_letters")


def test_the_receive_maximum_of_the_connack_caps_the_packets_in_flight(world: FakeWorld) -> None:
    world.write(1_000)
    world.ack = False
    world.d.post("mqtt", "mqtt_connected", {"session": 1, "receive_maximum": 3})
    world.run()
    [(probe, result)] = world.held  # the first packet finds out how many rows a packet carries
    world.held = []
    world.d.post_outcome("uplink", probe, Outcome.SUCCEEDED, {"result": result})
    world.run()
    assert len(world.held) == 3  # not the configured 16
    # A later session without the property is back to the configured window.
    world.d.post("mqtt", "mqtt_disconnected", {"session": 1})
    world.ack, world.held = False, []
    world.d.post("mqtt", "mqtt_connected", {"session": 2})
    world.run()
    assert len(world.held) == 9  # the 900 rows left, 100 a packet: below the configured 16, above 3
