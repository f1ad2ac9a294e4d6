"""Fault injection the gateway must survive (§7 item 11)."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from tests.standin.helpers import Device, acked
from tools.tb_standin import StandIn

TELEMETRY = "v1/devices/me/telemetry"


def test_dropped_puback_keeps_the_data_and_later_acks_flow(connected: Device, standin: StandIn) -> None:
    standin.drop_pubacks(1)
    lost = connected.publish(TELEMETRY, {"ts": 1, "values": {"n": 1}})  # distinct ts: TB keeps one value per key and ts
    connected.publish_acked(TELEMETRY, {"ts": 2, "values": {"n": 2}})  # PUBACKs are per packet id: the second one still comes
    assert not acked(lost)
    assert [v for _, v in standin.telemetry("dev1", "n")] == [1, 2]
    assert len(standin.events("dev1", "puback_dropped")) == 1


def test_dropped_puback_with_disconnect(connected: Device, standin: StandIn) -> None:
    standin.drop_pubacks(1, device="dev1", disconnect=True)
    info = connected.publish(TELEMETRY, {"n": 1})
    connected.wait_closed()
    assert not acked(info)
    assert standin.telemetry_count("dev1") == 1  # stored although never acknowledged
    assert standin.disconnect_reasons("dev1") == ["fault_disconnect"]


def test_delayed_puback(connected: Device, standin: StandIn) -> None:
    standin.delay_pubacks(0.5)
    start = time.monotonic()
    info = connected.publish(TELEMETRY, {"n": 1})
    standin.wait_for(lambda: standin.telemetry_count("dev1") == 1)
    assert not acked(info)  # stored, ack still pending
    info.wait_for_publish(5)
    assert acked(info) and time.monotonic() - start >= 0.5
    standin.delay_pubacks(0)
    connected.publish_acked(TELEMETRY, {"n": 2})


def test_restart_drops_sessions_keeps_data_and_ports(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"n": 1})
    port = standin.port
    standin.restart()
    connected.wait_closed()
    assert standin.port == port and standin.disconnect_reasons("dev1") == ["server_restart"]
    assert standin.telemetry_count("dev1") == 1
    connected.client.reconnect()
    standin.wait_for(lambda: standin.is_connected("dev1"))


def test_disconnect_during_unacknowledged_publish(connected: Device, standin: StandIn) -> None:
    standin.delay_pubacks(5)
    info = connected.publish(TELEMETRY, {"n": 1})
    standin.wait_for(lambda: standin.telemetry_count("dev1") == 1)
    standin.disconnect("dev1")
    connected.wait_closed()
    assert not acked(info)


def test_outage_refuses_connections_until_up(connected: Device, standin: StandIn) -> None:
    standin.down()
    connected.wait_closed()
    assert standin.disconnect_reasons("dev1") == ["outage"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", standin.port), timeout=1).close()
    standin.up()
    connected.client.reconnect()
    standin.wait_for(lambda: standin.is_connected("dev1"))


def test_refused_publish_is_answered_as_an_unparsable_payload_and_not_stored(
        connected: Device, standin: StandIn) -> None:
    """A test knob shaped like TB's answer to a payload it cannot parse (MTH:668-676):
    PUBACK with the reason code on MQTT 5 (session stays), a close without PUBACK on 3.1.1."""
    standin.refuse_pubacks(1, code=0x90, contains='"n": 2')
    connected.publish_acked(TELEMETRY, {"ts": 1, "values": {"n": 1}})  # does not match: stored
    info = connected.publish(TELEMETRY, {"ts": 2, "values": {"n": 2}})
    if connected.v5:
        info.wait_for_publish(5)
        assert connected.puback_code(info) == 0x90
        connected.publish_acked(TELEMETRY, {"ts": 3, "values": {"n": 2}})  # the count is spent
        assert [v for _, v in standin.telemetry("dev1", "n")] == [1, 2]
    else:
        connected.wait_closed()
        assert not acked(info) and standin.disconnect_reasons("dev1") == ["invalid_payload"]
        assert [v for _, v in standin.telemetry("dev1", "n")] == [1]
    assert [e.detail for e in standin.events("dev1", "puback_refused")] == ["0x90"]


def test_receive_maximum_knob_is_sent_on_mqtt5_and_enforced(standin: StandIn, devices: Any) -> None:
    """Not TB behaviour (its CONNACK has no properties): MQTT 5 §3.2.2.3.3 and §3.3.4 for a test knob."""
    standin.add_device("dev1", "token1")
    standin.set_receive_maximum(2)
    device = devices(standin.port, "token1")
    device.connect()
    standin.delay_pubacks(1.0)
    infos = [device.publish(TELEMETRY, {"ts": i, "values": {"n": i}}) for i in range(3)]
    if device.v5:
        assert device.connack_properties.get("ReceiveMaximum") == 2
        device.expect_server_disconnect(0x93)  # paho does not honour it by itself: the third one is one too many
        assert standin.disconnect_reasons("dev1") == ["receive_maximum_exceeded"]
    else:
        for info in infos:
            info.wait_for_publish(5)
        assert standin.peak_unacked("dev1") == 3  # 3.1.1 has no such property: nothing to enforce
