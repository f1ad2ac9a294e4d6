"""OTA of the controller: fetch, check out, build, swap, probation, commit or roll back.

What it is for: ThingsBoard assigns a controller version (shared attribute
``sw_version``, legacy ``sf_version``): a git tag or a 40-hex commit of the
controller repository. This machine brings that version into service, or
leaves the device on its last good version, and reports each step as ``sw_state``.

Events it takes: ``shared_attributes_updated`` {values, deleted} (push) and
``shared_attributes_received`` {shared} (after every connect), the outcomes of
its effects (``fetch_*``, ``download_*``, ``checkout_*``, ``build_*``, ``record_*``), the
controller machine's ``swap_succeeded`` / ``swap_failed`` /
``controller_image_missing`` {version} (a start found no image: first start,
pruned image, new engine; that version goes through the same pipeline) and
broadcasts ``controller_started`` / ``controller_exited`` /
``controller_health_seen``, its timers, ``ota_retry_requested`` /
``ota_rollback_requested`` (RPC) and ``resumed``.

Truthful reports: the controller's broadcasts are tracked in every state
(``live``: the version whose container runs, ``live_health_ms``: its newest
health check since it started). UPDATED is sent only while ``live`` is that
version with a health check no older than the probation window; otherwise it
is held until proven. After a restart ``live`` is forgotten and re-learnt from
the controller machine, which re-inspects the engine.

Two ways to fetch, one machine: when the assigned package carries a file
(``sw_checksum`` without ``sw_url``), ``fetching`` emits DownloadPackage
(ThingsBoard's chunk protocol; a git bundle is fetched into the repository, an
image archive loaded) instead of FetchControllerRepo; its ``download_*``
outcomes lead to the same states (an image skips the checkout).

Effects it emits: FetchControllerRepo or DownloadPackage, CheckoutControllerVersion,
BuildControllerImage, WriteControllerVersion, PruneControllerImages, Publish
of ``sw_state`` telemetry, Notify ``swap_requested`` to the controller, timers.

Phases (compound states): ``preparing`` (fetching, checking_out, building):
the old controller keeps running, a failure ends in ``failed``; ``on_trial``
(swapping, probation): the new version is live, a failure rolls back.
Checkpoints store the nested state (a phase is never stored).

Persisted (``OtaData``): desired/target/running/last good versions, the
blocked (rolled back) version, the failure reason, probation progress, the
last report, the version to rebuild and a held UPDATED (``live`` too, for
replays from a snapshot, but ``resumed`` resets it).
Resume: every step's work is idempotent, so each busy state re-enters itself
and re-issues it (a swap is re-requested, probation restarts its window).
A crash loop lands in ``failed``: before the swap that gives up on the target
(the old controller never stopped); in swap or probation it rolls back.

Where it rests: ``committed`` (the target runs), ``rolled_back`` (the target
failed live and the last good version runs again; ``blocked`` and ``reason``
say which and why), ``failed`` (the target never went live, or there was
nothing to roll back to, or the rollback itself failed) or ``idle``.
ThingsBoard hears FAILED with ``sw_error`` after a rollback as after a failure.
A checkpoint written before ``rolled_back`` existed stores ``failed`` after a
rollback; its ``resumed`` moves it to ``rolled_back``.

Concurrency: one step runs at a time. An assignment arriving mid-update is
recorded; when the running step ends, a newer target restarts the pipeline
from ``fetching`` (via ``idle``) and the latest assignment wins.

This module is the machine, read top-down: flags, states, transitions (one
event per line), data, guards, actions. Pure helpers that need no machine
state (settings, the version rule, effect and payload builders, the
``sw_error`` texts) are in machines/ota_rules.py.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import attrs
import cattrs
from statemachine import State
from statemachine.transition_list import TransitionList

from teg_fsm.engine.effects import CancelTimer, Log, Notify, StartTimer
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC, Publish
from teg_fsm.engine.effects.ota import WriteControllerVersion
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.machines import ota_rules as rules

# OtaSettings and version_error are re-exported: the OTA component and tests import them from here.
from teg_fsm.machines.ota_rules import (
    OtaSettings,
    assigned,
    build_effect,
    checkout_effect,
    download_effect,
    fetch_effect,
    next_target,
    package_of,
    prune_effect,
    record_effect,
    sw_state_payload,
    version_error,
)

__all__ = ["OtaMachine", "OtaSettings", "version_error"]


@attrs.define
class OtaData:
    """What the machine knows and persists; ``snapshot()`` is this, field by field.

    The field names and their JSON values are the checkpoint and journal format
    (a contract, like the state names): rename nothing here.
    """

    desired: str | None = None  # the assigned version (sw_version)
    desired_title: str | None = None
    target: str | None = None  # the version being installed
    target_title: str | None = None
    running: str | None = None  # the version in service (None after a failed rollback)
    running_title: str = "controller"
    last_good: str | None = None  # the version to roll back to
    blocked: str | None = None  # a rolled-back or failed version, not retried until reassigned
    reason: str = ""  # the sw_error of the current failure
    transient: bool = False  # the failure may go away by itself: the fetch is retried
    health_seen: bool = False  # the target wrote a health check during its swap or probation
    window_over: bool = False  # the probation window has elapsed
    swap_started_ms: int = 0  # health checks older than this are not the target's
    rollback_asked: bool = False  # the operator asked for a rollback during the swap
    last_report: dict[str, Any] | None = None  # the last sw_state payload sent
    rebuild: str | None = None  # the controller misses this version's image
    fetch_error: str | None = None  # the last fetch failed; the checkout decides
    # Engine truth, from the controller's broadcasts since this process started
    # (reset on ``resumed``): the version of the container that runs, and the
    # newest health check it wrote since it started. UPDATED is sent only for that.
    live: str | None = None
    live_health_ms: int | None = None
    held_updated: str | None = None  # an UPDATED (with its sw_error) waiting for ``live`` to prove it
    # The assigned package's file (checksum, algorithm, size) when ThingsBoard stores
    # one: fetching then downloads it instead of fetching the git remote. Left out of
    # the checkpoint while None, so journals from before packages replay unchanged.
    package: dict[str, Any] | None = None


# Checkpoints and journals hold OtaData unstructured: plain JSON values.
_data_converter = cattrs.Converter()


def _stay(state: State, **options: Any) -> TransitionList:
    """A transition that runs actions and leaves the state as it is (no exit, no entry).

    A state inside a phase needs the targetless form: python-statemachine 3.2 runs
    an internal self-transition of a nested state through its parent's entry again
    (docs/ENGINE.md). Top-level states keep the internal self-transition, which the
    library's own renderers draw as a note in the box rather than a loop.
    """
    if state.parent is not None:
        return state.to(None, **options)
    return state.to.itself(internal=True, **options)


def _assignment_transitions(fetching: State, rest: tuple[State, ...], busy: tuple[State, ...]) -> TransitionList:
    """From a rest state an assignment may start the pipeline; anywhere else it is only recorded."""
    transitions = TransitionList()
    for state in rest:
        transitions = transitions | state.to(fetching, cond="assignment_starts")
    for state in (*rest, *busy):
        transitions = transitions | _stay(state)
    return transitions


def _everywhere(states: tuple[State, ...], **options: Any) -> TransitionList:
    """The same internal (no exit/entry) transition out of each of ``states``."""
    transitions = TransitionList()
    for state in states:
        transitions = transitions | _stay(state, **options)
    return transitions


def _missing_image_transitions(fetching: State, rest: tuple[State, ...], busy: tuple[State, ...]) -> TransitionList:
    """The controller found no image for the version it must run: rebuild it through the pipeline."""
    transitions = TransitionList()
    for state in rest:
        transitions = transitions | state.to(fetching, cond="rebuild_starts", before="note_missing_image")
    return transitions | _everywhere((*rest, *busy), before="note_missing_image")


class OtaMachine(GatewayMachine):
    """Installs the assigned controller version; rolls back to the last good one."""

    machine_name = "ota"
    settings_type = OtaSettings
    resume_table: ClassVar[dict[str, str]] = {
        "idle": "idle", "fetching": "fetching", "checking_out": "checking_out", "building": "building",
        "swapping": "swapping", "probation": "probation", "committing": "committing",
        "committed": "committed", "rolling_back": "rolling_back", "rolled_back": "rolled_back", "failed": "failed",
    }
    rest_states = frozenset({"idle", "committed", "rolled_back", "failed"})
    crash_loop_state = "failed"
    max_resumes = 3

    idle = State(initial=True)
    fetching = State()
    checking_out = State()
    building = State()
    # Before the swap the old controller keeps running whatever happens: a step
    # that fails here ends in ``failed`` (one arrow, declared on the phase).
    preparing = State(states=[fetching, checking_out, building])
    swapping = State()
    probation = State()
    # The new version is live: a failure here rolls back to the last good one.
    on_trial = State(states=[swapping, probation])
    committing = State()
    committed = State()
    rolling_back = State()
    rolled_back = State()
    failed = State()

    # Assignments: start from a rest state; otherwise just recorded (see _note_assignment).
    shared_attributes_updated = _assignment_transitions(
        fetching, rest=(idle, committed, rolled_back, failed),
        busy=(fetching, checking_out, building, swapping, probation, committing, rolling_back),
    )
    shared_attributes_received = _assignment_transitions(
        fetching, rest=(idle, committed, rolled_back, failed),
        busy=(fetching, checking_out, building, swapping, probation, committing, rolling_back),
    )
    # The controller could not start the version it runs (first start, image pruned,
    # new engine): that version goes through the pipeline too (fetch, check out,
    # build, swap, probation), as the existing gateway builds a missing image.
    controller_image_missing = _missing_image_transitions(
        fetching, rest=(idle, committed, rolled_back, failed),
        busy=(fetching, checking_out, building, swapping, probation, committing, rolling_back),
    )
    # A rest state entered with a newer target pending posts this to itself.
    assignment_pending = (
        idle.to(fetching, cond="should_start") | committed.to(fetching, cond="should_start")
        | rolled_back.to(fetching, cond="should_start") | failed.to(fetching, cond="should_start")
    )
    fetch_retry_elapsed = failed.to(fetching, cond=["should_start", "transient"])
    ota_retry_requested = (
        idle.to(fetching, cond="retry_starts") | committed.to(fetching, cond="retry_starts")
        | rolled_back.to(fetching, cond="retry_starts") | failed.to(fetching, cond="retry_starts")
    )

    # Before the swap: the old controller keeps running whatever happens.
    # A failed fetch is not the end (the existing gateway ignores git fetch's result):
    # the version may be in the local refs already (no remote, offline device). If
    # the checkout then fails too, the fetch is the likely cause: retried later.
    fetch_succeeded = fetching.to(idle, cond="is_superseded") | fetching.to(checking_out)
    fetch_failed = fetching.to(idle, cond="is_superseded") | fetching.to(checking_out, on="note_fetch_failed")
    fetch_timed_out = fetching.to(idle, cond="is_superseded") | fetching.to(checking_out, on="note_fetch_failed")
    fetch_cancelled = fetching.to(idle, cond="is_superseded") | fetching.to(checking_out, on="note_fetch_failed")
    # The same step with a package file (``has_package`` chose DownloadPackage on entry):
    # a git bundle was fetched into the repository (check out and build as usual), an
    # image archive was loaded and tagged (the build finds the image and is skipped),
    # anything else (the dummy file operators used to upload) falls back to the git remote.
    download_succeeded = (
        fetching.to(idle, cond="is_superseded")
        | fetching.to(building, cond="image_loaded", on="report_downloaded")
        | fetching.to(checking_out, cond="bundle_fetched")
        | _stay(fetching, on="fetch_from_remote")
    )
    # A checksum mismatch, a refused algorithm or too little disk blocks the release; a
    # download that could not finish (link down too long, effect timed out) is retried
    # later and resumes from its part file.
    download_failed = (
        fetching.to(idle, cond="is_superseded")
        | fetching.to(failed, cond="download_transient", on="fail_download_transient")
        | preparing.to(failed, on="fail_download")
    )
    download_timed_out = fetching.to(idle, cond="is_superseded") | fetching.to(failed, on="fail_download_transient")
    download_cancelled = fetching.to(idle, cond="is_superseded") | fetching.to(failed, on="fail_download_transient")
    checkout_succeeded = (
        checking_out.to(idle, cond="is_superseded") | checking_out.to(building, on="report_downloaded")
    )
    # The library tries the active step's own transitions first, then the phase's.
    checkout_failed = (
        checking_out.to(idle, cond="is_superseded")
        | checking_out.to(failed, cond="fetch_had_failed", on="fail_transient")
        | preparing.to(failed, on="fail_blocking")
    )
    checkout_timed_out = checking_out.to(idle, cond="is_superseded") | preparing.to(failed, on="fail_blocking")
    checkout_cancelled = checking_out.to(idle, cond="is_superseded") | preparing.to(failed, on="fail_blocking")
    build_succeeded = building.to(idle, cond="is_superseded") | building.to(swapping, on="report_verified")
    build_failed = building.to(idle, cond="is_superseded") | preparing.to(failed, on="fail_blocking")
    build_timed_out = building.to(idle, cond="is_superseded") | preparing.to(failed, on="fail_blocking")
    build_cancelled = building.to(idle, cond="is_superseded") | preparing.to(failed, on="fail_blocking")

    # Swap and probation: failures roll back. The controller answers by Notify,
    # which has no timed_out/cancelled outcome: the swap deadline timer stands in.
    swap_succeeded = (
        swapping.to(rolling_back, cond=["is_for_target", "rollback_asked", "has_last_good"])
        | swapping.to(probation, cond="is_for_target")
        | rolling_back.to(rolled_back, cond="is_for_last_good", on="note_rolled_back")
    )
    # The controller answers each swap request once (never swap_failed after
    # swap_succeeded) and the timers are cancelled when their step ends, so these
    # outcomes only ever reach the step they belong to.
    swap_failed = (
        on_trial.to(rolling_back, cond=["is_for_target", "has_last_good"], on="note_reason")
        | on_trial.to(failed, cond="is_for_target", on="fail_without_rollback")
        | rolling_back.to(failed, cond="is_for_last_good", on="rollback_failed")
    )
    swap_deadline_elapsed = (
        on_trial.to(rolling_back, cond="has_last_good", on="note_swap_timeout")
        | on_trial.to(failed, on="fail_without_rollback")
        | rolling_back.to(failed, on="rollback_failed")
    )
    # What really runs (``live``) is tracked from the controller's broadcasts in every
    # state (the ``before_controller_*`` actions); UPDATED is only ever sent for it.
    # Only in probation is an exit a failure: during the swap the old controller
    # stops on purpose.
    controller_exited = (
        probation.to(rolling_back, cond=["is_for_target", "has_last_good"], on="note_reason")
        | probation.to(failed, cond="is_for_target", on="fail_without_rollback")
        | _everywhere((idle, fetching, checking_out, building, swapping, probation, committing, committed,
                       rolling_back, rolled_back, failed))
    )
    controller_health_seen = (
        probation.to(committing, cond=["is_fresh_target_health", "window_over"])
        | _stay(swapping, cond="is_fresh_target_health", on="note_health")
        | _stay(probation, cond="is_fresh_target_health", on="note_health")
        | _everywhere((idle, fetching, checking_out, building, swapping, probation, committing, committed,
                       rolling_back, rolled_back, failed))
    )
    probation_elapsed = (
        probation.to(committing, cond="health_seen") | _stay(probation, on="note_window_over")
    )
    health_deadline_elapsed = (
        on_trial.to(rolling_back, unless="health_seen", cond="has_last_good", on="note_no_health")
        | on_trial.to(failed, unless="health_seen", on="fail_no_health")
    )
    controller_started = _everywhere(
        (idle, fetching, checking_out, building, swapping, probation, committing, committed, rolling_back,
         rolled_back, failed)
    )
    ota_rollback_requested = (
        probation.to(rolling_back, cond="has_last_good", on="ask_rollback")
        | idle.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | committed.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | rolled_back.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | failed.to(rolling_back, cond="runs_other_than_last_good", on="note_operator_rollback")
        | _stay(fetching, on="block_target") | _stay(checking_out, on="block_target")
        | _stay(building, on="block_target") | _stay(swapping, on="ask_rollback")
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
        | failed.to(rolled_back, cond="stored_after_rollback")
        | _stay(failed, on="settle_crash_loop")
        | _stay(idle) | _stay(committed, on="rewrite_version_file")
        | _stay(rolled_back)
    )

    # -- data --------------------------------------------------------------

    def __init__(self, settings: Any = None, *, start_value: str | None = None) -> None:
        super().__init__(settings, start_value=start_value)
        # The engine enters a stored state before restore(); the state's work is
        # re-issued by ``resumed``, so entry actions wait until construction ends.
        self.ready = True

    def setup(self) -> None:
        self.ready = False
        self.data = OtaData(
            running=self.settings.last_good, running_title=self.settings.title, last_good=self.settings.last_good)

    def snapshot(self) -> dict[str, Any]:
        data = _data_converter.unstructure(self.data)
        if data.get("package") is None:
            data.pop("package", None)
        return data

    def restore(self, data: Any) -> None:
        known = {key: data[key] for key in attrs.fields_dict(OtaData) if key in data}
        self.data = _data_converter.structure({**self.snapshot(), **known}, OtaData)

    def _next_target(self, desired: str | None = None, blocked: str | None = "") -> str | None:
        """The version to install next (for ``desired``, else the assigned one); ``blocked=None`` ignores blocks.

        An assignment other than the running version comes first; else a version
        whose image the controller misses is rebuilt (unless that is blocked).
        """
        desired = self.data.desired if desired is None else desired
        blocked = self.data.blocked if blocked == "" else blocked
        upcoming = next_target(desired, self.data.running, blocked)
        if upcoming is None and self.data.rebuild is not None and self.data.rebuild != blocked:
            return self.data.rebuild
        return upcoming

    def verified(self, version: str | None) -> bool:
        """A container of ``version`` runs and wrote a health check since it started,
        no longer ago than the probation window (``health_timeout_s``)."""
        if version is None or self.data.live != version or self.data.live_health_ms is None:
            return False
        return self.now_ms - self.data.live_health_ms <= self.settings.health_timeout_s * 1000

    # -- guards --------------------------------------------------------------

    def assignment_starts(self, ev: Event) -> bool:
        """The event assigns a version that should be installed now (not running, refused or blocked)."""
        version, _ = assigned(ev, (self.data.desired, self.data.desired_title))
        blocked = self.data.blocked if version == self.data.desired else None
        return version is not None and self._next_target(version, blocked) is not None

    def should_start(self) -> bool:
        """The assigned version should be installed now (not running, refused or blocked)."""
        return self._next_target() is not None

    def retry_starts(self) -> bool:
        """A retry is accepted whenever what really runs is not the assigned version."""
        return self._next_target(blocked=None) is not None or self._reinstall_needed()

    def _reinstall_needed(self) -> bool:
        """The assigned version is not proven running, so installing it again is worth it."""
        desired = self.data.desired
        return desired is not None and not version_error(desired) and not self.verified(desired)

    def rebuild_starts(self, ev: Event) -> bool:
        """The controller lacks the image of a version this machine may build (not blocked, not mangled)."""
        version = ev.data.get("version")
        return isinstance(version, str) and not version_error(version, assigned=False) and version != self.data.blocked

    def transient(self) -> bool:
        """The failure may pass by itself (the fetch failed): the fetch is retried."""
        return self.data.transient

    def health_seen(self) -> bool:
        """The target wrote a health check since its swap began."""
        return self.data.health_seen

    def window_over(self) -> bool:
        """The probation window has elapsed."""
        return self.data.window_over

    def rollback_asked(self) -> bool:
        """The operator asked for a rollback while the swap ran."""
        return self.data.rollback_asked

    def has_package(self) -> bool:
        """The version being installed is the assigned one and its package carries a file."""
        return self.data.package is not None and self.data.target == self.data.desired

    def image_loaded(self, ev: Event) -> bool:
        """The package was a docker image archive, now loaded and tagged."""
        return (ev.data.get("result") or {}).get("kind") == "image"

    def bundle_fetched(self, ev: Event) -> bool:
        """The package was a git bundle, now fetched into the controller repository."""
        return (ev.data.get("result") or {}).get("kind") == "bundle"

    def download_transient(self, ev: Event) -> bool:
        """The download stopped for a reason that may pass (the link); the part file is kept."""
        return bool(ev.data.get("transient"))

    def fetch_had_failed(self) -> bool:
        """The last fetch failed, so the checkout tried the local refs only."""
        return self.data.fetch_error is not None

    def is_superseded(self) -> bool:
        """The version being installed is no longer the one to install next."""
        return self._next_target() != self.data.target

    def has_last_good(self) -> bool:
        """A last good version other than the target to roll back to."""
        return self.data.last_good is not None and self.data.last_good != self.data.target

    def runs_other_than_last_good(self) -> bool:
        """A last good version exists and the controller runs a different one."""
        return self.data.last_good is not None and self.data.running != self.data.last_good

    def is_for_target(self, ev: Event) -> bool:
        """The event is about the version being installed."""
        return ev.data.get("version") == self.data.target

    def is_for_last_good(self, ev: Event) -> bool:
        """The event is about the last good version (the rollback's)."""
        return ev.data.get("version") == self.data.last_good

    def is_fresh_target_health(self, ev: Event) -> bool:
        """A health check of the version being installed, taken after its swap began."""
        return self.is_for_target(ev) and int(ev.data.get("health_ts_ms") or 0) >= self.data.swap_started_ms

    def crashed_live(self, ev: Event) -> bool:
        """Resumed after a crash loop while a new version was live (swapping or probation)."""
        from_state = self.states_map.get(ev.data.get("from_state"))
        return bool(ev.data.get("crash_loop")) and from_state is not None and from_state.parent is self.states_map["on_trial"]

    def stored_after_rollback(self, ev: Event) -> bool:
        """An old checkpoint: ``failed`` stored after a rollback, from before ``rolled_back`` existed."""
        return not ev.data.get("crash_loop") and rules.is_rollback_reason(self.data.reason)

    def crashed_committing(self, ev: Event) -> bool:
        """Resumed after a crash loop while committing a version."""
        return bool(ev.data.get("crash_loop")) and ev.data.get("from_state") == "committing"

    # -- assignments and operator requests -------------------------------------

    def _note_assignment(self, ev: Event) -> None:
        version, title = assigned(ev, (self.data.desired, self.data.desired_title))
        changed = version != self.data.desired
        self.data.package = package_of(ev, self.data.package)
        if changed:
            self.data.blocked = None  # a new assignment lifts the block on a rolled-back release
        self.data.desired, self.data.desired_title = version, title
        self.mark_dirty()
        resting = self.state_name in self.rest_states
        if resting and self._next_target() is not None:
            return  # entering fetching reports DOWNLOADING
        if resting and changed and version is not None and version_error(version):
            self.data.reason = version_error(version) or ""
            self._report("FAILED", self.data.reason)
        elif ev.name == "shared_attributes_received" and self.data.last_report is not None:
            self._report(force=True)  # after a reconnect ThingsBoard hears the current state again
        elif resting and version is not None and version == self.data.running:
            self._report("UPDATED")  # first contact: tell ThingsBoard what runs

    def on_shared_attributes_updated(self, ev: Event) -> None:
        self._note_assignment(ev)

    def on_shared_attributes_received(self, ev: Event) -> None:
        self._note_assignment(ev)

    def on_ota_retry_requested(self) -> None:
        if self._next_target(blocked=None) is None and self._reinstall_needed():
            self.data.rebuild = self.data.desired  # assigned and in service, but not really running: install it again
        self.data.blocked = None
        self.mark_dirty()

    # -- what really runs (the controller's broadcasts, in every state) ----------

    def before_controller_started(self, ev: Event) -> None:
        version = ev.data.get("version")
        if not isinstance(version, str):
            return
        self.data.live, self.data.live_health_ms = version, None
        if self.state_name in self.rest_states and version != self.data.running:
            self.data.running = version
        if version == self.data.rebuild:
            self.data.rebuild = None  # its image exists again: the controller started it
        self.mark_dirty()

    def before_controller_exited(self) -> None:
        self.data.live, self.data.live_health_ms = None, None
        self.mark_dirty()

    def before_controller_health_seen(self, ev: Event) -> None:
        health_ms = ev.data.get("health_ts_ms")
        if ev.data.get("version") != self.data.live or self.data.live is None or not isinstance(health_ms, int):
            return
        # Not marked dirty: this is re-derived after a restart, and checkpointing every
        # health tick would cost SD-card writes for nothing.
        self.data.live_health_ms = max(self.data.live_health_ms or 0, health_ms)
        self._confirm_updated()

    def _confirm_updated(self) -> None:
        """At rest, with the assigned (or no) version proven running: say UPDATED if not said yet.

        Releases an UPDATED held for want of proof, and corrects a FAILED once the
        controller machine's own restarts got the version running and healthy.
        """
        if self.state_name not in self.rest_states or self.data.desired not in (None, self.data.running):
            return
        if self.data.desired is not None and version_error(self.data.desired):
            return  # a refused assignment stays FAILED, even when it names what runs
        said = self.data.last_report or {}
        if self.data.held_updated is None and said.get("sw_state") == "UPDATED" and said.get(
                "current_sw_version") == self.data.running:
            return
        if self.data.held_updated is not None or said:
            self._report("UPDATED", self.data.held_updated or None, force=True)

    def note_missing_image(self, ev: Event) -> None:
        version = ev.data.get("version")
        self.data.live, self.data.live_health_ms = None, None
        if isinstance(version, str) and not version_error(version, assigned=False):
            self.data.rebuild = version
            self.emit(Log(level="WARNING", message=rules.image_missing(version)))
        self.mark_dirty()

    def before_resumed(self) -> None:
        # A new process knows nothing about the engine yet: the controller machine
        # re-inspects it and broadcasts what runs; until then nothing is UPDATED.
        self.data.live, self.data.live_health_ms = None, None

    def block_target(self) -> None:
        self.data.blocked = self.data.target
        self.mark_dirty()

    def ask_rollback(self) -> None:
        self.data.rollback_asked = True
        self._block(rules.OPERATOR_ROLLBACK)
        self.mark_dirty()

    def note_operator_rollback(self) -> None:
        self.data.reason = rules.OPERATOR_ROLLBACK

    # -- entering states ---------------------------------------------------------

    def on_enter_idle(self) -> None:
        if not self.ready or self._pending_newer():
            return
        error = version_error(self.data.desired) if self.data.desired is not None else None
        if error:
            self._report("FAILED", error)
        elif self.data.desired is not None and self.data.desired == self.data.blocked:
            self._report("FAILED", rules.cancelled_by_operator(self.data.target, self.data.running))
        elif self.data.desired is not None and self.data.desired == self.data.running:
            self._report("UPDATED")

    def on_enter_fetching(self) -> None:
        if not self.ready:
            return
        self.data.target = self._next_target() or self.data.target
        self.data.target_title = self.data.desired_title or self.settings.title
        self.data.reason, self.data.transient, self.data.rollback_asked = "", False, False
        self.data.fetch_error = None
        # ThingsBoard's own clients report DOWNLOADING once, before the first chunk
        # request, and DOWNLOADED when the file is complete (tb_device_mqtt.py, the
        # Python device SDK): no per-chunk progress.
        self._report("DOWNLOADING")
        if self.has_package():
            self.emit(download_effect(self.settings, self.data.target, self.data.desired_title, self.data.package or {}))
        else:
            self.emit(fetch_effect(self.settings))

    def on_enter_checking_out(self) -> None:
        if self.ready:
            self.emit(checkout_effect(self.settings, self.data.target))

    def on_enter_building(self) -> None:
        if self.ready:
            self.emit(build_effect(self.settings, self.data.target))

    def on_enter_swapping(self) -> None:
        if not self.ready:
            return
        self.data.swap_started_ms = self.now_ms
        self.data.health_seen = self.data.window_over = False
        self._report("UPDATING")
        self._request_swap(self.data.target)

    def on_exit_swapping(self) -> None:
        self.emit(CancelTimer(name="swap_deadline_elapsed"))

    def on_enter_probation(self) -> None:
        if not self.ready:
            return
        self.data.window_over = False
        self.emit(StartTimer(name="probation_elapsed", seconds=self.settings.probation_s))
        self.emit(StartTimer(name="health_deadline_elapsed", seconds=self.settings.health_timeout_s))

    def on_exit_probation(self) -> None:
        self.emit(CancelTimer(name="probation_elapsed"), CancelTimer(name="health_deadline_elapsed"))

    def on_enter_committing(self) -> None:
        if not self.ready:
            return
        # Persisted before the write goes out: a crash here resumes as committed-to-be.
        self.data.last_good, self.data.running = self.data.target, self.data.target
        self.data.running_title = self.data.target_title or self.settings.title
        self.data.rebuild = None  # whatever image was missing, the target now runs
        self.emit(record_effect(self.settings, self.data.target))

    def on_enter_committed(self) -> None:
        if self.ready:
            self.emit(prune_effect(self.settings, self.data.running, self.data.last_good))
            self._pending_newer()

    def on_enter_rolling_back(self) -> None:
        if self.ready:
            self._request_swap(self.data.last_good)

    def on_exit_rolling_back(self) -> None:
        self.emit(CancelTimer(name="swap_deadline_elapsed"))

    def on_enter_rolled_back(self) -> None:
        if not self.ready:
            return
        self._report("FAILED", self.data.reason)  # ThingsBoard knows no rolled-back state
        self._pending_newer()

    def on_enter_failed(self) -> None:
        if not self.ready:
            return
        self._report("FAILED", self.data.reason)
        self._arm_fetch_retry()
        self._pending_newer()

    def _pending_newer(self) -> bool:
        """Post ``assignment_pending`` when a different version than the last target waits."""
        upcoming = self._next_target()
        if upcoming is None or upcoming == self.data.target:
            return False
        self.emit(Notify(machine=self.machine_name, name="assignment_pending"))
        return True

    def _request_swap(self, version: str | None) -> None:
        self.emit(Notify(machine="controller", name="swap_requested", data={"version": version}))
        self.emit(StartTimer(name="swap_deadline_elapsed", seconds=self.settings.swap_timeout_s))

    def _arm_fetch_retry(self) -> None:
        if self.data.transient:
            self.emit(StartTimer(name="fetch_retry_elapsed", seconds=self.settings.fetch_retry_s))

    # -- transition actions: outcomes and reasons ---------------------------------

    def note_health(self) -> None:
        self.data.health_seen = True
        self.mark_dirty()

    def note_window_over(self) -> None:
        self.data.window_over = True
        self.mark_dirty()

    def report_downloaded(self) -> None:
        self._report("DOWNLOADED")

    def report_verified(self) -> None:
        self._report("VERIFIED")

    def fetch_from_remote(self) -> None:
        self.emit(Log(level="WARNING", message=rules.package_not_installable(self.data.target)))
        self.emit(fetch_effect(self.settings))

    def fail_download(self, ev: Event) -> None:
        self._block(rules.download_failed(self.data.target, rules.error_of(ev)))

    def fail_download_transient(self, ev: Event) -> None:
        self.data.reason = rules.download_failed(self.data.target, rules.error_of(ev))
        self.data.transient = True

    def note_fetch_failed(self, ev: Event) -> None:
        self.data.fetch_error = rules.error_of(ev)
        self.mark_dirty()
        self.emit(Log(level="WARNING", message=rules.fetch_failed_trying_local(self.data.target, self.data.fetch_error)))

    def fail_transient(self, ev: Event) -> None:
        """The fetch failed and the version is not in the local refs either: retried later."""
        self.data.reason = rules.fetch_failed(self.data.target, f"{self.data.fetch_error}; {rules.error_of(ev)}")
        self.data.transient = True

    def _block(self, why: str) -> None:
        """Fail the target for ``why``; a blocked version is not retried until it is reassigned."""
        self.data.reason, self.data.blocked = why, self.data.target

    def fail_blocking(self, ev: Event) -> None:
        self._block(rules.step_failed(ev.name, self.data.target, rules.error_of(ev)))

    # Every way into rolling_back blocks the target: a rolled-back release is not retried.
    def note_reason(self, ev: Event) -> None:
        self._block(rules.live_failed(ev.name, self.data.target, rules.error_of(ev)))

    def note_swap_timeout(self) -> None:
        self._block(rules.swap_timed_out(self.data.target, self.settings.swap_timeout_s))

    def note_no_health(self) -> None:
        self._block(rules.no_health(self.data.target, self.settings.health_timeout_s))

    def fail_no_health(self) -> None:
        self.note_no_health()
        self.fail_without_rollback()

    def fail_without_rollback(self, ev: Event | None = None) -> None:
        if ev is not None and ev.name in ("swap_failed", "controller_exited"):
            self.note_reason(ev)
        elif ev is not None and ev.name == "swap_deadline_elapsed":
            self.note_swap_timeout()
        self._block(rules.without_rollback(self.data.reason, self.data.target == self.data.last_good))

    def note_rolled_back(self) -> None:
        self.data.running = self.data.last_good
        self.data.reason = rules.rolled_back(self.data.last_good, self.data.reason)

    def rollback_failed(self, ev: Event) -> None:
        self.data.running = None
        self.data.reason = rules.rollback_failed(self.data.last_good, rules.error_of(ev), self.data.reason)

    def note_crash_loop(self, ev: Event) -> None:
        self._block(rules.crash_loop(ev.data.get("from_state", ""), self.data.target))

    def settle_crash_loop(self, ev: Event) -> None:
        """A resume in ``failed``: re-arm the retry timer, or report a crash loop we gave up on."""
        if not ev.data.get("crash_loop"):
            self._arm_fetch_retry()
            return
        self._block(rules.gave_up(ev.data.get("from_state", ""), self.data.target))
        if ev.data.get("from_state") == "rolling_back":
            self.data.running = None
        self._report("FAILED", self.data.reason)

    def rewrite_version_file(self) -> None:
        # reply=None: heals a write lost to a crash; the checkpoint is the truth.
        if self.data.last_good:
            self.emit(WriteControllerVersion(path=self.settings.version_file, version=self.data.last_good))

    def report_updated(self) -> None:
        self.data.reason = ""
        self._report("UPDATED")

    def report_record_failed(self, ev: Event) -> None:
        error = rules.record_failed(self.data.running, self.settings.version_file, rules.error_of(ev))
        self.emit(Log(level="ERROR", message=error))
        self._report("UPDATED", error)

    # -- reports -------------------------------------------------------------

    def _report(self, state: str | None = None, error: str | None = None, *, force: bool = False) -> None:
        """Publish sw_state telemetry; a repeat of the last report is sent only when forced.

        UPDATED is the one claim about the engine: it goes out only while a container
        of the running version runs and has written a health check since it started.
        Otherwise it is held (``held_updated``) until the controller proves it, and
        any other report replaces it.
        """
        if state is None:
            payload = dict(self.data.last_report or {})
        else:
            payload = sw_state_payload(self.data.running, state, error)
        if payload.get("sw_state") == "UPDATED" and not self.verified(payload.get("current_sw_version")):
            self.data.held_updated = str(payload.get("sw_error") or "")
            self.mark_dirty()
            return
        self.data.held_updated = None
        if not payload or (payload == self.data.last_report and not force):
            return
        self.data.last_report = payload
        self.mark_dirty()
        self.emit(Publish(topic=TELEMETRY_TOPIC, payload=json.dumps(payload)))
