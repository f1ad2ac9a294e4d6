"""Server-side and client-side RPC (§3, §7 items 6 and 7)."""

from __future__ import annotations

import json
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest

from tests.standin.helpers import Device
from tools.tb_standin import RpcTimeout, StandIn

RPC_SUB = "v1/devices/me/rpc/request/+"
RPC_REQ = "v1/devices/me/rpc/request/"
RPC_RES = "v1/devices/me/rpc/response/"


def answer_with(device: Device, reply: Callable[[dict], object]) -> None:
    """Make the device answer every server RPC with ``reply(request)``."""
    def on_message(message: mqtt.MQTTMessage) -> None:
        if message.topic.startswith(RPC_REQ):
            rpc_id = message.topic.rsplit("/", 1)[1]
            device.client.publish(RPC_RES + rpc_id, json.dumps(reply(json.loads(message.payload))), qos=1)
    device.on_message = on_message


def test_two_way_rpc_gets_the_device_reply_and_ids_start_at_0(connected: Device, standin: StandIn) -> None:
    connected.subscribe(RPC_SUB)
    answer_with(connected, lambda request: {"echo": request})
    assert standin.rpc("dev1", "setGpio", {"pin": 4}) == {"echo": {"method": "setGpio", "params": {"pin": 4}}}
    assert standin.rpc("dev1", "getTime", None) == {"echo": {"method": "getTime", "params": None}}
    assert [m.topic for m in (connected.expect(RPC_REQ + "0"), connected.expect(RPC_REQ + "1"))]
    assert [h["status"] for h in standin.rpc_history("dev1")] == ["SUCCESSFUL", "SUCCESSFUL"]


def test_ids_are_per_device(standin: StandIn, devices: Callable[..., Device]) -> None:
    for name in ("a", "b"):
        standin.add_device(name, f"tok-{name}")
        device = devices(standin.port, f"tok-{name}")
        device.connect()
        device.subscribe(RPC_SUB)
        answer_with(device, lambda request: "ok")
        assert standin.rpc(name, "m", {}) == "ok"
        device.expect(RPC_REQ + "0")


def test_request_payload_has_method_and_params_only(connected: Device, standin: StandIn) -> None:
    connected.subscribe(RPC_SUB)
    future = standin.rpc_async("dev1", "reboot", {"delay": 1}, oneway=True)
    assert connected.expect_json(RPC_REQ + "0") == {"method": "reboot", "params": {"delay": 1}}
    assert future.result(5) is None  # one-way: done once written


def test_no_reply_times_out_with_status_timeout(connected: Device, standin: StandIn) -> None:
    connected.subscribe(RPC_SUB)
    with pytest.raises(RpcTimeout) as raised:
        standin.rpc("dev1", "silent", {}, timeout=0.5)
    assert raised.value.status == "TIMEOUT" and raised.value.http_status == 504
    assert standin.rpc_history("dev1")[0]["history"][:3] == ["QUEUED", "SENT", "DELIVERED"]


