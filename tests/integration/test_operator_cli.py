"""Operator commands against real processes and a real Docker engine: `teg status`, `teg migrate --check`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from tests.rig.protocol import protocol_env
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEVICE = "status-station"
RUNNER = "thingsboard-edge-gateway-runner"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "TEG_", "THINGSBOARD_"))}
    return {**env, **extra}


def _teg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)


def test_status_tells_a_running_gateway_from_a_stopped_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with StandIn(host="127.0.0.1", port=0) as tb:
        tb.add_provision_profile("k", "s")
        env = _clean_env(TB_HOST="127.0.0.1", TB_PORT=str(tb.port), TEG_TLS="false", TEG_DATA_PATH=str(data),
                         THINGSBOARD_ACCESS_TOKEN=str(tmp_path / "token"), THINGSBOARD_DEVICE_NAME=DEVICE,
                         THINGSBOARD_PROVISION_DEVICE_KEY="k", THINGSBOARD_PROVISION_DEVICE_SECRET="s",
                         TEG_CONTROLLER_EXTRA_MOUNTS="", TEG_CONTROLLER_PRIVILEGED="false", **protocol_env())
        with open(tmp_path / "gateway.log", "w") as log:
            gateway = subprocess.Popen([sys.executable, "-m", "teg_fsm.cli", "run"], cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: tb.is_connected(DEVICE), 30, "the gateway connected")
            status = wait_for(lambda: (s := _teg("status", "--data", str(data), env=_clean_env()).stdout)
                              and "last message never" not in s and s, 20, "a ThingsBoard message in the journal")
            assert f"gateway:       running, pid {gateway.pid}, started " in status
            assert "queue:         0 messages, 0 pending_mqtt_messages" in status
            assert "connection     online" in status
            second = _teg("run", env=env)
            assert second.returncode == 78 and f"another gateway uses {data}" in second.stderr
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(30) == 0
    stopped = _teg("status", "--data", str(data), env=_clean_env())
    assert stopped.returncode == 0 and "gateway:       not running" in stopped.stdout


def test_migrate_check_names_what_to_stop_and_what_is_kept_and_changes_nothing(
    tmp_path: Path, docker_client: docker.DockerClient, base_image: str, docker_test_labels: dict[str, str]
) -> None:
    old_data = tmp_path / "teg-data"
    old_data.mkdir()
    sqlite3.connect(old_data / "gateway_archive.db").close()
    (old_data / "last_launched_controller_version.txt").write_text("v1.0.0")
    token = tmp_path / "tb_access_token"
    token.write_text("device-token")
    runner = docker_client.containers.run(
        base_image, ["sleep", "infinity"], detach=True, name=RUNNER, network_mode="host", labels=docker_test_labels,
        restart_policy={"Name": "unless-stopped"},
        environment={"TB_HOST": "tb.example", "TB_PORT": "8883", "TEG_DATA_PATH": str(old_data),
                     "THINGSBOARD_ACCESS_TOKEN": str(token), "THINGSBOARD_PROVISION_DEVICE_SECRET": "old-secret"},
    )
    ours = tmp_path / "teg.env"
    ours.write_text(f"TB_HOST=tb.example\nTB_PORT=8883\nTEG_DATA_PATH={old_data}\n"
                    f"THINGSBOARD_ACCESS_TOKEN={token}\n")
    try:
        busy = _teg("migrate", "--check", "--env-file", str(ours), env=_clean_env())
        assert busy.returncode == 1, busy.stderr
        assert (f"docker update --restart=no {RUNNER} && docker stop {RUNNER}" in busy.stdout
                and f"! {RUNNER} is running: it drives teg_controller with the same token" in busy.stdout)
        assert f"data directory {old_data}: gateway_archive.db, last_launched_controller_version.txt" in busy.stdout
        assert f"token file {token}: present" in busy.stdout
        assert "run_command RPC is OFF in teg-fsm" in busy.stdout
        assert f"[Service] ReadWritePaths={old_data} {tmp_path}" in busy.stdout
        assert "THINGSBOARD_PROVISION_DEVICE_SECRET=*** in the existing gateway's settings" in busy.stdout
        assert "old-secret" not in busy.stdout
        runner.reload()
        assert runner.status == "running"  # a check changes nothing
        runner.update(restart_policy={"Name": "no"})
        runner.stop(timeout=1)
        ready = _teg("migrate", "--check", "--env-file", str(ours), env=_clean_env())
        assert ready.returncode == 0, ready.stdout
        assert f"existing gateway runner container '{RUNNER}' (exited, restart policy no): stopped" in ready.stdout
        assert "ready to switch" in ready.stdout
    finally:
        runner.remove(force=True)
