"""OTA of the controller: fetch, check out, build, swap, probation, commit or roll back.

What it is for: ThingsBoard assigns a controller version (shared attribute
``sw_version``, legacy ``sf_version``): a git tag or a 40-hex commit of the
controller repository. This machine brings that version into service, or
leaves the device on its last good version, and reports each step as ``sw_state``.

Events it takes: ``shared_attributes_updated`` {values, deleted} (push) and
``shared_attributes_received`` {shared} (after every connect), the outcomes of
its effects (``fetch_*``, ``checkout_*``, ``build_*``, ``record_*``), the
controller machine's ``swap_succeeded`` / ``swap_failed`` and broadcasts
``controller_started`` / ``controller_exited`` / ``controller_health_seen``,
its timers, ``ota_retry_requested`` / ``ota_rollback_requested`` (RPC) and
``resumed``.

Effects it emits: FetchControllerRepo, CheckoutControllerVersion,
BuildControllerImage, WriteControllerVersion, PruneControllerImages, Publish
of ``sw_state`` telemetry, Notify ``swap_requested`` to the controller, timers.

Persisted: desired/target/running/last good versions, the blocked (rolled
back) version, the failure reason, probation progress and the last report.
Resume: every step's work is idempotent, so each busy state re-enters itself
and re-issues it (a swap is re-requested, probation restarts its window).
A crash loop lands in ``failed``: before the swap that gives up on the target
(the old controller never stopped); in swap or probation it rolls back.

Concurrency: one step runs at a time. An assignment arriving mid-update is
recorded; when the running step ends, a newer target restarts the pipeline
from ``fetching`` (via ``idle``) and the latest assignment wins.

This module is the table: states, transitions, data and guards. The actions
it names are in machines/ota_actions.py, the effects and payloads in
machines/ota_support.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

from statemachine import State
from statemachine.transition_list import TransitionList

from machines.base import GatewayMachine
from machines.ota_actions import OtaActions

# OtaSettings and version_error are re-exported: the OTA component and tests import them from here.
from machines.ota_support import OtaSettings, assigned, next_target, version_error
from teg_fsm.events import Event

__all__ = ["OtaMachine", "OtaSettings", "version_error"]

_PERSISTED = (
    "desired", "desired_title", "target", "target_title", "running", "running_title", "last_good",
    "blocked", "reason", "transient", "health_seen", "window_over", "swap_started_ms",
    "rollback_asked", "last_report",
)
_LIVE = ("swapping", "probation")


def _assignment_transitions(fetching: State, rest: tuple[State, ...], busy: tuple[State, ...]) -> TransitionList:
    """From a rest state an assignment may start the pipeline; anywhere else it is only recorded."""
    transitions = TransitionList()
    for state in rest:
        transitions = transitions | state.to(fetching, cond="assignment_starts")
    for state in (*rest, *busy):
        transitions = transitions | state.to.itself(internal=True)
    return transitions


class OtaMachine(OtaActions, GatewayMachine):
    """Installs the assigned controller version; rolls back to the last good one."""

    machine_name = "ota"
    settings_type = OtaSettings
    resume_table: ClassVar[dict[str, str]] = {
        "idle": "idle", "fetching": "fetching", "checking_out": "checking_out", "building": "building",
        "swapping": "swapping", "probation": "probation", "committing": "committing",
        "committed": "committed", "rolling_back": "rolling_back", "failed": "failed",
    }
    rest_states = frozenset({"idle", "committed", "failed"})
    crash_loop_state = "failed"
    max_resumes = 3

    idle = State(initial=True)
    fetching = State()
    checking_out = State()
    building = State()
    swapping = State()
    probation = State()
    committing = State()
    committed = State()
    rolling_back = State()
    failed = State()

    # Assignments: start from a rest state; otherwise just recorded (see _note_assignment).
    shared_attributes_updated = _assignment_transitions(
        fetching, rest=(idle, committed, failed),
        busy=(fetching, checking_out, building, swapping, probation, committing, rolling_back),
    )
    shared_attributes_received = _assignment_transitions(
        fetching, rest=(idle, committed, failed),
        busy=(fetching, checking_out, building, swapping, probation, committing, rolling_back),
    )
    # A rest state entered with a newer target pending posts this to itself.
    assignment_pending = (
        idle.to(fetching, cond="should_start") | committed.to(fetching, cond="should_start")
        | failed.to(fetching, cond="should_start")
    )
    fetch_retry_elapsed = failed.to(fetching, cond=["should_start", "transient"])
    ota_retry_requested = (
        idle.to(fetching, cond="retry_starts") | committed.to(fetching, cond="retry_starts")
        | failed.to(fetching, cond="retry_starts")
    )

    # Before the swap: the old controller keeps running whatever happens.
    fetch_succeeded = fetching.to(idle, cond="is_superseded") | fetching.to(checking_out)
    fetch_failed = fetching.to(idle, cond="is_superseded") | fetching.to(failed, on="fail_transient")
    fetch_timed_out = fetching.to(idle, cond="is_superseded") | fetching.to(failed, on="fail_transient")
    fetch_cancelled = fetching.to(idle, cond="is_superseded") | fetching.to(failed, on="fail_transient")
    checkout_succeeded = (
        checking_out.to(idle, cond="is_superseded") | checking_out.to(building, on="report_downloaded")
    )
    checkout_failed = checking_out.to(idle, cond="is_superseded") | checking_out.to(failed, on="fail_blocking")
    checkout_timed_out = checking_out.to(idle, cond="is_superseded") | checking_out.to(failed, on="fail_blocking")
    checkout_cancelled = checking_out.to(idle, cond="is_superseded") | checking_out.to(failed, on="fail_blocking")
    build_succeeded = building.to(idle, cond="is_superseded") | building.to(swapping, on="report_verified")
    build_failed = building.to(idle, cond="is_superseded") | building.to(failed, on="fail_blocking")
    build_timed_out = building.to(idle, cond="is_superseded") | building.to(failed, on="fail_blocking")
    build_cancelled = building.to(idle, cond="is_superseded") | building.to(failed, on="fail_blocking")

    # Swap and probation: failures roll back. The controller answers by Notify,
    # which has no timed_out/cancelled outcome: the swap deadline timer stands in.
    swap_succeeded = (
        swapping.to(rolling_back, cond=["is_for_target", "rollback_asked", "has_last_good"])
        | swapping.to(probation, cond="is_for_target")
        | rolling_back.to(failed, cond="is_for_last_good", on="rolled_back")
    )
    swap_failed = (
        swapping.to(rolling_back, cond=["is_for_target", "has_last_good"], on="note_reason")
        | swapping.to(failed, cond="is_for_target", on="fail_without_rollback")
        | rolling_back.to(failed, cond="is_for_last_good", on="rollback_failed")
    )
    swap_deadline_elapsed = (
        swapping.to(rolling_back, cond="has_last_good", on="note_swap_timeout")
        | swapping.to(failed, on="fail_without_rollback")
        | rolling_back.to(failed, on="rollback_failed")
    )
    controller_exited = (
        probation.to(rolling_back, cond=["is_for_target", "has_last_good"], on="note_reason")
        | probation.to(failed, cond="is_for_target", on="fail_without_rollback")
    )
    controller_health_seen = (
        probation.to(committing, cond=["is_fresh_target_health", "window_over"])
        | swapping.to.itself(internal=True, cond="is_fresh_target_health", on="note_health")
        | probation.to.itself(internal=True, cond="is_fresh_target_health", on="note_health")
    )
    probation_elapsed = (
        probation.to(committing, cond="health_seen") | probation.to.itself(internal=True, on="note_window_over")
    )
    health_deadline_elapsed = (
        probation.to(rolling_back, unless="health_seen", cond="has_last_good", on="note_no_health")
        | probation.to(failed, unless="health_seen", on="fail_no_health")
    )
    controller_started = (
        idle.to.itself(internal=True) | committed.to.itself(internal=True) | failed.to.itself(internal=True)
    )
    ota_rollback_requested = (
        probation.to(rolling_back, cond="has_last_good", on="ask_rollback")
        | idle.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | committed.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | failed.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | fetching.to.itself(internal=True, on="block_target") | checking_out.to.itself(internal=True, on="block_target")
        | building.to.itself(internal=True, on="block_target") | swapping.to.itself(internal=True, on="ask_rollback")
    )

    # Commit: a failed write leaves the new version running (reported with a warning).
    record_succeeded = committing.to(committed, on="report_updated")
    record_failed = committing.to(committed, on="report_record_failed")
    record_timed_out = committing.to(committed, on="report_record_failed")
    record_cancelled = committing.to(committed, on="report_record_failed")

    resumed = (
        fetching.to.itself() | checking_out.to.itself() | building.to.itself() | swapping.to.itself()
        | probation.to.itself() | committing.to.itself() | rolling_back.to.itself()
        | failed.to(rolling_back, cond=["crashed_live", "has_last_good"], on="note_crash_loop")
        | failed.to(committed, cond="crashed_committing", on="report_updated")
        | failed.to.itself(internal=True, on="settle_crash_loop")
        | idle.to.itself(internal=True) | committed.to.itself(internal=True, on="rewrite_version_file")
    )

    # -- data --------------------------------------------------------------

    def __init__(self, settings: Any = None, *, start_value: str | None = None) -> None:
        super().__init__(settings, start_value=start_value)
        # The engine enters a stored state before restore(); the state's work is
        # re-issued by ``resumed``, so entry actions wait until construction ends.
        self.ready = True

    def setup(self) -> None:
        self.ready = False
        self.desired: str | None = None
        self.desired_title: str | None = None
        self.target: str | None = None
        self.target_title: str | None = None
        self.running: str | None = self.settings.last_good
        self.running_title: str = self.settings.title
        self.last_good: str | None = self.settings.last_good
        self.blocked: str | None = None
        self.reason = ""
        self.transient = False
        self.health_seen = False
        self.window_over = False
        self.swap_started_ms = 0
        self.rollback_asked = False
        self.last_report: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _PERSISTED}

    def restore(self, data: Any) -> None:
        for key in _PERSISTED:
            if key in data:
                setattr(self, key, data[key])

    def _next_target(self, desired: str | None = None, blocked: str | None = "") -> str | None:
        """The version to install next (for ``desired``, else the assigned one); ``blocked=None`` ignores blocks."""
        desired = self.desired if desired is None else desired
        return next_target(desired, self.running, self.blocked if blocked == "" else blocked)

    # -- guards --------------------------------------------------------------

    def assignment_starts(self, ev: Event) -> bool:
        """The event assigns a version that should be installed now (not running, refused or blocked)."""
        version, _ = assigned(ev, (self.desired, self.desired_title))
        blocked = self.blocked if version == self.desired else None
        return version is not None and self._next_target(version, blocked) is not None

    def should_start(self) -> bool:
        """The assigned version should be installed now (not running, refused or blocked)."""
        return self._next_target() is not None

    def retry_starts(self) -> bool:
        """An operator retry finds a version to install, even a blocked one."""
        return self._next_target(blocked=None) is not None

    def is_superseded(self) -> bool:
        """The version being installed is no longer the one to install next."""
        return self._next_target() != self.target

    def has_last_good(self) -> bool:
        """A last known good version exists to roll back to."""
        return self.last_good is not None

    def runs_other_than_last_good(self) -> bool:
        """A last good version exists and the controller runs a different one."""
        return self.last_good is not None and self.running != self.last_good

    def is_for_target(self, ev: Event) -> bool:
        """The event is about the version being installed."""
        return ev.data.get("version") == self.target

    def is_for_last_good(self, ev: Event) -> bool:
        """The event is about the last good version (the rollback's)."""
        return ev.data.get("version") == self.last_good

    def is_fresh_target_health(self, ev: Event) -> bool:
        """A health check of the version being installed, taken after its swap began."""
        return self.is_for_target(ev) and int(ev.data.get("health_ts_ms") or 0) >= self.swap_started_ms

    def crashed_live(self, ev: Event) -> bool:
        """Resumed after a crash loop while a new version was live (swapping or probation)."""
        return bool(ev.data.get("crash_loop")) and ev.data.get("from_state") in _LIVE

    def crashed_committing(self, ev: Event) -> bool:
        """Resumed after a crash loop while committing a version."""
        return bool(ev.data.get("crash_loop")) and ev.data.get("from_state") == "committing"
