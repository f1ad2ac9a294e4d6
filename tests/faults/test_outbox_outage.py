"""What the gateway says while ThingsBoard is away arrives later, in order, with distinct timestamps.

The first test needs no Docker. The gateway starts with ThingsBoard down: its own reports made offline
(``docker_engine_reachable`` false, as the Docker engine is absent too, and its
WARN logs about failed connects) wait in the outbox and the log buffer. Once
connected, an OTA of a version that cannot be fetched starts (the controller
repository's remote holds the fetch open); ThingsBoard goes down, the fetch
fails, and its ``sw_state`` step is reported offline. The gateway is then
restarted while still offline, and ThingsBoard comes back.

What ThingsBoard stores (one value per key and ts, like ``ts_kv``) must be every
value the gateway published, in the order it published them: the journal's
``Publish`` effects are the record of what it said.

The second test runs a controller on the real Docker engine and does the same
for the health-check ages (``ms_since_controller_startup``,
``ms_since_last_controller_health_check``, every 20 s) across an outage and a
restart while offline.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import git
import pytest

from teg_fsm.engine.journal import read_journal
from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.demo import make_controller_repo
from tools.tb_standin import StandIn

TELEMETRY = "v1/devices/me/telemetry"
CONNECT_FAILED = "connecting to ThingsBoard failed"
ROWS = 40
SERVER_STATES = ("QUEUED", "INITIATED")  # sw_state values ThingsBoard writes on assignment


class HeldGitRemote:
    """A ``git://`` remote that accepts and answers nothing until released; then it hangs up on everyone."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"git://127.0.0.1:{self.server.getsockname()[1]}/controller.git"
        self.held: list[socket.socket] = []
        self.released = False
        self.lock = threading.Lock()  # a connection accepted during release() is closed, not held
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if not self.released:
                    self.held.append(conn)
                    continue
            conn.close()

    def release(self) -> None:
        with self.lock:
            self.released = True
            held, self.held = self.held, []
        for conn in held:
            conn.close()

    def close(self) -> None:
        self.release()
        self.server.close()
        self.thread.join(5)


def _controller_repo(root: Path, remote_url: str) -> Path:
    repo = git.Repo.init(root / "controller")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "TEG test")
        cfg.set_value("user", "email", "test@teg.invalid")
    (root / "controller" / "docker").mkdir()
    (root / "controller" / "docker" / "Dockerfile").write_text("FROM scratch\n")
    repo.index.add(["docker/Dockerfile"])
    repo.index.commit("controller")
    repo.create_remote("origin", remote_url)
    return root / "controller" / ".git"


