"""The OTA fault table (Mender's state tests): for every OTA state, its effect
fails, or the gateway process dies right there. Each case asserts only what the
outside sees: the controller version that ends up running, and the sw_state
reports ThingsBoard received (snapshotted)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.events import Outcome
from tests.machines.ota_engine_fakes import EngineWorld, TruthGateway
from tests.machines.ota_fakes import FakeGateway, FakeWorld

ROLLED_BACK = ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "FAILED"]
UPDATED = ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]


@attrs.frozen
class Case:
    state: str
    running: str | None  # the controller version running at the end
    states: list[str]  # sw_state reports, in order
    error: str = ""  # a fragment of the last report's sw_error
    faults: dict[str, Outcome] = attrs.field(factory=dict)
    behaviour: dict[str, str] = attrs.field(factory=dict)


FAIL_CASES = {
    "fetching": Case("fetching", "v1", ["DOWNLOADING", "FAILED"], "fetching the controller repository",
                     faults={"FetchControllerRepo": Outcome.FAILED}),
    "fetching-timed-out": Case("fetching", "v1", ["DOWNLOADING", "FAILED"], "timed out",
                               faults={"FetchControllerRepo": Outcome.TIMED_OUT}),
    "checking_out": Case("checking_out", "v1", ["DOWNLOADING", "FAILED"], "checking out v2 failed",
                         faults={"CheckoutControllerVersion": Outcome.FAILED}),
    "checking_out-cancelled": Case("checking_out", "v1", ["DOWNLOADING", "FAILED"], "cancelled",
                                   faults={"CheckoutControllerVersion": Outcome.CANCELLED}),
    "building": Case("building", "v1", ["DOWNLOADING", "DOWNLOADED", "FAILED"], "building the image of v2",
                     faults={"BuildControllerImage": Outcome.FAILED}),
    "building-timed-out": Case("building", "v1", ["DOWNLOADING", "DOWNLOADED", "FAILED"], "timed out",
                               faults={"BuildControllerImage": Outcome.TIMED_OUT}),
    "swapping": Case("swapping", "v1", ROLLED_BACK, "rolled back to v1: starting v2 failed",
                     behaviour={"v2": "no_start"}),
    "probation-exits": Case("probation", "v1", ROLLED_BACK, "rolled back to v1: probation of v2 failed",
                            behaviour={"v2": "exits"}),
    "probation-silent": Case("probation", "v1", ROLLED_BACK, "rolled back to v1: v2 wrote no health check",
                             behaviour={"v2": "silent"}),
    "committing": Case("committing", "v2", UPDATED, "could not be written",
                       faults={"WriteControllerVersion": Outcome.FAILED}),
    "rolling_back": Case("rolling_back", None, ROLLED_BACK, "rolling back to v1 failed",
                         behaviour={"v2": "exits", "v1": "no_start"}),
}

# Dying in a state: the gateway restarts from its journal and finishes on its own.
DIE_CASES = {
    "idle": Case("idle", "v1", []),
    "fetching": Case("fetching", "v2", UPDATED),
    "checking_out": Case("checking_out", "v2", UPDATED),
    "building": Case("building", "v2", UPDATED),
    "swapping": Case("swapping", "v2", UPDATED),
    "probation": Case("probation", "v2", UPDATED),
    "committing": Case("committing", "v2", UPDATED),
    "committed": Case("committed", "v2", UPDATED),
    "rolling_back": Case("rolling_back", "v1", ROLLED_BACK, "rolled back to v1", behaviour={"v2": "exits"}),
    "failed": Case("failed", "v1", ["DOWNLOADING", "FAILED"], "checking out v9 failed"),
}


def _world(case: Case) -> FakeWorld:
    world = FakeWorld(behaviour=dict(case.behaviour))
    # The same texts the effect runner uses for time-outs and cancels.
    texts = {Outcome.FAILED: "injected failure", Outcome.TIMED_OUT: "timed out after 30 s",
             Outcome.CANCELLED: "cancelled"}
    world.faults.update({name: (outcome, texts[outcome]) for name, outcome in case.faults.items()})
    return world


@pytest.mark.parametrize("name", sorted(FAIL_CASES))
def test_effect_failing_in_each_state_ends_with_old_or_last_good_running(
    name: str, tmp_path: Path, snapshot
) -> None:
    case = FAIL_CASES[name]
    world = _world(case)
    gateway = FakeGateway(world, tmp_path / "journal.db", FakeClock())
    gateway.assign("v2")
    assert gateway.run_until_state(case.state), f"never reached {case.state}"
    gateway.settle(300)  # shorter than fetch_retry_s: a failed fetch is retried later (tested apart)
    assert world.running == case.running
    assert world.sw_states() == case.states
    assert case.error in world.reports[-1].get("sw_error", "")
    assert world.reports == snapshot
    gateway.kill()


@pytest.mark.parametrize("name", sorted(DIE_CASES))
def test_gateway_dying_in_each_state_resumes_to_new_or_last_good(name: str, tmp_path: Path, snapshot) -> None:
    case = DIE_CASES[name]
    world, clock = _world(case), FakeClock()
    journal = tmp_path / "journal.db"
    gateway = FakeGateway(world, journal, clock)
    if case.state != "idle":
        gateway.assign("v9" if case.state == "failed" else "v2")
        assert gateway.run_until_state(case.state), f"never reached {case.state}"
    gateway.kill()
    restarted = FakeGateway(world, journal, clock)
    restarted.settle()
    assert restarted.ota.state_name in restarted.ota.rest_states
    assert world.running == case.running
    assert world.sw_states() == case.states
    assert case.error in (world.reports[-1].get("sw_error", "") if world.reports else "")
    if case.running == "v2":
        assert world.version_file == "v2"
    assert world.reports == snapshot
    restarted.kill()


@pytest.mark.parametrize("state,running,error", [
    ("building", "v1", "gave up on v2: the gateway restarted repeatedly while building"),
    ("swapping", "v1", "rolled back to v1: the gateway restarted repeatedly during swapping of v2"),
    ("probation", "v1", "rolled back to v1: the gateway restarted repeatedly during probation of v2"),
])
def test_crash_loop_in_a_state_gives_up_and_leaves_last_good_running(
    state: str, running: str, error: str, tmp_path: Path
) -> None:
    world, clock, journal = FakeWorld(), FakeClock(), tmp_path / "journal.db"
    gateway = FakeGateway(world, journal, clock)
    gateway.assign("v2")
    for _ in range(1 + OTA_MAX_RESUMES):
        assert gateway.run_until_state(state), f"never reached {state}"
        gateway.kill()
        gateway = FakeGateway(world, journal, clock)
    gateway.settle()
    assert world.running == running
    assert world.reports[-1]["sw_state"] == "FAILED"
    assert error in world.reports[-1]["sw_error"]
    gateway.kill()


OTA_MAX_RESUMES = 3


# -- the first-start path -------------------------------------------------------
# No image of the known version (TEG_DEFAULT_CONTROLLER_VERSION here) exists: the
# controller machine asks OTA, whose pipeline fetches, checks out, builds and swaps
# it in. Driven with the real controller machine over a fake engine. Nothing
# older exists to roll back to: a failure leaves the controller machine trying
# the version itself, and UPDATED follows only once it really runs healthy.

FIRST_START = ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]
FIRST_FAIL_CASES = {
    # the fetch result is ignored, as the existing gateway does: v1 is in the local refs
    "fetching": Case("fetching", "v1", FIRST_START, faults={"FetchControllerRepo": Outcome.FAILED}),
    "checking_out": Case("checking_out", None, ["DOWNLOADING", "FAILED"], "checking out v1 failed",
                         faults={"CheckoutControllerVersion": Outcome.FAILED}),
    "building": Case("building", None, ["DOWNLOADING", "DOWNLOADED", "FAILED"], "building the image of v1 failed",
                     faults={"BuildControllerImage": Outcome.FAILED}),
    # the controller machine restarts it after its backoff; then it runs and is healthy
    "swapping": Case("swapping", "v1", [*FIRST_START[:4], "FAILED", "UPDATED"],
                     faults={"StartController": Outcome.FAILED}),
    "probation": Case("probation", "v1", [*FIRST_START[:4], "FAILED"], "v1 wrote no health check",
                      behaviour={"v1": "silent"}),
    "committing": Case("committing", "v1", FIRST_START, "could not be written",
                       faults={"WriteControllerVersion": Outcome.FAILED}),
}
FIRST_DIE_STATES = ("fetching", "checking_out", "building", "swapping", "probation", "committing", "committed")


def _first_start_world(case: Case | None = None) -> EngineWorld:
    world = EngineWorld(FakeClock(), default_version="v1")
    if case is not None:
        world.silent = {v for v, b in case.behaviour.items() if b == "silent"}
    return world


def _inject(world: EngineWorld, case: Case) -> None:
    world.faults.update({name: (outcome, "injected failure") for name, outcome in case.faults.items()})


@pytest.mark.parametrize("name", sorted(FIRST_FAIL_CASES))
def test_first_start_effect_failing_in_each_state_reports_it_and_never_a_false_updated(
    name: str, tmp_path: Path
) -> None:
    case = FIRST_FAIL_CASES[name]
    world = _first_start_world(case)
    gateway = TruthGateway(world, tmp_path / "journal.db")
    assert gateway.run_until("controller", "awaiting_image")  # its start found no image
    _inject(world, case)  # the faults hit OTA's pipeline, not that first start
    assert gateway.run_until("ota", case.state), f"never reached {case.state}"
    gateway.advance(300)
    assert world.runs() == case.running
    assert world.sw_states() == case.states
    errors = [r.payload["sw_error"] for r in world.reports if r.payload.get("sw_error")]
    assert case.error in (errors[-1] if errors else "")
    assert all(r.truth for r in world.reports if r.payload["sw_state"] == "UPDATED")
    gateway.kill()


@pytest.mark.parametrize("state", FIRST_DIE_STATES)
def test_gateway_dying_in_each_first_start_state_resumes_and_brings_the_version_up(
    state: str, tmp_path: Path
) -> None:
    world, journal = _first_start_world(), tmp_path / "journal.db"
    gateway = TruthGateway(world, journal)
    assert gateway.run_until("ota", state), f"never reached {state}"
    gateway.kill()
    restarted = TruthGateway(world, journal)
    restarted.advance(600)
    assert restarted.ota.state_name in restarted.ota.rest_states
    assert world.runs() == "v1" and world.version_file == "v1"
    assert world.sw_states()[-1] == "UPDATED"
    assert all(r.truth for r in world.reports if r.payload["sw_state"] == "UPDATED")
    restarted.kill()


@pytest.mark.parametrize("name", sorted(FAIL_CASES))
def test_the_machine_rests_in_rolled_back_only_after_a_rollback(name: str, tmp_path: Path) -> None:
    case = FAIL_CASES[name]
    gateway = FakeGateway(_world(case), tmp_path / "journal.db", FakeClock())
    gateway.assign("v2")
    assert gateway.run_until_state(case.state), f"never reached {case.state}"
    gateway.settle(300)
    rolled_back = case.error.startswith("rolled back to")
    expected = "committed" if case.states == UPDATED else "rolled_back" if rolled_back else "failed"
    assert gateway.ota.state_name == expected
    if rolled_back:
        assert gateway.ota.data.blocked == "v2" and gateway.ota.data.reason.startswith("rolled back to v1: ")
    gateway.kill()
