"""CONNECT, authentication, sessions and TLS (PROTOCOL.md §0.3, §0.4, §7 items 2 and 10)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.standin.helpers import V5, V311, Device
from tools.tb_standin import StandIn


def test_access_token_as_username_connects(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "token1", client_id="anything", password=None)
    assert device.connect() == 0
    assert standin.wait_for(lambda: standin.is_connected("dev1"))


def test_generated_token_works(standin: StandIn, devices: Callable[..., Device]) -> None:
    token = standin.add_device("dev1")
    assert len(token) == 20
    devices(standin.port, token).connect()


def test_wrong_token_is_refused_with_bad_credentials(standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:1354-1356: username without password is BAD_USERNAME_OR_PASSWORD, 0x86 on MQTT 5; on 3.1.1
    ReturnCodeResolver.java:30-32 makes it 0x05. MQTT 5 then gets DISCONNECT with the same code (MTH:1361-1362)."""
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "wrong")
    assert device.connect(expect=None) == device.code(0x05, 0x86)
    device.wait_closed()


@pytest.mark.parametrize("password", ["", "secret"], ids=["empty-password", "any-password"])
def test_token_login_ignores_the_password(standin: StandIn, devices: Callable[..., Device], password: str) -> None:
    """DefaultTransportApiService.java:287-292: a username found as ACCESS_TOKEN credentials is accepted
    whatever the password (after no MQTT_BASIC credentials matched, DTAS:240-255). The gateway logs in
    with the token and an empty password."""
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "token1", password=password)
    assert device.connect() == 0
    device.publish_acked("v1/devices/me/telemetry", {"in": True})
    assert standin.latest("dev1") == {"in": True}


