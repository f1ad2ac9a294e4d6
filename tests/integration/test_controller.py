"""The controller component on a real Docker engine, with a real controller image.

The image (built from the local base image) runs a small controller that
upserts ``health_check`` row id=1 in ``communication_queue.db`` (WAL) every
0.2 s and obeys a mode file in its data dir: ``exit_once`` (exit 3, once),
``crash`` (exit 4 after 0.3 s, every start) or ``silent`` (run, but write no
health check). Each test names its container uniquely, so tests sharing an
engine never touch each other's controller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from teg_fsm.adapters.docker_engine import parse_docker_time
from teg_fsm.app import Gateway
from teg_fsm.components.controller import ControllerComponent
from teg_fsm.config import load_config
from teg_fsm.engine.dispatcher import Dispatched
from teg_fsm.engine.effects import Notify
from teg_fsm.engine.effects.controller import image_name
from teg_fsm.engine.effects.mqtt import Publish
from teg_fsm.engine.events import Source
from teg_fsm.engine.runner import Completion
from tests.rig.docker_engine import BuildImage

# no_mqtt: the gateway here has only its controller component: the MQTT version cannot matter (the MQTT 5 pass leaves it out).
pytestmark = [pytest.mark.integration, pytest.mark.no_mqtt]

CONTROLLER = """\
import os, signal, sqlite3, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 has no default SIGTERM action
db = sqlite3.connect("/root/data/communication_queue.db", timeout=5)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
db.commit()
while True:
    try:
        mode = open("/root/data/mode").read().strip()
    except OSError:
        mode = "healthy"
    if mode == "exit_once":
        os.remove("/root/data/mode")
        sys.exit(3)
    if mode == "crash":
        time.sleep(0.3)
        sys.exit(4)
    if mode != "silent":
        db.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) "
                   "ON CONFLICT(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (int(time.time() * 1000),))
        db.commit()
    time.sleep(0.2)
"""
DOCKERFILE = 'FROM {base}\nCOPY controller.py /controller.py\nCMD ["python3", "-u", "/controller.py"]\n'


@pytest.fixture(scope="module")
def controller_version(build_image: BuildImage, base_image: str) -> str:
    version = f"v0.0.1-t{uuid.uuid4().hex[:8]}"
    build_image(image_name(version), DOCKERFILE.format(base=base_image), {"controller.py": CONTROLLER})
    return version


class Run:
    """One gateway with only the controller component, and what it did."""

    def __init__(self, tmp: Path, docker_host: str, version: str, env: dict[str, str], **settings: Any) -> None:
        self.name = f"teg_controller_t{uuid.uuid4().hex[:8]}"
        self.data = tmp / "controller"
        self.data.mkdir(parents=True, exist_ok=True)
        config = load_config({
            "TB_HOST": "localhost", "TB_PORT": "1883", "TEG_DATA_PATH": str(tmp / "gateway"),
            "TEG_CONTROLLER_DATA_PATH": str(self.data), "DOCKER_HOST": docker_host,
            "TEG_DEFAULT_CONTROLLER_VERSION": version, "TEG_CONTROLLER_PRIVILEGED": "false",
            "TEG_CONTROLLER_EXTRA_MOUNTS": "", "TEG_RESTART_BACKOFF_S": "1", "TEG_CONTROLLER_STOP_TIMEOUT_S": "5",
            "TEG_CONTROLLER_RESTART_POLICY": "no",  # restarts are the machine's, unless a test says otherwise
            **env,
        })
        options = {"telemetry_interval_s": 0.5, "first_check_s": 0.5, "engine_retry_s": 0.5, **settings}
        self.gateway = Gateway(config, components=lambda gw: [ControllerComponent(gw, self.name, **options)])
        self.moves: list[tuple[float, str, str]] = []  # (wall time, target state, trigger)
        self.notices: list[Notify] = []
        self.telemetry: list[dict[str, Any]] = []
        self.gateway.dispatcher.observers.append(self._observe)
        self.gateway.runner.register(Publish, self._publish)

    def _observe(self, done: Dispatched) -> None:
        now = time.time()
        self.moves += [(now, t.target, t.event) for t in done.transitions if t.source != t.target]
        self.notices += [e for e in done.effects if isinstance(e, Notify)]

    def _publish(self, effect: Publish, completion: Completion) -> None:
        self.telemetry.append(json.loads(effect.payload))
        completion.succeed(None)

    @property
    def machine(self) -> Any:
        return self.gateway.dispatcher.machines["controller"]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; moves: {self.moves[-6:]}"
            time.sleep(0.05)

    def wait_state(self, state: str, timeout: float = 15.0, after: int = 0) -> float:
        """Wall time of the first move into ``state`` among moves[after:]."""
        def entered() -> list[float]:
            return [t for t, target, _ in self.moves[after:] if target == state]

        self.wait(lambda: bool(entered()), f"state {state}", timeout)
        return entered()[0]

    def mode(self, mode: str | None) -> None:
        path = self.data / "mode"
        if mode is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(mode)


@pytest.fixture
def run(tmp_path: Path, controller_version: str, docker_client: docker.DockerClient) -> Iterator[Callable[..., Run]]:
    made: list[Run] = []

    def start(env: dict[str, str] | None = None, **settings: Any) -> Run:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        made.append(Run(tmp_path, host, controller_version, env or {}, **settings))
        return made[-1]

    yield start
    for r in made:
        r.gateway.stop()
        remove_container(docker_client, r.name)


def remove_container(client: docker.DockerClient, name: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:  # 409: a removal by the gateway is still in progress
            if exc.status_code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def is_running(client: docker.DockerClient, container_id: str) -> bool:
    """False once the container stopped, or is already removed by the gateway's restart."""
    try:
        return bool(client.containers.get(container_id).attrs["State"]["Running"])
    except docker.errors.NotFound:
        return False


