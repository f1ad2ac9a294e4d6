"""One device connection, as ThingsBoard's ``MqttTransportHandler`` handles it.

Theory of operation: amqtt's ``BrokerProtocolHandler`` supplies the MQTT 3.1.1
codec, the write lock, PINGRESP and the PUBACK waiters for our own QoS 1
publishes. We replace its reader loop because ThingsBoard is not a broker:

* the remaining length is checked *before* the body is read (Netty's
  ``MqttDecoder(maxPayloadSize)``), and a packet over 65,536 bytes closes the
  connection;
* PUBLISH packets are handled in order, inline, and the PUBACK is written only
  after the stand-in stored the data (amqtt acks on receipt);
* an invalid payload or a rate-limit hit closes the connection without a
  PUBACK (MQTT 3.1.1 behaviour of ``sendResponseForAdaptorErrorOrCloseContext``);
* SUBSCRIBE accepts only ThingsBoard's exact filters, and responses are
  written to the session whether or not it subscribed (§0.2).

The server object (``server.py``) owns devices, RPCs and OTA; this module only
turns packets into calls on it and its answers into packets.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

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
PROVISION_REQUEST = "/provision/request"
PROVISION_RESPONSE = "/provision/response"
OTA_REQUEST = re.compile(r"v2/(fw|sw)/request/(\d+)/chunk/(\d+)\Z")
FW_ERROR = "v2/fw/error"  # TB hard-codes the fw error topic, for sw requests too (§5.2)

# MTH.processSubscribe's switch: exact strings only (§0.1); anything else gets 0x80.
ACCEPTED_SUBSCRIPTIONS = frozenset({
    ATTRIBUTES,
    "v1/devices/me/attributes/response/+",
    RPC_SUBSCRIPTION,
    "v1/devices/me/rpc/response/+",
    "v2/fw/response/+/chunk/+",
    "v2/fw/error",
    "v2/sw/response/+/chunk/+",
    "v2/sw/error",
    "v1/gateway/attributes",
    "v1/gateway/attributes/response",
    "v1/gateway/rpc",
})
SUBACK_FAILURE = 0x80


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


class TbSession(BrokerProtocolHandler):
    """The transport side of one connection: a device session or a provision-only session."""

    def __init__(self, server: TbServer, device: Device | None, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(_NoPlugins(), loop=loop)  # type: ignore[arg-type]
        self.server = server
        self.device = device
        self.provision_only = device is None
        self.subscriptions: dict[str, int] = {}
        self.ota_requests: dict[tuple[str, int], tuple[Any, int]] = {}  # (kind, requestId) -> (package, size)
        self.last_activity = time.monotonic()
        self.close_reason: str | None = None
        self._closed_reported = False

    # -- lifecycle ---------------------------------------------------------

    def bind(self, session: Any, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """Attach the amqtt session and streams (the CONNECT was read by the server)."""
        self.attach(session, reader, writer)

    async def close(self, reason: str) -> None:
        """Server-side close (TB ``closeCtx``): remember why, then drop the TCP connection."""
        if self.close_reason is None:
            self.close_reason = reason
        self._report()  # before the socket closes, so whoever sees the close also finds the reason
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
                packet = await packet_class(header).from_stream(self.reader, fixed_header=header)
                reason = await self._dispatch(packet)
        except asyncio.CancelledError:
            pass  # close() cancelled us and reports the reason
        except (MQTTError, AMQTTError, NoDataError, ValueError, UnicodeDecodeError):
            reason = "malformed_packet"
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            reason = "connection_lost"
        finally:
            self._reader_stopped.set()
        if reason is not None:
            if self.close_reason is None:
                self.close_reason = reason
            self._stop_waiters()
            await self._report_closed()

    async def _dispatch(self, packet: Any) -> str | None:
        """Handle one packet; a returned string closes the session with that reason."""
        packet_type = packet.fixed_header.packet_type
        if packet_type == PUBLISH:
            return await self._on_publish(packet)
        if packet_type == PUBACK:
            self._on_puback(packet.variable_header.packet_id)
        elif packet_type == SUBSCRIBE:
            return await self._on_subscribe(packet)
        elif packet_type == UNSUBSCRIBE:
            for topic_filter in packet.payload.topics:
                self.subscriptions.pop(topic_filter, None)
            await self._send_packet(UnsubackPacket.build(packet.variable_header.packet_id))
        elif packet_type == PINGREQ:
            await self.handle_pingreq(packet)  # counts as activity; keep-alive is not enforced (§0.4)
        elif packet_type == DISCONNECT:
            return "client_disconnect"
        else:
            return "protocol_violation"  # a second CONNECT, or a QoS 2 flow TB does not support
        return None

    # -- outgoing ----------------------------------------------------------

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

    async def send_puback(self, packet_id: int) -> None:
        """Write a PUBACK unless the connection is already gone."""
        if self.writer is not None and self.close_reason is None:
            with suppress(ConnectionError, AMQTTError, OSError):
                await self._send_packet(PubackPacket.build(packet_id))

    # -- incoming ----------------------------------------------------------

    async def _on_subscribe(self, packet: Any) -> str | None:
        if self.device is not None and not self.server.allow_message(self.device):
            return "rate_limit"
        codes: list[int] = []
        new_filters: list[str] = []
        for topic_filter, qos in packet.payload.topics:
            if self.provision_only:
                accepted = topic_filter == PROVISION_RESPONSE
            else:
                accepted = topic_filter in ACCEPTED_SUBSCRIPTIONS
            if not accepted:
                codes.append(SUBACK_FAILURE)
                continue
            granted = min(qos or 0, 1)  # QoS 2 is not supported (§0.4)
            self.subscriptions[topic_filter] = granted
            new_filters.append(topic_filter)
            codes.append(granted)
        await self._send_packet(SubackPacket.build(packet.variable_header.packet_id, codes))
        if self.device is not None and RPC_SUBSCRIPTION in new_filters:
            self.server.on_rpc_subscribed(self)
        return None

    async def _on_publish(self, packet: Any) -> str | None:
        topic: str = packet.topic_name or ""
        payload = bytes(packet.data or b"")
        packet_id = packet.packet_id if packet.qos else None
        try:
            if self.provision_only:
                return await self.server.topics.on_provision_publish(self, topic, payload, packet_id)
            assert self.device is not None
            return await self.server.topics.on_device_publish(self, self.device, topic, payload, packet_id)
        except InvalidPayload:
            return "invalid_payload"  # MQTT 3.1.1: no PUBACK, close (§0.5)


async def push_if_open(session: TbSession, topic: str, payload: bytes) -> None:
    """Best-effort server push: a session that went away meanwhile just misses it, as in TB."""
    if session.close_reason is None:
        try:
            await session.push(topic, payload)
        except Exception:  # the connection broke under us; the reader loop reports the close
            pass
