"""Server-side RPC as ThingsBoard's device actor runs it (§3.1).

Each device has a counter ``rpcSeq`` from 0 (reset when the server restarts).
An RPC waits in the pending map until it expires; it is written when the device
has an RPC subscription, at once or on the SUBSCRIBE (BURST: all pending ones).
A QoS 1 request is DELIVERED on the device's PUBACK; without one within
min(10 s, time left) it is TIMEOUT and stays pending, so the next RPC
subscription re-sends it. A two-way call ends with the device's reply or, at
expiry, with :class:`RpcTimeout` (HTTP 504 in TB's REST API v2).

Persistent RPCs (``"persistent": true``) are the same, except that the caller
gets an id at once and reads the outcome later, and that a server restart keeps
the ones still QUEUED (TB reloads them from the database with new request ids).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tools.tb_standin.model import dumps

if TYPE_CHECKING:
    from tools.tb_standin.transport import TbSession

RPC_REQUEST_BASE = "v1/devices/me/rpc/request/"


class RpcTimeout(Exception):
    """No reply before expiry. ``status`` is NO_ACTIVE_CONNECTION if never delivered, else TIMEOUT."""

    def __init__(self, device: str, rpc_id: int, status: str) -> None:
        super().__init__(f"RPC {rpc_id} to {device!r} timed out ({status}); REST v2 would answer 504")
        self.device = device
        self.rpc_id = rpc_id
        self.status = status
        self.http_status = 504


@dataclass
class PendingRpc:
    """One lightweight RPC in the device actor's pending map."""

    device: str
    rpc_id: int
    method: str
    params: Any
    oneway: bool
    expires_at: float  # loop time
    done: asyncio.Future[Any]
    persistent: bool = False
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "QUEUED"
    response: Any = None
    history: list[str] = field(default_factory=list)

    def set_status(self, status: str) -> None:
        self.status = status
        self.history.append(status)


class RpcManager:
    """Pending RPCs per device, their delivery and their outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delivery_timeout: float = 10.0) -> None:
        self._loop = loop
        self.delivery_timeout = delivery_timeout
        self.seq: dict[str, int] = {}
        self.pending: dict[str, dict[int, PendingRpc]] = {}
        self.finished: list[PendingRpc] = []  # every RPC that ended, for tests and the control API
        self.persistent: dict[str, PendingRpc] = {}  # uuid -> persistent RPC (TB's rpc table)

    def reset(self) -> None:
        """Server restart: lightweight RPCs and the counters are lost (§3.1); queued persistent ones stay."""
        kept = [rpc for by_id in self.pending.values() for rpc in by_id.values()
                if rpc.persistent and rpc.status == "QUEUED"]
        self.seq.clear()
        self.pending.clear()
        for rpc in kept:  # reloaded from the database: new request ids from the fresh counter
            rpc.rpc_id = self._next_id(rpc.device)
            self.pending.setdefault(rpc.device, {})[rpc.rpc_id] = rpc

    def _next_id(self, device: str) -> int:
        rpc_id = self.seq.get(device, 0)
        self.seq[device] = rpc_id + 1
        return rpc_id

    def submit(self, device: str, session: TbSession | None, method: str, params: Any, timeout: float,
               oneway: bool, persistent: bool = False) -> PendingRpc:
        """Register an RPC and write it at once if the device has an RPC subscription."""
        rpc_id = self._next_id(device)
        rpc = PendingRpc(device, rpc_id, method, params, oneway, self._loop.time() + timeout,
                         self._loop.create_future(), persistent)
        rpc.set_status("QUEUED")
        self.pending.setdefault(device, {})[rpc_id] = rpc
        if session is not None and _rpc_subscribed(session):
            self._loop.create_task(self._deliver(session, rpc))
        if persistent:
            self.persistent[rpc.uuid] = rpc
            self._loop.create_task(self._settle_persistent(rpc))
        return rpc

    async def call(self, device: str, session: TbSession | None, method: str, params: Any,
                   timeout: float, oneway: bool) -> Any:
        """Send an RPC and wait for its outcome: the reply (two-way) or the write (one-way)."""
        return await self.outcome(self.submit(device, session, method, params, timeout, oneway))

    async def outcome(self, rpc: PendingRpc) -> Any:
        """Wait until the RPC is answered (its reply) or expires (:class:`RpcTimeout`)."""
        try:
            return await asyncio.wait_for(asyncio.shield(rpc.done), max(0.0, rpc.expires_at - self._loop.time()))
        except asyncio.TimeoutError:
            if rpc.persistent and rpc.status == "QUEUED":
                status = "EXPIRED"
            else:
                status = "NO_ACTIVE_CONNECTION" if rpc.status == "QUEUED" else "TIMEOUT"
            rpc.set_status(status)
            raise RpcTimeout(rpc.device, rpc.rpc_id, status) from None
        finally:
            current = self.pending.get(rpc.device, {})
            if current.get(rpc.rpc_id) is rpc:
                del current[rpc.rpc_id]
            self.finished.append(rpc)

    async def _settle_persistent(self, rpc: PendingRpc) -> None:
        try:
            rpc.response = await self.outcome(rpc)
        except RpcTimeout:
            pass

    def on_subscribed(self, session: TbSession) -> None:
        """RPC SUBSCRIBE: write every pending, unexpired, undelivered request (BURST)."""
        assert session.device is not None
        now = self._loop.time()
        for rpc in list(self.pending.get(session.device.name, {}).values()):
            if rpc.expires_at > now and rpc.status in ("QUEUED", "TIMEOUT"):
                self._loop.create_task(self._deliver(session, rpc))

    def on_reply(self, device: str, rpc_id: int, payload: bytes) -> None:
        """The device's reply; one to an unknown or expired id is ignored ("stale")."""
        rpc = self.pending.get(device, {}).get(rpc_id)
        if rpc is None or rpc.done.done():
            return
        try:
            reply: Any = json.loads(payload)
        except ValueError:
            reply = payload.decode("utf-8", "replace")  # REST would answer 406; we hand back the text
        rpc.set_status("SUCCESSFUL")
        rpc.response = reply
        rpc.done.set_result(reply)

    async def _deliver(self, session: TbSession, rpc: PendingRpc) -> None:
        body = dumps({"method": rpc.method, "params": rpc.params})
        rpc.set_status("SENT")
        try:
            base = session.rpc_request_base or RPC_REQUEST_BASE
            waiter = await session.push(f"{base}{rpc.rpc_id}", body)  # the family subscribed (TopicType.java:23-26)
        except Exception:
            rpc.set_status("TIMEOUT")  # the connection broke while writing
            return
        if rpc.oneway and not rpc.persistent and not rpc.done.done():
            rpc.done.set_result(None)  # REST one-way returns once written
        if waiter is None:
            rpc.set_status("DELIVERED")
            if rpc.oneway and not rpc.done.done():
                rpc.done.set_result(None)
            return
        wait = max(0.0, min(self.delivery_timeout, rpc.expires_at - self._loop.time()))
        try:
            await asyncio.wait_for(waiter, wait)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            if rpc.status == "SENT":
                rpc.set_status("TIMEOUT")  # stays pending: re-sent on the next RPC subscription
            return
        if rpc.status == "SENT":
            rpc.set_status("DELIVERED")
            if rpc.oneway and rpc.persistent and not rpc.done.done():
                rpc.done.set_result(None)  # DELIVERED is the end point of a persistent one-way RPC


def _rpc_subscribed(session: TbSession) -> bool:
    return session.rpc_request_base is not None
