"""Command line: ``python -m tools.tb_standin serve ...`` and ``python -m tools.tb_standin ctl OP key=value ...``.

``serve`` runs in the foreground, prints one JSON "ready" line with the bound
ports on stdout, and stops cleanly on SIGTERM or Ctrl-C.
``ctl`` sends one request to a running server's control channel and prints the
JSON reply; the exit status is 0 when the reply says ok.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tools.tb_standin.api import StandIn
from tools.tb_standin.control import OPS, ControlServer, request
from tools.tb_standin.model import ALLOW_CREATE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.tb_standin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the stand-in in the foreground")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=1883, help="plain MQTT port (0 = pick a free one)")
    serve.add_argument("--tls-port", type=int, help="also listen with TLS on this port")
    serve.add_argument("--cert", help="server certificate (PEM); generated with a CA when omitted")
    serve.add_argument("--key", help="server private key (PEM)")
    serve.add_argument("--ca", help="CA for optional client certificates")
    serve.add_argument("--control-port", type=int, help="control channel on loopback TCP (0 = free port)")
    serve.add_argument("--control-socket", help="control channel on this unix socket path")
    serve.add_argument("--state", help="JSON file with initial devices, profiles, shared attributes, limits")
    serve.add_argument("--device", action="append", default=[], metavar="NAME[:TOKEN]")
    serve.add_argument("--profile", action="append", default=[], metavar="KEY:SECRET[:STRATEGY]")
    serve.add_argument("--limits", action="append", default=[], metavar="KIND=SPEC",
                       help="messages=..., telemetry_messages=..., telemetry_data_points=... ('cap:sec,cap:sec')")
    serve.add_argument("--provision-close-after", type=float, default=60.0)
    serve.add_argument("--rpc-delivery-timeout", type=float, default=10.0)
    serve.add_argument("--client-rpc-timeout", type=float, default=60.0)
    serve.add_argument("--inactivity-timeout", type=float, default=600.0)

    ctl = sub.add_parser("ctl", help="talk to a running stand-in", description=f"ops: {', '.join(sorted(OPS))}")
    ctl.add_argument("--host", default="127.0.0.1")
    ctl.add_argument("--control-port", type=int)
    ctl.add_argument("--control-socket")
    ctl.add_argument("op", choices=sorted(OPS))
    ctl.add_argument("args", nargs="*", metavar="KEY=VALUE", help="VALUE is parsed as JSON when it can be")
    return parser


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _initial_state(args: argparse.Namespace) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(Path(args.state).read_text()) if args.state else {}
    for spec in args.device:
        name, _, token = spec.partition(":")
        state.setdefault("devices", []).append({"name": name, "token": token or None})
    for spec in args.profile:
        key, secret, *strategy = spec.split(":")
        state.setdefault("profiles", []).append(
            {"key": key, "secret": secret, "strategy": strategy[0] if strategy else ALLOW_CREATE})
    for spec in args.limits:
        kind, _, value = spec.partition("=")
        state.setdefault("limits", {})[kind] = value
    return state


def serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    standin = StandIn(args.host, args.port, args.tls_port, args.cert, args.key, args.ca,
                      provision_close_after=args.provision_close_after, rpc_delivery_timeout=args.rpc_delivery_timeout,
                      client_rpc_timeout=args.client_rpc_timeout, inactivity_timeout=args.inactivity_timeout)
    standin.start()
    control: ControlServer | None = None
    try:
        standin.load_state(_initial_state(args))
        if args.control_port is not None or args.control_socket:
            control = ControlServer(standin, args.control_port, args.control_socket).start()
        ready = {"event": "ready", "port": standin.port, "tls_port": standin.tls_port, "cafile": standin.cafile,
                 "control_port": control.port if control else None,
                 "control_socket": control.socket_path if control else None}
        print(json.dumps(ready), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        if control is not None:
            control.stop()
        standin.stop()
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0


def ctl(args: argparse.Namespace) -> int:
    if args.control_port is None and not args.control_socket:
        print("ctl needs --control-port or --control-socket", file=sys.stderr)
        return 2
    op_args = {}
    for item in args.args:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"argument {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        op_args[key] = _value(value)
    reply = request(args.op, op_args, args.control_port, args.control_socket, args.host)
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return serve(args) if args.command == "serve" else ctl(args)


if __name__ == "__main__":
    sys.exit(main())
