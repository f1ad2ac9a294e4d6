"""The MQTT link against the real stand-in and mosquitto, over TLS with the rig's CA."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from teg_fsm.adapters.mqtt_link import DEVICE, PROVISION, MqttLink, Refused
from tests.rig.protocol import mqtt_protocol
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration
TOKEN = "link-test-token"


class Settled:
    """Records how an effect's completion was settled (the engine's Completion contract)."""

    def __init__(self) -> None:
        self.outcome: tuple[Any, ...] | None = None

    def succeed(self, result: Any = None) -> bool:
        return self._set(("succeeded", result))

    def fail(self, error: str, details: dict[str, Any] | None = None) -> bool:
        return self._set(("failed", error, details or {}))

    def _set(self, outcome: tuple[Any, ...]) -> bool:
        if self.outcome is not None:
            return False
        self.outcome = outcome
        return True


@pytest.fixture
def standin(tls_material: Any) -> Iterator[StandIn]:
    with StandIn(host="127.0.0.1", tls_port=0, certfile=str(tls_material.server_cert),
                 keyfile=str(tls_material.server_key)) as running:
        running.add_device("dev", token=TOKEN)
        yield running


@pytest.fixture
def make_link(tmp_path: Path, tls_material: Any) -> Iterator[Callable[..., tuple[MqttLink, list[tuple[str, dict[str, Any]]]]]]:
    links: list[MqttLink] = []

    def make(port: int, token: str = TOKEN, ca: Path | None = None,
             protocol: str | None = None) -> tuple[MqttLink, list[tuple[str, dict[str, Any]]]]:
        token_file = tmp_path / f"token-{len(links)}"
        token_file.write_text(token + "\n")
        events: list[tuple[str, dict[str, Any]]] = []
        link = MqttLink(host="localhost", port=port, tls=True, ca_cert=ca or tls_material.ca_cert,
                        token_path=token_file, post=lambda name, data: events.append((name, data)),
                        protocol=protocol or mqtt_protocol())
        links.append(link)
        return link, events

    yield make
    for link in links:
        link.close()


def connected(link: MqttLink, purpose: str = DEVICE) -> Settled:
    settled = Settled()
    link.connect(purpose, settled)
    wait_for(lambda: settled.outcome)
    return settled


def test_qos1_publishes_complete_on_their_own_puback(standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port)
    assert connected(link).outcome == ("succeeded", {"session": 1})
    assert events == [("mqtt_connected", {"session": 1})]
    results: list[tuple[bool, str | None]] = []
    lock = threading.Lock()

    def on_done(ok: bool, error: str | None) -> None:
        with lock:
            results.append((ok, error))

    for i in range(300):
        link.publish_async("v1/devices/me/telemetry", json.dumps({"ts": 1000 + i, "values": {"n": i}}).encode(), 1, on_done)
    wait_for(lambda: len(results) == 300)
    assert results == [(True, None)] * 300
    assert standin.telemetry_count("dev") == 300


def test_pending_publishes_fail_when_the_session_is_lost(standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port)
    connected(link)
    standin.drop_pubacks(1, device="dev", disconnect=True)
    results: list[tuple[bool, str | None]] = []
    link.publish_async("v1/devices/me/telemetry", b'{"x": 1}', 1, lambda ok, err: results.append((ok, err)))
    wait_for(lambda: results)
    wait_for(lambda: ("mqtt_disconnected" in [name for name, _ in events]))
    # Depending on when paho notices the closed socket, the publish is failed as
    # lost in flight or refused on the spot; either way exactly once, never ok.
    [(ok, error)] = results
    assert ok is False
    assert "session lost" in (error or "") or "not currently connected" in (error or "")
    after: list[tuple[bool, str | None]] = []
    link.publish_async("v1/devices/me/telemetry", b'{"x": 2}', 1, lambda ok, err: after.append((ok, err)))
    assert after == [(False, "not connected to ThingsBoard")]


def test_shared_updates_and_server_rpcs_become_events(standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port)
    connected(link)
    subscribed = Settled()
    link.subscribe(("v1/devices/me/attributes", "v1/devices/me/rpc/request/+"), lambda ok, err: subscribed.succeed(ok))
    wait_for(lambda: subscribed.outcome)
    standin.set_shared("dev", {"sw_version": "v2"})
    standin.delete_shared("dev", ["sw_version"])
    standin.rpc_async("dev", "ping", {"a": 1}, oneway=True)
    wait_for(lambda: len(events) >= 4)
    assert events[1:4] == [
        ("shared_attributes_updated", {"values": {"sw_version": "v2"}, "deleted": []}),
        ("shared_attributes_updated", {"values": {}, "deleted": ["sw_version"]}),
        ("rpc_requested", {"request_id": 0, "method": "ping", "params": {"a": 1}}),
    ]


def test_a_wrong_token_is_reported_as_not_authorized(standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port, token="not-a-device")
    outcome = connected(link).outcome
    assert outcome is not None and outcome[0] == "failed" and outcome[2]["not_authorized"] is True
    assert events == []


def test_a_server_certificate_from_another_ca_is_refused(standin: StandIn, make_link: Any, tls_material: Any) -> None:
    link, _ = make_link(standin.tls_port, ca=tls_material.other_ca_cert)
    outcome = connected(link).outcome
    assert outcome is not None and outcome[0] == "failed" and "TLS" in outcome[1]


def test_a_provision_session_posts_no_connection_events(standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port)
    assert connected(link, PROVISION).outcome == ("succeeded", {"session": 1})
    assert link.device_session() is None
    link.close()
    assert events == []


def test_malformed_json_is_logged_and_the_link_keeps_working(
    mosquitto: Any, make_link: Any, caplog: pytest.LogCaptureFixture
) -> None:
    link, events = make_link(mosquitto.tls_port, ca=mosquitto.ca_cert)
    connected(link)
    done = Settled()
    link.subscribe(("v1/devices/me/attributes",), lambda ok, err: done.succeed(ok))
    wait_for(lambda: done.outcome)
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    sender.connect(mosquitto.host, mosquitto.port)
    sender.loop_start()
    try:
        sender.publish("v1/devices/me/attributes", b"{not json", qos=1).wait_for_publish(5)
        sender.publish("v1/devices/me/attributes", b'{"ok": true}', qos=1).wait_for_publish(5)
        wait_for(lambda: any(name == "shared_attributes_updated" for name, _ in events))
    finally:
        sender.disconnect()
        sender.loop_stop()
    assert [d for n, d in events if n == "shared_attributes_updated"] == [{"values": {"ok": True}, "deleted": []}]
    assert "malformed JSON" in caplog.text


# -- MQTT 5: reason codes and properties, each against its 3.1.1 counterpart -------------------

@pytest.mark.parametrize(("protocol", "code"), [("3.1.1", 0x87), ("5", 0x86)])
def test_a_wrong_token_is_not_authorized_on_both_versions(standin: StandIn, make_link: Any, protocol: str,
                                                          code: int) -> None:
    """TB answers a wrong token with CONNACK 5 on 3.1.1 (paho reports it as 0x87) and 0x86 on MQTT 5
    (MTH:1346-1362): both are the connection machine's "not authorized"."""
    link, events = make_link(standin.tls_port, token="not-a-device", protocol=protocol)
    outcome = connected(link).outcome
    assert outcome is not None and outcome[0] == "failed"
    assert outcome[2] == {"reason_code": code, "not_authorized": True}
    assert events == []


