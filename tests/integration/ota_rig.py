"""A real gateway for OTA tests and the OTA benchmark: real git, real dockerd.

The gateway runs the real OTA component (GitPython + docker-py adapters) beside
a small stand-in for the controller side of the swap protocol
(``FakeControllerMachine``) whose effects act on the real engine: stop and
remove the controller container, run the new image, and watch its health
check row in ``communication_queue.db``. ``sw_state`` reports are recorded by a
Publish handler instead of going to ThingsBoard.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors

from teg_fsm.adapters.docker_engine import read_health_ts
from teg_fsm.app import Gateway
from teg_fsm.components.ota import OtaComponent
from teg_fsm.config import Config, load_config
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects import Effect, Log
from teg_fsm.engine.effects.mqtt import Publish
from teg_fsm.engine.events import Source
from teg_fsm.engine.runner import Completion
from tests.machines.ota_fakes import (
    FakeControllerMachine,
    FakeInspectController,
    FakeProbeController,
    FakeStartController,
)

HEALTHY = """\
import sqlite3, time
db = sqlite3.connect("/root/data/communication_queue.db")
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS health_check(id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
while True:
    db.execute("INSERT INTO health_check(id, timestamp_ms) VALUES (1, ?) "
               "ON CONFLICT(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (int(time.time() * 1000),))
    db.commit()
    time.sleep(1)
"""
EXITS = "import sys\nprint('controller: bad configuration', flush=True)\nsys.exit(3)\n"


def controller_files(base_image: str, script: str) -> dict[str, str]:
    """Repository files of one controller version (Dockerfile in ``docker/``)."""
    dockerfile = f"FROM {base_image}\nCOPY controller.py /app/controller.py\nCMD [\"python3\", \"/app/controller.py\"]\n"
    return {"docker/Dockerfile": dockerfile, "docker/controller.py": script}


def read_health_ms(db_path: Path) -> int | None:
    """The controller's latest health check, read as the gateway reads it."""
    return read_health_ts(db_path)


class DockerController:
    """The controller container on the real engine (the fake controller's effects)."""

    def __init__(self, client: docker.DockerClient, data_dir: Path, labels: Mapping[str, str]) -> None:
        self.client, self.data_dir, self.labels = client, data_dir, dict(labels)
        self.name = f"teg_controller_ota_{uuid.uuid4().hex[:8]}"
        self.started_ms = 0
        self.lock = threading.Lock()

    def running_version(self) -> str | None:
        try:
            container = self.client.containers.get(self.name)
        except docker.errors.NotFound:
            return None
        if container.status != "running":
            return None
        # The name it was started from: a rebuild may have moved the tag since.
        image = str(container.attrs["Config"]["Image"])
        return image.removeprefix("teg-controller-").removesuffix(":latest") or None

    def remove(self) -> None:
        try:
            self.client.containers.get(self.name).remove(force=True)
        except docker.errors.NotFound:
            pass

    def start(self, effect: FakeStartController, completion: Completion) -> None:
        with self.lock:
            self.remove()
            self.started_ms = int(time.time() * 1000)
            try:
                self.client.containers.run(
                    f"teg-controller-{effect.version}:latest", name=self.name, detach=True,
                    network_mode="host", privileged=False, labels=self.labels,
                    volumes={str(self.data_dir): {"bind": "/root/data", "mode": "rw"}},
                )
            except docker.errors.APIError as exc:
                completion.fail(f"starting the container failed: {exc.explanation or exc}")
                return
        completion.succeed(None)

    def inspect(self, effect: FakeInspectController, completion: Completion) -> None:
        completion.succeed(self.running_version())

    def probe(self, effect: FakeProbeController, completion: Completion) -> None:
        try:
            container = self.client.containers.get(self.name)
        except docker.errors.NotFound:
            completion.succeed("exited")
            return
        if container.status != "running":
            completion.succeed("exited")
            return
        health = read_health_ms(self.data_dir / "communication_queue.db")
        completion.succeed("ok" if health is not None and health >= self.started_ms else "silent")


class RigComponent:
    """The controller stand-in and a recorder of sw_state reports."""

    name = "ota_rig"

    def __init__(self, gateway: Gateway, controller: DockerController, health_period_s: float) -> None:
        self.gateway, self.controller = gateway, controller
        self.health_period_s = health_period_s
        self.reports: list[dict[str, Any]] = []

    def machine_specs(self) -> list[MachineSpec]:
        return [MachineSpec(FakeControllerMachine, {"health_period_s": self.health_period_s})]

    def install(self) -> None:
        register = self.gateway.runner.register
        register(FakeStartController, self.controller.start, blocking=True)
        register(FakeProbeController, self.controller.probe, blocking=True)
        register(FakeInspectController, self.controller.inspect, blocking=True)
        register(Publish, self._publish)
        register(Log, lambda effect, completion: completion.succeed(None))

    def _publish(self, effect: Effect, completion: Completion) -> None:
        assert isinstance(effect, Publish)
        self.reports.append({"at": time.monotonic(), **json.loads(effect.payload)})
        completion.succeed(None)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class OtaRig:
    """One gateway process (start/kill/restart) over a data dir, a repo clone and an engine."""

    def __init__(self, *, client: docker.DockerClient, data_dir: Path, git_dir: Path,
                 labels: Mapping[str, str], settings: Mapping[str, Any] | None = None,
                 health_period_s: float = 1.0) -> None:
        self.client, self.data_dir, self.git_dir = client, data_dir, git_dir
        self.labels = dict(labels)
        self.settings = {"image_labels": self.labels, "build_network_mode": "host", "probation_s": 2.0,
                         "health_timeout_s": 20.0, "swap_timeout_s": 60.0, "min_free_disk_mb": 100,
                         **(settings or {})}
        self.controller = DockerController(client, data_dir / "controller", self.labels)
        self.controller.data_dir.mkdir(parents=True, exist_ok=True)
        self.health_period_s = health_period_s
        self.reports: list[dict[str, Any]] = []
        self.gateway: Gateway | None = None

    def config(self) -> Config:
        return load_config({
            "TB_HOST": "127.0.0.1", "TB_PORT": "1883", "TEG_DATA_PATH": str(self.data_dir),
            "TEG_CONTROLLER_DATA_PATH": str(self.controller.data_dir),
            "TEG_CONTROLLER_GIT_PATH": str(self.git_dir),
        })

    def start(self) -> Gateway:
        def components(gateway: Gateway) -> list[Any]:
            rig = RigComponent(gateway, self.controller, self.health_period_s)
            rig.reports = self.reports  # reports survive a gateway restart, as ThingsBoard's would
            return [OtaComponent(gateway, self.settings, client=self.client), rig]

        self.gateway = Gateway(self.config(), components=components)
        self.gateway.start()
        return self.gateway

    def stop(self) -> None:
        """Stop the gateway process (the controller container keeps running)."""
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def assign(self, version: str) -> float:
        assert self.gateway is not None
        data = {"values": {"sw_title": "controller", "sw_version": version}, "deleted": []}
        self.gateway.dispatcher.post(Source.MQTT, "shared_attributes_updated", data)
        return time.monotonic()

    def ota_state(self) -> str:
        assert self.gateway is not None
        return self.gateway.dispatcher.machines["ota"].state_name

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 90.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; ota in {self.ota_state()}, reports {self.reports}")

    def wait_report(self, state: str, since: int, timeout_s: float = 90.0) -> dict[str, Any]:
        """The first report of ``state`` among reports[since:]."""
        def found() -> bool:
            return any(r["sw_state"] == state for r in self.reports[since:])
        self.wait_for(found, timeout_s, f"sw_state {state}")
        return next(r for r in self.reports[since:] if r["sw_state"] == state)

    def remove_images(self) -> None:
        for image in self.client.images.list(filters={"label": [f"{k}={v}" for k, v in self.labels.items()]}):
            for tag in image.tags:
                if tag.startswith("teg-controller-"):
                    try:
                        self.client.images.remove(tag, force=True)
                    except docker.errors.APIError:
                        pass
