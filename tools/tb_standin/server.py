"""The stand-in's core: listeners, authentication, sessions and what each device topic does.

Runs entirely on one asyncio loop; ``api.StandIn`` calls into it from other
threads. Everything a device publishes is stored *before* the PUBACK goes
out, so a PUBACK means what it means in ThingsBoard: "accepted".
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.session import Session

from tools.tb_standin import ota
from tools.tb_standin.model import (
    dumps,
    MAX_INFLIGHT,
    MAX_PAYLOAD_SIZE,
    Device,
    InvalidPayload,
    ProvisionProfile,
    attribute_response,
    now_ms,
    parse_attributes,
    parse_telemetry,
)
from tools.tb_standin.provision import Registry
from tools.tb_standin.ratelimit import DeviceLimits
from tools.tb_standin.rpc import RpcManager
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
)

# CONNACK return codes (MQTT 3.1.1) as TB's ReturnCodeResolver maps them (§0.3).
ACCEPTED, BAD_PROTOCOL, IDENTIFIER_REJECTED, SERVER_UNAVAILABLE, NOT_AUTHORIZED = 0, 1, 2, 3, 5
ClientRpcHandler = Callable[[str, Any], Any]


@dataclass
class ServerConfig:
    """Listener addresses and ThingsBoard's timing defaults (overridable to keep tests fast)."""

    host: str = "127.0.0.1"
    port: int = 0
    tls_port: int | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    provision_close_after: float = 60.0  # scheduler.schedule(ctx::close, 60, SECONDS)
    rpc_delivery_timeout: float = 10.0  # transport.mqtt.timeout
    client_rpc_timeout: float = 60.0  # transport.client_side_rpc.timeout
    inactivity_timeout: float = 600.0  # transport.sessions.inactivity_timeout


@dataclass
class Event:
    """Something a test may want to assert on: connects, disconnects with their reason, faults."""

    ts: float
    device: str | None
    kind: str
    detail: str = ""


@dataclass
class Faults:
    """Injected misbehaviour for PUBACKs of device publishes."""

    drop: int = 0
    drop_device: str | None = None
    disconnect_on_drop: bool = False
    delay: float = 0.0


@dataclass
class Limits:
    """Tenant-profile rate limits; ``None`` = unset (unlimited), the CE default."""

    messages: str | None = None
    telemetry_messages: str | None = None
    telemetry_data_points: str | None = None
    reported: dict[str, Any] | None = None  # getSessionLimits override
    buckets: dict[str, DeviceLimits] = field(default_factory=dict)


