"""The command line: ``serve`` in the foreground with SIGTERM stop, ``ctl`` over the control channel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.standin.helpers import Device

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``python -m tools.tb_standin serve`` with a state file and a unix control socket."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"devices": [{"name": "dev1", "token": "token1"}],
                                 "shared": {"dev1": {"interval": 5}}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.tb_standin", "serve", "--port", "0", "--tls-port", "0", "--state", str(state),
         "--device", "dev2:token2", "--profile", "k:s:CHECK_PRE_PROVISIONED_DEVICES",
         "--limits", "messages=100:1", "--control-socket", str(tmp_path / "ctl.sock")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    ready["proc"] = proc
    yield ready
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def ctl(served: dict[str, Any], op: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([sys.executable, "-m", "tools.tb_standin", "ctl", "--control-socket",
                             served["control_socket"], op, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


def test_serve_reports_ports_and_loads_initial_state(served: dict[str, Any]) -> None:
    assert served["event"] == "ready" and served["port"] > 0 and served["tls_port"] > 0
    assert ctl(served, "devices") == (0, {"ok": True, "result": {"dev1": "token1", "dev2": "token2"}})
    assert ctl(served, "shared", "device=dev1")[1]["result"] == {"interval": 5}
    assert ctl(served, "session_limits")[1]["result"]["rateLimits"]["messages"] == "100:1"


def test_ctl_drives_a_device_session(served: dict[str, Any], devices: Callable[..., Device], tmp_path: Path) -> None:
    device = devices(served["port"], "token1")
    device.connect()
    device.subscribe("v1/devices/me/attributes", "v1/devices/me/rpc/request/+")
    device.publish_acked("v1/devices/me/telemetry", [{"ts": 1, "values": {"a": 1}}, {"ts": 2, "values": {"a": 2}}])
    assert ctl(served, "telemetry_count", "device=dev1")[1]["result"] == 2
    assert ctl(served, "telemetry", "device=dev1", "key=a")[1]["result"] == [[1, 1], [2, 2]]

    assert ctl(served, "set_shared", "device=dev1", 'values={"mode": "eco"}')[0] == 0
    assert device.expect_json("v1/devices/me/attributes") == {"mode": "eco"}

    device.on_message = lambda m: m.topic.startswith("v1/devices/me/rpc/request/") and device.client.publish(
        "v1/devices/me/rpc/response/" + m.topic.rsplit("/", 1)[1], '{"done":true}', qos=1)
    assert ctl(served, "rpc", "device=dev1", "method=go", 'params={"x":1}', "timeout=5")[1]["result"] == {"done": True}

    package = tmp_path / "pkg.bin"
    package.write_bytes(b"0123456789")
    assert ctl(served, "assign_ota", "device=dev1", "kind=sw", "title=app", "version=2",
               f"data_file={package}")[0] == 0
    device.publish("v2/sw/request/1/chunk/0", "0")
    assert device.expect("v2/sw/response/1/chunk/0").payload == b"0123456789"

    assert ctl(served, "disconnect", "device=dev1")[1]["result"] is True
    device.wait_closed()
    assert ctl(served, "disconnect_reasons", "device=dev1")[1]["result"] == ["admin_disconnect"]


def test_ctl_reports_errors_with_exit_status_1(served: dict[str, Any]) -> None:
    code, reply = ctl(served, "rpc", "device=dev2", "method=x", "timeout=0.2")
    assert code == 1 and reply["status"] == "NO_ACTIVE_CONNECTION" and reply["http_status"] == 504
    code, reply = ctl(served, "shared", "device=nobody")
    assert code == 1 and "KeyError" in reply["error"]


def test_sigterm_stops_cleanly(served: dict[str, Any], devices: Callable[..., Device]) -> None:
    device = devices(served["port"], "token1")
    device.connect()
    proc: subprocess.Popen[str] = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert proc.stdout is not None and json.loads(proc.stdout.readline()) == {"event": "stopped"}
    device.wait_closed()
    assert not Path(served["control_socket"]).exists()
