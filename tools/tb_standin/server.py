"""The stand-in's core: listeners, authentication, sessions and what each device topic does.

Runs entirely on one asyncio loop; ``api.StandIn`` calls into it from other
threads. Everything a device publishes is stored *before* the PUBACK goes
out, so a PUBACK means what it means in ThingsBoard: "accepted".
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import AMQTTError
from amqtt.session import Session

from tools.tb_standin import ota
from tools.tb_standin.connect import Connect, disconnect_bytes, read_connect, v311_connack_code, write_connack
from tools.tb_standin.model import (
    MAX_INFLIGHT,
    MAX_PAYLOAD_SIZE,
    Device,
    OtaPackage,
    dumps,
    now_ms,
)
from tools.tb_standin.provision import Registry
from tools.tb_standin.ratelimit import DeviceLimits
from tools.tb_standin.routes import DeviceTopics
from tools.tb_standin.rpc import RpcManager
from tools.tb_standin.transport import TbSession, push_if_open

# CONNACK codes as TB chooses them, in their MQTT 5 form (MTH:1346-1397); on 3.1.1 they are
# mapped by v311_connack_code like ReturnCodeResolver.getConnectionReturnCode.
ACCEPTED, BAD_PROTOCOL = 0x00, 0x01
CLIENT_ID_NOT_VALID, BAD_USER_NAME_OR_PASSWORD, NOT_AUTHORIZED = 0x85, 0x86, 0x87
CONNECTION_RATE_EXCEEDED = 0x9F
MESSAGE_RATE_TOO_HIGH = 0x96  # the DISCONNECT after a rate-limited CONNECT (MTH:1388)
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
    # Refuse the next ``refuse`` QoS 1 device publishes (whose payload holds ``refuse_match``) as TB
    # refuses a payload it cannot parse: PUBACK ``refuse_code`` on MQTT 5, a close on 3.1.1.
    refuse: int = 0
    refuse_code: int = 0x99
    refuse_device: str | None = None
    refuse_match: bytes | None = None
    # Not TB's behaviour (its CONNACK has no properties): a Receive Maximum in the MQTT 5 CONNACK,
    # enforced as MQTT 5 says (more unacknowledged QoS 1 publishes: DISCONNECT 0x93).
    receive_maximum: int | None = None
    peak_unacked: dict[str, int] = field(default_factory=dict)  # per device, over its sessions

    def take_refusal(self, device: str | None, payload: bytes) -> int | None:
        """The reason code to refuse this publish with, or None; counts the refusal down."""
        if self.refuse <= 0 or self.refuse_device not in (None, device):
            return None
        if self.refuse_match is not None and self.refuse_match not in payload:
            return None
        self.refuse -= 1
        return self.refuse_code


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
        self.topics = DeviceTopics(self)

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
            connect = await asyncio.wait_for(read_connect(r), 10.0)
        except Exception:
            await _close_quietly(w)
            return
        if connect is None:
            await _close_quietly(w)
            return
        v5 = connect.version == 5
        code, device = self._authenticate(connect)
        disconnect_code = code  # closeCtx(ctx, returnCode) repeats the CONNACK code (MTH:1361-1362)
        if code == ACCEPTED and device is not None and not self.allow_message(device):
            # SESSION_OPEN rate-limited: CONNACK CONNECTION_RATE_EXCEEDED, DISCONNECT
            # MESSAGE_RATE_TOO_HIGH (MTH:1384-1388); 0x9F is 0x03 on 3.1.1 (ReturnCodeResolver.java:35-37).
            code, disconnect_code = CONNECTION_RATE_EXCEEDED, MESSAGE_RATE_TOO_HIGH
        if code != ACCEPTED:
            wire_code = code if v5 else v311_connack_code(code)
            self.event(device.name if device else connect.username, "connect_refused", f"0x{wire_code:02x}")
            with suppress(ConnectionError, OSError):
                await write_connack(w, v5, False, code)
                if v5:
                    w.write(disconnect_bytes(disconnect_code))
                    await w.drain()
            await _close_quietly(w)
            return
        await self._open_session(connect, device, r, w)

    async def _open_session(self, connect: Connect, device: Device | None, r: StreamReaderAdapter,
                            w: StreamWriterAdapter) -> None:
        session = TbSession(self, device, self.loop, v5=connect.version == 5)
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
        self.event(device.name if device else None, "connected", "provision" if device is None else "")
        try:
            # sessionPresent = !cleanSession, although TB keeps no session state (MTH:1151-1157).
            async with session._write_lock:
                await write_connack(w, session.v5, not connect.clean_session, ACCEPTED,
                                    receive_maximum=self.faults.receive_maximum)
            await session.start()
        except (ConnectionError, OSError, AMQTTError):
            await session.close("connection_lost")  # the client went away during the handshake

    def _authenticate(self, connect: Connect) -> tuple[int, Device | None]:
        """CONNACK code (MQTT 5 value) and device for a CONNECT; (0, None) is a provision-only session.

        Credentials as DefaultTransportApiService.validateCredentials (DTAS:231-256, 287-302):
        no username: MQTT_BASIC by clientId; a username: MQTT_BASIC by clientId+username, else
        the username as an access token, whose password is ignored. Failure codes as
        onValidateDeviceResponse chooses them (MTH:1346-1362).
        """
        if connect.version not in (3, 4, 5):
            return BAD_PROTOCOL, None
        username, password, client_id = connect.username, connect.password, connect.client_id
        if username == "provision" or client_id == "provision":
            return ACCEPTED, None  # MTH:1067-1069
        if not username:
            device = self.registry.by_basic(client_id, None, password) if client_id else None
        else:
            device = self.registry.by_basic(client_id, username, password) or self.registry.by_token(username)
        if device is not None:
            return ACCEPTED, device
        if (username is not None and password is not None) or ((username is None) != (password is None)):
            return BAD_USER_NAME_OR_PASSWORD, None
        if client_id.strip():
            return CLIENT_ID_NOT_VALID, None
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

    async def ack(self, session: TbSession, packet_id: int | None, reason: int = 0) -> str | None:
        """PUBACK a publish (``reason`` goes out on MQTT 5 only), unless a fault says otherwise.

        A returned string closes the session with that reason.
        """
        if packet_id is None:
            return None
        faults = self.faults
        name = session.device.name if session.device else None
        if faults.drop > 0 and faults.drop_device in (None, name):
            faults.drop -= 1
            self.event(name, "puback_dropped", str(packet_id))
            return "fault_disconnect" if faults.disconnect_on_drop else None
        if faults.delay > 0:
            self.loop.call_later(faults.delay, lambda: self.loop.create_task(session.send_puback(packet_id, reason)))
            return None
        await session.send_puback(packet_id, reason)
        return None

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
        if session is not None and session.attributes_topic is not None:
            await push_if_open(session, session.attributes_topic, dumps(body))

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

    async def assign_ota(self, name: str, package: OtaPackage, initiate_after: float) -> None:
        """Assign a package: QUEUED telemetry now, INITIATED and the attributes when the queue runs."""
        device = self.registry.devices[name]
        device.ota[package.kind] = package
        ts = now_ms()
        device.telemetry.append((ts, ota.queued_telemetry(package, ts)))
        if initiate_after > 0:
            self.loop.call_later(initiate_after, lambda: self.loop.create_task(self._initiate_ota(name, package)))
        else:
            await self._initiate_ota(name, package)

    async def _initiate_ota(self, name: str, package: OtaPackage) -> None:
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

    async def delete_device(self, name: str) -> None:
        """Delete a device; its session is closed (MQTT 5 would say 0x98 administrative action)."""
        device = self.registry.devices.pop(name)
        if device.token is not None:
            self.registry.tokens.pop(device.token, None)
        self.limits.buckets.pop(name, None)
        await self.disconnect(name, "device_deleted")

    async def set_token(self, name: str, token: str) -> None:
        """Change a device's access token; like a credentials update in TB, the session is closed."""
        device = self.registry.devices[name]
        if token in self.registry.tokens and self.registry.tokens[token] != name:
            raise ValueError(f"token {token!r} is already used by {self.registry.tokens[token]!r}")
        if device.token is not None:
            self.registry.tokens.pop(device.token, None)
        device.token = token
        self.registry.tokens[token] = name
        await self.disconnect(name, "credentials_updated")

    async def disconnect(self, name: str, reason: str = "admin_disconnect") -> bool:
        session = self.sessions.get(name)
        if session is None:
            return False
        await session.close(reason)
        return True


async def _close_quietly(writer: StreamWriterAdapter) -> None:
    try:
        await writer.close()
    except Exception:
        pass