def test_rpc_to_offline_device_is_delivered_when_it_subscribes_before_expiry(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    future = standin.rpc_async("dev1", "wake", {"x": 1}, timeout=10)
    device = devices(standin.port, "token1")
    device.connect()
    answer_with(device, lambda request: {"woke": True})
    device.subscribe(RPC_SUB)
    assert future.result(10) == {"woke": True}


def test_rpc_to_offline_device_expires_as_no_active_connection(standin: StandIn) -> None:
    standin.add_device("dev1", "token1")
    with pytest.raises(RpcTimeout) as raised:
        standin.rpc("dev1", "wake", {}, timeout=0.3)
    assert raised.value.status == "NO_ACTIVE_CONNECTION"


def test_connected_but_not_subscribed_device_does_not_get_the_rpc(connected: Device, standin: StandIn) -> None:
    with pytest.raises(RpcTimeout) as raised:
        standin.rpc("dev1", "m", {}, timeout=0.3)
    assert raised.value.status == "NO_ACTIVE_CONNECTION"


def test_restart_loses_pending_rpcs_and_resets_ids(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    lost = standin.rpc_async("dev1", "lost", {}, timeout=1.0)
    standin.restart()
    device = devices(standin.port, "token1")
    device.connect()
    answer_with(device, lambda request: request["method"])
    device.subscribe(RPC_SUB)
    with pytest.raises(RpcTimeout):
        lost.result(5)
    assert standin.rpc("dev1", "fresh", {}) == "fresh"
    assert device.expect(lambda t: t.startswith(RPC_REQ)).topic == RPC_REQ + "0"  # counter restarted at 0


def test_stale_reply_is_acknowledged_and_ignored(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(RPC_RES + "77", {"late": True})
    assert standin.is_connected("dev1")


def test_non_json_reply_is_returned_as_text(connected: Device, standin: StandIn) -> None:
    connected.subscribe(RPC_SUB)
    connected.on_message = lambda m: connected.client.publish(RPC_RES + m.topic.rsplit("/", 1)[1], "plain", qos=1)
    assert standin.rpc("dev1", "m", {}) == "plain"


def test_get_session_limits_is_answered_by_the_transport(connected: Device, standin: StandIn) -> None:
    connected.publish(RPC_REQ + "1", {"method": "getSessionLimits", "params": {}})
    assert connected.expect_json(RPC_RES + "1") == {
        "maxPayloadSize": 65536, "maxInflightMessages": 100,
        "rateLimits": {"messages": None, "telemetryMessages": None, "telemetryDataPoints": None}}
    standin.set_limits(messages="200:1,6000:60", telemetry_messages="100:1,3000:60",
                       telemetry_data_points="300:1,9000:60")
    connected.publish(RPC_REQ + "2", {"method": "getSessionLimits"})
    assert connected.expect_json(RPC_RES + "2")["rateLimits"] == {
        "messages": "200:1,6000:60", "telemetryMessages": "100:1,3000:60", "telemetryDataPoints": "300:1,9000:60"}


def test_get_session_limits_reply_is_configurable(connected: Device, standin: StandIn) -> None:
    standin.set_session_limits(max_payload_size=8192, max_inflight_messages=10, messages="10:1")
    connected.publish(RPC_REQ + "3", {"method": "getSessionLimits", "params": {}})
    assert connected.expect_json(RPC_RES + "3") == {
        "maxPayloadSize": 8192, "maxInflightMessages": 10,
        "rateLimits": {"messages": "10:1", "telemetryMessages": None, "telemetryDataPoints": None}}


def test_client_rpc_with_a_handler(connected: Device, standin: StandIn) -> None:
    standin.set_client_rpc_handler("getTime", lambda device, params: {"time": 42, "device": device, "p": params})
    connected.publish(RPC_REQ + "5", {"method": "getTime", "params": {"tz": "UTC"}})
    assert connected.expect_json(RPC_RES + "5") == {"time": 42, "device": "dev1", "p": {"tz": "UTC"}}
    assert standin.client_rpcs("dev1") == [("dev1", 5, "getTime", {"tz": "UTC"})]


def test_client_rpc_without_reply_times_out(make_standin: Callable[..., StandIn],
                                            devices: Callable[..., Device]) -> None:
    standin = make_standin(client_rpc_timeout=0.3)
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "token1")
    device.connect()
    device.publish_acked(RPC_REQ + "9", {"method": "nobodyHome", "params": {}})
    assert device.expect_json(RPC_RES + "9") == {"error": "timeout"}


def test_client_rpc_without_method_closes_the_session(connected: Device, standin: StandIn) -> None:
    connected.publish(RPC_REQ + "1", {"params": {}})
    connected.wait_closed()
    assert standin.disconnect_reasons("dev1") == ["rpc_method_missing"]


def test_persistent_rpc_survives_a_restart_while_queued(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    standin.rpc_async("dev1", "lightweight", {}, timeout=5)  # takes id 0, lost on restart
    rpc_id = standin.rpc_persistent("dev1", "persist", {"k": 1}, timeout=10)
    assert standin.rpc_status(rpc_id)["status"] == "QUEUED" and standin.rpc_status(rpc_id)["request_id"] == 1
    standin.restart()
    device = devices(standin.port, "token1")
    device.connect()
    answer_with(device, lambda request: {"got": request["method"]})
    device.subscribe(RPC_SUB)
    assert device.expect_json(RPC_REQ + "0") == {"method": "persist", "params": {"k": 1}}  # reloaded, new id
    status = standin.wait_for(lambda: (s := standin.rpc_status(rpc_id))["status"] == "SUCCESSFUL" and s)
    assert status["response"] == {"got": "persist"}
    assert status["history"][:2] == ["QUEUED", "SENT"]  # paho replies before it PUBACKs: DELIVERED may be skipped


def test_persistent_rpc_expires_when_the_device_stays_away(standin: StandIn) -> None:
    standin.add_device("dev1", "token1")
    rpc_id = standin.rpc_persistent("dev1", "m", {}, timeout=0.2)
    assert standin.wait_for(lambda: standin.rpc_status(rpc_id)["status"] == "EXPIRED")


def test_rpc_without_puback_times_out_on_delivery_and_is_resent_on_next_subscription(
        make_standin: Callable[..., StandIn], devices: Callable[..., Device]) -> None:
    standin = make_standin(rpc_delivery_timeout=0.2)
    standin.add_device("dev1", "token1")
    silent = devices(standin.port, "token1")
    silent.client.manual_ack_set(True)  # this session never acknowledges
    silent.connect()
    silent.subscribe(RPC_SUB)
    future = standin.rpc_async("dev1", "retry-me", {}, timeout=10)
    silent.expect(RPC_REQ + "0")
    assert standin.wait_for(lambda: standin._sync(  # noqa: SLF001 - peek at the pending map
        lambda: standin._server.rpc.pending["dev1"][0].status) == "TIMEOUT")  # noqa: SLF001
    silent.close()

    device = devices(standin.port, "token1")
    device.connect()
    answer_with(device, lambda request: "second time lucky")
    device.subscribe(RPC_SUB)
    assert future.result(10) == "second time lucky"
    assert device.expect(lambda t: t.startswith(RPC_REQ)).topic == RPC_REQ + "0"  # same request id
