"""The MQTT link against the real stand-in and mosquitto, over TLS with the rig's CA."""

from __future__ import annotations

import json
import socket
import threading
import time
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

    def make(port: int, token: str = TOKEN, ca: Path | None = None, protocol: str | None = None,
             keepalive: int = 60) -> tuple[MqttLink, list[tuple[str, dict[str, Any]]]]:
        token_file = tmp_path / f"token-{len(links)}"
        token_file.write_text(token + "\n")
        events: list[tuple[str, dict[str, Any]]] = []
        link = MqttLink(host="localhost", port=port, tls=True, ca_cert=ca or tls_material.ca_cert,
                        token_path=token_file, post=lambda name, data: events.append((name, data)),
                        protocol=protocol or mqtt_protocol(), keepalive=keepalive)
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


# -- the network loop: asleep while idle, awake for keepalive, a publish, a stop --------------

NETWORK_THREAD = "paho-mqtt-client-"  # the session's network thread (paho's own had this name too)


class Proxy:
    """A TCP relay between the link and a server, that can turn into a black hole (``freeze``).

    It records when it relays a chunk each way: over TLS a lone PINGREQ or PINGRESP is
    one chunk, so an idle session's chunks are its keepalive exchanges.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.relayed: dict[str, list[float]] = {"up": [], "down": []}
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, name="test-proxy", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if self.frozen.is_set():
                    continue  # swallowed: the other side waits for an answer that never comes
                self.relayed[direction].append(time.monotonic())
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def proxy(standin: StandIn) -> Iterator[Proxy]:
    relay = Proxy(standin.tls_port)
    yield relay
    relay.close()


def network_thread(link: MqttLink) -> threading.Thread:
    """The live session's network thread, found by name as a thread of this process."""
    def found() -> threading.Thread | None:
        live = [t for t in threading.enumerate() if t.name == NETWORK_THREAD and t.is_alive()]
        return live[-1] if len(live) == 1 else None  # earlier tests' sessions have ended
    return wait_for(found, what=f"one live {NETWORK_THREAD} thread")


