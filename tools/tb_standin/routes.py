"""What each device-API topic does: ThingsBoard's ``processDevicePublish`` and provisioning.

Every handler parses first (an ``InvalidPayload`` closes the session on MQTT
3.1.1 and gets PUBACK 0x99 on MQTT 5), then
charges the rate limit, stores, and only then acknowledges; a returned string
closes the session with that reason.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tools.tb_standin import ota
from tools.tb_standin.model import (
    MAX_PAYLOAD_SIZE,
    Device,
    InvalidPayload,
    attribute_response,
    dumps,
    parse_attributes,
    parse_telemetry,
)
from tools.tb_standin.transport import (
    ATTR_REQUEST,
    ATTR_RESPONSE,
    ATTRIBUTES,
    CLAIM,
    FW_ERROR,
    GATEWAY_PREFIX,
    OTA_REQUEST,
    PROTO_SHORT,
    PROVISION_REQUEST,
    PROVISION_RESPONSE,
    PUBACK_IMPLEMENTATION_SPECIFIC_ERROR,
    PUBACK_TOPIC_NAME_INVALID,
    RPC_REQUEST,
    RPC_RESPONSE,
    SHORT_ATTR_REQUESTS,
    SHORT_ATTRIBUTES,
    SHORT_RPC_REQUESTS,
    SHORT_RPC_RESPONSES,
    SHORT_TELEMETRY,
    TELEMETRY,
    TbSession,
    parse_request_id,
    push_if_open,
)

if TYPE_CHECKING:
    from tools.tb_standin.server import TbServer

_NOT_ROUTED = "not routed"  # _short_topic: the topic is none of the v2 short request topics


class DeviceTopics:
    """Topic handlers of device and provision sessions, working on the server's state."""

    def __init__(self, server: TbServer) -> None:
        self.server = server

    async def on_device_publish(self, session: TbSession, device: Device, topic: str, payload: bytes,
                                packet_id: int | None) -> str | None:
        """Route one device PUBLISH (MTH.processPublish, MTH:410-429, and processDevicePublish, MTH:557-656).

        Parse first, then rate-limit, store, and only then PUBACK.
        """
        if topic.startswith(GATEWAY_PREFIX):
            # No gateway session handler: TB logs an error and sends nothing, not even a PUBACK
            # (MTH:417-423). The stand-in has no gateway devices, so this holds for every device.
            self.server.event(device.name, "gateway_topic_ignored", topic)
            return None
        if topic in (TELEMETRY, *SHORT_TELEMETRY):
            return await self._telemetry(session, device, payload, packet_id)
        if topic in (ATTRIBUTES, *SHORT_ATTRIBUTES):
            return await self._attributes(session, device, payload, packet_id)
        if topic.startswith(ATTR_REQUEST):
            return await self._attribute_request(session, device, topic, payload, packet_id, ATTR_REQUEST, ATTR_RESPONSE)
        if topic.startswith(RPC_RESPONSE):
            return await self._rpc_reply(session, device, topic, payload, packet_id, RPC_RESPONSE)
        if topic.startswith(RPC_REQUEST):
            return await self._client_rpc(session, device, topic, payload, packet_id, RPC_REQUEST, RPC_RESPONSE)
        match = OTA_REQUEST.search(topic)
        if match:
            return await self._ota_chunk(session, device, match, payload, packet_id)
        if not PROTO_SHORT.fullmatch(topic):
            reason = await self._short_topic(session, device, topic, payload, packet_id)
            if reason != _NOT_ROUTED:
                return reason
        if topic == CLAIM:
            if not self.server.allow_message(device):
                return "rate_limit"
            self.server.event(device.name, "claim", topic)
            return await self.server.ack(session, packet_id)
        # Unknown topics: PUBACK TOPIC_NAME_INVALID (a plain PUBACK on 3.1.1), data dropped, session stays
        # (MTH:648-651).
        self.server.event(device.name, "unknown_topic", topic)
        return await self.server.ack(session, packet_id, PUBACK_TOPIC_NAME_INVALID)

    async def _short_topic(self, session: TbSession, device: Device, topic: str, payload: bytes,
                           packet_id: int | None) -> str | None:
        """The v2 short request topics (MTH:615-647); their answers go to the family the request used."""
        for prefix in SHORT_RPC_RESPONSES:
            if topic.startswith(prefix):
                return await self._rpc_reply(session, device, topic, payload, packet_id, prefix)
        for request, response in SHORT_RPC_REQUESTS:
            if topic.startswith(request):
                return await self._client_rpc(session, device, topic, payload, packet_id, request, response)
        for request, response in SHORT_ATTR_REQUESTS:
            if topic.startswith(request):
                return await self._attribute_request(session, device, topic, payload, packet_id, request, response)
        return _NOT_ROUTED

    async def _telemetry(self, session: TbSession, device: Device, payload: bytes,
                         packet_id: int | None) -> str | None:
        records, points = parse_telemetry(payload)
        if not self.server._buckets(device).allow_telemetry(points):
            return "rate_limit"
        device.store_telemetry(records)
        device.data_points += points
        return await self.server.ack(session, packet_id)

    async def _attributes(self, session: TbSession, device: Device, payload: bytes,
                          packet_id: int | None) -> str | None:
        attributes = parse_attributes(payload)
        if not self.server._buckets(device).allow_telemetry(len(attributes)):
            return "rate_limit"
        device.client.update(attributes)
        return await self.server.ack(session, packet_id)

    async def _attribute_request(self, session: TbSession, device: Device, topic: str, payload: bytes,
                                 packet_id: int | None, prefix: str, response_prefix: str) -> str | None:
        request_id = parse_request_id(topic, prefix)
        response = attribute_response(device, payload)
        return await self._answer(session, device, packet_id, request_id, response_prefix, response)

    async def _rpc_reply(self, session: TbSession, device: Device, topic: str, payload: bytes,
                         packet_id: int | None, prefix: str) -> str | None:
        request_id = parse_request_id(topic, prefix)
        if not self.server.allow_message(device):
            return "rate_limit"
        self.server.rpc.on_reply(device.name, request_id, payload)
        return await self.server.ack(session, packet_id)

    async def _answer(self, session: TbSession, device: Device, packet_id: int | None, request_id: int,
                      prefix: str, response: Any) -> str | None:
        if not self.server.allow_message(device):
            return "rate_limit"
        reason = await self.server.ack(session, packet_id)
        if reason is None and request_id >= 0:  # JMA publishes only for requestId >= 0
            await push_if_open(session, f"{prefix}{request_id}", dumps(response))
        return reason

    async def _client_rpc(self, session: TbSession, device: Device, topic: str, payload: bytes,
                          packet_id: int | None, prefix: str, response_prefix: str) -> str | None:
        request_id = parse_request_id(topic, prefix)
        try:
            request = json.loads(payload) if payload else None
        except ValueError:
            raise InvalidPayload("client RPC is not JSON") from None
        if not isinstance(request, dict):
            raise InvalidPayload("client RPC is not a JSON object")
        if "method" not in request:
            return "rpc_method_missing"  # a runtime error in TB, which closes the session
        method, params = str(request["method"]), request.get("params")
        self.server.client_rpc_log.append((device.name, request_id, method, params))
        if method == "getSessionLimits" and prefix == RPC_REQUEST:
            # Answered by the transport itself, on the v1 topic only (MTH:576-580, 1482-1518).
            limits = self.server.session_limits()
            return await self._answer(session, device, packet_id, request_id, response_prefix, limits)
        handler = self.server.client_rpc_handlers.get(method)
        reply = handler(device.name, params) if handler is not None else None
        if reply is not None:
            return await self._answer(session, device, packet_id, request_id, response_prefix, reply)
        if not self.server.allow_message(device):
            return "rate_limit"
        reason = await self.server.ack(session, packet_id)
        topic_out = f"{response_prefix}{request_id}"
        # No "RPC Call Reply" node: the transport answers {"error":"timeout"} after 60 s (§3.2).
        self.server.loop.call_later(self.server.config.client_rpc_timeout, lambda: self.server.loop.create_task(
            push_if_open(session, topic_out, b'{"error":"timeout"}')))
        return reason

    async def _ota_chunk(self, session: TbSession, device: Device, match: Any, payload: bytes,
                         packet_id: int | None) -> str | None:
        """MTH.getOtaPackageCallback (MTH:678-711) and its callbacks (MTH:774-828), in TB's order.

        The chunk size is checked before the package is looked up; errors are published on
        ``v2/fw/error`` and close the session with no PUBACK; only a chunk that will be sent is
        acknowledged, just before it.
        """
        kind, request_id, index = match.group(1), match.group(2), int(match.group(3))
        # Logged so tests can see which chunks a device asked for (a resume must not start over).
        self.server.event(device.name, "ota_chunk_request", f"{kind} {request_id} {index}")
        try:
            size = ota.parse_chunk_size(payload)
        except ota.OtaError:
            return "ota_bad_chunk_size"  # Integer.parseInt throws; nothing is published
        if size > 0:
            session.ota_chunk_sizes[request_id] = size
        else:
            size = session.ota_chunk_sizes.get(request_id, 0)
        if size > MAX_PAYLOAD_SIZE:
            return await self._ota_error(session, "PAYLOAD_TOO_LARGE")
        package = session.ota_packages.get(request_id)
        if package is None:
            # Only the first request of a requestId goes to the core, and costs a "messages" token
            # (DefaultTransportService.java:722-723); over the limit OtaPackageCallback.onError closes.
            if not self.server.allow_message(device):
                return "rate_limit"
            package = device.ota.get(kind)
            try:
                ota.check_downloadable(package)
            except ota.OtaError as error:
                return await self._ota_error(session, error.code)
            session.ota_packages[request_id] = package  # requestId is bound to the package on first use
        reason = await self.server.ack(session, packet_id)
        if reason is None:
            data = ota.chunk(package, size, index)
            await push_if_open(session, f"v2/{kind}/response/{request_id}/chunk/{index}", data)
        return reason

    async def _ota_error(self, session: TbSession, code: str) -> str:
        await push_if_open(session, FW_ERROR, code.encode())
        return f"ota_{code.lower()}"

    # -- provisioning --------------------------------------------------------

    async def on_provision_publish(self, session: TbSession, topic: str, payload: bytes,
                                   packet_id: int | None) -> str | None:
        """A provision-only session may publish only ``/provision/request`` (§4)."""
        if topic != PROVISION_REQUEST:
            # PUBACK TOPIC_NAME_INVALID, then close (MTH:323-327).
            return await self.server.ack(session, packet_id, PUBACK_TOPIC_NAME_INVALID) or "provision_bad_topic"
        try:
            request = json.loads(payload)
        except ValueError:
            raise InvalidPayload("provision request is not JSON") from None
        if not isinstance(request, dict):
            raise InvalidPayload("provision request is not a JSON object")
        if "provisionDeviceKey" not in request:
            # A RuntimeException: PUBACK IMPLEMENTATION_SPECIFIC_ERROR, then close, no response (MTH:328-331).
            return (await self.server.ack(session, packet_id, PUBACK_IMPLEMENTATION_SPECIFIC_ERROR)
                    or "provision_missing_key")
        response = self.server.registry.provision(request)
        self.server.event(request.get("deviceName"), "provision", response["status"])
        reason = await self.server.ack(session, packet_id)
        if reason is None:
            await push_if_open(session, PROVISION_RESPONSE, dumps(response))
            self.server.loop.call_later(self.server.config.provision_close_after,
                                 lambda: self.server.loop.create_task(session.close("provision_session_expired")))
        return reason
