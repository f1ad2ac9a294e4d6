"""The v2 short topics and the gateway prefix, as ThingsBoard's MQTT transport routes them.

Topics: ``MqttTopics.java:89-115``; publish routing: ``MqttTransportHandler.java`` (MTH)
``processDevicePublish`` (MTH:591-647); subscriptions: ``processSubscribe`` (MTH:862-919); the
topic a push goes to: ``TopicType.java:23-26``. Every test runs on MQTT 3.1.1 and MQTT 5.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.standin.helpers import Device, acked
from tools.tb_standin import StandIn


@pytest.mark.parametrize("topic", ["v2/t", "v2/t/j"])
def test_short_telemetry_topics_store_telemetry(connected: Device, standin: StandIn, topic: str) -> None:
    """MTH:591-598: DEVICE_TELEMETRY_SHORT_TOPIC and its /j form are telemetry."""
    assert connected.publish_acked(topic, {"ts": 7, "values": {"short": 1}}) == 0
    assert standin.telemetry("dev1", "short") == [(7, 1)]


@pytest.mark.parametrize("topic", ["v2/a", "v2/a/j"])
def test_short_attribute_topics_store_client_attributes(connected: Device, standin: StandIn, topic: str) -> None:
    """MTH:603-610: DEVICE_ATTRIBUTES_SHORT_TOPIC and its /j form are client attributes."""
    assert connected.publish_acked(topic, {"mode": "short"}) == 0
    assert standin.client_attributes("dev1") == {"mode": "short"}


def test_short_telemetry_with_an_invalid_payload_is_refused(connected: Device, standin: StandIn) -> None:
    """Same adaptor as v1 (MTH:592, 652-654): closed on 3.1.1, PUBACK 0x99 on MQTT 5."""
    info = connected.publish("v2/t", b"not json")
    connected.expect_invalid_payload_answer(info, standin)


@pytest.mark.parametrize("request_prefix,response_prefix", [
    ("v2/a/req/", "v2/a/res/"), ("v2/a/req/j/", "v2/a/res/j/"),
], ids=["v2", "v2-json"])
def test_short_attribute_request_is_answered_in_its_own_family(connected: Device, standin: StandIn,
                                                              request_prefix: str, response_prefix: str) -> None:
    """MTH:636-647 set attrReqTopicType; onGetAttributesResponse publishes on its base (MTH:1399-1405)."""
    standin.set_shared("dev1", {"interval": 5})
    connected.publish(f"{request_prefix}3", {"sharedKeys": "interval"})
    assert connected.expect_json(f"{response_prefix}3") == {"shared": {"interval": 5}}


@pytest.mark.parametrize("request_prefix,response_prefix", [
    ("v2/r/req/", "v2/r/res/"), ("v2/r/req/j/", "v2/r/res/j/"),
], ids=["v2", "v2-json"])
def test_short_client_rpc_is_answered_in_its_own_family(connected: Device, standin: StandIn,
                                                       request_prefix: str, response_prefix: str) -> None:
    """MTH:624-635 set toServerRpcSubTopicType; the reply goes to that family's response base."""
    standin.set_client_rpc_handler("getTime", lambda device, params: {"time": 42})
    connected.publish(f"{request_prefix}4", {"method": "getTime", "params": {}})
    assert connected.expect_json(f"{response_prefix}4") == {"time": 42}


def test_get_session_limits_is_built_in_on_the_v1_topic_only(make_standin: Callable[..., StandIn],
                                                            devices: Callable[..., Device]) -> None:
    """MTH:576-583: only DEVICE_RPC_REQUESTS_TOPIC checks SESSION_LIMITS; on v2/r/req it is an ordinary
    client RPC, which times out without an "RPC Call Reply" node."""
    standin = make_standin(client_rpc_timeout=0.3)
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "token1")
    device.connect()
    device.publish("v1/devices/me/rpc/request/1", {"method": "getSessionLimits", "params": {}})
    assert device.expect_json("v1/devices/me/rpc/response/1")["maxPayloadSize"] == 65536
    device.publish("v2/r/req/2", {"method": "getSessionLimits", "params": {}})
    assert device.expect_json("v2/r/res/2") == {"error": "timeout"}


@pytest.mark.parametrize("subscription,request_base,reply_prefix", [
    ("v1/devices/me/rpc/request/+", "v1/devices/me/rpc/request/", "v1/devices/me/rpc/response/"),
    ("v2/r/req/+", "v2/r/req/", "v2/r/res/"),
    ("v2/r/req/j/+", "v2/r/req/j/", "v2/r/res/j/"),
], ids=["v1", "v2", "v2-json"])
def test_server_rpc_follows_the_subscribed_family(connected: Device, standin: StandIn, subscription: str,
                                                 request_base: str, reply_prefix: str) -> None:
    """MTH:883-897 set rpcSubTopicType; onToDeviceRpcRequest publishes on its base (MTH:1469-1472); the
    device replies on any response family (MTH:573-575, 615-623)."""
    assert connected.subscribe(subscription) == [1]
    future = standin.rpc_async("dev1", "ping", {"n": 1})
    assert connected.expect_json(f"{request_base}0") == {"method": "ping", "params": {"n": 1}}
    connected.publish(f"{reply_prefix}0", {"pong": True})
    assert future.result(5) == {"pong": True}


@pytest.mark.parametrize("subscription", ["v2/a", "v2/a/j"])
def test_shared_updates_follow_the_subscribed_family(connected: Device, standin: StandIn, subscription: str) -> None:
    """MTH:868-877 set attrSubTopicType; onAttributeUpdate publishes on its topic (MTH:1440-1442)."""
    assert connected.subscribe(subscription) == [1]
    standin.set_shared("dev1", {"interval": 9})
    assert connected.expect_json(subscription) == {"interval": 9}


def test_every_short_subscription_of_the_switch_is_granted(connected: Device) -> None:
    """MTH:862-919: the v2 filters (JSON and protobuf forms) are in the accepted switch."""
    filters = ["v2/a", "v2/a/j", "v2/a/p", "v2/r/req/+", "v2/r/req/j/+", "v2/r/req/p/+", "v2/r/res/+",
               "v2/r/res/j/+", "v2/r/res/p/+", "v2/a/res/+", "v2/a/res/j/+", "v2/a/res/p/+"]
    assert connected.subscribe(*filters) == [1] * len(filters)
    assert connected.subscribe("v2/t") == [connected.code(0x80, 0x8F)]  # a publish-only topic


def test_gateway_topic_from_a_plain_device_gets_no_puback(connected: Device, standin: StandIn) -> None:
    """MTH:417-423: a v1/gateway/* publish on a session without a gateway handler is only logged: no PUBACK,
    no data, and the session stays."""
    info = connected.publish("v1/gateway/telemetry", {"child": [{"a": 1}]})
    connected.publish_acked("v1/devices/me/telemetry", {"after": 1})  # PUBACKs are in order: the first never came
    assert not acked(info)
    assert standin.is_connected("dev1") and standin.latest("dev1") == {"after": 1}
    assert [e.detail for e in standin.events("dev1", "gateway_topic_ignored")] == ["v1/gateway/telemetry"]
