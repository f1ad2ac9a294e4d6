"""First start and truthful reports on the real Docker engine, with real git.

The gateway runs the real OTA and controller components (GitPython, docker-py,
the controller's SQLite health check) on the rig's private dockerd. Controller
images are built by the gateway itself from a controller repository whose
Dockerfile starts ``FROM`` the local base image (never pulled). Every
``sw_state`` report is recorded together with what the engine really ran at
that moment: UPDATED must always name a running container of that version's
image whose health check is newer than the container's start.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import docker
import docker.errors
import git
import pytest

from teg_fsm.adapters.docker_engine import parse_docker_time, read_health_ts
from teg_fsm.app import Gateway
from teg_fsm.components.controller import ControllerComponent
from teg_fsm.components.ota import OtaComponent
from teg_fsm.config import load_config
from teg_fsm.engine.dispatcher import Dispatched
from teg_fsm.engine.effects import Log
from teg_fsm.engine.effects.controller import image_name
from teg_fsm.engine.effects.mqtt import Publish, RequestAttributes
from teg_fsm.engine.events import Source
from teg_fsm.engine.runner import Completion
from tests.integration.ota_rig import HEALTHY
from tests.rig.waiting import wait_for

# no_mqtt: the gateway here has only its OTA and controller components: no MQTT (the MQTT 5 pass leaves it out).
pytestmark = [pytest.mark.integration, pytest.mark.no_mqtt]

FIRST_START = ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]
DOCKERFILE = 'FROM {base}\nCOPY controller.py /app/controller.py\nCMD ["python3", "-u", "/app/controller.py"]\n'


@attrs.define
class Report:
    payload: dict[str, Any]
    running_image: str | None  # the image of the running controller container when it was sent
    health_since_start: bool  # its health check was written after the container started


class FirstStartGateway:
    """A gateway with the real OTA and controller components, and what it reported."""

    def __init__(self, work: Path, client: docker.DockerClient, env: dict[str, str], labels: dict[str, str]) -> None:
        self.client = client
        self.container = f"teg_controller_fs_{uuid.uuid4().hex[:8]}"
        self.data = work / "data"
        self.controller_data = work / "controller-data"
        config = load_config({
            "TB_HOST": "127.0.0.1", "TB_PORT": "1883", "TEG_DATA_PATH": str(self.data),
            "TEG_CONTROLLER_DATA_PATH": str(self.controller_data), "TEG_CONTROLLER_PRIVILEGED": "false",
            "TEG_CONTROLLER_EXTRA_MOUNTS": "", "TEG_CONTROLLER_RESTART_POLICY": "no",
            "TEG_CONTROLLER_STOP_TIMEOUT_S": "5", "TEG_RESTART_BACKOFF_S": "2", "TEG_OTA_PROBATION_S": "3",
            "TEG_OTA_MIN_FREE_DISK_MB": "64", "DOCKER_HOST": os.environ.get("DOCKER_HOST", ""), **env,
        })
        ota_settings = {"image_labels": labels, "build_network_mode": "host", "health_timeout_s": 30.0,
                        "fetch_timeout_s": 60.0}
        controller_settings = {"telemetry_interval_s": 0.5, "first_check_s": 0.5, "engine_retry_s": 0.5}

        def components(gateway: Gateway) -> list[Any]:
            return [OtaComponent(gateway, ota_settings, client=client),
                    ControllerComponent(gateway, self.container, **controller_settings)]

        self.gateway = Gateway(config, components=components)
        self.reports: list[Report] = []
        self.dispatched: list[Dispatched] = []
        self._lock = threading.Lock()
        self.gateway.dispatcher.observers.append(self._observe)
        register = self.gateway.runner.register
        register(Publish, self._publish)
        register(Log, lambda effect, completion: completion.succeed(None))
        register(RequestAttributes, lambda effect, completion: completion.succeed({"client": {}, "shared": {}}))

    def _observe(self, done: Dispatched) -> None:
        with self._lock:
            self.dispatched.append(done)

    def _publish(self, effect: Publish, completion: Completion) -> None:
        payload = json.loads(effect.payload)
        if "sw_state" in payload:
            image, fresh = self._engine_truth()
            self.reports.append(Report(payload, image, fresh))
        completion.succeed(None)

    def _engine_truth(self) -> tuple[str | None, bool]:
        try:
            attrs_ = self.client.containers.get(self.container).attrs
        except docker.errors.NotFound:
            return None, False
        if not attrs_["State"]["Running"]:
            return None, False
        started = parse_docker_time(attrs_["State"]["StartedAt"]) or 0
        health = read_health_ts(self.controller_data / "communication_queue.db")
        return attrs_["Config"]["Image"], health is not None and health >= started

    # -- driving ----------------------------------------------------------------

    def start(self) -> None:
        self.gateway.start()

    def stop(self) -> None:
        self.gateway.stop()

    def post(self, name: str, data: dict[str, Any] | None = None, source: Source = Source.TEST) -> int:
        """Post an event; returns its sequence number."""
        return self.gateway.dispatcher.post(source, name, data or {}).seq

    def assign(self, version: str) -> int:
        values = {"sw_title": "controller", "sw_version": version}
        return self.post("shared_attributes_updated", {"values": values, "deleted": []}, Source.MQTT)

    def handled(self, seq: int) -> Dispatched:
        """The dispatch of event ``seq``, once the dispatcher has run it."""
        def find() -> Dispatched | None:
            with self._lock:
                return next((d for d in self.dispatched if d.event.seq == seq), None)

        return wait_for(find, 30, f"event #{seq} dispatched", 0.05)

    def states(self) -> list[str]:
        return [r.payload["sw_state"] for r in self.reports]

    def wait_state(self, state: str, since: int = 0, timeout: float = 180) -> Report:
        def found() -> Report | None:
            return next((r for r in self.reports[since:] if r.payload["sw_state"] == state), None)

        try:
            return wait_for(found, timeout, f"sw_state {state}", 0.1)
        except AssertionError as exc:
            moves = [(t.machine, t.target, t.event) for d in self.dispatched for t in d.transitions
                     if t.source != t.target]
            raise AssertionError(f"{exc}; reports {[r.payload for r in self.reports]}; moves {moves[-12:]}") from None

    def running_image(self) -> str | None:
        return self._engine_truth()[0]

    def false_updates(self) -> list[Report]:
        """UPDATED reports sent while that version's container did not run with a fresh health check."""
        return [r for r in self.reports if r.payload["sw_state"] == "UPDATED" and (
            r.running_image != image_name(r.payload["current_sw_version"]) or not r.health_since_start)]

    def ota(self) -> Any:
        return self.gateway.dispatcher.machines["ota"]

    def remove(self) -> None:
        try:
            self.client.containers.get(self.container).remove(force=True)
        except docker.errors.NotFound:
            pass


