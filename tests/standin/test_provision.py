"""Device provisioning over MQTT (§4, §7 item 8)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.standin.helpers import Device, acked
from tools.tb_standin import StandIn

NOT_FOUND = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}


@pytest.fixture
def provision(standin: StandIn, devices: Callable[..., Device]) -> Callable[[dict[str, Any]], Any]:
    """Send one provision request on a fresh provision session and return the raw response text."""
    standin.add_provision_profile("key-a", "secret-a")  # ALLOW_CREATE_NEW_DEVICES
    standin.add_provision_profile("key-p", "secret-p", "CHECK_PRE_PROVISIONED_DEVICES", name="pre")

    def send(request: dict[str, Any]) -> Any:
        device = devices(standin.port, "provision")
        device.connect()
        assert device.subscribe("/provision/response") == [1]
        device.publish("/provision/request", request)
        return device.expect("/provision/response").payload.decode()
    return send


def test_allow_create_with_device_token(provision: Callable[..., Any], standin: StandIn,
                                        devices: Callable[..., Device]) -> None:
    raw = provision({"deviceName": "new1", "provisionDeviceKey": "key-a", "provisionDeviceSecret": "secret-a",
                     "credentialsType": "ACCESS_TOKEN", "token": "tok-new1"})
    assert raw == '{"credentialsValue":"tok-new1","credentialsType":"ACCESS_TOKEN","status":"SUCCESS"}'
    assert standin.device_info("new1")["server"] == {"provisionState": "provisioned"}
    devices(standin.port, "tok-new1").connect()


def test_allow_create_generates_a_token(provision: Callable[..., Any], standin: StandIn) -> None:
    response = json.loads(provision({"deviceName": "new2", "provisionDeviceKey": "key-a",
                                     "provisionDeviceSecret": "secret-a"}))
    assert response["status"] == "SUCCESS" and len(response["credentialsValue"]) == 20
    assert standin.devices()["new2"] == response["credentialsValue"]


def test_allow_create_mqtt_basic(provision: Callable[..., Any]) -> None:
    response = json.loads(provision({"deviceName": "b1", "provisionDeviceKey": "key-a",
                                     "provisionDeviceSecret": "secret-a", "credentialsType": "MQTT_BASIC",
                                     "clientId": "cid", "username": "user", "password": "pw"}))
    assert response == {"credentialsValue": {"clientId": "cid", "userName": "user", "password": "pw"},
                        "credentialsType": "MQTT_BASIC", "status": "SUCCESS"}


def test_missing_device_name_gets_a_random_one(provision: Callable[..., Any], standin: StandIn) -> None:
    response = json.loads(provision({"provisionDeviceKey": "key-a", "provisionDeviceSecret": "secret-a"}))
    assert response["status"] == "SUCCESS"
    [name] = [n for n in standin.devices() if len(n) == 20]
    assert standin.devices()[name] == response["credentialsValue"]


def test_allow_create_fails_when_the_name_exists(provision: Callable[..., Any], standin: StandIn) -> None:
    standin.add_device("taken", "tok-taken")
    assert json.loads(provision({"deviceName": "taken", "provisionDeviceKey": "key-a",
                                 "provisionDeviceSecret": "secret-a"})) == FAILURE


@pytest.mark.parametrize("request_body", [
    {"deviceName": "x", "provisionDeviceKey": "nope", "provisionDeviceSecret": "secret-a"},
    {"deviceName": "x", "provisionDeviceKey": "key-a", "provisionDeviceSecret": "wrong"},
    {"deviceName": "x", "provisionDeviceKey": "", "provisionDeviceSecret": ""},
], ids=["unknown-key", "wrong-secret", "empty-key"])
def test_not_found(provision: Callable[..., Any], request_body: dict[str, Any]) -> None:
    assert provision(request_body) == '{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}'


def test_whitespace_name_is_a_failure(provision: Callable[..., Any]) -> None:
    assert json.loads(provision({"deviceName": "  ", "provisionDeviceKey": "key-a",
                                 "provisionDeviceSecret": "secret-a"})) == FAILURE


def test_pre_provisioned_device_gets_its_existing_credentials_once(provision: Callable[..., Any],
                                                                   standin: StandIn) -> None:
    standin.add_device("pre1", "tok-pre1", profile="pre")
    request = {"deviceName": "pre1", "provisionDeviceKey": "key-p", "provisionDeviceSecret": "secret-p"}
    assert json.loads(provision(request)) == {"credentialsValue": "tok-pre1", "credentialsType": "ACCESS_TOKEN",
                                              "status": "SUCCESS"}
    assert json.loads(provision(request)) == FAILURE  # already provisioned


def test_pre_provisioned_missing_or_other_profile_fails(provision: Callable[..., Any], standin: StandIn) -> None:
    standin.add_device("other", "tok-other", profile="default")
    for name in ("missing", "other"):
        assert json.loads(provision({"deviceName": name, "provisionDeviceKey": "key-p",
                                     "provisionDeviceSecret": "secret-p"})) == FAILURE


def test_missing_key_is_acked_with_an_error_then_closed_without_a_response(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:328-331: the RuntimeException gets PUBACK IMPLEMENTATION_SPECIFIC_ERROR (0x83 on MQTT 5, a plain
    PUBACK on 3.1.1), then closeCtx with DISCONNECT 0x83; no provisioning response."""
    device = devices(standin.port, "provision")
    device.connect()
    info = device.publish("/provision/request", {"deviceName": "x", "provisionDeviceSecret": "s"})
    device.expect_server_disconnect(0x83)
    assert device.puback_code(info) == device.code(0, 0x83)
    assert device.messages.empty()
    assert standin.events(kind="disconnected")[-1].detail == "provision_missing_key"


def test_provision_session_accepts_only_its_topics(standin: StandIn, devices: Callable[..., Device]) -> None:
    """Subscribe: MTH:842-848 (0x80 / 0x8F). Publish elsewhere: MTH:323-327, PUBACK TOPIC_NAME_INVALID
    (0x90 on MQTT 5) first, then closeCtx(TOPIC_NAME_INVALID), DISCONNECT 0x90 on MQTT 5."""
    device = devices(standin.port, "provision")
    device.connect()
    assert device.subscribe("/provision/response", "v1/devices/me/attributes") == [1, device.code(0x80, 0x8F)]
    info = device.publish("v1/devices/me/telemetry", {"a": 1})
    device.expect_server_disconnect(0x90)
    assert device.puback_code(info) == device.code(0, 0x90)
    assert standin.events(kind="disconnected")[-1].detail == "provision_bad_topic"


def test_response_is_sent_without_subscription_and_the_session_closes_later(
        make_standin: Callable[..., StandIn], devices: Callable[..., Device]) -> None:
    standin = make_standin(provision_close_after=0.3)
    standin.add_provision_profile("k", "s")
    device = devices(standin.port, client_id="provision")
    device.connect()
    device.publish_acked("/provision/request", {"deviceName": "d", "provisionDeviceKey": "k",
                                                "provisionDeviceSecret": "s"})
    assert device.expect_json("/provision/response")["status"] == "SUCCESS"
    device.wait_closed()
    assert standin.events(kind="disconnected")[-1].detail == "provision_session_expired"