def started_at(client: docker.DockerClient, container_id: str) -> int:
    return parse_docker_time(client.containers.get(container_id).attrs["State"]["StartedAt"]) or 0


def test_a_running_controller_of_the_right_version_is_adopted_without_a_restart(
    run: Callable[..., Run], docker_client: docker.DockerClient, controller_version: str
) -> None:
    r = run()
    theirs = docker_client.containers.run(image_name(controller_version), name=r.name, detach=True,
                                          network_mode="host", volumes={str(r.data): {"bind": "/root/data"}})
    before = docker_client.containers.get(theirs.id).attrs["State"]["StartedAt"]
    r.gateway.start()
    r.wait_state("running")
    r.wait(lambda: any(n.name == "controller_health_seen" for n in r.notices), "a health check seen")
    r.wait(lambda: any("ms_since_last_controller_health_check" in t.get("values", {}) for t in r.telemetry),
           "health telemetry")
    assert r.machine.container_id == theirs.id
    assert docker_client.containers.get(r.name).id == theirs.id
    assert docker_client.containers.get(theirs.id).attrs["State"]["StartedAt"] == before
    assert [m[1] for m in r.moves] == ["inspecting", "running"]


def test_an_exit_is_noticed_within_2_s_and_restarted_after_the_backoff(
    run: Callable[..., Run], docker_client: docker.DockerClient
) -> None:
    r = run()
    r.gateway.start()
    r.wait_state("running")
    first = r.machine.container_id
    mark = len(r.moves)
    r.mode("exit_once")
    noticed = r.wait_state("unhealthy", after=mark)
    finished = parse_docker_time(docker_client.containers.get(first).attrs["State"]["FinishedAt"]) or 0
    restarted = r.wait_state("running", after=mark)
    second = r.machine.container_id
    assert second != first
    latency = noticed - finished / 1000
    waited = started_at(docker_client, second) / 1000 - noticed
    print(f"exit noticed after {latency * 1000:.0f} ms; restarted {waited:.2f} s after (backoff 1 s); "
          f"running again {restarted - noticed:.2f} s after the exit was noticed")
    assert latency < 2.0
    assert 1.0 <= waited < 4.0
    exited = [n.data for n in r.notices if n.name == "controller_exited"]
    assert exited == [{"version": r.machine.version, "reason": "container exited with code 3"}]