def make_repo(root: Path, base_image: str, versions: list[str], *, layout: str = "docker",
              remote: bool = True, copy_from: str = "") -> Path:
    """A controller repository with one tag per version; returns its ``.git`` path.

    ``layout`` is where the Dockerfile sits: ``docker`` (``docker/Dockerfile``, the
    existing gateway's default context) or ``root`` (the repository root);
    ``copy_from`` is the Dockerfile's COPY source folder, relative to the build context.
    """
    work = root / "controller"
    repo = git.Repo.init(work, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "TEG Test")
        cfg.set_value("user", "email", "teg-test@example.invalid")
        cfg.set_value("commit", "gpgsign", "false")
        cfg.set_value("tag", "gpgsign", "false")
    folder = work / "docker" if layout == "docker" else work
    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        dockerfile = DOCKERFILE.format(base=base_image)
        (folder / "Dockerfile").write_text(dockerfile.replace("COPY controller.py", f"COPY {copy_from}controller.py"))
        (folder / "controller.py").write_text(HEALTHY + f"# {version}\n")
        repo.index.add([str((folder / name).relative_to(work)) for name in ("Dockerfile", "controller.py")])
        repo.index.commit(f"controller {version}")
        repo.create_tag(version)
    if not remote:
        return work / ".git"
    origin = root / "controller-origin.git"
    git.Repo.init(origin, bare=True, initial_branch="main")
    repo.create_remote("origin", str(origin))
    repo.remotes.origin.push(refspec="main:main").raise_if_error()
    repo.remotes.origin.push(tags=True).raise_if_error()
    device = root / "device"
    git.Repo.clone_from(str(origin), device)
    shutil.rmtree(work)
    return device / ".git"


@pytest.fixture
def versions() -> dict[str, str]:
    # Unique per run: image names are global in the engine.
    suffix = uuid.uuid4().hex[:6]
    return {name: f"{name}-{suffix}" for name in ("v1", "v2", "v3")}