def test_a_puback_thingsboard_refuses_fails_the_publish_as_refused_and_the_session_stays(
        standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port, protocol="5")
    connected(link)
    standin.refuse_pubacks(1, code=0x99)
    results: list[tuple[bool, str | None]] = []
    link.publish_async("v1/devices/me/telemetry", b'{"ts": 1, "values": {"n": 1}}', 1,
                       lambda ok, error: results.append((ok, error)))
    link.publish_async("v1/devices/me/telemetry", b'{"ts": 2, "values": {"n": 2}}', 1,
                       lambda ok, error: results.append((ok, error)))
    wait_for(lambda: len(results) == 2)
    (ok, error), second = results
    assert ok is False and isinstance(error, Refused)
    assert (error, error.reason, error.code) == (
        "refused by ThingsBoard: Payload format invalid (0x99)", "Payload format invalid", 0x99)
    assert second == (True, None)
    assert [name for name, _ in events] == ["mqtt_connected"]  # refused, not lost: no disconnect
    assert [v for _, v in standin.telemetry("dev", "n")] == [2]


def test_the_servers_receive_maximum_bounds_the_publishes_in_flight(standin: StandIn, make_link: Any) -> None:
    standin.set_receive_maximum(2)
    standin.delay_pubacks(0.2)
    link, events = make_link(standin.tls_port, protocol="5")
    connected(link)
    assert events == [("mqtt_connected", {"session": 1, "receive_maximum": 2})]
    results: list[tuple[bool, str | None]] = []
    for i in range(8):
        link.publish_async("v1/devices/me/telemetry", json.dumps({"ts": i, "values": {"n": i}}).encode(), 1,
                           lambda ok, error: results.append((ok, error)))
    wait_for(lambda: len(results) == 8, 10)
    assert results == [(True, None)] * 8
    assert standin.peak_unacked("dev") == 2  # the configured window is 100; the stand-in closes above 2
    assert "receive_maximum_exceeded" not in standin.disconnect_reasons("dev")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_server_disconnect_ends_the_session_and_its_reason_is_logged_on_mqtt5(
        standin: StandIn, make_link: Any, protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    link, events = make_link(standin.tls_port, protocol=protocol)
    connected(link)
    standin.disconnect("dev")  # TB's administrative close: DISCONNECT 0x98 on MQTT 5, a bare close on 3.1.1
    wait_for(lambda: [name for name, _ in events] == ["mqtt_connected", "mqtt_disconnected"])
    reason = events[1][1]["reason"]
    if protocol == "5":
        assert reason == "DISCONNECT from ThingsBoard: Administrative action (0x98)"
        assert "ThingsBoard sent DISCONNECT Administrative action (0x98)" in caplog.text
    else:
        assert "DISCONNECT from ThingsBoard" not in reason
