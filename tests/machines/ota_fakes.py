"""A fake outside world for pure OTA tests: repository, images, controller, ThingsBoard.

``FakeWorld`` is what survives a gateway crash (the repository, the Docker
engine, the running container, the telemetry ThingsBoard received).
``FakeGateway`` is one gateway process: a dispatcher with a journal file, the
OTA machine and a small fake controller machine, whose effects the world
settles at once. Killing it drops the queue and the timers; a new
``FakeGateway`` on the same journal resumes from the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import attrs
from statemachine import State

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatcher, MachineSpec
from teg_fsm.engine.effects import Effect, Log, Notify, StartTimer
from teg_fsm.engine.effects.mqtt import Publish
from teg_fsm.engine.effects.ota import (
    BuildControllerImage,
    CheckoutControllerVersion,
    FetchControllerRepo,
    PruneControllerImages,
    WriteControllerVersion,
)
from teg_fsm.engine.events import Event, Outcome, Source
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.timers import Timers
from teg_fsm.machines.ota import OtaMachine

HEALTH_PERIOD_S = 5.0


@attrs.frozen(kw_only=True)
class FakeStartController(Effect):
    """Stop whatever runs, start ``version`` (the fake controller's only effect)."""

    version: str


@attrs.frozen(kw_only=True)
class FakeInspectController(Effect):
    """Which version's container runs now (None: none); the fake controller's start-up look."""


@attrs.frozen(kw_only=True)
class FakeProbeController(Effect):
    """Look at the running container: ok, exited or silent (no health checks)."""


@attrs.define
class FakeControllerSettings:
    health_period_s: float = HEALTH_PERIOD_S


class FakeControllerMachine(GatewayMachine):
    """Just enough of the controller side of the swap protocol (docs/ENGINE.md)."""

    machine_name = "controller"
    settings_type = FakeControllerSettings
    resume_table: ClassVar[dict[str, str]] = {"stable": "stable", "starting": "starting"}
    rest_states = frozenset({"stable"})

    stable = State(initial=True)
    starting = State()

    # Like the real controller machine, it looks at the engine when the gateway
    # starts and broadcasts what runs (OTA reports nothing UPDATED before that).
    gateway_started = stable.to.itself(internal=True, on="inspect")
    inspect_succeeded = stable.to.itself(internal=True, on="adopt")
    inspect_failed = stable.to.itself(internal=True)  # cannot fail in the fake world
    swap_requested = stable.to(starting) | starting.to(starting)
    start_succeeded = starting.to(stable)
    start_failed = starting.to(stable)
    start_timed_out = starting.to(stable, on="on_start_failed")
    start_cancelled = starting.to(stable, on="on_start_failed")
    health_tick = stable.to.itself(internal=True)
    probe_succeeded = stable.to.itself(internal=True)
    probe_failed = stable.to.itself(internal=True)  # a probe cannot fail in the fake world
    resumed = starting.to.itself() | stable.to.itself(internal=True)

    def setup(self) -> None:
        self.version: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"version": self.version}

    def restore(self, data: Any) -> None:
        self.version = data.get("version")

    def inspect(self) -> None:
        self.emit(FakeInspectController(reply="inspect"))

    def adopt(self, ev: Event) -> None:
        version = ev.data.get("result")
        if version is None or self.state_name != "stable":
            return
        self.version = version
        self.emit(Notify(machine=None, name="controller_started", data={"version": version}))
        self.emit(StartTimer(name="health_tick", seconds=self.settings.health_period_s))

    def on_swap_requested(self, ev: Event) -> None:
        self.version = ev.data["version"]

    def on_enter_starting(self) -> None:
        if self.version is not None:
            self.emit(FakeStartController(version=self.version, reply="start"))

    def on_start_succeeded(self) -> None:
        self.emit(Notify(machine="ota", name="swap_succeeded", data={"version": self.version}))
        self.emit(Notify(machine=None, name="controller_started", data={"version": self.version}))
        self.emit(StartTimer(name="health_tick", seconds=self.settings.health_period_s))

    def on_start_failed(self, ev: Event) -> None:
        error = ev.data.get("error")
        self.emit(Notify(machine="ota", name="swap_failed", data={"version": self.version, "error": error}))

    def on_health_tick(self) -> None:
        self.emit(FakeProbeController(reply="probe"))

    def on_resumed(self) -> None:
        pass  # gateway_started inspects and restarts the health ticks

    def on_probe_succeeded(self, ev: Event) -> None:
        seen = ev.data["result"]
        if seen == "ok":
            data = {"version": self.version, "health_ts_ms": self.now_ms}
            self.emit(Notify(machine=None, name="controller_health_seen", data=data))
        elif seen == "exited":
            data = {"version": self.version, "reason": "container exited with code 1"}
            self.emit(Notify(machine=None, name="controller_exited", data=data))
            return
        self.emit(StartTimer(name="health_tick", seconds=self.settings.health_period_s))


