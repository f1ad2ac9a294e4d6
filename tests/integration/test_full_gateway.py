"""The whole gateway, every real machine and adapter, against the stand-in.

One scenario, as an operator would drive it: self-provisioning, OTA of a
controller built from a real git repository on the real Docker engine,
telemetry from the controller's SQLite queue, RPCs, a pushed file, an update,
a tag that does not exist, and a release whose controller crashes at start
(automatic rollback). The gateway runs as ``teg run`` in a subprocess; its
journal is replayed at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from teg_fsm.engine.replay import replay_journal
from tests.rig.docker_engine import remove_controller, remove_controller_images
from tests.rig.waiting import wait_for
from tests.rig.protocol import protocol_env
from tools.demo import DEVICE, PROFILE_KEY, PROFILE_SECRET, gateway_env, make_controller_repo
from tools.tb_standin import StandIn

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture
def releases() -> dict[str, str]:
    """Versions unique to this run, so a shared engine's images never collide."""
    run = uuid.uuid4().hex[:6]
    return {"good": f"v1.0.0-{run}", "crash": f"v2.0.0-{run}", "better": f"v3.0.0-{run}"}


@pytest.fixture
def controller_engine(
    docker_client: docker.DockerClient, base_image: str, releases: dict[str, str]
) -> Iterator[docker.DockerClient]:
    remove_controller(docker_client)
    yield docker_client
    remove_controller(docker_client)
    remove_controller_images(docker_client, list(releases.values()))


def test_provision_update_telemetry_rpc_file_and_rollback_end_to_end(
    tmp_path: Path, controller_engine: docker.DockerClient, releases: dict[str, str],
    docker_test_labels: dict[str, str],
) -> None:
    labels = " ".join(f"{k}={v}" for k, v in docker_test_labels.items())
    repo_dir = make_controller_repo(
        tmp_path,
        releases=((releases["good"], "healthy"), (releases["crash"], "crash"), (releases["better"], "healthy")),
        dockerfile_extra=f"LABEL {labels}\n",
    )
    with StandIn(tls_port=0) as tb:
        tb.add_provision_profile(PROFILE_KEY, PROFILE_SECRET)
        env = gateway_env(tmp_path, tb, repo_dir)
        env["DOCKER_HOST"] = os.environ.get("DOCKER_HOST", "")
        env.update(protocol_env())
        with open(tmp_path / "gateway.log", "w") as log:
            gateway = subprocess.Popen([sys.executable, "-m", "teg_fsm.cli", "run"], cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
            try:
                _scenario(tmp_path, tb, controller_engine, releases)
            except BaseException:
                # Shown by pytest with the failure: what the gateway was doing.
                print((tmp_path / "gateway.log").read_text()[-6000:])
                raise
            finally:
                gateway.send_signal(signal.SIGTERM)
                assert gateway.wait(25) == 0
    journal = tmp_path / "data" / "teg_journal.db"
    assert replay_journal(journal).identical


def _latest(tb: StandIn, key: str) -> Any:
    return tb.latest(DEVICE).get(key)


def _controller(client: docker.DockerClient) -> dict[str, Any]:
    """The controller container's attributes; empty while a restart or swap has it removed."""
    try:
        return client.containers.get("teg_controller").attrs
    except docker.errors.NotFound:
        return {}


def _running_image(client: docker.DockerClient) -> str:
    attrs = _controller(client)
    return attrs["Config"]["Image"] if attrs and attrs["State"]["Running"] else ""


def _started(client: docker.DockerClient) -> tuple[str, str]:
    attrs = _controller(client)
    return (attrs["Id"], attrs["State"]["StartedAt"]) if attrs else ("", "")


def _assign(tb: StandIn, version: str, state: str, timeout: float = 180) -> None:
    tb.assign_ota(DEVICE, kind="sw", title="co2-controller", version=version)
    wait_for(lambda: _latest(tb, "sw_state") == state
             and (state == "FAILED" or _latest(tb, "current_sw_version") == version), timeout, f"{state} for {version}", 0.2)


def _scenario(work: Path, tb: StandIn, client: docker.DockerClient, releases: dict[str, str]) -> None:
    good, crash, better = releases["good"], releases["crash"], releases["better"]
    wait_for(lambda: tb.is_connected(DEVICE), 30, "self-provisioning", 0.2)
    assert (work / "tb_access_token").stat().st_mode & 0o777 == 0o600

    _assign(tb, good, "UPDATED")
    assert _running_image(client) == f"teg-controller-{good}:latest"
    assert (work / "data" / "last_launched_controller_version.txt").read_text().strip() == good
    wait_for(lambda: _latest(tb, "controller_version") == good, 60, "controller telemetry", 0.2)

    assert tb.rpc(DEVICE, "ping", {}, timeout=10) == {"message": "Pong"}
    started = _started(client)
    assert started[0]
    assert tb.rpc(DEVICE, "restart_controller", {}, timeout=10) == {"message": "OK - Restarting Controller"}
    wait_for(lambda: _started(client) not in (started, ("", "")) and _running_image(client),
             60, "the controller restarted", 0.2)

    tb.set_shared(DEVICE, {"FILES": {"config": {"path": "$DATA_PATH/config.json", "encoding": "json"}},
                           "FILE_CONTENT_config": {"measurement_interval_s": 1}})
    wait_for(lambda: (work / "data" / "config.json").exists(), 30, "the pushed file", 0.2)
    hashes = wait_for(lambda: tb.client_attributes(DEVICE).get("FILE_HASHES"), 30, "FILE_HASHES", 0.2)
    assert set(hashes) == {"config"}

    _assign(tb, "v9.9.9-no-such-tag", "FAILED")
    assert "v9.9.9-no-such-tag" in _latest(tb, "sw_error")
    assert _running_image(client) == f"teg-controller-{good}:latest"

    _assign(tb, better, "UPDATED")
    assert _running_image(client) == f"teg-controller-{better}:latest"

    _assign(tb, crash, "FAILED")
    assert _latest(tb, "sw_error").startswith(f"rolled back to {better}: ")
    wait_for(lambda: _running_image(client) == f"teg-controller-{better}:latest", 60, "the last good controller back", 0.2)
    assert _latest(tb, "current_sw_version") == better
    states = [value for _, value in tb.telemetry(DEVICE, "sw_state")]
    assert states.count("UPDATED") == 2 and states[-1] == "FAILED"
