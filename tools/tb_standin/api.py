"""``StandIn``: the ThingsBoard stand-in as a Python object, for tests, benchmarks and the demo.

The server runs on its own asyncio loop in a background thread; every method
here hops onto that loop and waits for the result, so callers stay plain
synchronous code and never race the server's state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tools.tb_standin import certs, ota
from tools.tb_standin.model import (
    ALLOW_CREATE,
    MAX_INFLIGHT,
    MAX_PAYLOAD_SIZE,
    ProvisionProfile,
    typed_values,
)
from tools.tb_standin.ratelimit import RateLimit
from tools.tb_standin.rpc import RpcTimeout
from tools.tb_standin.server import ClientRpcHandler, Event, ServerConfig, TbServer

T = TypeVar("T")
__all__ = ["RpcTimeout", "StandIn"]


class StandIn:
    """A running ThingsBoard stand-in. Use as a context manager, or call ``start()``/``stop()``.

    ``port=0`` (and ``tls_port=0``) pick free ports; read them back from ``.port``/``.tls_port``.
    With ``tls_port`` set and no ``certfile``, a CA and server certificate are generated
    (``.cafile`` is the CA a client should trust). The timing keywords default to ThingsBoard's.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls_port: int | None = None,
                 certfile: str | None = None, keyfile: str | None = None, cafile: str | None = None, *,
                 provision_close_after: float = 60.0, rpc_delivery_timeout: float = 10.0,
                 client_rpc_timeout: float = 60.0, inactivity_timeout: float = 600.0) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if tls_port is not None and certfile is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tb-standin-")
            generated = certs.generate(self._tmp.name, (host, "localhost") if host != "localhost" else (host,))
            certfile, keyfile = generated["certfile"], generated["keyfile"]
            cafile = cafile or generated["cafile"]
        self.cafile = cafile
        self.host = host
        self._config = ServerConfig(host, port, tls_port, certfile, keyfile, cafile, provision_close_after,
                                    rpc_delivery_timeout, client_rpc_timeout, inactivity_timeout)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="tb-standin", daemon=True)
        self._server = TbServer(self._config, self._loop)
        self._running = False

    # -- lifecycle -----------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> StandIn:
        """Start the loop thread and open the listeners."""
        self._thread.start()
        try:
            self._await(self._server.start())
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)  # e.g. the port is taken: leave no thread behind
            self._thread.join(5)
            self._loop.close()
            raise
        self._running = True
        return self

    def stop(self) -> None:
        """Close every session and listener, stop the loop thread and release the ports."""
        if not self._running:
            return
        self._running = False
        self._await(self._server.stop())
        self._await(_cancel_other_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def tls_port(self) -> int | None:
        return self._server.tls_port

    def _await(self, awaitable: Awaitable[T], timeout: float | None = 30.0) -> T:
        async def runner() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(runner(), self._loop).result(timeout)

    def _sync(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the server loop (state is only ever touched there)."""
        async def runner() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(runner(), self._loop).result(30.0)

    # -- devices and provisioning ----------------------------------------------

    def add_device(self, name: str, token: str | None = None, profile: str = "default") -> str:
        """Create a device with an access token (generated if not given); return the token."""
        return self._sync(lambda: self._server.registry.add_device(name, token, profile).token or "")

    def add_provision_profile(self, key: str, secret: str, strategy: str = ALLOW_CREATE,
                              name: str | None = None) -> None:
        """Enable provisioning with key/secret; ``name`` is the device profile name (default: key)."""
        profile = ProvisionProfile(name or key, key, secret, strategy)
        self._sync(lambda: self._server.registry.profiles.__setitem__(key, profile))

    def delete_device(self, device: str) -> None:
        """Delete a device (data included); an open session is closed ("device_deleted")."""
        self._await(self._server.delete_device(device))

    def set_token(self, device: str, token: str) -> None:
        """Replace the device's access token; an open session is closed ("credentials_updated")."""
        self._await(self._server.set_token(device, token))

    def devices(self) -> dict[str, str | None]:
        """Device name -> access token (None for non-token credentials)."""
        return self._sync(lambda: {n: d.token for n, d in self._server.registry.devices.items()})

    def device_info(self, device: str) -> dict[str, Any]:
        """Profile, server attributes (e.g. provisionState) and credentials of one device."""
        def info() -> dict[str, Any]:
            d = self._server.registry.devices[device]
            return {"name": d.name, "token": d.token, "profile": d.profile, "basic": d.basic, "server": dict(d.server)}
        return self._sync(info)

    # -- attributes and telemetry ----------------------------------------------

    def set_shared(self, device: str, values: dict[str, Any]) -> None:
        """Set shared attributes; a device subscribed to ``v1/devices/me/attributes`` gets them pushed."""
        self._await(self._server.set_shared(device, dict(values)))

    def delete_shared(self, device: str, keys: list[str]) -> None:
        """Delete shared attributes; a subscribed device gets ``{"deleted": [...]}``."""
        self._await(self._server.delete_shared(device, list(keys)))

    def shared(self, device: str) -> dict[str, Any]:
        return self._sync(lambda: dict(self._server.registry.devices[device].shared))

    def client_attributes(self, device: str) -> dict[str, Any]:
        return self._sync(lambda: dict(self._server.registry.devices[device].client))

    def telemetry(self, device: str, key: str | None = None) -> list[tuple[int, Any]]:
        """Stored records ``(ts, values)`` in arrival order; with ``key``, ``(ts, value)`` of that key."""
        def read() -> list[tuple[int, Any]]:
            records = [(ts, typed_values(values)) for ts, values in self._server.registry.devices[device].telemetry]
            if key is None:
                return records
            return [(ts, values[key]) for ts, values in records if key in values]
        return self._sync(read)

    def latest(self, device: str) -> dict[str, Any]:
        """Latest value of every telemetry key (by timestamp, later arrival wins ties)."""
        def read() -> dict[str, Any]:
            best: dict[str, tuple[int, Any]] = {}
            for ts, values in self._server.registry.devices[device].telemetry:
                for k, v in typed_values(values).items():
                    if k not in best or ts >= best[k][0]:
                        best[k] = (ts, v)
            return {k: v for k, (_, v) in best.items()}
        return self._sync(read)

    def telemetry_count(self, device: str) -> int:
        """Number of stored telemetry records (timestamp groups)."""
        return self._sync(lambda: len(self._server.registry.devices[device].telemetry))

    def data_points(self, device: str) -> int:
        """Number of data points the device uploaded as telemetry."""
        return self._sync(lambda: self._server.registry.devices[device].data_points)

    # -- RPC ---------------------------------------------------------------------

    def rpc(self, device: str, method: str, params: Any = None, timeout: float = 10.0, oneway: bool = False) -> Any:
        """Server-side RPC like REST ``/api/rpc/{twoway|oneway}``: the device's reply (parsed JSON).

        Raises :class:`RpcTimeout` (``.status`` NO_ACTIVE_CONNECTION or TIMEOUT, ``.http_status`` 504).
        """
        return self.rpc_async(device, method, params, timeout, oneway).result(timeout + 30.0)

    def rpc_async(self, device: str, method: str, params: Any = None, timeout: float = 10.0,
                  oneway: bool = False) -> concurrent.futures.Future[Any]:
        """Start an RPC and return at once; the future holds the reply or RpcTimeout."""
        return asyncio.run_coroutine_threadsafe(
            self._server.call_rpc(device, method, params, timeout, oneway), self._loop)

    def rpc_persistent(self, device: str, method: str, params: Any = None, timeout: float = 10.0,
                       oneway: bool = False) -> str:
        """Persistent RPC (REST ``"persistent": true``): returns its id at once; see :meth:`rpc_status`.

        ``timeout`` sets the expiration (TB: now + max(5 s, timeout), 10 s by default).
        """
        return self._sync(lambda: self._server.submit_persistent_rpc(device, method, params, timeout, oneway))

    def rpc_status(self, rpc_id: str) -> dict[str, Any]:
        """A persistent RPC's state: status (QUEUED, SENT, DELIVERED, SUCCESSFUL, TIMEOUT, EXPIRED),
        the device's response, the request id it was sent with and its status history."""
        def read() -> dict[str, Any]:
            rpc = self._server.rpc.persistent[rpc_id]
            return {"id": rpc.uuid, "device": rpc.device, "request_id": rpc.rpc_id, "method": rpc.method,
                    "status": rpc.status, "response": rpc.response, "history": list(rpc.history)}
        return self._sync(read)

    def rpc_history(self, device: str | None = None) -> list[dict[str, Any]]:
        """Finished server-side RPCs: id, method, final status and the status history."""
        return self._sync(lambda: [
            {"device": r.device, "id": r.rpc_id, "method": r.method, "status": r.status, "history": list(r.history)}
            for r in self._server.rpc.finished if device in (None, r.device)])

    def set_client_rpc_handler(self, method: str, handler: ClientRpcHandler | None) -> None:
        """Answer client-side RPC ``method`` with ``handler(device, params)``; None removes it.

        The handler runs on the server loop; returning None means "no reply" (timeout after 60 s).
        """
        def install() -> None:
            if handler is None:
                self._server.client_rpc_handlers.pop(method, None)
            else:
                self._server.client_rpc_handlers[method] = handler
        self._sync(install)

    def client_rpcs(self, device: str | None = None) -> list[tuple[str, int, str, Any]]:
        """Client-side RPC requests received: (device, request id, method, params)."""
        return self._sync(lambda: [r for r in self._server.client_rpc_log if device in (None, r[0])])

    # -- OTA -----------------------------------------------------------------------

    def assign_ota(self, device: str, kind: str = "sw", title: str = "", version: str = "", data: bytes = b"",
                   url: str | None = None, tag: str | None = None, checksum_algorithm: str | None = "SHA256",
                   checksum: str | None = None, initiate_after: float = 0.0) -> None:
        """Assign a firmware (``fw``) or software (``sw``) package, stored (``data``) or external (``url``).

        ``initiate_after`` delays the INITIATED step, as TB's OTA queue does (60 s pace).
        """
        package = ota.make_package(kind, title, version, data, url, tag, checksum_algorithm, checksum)
        self._await(self._server.assign_ota(device, package, initiate_after))

    def unassign_ota(self, device: str, kind: str = "sw") -> None:
        self._await(self._server.unassign_ota(device, kind))

    # -- limits ------------------------------------------------------------------------

    def set_limits(self, messages: str | None = None, telemetry_messages: str | None = None,
                   telemetry_data_points: str | None = None) -> None:
        """Per-device rate limits in TB's "cap:sec,cap:sec" form (None = unlimited); buckets start full."""
        for spec in (messages, telemetry_messages, telemetry_data_points):
            RateLimit(spec)  # validate before applying

        def apply() -> None:
            limits = self._server.limits
            limits.messages, limits.telemetry_messages = messages or None, telemetry_messages or None
            limits.telemetry_data_points = telemetry_data_points or None
            limits.buckets.clear()
        self._sync(apply)

    def set_session_limits(self, max_payload_size: int = MAX_PAYLOAD_SIZE, max_inflight_messages: int = MAX_INFLIGHT,
                           messages: str | None = None, telemetry_messages: str | None = None,
                           telemetry_data_points: str | None = None, *, reset: bool = False) -> None:
        """Override what ``getSessionLimits`` reports (``reset=True``: report the enforced limits again)."""
        reported = None if reset else {
            "maxPayloadSize": max_payload_size, "maxInflightMessages": max_inflight_messages,
            "rateLimits": {"messages": messages, "telemetryMessages": telemetry_messages,
                           "telemetryDataPoints": telemetry_data_points}}
        self._sync(lambda: setattr(self._server.limits, "reported", reported))

    def session_limits(self) -> dict[str, Any]:
        return self._sync(self._server.session_limits)

    # -- faults and sessions -------------------------------------------------------------

    def drop_pubacks(self, n: int, device: str | None = None, disconnect: bool = False) -> None:
        """Store but do not acknowledge the next ``n`` QoS 1 publishes; ``disconnect`` also drops the session."""
        def apply() -> None:
            faults = self._server.faults
            faults.drop, faults.drop_device, faults.disconnect_on_drop = n, device, disconnect
        self._sync(apply)

    def refuse_pubacks(self, n: int, code: int = 0x99, device: str | None = None, contains: str | None = None) -> None:
        """Refuse the next ``n`` QoS 1 publishes (of ``device``, whose payload contains ``contains``)
        as ThingsBoard refuses a payload it cannot parse: nothing stored, PUBACK ``code`` on MQTT 5,
        the session closed (``invalid_payload``) on 3.1.1."""
        def apply() -> None:
            faults = self._server.faults
            faults.refuse, faults.refuse_code, faults.refuse_device = n, int(code), device
            faults.refuse_match = contains.encode() if contains is not None else None
        self._sync(apply)

    def set_receive_maximum(self, n: int | None) -> None:
        """Send Receive Maximum ``n`` in MQTT 5 CONNACKs from the next connect on (None: omit it, as TB
        does) and enforce it: a session with more unacknowledged QoS 1 publishes gets DISCONNECT 0x93."""
        self._sync(lambda: setattr(self._server.faults, "receive_maximum", int(n) if n else None))

    def peak_unacked(self, device: str) -> int:
        """The most QoS 1 publishes of ``device`` awaiting their PUBACK at once, over all its sessions."""
        return self._sync(lambda: self._server.faults.peak_unacked.get(device, 0))

    def delay_pubacks(self, seconds: float) -> None:
        """Send every PUBACK ``seconds`` late (0 turns it off); reading continues meanwhile."""
        self._sync(lambda: setattr(self._server.faults, "delay", float(seconds)))

    def restart(self) -> None:
        """Restart the server on the same ports: sessions drop, in-memory RPCs are lost, data stays."""
        self._await(self._server.restart())

    def down(self, reason: str = "outage") -> None:
        """Make ThingsBoard unreachable: close listeners and sessions; state (and pending RPCs) stay."""
        self._await(self._server.stop(reason))

    def up(self) -> None:
        """End an outage begun with :meth:`down`: listen again on the same ports."""
        self._await(self._server.start())

    def disconnect(self, device: str) -> bool:
        """Close the device's session from the server side; False if it was not connected."""
        return self._await(self._server.disconnect(device))

    def is_connected(self, device: str) -> bool:
        return self._sync(lambda: device in self._server.sessions)

    def subscriptions(self, device: str) -> dict[str, int]:
        """Granted subscriptions of the device's current session (empty if offline)."""
        def read() -> dict[str, int]:
            session = self._server.sessions.get(device)
            return dict(session.subscriptions) if session else {}
        return self._sync(read)

    def events(self, device: str | None = None, kind: str | None = None) -> list[Event]:
        """The event log: connected, connect_refused, disconnected (detail = reason), puback_dropped, ..."""
        return self._sync(lambda: [e for e in self._server.events
                                   if device in (None, e.device) and kind in (None, e.kind)])

    def disconnect_reasons(self, device: str) -> list[str]:
        """Why each session of ``device`` ended, oldest first (e.g. "rate_limit", "invalid_payload")."""
        return [e.detail for e in self.events(device, "disconnected")]

    def load_state(self, state: dict[str, Any]) -> None:
        """Initial state: {"devices": [{"name", "token"?, "profile"?}], "profiles": [{"key", "secret",
        "strategy"?, "name"?}], "shared": {device: {...}}, "limits": {...}}."""
        for device in state.get("devices", []):
            self.add_device(device["name"], device.get("token"), device.get("profile", "default"))
        for profile in state.get("profiles", []):
            self.add_provision_profile(profile["key"], profile["secret"], profile.get("strategy", ALLOW_CREATE),
                                       profile.get("name"))
        for device, values in state.get("shared", {}).items():
            self.set_shared(device, values)
        if "limits" in state:
            self.set_limits(**state["limits"])

    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01) -> T:
        """Poll ``predicate`` until it returns something truthy; return it, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)


async def _cancel_other_tasks() -> None:
    """Cancel leftover timers' tasks so the loop closes without 'Task was destroyed' noise."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
