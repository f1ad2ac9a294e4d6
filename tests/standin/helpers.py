"""A plain paho-mqtt 2.x client playing a device, on MQTT 3.1.1 (as the gateway speaks it) or MQTT 5."""

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
V311, V5 = 4, 5  # protocol levels, as the stand-in tests name the two versions


def acked(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the PUBACK for ``info`` arrived; paho raises instead when the connection dropped first."""
    try:
        return info.is_published()
    except RuntimeError:
        return False


class Device:
    """A paho client (MQTT 3.1.1 or 5) playing a device, with blocking helpers for tests."""

    def __init__(self, port: int, username: str | None = None, client_id: str = "", password: str | None = None,
                 tls_ca: str | None = None, clean_session: bool = True, protocol: int = V311) -> None:
        self.protocol = protocol
        self.clean_session = clean_session
        if protocol == V5:  # MQTT 5 has clean_start on connect() instead of clean_session
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                      reconnect_on_failure=False)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                      clean_session=clean_session, reconnect_on_failure=False)
        if username is not None or password is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        self.port = port
        self.connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_reasons: list[int] = []  # MQTT 5: reason codes of server DISCONNECT packets
        self.puback_codes: dict[int, int] = {}  # mid -> PUBACK reason code (always 0 on 3.1.1)
        self.connack_properties: dict[str, Any] = {}  # MQTT 5 CONNACK properties, as paho decoded them
        self._unsubacks: dict[int, list[int]] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._held: list[mqtt.MQTTMessage] = []
        self._subacks: dict[int, list[int]] = {}
        self._suback_event = threading.Condition()
        self.on_message: Callable[[mqtt.MQTTMessage], None] | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe

    @property
    def v5(self) -> bool:
        return self.protocol == V5

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        code = reason.value if self.v5 else CONNACK_CODES[reason.getName()]
        if props is not None:
            self.connack_properties = props.json()
        self.connack.put((code, bool(flags.session_present)))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        # paho reports a server DISCONNECT's reason as is; a bare TCP close comes as "Unspecified error"
        # unless a DISCONNECT was read first, so tests look at disconnect_reasons only on MQTT 5.
        self.disconnect_reasons.append(reason.value)
        self.disconnected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.puback_codes[mid] = reason.value

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)
        self.messages.put(message)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        with self._suback_event:
            self._subacks[mid] = [code.value for code in codes]
            self._suback_event.notify_all()

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        with self._suback_event:
            self._unsubacks[mid] = [code.value for code in codes]
            self._suback_event.notify_all()

    def unsubscribe(self, *filters: str) -> list[int]:
        """Unsubscribe and return the UNSUBACK reason codes (MQTT 5; 3.1.1 has none: an empty list)."""
        _, mid = self.client.unsubscribe(list(filters))
        with self._suback_event:
            assert self._suback_event.wait_for(lambda: mid in self._unsubacks, WAIT)
            return self._unsubacks.pop(mid)

    def connect(self, expect: int | None = 0) -> int:
        """Connect and return the CONNACK code of the protocol spoken (asserting ``expect`` unless None)."""
        if self.v5:
            self.client.connect("127.0.0.1", self.port, keepalive=60, clean_start=self.clean_session)
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()
        code, self.session_present = self.connack.get(timeout=WAIT)
        if expect is not None:
            assert code == expect
        return code

    def subscribe(self, *filters: str, qos: int = 1) -> list[int]:
        """Subscribe and return the SUBACK codes (granted QoS, or 0x80 / 0x8F for a refused filter)."""
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        with self._suback_event:
            assert self._suback_event.wait_for(lambda: mid in self._subacks, WAIT)
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any] | list[Any],
                qos: int = 1) -> mqtt.MQTTMessageInfo:
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        return self.client.publish(topic, payload, qos=qos)

    def publish_acked(self, topic: str, payload: Any, qos: int = 1) -> int:
        """Publish, wait for the PUBACK and return its reason code (0 on 3.1.1)."""
        info = self.publish(topic, payload, qos)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"
        return self.puback_code(info)

    def puback_code(self, info: mqtt.MQTTMessageInfo) -> int:
        """Reason code of the PUBACK for ``info`` (it must have arrived)."""
        assert acked(info), "no PUBACK"
        return self.puback_codes.get(info.mid, 0)

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

    def code(self, v311: int, v5: int) -> int:
        """The value expected on the wire for the protocol this device speaks."""
        return v5 if self.v5 else v311

    def expect_invalid_payload_answer(self, info: mqtt.MQTTMessageInfo, standin: Any, name: str = "dev1") -> None:
        """TB's answer to an unparsable QoS 1 payload (``sendResponseForAdaptorErrorOrCloseContext``, MTH:668-676).

        MQTT 3.1.1: no PUBACK and the connection closes. MQTT 5: PUBACK 0x99
        PAYLOAD_FORMAT_INVALID and the session stays.
        """
        if self.v5:
            info.wait_for_publish(WAIT)
            assert self.puback_code(info) == 0x99
            assert standin.is_connected(name) and "invalid_payload" not in standin.disconnect_reasons(name)
        else:
            self.wait_closed()
            assert not acked(info)
            assert standin.disconnect_reasons(name) == ["invalid_payload"]

    def expect_server_disconnect(self, v5_reason: int | None) -> None:
        """Wait for the server's close; on MQTT 5 it must come with a DISCONNECT carrying ``v5_reason``."""
        self.wait_closed()
        if self.v5 and v5_reason is not None:
            assert self.disconnect_reasons == [v5_reason]
