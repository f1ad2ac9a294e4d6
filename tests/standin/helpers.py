"""A plain paho-mqtt 2.x client playing a device (MQTT 3.1.1, as the gateway speaks it)."""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

# paho reports MQTT 3.1.1 CONNACK codes as v5 reason-code names; map them back to the wire value.
CONNACK_CODES = {"Success": 0, "Unsupported protocol version": 1, "Client identifier not valid": 2,
                 "Server unavailable": 3, "Bad user name or password": 4, "Not authorized": 5}
WAIT = 5.0


def acked(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the PUBACK for ``info`` arrived; paho raises instead when the connection dropped first."""
    try:
        return info.is_published()
    except RuntimeError:
        return False


class Device:
    """A paho MQTT 3.1.1 client playing a device, with blocking helpers for tests."""

    def __init__(self, port: int, username: str | None = None, client_id: str = "", password: str | None = None,
                 tls_ca: str | None = None, clean_session: bool = True) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=clean_session, reconnect_on_failure=False)
        if username is not None or password is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        self.port = port
        self.connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.disconnected = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._held: list[mqtt.MQTTMessage] = []
        self._subacks: dict[int, list[int]] = {}
        self._suback_event = threading.Condition()
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.disconnected.set()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack.put((CONNACK_CODES[reason.getName()], bool(flags.session_present)))

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)
        self.messages.put(message)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        with self._suback_event:
            self._subacks[mid] = [code.value for code in codes]
            self._suback_event.notify_all()

    def connect(self, expect: int | None = 0) -> int:
        """Connect and return the MQTT 3.1.1 CONNACK code (asserting ``expect`` unless None)."""
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()
        code, self.session_present = self.connack.get(timeout=WAIT)
        if expect is not None:
            assert code == expect
        return code

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        """Subscribe and return the SUBACK codes (granted QoS, or 0x80 for a refused filter)."""
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        with self._suback_event:
            assert self._suback_event.wait_for(lambda: mid in self._subacks, WAIT)
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any],
                qos: int = 1) -> mqtt.MQTTMessageInfo:
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        return self.client.publish(topic, payload, qos=qos)

    def publish_acked(self, topic: str, payload: Any, qos: int = 1) -> None:
        """Publish and wait for the PUBACK."""
        info = self.publish(topic, payload, qos)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def expect(self, topic: str | Callable[[str], bool], timeout: float = WAIT) -> mqtt.MQTTMessage:
        """The next message on ``topic`` (or matching a predicate); others are kept for later."""
        match = topic if callable(topic) else (lambda t: t == topic)
        for index, message in enumerate(self._held):
            if match(message.topic):
                return self._held.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message on {topic}")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                raise AssertionError(f"no message on {topic}") from None
            if match(message.topic):
                return message
            self._held.append(message)

    def expect_json(self, topic: str, timeout: float = WAIT) -> Any:
        return json.loads(self.expect(topic, timeout).payload)

    def wait_closed(self, timeout: float = WAIT) -> None:
        """Wait until the server closed the connection."""
        assert self.disconnected.wait(timeout), "the server did not close the connection"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
