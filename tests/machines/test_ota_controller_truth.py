"""The real OTA and controller machines together, over a fake engine (pure, fake clock).

The invariant: ``sw_state`` UPDATED is sent only while a container from that
version's image runs and has written a health check since it started, within
the probation window; after any restart both machines re-derive what runs
before saying so. Scenario tests pin the first-start path (the known version
is fetched, checked out and built through OTA's pipeline when its image is
missing) and the false success found side by side with the existing gateway;
a hypothesis test drives both machines with random interleavings of
assignments, engine events, crashes and restarts and checks the invariant at
every report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.events import Source
from tests.machines.ota_engine_fakes import EngineWorld, TruthGateway

FIRST_START = ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]


def _world(**fields: Any) -> EngineWorld:
    return EngineWorld(FakeClock(), **fields)


def _untruthful(world: EngineWorld) -> list[dict[str, Any]]:
    return [r.payload for r in world.reports if r.payload["sw_state"] == "UPDATED" and not r.truth]


def test_first_start_with_only_the_default_version_builds_it_through_ota_and_starts_it(tmp_path: Path) -> None:
    world = _world(default_version="v1")
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    assert world.runs() == "v1" and world.builds == 1
    assert world.sw_states() == FIRST_START
    assert all(r.payload["current_sw_title"] == r.payload["current_sw_version"] == "v1" for r in world.reports)
    assert world.version_file == "v1"
    assert gateway.controller.state_name == "running" and gateway.ota.state_name == "committed"
    assert not _untruthful(world)


def test_first_start_from_the_version_file_builds_that_version(tmp_path: Path) -> None:
    world = _world(default_version="v1", version_file="v3", local_tags={"v1", "v3"})
    TruthGateway(world, tmp_path / "journal.db").advance(300)
    assert world.runs() == "v3" and world.sw_states() == FIRST_START


def test_a_repository_without_a_remote_builds_from_its_local_refs(tmp_path: Path) -> None:
    world = _world(has_remote=False, local_tags={"v1", "v2"})
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    assert world.runs() == "v1"
    gateway.assign("v2")
    gateway.advance(300)
    assert world.runs() == "v2" and world.sw_states()[-1] == "UPDATED"


def test_offline_first_start_builds_from_local_refs_and_a_missing_tag_waits_for_the_network(
    tmp_path: Path,
) -> None:
    world = _world(network_up=False, default_version="v1")
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    assert world.runs() == "v1"
    gateway.assign("v2")  # only on the remote
    gateway.advance(300)
    assert world.runs() == "v1" and world.sw_states()[-1] == "FAILED"
    assert "fetching the controller repository for v2 failed" in world.reports[-1].payload["sw_error"]
    world.network_up = True
    gateway.advance(700)  # the failed fetch is retried
    assert world.runs() == "v2" and world.sw_states()[-1] == "UPDATED"


def test_assigning_the_first_start_version_never_reports_updated_before_it_really_runs(tmp_path: Path) -> None:
    """The false success: first start, then OTA assigns that same version."""
    world = _world(default_version="v1", local_tags=set(), remote_tags={"v1"}, network_up=False)
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(30)
    assert world.runs() is None  # v1 is not in the local refs and the network is down
    gateway.assign("v1")
    gateway.advance(30)
    assert "UPDATED" not in world.sw_states()
    assert world.sw_states()[-1] == "FAILED"
    mark = len(gateway.moves)
    gateway.post("ota_retry_requested", source=Source.RPC)
    gateway.run(1)
    assert [(t.source, t.target) for t in gateway.moves[mark].transitions] == [("failed", "fetching")]
    gateway.advance(30)  # still offline: fails again, says nothing false
    assert "UPDATED" not in world.sw_states() and world.runs() is None
    world.network_up = True
    gateway.post("ota_retry_requested", source=Source.RPC)
    gateway.advance(300)
    assert world.runs() == "v1" and world.sw_states()[-1] == "UPDATED"
    assert not _untruthful(world)


def test_ota_retry_is_accepted_while_the_assigned_version_does_not_really_run(tmp_path: Path) -> None:
    world = _world(default_version="v1")
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    gateway.assign("v1")
    gateway.advance(30)
    world.silent.add("v1")
    gateway.post("container_exited", world.kill_container(), Source.DOCKER)
    gateway.run()
    assert gateway.ota.state_name in gateway.ota.rest_states
    gateway.post("ota_retry_requested", source=Source.RPC)
    gateway.run(1)
    assert [t.target for t in gateway.moves[-1].transitions if t.machine == "ota"] == ["fetching"]


def test_a_pruned_image_is_rebuilt_through_the_pipeline_when_the_controller_restarts(tmp_path: Path) -> None:
    world = _world(default_version="v1")
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    world.remove_image("v1")
    gateway.post("container_exited", world.kill_container(), Source.DOCKER)
    gateway.advance(400)  # restart backoff, then the start finds no image
    assert world.runs() == "v1" and world.builds == 2
    assert world.sw_states()[-5:] == FIRST_START
    assert not _untruthful(world)


def test_after_a_restart_nothing_is_updated_until_the_controller_proves_it(tmp_path: Path) -> None:
    world = _world(default_version="v1")
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.assign("v1")
    gateway.advance(300)
    gateway.kill()
    world.silent.add("v1")  # hangs while no gateway runs: its health check goes stale
    world.clock.set_elapsed(world.clock.monotonic() + 3600)
    restarted = TruthGateway(world, tmp_path / "journal.db")
    restarted.reconnect("v1")
    restarted.advance(100)
    assert not _untruthful(world)
    assert world.sw_states()[-1] == "UPDATED"  # the report from before the restart, not a new one
    assert len(world.reports) == len(FIRST_START)


def test_a_version_thingsboard_would_turn_into_a_number_is_refused_and_the_controller_kept(
    tmp_path: Path,
) -> None:
    world = _world(default_version="v1")
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    for version in ("1.10", "2", "007"):
        gateway.assign(version)
        gateway.advance(60)
        assert world.sw_states()[-1] == "FAILED"
        assert "ThingsBoard would store it as a number" in world.reports[-1].payload["sw_error"]
        assert f"v{version}" in world.reports[-1].payload["sw_error"]
        assert world.runs() == "v1"


def test_a_numeric_version_left_by_the_existing_gateway_is_still_rebuilt_but_not_assignable(
    tmp_path: Path,
) -> None:
    world = _world(version_file="1.10", local_tags={"1.10"}, remote_tags={"1.10"})
    gateway = TruthGateway(world, tmp_path / "journal.db")
    gateway.advance(300)
    assert world.runs() == "1.10" and world.sw_states() == FIRST_START
    gateway.assign("1.10")
    gateway.advance(60)
    assert world.sw_states()[-1] == "FAILED" and "use a tag with a letter, e.g. v1.10" in (
        world.reports[-1].payload["sw_error"])
    assert world.runs() == "1.10" and world.builds == 1


# -- random interleavings ----------------------------------------------------------

VERSIONS = ("v1", "v2", "v3", "v4", "1.10")
Op = tuple[str, Any]
OPS = st.one_of(
    st.tuples(st.just("assign"), st.sampled_from(VERSIONS)),
    st.tuples(st.just("unassign"), st.none()),
    st.tuples(st.just("reconnect"), st.none()),
    st.tuples(st.just("exit"), st.none()),
    st.tuples(st.just("prune"), st.sampled_from(VERSIONS[:4])),
    st.tuples(st.just("hang"), st.sampled_from(VERSIONS[:4])),
    st.tuples(st.just("heal"), st.sampled_from(VERSIONS[:4])),
    st.tuples(st.just("network"), st.booleans()),
    st.tuples(st.just("crash"), st.integers(min_value=0, max_value=6)),
    st.tuples(st.just("retry"), st.none()),
    st.tuples(st.just("rollback"), st.none()),
    st.tuples(st.just("wait"), st.sampled_from((1, 5, 20, 61, 301, 700))),
)


class Driver:
    """Applies ops to a world and its current gateway process, checking the retry rule."""

    def __init__(self, world: EngineWorld, journal: Path) -> None:
        self.world, self.journal = world, journal
        self.gateway = TruthGateway(world, journal)
        self.assigned: str | None = None

    def apply(self, op: Op) -> None:
        kind, arg = op
        gateway, world = self.gateway, self.world
        if kind == "crash":
            gateway.run(arg)  # dies with events still queued
            gateway.kill()
            self.gateway = TruthGateway(world, self.journal)
            return
        gateway.run()  # engine events happen between the gateway's steps
        if kind == "assign":
            self.assigned = arg
            gateway.assign(arg)
        elif kind == "unassign":
            self.assigned = None
            gateway.unassign()
        elif kind == "reconnect":
            gateway.reconnect(self.assigned)
        elif kind == "exit":
            died = world.kill_container()
            if died is not None:
                gateway.post("container_exited", died, Source.DOCKER)
        elif kind == "prune":
            world.remove_image(arg)
        elif kind == "hang":
            world.write_health()
            world.silent.add(arg)
        elif kind == "heal":
            world.silent.discard(arg)
        elif kind == "network":
            world.network_up = arg
        elif kind == "retry":
            self.retry()
        elif kind == "rollback":
            gateway.post("ota_rollback_requested", source=Source.RPC)
        gateway.advance(arg if kind == "wait" else 0.5)

    def retry(self) -> None:
        """ota_retry is accepted at rest whenever the assigned version does not really run."""
        gateway = self.gateway
        gateway.run()
        ota = gateway.ota
        resting = ota.state_name in ota.rest_states
        # Checked when OTA knows the assignment (a crash can lose a queued one) and it is installable.
        known = self.assigned in VERSIONS[:4] and ota.data.desired == self.assigned
        mark = len(gateway.moves)
        gateway.post("ota_retry_requested", source=Source.RPC)
        gateway.run(1)
        moved = [t for d in gateway.moves[mark:] for t in d.transitions if t.machine == "ota"]
        if resting and known and not self.world.verified(self.assigned):
            runs = self.world.runs()
            assert moved, f"ota_retry refused in {ota.state_name} while {runs} runs, {ota.data.desired} assigned"


@settings(max_examples=int(os.environ.get("TEG_PROPERTY_EXAMPLES", "100")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, max_size=30), silent_at_start=st.sets(st.sampled_from(VERSIONS[:4]), max_size=2))
def test_updated_is_reported_only_for_a_running_healthy_controller_whatever_happens(
    tmp_path_factory: Any, ops: list[Op], silent_at_start: set[str]
) -> None:
    journal = tmp_path_factory.mktemp("truth") / "journal.db"
    world = _world(default_version="v1", local_tags={"v1"}, remote_tags={"v1", "v2", "v3"},
                   silent=set(silent_at_start))
    driver = Driver(world, journal)
    try:
        for op in ops:
            driver.apply(op)
            assert not _untruthful(world), f"after {op}: UPDATED sent while {world.runs()} runs"
        # Then the world heals: the network is up and every controller is healthy. An
        # operator's retry must bring the assigned version (when it exists) into service.
        world.network_up, world.silent = True, set()
        driver.apply(("wait", 700))
        driver.apply(("retry", None))
        driver.apply(("wait", 700))
        assert not _untruthful(world)
        if driver.assigned in world.remote_tags:
            assert world.runs() == driver.assigned
            assert world.sw_states()[-1] == "UPDATED"
    finally:
        driver.gateway.kill()
