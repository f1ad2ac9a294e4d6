"""Rate limits in ThingsBoard's "cap:sec" form: what counts where, and the disconnect (§6, §7 item 10)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.standin.helpers import Device, acked
from tools.tb_standin import RpcTimeout, StandIn
from tools.tb_standin.ratelimit import DeviceLimits, RateLimit

TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_greedily_and_all_windows_apply() -> None:
    clock = FakeClock()
    limit = RateLimit("2:1,3:10", clock)
    assert limit.try_consume() and limit.try_consume()
    assert not limit.try_consume()  # 2 per second
    clock.now = 0.5
    assert limit.try_consume()  # one token back after half a second
    clock.now = 1.5
    assert not limit.try_consume()  # the 3-per-10-s window is empty although the 1-s one refilled
    clock.now = 5.0
    assert limit.try_consume()


def test_unset_limit_is_unlimited_and_bad_specs_are_rejected() -> None:
    assert all(RateLimit(None).try_consume() for _ in range(10_000))
    with pytest.raises(ValueError):
        RateLimit("10")
    with pytest.raises(ValueError):
        RateLimit("0:1")


def test_telemetry_is_charged_to_telemetry_buckets_not_messages() -> None:
    limits = DeviceLimits("1:60", "10:60", "5:60")
    assert limits.allow_telemetry(3)
    assert limits.allow_telemetry(2)
    assert not limits.allow_telemetry(1)  # data points exhausted
    assert limits.allow_message()  # "messages" untouched by telemetry


def test_exceeding_telemetry_messages_drops_the_message_and_closes(connected: Device, standin: StandIn) -> None:
    standin.set_limits(telemetry_messages="2:60")
    connected.publish_acked(TELEMETRY, {"ts": 1, "values": {"n": 1}})  # distinct ts: one value per key and ts
    connected.publish_acked(TELEMETRY, {"ts": 2, "values": {"n": 2}})
    info = connected.publish(TELEMETRY, {"ts": 3, "values": {"n": 3}})
    connected.expect_server_disconnect(0x83)  # getPubAckCallback.onError: IMPLEMENTATION_SPECIFIC_ERROR, MTH:731-735
    assert not acked(info)
    assert [v for _, v in standin.telemetry("dev1", "n")] == [1, 2]
    assert standin.disconnect_reasons("dev1") == ["rate_limit"]


def test_data_points_count_every_key_of_an_array(connected: Device, standin: StandIn) -> None:
    standin.set_limits(telemetry_data_points="10:60")
    connected.publish_acked(TELEMETRY, [{"ts": i, "values": {"a": i, "b": i}} for i in range(5)])  # 10 points
    info = connected.publish(TELEMETRY, {"c": 1})
    connected.expect_server_disconnect(0x83)  # getPubAckCallback.onError: IMPLEMENTATION_SPECIFIC_ERROR, MTH:731-735
    assert not acked(info) and standin.telemetry_count("dev1") == 5
    assert standin.disconnect_reasons("dev1") == ["rate_limit"]


def test_client_attributes_count_as_telemetry(connected: Device, standin: StandIn) -> None:
    standin.set_limits(messages="1000:1", telemetry_messages="1:60")
    connected.publish_acked("v1/devices/me/attributes", {"a": 1})
    connected.publish("v1/devices/me/telemetry", {"b": 1})
    connected.expect_server_disconnect(0x83)  # getPubAckCallback.onError: IMPLEMENTATION_SPECIFIC_ERROR, MTH:731-735
    assert standin.disconnect_reasons("dev1") == ["rate_limit"]


def test_messages_limit_covers_attribute_requests(connected: Device, standin: StandIn) -> None:
    standin.set_limits(messages="2:60")  # the connect already took one token before set_limits reset them
    connected.publish("v1/devices/me/attributes/request/1", {})
    connected.expect("v1/devices/me/attributes/response/1")
    connected.publish_acked(TELEMETRY, {"telemetry": "is not a message"})
    connected.publish("v1/devices/me/attributes/request/2", {})
    connected.expect("v1/devices/me/attributes/response/2")
    info = connected.publish("v1/devices/me/attributes/request/3", {})
    connected.expect_server_disconnect(0x83)  # getPubAckCallback.onError: IMPLEMENTATION_SPECIFIC_ERROR, MTH:731-735
    assert not acked(info)
    assert standin.disconnect_reasons("dev1") == ["rate_limit"]


def test_rate_limited_connect_gets_connack_3_or_0x9f(standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:1384-1388: CONNECTION_RATE_EXCEEDED, 0x9F on MQTT 5 (then DISCONNECT 0x96), 0x03 on 3.1.1
    (ReturnCodeResolver.java:35-37)."""
    standin.add_device("dev1", "token1")
    standin.set_limits(messages="1:60")
    first = devices(standin.port, "token1")
    first.connect()
    first.close()
    second = devices(standin.port, "token1")
    assert second.connect(expect=None) == second.code(0x03, 0x9F)
    assert standin.events("dev1", "connect_refused")[0].detail == f"0x{second.code(0x03, 0x9F):02x}"


def test_within_limits_the_session_is_never_closed(connected: Device, standin: StandIn) -> None:
    standin.set_limits(messages="100:1", telemetry_messages="100:1", telemetry_data_points="1000:1")
    for i in range(50):
        connected.publish_acked(TELEMETRY, {"i": i})
    assert standin.is_connected("dev1") and "rate_limit" not in standin.disconnect_reasons("dev1")


def test_subscribe_over_the_limit_keeps_the_session_but_registers_nothing(connected: Device,
                                                                         standin: StandIn) -> None:
    """MTH:835 ("TODO consume the rate limit") and MTH:938-948: processSubscribe never closes. The attribute
    and RPC subscriptions go through DefaultTransportService.java:600-622, whose checkLimits takes a
    "messages" token and, with the null callback MTH passes, silently skips the device-actor registration
    when over the limit (DTS:850-862). The SUBACK still grants the QoS."""
    standin.set_limits(messages="1:60")  # set_limits refills the buckets: one token left
    assert connected.subscribe(ATTRIBUTES) == [1]  # takes the last token: registered
    assert connected.subscribe("v1/devices/me/rpc/request/+") == [1]  # over the limit: granted, not registered
    assert connected.subscribe("v1/devices/me/attributes/response/+") == [1]  # costs nothing
    standin.set_shared("dev1", {"pushed": 1})
    assert connected.expect_json(ATTRIBUTES) == {"pushed": 1}
    with pytest.raises(RpcTimeout):
        standin.rpc("dev1", "never", timeout=0.5)  # the RPC subscription was not registered
    assert standin.is_connected("dev1") and "rate_limit" not in standin.disconnect_reasons("dev1")
    connected.publish_acked(TELEMETRY, {"still": "connected"})  # telemetry buckets are unlimited