class TbServer:
    """ThingsBoard's device MQTT API on one asyncio loop."""

    def __init__(self, config: ServerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.registry = Registry()
        self.sessions: dict[str, TbSession] = {}  # device name -> its one session
        self.all_sessions: set[TbSession] = set()
        self.rpc = RpcManager(loop, config.rpc_delivery_timeout)
        self.client_rpc_handlers: dict[str, ClientRpcHandler] = {}
        self.client_rpc_log: list[tuple[str, int, str, Any]] = []
        self.limits = Limits()
        self.faults = Faults()
        self.events: list[Event] = []
        self.port = config.port
        self.tls_port = config.tls_port
        self._servers: list[asyncio.base_events.Server] = []
        self._watchdog: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the plain and (optionally) TLS listeners; port 0 picks a free port once."""
        plain = await asyncio.start_server(self._on_client, self.config.host, self.port)
        self.port = plain.sockets[0].getsockname()[1]
        self._servers = [plain]
        if self.tls_port is not None:
            tls = await asyncio.start_server(self._on_client, self.config.host, self.tls_port, ssl=self._ssl_context())
            self.tls_port = tls.sockets[0].getsockname()[1]
            self._servers.append(tls)
        self._watchdog = self.loop.create_task(self._inactivity_watchdog())

    async def stop(self, reason: str = "server_stopped") -> None:
        """Close listeners and every session."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for server in self._servers:
            server.close()
        for session in list(self.all_sessions):
            await session.close(reason)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    async def restart(self) -> None:
        """Like a TB restart: sessions drop, in-memory RPCs and RPC counters are lost, data stays."""
        self.event(None, "restart")
        await self.stop("server_restart")
        self.rpc.reset()
        await self.start()

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert self.config.certfile is not None
        context.load_cert_chain(self.config.certfile, self.config.keyfile)
        if self.config.cafile:
            context.load_verify_locations(self.config.cafile)
            context.verify_mode = ssl.CERT_OPTIONAL  # client certificates are possible, tokens still work
        return context

    async def _inactivity_watchdog(self) -> None:
        """Close sessions idle longer than the session inactivity timeout (§0.4)."""
        interval = min(1.0, self.config.inactivity_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.config.inactivity_timeout
            for session in list(self.all_sessions):
                if session.last_activity < deadline:
                    await session.close("inactivity_timeout")

    def event(self, device: str | None, kind: str, detail: str = "") -> None:
        self.events.append(Event(time.time(), device, kind, detail))

    # -- connect -----------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r, w = StreamReaderAdapter(reader), StreamWriterAdapter(writer)
        try:
            connect = await asyncio.wait_for(ConnectPacket.from_stream(r), 10.0)
        except Exception:
            await _close_quietly(w)
            return
        code, device = self._authenticate(connect)
        if code == ACCEPTED and device is not None and not self.allow_message(device):
            code = SERVER_UNAVAILABLE  # SESSION_OPEN rate-limited: 0x03 on MQTT 3.1.1
        if code != ACCEPTED:
            self.event(device.name if device else connect.username, "connect_refused", f"0x{code:02x}")
            try:
                await ConnackPacket.build(0, code).to_stream(w)
            finally:
                await _close_quietly(w)
            return
        session = TbSession(self, device, self.loop)
        amqtt_session = Session()
        amqtt_session.client_id = connect.client_id
        amqtt_session.username = connect.username
        amqtt_session.keep_alive = 0  # TB enforces no keep-alive (§0.4)
        session.bind(amqtt_session, r, w)
        self.all_sessions.add(session)
        if device is not None:
            older = self.sessions.get(device.name)
            self.sessions[device.name] = session
            if older is not None:
                await older.close("session_taken_over")
        # sessionPresent = !cleanSession, although TB keeps no session state (§0.3).
        await session._send_packet(ConnackPacket.build(0 if connect.clean_session_flag else 1, ACCEPTED))
        self.event(device.name if device else None, "connected", "provision" if device is None else "")
        await session.start()

    def _authenticate(self, connect: ConnectPacket) -> tuple[int, Device | None]:
        """CONNACK code and device for a CONNECT (§0.3); (0, None) is a provision-only session."""
        if connect.proto_name not in ("MQTT", "MQIsdp") or connect.proto_level not in (3, 4):
            return BAD_PROTOCOL, None  # MQTT 5 is not offered by this stand-in (see README)
        username, password = connect.username, connect.password
        client_id = None if connect.client_id_is_random else connect.client_id
        if username == "provision" or client_id == "provision":
            return ACCEPTED, None
        if username and password is None:
            device = self.registry.by_token(username)
            return (ACCEPTED, device) if device else (NOT_AUTHORIZED, None)
        if username or password:
            device = self.registry.by_basic(client_id, username, password)
            return (ACCEPTED, device) if device else (NOT_AUTHORIZED, None)
        if client_id:
            device = self.registry.by_basic(client_id, None, None)
            return (ACCEPTED, device) if device else (IDENTIFIER_REJECTED, None)
        return NOT_AUTHORIZED, None

    def on_session_closed(self, session: TbSession, reason: str) -> None:
        self.all_sessions.discard(session)
        name = session.device.name if session.device else None
        if name is not None and self.sessions.get(name) is session:
            del self.sessions[name]
        self.event(name, "disconnected", reason)

    # -- limits and acks -----------------------------------------------------

    def _buckets(self, device: Device) -> DeviceLimits:
        buckets = self.limits.buckets.get(device.name)
        if buckets is None:
            buckets = DeviceLimits(self.limits.messages, self.limits.telemetry_messages,
                                   self.limits.telemetry_data_points)
            self.limits.buckets[device.name] = buckets
        return buckets

    def allow_message(self, device: Device) -> bool:
        return self._buckets(device).allow_message()

    def session_limits(self) -> dict[str, Any]:
        """The built-in ``getSessionLimits`` reply (§3.4)."""
        if self.limits.reported is not None:
            return self.limits.reported
        return {"maxPayloadSize": MAX_PAYLOAD_SIZE, "maxInflightMessages": MAX_INFLIGHT,
                "rateLimits": {"messages": self.limits.messages,
                               "telemetryMessages": self.limits.telemetry_messages,
                               "telemetryDataPoints": self.limits.telemetry_data_points}}

    async def ack(self, session: TbSession, packet_id: int | None) -> str | None:
        """PUBACK an accepted publish, unless a fault says otherwise; a string closes the session."""
        if packet_id is None:
            return None
        faults = self.faults
        name = session.device.name if session.device else None
        if faults.drop > 0 and faults.drop_device in (None, name):
            faults.drop -= 1
            self.event(name, "puback_dropped", str(packet_id))
            return "fault_disconnect" if faults.disconnect_on_drop else None
        if faults.delay > 0:
            self.loop.call_later(faults.delay, lambda: self.loop.create_task(session.send_puback(packet_id)))
            return None
        await session.send_puback(packet_id)
        return None

    # -- device topics -------------------------------------------------------

    async def on_device_publish(self, session: TbSession, device: Device, topic: str, payload: bytes,
                                packet_id: int | None) -> str | None:
        """Route one device PUBLISH; parse first, then rate-limit, store, and only then PUBACK."""
        if topic == TELEMETRY:
            records, points = parse_telemetry(payload)
            if not self._buckets(device).allow_telemetry(points):
                return "rate_limit"
            device.telemetry.extend(records)
            device.data_points += points
            return await self.ack(session, packet_id)
        if topic == ATTRIBUTES:
            attributes = parse_attributes(payload)
            if not self._buckets(device).allow_telemetry(len(attributes)):
                return "rate_limit"
            device.client.update(attributes)
            return await self.ack(session, packet_id)
        if topic.startswith(ATTR_REQUEST):
            request_id = parse_request_id(topic, ATTR_REQUEST)
            response = attribute_response(device, payload)
            return await self._answer(session, device, packet_id, request_id, ATTR_RESPONSE, response)
        if topic.startswith(RPC_RESPONSE):
            request_id = parse_request_id(topic, RPC_RESPONSE)
            if not self.allow_message(device):
                return "rate_limit"
            self.rpc.on_reply(device.name, request_id, payload)
            return await self.ack(session, packet_id)
        if topic.startswith(RPC_REQUEST):
            return await self._client_rpc(session, device, topic, payload, packet_id)
        match = OTA_REQUEST.match(topic)
        if match:
            return await self._ota_chunk(session, device, match, payload, packet_id)
        if topic == CLAIM and not self.allow_message(device):
            return "rate_limit"
        # Claim, and unknown topics: PUBACK (0x90 on MQTT 5 only), data dropped, session stays (§0.4).
        self.event(device.name, "unknown_topic" if topic != CLAIM else "claim", topic)
        return await self.ack(session, packet_id)

    async def _answer(self, session: TbSession, device: Device, packet_id: int | None, request_id: int,
                      prefix: str, response: Any) -> str | None:
        if not self.allow_message(device):
            return "rate_limit"
        reason = await self.ack(session, packet_id)
        if reason is None and request_id >= 0:  # JMA publishes only for requestId >= 0
            await _push_if_open(session, f"{prefix}{request_id}", dumps(response))
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
        self.client_rpc_log.append((device.name, request_id, method, params))
        if method == "getSessionLimits":  # answered by the transport itself (§3.4)
            return await self._answer(session, device, packet_id, request_id, RPC_RESPONSE, self.session_limits())
        handler = self.client_rpc_handlers.get(method)
        reply = handler(device.name, params) if handler is not None else None
        if reply is not None:
            return await self._answer(session, device, packet_id, request_id, RPC_RESPONSE, reply)
        if not self.allow_message(device):
            return "rate_limit"
        reason = await self.ack(session, packet_id)
        topic_out = f"{RPC_RESPONSE}{request_id}"
        # No "RPC Call Reply" node: the transport answers {"error":"timeout"} after 60 s (§3.2).
        self.loop.call_later(self.config.client_rpc_timeout, lambda: self.loop.create_task(
            _push_if_open(session, topic_out, b'{"error":"timeout"}')))
        return reason

    async def _ota_chunk(self, session: TbSession, device: Device, match: Any, payload: bytes,
                         packet_id: int | None) -> str | None:
        kind, request_id, index = match.group(1), int(match.group(2)), int(match.group(3))
        if not self.allow_message(device):
            return "rate_limit"
        reason = await self.ack(session, packet_id)
        if reason is not None:
            return reason
        key = (kind, request_id)
        bound, remembered = session.ota_requests.get(key, (device.ota.get(kind), None))
        try:
            size = ota.parse_chunk_size(payload, remembered)
            session.ota_requests[key] = (bound, size)  # requestId is bound to the package on first use
            data = ota.chunk(bound, size, index)
        except ota.OtaError as error:
            await _push_if_open(session, FW_ERROR, error.code.encode())
            return f"ota_{error.code.lower()}"
        await _push_if_open(session, f"v2/{kind}/response/{request_id}/chunk/{index}", data)
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
        response = self.registry.provision(request)
        self.event(request.get("deviceName"), "provision", response["status"])
        reason = await self.ack(session, packet_id)
        if reason is None:
            await _push_if_open(session, PROVISION_RESPONSE, dumps(response))
            self.loop.call_later(self.config.provision_close_after,
                                 lambda: self.loop.create_task(session.close("provision_session_expired")))
        return reason

    # -- control operations (called on the loop by api.StandIn) ---------------

    async def set_shared(self, name: str, values: dict[str, Any]) -> None:
        """Write shared attributes and push the flat update to a subscribed session."""
        device = self.registry.devices[name]
        device.shared.update(values)
        await self._push_attributes(name, values)

    async def delete_shared(self, name: str, keys: list[str]) -> None:
        """Delete shared attributes; a subscribed session gets ``{"deleted": [...]}``."""
        device = self.registry.devices[name]
        for key in keys:
            device.shared.pop(key, None)
        await self._push_attributes(name, {"deleted": list(keys)})

    async def _push_attributes(self, name: str, body: dict[str, Any]) -> None:
        session = self.sessions.get(name)
        if session is not None and ATTRIBUTES in session.subscriptions:
            await _push_if_open(session, ATTRIBUTES, dumps(body))

    async def call_rpc(self, name: str, method: str, params: Any, timeout: float, oneway: bool) -> Any:
        if name not in self.registry.devices:
            raise KeyError(name)
        return await self.rpc.call(name, self.sessions.get(name), method, params, timeout, oneway)

    def submit_persistent_rpc(self, name: str, method: str, params: Any, timeout: float, oneway: bool) -> str:
        """A persistent RPC: queued (also across restarts) until delivered or expired; returns its id."""
        if name not in self.registry.devices:
            raise KeyError(name)
        return self.rpc.submit(name, self.sessions.get(name), method, params, timeout, oneway, persistent=True).uuid

    def on_rpc_subscribed(self, session: TbSession) -> None:
        self.rpc.on_subscribed(session)

    async def assign_ota(self, name: str, package: ota.OtaPackage, initiate_after: float) -> None:
        """Assign a package: QUEUED telemetry now, INITIATED and the attributes when the queue runs."""
        device = self.registry.devices[name]
        device.ota[package.kind] = package
        ts = now_ms()
        device.telemetry.append((ts, ota.queued_telemetry(package, ts)))
        if initiate_after > 0:
            self.loop.call_later(initiate_after, lambda: self.loop.create_task(self._initiate_ota(name, package)))
        else:
            await self._initiate_ota(name, package)

    async def _initiate_ota(self, name: str, package: ota.OtaPackage) -> None:
        device = self.registry.devices[name]
        if device.ota.get(package.kind) is not package:
            return  # replaced or unassigned meanwhile
        device.telemetry.append((now_ms(), {f"{package.kind}_state": "INITIATED"}))
        deleted, values = ota.shared_update(package)
        await self.delete_shared(name, deleted)
        await self.set_shared(name, values)

    async def unassign_ota(self, name: str, kind: str) -> None:
        self.registry.devices[name].ota.pop(kind, None)
        await self.delete_shared(name, ota.unassigned_keys(kind))

    async def disconnect(self, name: str, reason: str = "admin_disconnect") -> bool:
        session = self.sessions.get(name)
        if session is None:
            return False
        await session.close(reason)
        return True


async def _push_if_open(session: TbSession, topic: str, payload: bytes) -> None:
    """Best-effort server push: a session that went away meanwhile just misses it, as in TB."""
    if session.close_reason is None:
        try:
            await session.push(topic, payload)
        except Exception:  # the connection broke under us; the reader loop reports the close
            pass


async def _close_quietly(writer: StreamWriterAdapter) -> None:
    try:
        await writer.close()
    except Exception:
        pass