def test_a_controller_that_keeps_crashing_is_restarted_with_a_growing_backoff(run: Callable[..., Run]) -> None:
    r = run({"TEG_RESTART_BACKOFF_S": "0.5", "TEG_RESTART_BACKOFF_FACTOR": "2"})
    r.mode("crash")
    r.gateway.start()
    r.wait(lambda: sum(1 for m in r.moves if m[1] == "restarting") >= 3, "three restarts", timeout=30)
    ill = [t for t, target, _ in r.moves if target == "unhealthy"]
    restarts = [t for t, target, _ in r.moves if target == "restarting"]
    waits = [b - a for a, b in zip(ill, restarts)]
    print("waits before each restart:", [f"{w:.2f}" for w in waits[:3]])
    for waited, backoff in zip(waits, (0.5, 1.0, 2.0)):
        assert backoff - 0.05 <= waited < backoff + 0.5


def test_a_stale_health_check_stops_the_controller_and_starts_a_new_one(
    run: Callable[..., Run], docker_client: docker.DockerClient
) -> None:
    r = run({"TEG_HEALTH_CHECK_MAX_AGE_S": "2"})
    r.mode("silent")
    r.gateway.start()
    r.wait_state("running")
    first = r.machine.container_id
    r.wait_state("unhealthy", timeout=10)
    assert "no health check for" in [n.data for n in r.notices if n.name == "controller_exited"][-1]["reason"]
    r.mode(None)  # the next one writes its health checks
    r.wait(lambda: not is_running(docker_client, first), "the silent one stopped")
    mark = len(r.moves)
    r.wait_state("running", after=mark)
    assert r.machine.container_id != first
    r.wait(lambda: any(n.name == "controller_health_seen" for n in r.notices), "fresh health checks")
    assert r.machine.state_name == "running"


def test_the_container_runs_with_the_configured_settings_and_an_engine_restart_is_adopted(
    run: Callable[..., Run], docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    missing = tmp_path / "not-there"
    r = run({"TEG_CONTROLLER_RESTART_POLICY": "", "TEG_CONTROLLER_LOGS_PATH": str(tmp_path / "logs"),
             "TEG_CONTROLLER_EXTRA_MOUNTS": f"{tools}:/opt/tools,{missing}:/opt/missing,{tools}:/opt/rw:rw"})
    r.gateway.start()
    r.wait_state("running")
    first = r.machine.container_id
    host = docker_client.containers.get(first).attrs["HostConfig"]
    assert host["NetworkMode"] == "host" and host["Privileged"] is False
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}, "the existing gateway's default"
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "5"}}
    assert sorted(host["Binds"]) == sorted([
        f"{r.data}:/root/data:rw", f"{tmp_path / 'logs'}:/root/logs:rw", f"{tools}:/opt/tools:ro", f"{tools}:/opt/rw:rw",
    ])
    assert not missing.exists(), "a missing host path is never bind-mounted (Docker would create it)"
    # The engine's restart policy restarts a crash in place; the machine adopts that.
    mark = len(r.moves)
    r.mode("exit_once")
    r.wait_state("unhealthy", after=mark)
    r.wait_state("running", after=mark)
    assert r.machine.container_id == first
    assert [m[2] for m in r.moves[mark:]] == ["container_exited", "container_started"]


