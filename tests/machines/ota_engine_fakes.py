"""A fake Docker engine and controller repository for the real OTA and controller machines.

``EngineWorld`` is what outlives a gateway process: the controller repository
(local and remote tags), the engine's images, the one ``teg_controller``
container, the version file and what ThingsBoard received. ``TruthGateway`` is
one gateway process: a fake-clock dispatcher over a journal file running the
real ``OtaMachine`` and ``ControllerMachine``, whose effects the world carries
out at once. Killing it loses its queue and timers; a new one on the same
journal resumes from the checkpoints, with the settings a real start would read
from the version file.

Every ``sw_state`` report is recorded with the truth at the moment it was sent
(``Report.truth``): whether a container of ``current_sw_version``'s image runs
and has written a health check since it started, no older than the probation
window. That is what the invariant tests check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatched, Dispatcher, MachineSpec
from teg_fsm.engine.effects import Effect, Log
from teg_fsm.engine.effects.controller import (
    InspectController,
    ReadControllerHealth,
    StartController,
    StopController,
    image_name,
)
from teg_fsm.engine.effects.mqtt import Publish, RequestAttributes
from teg_fsm.engine.effects.ota import (
    BuildControllerImage,
    CheckoutControllerVersion,
    FetchControllerRepo,
    PruneControllerImages,
    WriteControllerVersion,
)
from teg_fsm.engine.events import Outcome, Source
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.timers import Timers
from teg_fsm.machines.controller import ControllerMachine
from teg_fsm.machines.ota import OtaMachine

PROBATION_S = 60.0


@attrs.define
class Container:
    container_id: str
    version: str
    started_ms: int
    running: bool = True


@attrs.frozen
class Report:
    payload: dict[str, Any]
    truth: bool  # a container of current_sw_version runs with a fresh health check since its start


@attrs.define
class EngineWorld:
    """The engine, the repository and ThingsBoard; survives gateway crashes."""

    clock: FakeClock
    remote_tags: set[str] = attrs.field(factory=lambda: {"v1", "v2", "v3"})
    local_tags: set[str] = attrs.field(factory=lambda: {"v1"})
    has_remote: bool = True
    network_up: bool = True
    images: set[str] = attrs.field(factory=set)  # versions with an image
    silent: set[str] = attrs.field(factory=set)  # versions whose controller writes no health check
    container: Container | None = None
    # Row id=1 of health_check in the controller data dir: shared by every
    # container, so a new one finds its predecessor's last health check there.
    health_ms: int | None = None
    version_file: str | None = None
    default_version: str | None = "v1"
    reports: list[Report] = attrs.field(factory=list)
    # effect class name -> (outcome, error) for its next run
    faults: dict[str, tuple[Outcome, str]] = attrs.field(factory=dict)
    serial: int = 0
    builds: int = 0

    # -- truth ------------------------------------------------------------------

    def runs(self) -> str | None:
        """The version whose container runs, if any."""
        return self.container.version if self.container and self.container.running else None

    def write_health(self) -> None:
        """A running, healthy controller writes its health check continuously."""
        c = self.container
        if c is not None and c.running and c.version not in self.silent:
            self.health_ms = self.clock.now_ms()

    def verified(self, version: Any) -> bool:
        self.write_health()
        c = self.container
        if c is None or not c.running or c.version != version or self.health_ms is None:
            return False
        return self.health_ms >= c.started_ms and self.clock.now_ms() - self.health_ms <= PROBATION_S * 1000

    def sw_states(self) -> list[str]:
        return [r.payload["sw_state"] for r in self.reports]

    # -- engine events a test causes ------------------------------------------------

    def kill_container(self) -> dict[str, Any] | None:
        """The controller dies; returns the Docker event's data."""
        c = self.container
        if c is None or not c.running:
            return None
        self.write_health()
        c.running = False
        return {"container_id": c.container_id, "exit_code": 1}

    def remove_image(self, version: str) -> None:
        self.images.discard(version)

    # -- effects ------------------------------------------------------------------

    def settle(self, effect: Effect) -> tuple[Outcome, dict[str, Any]]:
        fault = self.faults.pop(type(effect).__name__, None)
        if fault is not None:
            return fault[0], {"error": fault[1]}
        handler = getattr(self, f"_do_{type(effect).__name__}")
        return handler(effect)

    @staticmethod
    def _ok(result: Any = None) -> tuple[Outcome, dict[str, Any]]:
        return Outcome.SUCCEEDED, {"result": result}

    @staticmethod
    def _fail(error: str, **details: Any) -> tuple[Outcome, dict[str, Any]]:
        return Outcome.FAILED, {"error": error, **details}

    def _do_InspectController(self, e: InspectController) -> Any:
        c = self.container
        if c is None:
            return self._ok({"found": False, "running": False, "version": None, "container_id": None,
                             "started_at_ms": None})
        return self._ok({"found": True, "running": c.running, "version": c.version,
                         "container_id": c.container_id, "started_at_ms": c.started_ms})

    def _do_StartController(self, e: StartController) -> Any:
        if e.version not in self.images:
            return self._fail(f"image {image_name(e.version)} not found", image_missing=True)
        if self.container is not None:
            self.write_health()
            self.container.running = False
        self.serial += 1
        self.container = Container(f"c{self.serial}", e.version, self.clock.now_ms())
        return self._ok({"container_id": self.container.container_id, "started_at_ms": self.container.started_ms,
                         "version": e.version})

    def _do_StopController(self, e: StopController) -> Any:
        if self.container is not None and self.container.container_id == e.container_id:
            self.write_health()
            self.container.running = False
        return self._ok({"stopped": True})

    def _do_ReadControllerHealth(self, e: ReadControllerHealth) -> Any:
        self.write_health()
        c = self.container
        return self._ok({"health_ts_ms": self.health_ms, "running": bool(c and c.running),
                         "container_id": c.container_id if c else None, "asked_for": e.container_id})

    def _do_FetchControllerRepo(self, e: FetchControllerRepo) -> Any:
        if not self.has_remote:
            return self._ok({"remote": None})
        if not self.network_up:
            return self._fail("git fetch failed: could not resolve host")
        self.local_tags |= self.remote_tags
        return self._ok({"remote": "origin"})

    def _do_CheckoutControllerVersion(self, e: CheckoutControllerVersion) -> Any:
        if e.version not in self.local_tags:
            return self._fail(f"tag {e.version} does not exist in the controller repository")
        return self._ok({"commit": "0" * 40})

    def _do_BuildControllerImage(self, e: BuildControllerImage) -> Any:
        version = e.image.removeprefix("teg-controller-").removesuffix(":latest")
        if version in self.images:
            return self._ok({"cached": True})
        self.builds += 1
        self.images.add(version)
        return self._ok({"cached": False})

    def _do_WriteControllerVersion(self, e: WriteControllerVersion) -> Any:
        self.version_file = e.version
        return self._ok()

    def _do_PruneControllerImages(self, e: PruneControllerImages) -> Any:
        return self._ok({"removed": []})

    def _do_Publish(self, e: Publish) -> Any:
        payload = json.loads(e.payload)
        if "sw_state" in payload:
            self.reports.append(Report(payload, self.verified(payload.get("current_sw_version"))))
        return self._ok()

    def _do_Log(self, e: Log) -> Any:
        return self._ok()

    def _do_RequestAttributes(self, e: RequestAttributes) -> Any:
        return self._ok({"client": {}, "shared": {}})


