"""What each device-API topic does: ThingsBoard's ``processDevicePublish`` and provisioning.

Every handler parses first (an ``InvalidPayload`` closes the session), then
charges the rate limit, stores, and only then acknowledges; a returned string
closes the session with that reason.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tools.tb_standin import ota
from tools.tb_standin.model import (
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
    OTA_REQUEST,
    PROVISION_REQUEST,
    PROVISION_RESPONSE,
    RPC_REQUEST,
    RPC_RESPONSE,
    TELEMETRY,
    TbSession,
    parse_request_id,
    push_if_open,
)

if TYPE_CHECKING:
    from tools.tb_standin.server import TbServer


class DeviceTopics:
    """Topic handlers of device and provision sessions, working on the server's state."""

    def __init__(self, server: TbServer) -> None:
        self.server = server

    async def on_device_publish(self, session: TbSession, device: Device, topic: str, payload: bytes,
                                packet_id: int | None) -> str | None:
        """Route one device PUBLISH; parse first, then rate-limit, store, and only then PUBACK."""
        if topic == TELEMETRY:
            records, points = parse_telemetry(payload)
            if not self.server._buckets(device).allow_telemetry(points):
                return "rate_limit"
            device.store_telemetry(records)
            device.data_points += points
            return await self.server.ack(session, packet_id)
        if topic == ATTRIBUTES:
            attributes = parse_attributes(payload)
            if not self.server._buckets(device).allow_telemetry(len(attributes)):
                return "rate_limit"
            device.client.update(attributes)
            return await self.server.ack(session, packet_id)
        if topic.startswith(ATTR_REQUEST):
            request_id = parse_request_id(topic, ATTR_REQUEST)
            response = attribute_response(device, payload)
            return await self._answer(session, device, packet_id, request_id, ATTR_RESPONSE, response)
        if topic.startswith(RPC_RESPONSE):
            request_id = parse_request_id(topic, RPC_RESPONSE)
            if not self.server.allow_message(device):
                return "rate_limit"
            self.server.rpc.on_reply(device.name, request_id, payload)
            return await self.server.ack(session, packet_id)
        if topic.startswith(RPC_REQUEST):
            return await self._client_rpc(session, device, topic, payload, packet_id)
        match = OTA_REQUEST.match(topic)
        if match:
            return await self._ota_chunk(session, device, match, payload, packet_id)
        if topic == CLAIM and not self.server.allow_message(device):
            return "rate_limit"
        # Claim, and unknown topics: PUBACK (0x90 on MQTT 5 only), data dropped, session stays (§0.4).
        self.server.event(device.name, "unknown_topic" if topic != CLAIM else "claim", topic)
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
                          packet_id: int | None) -> str | None:
        request_id = parse_request_id(topic, RPC_REQUEST)
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
        if method == "getSessionLimits":  # answered by the transport itself (§3.4)
            limits = self.server.session_limits()
            return await self._answer(session, device, packet_id, request_id, RPC_RESPONSE, limits)
        handler = self.server.client_rpc_handlers.get(method)
        reply = handler(device.name, params) if handler is not None else None
        if reply is not None:
            return await self._answer(session, device, packet_id, request_id, RPC_RESPONSE, reply)
        if not self.server.allow_message(device):
            return "rate_limit"
        reason = await self.server.ack(session, packet_id)
        topic_out = f"{RPC_RESPONSE}{request_id}"
        # No "RPC Call Reply" node: the transport answers {"error":"timeout"} after 60 s (§3.2).
        self.server.loop.call_later(self.server.config.client_rpc_timeout, lambda: self.server.loop.create_task(
            push_if_open(session, topic_out, b'{"error":"timeout"}')))
        return reason

    async def _ota_chunk(self, session: TbSession, device: Device, match: Any, payload: bytes,
                         packet_id: int | None) -> str | None:
        kind, request_id, index = match.group(1), int(match.group(2)), int(match.group(3))
        if not self.server.allow_message(device):
            return "rate_limit"
        reason = await self.server.ack(session, packet_id)
        if reason is not None:
            return reason
        key = (kind, request_id)
        bound, remembered = session.ota_requests.get(key, (device.ota.get(kind), None))
        try:
            size = ota.parse_chunk_size(payload, remembered)
            session.ota_requests[key] = (bound, size)  # requestId is bound to the package on first use
            data = ota.chunk(bound, size, index)
        except ota.OtaError as error:
            await push_if_open(session, FW_ERROR, error.code.encode())
            return f"ota_{error.code.lower()}"
        await push_if_open(session, f"v2/{kind}/response/{request_id}/chunk/{index}", data)
        return None

    # -- provisioning --------------------------------------------------------

    async def on_provision_publish(self, session: TbSession, topic: str, payload: bytes,
                                   packet_id: int | None) -> str | None:
        """A provision-only session may publish only ``/provision/request`` (§4)."""
        if topic != PROVISION_REQUEST:
            return "provision_bad_topic"
        try:
            request = json.loads(payload)
        except ValueError:
            raise InvalidPayload("provision request is not JSON") from None
        if not isinstance(request, dict):
            raise InvalidPayload("provision request is not a JSON object")
        if "provisionDeviceKey" not in request:
            return "provision_missing_key"  # RuntimeException: no response, disconnect
        response = self.server.registry.provision(request)
        self.server.event(request.get("deviceName"), "provision", response["status"])
        reason = await self.server.ack(session, packet_id)
        if reason is None:
            await push_if_open(session, PROVISION_RESPONSE, dumps(response))
            self.server.loop.call_later(self.server.config.provision_close_after,
                                 lambda: self.server.loop.create_task(session.close("provision_session_expired")))
        return reason
