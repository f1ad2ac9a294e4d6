"""Client attributes, attribute requests, shared pushes and subscriptions (§2, §0.1, §0.2, §7 items 3 and 5)."""

from __future__ import annotations

import pytest

from tests.standin.helpers import Device
from tools.tb_standin import StandIn

ATTRIBUTES = "v1/devices/me/attributes"
REQUEST = "v1/devices/me/attributes/request/"
RESPONSE = "v1/devices/me/attributes/response/"


@pytest.fixture
def with_attributes(connected: Device, standin: StandIn) -> Device:
    connected.publish_acked(ATTRIBUTES, {"fw": "1.0", "count": "7", "nothing": None})
    standin.set_shared("dev1", {"interval": 5, "mode": "eco"})
    return connected


def test_client_attributes_are_stored_typed(with_attributes: Device, standin: StandIn) -> None:
    assert standin.client_attributes("dev1") == {"fw": 1.0, "count": 7}


def test_array_on_attributes_topic_is_invalid(connected: Device, standin: StandIn) -> None:
    """MTH:668-676: closed without PUBACK on 3.1.1, PUBACK 0x99 on MQTT 5."""
    info = connected.publish(ATTRIBUTES, [{"a": 1}])
    connected.expect_invalid_payload_answer(info, standin)


def test_request_with_comma_separated_keys(with_attributes: Device) -> None:
    with_attributes.publish(REQUEST + "1", {"clientKeys": "fw,missing", "sharedKeys": "mode"})
    assert with_attributes.expect_json(RESPONSE + "1") == {"client": {"fw": 1.0}, "shared": {"mode": "eco"}}


def test_empty_request_returns_everything(with_attributes: Device) -> None:
    with_attributes.publish(REQUEST + "2", {})
    assert with_attributes.expect_json(RESPONSE + "2") == {
        "client": {"fw": 1.0, "count": 7}, "shared": {"interval": 5, "mode": "eco"}}


def test_sections_are_omitted_when_empty(with_attributes: Device) -> None:
    with_attributes.publish(REQUEST + "3", {"sharedKeys": "interval"})
    assert with_attributes.expect_json(RESPONSE + "3") == {"shared": {"interval": 5}}
    with_attributes.publish(REQUEST + "4", {"clientKeys": "nope", "sharedKeys": "nada"})
    assert with_attributes.expect_json(RESPONSE + "4") == {}


def test_keys_are_not_trimmed_and_one_element_arrays_work(with_attributes: Device) -> None:
    with_attributes.publish(REQUEST + "5", {"sharedKeys": "interval, mode"})
    assert with_attributes.expect_json(RESPONSE + "5") == {"shared": {"interval": 5}}  # " mode" does not exist
    with_attributes.publish(REQUEST + "6", {"sharedKeys": ["mode"]})
    assert with_attributes.expect_json(RESPONSE + "6") == {"shared": {"mode": "eco"}}


def test_response_is_sent_without_a_subscription_at_qos1(with_attributes: Device, standin: StandIn) -> None:
    assert standin.subscriptions("dev1") == {}
    with_attributes.publish(REQUEST + "7", {})
    assert with_attributes.expect(RESPONSE + "7").qos == 1


def test_response_qos_follows_a_matching_subscription(with_attributes: Device) -> None:
    assert with_attributes.subscribe(RESPONSE + "+", qos=0) == [0]
    with_attributes.publish(REQUEST + "8", {})
    assert with_attributes.expect(RESPONSE + "8").qos == 0


def test_negative_request_id_gets_no_response(with_attributes: Device) -> None:
    with_attributes.publish(REQUEST + "-1", {})
    with_attributes.publish(REQUEST + "9", {})
    assert with_attributes.expect(lambda t: t.startswith(RESPONSE)).topic == RESPONSE + "9"


@pytest.mark.parametrize("topic,payload", [
    (REQUEST + "abc", b"{}"), (REQUEST + "1", b""), (REQUEST + "1", b'{"sharedKeys":["a","b"]}'),
], ids=["non-integer-id", "empty-payload", "multi-element-array"])
def test_invalid_attribute_request_is_an_invalid_payload(with_attributes: Device, standin: StandIn,
                                                         topic: str, payload: bytes) -> None:
    """MTH:668-676: closed without PUBACK on 3.1.1, PUBACK 0x99 on MQTT 5."""
    info = with_attributes.publish(topic, payload)
    with_attributes.expect_invalid_payload_answer(info, standin)


def test_shared_updates_are_pushed_flat_and_deletions_as_deleted(connected: Device, standin: StandIn) -> None:
    assert connected.subscribe(ATTRIBUTES) == [1]
    standin.set_shared("dev1", {"interval": 10})
    assert connected.expect_json(ATTRIBUTES) == {"interval": 10}
    standin.delete_shared("dev1", ["interval"])
    assert connected.expect_json(ATTRIBUTES) == {"deleted": ["interval"]}
    assert standin.shared("dev1") == {}


def test_nothing_is_replayed_on_subscribe(connected: Device, standin: StandIn) -> None:
    standin.set_shared("dev1", {"before": 1})
    connected.subscribe(ATTRIBUTES)
    standin.set_shared("dev1", {"after": 2})
    assert connected.expect_json(ATTRIBUTES) == {"after": 2}


def test_updates_stop_after_unsubscribe(connected: Device, standin: StandIn) -> None:
    connected.subscribe(ATTRIBUTES, "v1/devices/me/rpc/request/+")
    connected.client.unsubscribe(ATTRIBUTES)
    standin.wait_for(lambda: ATTRIBUTES not in standin.subscriptions("dev1"))
    standin.set_shared("dev1", {"x": 1})
    future = standin.rpc_async("dev1", "sentinel", None, timeout=5, oneway=True)
    assert connected.expect(lambda t: True).topic == "v1/devices/me/rpc/request/0"
    future.result(5)


def test_unknown_filters_fail_in_suback_and_the_connection_stays(connected: Device, standin: StandIn) -> None:
    codes = connected.subscribe(ATTRIBUTES, "v2/fw/response/+", "v1/devices/me/#", "v1/devices/me/rpc/request/+",
                                "v2/sw/response/+/chunk/+", qos=2)
    failed = connected.code(0x80, 0x8F)  # ReturnCodeResolver.java:45-63: TOPIC_FILTER_INVALID on MQTT 5
    assert codes == [1, failed, failed, 1, 1]  # QoS 2 is granted as 1
    connected.publish_acked("v1/devices/me/telemetry", {"still": "here"})
    assert standin.is_connected("dev1")


def test_unsuback_reason_codes_on_mqtt5(connected: Device) -> None:
    """MTH:982-1050: SUCCESS for a filter the session had, NO_SUBSCRIPTION_EXISTED (0x11) otherwise; the
    reason codes are written on MQTT 5 only (createUnSubAckMessage, MTH:1053-1060)."""
    connected.subscribe(ATTRIBUTES)
    codes = connected.unsubscribe(ATTRIBUTES, "v1/devices/me/rpc/request/+")
    assert codes == ([0x00, 0x11] if connected.v5 else [])