@attrs.define
class FakeWorld:
    """Everything outside the gateway process; survives gateway crashes."""

    tags: set[str] = attrs.field(factory=lambda: {"v1", "v2", "v3"})  # on the remote
    local_tags: set[str] = attrs.field(factory=lambda: {"v1"})  # in the device's clone until a fetch
    behaviour: dict[str, str] = attrs.field(factory=dict)  # version -> ok | exits | silent | no_start
    images: set[str] = attrs.field(factory=lambda: {"teg-controller-v1:latest"})
    running: str | None = "v1"
    version_file: str | None = "v1"
    reports: list[dict[str, Any]] = attrs.field(factory=list)
    # effect class name -> (outcome, error) for its next run
    faults: dict[str, tuple[Outcome, str]] = attrs.field(factory=dict)
    # effect class names whose work waits until the gateway's ``release()`` (in flight)
    held: set[str] = attrs.field(factory=set)
    builds: int = 0
    # OTA package files by checksum: what DownloadPackage finds in them (bundle | image | other)
    packages: dict[str, str] = attrs.field(factory=dict)
    downloads: list[Any] = attrs.field(factory=list)

    def sw_states(self) -> list[str]:
        return [r["sw_state"] for r in self.reports]

    def settle(self, effect: Effect) -> tuple[Outcome, dict[str, Any]] | None:
        """Carry out ``effect``; None when it posts no outcome."""
        fault = self.faults.pop(type(effect).__name__, None)
        if fault is not None:
            outcome, error, *details = fault
            return outcome, {**(details[0] if details else {}), "error": error}
        handler = getattr(self, f"_do_{type(effect).__name__}", None)
        if handler is None:
            raise AssertionError(f"the fake world cannot do {type(effect).__name__}")
        return handler(effect)

    def _ok(self, result: Any = None) -> tuple[Outcome, dict[str, Any]]:
        return Outcome.SUCCEEDED, {"result": result}

    def _do_FetchControllerRepo(self, e: FetchControllerRepo) -> Any:
        self.local_tags |= self.tags
        return self._ok()

    def _do_DownloadPackage(self, e: Any) -> Any:
        self.downloads.append(e)
        kind = self.packages.get(e.checksum, "other")
        if kind == "bundle":
            self.local_tags.add(e.version)  # fetched from the bundle: no remote needed
        elif kind == "image":
            self.images.add(e.image)
        return self._ok({"kind": kind, "bytes": e.size or 0})

    def _do_CheckoutControllerVersion(self, e: CheckoutControllerVersion) -> Any:
        if e.version not in self.local_tags:
            return Outcome.FAILED, {"error": f"{e.version} is neither a tag nor a commit of the repository"}
        return self._ok({"commit": "0" * 40})

    def _do_BuildControllerImage(self, e: BuildControllerImage) -> Any:
        if e.image in self.images:
            return self._ok({"cached": True})
        self.builds += 1
        self.images.add(e.image)
        return self._ok({"cached": False})

    def _do_WriteControllerVersion(self, e: WriteControllerVersion) -> Any:
        self.version_file = e.version
        return self._ok()

    def _do_PruneControllerImages(self, e: PruneControllerImages) -> Any:
        return self._ok()

    def _do_Publish(self, e: Publish) -> Any:
        self.reports.append(json.loads(e.payload))
        return self._ok()

    def _do_Log(self, e: Log) -> Any:
        return self._ok()

    def _do_FakeStartController(self, e: FakeStartController) -> Any:
        self.running = None  # the old container is stopped first
        if self.behaviour.get(e.version) == "no_start":
            return Outcome.FAILED, {"error": "container exited at start with code 1"}
        self.running = e.version
        return self._ok()

    def _do_FakeInspectController(self, e: FakeInspectController) -> Any:
        return self._ok(self.running)

    def _do_FakeProbeController(self, e: FakeProbeController) -> Any:
        seen = {"exits": "exited", "silent": "silent"}.get(self.behaviour.get(self.running or "", ""), "ok")
        if seen == "exited":
            self.running = None
        return self._ok(seen)