class SyncRunner:
    """Carries out every effect at once through the world (no threads)."""

    def __init__(self, world: EngineWorld, dispatcher: Dispatcher) -> None:
        self.world, self.dispatcher = world, dispatcher

    def submit(self, origin: str, effect: Effect) -> None:
        self.dispatcher.post_outcome(origin, effect, *self.world.settle(effect))

    def cancel(self, effect_id: str) -> bool:
        return False


CONTROLLER_SETTINGS = {
    "health_check_max_age_s": 300.0, "restart_backoff_s": 60.0, "telemetry_interval_s": 20.0,
    "first_check_s": 5.0, "engine_retry_s": 10.0, "image_retry_s": 600.0, "stop_timeout_s": 10.0,
}
OTA_SETTINGS = {
    "git_dir": "/srv/controller/.git", "context_dir": "/srv/controller/docker",
    "version_file": "/data/last_launched_controller_version.txt",
    "probation_s": PROBATION_S, "health_timeout_s": PROBATION_S, "swap_timeout_s": 300.0, "fetch_retry_s": 600.0,
}


class TruthGateway:
    """One gateway process with the real OTA and controller machines over a fake engine."""

    def __init__(self, world: EngineWorld, journal_path: Path) -> None:
        self.world = world
        self.clock = world.clock
        self.journal = Journal(journal_path)
        self.timers = Timers(self.clock)
        self.dispatcher = Dispatcher(clock=self.clock, timers=self.timers, journal=self.journal)
        self.dispatcher.attach_runner(SyncRunner(world, self.dispatcher))  # type: ignore[arg-type]
        self.moves: list[Dispatched] = []
        self.dispatcher.observers.append(self.moves.append)
        # What a real start reads: the version file, else TEG_DEFAULT_CONTROLLER_VERSION.
        boot = world.version_file or world.default_version
        specs = [MachineSpec(OtaMachine, {**OTA_SETTINGS, "last_good": boot}),
                 MachineSpec(ControllerMachine, {**CONTROLLER_SETTINGS, "boot_version": boot})]
        self.dispatcher.boot(specs, self.journal.load_checkpoints())

    @property
    def ota(self) -> OtaMachine:
        return self.dispatcher.machines["ota"]  # type: ignore[return-value]

    @property
    def controller(self) -> ControllerMachine:
        return self.dispatcher.machines["controller"]  # type: ignore[return-value]

    def post(self, name: str, data: dict[str, Any] | None = None, source: Source = Source.TEST) -> None:
        self.dispatcher.post(source, name, data or {})

    def assign(self, version: Any) -> None:
        values = {"sw_title": "controller", "sw_version": version}
        self.post("shared_attributes_updated", {"values": values, "deleted": []}, Source.MQTT)

    def unassign(self) -> None:
        self.post("shared_attributes_updated", {"values": {}, "deleted": ["sw_title", "sw_version"]}, Source.MQTT)

    def reconnect(self, version: Any) -> None:
        shared = {} if version is None else {"sw_title": "controller", "sw_version": version}
        self.post("shared_attributes_received", {"client": {}, "shared": shared}, Source.SYSTEM)

    def run(self, max_events: int | None = None) -> None:
        self.dispatcher.run_until_idle(max_events)

    def advance(self, seconds: float) -> None:
        self.dispatcher.advance(seconds)

    def run_until(self, machine: str, state: str, limit_s: float = 1000.0) -> bool:
        """Process events one by one (firing timers when idle) until ``machine`` enters ``state``."""
        end = self.clock.monotonic() + limit_s
        while True:
            while self.dispatcher.run_until_idle(max_events=1):
                if self.dispatcher.machines[machine].state_name == state:
                    return True
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > end:
                return False
            self.clock.set_elapsed(deadline)
            for owner, name, generation in self.timers.pop_due(deadline):
                self.dispatcher.fire_timer(owner, name, generation)

    def kill(self) -> None:
        self.journal.close()
