"""The engine watcher while dockerd's socket is absent: asleep until it appears, then at once."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from teg_fsm.adapters.docker_engine import EngineWatcher
from tests.rig.threads import voluntary_switches
from tests.rig.waiting import wait_for


def test_without_a_socket_it_sleeps_until_the_socket_appears_and_then_tries_at_once(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    posted: list[tuple[str, dict[str, Any]]] = []
    # retry_s 0.05: the old watcher retried at 0.05, 0.1, 0.2, 0.4, 0.8 s ... (a wake-up each).
    watcher = EngineWatcher(f"unix://{path}", lambda name, data: posted.append((name, data)), retry_s=0.05)
    watcher.start()
    engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wait_for(lambda: posted, 5, "docker_engine_lost posted")
        assert posted[0][0] == "docker_engine_lost" and "no Docker engine socket" in posted[0][1]["error"]
        thread = watcher._thread
        assert thread is not None
        time.sleep(0.2)
        before = voluntary_switches(thread)
        time.sleep(1.5)
        assert voluntary_switches(thread) - before == 0, "no polling while the socket is absent"
        # dockerd starts: its socket appears, and the watcher connects to it right away.
        engine.bind(str(path))
        engine.listen(4)
        engine.settimeout(3.0)
        connection, _ = engine.accept()
        connection.close()  # not an engine that answers: the watcher goes back to retrying
        assert [name for name, _ in posted] == ["docker_engine_lost"]
    finally:
        started = time.monotonic()
        watcher.stop()
        engine.close()
    assert not thread.is_alive() and time.monotonic() - started < 5.0


def test_stop_ends_the_wait_for_the_socket_at_once(tmp_path: Path) -> None:
    watcher = EngineWatcher(f"unix://{tmp_path / 'docker.sock'}", lambda name, data: None, retry_s=0.05)
    watcher.start()
    time.sleep(0.3)  # waiting for the socket by now
    started = time.monotonic()
    watcher.stop()
    assert watcher._thread is not None and not watcher._thread.is_alive()
    assert time.monotonic() - started < 1.0
