"""CONNECT, authentication, sessions and TLS (PROTOCOL.md §0.3, §0.4, §7 items 2 and 10)."""

from __future__ import annotations

from collections.abc import Callable

from tests.standin.helpers import Device
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


def test_wrong_token_is_refused_with_not_authorized(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "wrong")
    assert device.connect(expect=None) == 0x05
    device.wait_closed()


def test_token_with_a_password_is_treated_as_basic_credentials_and_refused(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_device("dev1", "token1")
    assert devices(standin.port, "token1", password="secret").connect(expect=None) == 0x05


def test_no_credentials_at_all_is_not_authorized(standin: StandIn, devices: Callable[..., Device]) -> None:
    assert devices(standin.port).connect(expect=None) == 0x05


def test_unknown_client_id_without_credentials_is_identifier_rejected(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    assert devices(standin.port, client_id="some-client").connect(expect=None) == 0x02


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
    older.wait_closed()
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
    connected.wait_closed()
    assert standin.disconnect_reasons("dev1") == ["admin_disconnect"]
    assert standin.disconnect("dev1") is False


def test_mqtt5_client_is_refused_with_unsupported_protocol_version(
        standin: StandIn, devices: Callable[..., Device]) -> None:
    # The stand-in speaks MQTT 3.1.1 only (amqtt 0.12.1 has no MQTT 5); see the README.
    import paho.mqtt.client as mqtt

    standin.add_device("dev1", "token1")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    client.username_pw_set("token1")
    refused: list[str] = []
    client.on_connect = lambda c, u, f, reason, p: refused.append(reason.getName())
    client.connect("127.0.0.1", standin.port)
    client.loop_start()
    try:
        standin.wait_for(lambda: refused)
        assert refused[0] == "Unsupported protocol version"
        assert standin.events("dev1", "connect_refused") or standin.events(kind="connect_refused")
    finally:
        client.loop_stop()


def test_mqtt_basic_credentials_connect(standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.add_provision_profile("k", "s")
    provisioner = devices(standin.port, "provision")
    provisioner.connect()
    provisioner.publish("/provision/request", {"deviceName": "basic1", "provisionDeviceKey": "k",
                                               "provisionDeviceSecret": "s", "credentialsType": "MQTT_BASIC",
                                               "clientId": "cid1", "username": "user1", "password": "pw1"})
    assert provisioner.expect_json("/provision/response")["status"] == "SUCCESS"
    assert devices(standin.port, "user1", client_id="cid1", password="pw1").connect() == 0
    assert devices(standin.port, "user1", client_id="cid1", password="bad").connect(expect=None) == 0x05


def test_credentials_update_closes_the_session_and_the_old_token_stops_working(
        connected: Device, standin: StandIn, devices: Callable[..., Device]) -> None:
    standin.set_token("dev1", "token2")
    connected.wait_closed()
    assert standin.disconnect_reasons("dev1") == ["credentials_updated"]
    assert devices(standin.port, "token1").connect(expect=None) == 0x05
    devices(standin.port, "token2").connect()


def test_device_delete_closes_the_session(connected: Device, standin: StandIn,
                                          devices: Callable[..., Device]) -> None:
    standin.delete_device("dev1")
    connected.wait_closed()
    assert standin.disconnect_reasons("dev1") == ["device_deleted"]
    assert devices(standin.port, "token1").connect(expect=None) == 0x05
