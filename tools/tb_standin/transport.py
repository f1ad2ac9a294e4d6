"""One device connection, as ThingsBoard's ``MqttTransportHandler`` handles it.

Theory of operation: two maintained codecs do all packet encoding and
decoding. MQTT 3.1/3.1.1 connections use amqtt 0.12.1's packet classes and its
``BrokerProtocolHandler`` (write lock, PINGRESP, the PUBACK waiters for our own
QoS 1 publishes, packet ids). MQTT 5 connections use the ``mqtt5`` package (a
sans-I/O MQTT 5 codec): we frame the bytes, it parses and writes the packets.
Both feed the same handlers, so the behaviour differs only where ThingsBoard's
does, by ``mqttVersion`` (MTH = ThingsBoard's ``MqttTransportHandler.java``,
master dfe65d5):

* the remaining length is checked *before* the body is read (Netty's
  ``MqttDecoder(maxPayloadSize)``), and a packet over 65,536 bytes closes the
  connection (MTH:208-212);
* PUBLISH packets are handled in order, inline, and the PUBACK is written only
  after the stand-in stored the data (amqtt acks on receipt);
* an invalid payload closes the connection without a PUBACK on 3.1.1, and is
  answered with PUBACK 0x99 on MQTT 5 (MTH:668-676); PUBACK reason codes and
  DISCONNECT packets exist only on MQTT 5 (MTH:1219-1233, 245-255);
* SUBSCRIBE accepts only ThingsBoard's exact filters (MTH:862-925), and
  responses are written to the session whether or not it subscribed (§0.2).

The server object (``server.py``) owns devices, RPCs and OTA; this module only
turns packets into calls on it and its answers into packets.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import mqtt5
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBLISH,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket

from tools.tb_standin.model import MAX_PAYLOAD_SIZE, Device, InvalidPayload

if TYPE_CHECKING:
    from tools.tb_standin.server import TbServer

TELEMETRY = "v1/devices/me/telemetry"
ATTRIBUTES = "v1/devices/me/attributes"
ATTR_REQUEST = "v1/devices/me/attributes/request/"
ATTR_RESPONSE = "v1/devices/me/attributes/response/"
RPC_REQUEST = "v1/devices/me/rpc/request/"
RPC_RESPONSE = "v1/devices/me/rpc/response/"
RPC_SUBSCRIPTION = "v1/devices/me/rpc/request/+"
CLAIM = "v1/devices/me/claim"
GATEWAY_PREFIX = "v1/gateway"  # MqttTopics.BASE_GATEWAY_API_TOPIC; MTH:417 uses startsWith
PROVISION_REQUEST = "/provision/request"
PROVISION_RESPONSE = "/provision/response"
OTA_REQUEST = re.compile(r"v2/(fw|sw)/request/(\d+)/chunk/(\d+)")  # MTH:587-590 use find(): unanchored, re.search
FW_ERROR = "v2/fw/error"  # TB hard-codes the fw error topic, for sw requests too (§5.2)

# v2 short topics (MqttTopics.java:89-115). "/j" forces JSON, "/p" protobuf; the stand-in speaks
# JSON only, so the "/p" family is accepted in SUBSCRIBE but not routed (README).
SHORT_TELEMETRY = ("v2/t", "v2/t/j")
SHORT_ATTRIBUTES = ("v2/a", "v2/a/j")
# (request prefix, response prefix), most specific first, as MTH:615-647 tests them.
SHORT_ATTR_REQUESTS = (("v2/a/req/j/", "v2/a/res/j/"), ("v2/a/req/", "v2/a/res/"))
SHORT_RPC_REQUESTS = (("v2/r/req/j/", "v2/r/res/j/"), ("v2/r/req/", "v2/r/res/"))
SHORT_RPC_RESPONSES = ("v2/r/res/j/", "v2/r/res/")
PROTO_SHORT = re.compile(r"v2/(t/p|a/p|a/req/p/.*|r/req/p/.*|r/res/p/.*)")

# Subscriptions that register with the device actor (MTH:863-902), mapped to the topic (attributes)
# or topic base (RPC) that TB then publishes on (TopicType.java:23-26).
ATTRIBUTE_SUBSCRIPTIONS = {ATTRIBUTES: ATTRIBUTES, "v2/a": "v2/a", "v2/a/j": "v2/a/j", "v2/a/p": None}
RPC_SUBSCRIPTIONS = {RPC_SUBSCRIPTION: RPC_REQUEST, "v2/r/req/+": "v2/r/req/", "v2/r/req/j/+": "v2/r/req/j/",
                     "v2/r/req/p/+": None}

# MTH.processSubscribe's switch: exact strings only (§0.1); anything else fails in the SUBACK.
ACCEPTED_SUBSCRIPTIONS = frozenset({
    *ATTRIBUTE_SUBSCRIPTIONS,
    *RPC_SUBSCRIPTIONS,
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/response/+",
    "v2/r/res/+", "v2/r/res/j/+", "v2/r/res/p/+",
    "v2/a/res/+", "v2/a/res/j/+", "v2/a/res/p/+",
    "v2/fw/response/+/chunk/+",
    "v2/fw/error",
    "v2/sw/response/+/chunk/+",
    "v2/sw/error",
    "v1/gateway/attributes",
    "v1/gateway/attributes/response",
    "v1/gateway/rpc",
})
# ReturnCodeResolver.getSubscriptionReturnCode (ReturnCodeResolver.java:45-63): TOPIC_FILTER_INVALID
# on MQTT 5, 0x80 (MqttQoS.FAILURE) on 3.1.1.
SUBACK_FAILURE = 0x80
SUBACK_TOPIC_FILTER_INVALID = 0x8F
UNSUBACK_SUCCESS, UNSUBACK_NO_SUBSCRIPTION_EXISTED = 0x00, 0x11  # MTH:984-1045

# PUBACK reason codes (Netty MqttReasonCodes.PubAck), sent on MQTT 5 only (MTH:1219-1225).
PUBACK_SUCCESS = 0x00
PUBACK_IMPLEMENTATION_SPECIFIC_ERROR = 0x83
PUBACK_TOPIC_NAME_INVALID = 0x90
PUBACK_PAYLOAD_FORMAT_INVALID = 0x99

# Close reason -> the DISCONNECT reason code TB sends first on MQTT 5 (closeCtx, MTH:235-255).
# Reasons missing here close the TCP connection without a DISCONNECT, as TB does when the
# server goes away or its scheduler closes the channel (provisioning, MTH:760).
DISCONNECT_CODES = {
    "client_disconnect": 0x00,  # NORMAL_DISCONNECT, MTH:395-396
    "invalid_payload": 0x99,  # PAYLOAD_FORMAT_INVALID, MTH:674 (QoS 0 only on MQTT 5)
    "packet_too_large": 0x81,  # MALFORMED_PACKET, MTH:208-212
    "malformed_packet": 0x81,
    "rate_limit": 0x83,  # IMPLEMENTATION_SPECIFIC_ERROR, getPubAckCallback.onError MTH:731-735
    "session_taken_over": 0x8E,  # MAX_CONCURRENT_SESSIONS_LIMIT_REACHED, MTH:1455
    "inactivity_timeout": 0xA0,  # SESSION_TIMEOUT -> MAXIMUM_CONNECT_TIME, MTH:1456
    "credentials_updated": 0x98,  # ADMINISTRATIVE_ACTION, MTH:1454
    "device_deleted": 0x98,  # onDeviceDeleted, MTH:1613-1616
    "admin_disconnect": 0x98,  # stand-in control operation; TB's administrative closes use 0x98
    "rpc_method_missing": 0x8B,  # uncaught RuntimeException -> exceptionCaught SERVER_SHUTTING_DOWN, MTH:1189
    "ota_bad_chunk_size": 0x8B,  # Integer.parseInt throws (MTH:680), same path
    "ota_not_found": 0x83,  # sendOtaPackageError, MTH:822-828
    "ota_failure": 0x83,
    "ota_payload_too_large": 0x83,
    "provision_bad_topic": 0x90,  # TOPIC_NAME_INVALID, MTH:324-326
    "provision_missing_key": 0x83,  # RuntimeException, MTH:328-331
    "receive_maximum_exceeded": 0x93,  # MQTT 5 §3.3.4 (only with the set_receive_maximum knob; TB sends none)
}


class _NoPlugins:
    """amqtt's handler reports every packet to a plugin manager; the stand-in needs none."""

    async def fire_event(self, *args: Any, **kwargs: Any) -> None:
        return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT wildcard matching, used only to pick the QoS of a matching subscription."""
    if topic_filter == topic:
        return True
    parts, levels = topic_filter.split("/"), topic.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(parts) == len(levels)


def parse_request_id(topic: str, prefix: str) -> int:
    """``Integer.parseInt`` of the id after ``prefix``; a non-integer is an invalid payload."""
    text = topic[len(prefix):]
    if not re.fullmatch(r"[-+]?\d+", text):
        raise InvalidPayload(f"request id {text!r} is not an integer")
    number = int(text)
    if not -(2**31) <= number < 2**31:
        raise InvalidPayload(f"request id {text!r} is out of int range")
    return number


async def read_v5_packet(reader: ReaderAdapter, header: MQTTFixedHeader) -> Any:
    """Read the body after ``header`` and decode the whole packet with the ``mqtt5`` codec."""
    body = await reader.read(header.remaining_length) if header.remaining_length else b""
    if len(body) != header.remaining_length:
        raise NoDataError("connection closed inside a packet")
    packet, _ = mqtt5.read(memoryview(header.to_bytes() + body))
    return packet


class TbSession(BrokerProtocolHandler):
    """The transport side of one connection: a device session or a provision-only session."""

    def __init__(self, server: TbServer, device: Device | None, loop: asyncio.AbstractEventLoop,
                 v5: bool = False) -> None:
        super().__init__(_NoPlugins(), loop=loop)  # type: ignore[arg-type]
        self.server = server
        self.device = device
        self.v5 = v5  # deviceSessionCtx.getMqttVersion() == MQTT_5
        self.provision_only = device is None
        self.subscriptions: dict[str, int] = {}
        # Where the device actor's pushes go, set by a registered SUBSCRIBE (attrSubTopicType,
        # rpcSubTopicType); None until then, or when the registration was rate-limited.
        self.attributes_topic: str | None = None
        self.rpc_request_base: str | None = None
        # Per session and keyed by the requestId string, as TB's chunkSizes / otaPackSessions (MTH:684-698).
        self.ota_chunk_sizes: dict[str, int] = {}
        self.ota_packages: dict[str, Any] = {}
        self.last_activity = time.monotonic()
        self.close_reason: str | None = None
        self._closed_reported = False
        self.unacked: set[int] = set()  # QoS 1 publishes received and not yet acknowledged

    # -- lifecycle ---------------------------------------------------------

    def bind(self, session: Any, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """Attach the amqtt session and streams (the CONNECT was read by the server)."""
        self.attach(session, reader, writer)

    async def close(self, reason: str) -> None:
        """Server-side close (TB ``closeCtx``): remember why, then drop the TCP connection."""
        if self.close_reason is None:
            self.close_reason = reason
        self._report()  # before the socket closes, so whoever sees the close also finds the reason
        await self._send_disconnect()
        await self.stop()
        await self._report_closed()

    def _report(self) -> None:
        if not self._closed_reported:
            self._closed_reported = True
            self.server.on_session_closed(self, self.close_reason or "connection_lost")

    async def _report_closed(self) -> None:
        self._report()
        if self.writer is not None:
            with suppress(Exception):
                await self.writer.close()

    async def _reader_loop(self) -> None:
        """Read packets in order; stop on EOF, on an oversize packet or when a handler says so."""
        assert self._reader_ready is not None and self.reader is not None
        self._reader_ready.set()
        reason: str | None = None
        try:
            while reason is None:
                header = await MQTTFixedHeader.from_stream(self.reader)
                if header is None:
                    reason = "connection_lost"
                    break
                self.last_activity = time.monotonic()
                if header.remaining_length > MAX_PAYLOAD_SIZE:
                    reason = "packet_too_large"  # Netty: "Message decoding failed", close
                    break
                if self.v5:
                    reason = await self._dispatch_v5(await read_v5_packet(self.reader, header))
                else:
                    packet = await packet_class(header).from_stream(self.reader, fixed_header=header)
                    reason = await self._dispatch(packet)
        except asyncio.CancelledError:
            pass  # close() cancelled us and reports the reason
        except (MQTTError, AMQTTError, NoDataError, ValueError, IndexError, UnicodeDecodeError):
            reason = "malformed_packet"  # IndexError/ValueError: the mqtt5 codec's parse errors
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            reason = "connection_lost"
        finally:
            self._reader_stopped.set()
        if reason is not None:
            if self.close_reason is None:
                self.close_reason = reason
            self._stop_waiters()
            self._report()
            await self._send_disconnect()
            await self._report_closed()

    async def _dispatch(self, packet: Any) -> str | None:
        """Handle one MQTT 3.1.1 packet; a returned string closes the session with that reason."""
        packet_type = packet.fixed_header.packet_type
        if packet_type == PUBLISH:
            packet_id = packet.packet_id if packet.qos else None
            return await self._on_publish(packet.topic_name or "", bytes(packet.data or b""), packet_id)
        if packet_type == PUBACK:
            self._on_puback(packet.variable_header.packet_id)
        elif packet_type == SUBSCRIBE:
            return await self._on_subscribe(packet.variable_header.packet_id,
                                            [(f, qos or 0) for f, qos in packet.payload.topics])
        elif packet_type == UNSUBSCRIBE:
            await self._on_unsubscribe(packet.variable_header.packet_id, list(packet.payload.topics))
        elif packet_type == PINGREQ:
            await self.handle_pingreq(packet)  # counts as activity; keep-alive is not enforced (§0.4)
        elif packet_type == DISCONNECT:
            return "client_disconnect"
        else:
            return "protocol_violation"  # a second CONNECT, or a QoS 2 flow TB does not support
        return None

    async def _dispatch_v5(self, packet: Any) -> str | None:
        """Handle one MQTT 5 packet (decoded by ``mqtt5``), with the same handlers as 3.1.1."""
        if isinstance(packet, mqtt5.PublishPacket):
            packet_id = packet.packet_id if int(packet.qos) else None
            return await self._on_publish(packet.topic, bytes(packet.payload), packet_id)
        if isinstance(packet, mqtt5.PubAckPacket):
            self._on_puback(packet.packet_id)
        elif isinstance(packet, mqtt5.SubscribePacket):
            return await self._on_subscribe(packet.packet_id,
                                            [(f.pattern, int(f.max_qos)) for f in packet.topic_filters])
        elif isinstance(packet, mqtt5.UnsubscribePacket):
            await self._on_unsubscribe(packet.packet_id, list(packet.patterns))
        elif isinstance(packet, mqtt5.PingReqPacket):
            await self._write_v5(mqtt5.PingRespPacket())
        elif isinstance(packet, mqtt5.DisconnectPacket):
            return "client_disconnect"
        else:
            return "protocol_violation"
        return None

    # -- outgoing ----------------------------------------------------------

    async def _write_v5(self, packet: Any) -> None:
        """Write an ``mqtt5`` packet under the handler's write lock (shared with amqtt's writes)."""
        if self.writer is None:
            return
        async with self._write_lock:
            self.writer.write(packet.write())
            await self.writer.drain()

    async def _send_disconnect(self) -> None:
        """MQTT 5 only: tell the client why before closing (closeCtx, MTH:245-252)."""
        code = DISCONNECT_CODES.get(self.close_reason or "")
        if not self.v5 or code is None or self.writer is None:
            return
        with suppress(Exception):  # the peer may be gone already; closing is what matters
            await self._write_v5(mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode(code)))

    def qos_for(self, topic: str) -> int:
        """QoS of a matching subscription, else 1 (``getQoSForTopic``)."""
        for topic_filter, qos in self.subscriptions.items():
            if topic_matches(topic_filter, topic):
                return qos
        return 1

    async def push(self, topic: str, payload: bytes, qos: int | None = None) -> asyncio.Future[Any] | None:
        """Write a PUBLISH; for QoS 1 return a future that resolves on the device's PUBACK."""
        if qos is None:
            qos = self.qos_for(topic)
        waiter: asyncio.Future[Any] | None = None
        packet_id = None
        if qos and self.session is not None:
            packet_id = self.session.next_packet_id
            waiter = self._loop.create_future()
            self._puback_waiters[packet_id] = waiter
        try:
            if self.v5:
                await self._write_v5(mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS(qos), packet_id=packet_id))
            else:
                await self._send_packet(PublishPacket.build(topic, payload, packet_id, False, qos, False))
        except Exception:
            if packet_id is not None:
                self._puback_waiters.pop(packet_id, None)
            raise
        return waiter

    def _on_puback(self, packet_id: int) -> None:
        waiter = self._puback_waiters.pop(packet_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(packet_id)
        # A PUBACK for an unknown id (e.g. a late one) is harmless, as in TB.

    async def send_puback(self, packet_id: int, reason: int = PUBACK_SUCCESS) -> None:
        """Write a PUBACK unless the connection is already gone; the reason code goes out on MQTT 5 only."""
        self.unacked.discard(packet_id)
        if self.writer is not None and self.close_reason is None:
            with suppress(ConnectionError, AMQTTError, OSError):
                if self.v5:
                    await self._write_v5(mqtt5.PubAckPacket(packet_id, reason_code=mqtt5.PubAckReasonCode(reason)))
                else:
                    await self._send_packet(PubackPacket.build(packet_id))

    # -- incoming ----------------------------------------------------------

    async def _on_subscribe(self, packet_id: int, topics: list[tuple[str, int]]) -> str | None:
        """MTH.processSubscribe (MTH:830-936): never closes the session, not even over a rate limit."""
        codes: list[int] = []
        for topic_filter, qos in topics:
            if self.provision_only:
                accepted = topic_filter == PROVISION_RESPONSE
            else:
                accepted = topic_filter in ACCEPTED_SUBSCRIPTIONS
            if not accepted:
                codes.append(SUBACK_TOPIC_FILTER_INVALID if self.v5 else SUBACK_FAILURE)
                continue
            granted = min(qos, 1)  # QoS 2 is not supported (§0.4)
            self.subscriptions[topic_filter] = granted
            codes.append(granted)
            if self.device is not None:
                self._register_with_device_actor(topic_filter)
        if self.v5:
            await self._write_v5(mqtt5.SubAckPacket(packet_id, [mqtt5.SubAckReasonCode(c) for c in codes]))
        else:
            await self._send_packet(SubackPacket.build(packet_id, codes))
        return None

    def _register_with_device_actor(self, topic_filter: str) -> None:
        """Attribute and RPC subscriptions cost one "messages" token (DefaultTransportService.java:600-622).

        Over the limit, TB's ``checkLimits`` calls no callback (MTH:939, 945 pass null): the
        SUBACK still grants the QoS and the session stays open, but the device actor never
        hears of the subscription, so no updates or RPCs arrive on it.
        """
        assert self.device is not None
        if topic_filter in ATTRIBUTE_SUBSCRIPTIONS:
            if self.server.allow_message(self.device):
                self.attributes_topic = ATTRIBUTE_SUBSCRIPTIONS[topic_filter]
            else:
                self.server.event(self.device.name, "subscription_rate_limited", topic_filter)
        elif topic_filter in RPC_SUBSCRIPTIONS:
            if self.server.allow_message(self.device):
                self.rpc_request_base = RPC_SUBSCRIPTIONS[topic_filter]
                if self.rpc_request_base is not None:
                    self.server.on_rpc_subscribed(self)
            else:
                self.server.event(self.device.name, "subscription_rate_limited", topic_filter)

    async def _on_unsubscribe(self, packet_id: int, topics: list[str]) -> None:
        codes = []
        for topic_filter in topics:
            existed = self.subscriptions.pop(topic_filter, None) is not None
            codes.append(UNSUBACK_SUCCESS if existed else UNSUBACK_NO_SUBSCRIPTION_EXISTED)
            if existed and topic_filter in ATTRIBUTE_SUBSCRIPTIONS:
                self.attributes_topic = None
            if existed and topic_filter in RPC_SUBSCRIPTIONS:
                self.rpc_request_base = None
        if self.v5:
            await self._write_v5(mqtt5.UnsubAckPacket(packet_id, [mqtt5.UnsubAckReasonCode(c) for c in codes]))
        else:
            await self._send_packet(UnsubackPacket.build(packet_id))

    def _count_unacked(self, packet_id: int) -> str | None:
        """Track QoS 1 publishes awaiting PUBACK; over the knob's Receive Maximum is a protocol error."""
        self.unacked.add(packet_id)
        name = self.device.name if self.device else ""
        peaks = self.server.faults.peak_unacked
        peaks[name] = max(peaks.get(name, 0), len(self.unacked))
        maximum = self.server.faults.receive_maximum
        if self.v5 and maximum and len(self.unacked) > maximum:
            self.server.event(name or None, "receive_maximum_exceeded", str(len(self.unacked)))
            return "receive_maximum_exceeded"
        return None

    async def _refuse(self, packet_id: int, code: int) -> str | None:
        """An injected refusal, answered as TB answers an unparsable payload (MTH:668-676)."""
        self.server.event(self.device.name if self.device else None, "puback_refused", f"0x{code:02X}")
        if self.v5:
            await self.send_puback(packet_id, code)
            return None
        return "invalid_payload"

    async def _on_publish(self, topic: str, payload: bytes, packet_id: int | None) -> str | None:
        if packet_id is not None:
            exceeded = self._count_unacked(packet_id)
            if exceeded is not None:
                return exceeded
            code = None if self.provision_only else self.server.faults.take_refusal(
                self.device.name if self.device else None, payload)
            if code is not None:
                return await self._refuse(packet_id, code)
        try:
            if self.provision_only:
                return await self.server.topics.on_provision_publish(self, topic, payload, packet_id)
            assert self.device is not None
            return await self.server.topics.on_device_publish(self, self.device, topic, payload, packet_id)
        except InvalidPayload:
            # sendResponseForAdaptorErrorOrCloseContext (MTH:668-676): MQTT 5 with a packet id gets
            # PUBACK 0x99 and stays; 3.1.1 (and QoS 0) closes without a PUBACK.
            if self.v5 and packet_id:
                await self.send_puback(packet_id, PUBACK_PAYLOAD_FORMAT_INVALID)
                return None
            return "invalid_payload"


async def push_if_open(session: TbSession, topic: str, payload: bytes) -> None:
    """Best-effort server push: a session that went away meanwhile just misses it, as in TB."""
    if session.close_reason is None:
        try:
            await session.push(topic, payload)
        except Exception:  # the connection broke under us; the reader loop reports the close
            pass