@pytest.fixture
def gateways(tmp_path: Path, docker_client: docker.DockerClient, docker_test_labels: dict[str, str],
             versions: dict[str, str]) -> Iterator[Callable[..., FirstStartGateway]]:
    made: list[FirstStartGateway] = []

    def make(env: dict[str, str]) -> FirstStartGateway:
        made.append(FirstStartGateway(tmp_path, docker_client, env, docker_test_labels))
        return made[-1]

    yield make
    for gateway in made:
        gateway.stop()
        gateway.remove()
    for version in versions.values():
        try:
            docker_client.images.remove(image_name(version), force=True)
        except docker.errors.APIError:
            pass


def _assert_first_start(gateway: FirstStartGateway, version: str) -> None:
    updated = gateway.wait_state("UPDATED")
    assert updated.running_image == image_name(version)
    assert gateway.states() == FIRST_START
    for report in gateway.reports:
        assert report.payload["current_sw_title"] == report.payload["current_sw_version"] == version
    assert (gateway.data / "last_launched_controller_version.txt").read_text().strip() == version
    assert not gateway.false_updates()


def test_first_start_on_an_empty_engine_builds_and_starts_the_default_version(
    tmp_path: Path, base_image: str, versions: dict[str, str], docker_client: docker.DockerClient,
    gateways: Callable[..., FirstStartGateway],
) -> None:
    v1 = versions["v1"]
    git_dir = make_repo(tmp_path, base_image, [v1])
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image_name(v1))
    gateway = gateways({"TEG_CONTROLLER_GIT_PATH": str(git_dir), "TEG_DEFAULT_CONTROLLER_VERSION": v1})
    gateway.start()
    _assert_first_start(gateway, v1)


def test_first_start_from_the_version_file_builds_that_version(
    tmp_path: Path, base_image: str, versions: dict[str, str], gateways: Callable[..., FirstStartGateway],
) -> None:
    v1, v2 = versions["v1"], versions["v2"]
    git_dir = make_repo(tmp_path, base_image, [v1, v2])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "last_launched_controller_version.txt").write_text(v2)  # no newline, as the old gateway writes
    gateway = gateways({"TEG_CONTROLLER_GIT_PATH": str(git_dir), "TEG_DEFAULT_CONTROLLER_VERSION": v1})
    gateway.start()
    _assert_first_start(gateway, v2)


def test_assigning_the_first_start_version_says_updated_only_once_it_runs_and_retry_works(
    tmp_path: Path, base_image: str, versions: dict[str, str], docker_client: docker.DockerClient,
    gateways: Callable[..., FirstStartGateway],
) -> None:
    """The false success seen beside the existing gateway, on the real engine."""
    v1 = versions["v1"]
    git_dir = make_repo(tmp_path, base_image, [v1])
    device = git.Repo(git_dir.parent)
    device.git.tag("-d", v1)  # the device has not fetched v1 yet ...
    origin_url = device.remotes.origin.url
    device.remotes.origin.set_url(str(tmp_path / "unreachable.git"))  # ... and cannot: the network is down
    # A long restart backoff: after the kill below, only OTA brings the controller back.
    gateway = gateways({"TEG_CONTROLLER_GIT_PATH": str(git_dir), "TEG_DEFAULT_CONTROLLER_VERSION": v1,
                        "TEG_RESTART_BACKOFF_S": "600"})
    gateway.start()
    failed = gateway.wait_state("FAILED")
    assert "fetching the controller repository" in failed.payload["sw_error"]
    assert gateway.running_image() is None

    mark = len(gateway.reports)
    gateway.handled(gateway.assign(v1))  # ThingsBoard assigns that same version: tried again, fails again
    gateway.wait_state("FAILED", since=mark)
    wait_for(lambda: gateway.ota().state_name == "failed", 30, "OTA at rest", 0.05)
    assert "UPDATED" not in gateway.states()
    assert gateway.running_image() is None

    device.remotes.origin.set_url(origin_url)  # the network is back
    mark = len(gateway.reports)
    retried = gateway.handled(gateway.post("ota_retry_requested", source=Source.RPC))
    assert [(t.source, t.target) for t in retried.transitions if t.machine == "ota"] == [("failed", "fetching")]
    updated = gateway.wait_state("UPDATED", since=mark)
    assert updated.running_image == image_name(v1)
    assert not gateway.false_updates()

    # The controller dies: nothing claims UPDATED, and a retry is accepted again.
    docker_client.containers.get(gateway.container).kill()
    wait_for(lambda: gateway.ota().data.live is None, 30, "OTA to see the exit", 0.05)
    mark = len(gateway.reports)
    retried = gateway.handled(gateway.post("ota_retry_requested", source=Source.RPC))
    assert [t.target for t in retried.transitions if t.machine == "ota"] == ["fetching"]
    gateway.wait_state("UPDATED", since=mark)
    assert gateway.running_image() == image_name(v1)
    assert not gateway.false_updates()


