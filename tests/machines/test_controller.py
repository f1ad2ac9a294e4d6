"""The controller machine, pure: a fake clock and a fake Docker engine that answers at once.

``FakeEngine`` is what survives a gateway crash (the engine, its container, the
controller's health row). ``Rig`` is one gateway process around it: a
dispatcher with a journal file, the real effect runner with handlers played by
the fake engine, and a record of every effect, event and the state each
effect was issued in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatched, Dispatcher, MachineSpec
from teg_fsm.engine.effects import Effect, Log, Notify, StartTimer
from teg_fsm.engine.effects.controller import (
    ENGINE_UNREACHABLE,
    InspectController,
    ReadControllerHealth,
    StartController,
    StopController,
)
from teg_fsm.engine.effects.mqtt import Publish, RequestAttributes
from teg_fsm.engine.events import Event, Source
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.runner import Completion, EffectRunner
from teg_fsm.engine.timers import Timers
from teg_fsm.machines.controller import ControllerMachine
from teg_fsm.machines.controller_rules import NO_VERSION_ERROR

E = TypeVar("E", bound=Effect)
H = 3600.0
OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")


class FakeEngine:
    """A Docker engine with at most one controller container; answers every effect at once."""

    def __init__(self, clock: FakeClock, images: set[str] | None = None) -> None:
        self.clock = clock
        self.up = True
        self.images = images if images is not None else {"v1", "v2"}
        self.container: dict[str, Any] | None = None
        self.health_ts_ms: int | None = None
        self.serial = 0
        self.ops: list[str] = []

    def run(self, version: str) -> dict[str, Any]:
        """A container the test (or an old gateway) started."""
        self.serial += 1
        self.container = {"container_id": f"c{self.serial}", "version": version, "running": True,
                          "started_at_ms": self.clock.now_ms()}
        return self.container

    def _down(self, completion: Completion) -> bool:
        if not self.up:
            completion.fail(f"{ENGINE_UNREACHABLE}: connection refused", {"engine_unreachable": True})
        return not self.up

    def inspect(self, effect: InspectController, completion: Completion) -> None:
        if self._down(completion):
            return
        self.ops.append("inspect")
        found = dict(self.container or {"container_id": None, "version": None, "running": False, "started_at_ms": None})
        completion.succeed({"found": self.container is not None, **found})

    def start(self, effect: StartController, completion: Completion) -> None:
        if self._down(completion):
            return
        self.ops.append(f"start {effect.version}")
        if effect.version not in self.images:
            completion.fail(f"image teg-controller-{effect.version}:latest not found", {"image_missing": True})
            return
        container = self.run(effect.version)
        completion.succeed({k: container[k] for k in ("container_id", "started_at_ms", "version")})

    def stop(self, effect: StopController, completion: Completion) -> None:
        if self._down(completion):
            return
        self.ops.append(f"stop {effect.container_id}")
        if self.container and self.container["container_id"] == effect.container_id:
            self.container["running"] = False
        completion.succeed({})

    def health(self, effect: ReadControllerHealth, completion: Completion) -> None:
        running = self.container["running"] if self.container else False
        completion.succeed({"health_ts_ms": self.health_ts_ms, "running": running if self.up else None,
                            "container_id": self.container["container_id"] if self.container else None,
                            "asked_for": effect.container_id})


class Rig:
    """One gateway process: the controller machine on a fake-clock dispatcher."""

    def __init__(self, engine: FakeEngine, journal_path: Path, **settings: Any) -> None:
        self.engine = engine
        self.clock = engine.clock
        self.journal = Journal(journal_path)
        self.dispatcher = Dispatcher(clock=self.clock, timers=Timers(self.clock), journal=self.journal)
        self.runner = EffectRunner(self.dispatcher.post_outcome)
        self.dispatcher.attach_runner(self.runner)
        for kind, handler in ((InspectController, engine.inspect), (StartController, engine.start),
                              (StopController, engine.stop), (ReadControllerHealth, engine.health)):
            self.runner.register(kind, handler)
        for kind in (Publish, Log, RequestAttributes):
            self.runner.register(kind, lambda effect, completion: completion.succeed({"client": {}, "shared": {}}))
        self.effects: list[Effect] = []
        self.events: list[str] = []
        self.issued_in: list[tuple[str, Effect]] = []
        self.dispatcher.observers.append(self._observe)
        spec = MachineSpec(ControllerMachine, {"boot_version": "v1", **settings})
        self.dispatcher.boot([spec], self.journal.load_checkpoints())
        self.dispatcher.run_until_idle()

    def _observe(self, done: Dispatched) -> None:
        self.events.append(done.event.name)
        for effect in done.effects:
            self.effects.append(effect)
            self.issued_in.append((self.state, effect))

    @property
    def machine(self) -> ControllerMachine:
        return self.dispatcher.machines["controller"]  # type: ignore[return-value]

    @property
    def state(self) -> str:
        return self.machine.state_name

    def all(self, kind: type[E]) -> list[E]:
        return [e for e in self.effects if isinstance(e, kind)]

    def notices(self, name: str) -> list[Notify]:
        return [n for n in self.all(Notify) if n.name == name]

    def telemetry(self) -> list[dict[str, Any]]:
        return [json.loads(p.payload) for p in self.all(Publish)]

    def post(self, name: str, data: dict[str, Any] | None = None, source: Source = Source.DOCKER) -> None:
        self.dispatcher.post(source, name, data or {})
        self.dispatcher.run_until_idle()

    def advance(self, seconds: float) -> None:
        self.dispatcher.advance(seconds)

    def exit(self, code: int = 1) -> None:
        """The container dies, as the Docker event stream reports it."""
        container = self.engine.container
        assert container is not None
        container["running"] = False
        self.post("container_exited", {"container_id": container["container_id"], "exit_code": code})

    def uncovered_outcomes(self) -> list[str]:
        """Effects issued in a state that does not declare every outcome of their reply."""
        missing = []
        for state, effect in self.issued_in:
            if effect.reply is None:
                continue
            declared = {t.event for t in ControllerMachine.states_map[state].transitions}
            missing += [f"{state}: {effect.reply}_{o}" for o in OUTCOMES if f"{effect.reply}_{o}" not in declared]
        return sorted(set(missing))

    def close(self) -> None:
        self.runner.shutdown(wait=False)
        self.journal.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(FakeClock())


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def rigs(engine: FakeEngine, journal_path: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        assert rig.uncovered_outcomes() == []
        rig.close()


@pytest.fixture
def make(engine: FakeEngine, journal_path: Path, rigs: list[Rig]) -> Any:
    def build(**settings: Any) -> Rig:
        rig = Rig(engine, journal_path, **settings)
        rigs.append(rig)
        return rig

    return build


def restart_delays(rig: Rig) -> list[float]:
    return [t.seconds for t in rig.effects if getattr(t, "name", "") == "restart_backoff_elapsed"]


def crash_and_restart(rig: Rig) -> float:
    """One crash; returns the backoff waited before the restart."""
    rig.exit()
    assert rig.state == "unhealthy"
    delay = restart_delays(rig)[-1]
    rig.advance(delay - 0.5)
    assert rig.state == "unhealthy"
    rig.advance(0.5)
    assert rig.state == "running"
    return delay


# -- start-up ---------------------------------------------------------------


def test_a_running_controller_of_the_wanted_version_is_adopted_without_a_restart(make: Any, engine: FakeEngine) -> None:
    before = dict(engine.run("v1"))
    rig = make()
    assert rig.state == "running"
    assert rig.all(StartController) == [] and rig.all(StopController) == []
    assert engine.container == before
    assert rig.machine.container_id == before["container_id"]
    assert [n.data for n in rig.notices("controller_started")] == [{"version": "v1"}]


def test_the_boot_version_is_started_when_no_controller_runs(make: Any, engine: FakeEngine) -> None:
    rig = make()
    assert rig.state == "running"
    assert [s.version for s in rig.all(StartController)] == ["v1"]
    assert engine.container is not None and engine.container["version"] == "v1"


def test_a_controller_of_another_version_is_replaced_by_the_wanted_one(make: Any, engine: FakeEngine) -> None:
    engine.run("v2")
    rig = make()
    assert rig.state == "running" and engine.container["version"] == "v1"  # type: ignore[index]


def test_without_any_version_it_asks_thingsboard_and_reports_sw_state_failed(make: Any) -> None:
    rig = make(boot_version=None)
    assert rig.state == "awaiting_version"
    request = rig.all(RequestAttributes)[-1]
    assert request.shared_keys == ("sw_title", "sw_url", "sw_version") and request.timeout_s
    assert {"current_sw_title": "UNKNOWN", "current_sw_version": "UNKNOWN", "sw_state": "FAILED",
            "sw_error": NO_VERSION_ERROR} in rig.telemetry()
    rig.advance(600)
    assert len(rig.all(RequestAttributes)) == 2, "asked again after the retry period"
    rig.post("swap_requested", {"version": "v2"}, Source.SYSTEM)
    assert rig.state == "running" and rig.notices("swap_succeeded")[-1].data == {"version": "v2"}


def test_without_a_version_a_running_controller_is_adopted_with_its_own_version(make: Any, engine: FakeEngine) -> None:
    engine.run("v2")
    rig = make(boot_version=None)
    assert rig.state == "running" and rig.machine.version == "v2" and rig.all(StartController) == []


# -- exits, backoff ---------------------------------------------------------


def test_an_exit_is_reported_and_restarted_after_the_backoff(make: Any, engine: FakeEngine) -> None:
    rig = make()
    first = engine.container["container_id"]  # type: ignore[index]
    rig.exit(code=3)
    assert rig.state == "unhealthy"
    assert rig.notices("controller_exited")[-1].data == {"version": "v1", "reason": "container exited with code 3"}
    rig.advance(599)
    assert rig.state == "unhealthy" and len(rig.all(StartController)) == 1
    rig.advance(1)
    assert rig.state == "running" and engine.container["container_id"] != first  # type: ignore[index]


def test_repeated_crashes_back_off_by_the_factor_and_a_healthy_period_brings_it_back(make: Any) -> None:
    rig = make()
    delays = [crash_and_restart(rig) for _ in range(4)]
    assert delays == pytest.approx([600, 960, 1536, 2457.6])
    # Healthy now: one factor off for each backoff period it stays up.
    assert rig.machine.backoff_s == pytest.approx(3932.16)
    rig.advance(3932.17)
    assert rig.machine.backoff_s == pytest.approx(2457.6)
    rig.advance(2457.6 + 1536 + 960 + 1)
    assert rig.machine.backoff_s == pytest.approx(600)
    assert crash_and_restart(rig) == pytest.approx(600)


def test_the_backoff_is_capped(make: Any) -> None:
    rig = make(restart_backoff_s=10, restart_backoff_factor=10, restart_backoff_max_s=500)
    assert [crash_and_restart(rig) for _ in range(4)] == pytest.approx([10, 100, 500, 500])


def test_a_crash_soon_after_a_restart_keeps_the_grown_backoff(make: Any) -> None:
    rig = make()
    crash_and_restart(rig)
    rig.advance(100)  # up for less than a backoff period: no decay
    assert crash_and_restart(rig) == pytest.approx(960)


def test_the_exit_of_a_replaced_container_is_not_mistaken_for_a_crash(make: Any, engine: FakeEngine) -> None:
    rig = make()
    old = engine.container["container_id"]  # type: ignore[index]
    rig.post("restart_requested", {"reason": "rpc"}, Source.SYSTEM)
    assert rig.state == "running" and engine.container["container_id"] != old  # type: ignore[index]
    rig.post("container_exited", {"container_id": old, "exit_code": 143})
    assert rig.state == "running" and rig.notices("controller_exited") == []


def test_a_restart_by_the_engines_restart_policy_is_adopted(make: Any, engine: FakeEngine) -> None:
    rig = make()
    rig.exit()
    engine.container["running"] = True  # type: ignore[index]
    rig.post("container_started", {"container_id": engine.container["container_id"],  # type: ignore[index]
                                   "started_at_ms": rig.clock.now_ms()})
    assert rig.state == "running" and len(rig.all(StartController)) == 1


def test_a_periodic_check_notices_a_vanished_container(make: Any, engine: FakeEngine) -> None:
    rig = make()
    engine.container = None  # removed behind our back; its event was lost
    rig.advance(5)
    assert rig.state == "unhealthy" and "no longer running" in rig.notices("controller_exited")[-1].data["reason"]


def test_a_late_health_answer_about_a_replaced_container_is_ignored(make: Any, engine: FakeEngine) -> None:
    rig = make()
    old = engine.container["container_id"]  # type: ignore[index]
    rig.post("restart_requested", {"reason": "rpc"}, Source.SYSTEM)
    late = {"health_ts_ms": None, "running": False, "container_id": old, "asked_for": old}
    rig.dispatcher.post(Source.EFFECT, "health_succeeded", {"effect_id": "x", "result": late}, target="controller")
    rig.dispatcher.run_until_idle()
    assert rig.state == "running"


# -- health checks ----------------------------------------------------------


def test_telemetry_every_20_s_reports_time_since_startup_and_health_check(make: Any, engine: FakeEngine) -> None:
    rig = make()
    started = engine.container["started_at_ms"]  # type: ignore[index]
    engine.health_ts_ms = rig.clock.now_ms()
    rig.advance(5 + 20 * 3)
    samples = [t for t in rig.telemetry() if "ms_since_controller_startup" in t.get("values", {})]
    assert len(samples) == 4
    last = samples[-1]
    assert last["values"] == {"ms_since_controller_startup": last["ts"] - started,
                              "ms_since_last_controller_health_check": 65_000}


def test_fresh_health_checks_are_broadcast_once_each(make: Any, engine: FakeEngine) -> None:
    rig = make()
    rig.advance(5)
    assert rig.notices("controller_health_seen") == [], "no health check written yet"
    engine.health_ts_ms = rig.clock.now_ms()
    rig.advance(20 * 3)
    seen = rig.notices("controller_health_seen")
    assert [n.data for n in seen] == [{"version": "v1", "health_ts_ms": engine.health_ts_ms}]


def test_a_stale_health_check_stops_the_controller_and_restarts_it(make: Any, engine: FakeEngine) -> None:
    rig = make()
    first = engine.container["container_id"]  # type: ignore[index]
    engine.health_ts_ms = rig.clock.now_ms()
    rig.advance(6 * H - 30)
    assert rig.state == "running"
    rig.advance(60)
    assert rig.state == "unhealthy"
    assert "no health check for" in rig.notices("controller_exited")[-1].data["reason"]
    assert rig.all(StopController)[-1].container_id == first and engine.container["running"] is False  # type: ignore[index]
    rig.advance(600)
    assert rig.state == "running" and engine.container["container_id"] != first  # type: ignore[index]


def test_a_controller_that_never_writes_a_health_check_is_restarted_after_the_limit(make: Any) -> None:
    rig = make(health_check_max_age_s=60)
    rig.advance(55)
    assert rig.state == "running"
    rig.advance(20)
    assert rig.state == "unhealthy"


# -- requests ---------------------------------------------------------------


def test_a_restart_request_restarts_at_once_without_growing_the_backoff(make: Any, engine: FakeEngine) -> None:
    rig = make()
    rig.post("restart_requested", {"reason": "config file changed"}, Source.SYSTEM)
    assert rig.state == "running" and len(rig.all(StartController)) == 2
    assert rig.machine.backoff_s == 600 and rig.notices("controller_exited") == []


def test_a_swap_replaces_the_controller_and_answers_ota(make: Any, engine: FakeEngine) -> None:
    rig = make()
    rig.post("swap_requested", {"version": "v2"}, Source.SYSTEM)
    assert rig.state == "running" and engine.container["version"] == "v2"  # type: ignore[index]
    answer = rig.notices("swap_succeeded")[-1]
    assert answer.machine == "ota" and answer.data == {"version": "v2"}
    assert rig.notices("controller_started")[-1].data == {"version": "v2"}
    rig.exit()
    rig.advance(600)
    assert engine.container["version"] == "v2", "the swapped-in version is the one restarted"  # type: ignore[index]


def test_a_failed_swap_answers_ota_and_brings_the_old_version_back(make: Any, engine: FakeEngine) -> None:
    rig = make()
    rig.post("swap_requested", {"version": "v9"}, Source.SYSTEM)
    failed = rig.notices("swap_failed")[-1]
    assert failed.machine == "ota" and failed.data["version"] == "v9" and "not found" in failed.data["error"]
    assert rig.state == "unhealthy"
    rig.advance(600)
    assert rig.state == "running" and engine.container["version"] == "v1"  # type: ignore[index]


def test_a_restart_requested_during_a_swap_is_queued_and_done_after_it(make: Any, engine: FakeEngine) -> None:
    rig = make()
    rig.dispatcher.post(Source.SYSTEM, "swap_requested", {"version": "v2"})
    rig.dispatcher.post(Source.SYSTEM, "restart_requested", {"reason": "file changed"})
    rig.dispatcher.run_until_idle()
    assert [s.version for s in rig.all(StartController)] == ["v1", "v2", "v2"]
    assert rig.state == "running" and rig.machine.restart_queued is False


def test_a_second_swap_during_a_swap_runs_after_it_and_the_latest_wins(make: Any, engine: FakeEngine) -> None:
    engine.images.add("v3")
    rig = make()
    for version in ("v2", "v3", "v2", "v3"):
        rig.dispatcher.post(Source.SYSTEM, "swap_requested", {"version": version})
    rig.dispatcher.run_until_idle()
    assert [n.data["version"] for n in rig.notices("swap_succeeded")] == ["v2", "v3"]
    assert engine.container["version"] == "v3"  # type: ignore[index]


def test_a_swap_while_the_engine_is_unreachable_is_refused(make: Any, engine: FakeEngine) -> None:
    engine.up = False
    rig = make()
    rig.post("swap_requested", {"version": "v2"}, Source.SYSTEM)
    assert rig.state == "engine_unreachable"
    assert rig.notices("swap_failed")[-1].data == {"version": "v2", "error": f"{ENGINE_UNREACHABLE}: cannot swap now"}


def test_a_swap_without_a_version_is_refused(make: Any) -> None:
    rig = make()
    rig.post("swap_requested", {"version": ""}, Source.SYSTEM)
    assert rig.state == "running" and "without a version" in rig.notices("swap_failed")[-1].data["error"]


# -- the Docker engine ------------------------------------------------------


def test_an_unreachable_engine_is_reported_and_retried_until_it_answers(make: Any, engine: FakeEngine) -> None:
    engine.up = False
    rig = make()
    assert rig.state == "engine_unreachable"
    assert {"docker_engine_reachable": False} in [t.get("values") for t in rig.telemetry()]
    assert any("Docker engine unreachable" in log.message for log in rig.all(Log))
    rig.advance(30)  # retried after 10 s, then after 20 s more
    assert rig.state == "engine_unreachable" and len(rig.telemetry()) == 1, "reported once, retried quietly"
    assert rig.events.count("engine_retry_due") == 2
    engine.up = True
    rig.advance(39)
    assert rig.state == "engine_unreachable", "the third retry waits 40 s"
    rig.advance(1)
    assert rig.state == "running"
    assert {"docker_engine_reachable": True} in [t.get("values") for t in rig.telemetry()]


def test_an_engine_lost_while_running_is_reinspected_when_it_returns(make: Any, engine: FakeEngine) -> None:
    rig = make()
    engine.up = False
    engine.container["running"] = False  # type: ignore[index]  # dockerd stops its containers
    rig.post("docker_engine_lost", {"error": "connection reset"})
    assert rig.state == "engine_unreachable"
    rig.post("restart_requested", {"reason": "rpc"}, Source.SYSTEM)
    engine.up = True
    rig.post("docker_engine_returned")
    assert rig.state == "running"
    assert [s.version for s in rig.all(StartController)] == ["v1", "v1"], "started again; the queued restart not doubled"


def retry_delays(rig: Rig) -> list[float]:
    return [t.seconds for t in rig.all(StartTimer) if t.name == "engine_retry_due"]


def test_engine_retries_double_per_failure_up_to_the_cap(make: Any, engine: FakeEngine) -> None:
    engine.up = False
    rig = make()
    rig.advance(10 + 20 + 40 + 80 + 160 + 300 + 300)
    assert retry_delays(rig) == [10, 20, 40, 80, 160, 300, 300, 300]
    assert rig.events.count("engine_retry_due") == 7 and rig.state == "engine_unreachable"
    logs = [log.message for log in rig.all(Log) if "unreachable" in log.message]
    assert logs == [f"Docker engine unreachable ({ENGINE_UNREACHABLE}: connection refused); "
                    "retrying in 10 s, then backing off (doubling) to every 300 s"], "said once, and truthfully"


def test_the_engine_retry_cap_is_a_setting(make: Any, engine: FakeEngine) -> None:
    engine.up = False
    rig = make(engine_retry_max_s=30.0)
    rig.advance(10 + 20 + 30 + 30)
    assert retry_delays(rig) == [10, 20, 30, 30, 30]


def test_docker_engine_returned_resets_the_engine_retry(make: Any, engine: FakeEngine) -> None:
    engine.up = False
    rig = make()
    rig.advance(10 + 20)
    assert retry_delays(rig)[-1] == 40
    rig.post("docker_engine_returned")  # the event stream came back, the inspect still fails
    assert rig.state == "engine_unreachable" and retry_delays(rig)[-1] == 10
    engine.up = True
    rig.post("docker_engine_returned")
    assert rig.state == "running"
    engine.up = False
    rig.post("docker_engine_lost", {"error": "connection reset"})
    assert retry_delays(rig)[-1] == 10, "the next outage starts again at engine_retry_s"


def test_a_successful_inspect_resets_the_engine_retry(make: Any, engine: FakeEngine) -> None:
    engine.up = False
    rig = make()
    rig.advance(10 + 20 + 40)
    assert retry_delays(rig)[-1] == 80
    engine.up = True
    rig.advance(80)  # no docker_engine_returned: the machine's own retry finds the engine
    assert rig.state == "running"
    engine.up = False
    rig.post("docker_engine_lost", {"error": "connection reset"})
    assert retry_delays(rig)[-1] == 10
    rig.advance(10)
    assert retry_delays(rig)[-1] == 20


# -- the Docker engine: the retry backoff across restarts, its bounds --------


def test_a_gateway_restarted_during_an_engine_outage_continues_the_engine_backoff(
    make: Any, engine: FakeEngine
) -> None:
    engine.up = False
    first = make()
    first.advance(10 + 20 + 40)
    assert retry_delays(first)[-1] == 80
    first.close()
    second = make()
    assert second.state == "engine_unreachable"
    assert retry_delays(second) == [80], "the resumed machine continues from its checkpoint, not from 10 s"
    assert not [log for log in second.all(Log) if "unreachable" in log.message], "the outage was logged already"
    second.advance(80)
    assert retry_delays(second) == [80, 160]
    engine.up = True
    second.advance(160)
    assert second.state == "running"


def test_a_checkpoint_from_before_the_engine_backoff_resumes_at_engine_retry_s(
    engine: FakeEngine, journal_path: Path, rigs: list[Rig]
) -> None:
    from teg_fsm.engine.journal import Checkpoint

    engine.up = False
    journal = Journal(journal_path)
    data = {"version": "v1", "backoff_s": 600.0, "engine_down_since_ms": 0}  # no engine_retry_delay_s key
    journal.save_checkpoint(Checkpoint("controller", "engine_unreachable", data, 0), 0)
    journal.close()
    rig = Rig(engine, journal_path, engine_retry_max_s=60.0)
    rigs.append(rig)
    assert retry_delays(rig) == [10]


def test_a_lowered_engine_retry_cap_applies_to_a_resumed_backoff(
    engine: FakeEngine, journal_path: Path, rigs: list[Rig]
) -> None:
    from teg_fsm.engine.journal import Checkpoint

    engine.up = False
    journal = Journal(journal_path)
    data = {"version": "v1", "backoff_s": 600.0, "engine_down_since_ms": 0, "engine_retry_delay_s": 300.0}
    journal.save_checkpoint(Checkpoint("controller", "engine_unreachable", data, 0), 0)
    journal.close()
    rig = Rig(engine, journal_path, engine_retry_max_s=60.0)
    rigs.append(rig)
    assert retry_delays(rig) == [60]


class PureController:
    """The machine alone, for many quick runs: effects answered at once by an engine that is
    up or down, timers only remembered (``fire`` plays one), a restart through snapshot,
    the resume table and ``restore`` as the dispatcher does it."""

    def __init__(self, settings: dict[str, float], engine_up: bool, saved: tuple[str, Any] | None = None) -> None:
        state = ControllerMachine.resume_table[saved[0]] if saved else None
        self.machine = ControllerMachine({"boot_version": "v1", **settings}, start_value=state)
        self.engine_up = engine_up
        self.delays: list[float] = []
        self.seq = 0
        if saved:
            self.machine.restore(saved[1])
            self.send("resumed", {"from_state": saved[0]})
        self.send("gateway_started")

    def send(self, name: str, data: dict[str, Any] | None = None) -> None:
        pending = [(name, data or {})]
        while pending:
            self.seq += 1
            _, effects = self.machine.handle(Event(self.seq, self.seq, "test", *pending.pop(0)))
            self.delays += [e.seconds for e in effects if isinstance(e, StartTimer) and e.name == "engine_retry_due"]
            pending += [self._answer(e) for e in effects if e.reply is not None]

    def _answer(self, effect: Effect) -> tuple[str, dict[str, Any]]:
        if not self.engine_up:
            return f"{effect.reply}_failed", {"error": ENGINE_UNREACHABLE, "engine_unreachable": True}
        if isinstance(effect, StartController):
            return f"{effect.reply}_succeeded", {"result": {"container_id": "c1", "version": effect.version}}
        return f"{effect.reply}_succeeded", {"result": {"found": False, "running": False}}


_RETRY_OPS = st.one_of(
    st.tuples(st.just("engine_up"), st.booleans()),
    st.tuples(st.just("send"), st.sampled_from(["engine_retry_due", "docker_engine_returned", "docker_engine_lost"])),
    st.tuples(st.just("restart"), st.sampled_from([(20.0, 20.0), (10.0, 300.0), (10.0, 25.0), (0.5, 3600.0)])),
)


@settings(max_examples=int(os.environ.get("TEG_PROPERTY_EXAMPLES", "100")), deadline=None, database=None)
@given(ops=st.lists(_RETRY_OPS, max_size=40))
def test_the_engine_retry_delay_stays_within_its_settings(ops: list[tuple[str, Any]]) -> None:
    base, cap = 10.0, 300.0
    rig = PureController({}, engine_up=False)
    for op, arg in ops:
        if op == "engine_up":
            rig.engine_up = arg
        elif op == "send":
            rig.send(arg, {"error": "reset"} if arg == "docker_engine_lost" else {})
        else:  # a gateway restart, maybe with other settings (the checkpoint's delay is clamped to them)
            base, cap = arg
            saved = (rig.machine.state_name, json.loads(json.dumps(rig.machine.snapshot())))
            rig = PureController({"engine_retry_s": base, "engine_retry_max_s": cap}, rig.engine_up, saved)
        assert base <= rig.machine.engine_retry_delay_s <= cap
        assert all(base <= delay <= cap for delay in rig.delays)
        rig.delays.clear()


# -- crash and resume -------------------------------------------------------


def test_a_gateway_restart_adopts_the_controller_it_left_running(make: Any, engine: FakeEngine) -> None:
    first = make()
    container = dict(engine.container)  # type: ignore[arg-type]
    first.close()
    second = make()
    assert second.state == "running" and engine.container == container and second.all(StartController) == []


def test_a_gateway_restart_during_the_backoff_waits_only_the_rest(make: Any, engine: FakeEngine) -> None:
    first = make()
    first.exit()
    first.advance(400)
    first.close()
    second = make()
    assert second.state == "unhealthy"
    second.advance(199)
    assert second.state == "unhealthy"
    second.advance(1)
    assert second.state == "running"


def test_a_gateway_killed_mid_swap_redoes_the_swap_and_answers_ota(make: Any, engine: FakeEngine) -> None:
    first = make()
    engine.up = False  # the swap's start never completes in this process
    first.dispatcher.post(Source.SYSTEM, "swap_requested", {"version": "v2"})
    first.dispatcher.dispatch(first.dispatcher._queue.get_nowait())  # swapping; the start is in flight
    assert first.state == "swapping"
    first.close()
    engine.up = True
    second = make()
    assert second.state == "running" and engine.container["version"] == "v2"  # type: ignore[index]
    assert second.notices("swap_succeeded")[-1].data == {"version": "v2"}


def test_a_crash_loop_mid_swap_falls_back_to_unhealthy_and_fails_the_swap(
    engine: FakeEngine, journal_path: Path, rigs: list[Rig]
) -> None:
    journal = Journal(journal_path)
    from teg_fsm.engine.journal import Checkpoint

    data = {"version": "v1", "swap_version": "v2", "backoff_s": 600.0}
    journal.save_checkpoint(Checkpoint("controller", "swapping", data, ControllerMachine.max_resumes), 0)
    journal.close()
    rig = Rig(engine, journal_path)
    rigs.append(rig)
    assert rig.state == "unhealthy"
    assert rig.notices("swap_failed")[-1].data["version"] == "v2"
    rig.advance(600)
    assert rig.state == "running" and engine.container["version"] == "v1"  # type: ignore[index]


def test_every_state_resumes_through_the_table_and_has_an_entry() -> None:
    states = {s.id for s in ControllerMachine.states}
    assert set(ControllerMachine.resume_table) == states
    assert ControllerMachine.crash_loop_state in states


def test_health_age_before_any_health_check_is_now_minus_zero_like_the_existing_gateway(make: Any) -> None:
    rig = make()
    rig.advance(5)
    [sample] = [t for t in rig.telemetry() if "ms_since_controller_startup" in t.get("values", {})]
    assert sample["values"]["ms_since_last_controller_health_check"] == sample["ts"]


def test_a_missing_image_asks_ota_to_build_it_instead_of_retrying_with_backoff(make: Any, engine: FakeEngine) -> None:
    engine.images = {"v2"}
    rig = make()
    assert rig.state == "awaiting_image"
    asked = rig.notices("controller_image_missing")
    assert [(n.machine, n.data) for n in asked] == [("ota", {"version": "v1"})]
    assert rig.notices("controller_exited")[-1].data["reason"] == "image teg-controller-v1:latest not found"
    rig.advance(599)
    assert engine.ops.count("start v1") == 1, "no 'image not found' retry loop while OTA builds"
    engine.images.add("v1")  # OTA built it and answers with a swap
    rig.post("swap_requested", {"version": "v1"}, Source.SYSTEM)
    assert rig.state == "running" and engine.container["version"] == "v1"  # type: ignore[index]
    assert rig.notices("swap_succeeded")[-1].data == {"version": "v1"}
    rig.advance(3600)
    assert rig.state == "running" and engine.ops.count("start v1") == 2, "the retry timer was cancelled"


def test_while_awaiting_an_image_the_start_is_tried_again_and_ota_asked_again(make: Any, engine: FakeEngine) -> None:
    engine.images = set()
    rig = make()
    rig.advance(600)
    assert engine.ops.count("start v1") == 2 and len(rig.notices("controller_image_missing")) == 2
    engine.images.add("v1")  # built by hand meanwhile
    rig.advance(600)
    assert rig.state == "running" and engine.container["version"] == "v1"  # type: ignore[index]


def test_an_image_pruned_while_running_is_rebuilt_when_the_controller_restarts(make: Any, engine: FakeEngine) -> None:
    rig = make()
    assert rig.state == "running"
    engine.images.discard("v1")
    rig.exit()
    rig.advance(600)
    assert rig.state == "awaiting_image"
    assert rig.notices("controller_image_missing")[-1].data == {"version": "v1"}


def test_a_gateway_restarted_while_awaiting_an_image_asks_again(make: Any, engine: FakeEngine) -> None:
    engine.images = set()
    rig = make()
    rig.close()
    again = make()
    assert again.state == "awaiting_image" and len(again.notices("controller_image_missing")) == 1