def _start(env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    return uplink_rig.start_gateway(env, root / "gateway.log")


def _outbox_payloads(data: Path) -> list[str]:
    path = data / "gateway_logs_buffer.db"
    if not path.exists():  # not created yet
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [p for (p,) in conn.execute("SELECT payload FROM outbox ORDER BY id")]
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        conn.close()


def _stored_offline(data: Path, key: str, value: Any) -> bool:
    return any(json.loads(p).get("values", {}).get(key) == value for p in _outbox_payloads(data))


def _published(data: Path, key: str) -> list[Any]:
    """Values of ``key`` in the telemetry the machines published, in order (from the journal)."""
    values = []
    for entry in read_journal(data / "teg_journal.db"):
        for effect in entry.effects:
            if effect.get("type") == "Publish" and effect.get("topic") == TELEMETRY:
                for element in _elements(json.loads(effect["payload"])):
                    if key in element:
                        values.append(element[key])
    return values


def _elements(payload: Any) -> list[dict[str, Any]]:
    items = payload if isinstance(payload, list) else [payload]
    return [i["values"] if "ts" in i and "values" in i else i for i in items]


def _stored(tb: StandIn, device: str, key: str) -> list[tuple[int, Any]]:
    """What ThingsBoard keeps of ``key``, by ts; without the OTA states the server itself writes."""
    return sorted(((ts, v) for ts, v in tb.telemetry(device, key) if v not in SERVER_STATES), key=lambda r: r[0])


def _failed_connects_before_connecting(log_text: str) -> int:
    """Connect failures each run logged before its first session: all made while offline."""
    runs = log_text.split("signal SIGTERM")
    return sum(run.split(" connected to ")[0].count(CONNECT_FAILED) for run in runs)


def test_reports_made_offline_arrive_in_order_across_an_outage_and_a_restart(tb: StandIn, tmp_path: Path) -> None:
    remote = HeldGitRemote()
    device = f"outbox-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "data"
    env = uplink_rig.gateway_env(
        tb, data, tb.add_device(device), THINGSBOARD_DEVICE_NAME=device,
        DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",
        TEG_CONTROLLER_GIT_PATH=str(_controller_repo(tmp_path, remote.url)), TEG_OTA_MIN_FREE_DISK_MB="1")
    uplink_rig.fill(data / "communication_queue.db", ROWS)
    tb.down()
    proc = _start(env, tmp_path)
    gateway = rig.FaultedGateway(tb, device, proc, data, tmp_path / "gateway.log")
    try:
        # 1. offline from the start: the engine report and connect failures wait in the gateway
        wait_for(lambda: _stored_offline(data, "docker_engine_reachable", False), 20, "engine report stored offline")
        wait_for(lambda: gateway.log_text().count(CONNECT_FAILED) >= 3, 20, "connect failures logged")
        tb.up()
        rig.wait_until_rpc_ready(gateway, 30)
        wait_for(lambda: _stored(tb, device, "docker_engine_reachable"), 20, "the engine report delivered")

        # 2. an OTA whose fetch hangs, then ThingsBoard goes away and the fetch fails offline. Assigned
        # after the on-connect attribute answer: an answer requested before the push would unassign it.
        wait_for(lambda: any(e.name == "shared_attributes_received" for e in read_journal(data / "teg_journal.db")),
                 20, "the on-connect shared attributes answered")
        tb.assign_ota(device, kind="sw", title="controller", version="v9.9.9-no-such-tag")
        wait_for(lambda: "DOWNLOADING" in [v for _, v in _stored(tb, device, "sw_state")], 30, "DOWNLOADING")
        tb.down()
        went_down_ms = time.time_ns() // 1_000_000
        remote.release()
        wait_for(lambda: _stored_offline(data, "sw_state", "FAILED"), 30, "FAILED stored offline")

        # 3. a restart while offline
        uplink_rig.stop(proc)
        proc = gateway.proc = _start(env, tmp_path)
        wait_for(lambda: gateway.log_text().split("signal SIGTERM")[-1].count(CONNECT_FAILED) >= 3,
                 30, "the restarted gateway offline")
        tb.up()
        rig.wait_until_rpc_ready(gateway, 30)

        for key in ("docker_engine_reachable", "sw_state"):
            wait_for(lambda k=key: [v for _, v in _stored(tb, device, k)] == _published(data, k), 30,
                     f"every {key} value delivered in order")
        states = _stored(tb, device, "sw_state")
        assert [v for _, v in states[:2]] == ["DOWNLOADING", "FAILED"], states
        assert states[1][0] >= went_down_ms, "the FAILED step was made offline"
        wait_for(lambda: not _outbox_payloads(data), 20, "the outbox emptied")
        offline_failures = _failed_connects_before_connecting(gateway.log_text())
        assert offline_failures >= 6

        def failures() -> list[tuple[int, str]]:
            return [(ts, v) for ts, v in _stored(tb, device, "message") if CONNECT_FAILED in v]

        wait_for(lambda: len(failures()) >= offline_failures, 30, "the connect failures logged offline delivered")
        at = {ts for ts, _ in failures()}
        assert {v for ts, v in _stored(tb, device, "severity") if ts in at} == {"WARN"}
        rig.finish(gateway, expected_seqs=range(ROWS))
    except BaseException:
        print(gateway.log_text()[-6000:])
        for key in ("docker_engine_reachable", "sw_state"):
            print(key, "stored:", _stored(tb, device, key), "published:", _published(data, key))
        for entry in read_journal(data / "teg_journal.db", machine="ota"):
            print("ota journal:", entry.ts_ms, entry.name, str(entry.data)[:300], entry.transitions)
        raise
    finally:
        uplink_rig.stop(gateway.proc)
        remote.close()


# -- with a controller on the real Docker engine: the health-check ages ------------------------

HEALTH_KEYS = ("ms_since_controller_startup", "ms_since_last_controller_health_check")


@pytest.fixture
def release(controller_release: str) -> str:
    return controller_release


def _health_reports_stored_offline(data: Path) -> int:
    return sum(1 for p in _outbox_payloads(data) if HEALTH_KEYS[0] in json.loads(p).get("values", {}))


def test_health_check_ages_reported_offline_arrive_across_an_outage_and_a_restart(
        tb: StandIn, tmp_path: Path, release: str, docker_test_labels: dict[str, str]) -> None:
    labels = " ".join(f"{k}={v}" for k, v in docker_test_labels.items())
    repo_dir = make_controller_repo(tmp_path, releases=((release, "healthy"),), dockerfile_extra=f"LABEL {labels}\n")
    device = f"outbox-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "data"
    env = uplink_rig.gateway_env(
        tb, data, tb.add_device(device), THINGSBOARD_DEVICE_NAME=device, DOCKER_HOST=os.environ.get("DOCKER_HOST", ""),
        TEG_CONTROLLER_GIT_PATH=str(repo_dir / ".git"), TEG_CONTROLLER_PRIVILEGED="false",
        TEG_CONTROLLER_EXTRA_MOUNTS="", TEG_OTA_PROBATION_S="8", TEG_OTA_MIN_FREE_DISK_MB="64")
    uplink_rig.fill(data / "communication_queue.db", ROWS)
    gateway = rig.FaultedGateway(tb, device, _start(env, tmp_path), data, tmp_path / "gateway.log")
    try:
        rig.wait_until_rpc_ready(gateway, 30)
        wait_for(lambda: any(e.name == "shared_attributes_received" for e in read_journal(data / "teg_journal.db")),
                 20, "the on-connect shared attributes answered")
        tb.assign_ota(device, kind="sw", title="controller", version=release)
        wait_for(lambda: "UPDATED" in [v for _, v in _stored(tb, device, "sw_state")], 240, "UPDATED", 0.2)
        wait_for(lambda: _stored(tb, device, HEALTH_KEYS[0]), 40, "a health report online", 0.2)

        tb.down()
        went_down_ms = time.time_ns() // 1_000_000
        # Health is reported every 20 s (ControllerSettings.telemetry_interval_s): two reports need
        # 40 s plus a Docker inspection each, which took up to 55 s on a loaded 2-core CI box.
        wait_for(lambda: _health_reports_stored_offline(data) >= 2, 100, "health reports stored offline", 0.2)
        uplink_rig.stop(gateway.proc)
        gateway.proc = _start(env, tmp_path)
        wait_for(lambda: _health_reports_stored_offline(data) >= 3, 100, "a health report after the restart", 0.2)
        tb.up()
        rig.wait_until_rpc_ready(gateway, 30)

        for key in HEALTH_KEYS:
            wait_for(lambda k=key: [v for _, v in _stored(tb, device, k)] == _published(data, k), 30,
                     f"every {key} value delivered in order")
        offline = [ts for ts, _ in _stored(tb, device, HEALTH_KEYS[1]) if ts >= went_down_ms]
        assert len(offline) >= 3
        rig.finish(gateway, expected_seqs=range(ROWS))
    except BaseException:
        print(gateway.log_text()[-6000:])
        for key in HEALTH_KEYS:
            print(key, "stored:", _stored(tb, device, key), "published:", _published(data, key))
        raise
    finally:
        uplink_rig.stop(gateway.proc, timeout=25)