def test_a_controller_repository_without_a_remote_works_from_its_local_tags(
    tmp_path: Path, base_image: str, versions: dict[str, str], gateways: Callable[..., FirstStartGateway],
) -> None:
    v1, v2 = versions["v1"], versions["v2"]
    git_dir = make_repo(tmp_path, base_image, [v1, v2], remote=False)
    assert not git.Repo(git_dir.parent).remotes
    gateway = gateways({"TEG_CONTROLLER_GIT_PATH": str(git_dir), "TEG_DEFAULT_CONTROLLER_VERSION": v1})
    gateway.start()
    _assert_first_start(gateway, v1)
    mark = len(gateway.reports)
    gateway.assign(v2)
    updated = gateway.wait_state("UPDATED", since=mark)
    assert updated.running_image == image_name(v2)
    assert [r.payload["sw_state"] for r in gateway.reports[mark:]] == FIRST_START
    assert not gateway.false_updates()


@pytest.mark.parametrize("layout,env", [
    ("root", {"TEG_CONTROLLER_DOCKERCONTEXT_PATH": "{repo}"}),
    ("root", {"TEG_CONTROLLER_DOCKERCONTEXT_PATH": "{repo}", "TEG_CONTROLLER_DOCKERFILE_PATH": "Dockerfile"}),
    ("docker", {"TEG_CONTROLLER_DOCKERCONTEXT_PATH": "{repo}", "TEG_CONTROLLER_DOCKERFILE_PATH": "docker/Dockerfile"}),
    ("docker", {}),  # the default: context <repo>/docker, ./Dockerfile in it
], ids=["root-context", "root-context-plain-name", "repo-context-dockerfile-in-docker", "default-docker-context"])
def test_a_dockerfile_at_the_repository_root_or_in_docker_builds_with_the_context_settings(
    tmp_path: Path, base_image: str, versions: dict[str, str], gateways: Callable[..., FirstStartGateway],
    layout: str, env: dict[str, str],
) -> None:
    v1 = versions["v1"]
    # COPY paths are relative to the context: the repository root when the Dockerfile is in docker/.
    context_is_root = layout == "docker" and "TEG_CONTROLLER_DOCKERCONTEXT_PATH" in env
    git_dir = make_repo(tmp_path, base_image, [v1], layout=layout, copy_from="docker/" if context_is_root else "")
    repo = str(git_dir.parent)
    settings = {k: v.format(repo=repo) for k, v in env.items()}
    gateway = gateways({"TEG_CONTROLLER_GIT_PATH": str(git_dir), "TEG_DEFAULT_CONTROLLER_VERSION": v1, **settings})
    gateway.start()
    _assert_first_start(gateway, v1)


def test_an_image_removed_under_a_running_controller_is_rebuilt_when_it_must_start_again(
    tmp_path: Path, base_image: str, versions: dict[str, str], docker_client: docker.DockerClient,
    gateways: Callable[..., FirstStartGateway],
) -> None:
    v1 = versions["v1"]
    git_dir = make_repo(tmp_path, base_image, [v1])
    gateway = gateways({"TEG_CONTROLLER_GIT_PATH": str(git_dir), "TEG_DEFAULT_CONTROLLER_VERSION": v1})
    gateway.start()
    gateway.wait_state("UPDATED")
    first = docker_client.containers.get(gateway.container).id
    docker_client.containers.get(first).remove(force=True)  # as after a new engine: no container ...
    docker_client.images.remove(image_name(v1), force=True)  # ... and no image
    mark = len(gateway.reports)
    gateway.wait_state("UPDATED", since=mark)
    assert [r.payload["sw_state"] for r in gateway.reports[mark:]] == FIRST_START
    assert gateway.running_image() == image_name(v1)
    assert docker_client.containers.get(gateway.container).id != first
    assert not gateway.false_updates()
    missing = [d for d in gateway.dispatched if d.event.name == "start_failed" and d.event.data.get("image_missing")]
    # The first start and the restart after the removal each found no image once;
    # OTA built it each time (no 'image not found' retry loop).
    assert len(missing) == 2
    assert all([t.target for t in d.transitions] == ["awaiting_image"] for d in missing)
