"""The control channel of a running stand-in: JSON lines over loopback TCP or a unix socket.

Request, one line: ``{"op": "add_device", "args": {"name": "dev1"}}``.
Reply, one line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "...", ...}``.
Every op is a :class:`~tools.tb_standin.api.StandIn` method of the same name (see ``OPS``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from tools.tb_standin.api import StandIn
from tools.tb_standin.rpc import RpcTimeout

OPS = frozenset({
    "add_device", "add_provision_profile", "delete_device", "set_token", "devices", "device_info",
    "set_shared", "delete_shared", "shared", "client_attributes",
    "telemetry", "latest", "telemetry_count", "data_points",
    "rpc", "rpc_persistent", "rpc_status", "rpc_history", "client_rpcs",
    "assign_ota", "unassign_ota",
    "set_limits", "set_session_limits", "session_limits",
    "drop_pubacks", "refuse_pubacks", "set_receive_maximum", "peak_unacked", "delay_pubacks", "restart", "down", "up", "disconnect", "is_connected", "subscriptions",
    "events", "disconnect_reasons", "ports",
})


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def execute(standin: StandIn, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one control request against ``standin`` and build the reply."""
    if op not in OPS:
        return {"ok": False, "error": f"unknown op {op!r}; known: {sorted(OPS)}"}
    args = dict(args)
    try:
        if op == "ports":
            ports = {"port": standin.port, "tls_port": standin.tls_port, "cafile": standin.cafile}
            return {"ok": True, "result": ports}
        if op == "assign_ota":
            if "data_file" in args:
                args["data"] = Path(args.pop("data_file")).read_bytes()
            elif "data_b64" in args:
                args["data"] = base64.b64decode(args.pop("data_b64"))
            elif isinstance(args.get("data"), str):
                args["data"] = args["data"].encode()
        result = getattr(standin, op)(**args)
        return {"ok": True, "result": _jsonable(result)}
    except RpcTimeout as timeout:
        return {"ok": False, "error": str(timeout), "status": timeout.status, "http_status": timeout.http_status}
    except Exception as error:  # reported to the caller, the server keeps running
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                reply = execute(self.server.standin, request["op"], request.get("args") or {})  # type: ignore[attr-defined]
            except (ValueError, KeyError, TypeError) as error:
                reply = {"ok": False, "error": f"bad request: {error}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    standin: StandIn


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    standin: StandIn


class ControlServer:
    """Serves the control channel in a background thread."""

    def __init__(self, standin: StandIn, port: int | None = None, socket_path: str | None = None,
                 host: str = "127.0.0.1") -> None:
        if socket_path is not None:
            if os.path.exists(socket_path):
                os.unlink(socket_path)
            self._server: _TcpServer | _UnixServer = _UnixServer(socket_path, _Handler)
        else:
            self._server = _TcpServer((host, port or 0), _Handler)
        self._server.standin = standin
        self.socket_path = socket_path
        self.port = None if socket_path else self._server.server_address[1]  # type: ignore[index]
        self._thread = threading.Thread(target=self._server.serve_forever, name="tb-standin-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        if self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


def request(op: str, args: dict[str, Any] | None = None, port: int | None = None, socket_path: str | None = None,
            host: str = "127.0.0.1", timeout: float = 120.0) -> dict[str, Any]:
    """Client side: send one request to a running stand-in and return its reply."""
    if socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(socket_path)
    else:
        sock = socket.create_connection((host, port or 0), timeout=timeout)
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        stream.flush()
        reply: dict[str, Any] = json.loads(stream.readline())
        return reply