def test_wrong_token_with_a_password_is_bad_credentials(standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:1354: username, password and clientId all present and no match: 0x86 (MQTT 5) / 0x05 (3.1.1)."""
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "wrong", password="")
    assert device.connect(expect=None) == device.code(0x05, 0x86)


def test_no_credentials_at_all_is_not_authorized(standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:1349 default NOT_AUTHORIZED: 0x87 on MQTT 5, 0x05 on 3.1.1 (ReturnCodeResolver.java:31-32)."""
    device = devices(standin.port)
    assert device.connect(expect=None) == device.code(0x05, 0x87)


def test_unknown_client_id_without_credentials_is_identifier_rejected(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:1357-1358 CLIENT_IDENTIFIER_NOT_VALID: 0x85 on MQTT 5, 0x02 on 3.1.1 (ReturnCodeResolver.java:33-34)."""
    device = devices(standin.port, client_id="some-client")
    assert device.connect(expect=None) == device.code(0x02, 0x85)


def test_provision_username_or_client_id_always_gets_connack_0(standin: StandIn,
                                                               devices: Callable[..., Device]) -> None:
    assert devices(standin.port, "provision", password="ignored").connect() == 0
    assert devices(standin.port, client_id="provision").connect() == 0


def test_session_present_mirrors_clean_session_but_no_state_is_kept(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    first = devices(standin.port, "token1", client_id="c1", clean_session=False)
    first.connect()
    assert first.session_present is True  # TB sends !cleanSession
    first.subscribe("v1/devices/me/attributes")
    first.close()
    standin.wait_for(lambda: not standin.is_connected("dev1"))

    second = devices(standin.port, "token1", client_id="c1", clean_session=False)
    second.connect()
    assert standin.subscriptions("dev1") == {}  # the subscription did not survive
    second.subscribe("v1/devices/me/rpc/request/+")
    standin.set_shared("dev1", {"a": 1})  # not subscribed to attributes in this session
    future = standin.rpc_async("dev1", "ping", {})
    message = second.expect(lambda t: True)
    assert message.topic == "v1/devices/me/rpc/request/0"  # the attribute update never came first
    second.client.publish("v1/devices/me/rpc/response/0", "{}", qos=1)
    assert future.result(5) == {}


def test_new_connection_of_same_device_closes_the_older_one(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    older = devices(standin.port, "token1")
    older.connect()
    newer = devices(standin.port, "token1")
    newer.connect()
    older.expect_server_disconnect(0x8E)  # MAX_CONCURRENT_SESSIONS_LIMIT_REACHED -> SESSION_TAKEN_OVER, MTH:1455
    assert standin.disconnect_reasons("dev1") == ["session_taken_over"]
    newer.publish_acked("v1/devices/me/telemetry", {"alive": True})
    assert standin.is_connected("dev1")


def test_keep_alive_is_not_enforced_and_idle_sessions_close_after_inactivity_timeout(
        make_standin: Callable[..., StandIn], devices: Callable[..., Device]) -> None:
    standin = make_standin(inactivity_timeout=0.5)
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "token1")
    device.client._keepalive = 0  # noqa: SLF001 - paho sends no PINGREQ; TB would not care about keep-alive anyway
    device.connect()
    device.wait_closed(timeout=5)
    assert standin.disconnect_reasons("dev1") == ["inactivity_timeout"]
    if device.v5:
        assert device.disconnect_reasons == [0xA0]  # SESSION_TIMEOUT -> MAXIMUM_CONNECT_TIME, MTH:1456


def test_connect_over_tls_with_generated_ca(tls_standin: StandIn, standin_certs: dict[str, str],
                                           devices: Callable[..., Device]) -> None:
    tls_standin.add_device("dev1", "token1")
    assert tls_standin.tls_port not in (None, tls_standin.port)
    device = devices(tls_standin.tls_port, "token1", tls_ca=standin_certs["cafile"])
    device.connect()
    device.publish_acked("v1/devices/me/telemetry", {"t": 1})
    assert tls_standin.telemetry("dev1", "t")[0][1] == 1


def test_tls_standin_generates_its_own_certificates_when_none_given(devices: Callable[..., Device]) -> None:
    with StandIn(tls_port=0) as standin:
        standin.add_device("dev1", "token1")
        assert standin.cafile is not None
        device = devices(standin.tls_port, "token1", tls_ca=standin.cafile)
        device.connect()
        device.close()


def test_server_disconnect_is_logged_with_reason(connected: Device, standin: StandIn) -> None:
    assert standin.disconnect("dev1") is True
    connected.expect_server_disconnect(0x98)  # stand-in operation; closed like TB's administrative closes
    assert standin.disconnect_reasons("dev1") == ["admin_disconnect"]
    assert standin.disconnect("dev1") is False


def test_both_protocol_versions_share_one_port(standin: StandIn) -> None:
    """MTH:1062-1066, 1208-1217: the version is read from each CONNECT and kept per session."""
    standin.add_device("old", "token-old")
    standin.add_device("new", "token-new")
    old = Device(standin.port, "token-old", protocol=V311)
    new = Device(standin.port, "token-new", protocol=V5)
    try:
        old.connect()
        new.connect()
        assert old.publish_acked("v1/devices/me/nonsense", {}) == 0  # no reason codes on 3.1.1
        assert new.publish_acked("v1/devices/me/nonsense", {}) == 0x90
        assert old.subscribe("nope") == [0x80] and new.subscribe("nope") == [0x8F]
    finally:
        old.close()
        new.close()


def test_mqtt_basic_credentials_connect(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_provision_profile("k", "s")
    provisioner = devices(standin.port, "provision")
    provisioner.connect()
    provisioner.publish("/provision/request", {"deviceName": "basic1", "provisionDeviceKey": "k",
                                               "provisionDeviceSecret": "s", "credentialsType": "MQTT_BASIC",
                                               "clientId": "cid1", "username": "user1", "password": "pw1"})
    assert provisioner.expect_json("/provision/response")["status"] == "SUCCESS"
    assert devices(standin.port, "user1", client_id="cid1", password="pw1").connect() == 0
    refused = devices(standin.port, "user1", client_id="cid1", password="bad")
    assert refused.connect(expect=None) == refused.code(0x05, 0x86)


def test_credentials_update_closes_the_session_and_the_old_token_stops_working(
        connected: Device, standin: StandIn, devices: Callable[..., Device]) -> None:
    """MTH:1454: CREDENTIALS_UPDATED closes with ADMINISTRATIVE_ACTION (DISCONNECT 0x98 on MQTT 5)."""
    standin.set_token("dev1", "token2")
    connected.expect_server_disconnect(0x98)
    assert standin.disconnect_reasons("dev1") == ["credentials_updated"]
    old = devices(standin.port, "token1")
    assert old.connect(expect=None) == old.code(0x05, 0x86)
    devices(standin.port, "token2").connect()


def test_device_delete_closes_the_session(connected: Device, standin: StandIn,
                                          devices: Callable[..., Device]) -> None:
    """MTH:1613-1616: onDeviceDeleted closes with ADMINISTRATIVE_ACTION (DISCONNECT 0x98 on MQTT 5)."""
    standin.delete_device("dev1")
    connected.expect_server_disconnect(0x98)
    assert standin.disconnect_reasons("dev1") == ["device_deleted"]
    old = devices(standin.port, "token1")
    assert old.connect(expect=None) == old.code(0x05, 0x86)


def test_connack_carries_no_properties(connected: Device) -> None:
    """createMqttConnAckMsg (MTH:1151-1157) sets sessionPresent and the return code only: no Receive Maximum,
    no Maximum Packet Size, no Topic Alias Maximum."""
    assert connected.connack_properties == {}