def wake_ups(thread: threading.Thread) -> int:
    """How often the thread has blocked and woken again (voluntary context switches, Linux)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def publish_and_wait(link: MqttLink, timeout: float = 10.0) -> tuple[bool, str | None]:
    results: list[tuple[bool, str | None]] = []
    link.publish_async("v1/devices/me/telemetry", b'{"n": 1}', 1, lambda ok, err: results.append((ok, err)))
    return wait_for(lambda: results, timeout, "the PUBACK")[0]


def test_an_idle_session_does_not_wake_its_network_thread(standin: StandIn, make_link: Any) -> None:
    """Paho's loop_start thread woke once a second whatever happened (issue #16); ours sleeps
    until the keepalive is due (60 s here) or something happens."""
    link, _ = make_link(standin.tls_port)
    connected(link)
    thread = network_thread(link)
    time.sleep(0.5)  # the connect's last packets (CONNACK read) are behind us
    before = wake_ups(thread)
    time.sleep(3.0)
    woke = wake_ups(thread) - before
    assert woke <= 1, f"the network thread woke up {woke} times in 3 s while the session was idle"


def test_a_publish_from_another_thread_wakes_the_sleeping_loop(standin: StandIn, make_link: Any) -> None:
    link, _ = make_link(standin.tls_port)  # keepalive 60: the loop's select would sleep ~60 s
    connected(link)
    thread = network_thread(link)
    time.sleep(0.3)
    asleep = wake_ups(thread)
    results: list[tuple[bool, str | None, str]] = []
    publisher = threading.Thread(target=link.publish_async, args=(
        "v1/devices/me/telemetry", b'{"n": 1}', 1,
        lambda ok, err: results.append((ok, err, threading.current_thread().name))))
    publisher.start()
    publisher.join()
    wait_for(lambda: results, 10.0, "the PUBACK, long before the select's keepalive timeout")
    assert results == [(True, None, NETWORK_THREAD)]  # on_done runs on the network thread
    assert wake_ups(thread) > asleep
    assert standin.telemetry_count("dev") == 1


def test_stopping_an_idle_link_returns_at_once_and_leaves_no_thread(standin: StandIn, make_link: Any) -> None:
    link, events = make_link(standin.tls_port)
    connected(link)
    thread = network_thread(link)
    time.sleep(0.5)
    started = time.monotonic()
    link.close()
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()
    assert events[-1] == ("mqtt_disconnected", {"session": 1, "reason": "gateway stopping"})


def test_an_idle_session_with_a_short_keepalive_pings_and_stays_up(
        standin: StandIn, proxy: Proxy, make_link: Any) -> None:
    link, events = make_link(proxy.port, keepalive=2)
    connected(link)
    time.sleep(0.2)
    quiet_since = time.monotonic()
    time.sleep(7.0)  # three and a half keepalive periods
    assert [name for name, _ in events] == ["mqtt_connected"]
    pings = [t - quiet_since for t in proxy.relayed["up"] if t > quiet_since]
    answers = [t for t in proxy.relayed["down"] if t > quiet_since]
    assert len(pings) == len(answers) == 3, (pings, answers)  # one PINGREQ per keepalive period, each answered
    assert all(later - earlier < 2.5 for earlier, later in zip([0.0, *pings], pings)), pings
    assert publish_and_wait(link) == (True, None)


def test_an_idle_session_with_a_short_keepalive_stays_up_on_mosquitto(mosquitto: Any, make_link: Any) -> None:
    """Mosquitto, unlike the stand-in, enforces the keepalive: it drops a client silent
    for 1.5 x keepalive (3 s here)."""
    link, events = make_link(mosquitto.tls_port, ca=mosquitto.ca_cert, keepalive=2)
    connected(link)
    thread = network_thread(link)
    time.sleep(0.2)
    before = wake_ups(thread)
    time.sleep(7.0)
    assert [name for name, _ in events] == ["mqtt_connected"]
    # A timeout, the PINGREQ, its PINGRESP: a few wake-ups per period, not one a second on top.
    assert wake_ups(thread) - before <= 3 * 4, "more wake-ups than the keepalive exchanges need"
    assert publish_and_wait(link) == (True, None)


def test_a_server_that_stops_answering_pingreq_ends_the_session(
        standin: StandIn, proxy: Proxy, make_link: Any) -> None:
    link, events = make_link(proxy.port, keepalive=1)
    connected(link)
    proxy.frozen.set()
    frozen_at = time.monotonic()
    wait_for(lambda: len(events) == 2, 6.0, "the end of a session whose PINGRESP never came")
    # PINGREQ one keepalive after the last traffic, the end one keepalive later.
    assert time.monotonic() - frozen_at >= 1.0
    assert events[1] == ("mqtt_disconnected", {"session": 1, "reason": "Keep alive timeout"})
    assert link.session is None


def test_publishes_from_racing_threads_never_wait_for_the_keepalive(standin: StandIn, make_link: Any) -> None:
    """Each publish waits for its PUBACK, so the loop's queue keeps going empty while the other
    thread publishes: a wake lost in that race would leave a packet queued until the keepalive
    (60 s) woke the loop, far past the 5 s each publish is given here."""
    link, _ = make_link(standin.tls_port)
    connected(link)
    failures: list[str] = []

    def publisher(first_ts: int) -> None:
        for ts in range(first_ts, first_ts + 150):
            done: list[bool] = []
            payload = json.dumps({"ts": ts, "values": {"n": ts}}).encode()
            link.publish_async("v1/devices/me/telemetry", payload, 1, lambda ok, err: done.append(ok))
            try:
                wait_for(lambda: done, 5.0, "the PUBACK", interval=0.001)
            except AssertionError as exc:
                failures.append(str(exc))
                return
            if done != [True]:
                failures.append(f"publish {ts} failed")

    threads = [threading.Thread(target=publisher, args=(1000 * (i + 1),)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert standin.telemetry_count("dev") == 450


def test_a_stale_write_flag_left_by_that_race_does_not_swallow_the_next_wake(
        standin: StandIn, make_link: Any) -> None:
    """The race's end state, made on purpose: a publisher raised paho's ``_registered_write``
    (and woke the loop) just after the loop had written its packet, so the flag is up with
    nothing queued. Paho calls the wake-up callback only while the flag is down: unless the
    loop lowers it on that wake, the next publish is never announced and waits for the keepalive."""
    link, _ = make_link(standin.tls_port)  # keepalive 60
    connected(link)
    session = link.session
    assert session is not None
    time.sleep(0.3)
    session.client._registered_write = True
    session.wake()
    time.sleep(0.3)  # the loop has handled that wake and sleeps again
    assert publish_and_wait(link, timeout=5.0) == (True, None)
