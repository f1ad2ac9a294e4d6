"""OTA machine behaviour beyond the fault table: outcomes, versions, concurrency,
operator requests, scenario reports (snapshotted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.events import Event, Outcome
from teg_fsm.machines.ota import OtaMachine, version_error
from tests.machines.ota_fakes import FakeGateway, FakeWorld

# state -> reply prefix of the effect it starts; every outcome must leave the state.
EFFECT_STATES = {"fetching": "fetch", "checking_out": "checkout", "building": "build", "committing": "record"}
# Swaps are Notify hand-overs, not effects: succeeded/failed come back from the
# controller, the swap deadline timer stands in for timed_out, and nothing can
# cancel them (no outcome named *_cancelled exists for a swap).
SWAP_STATES = {"swapping": ("swap_succeeded", "swap_failed", "swap_deadline_elapsed"),
               "rolling_back": ("swap_succeeded", "swap_failed", "swap_deadline_elapsed"),
               "probation": ("controller_exited", "health_deadline_elapsed", "probation_elapsed")}


def _leaving(state: str) -> set[str]:
    """Events that leave ``state``: its own transitions and those of its phase (compound state)."""
    found = set()
    nested = OtaMachine.states_map[state]
    for holder in (nested, *nested.ancestors()):
        for transition in holder.transitions:
            if transition.target is not transition.source:
                found.update(transition.event.split())
    return found


@pytest.mark.parametrize("state,reply", sorted(EFFECT_STATES.items()))
def test_every_effect_state_leaves_on_each_outcome(state: str, reply: str) -> None:
    expected = {f"{reply}_{o.value}" for o in Outcome}
    assert expected <= _leaving(state)


@pytest.mark.parametrize("state,events", sorted(SWAP_STATES.items()))
def test_swap_and_probation_states_leave_on_success_failure_and_deadline(state: str, events: tuple[str, ...]) -> None:
    assert set(events) <= _leaving(state)


def test_resume_table_covers_every_state_and_crash_loop_lands_at_rest() -> None:
    assert set(OtaMachine.resume_table) == {s.id for s in OtaMachine.states_map.values() if s.is_atomic}
    assert OtaMachine.crash_loop_state in OtaMachine.rest_states


@pytest.mark.parametrize("version", ["v1.2.3", "release-7", "v1.0.0-rc.1", "a" * 40, "0123456789abcdef" * 2 + "01234567"])
def test_tags_and_full_commit_hashes_are_accepted(version: str) -> None:
    assert version_error(version) is None


@pytest.mark.parametrize("version", ["", "v 1", "v1;rm -rf /", "$(reboot)", "../v1", "v1..2", "V1.0", "-v1",
                                     "v1.lock", "a" * 129, 12, None, "v1\n"])
def test_versions_with_spaces_shell_characters_or_dots_are_refused(version: object) -> None:
    assert "refused version" in (version_error(version) or "")


def _gateway(tmp_path: Path, world: FakeWorld | None = None, **settings: object) -> FakeGateway:
    return FakeGateway(world or FakeWorld(), tmp_path / "journal.db", FakeClock(), dict(settings))


def test_refused_version_reports_failed_before_any_git_or_docker_call(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    gateway.assign("v1; reboot", push=True)
    gateway.settle()
    assert gateway.world.sw_states() == ["FAILED"]
    assert "refused version 'v1; reboot'" in gateway.world.reports[-1]["sw_error"]
    assert gateway.world.running == "v1" and gateway.world.builds == 0
    assert gateway.ota.state_name == "idle"


def test_e2e_scenario_reports(tmp_path: Path, snapshot) -> None:
    """v2 healthy, v3 exits at start (rollback), v9 missing, v4 healthy: the e2e story, pure."""
    world = FakeWorld(tags={"v1", "v2", "v3", "v4"}, behaviour={"v3": "exits"})
    gateway = _gateway(tmp_path, world)
    story = []
    for version in ("v2", "v3", "v9", "v4"):
        gateway.assign(version, push=True)
        gateway.settle()
        story.append((version, world.running, world.reports[-1]["sw_state"]))
    assert story == [("v2", "v2", "UPDATED"), ("v3", "v2", "FAILED"), ("v9", "v2", "FAILED"),
                     ("v4", "v4", "UPDATED")]
    assert world.reports == snapshot


def test_cached_image_is_not_rebuilt(tmp_path: Path) -> None:
    world = FakeWorld(images={"teg-controller-v1:latest", "teg-controller-v2:latest"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2")
    gateway.settle()
    assert world.running == "v2" and world.builds == 0


def test_rolled_back_release_is_not_retried_on_reconnect_until_operator_retries(tmp_path: Path) -> None:
    world = FakeWorld(behaviour={"v2": "exits"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2")
    gateway.settle()
    assert world.running == "v1"
    starts = len(world.reports)
    gateway.assign("v2")  # a reconnect answers with the same assignment
    gateway.settle()
    assert world.sw_states()[starts:] == ["FAILED"]  # the last report, repeated for ThingsBoard
    world.behaviour.clear()
    gateway.post("ota_retry_requested")
    gateway.settle()
    assert world.running == "v2" and world.sw_states()[-1] == "UPDATED"


def test_rolled_back_release_is_tried_again_after_the_assignment_changes(tmp_path: Path) -> None:
    world = FakeWorld(behaviour={"v2": "exits"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True)
    gateway.settle()
    gateway.assign("v3", push=True)
    gateway.settle()
    assert world.running == "v3"
    world.behaviour.clear()
    gateway.assign("v2", push=True)
    gateway.settle()
    assert world.running == "v2"


def test_failed_fetch_is_retried_after_the_retry_delay(tmp_path: Path) -> None:
    world = FakeWorld()
    world.faults["FetchControllerRepo"] = (Outcome.FAILED, "could not resolve host")
    gateway = _gateway(tmp_path, world, fetch_retry_s=600.0)
    gateway.assign("v2")
    gateway.settle(300)
    assert world.running == "v1" and world.sw_states()[-1] == "FAILED"
    gateway.settle(600)
    assert world.running == "v2" and world.sw_states()[-1] == "UPDATED"


def test_assignment_mid_build_wins_once_the_build_finishes(tmp_path: Path) -> None:
    world = FakeWorld(held={"BuildControllerImage"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True)
    assert gateway.run_until_state("building")
    gateway.assign("v3", push=True)  # arrives while the v2 build runs
    gateway.settle()
    assert gateway.ota.state_name == "building" and world.builds == 0  # no second build meanwhile
    gateway.release()
    gateway.settle()
    assert world.running == "v3"
    assert "teg-controller-v2:latest" in world.images  # the v2 build ran to its end, alone
    assert world.sw_states().count("UPDATED") == 1


def test_assignment_during_probation_installs_after_commit(tmp_path: Path) -> None:
    world = FakeWorld()
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True)
    assert gateway.run_until_state("probation")
    gateway.assign("v3", push=True)
    gateway.settle()
    assert world.running == "v3" and world.version_file == "v3"
    assert world.sw_states().count("UPDATED") == 2


def test_reassigning_the_running_version_mid_update_stops_after_the_step(tmp_path: Path) -> None:
    world = FakeWorld(held={"CheckoutControllerVersion"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True)
    assert gateway.run_until_state("checking_out")
    gateway.assign("v1", push=True)
    gateway.release()
    gateway.settle()
    assert world.running == "v1" and world.builds == 0
    assert world.sw_states()[-1] == "UPDATED"


def test_operator_rollback_during_probation_restores_last_good(tmp_path: Path) -> None:
    world = FakeWorld()
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2")
    assert gateway.run_until_state("probation")
    gateway.post("ota_rollback_requested")
    gateway.settle()
    assert world.running == "v1"
    assert world.reports[-1]["sw_error"] == "rolled back to v1: operator asked for a rollback"


def test_operator_rollback_before_swap_cancels_and_keeps_old_controller(tmp_path: Path) -> None:
    world = FakeWorld(held={"BuildControllerImage"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2")
    assert gateway.run_until_state("building")
    gateway.post("ota_rollback_requested")
    gateway.release()
    gateway.settle()
    assert world.running == "v1"
    assert world.reports[-1]["sw_error"] == "update to v2 cancelled by operator; v1 still running"


def test_stale_health_check_from_before_the_swap_does_not_pass_probation(tmp_path: Path) -> None:
    world = FakeWorld(behaviour={"v2": "silent"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2")
    assert gateway.run_until_state("probation")
    gateway.post("controller_health_seen", {"version": "v2", "health_ts_ms": 1})
    gateway.settle()
    assert world.running == "v1"


def test_legacy_sf_version_attribute_triggers_an_update(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    gateway.post("shared_attributes_updated", {"values": {"sf_version": "v2"}, "deleted": []})
    gateway.settle()
    assert gateway.world.running == "v2"


def test_without_a_last_good_version_a_failed_probation_reports_it(tmp_path: Path) -> None:
    world = FakeWorld(running=None, version_file=None, behaviour={"v2": "exits"})
    gateway = _gateway(tmp_path, world, last_good=None)
    gateway.assign("v2")
    gateway.settle()
    assert world.reports[-1]["sw_state"] == "FAILED"
    assert "no last good version to roll back to" in world.reports[-1]["sw_error"]


def _resumed(crash_loop: bool = False, from_state: str = "failed") -> Event:
    return Event(1, 1_700_000_000_000, "system", "resumed", {"crash_loop": crash_loop, "from_state": from_state})


def test_an_old_checkpoint_that_stored_failed_after_a_rollback_resumes_in_rolled_back() -> None:
    """Before ``rolled_back`` existed a rollback rested in ``failed``; such a checkpoint must still resume."""
    said = {"current_sw_title": "v1", "current_sw_version": "v1", "sw_state": "FAILED",
            "sw_error": "rolled back to v1: probation of v2 failed: exited"}
    machine = OtaMachine({"last_good": "v1"}, start_value="failed")
    machine.restore({"desired": "v2", "target": "v2", "running": "v1", "last_good": "v1", "blocked": "v2",
                     "reason": said["sw_error"], "last_report": said})
    machine.ready = True
    moved, effects = machine.handle(_resumed())
    assert moved == [("failed", "rolled_back", "resumed")]
    assert effects == []  # ThingsBoard already heard this FAILED; nothing new to say
    assert machine.state_name == "rolled_back" and machine.data.blocked == "v2"
    moved, _ = machine.handle(Event(2, 1_700_000_001_000, "rpc", "ota_retry_requested", {}))
    assert moved == [("rolled_back", "fetching", "ota_retry_requested")]


def test_an_old_checkpoint_of_a_plain_failure_stays_failed() -> None:
    machine = OtaMachine({"last_good": "v1"}, start_value="failed")
    machine.restore({"desired": "v2", "target": "v2", "running": "v1", "last_good": "v1", "blocked": "v2",
                     "reason": "checking out v2 failed: no such tag"})
    machine.ready = True
    moved, _ = machine.handle(_resumed())
    assert [(s, t) for s, t, _ in moved if s != t] == [] and machine.state_name == "failed"