class OwnDockerd:
    """A private dockerd (own data/exec roots, pidfile, socket; no bridge, no iptables)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tegd", dir="/tmp"))  # short: the socket path is limited
        self.host = f"unix://{self.root}/d.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "--host", self.host,
             "--bridge=none", "--iptables=false", "--ip6tables=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not self.answers():
            assert self.process.poll() is None, (self.root / "dockerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "private dockerd not ready in 60 s"
            time.sleep(0.2)

    def answers(self) -> bool:
        try:
            client = docker.DockerClient(base_url=self.host, timeout=5)
        except docker.errors.DockerException:
            return False
        client.close()
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        # dockerd leaves its netns bind mount behind, which would block removing the root.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_dockerd(docker_client: docker.DockerClient, controller_version: str) -> Iterator[OwnDockerd]:
    """A private engine holding the controller image (copied over from the shared engine)."""
    engine = OwnDockerd()
    try:
        engine.start()
        main_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        save = subprocess.Popen(["docker", "-H", main_host, "save", image_name(controller_version)],
                                stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", engine.host, "load", "-q"], stdin=save.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        assert save.wait() == 0
        yield engine
    finally:
        engine.remove()


def test_the_gateway_survives_the_engine_stopping_and_recovers_when_it_returns(
    tmp_path: Path, own_dockerd: OwnDockerd, controller_version: str
) -> None:
    r = Run(tmp_path, own_dockerd.host, controller_version, {})
    r.gateway.start()
    try:
        r.wait_state("running", timeout=30)
        first = r.machine.container_id
        mark = len(r.moves)
        own_dockerd.stop()
        lost = r.wait_state("engine_unreachable", after=mark, timeout=15)
        assert r.gateway.dispatcher.thread is not None and r.gateway.dispatcher.thread.is_alive()
        before = r.gateway.dispatcher.dispatched_count
        r.gateway.dispatcher.post(Source.TEST, "unrelated_work")
        r.wait(lambda: r.gateway.dispatcher.dispatched_count > before, "the dispatcher still dispatching")
        assert {"docker_engine_reachable": False} in [t.get("values") for t in r.telemetry]
        time.sleep(1.5)  # a few retries against the dead socket must not hurt
        assert r.machine.state_name == "engine_unreachable"
        own_dockerd.start()
        back = r.wait_state("running", after=mark, timeout=30)
        print(f"engine back: running again {back - lost:.1f} s after the loss was noticed")
        assert {"docker_engine_reachable": True} in [t.get("values") for t in r.telemetry]
        client = docker.DockerClient(base_url=own_dockerd.host)
        try:
            container = client.containers.get(r.name)
            assert container.attrs["State"]["Running"] and r.machine.container_id == container.id
            assert container.id == first or started_at(client, container.id) / 1000 > lost
        finally:
            client.close()
    finally:
        r.gateway.stop()


def test_after_a_long_engine_outage_the_engine_watcher_brings_the_controller_back_before_the_backed_off_retry(
    tmp_path: Path, own_dockerd: OwnDockerd, controller_version: str
) -> None:
    """Issue 16: the machine's own retries back off (10 s, 20 s, 40 s, ...); the event watcher,
    which reconnects at least every 10 s, still notices the return at once."""
    r = Run(tmp_path, own_dockerd.host, controller_version, {}, engine_retry_s=10.0)
    r.gateway.start()
    try:
        r.wait_state("running", timeout=30)
        mark = len(r.moves)
        own_dockerd.stop()
        lost = r.wait_state("engine_unreachable", after=mark, timeout=15)
        time.sleep(max(0.0, lost + 33 - time.time()))  # retried at +10 s and +30 s; the next is due at +70 s
        retries = [event for _, _, event in r.moves[mark:] if event == "engine_retry_due"]
        assert len(retries) == 2, r.moves[mark:]
        own_dockerd.start()
        answered = time.time()
        back = r.wait_state("running", after=mark + 1 + 2 * len(retries), timeout=30)
        print(f"engine answered {answered - lost:.1f} s into the outage; running again {back - answered:.1f} s later")
        returned = [event for _, target, event in r.moves[mark:] if target == "inspecting"]
        assert returned[-1] == "docker_engine_returned", r.moves[mark:]
        assert back - answered < 15, "the watcher reconnects within 10 s of the engine's return"
        assert back - lost < 60, "well before the machine's own third retry at +70 s"
    finally:
        r.gateway.stop()
