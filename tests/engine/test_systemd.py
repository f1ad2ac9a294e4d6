"""The notify protocol over a real NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from statemachine import State

from teg_fsm.adapters.systemd import Notifier
from teg_fsm.app import Gateway
from teg_fsm.config import load_config
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.machine import GatewayMachine
from tests.rig.threads import voluntary_switches
from tests.rig.waiting import wait_for


class Unblock:
    """Shared between the test and its machine instance (tests only)."""

    gate = threading.Event()
    entered = threading.Event()


class StuckMachine(GatewayMachine):
    machine_name = "stuck"
    resume_table = {"ok": "ok", "wedged": "wedged"}
    ok = State(initial=True)
    wedged = State()
    wedge = ok.to(wedged)
    recover = wedged.to(ok)

    def on_wedge(self) -> None:
        Unblock.entered.set()
        Unblock.gate.wait(10)  # a machine bug that blocks the dispatcher thread


class StuckComponent:
    name = "stuck"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def machine_specs(self) -> list[MachineSpec]:
        return [MachineSpec(StuckMachine)]

    def install(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    yield sock, path
    sock.close()


def _drain(sock: socket.socket, seconds: float) -> list[str]:
    messages, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            messages.extend(sock.recv(4096).decode().splitlines())
        except socket.timeout:
            pass
    return messages


def test_ready_watchdog_status_and_stopping_and_a_wedged_dispatcher_stops_pings(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    Unblock.gate.clear()
    Unblock.entered.clear()
    config = load_config({"TB_HOST": "127.0.0.1", "TB_PORT": "1", "TEG_DATA_PATH": str(tmp_path / "data")})
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    gateway = Gateway(config, components=lambda gw: [StuckComponent(gw)], notifier=notifier)
    gateway.start()
    try:
        first = _drain(sock, 0.6)
        assert first[0] == "READY=1" and first[1] == "STATUS=health=normal stuck=ok"
        assert first.count("WATCHDOG=1") >= 3  # every 50 ms while idle
        gateway.dispatcher.post("test", "wedge")
        assert Unblock.entered.wait(5)
        _drain(sock, 0.1)  # pings sent before the dispatcher blocked may still be queued
        wedged = _drain(sock, 0.5)
        assert "WATCHDOG=1" not in wedged, "a blocked dispatcher must stop the pings"
        Unblock.gate.set()
        recovered = _drain(sock, 0.5)
        assert "WATCHDOG=1" in recovered and "STATUS=health=normal stuck=wedged" in recovered
    finally:
        Unblock.gate.set()
        gateway.stop()
    assert "STOPPING=1" in _drain(sock, 0.2)


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.send("READY=1") is False


def test_without_a_watchdog_an_idle_dispatcher_sleeps_until_an_event_and_the_status_still_follows(
    tmp_path: Path,
) -> None:
    # WATCHDOG_USEC without NOTIFY_SOCKET: nobody expects pings, the interval only spaces the
    # status updates (50 ms here). The old loop woke at that interval whatever happened.
    Unblock.gate.set()
    config = load_config({"TB_HOST": "127.0.0.1", "TB_PORT": "1", "TEG_DATA_PATH": str(tmp_path / "data")})
    gateway = Gateway(config, components=lambda gw: [StuckComponent(gw)], notifier=Notifier({"WATCHDOG_USEC": "200000"}))
    status_path = tmp_path / "data" / "teg_status.json"
    gateway.start()
    try:
        thread = gateway.dispatcher.thread
        assert thread is not None
        wait_for(lambda: '"stuck": "ok"' in status_path.read_text(), 5, "the status file")
        time.sleep(0.3)  # the last status update and the journal's commit are behind it
        before = voluntary_switches(thread)
        time.sleep(1.0)
        assert voluntary_switches(thread) - before == 0, "an idle dispatcher must not wake on a tick"
        # A state change followed by silence still reaches the status file (one interval later).
        gateway.dispatcher.post("test", "wedge")
        wait_for(lambda: '"stuck": "wedged"' in status_path.read_text(), 5, "the state change in the status file")
    finally:
        gateway.stop()