class FakeRunner:
    """Settles every effect at once through the world (no threads)."""

    def __init__(self, world: FakeWorld, dispatcher: Dispatcher) -> None:
        self.world, self.dispatcher = world, dispatcher
        self.in_flight: list[tuple[str, Effect]] = []

    def submit(self, origin: str, effect: Effect, *, release: bool = False) -> None:
        if not release and type(effect).__name__ in self.world.held:
            self.in_flight.append((origin, effect))
            return
        settled = self.world.settle(effect)
        if settled is not None:
            self.dispatcher.post_outcome(origin, effect, *settled)

    def cancel(self, effect_id: str) -> bool:
        return False

    def release(self) -> None:
        in_flight, self.in_flight = self.in_flight, []
        for origin, effect in in_flight:
            self.submit(origin, effect, release=True)


OTA_SETTINGS = {
    "git_dir": "/srv/controller/.git", "context_dir": "/srv/controller/docker",
    "version_file": "/data/last_launched_controller_version.txt", "last_good": "v1",
    "probation_s": 60.0, "health_timeout_s": 60.0, "swap_timeout_s": 120.0, "fetch_retry_s": 600.0,
}


class FakeGateway:
    """One gateway process over a journal file; ``kill()`` drops it without a goodbye."""

    def __init__(self, world: FakeWorld, journal_path: Path, clock: FakeClock,
                 settings: dict[str, Any] | None = None) -> None:
        self.world = world
        self.journal = Journal(journal_path)
        self.clock, self.timers = clock, Timers(clock)
        self.dispatcher = Dispatcher(clock=clock, timers=self.timers, journal=self.journal)
        self.runner = FakeRunner(world, self.dispatcher)
        self.dispatcher.attach_runner(self.runner)  # type: ignore[arg-type]
        specs = [MachineSpec(OtaMachine, {**OTA_SETTINGS, **(settings or {})}), MachineSpec(FakeControllerMachine)]
        self.dispatcher.boot(specs, self.journal.load_checkpoints())

    @property
    def ota(self) -> OtaMachine:
        return self.dispatcher.machines["ota"]  # type: ignore[return-value]

    def assign(self, version: str, *, push: bool = False, package: dict[str, Any] | None = None) -> None:
        """``package``: the sw_size / sw_checksum / sw_checksum_algorithm ThingsBoard sets for a file."""
        if push:
            data = {"values": {"sw_title": "controller", "sw_version": version, **(package or {})},
                    "deleted": ["sw_url"] if package else []}
            self.dispatcher.post(Source.MQTT, "shared_attributes_updated", data)
        else:
            shared = {"sw_title": "controller", "sw_version": version, **(package or {})}
            self.dispatcher.post(Source.SYSTEM, "shared_attributes_received", {"client": {}, "shared": shared})

    def release(self) -> None:
        """Let held effects finish now."""
        self.world.held.clear()
        self.runner.release()

    def post(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.dispatcher.post(Source.TEST, name, data or {})

    def run_until_state(self, state: str, limit_s: float = 1000.0) -> bool:
        """Process events one by one (firing timers when idle) until OTA enters ``state``."""
        end = self.clock.monotonic() + limit_s
        while True:
            while self.dispatcher.run_until_idle(max_events=1):
                if self.ota.state_name == state:
                    return True
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > end:
                return False
            self.clock.set_elapsed(deadline)
            for machine, name, generation in self.timers.pop_due(deadline):
                self.dispatcher.fire_timer(machine, name, generation)

    def settle(self, seconds: float = 600.0) -> None:
        """Let time pass until everything has played out."""
        self.dispatcher.advance(seconds)

    def kill(self) -> None:
        # The process dies: queued events and timers are lost; checkpoints are on disk.
        self.journal.close()
