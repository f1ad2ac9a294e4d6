"""The actions of the ota machine (machines/ota.py), kept apart from its table.

``OtaActions`` is mixed into ``OtaMachine``. python-statemachine looks callbacks
up by name with getattr, so the ``on_<event>`` and ``on_enter_<state>``
conventions and the ``on=`` names in the table resolve to these inherited methods.
What they do: record assignments and operator requests, issue each state's
effect on entry, turn outcomes into the ``sw_error`` reason (texts in
machines/ota_reasons.py) and publish ``sw_state``. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from teg_fsm.machines import ota_reasons as reason
from teg_fsm.machines.ota_support import (
    OtaSettings, assigned, build_effect, checkout_effect, fetch_effect, prune_effect, record_effect, sw_state_payload,
    version_error,
)
from teg_fsm.engine.effects import CancelTimer, Effect, Log, Notify, StartTimer
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC, Publish
from teg_fsm.engine.effects.ota import WriteControllerVersion
from teg_fsm.engine.events import Event


class OtaActions:
    """What OtaMachine does on its transitions and on entering its states."""

    # What the actions need from OtaMachine and GatewayMachine; declared for type
    # checkers only, so that nothing here shadows the real attributes at run time.
    if TYPE_CHECKING:
        machine_name: ClassVar[str]
        rest_states: ClassVar[frozenset[str]]
        settings: OtaSettings
        now_ms: int
        ready: bool
        desired: str | None
        desired_title: str | None
        target: str | None
        target_title: str | None
        running: str | None
        running_title: str
        last_good: str | None
        blocked: str | None
        reason: str
        transient: bool
        health_seen: bool
        window_over: bool
        swap_started_ms: int
        rollback_asked: bool
        last_report: dict[str, Any] | None
        rebuild: str | None
        fetch_error: str | None
        live: str | None
        live_health_ms: int | None
        held_updated: str | None

        @property
        def state_name(self) -> str: ...
        def emit(self, *effects: Effect) -> None: ...
        def mark_dirty(self) -> None: ...
        def _next_target(self, desired: str | None = None, blocked: str | None = "") -> str | None: ...
        def verified(self, version: str | None) -> bool: ...
        def _reinstall_needed(self) -> bool: ...

    # -- assignments and operator requests -------------------------------------

    def _note_assignment(self, ev: Event) -> None:
        version, title = assigned(ev, (self.desired, self.desired_title))
        changed = version != self.desired
        if changed:
            self.blocked = None  # a new assignment lifts the block on a rolled-back release
        self.desired, self.desired_title = version, title
        self.mark_dirty()
        resting = self.state_name in self.rest_states
        if resting and self._next_target() is not None:
            return  # entering fetching reports DOWNLOADING
        if resting and changed and version is not None and version_error(version):
            self.reason = version_error(version) or ""
            self._report("FAILED", self.reason)
        elif ev.name == "shared_attributes_received" and self.last_report is not None:
            self._report(force=True)  # after a reconnect ThingsBoard hears the current state again
        elif resting and version is not None and version == self.running:
            self._report("UPDATED")  # first contact: tell ThingsBoard what runs

    def on_shared_attributes_updated(self, ev: Event) -> None:
        self._note_assignment(ev)

    def on_shared_attributes_received(self, ev: Event) -> None:
        self._note_assignment(ev)

    def on_ota_retry_requested(self) -> None:
        if self._next_target(blocked=None) is None and self._reinstall_needed():
            self.rebuild = self.desired  # assigned and in service, but not really running: install it again
        self.blocked = None
        self.mark_dirty()

    # -- what really runs (the controller's broadcasts, in every state) ----------

    def before_controller_started(self, ev: Event) -> None:
        version = ev.data.get("version")
        if not isinstance(version, str):
            return
        self.live, self.live_health_ms = version, None
        if self.state_name in self.rest_states and version != self.running:
            self.running = version
        if version == self.rebuild:
            self.rebuild = None  # its image exists again: the controller started it
        self.mark_dirty()

    def before_controller_exited(self) -> None:
        self.live, self.live_health_ms = None, None
        self.mark_dirty()

    def before_controller_health_seen(self, ev: Event) -> None:
        health_ms = ev.data.get("health_ts_ms")
        if ev.data.get("version") != self.live or self.live is None or not isinstance(health_ms, int):
            return
        # Not marked dirty: this is re-derived after a restart, and checkpointing every
        # health tick would cost SD-card writes for nothing.
        self.live_health_ms = max(self.live_health_ms or 0, health_ms)
        self._confirm_updated()

    def _confirm_updated(self) -> None:
        """At rest, with the assigned (or no) version proven running: say UPDATED if not said yet.

        Releases an UPDATED held for want of proof, and corrects a FAILED once the
        controller machine's own restarts got the version running and healthy.
        """
        if self.state_name not in self.rest_states or self.desired not in (None, self.running):
            return
        if self.desired is not None and version_error(self.desired):
            return  # a refused assignment stays FAILED, even when it names what runs
        said = self.last_report or {}
        if self.held_updated is None and said.get("sw_state") == "UPDATED" and said.get(
                "current_sw_version") == self.running:
            return
        if self.held_updated is not None or said:
            self._report("UPDATED", self.held_updated or None, force=True)

    def note_missing_image(self, ev: Event) -> None:
        version = ev.data.get("version")
        self.live, self.live_health_ms = None, None
        if isinstance(version, str) and not version_error(version, assigned=False):
            self.rebuild = version
            self.emit(Log(level="WARNING", message=reason.image_missing(version)))
        self.mark_dirty()

    def before_resumed(self) -> None:
        # A new process knows nothing about the engine yet: the controller machine
        # re-inspects it and broadcasts what runs; until then nothing is UPDATED.
        self.live, self.live_health_ms = None, None

    def block_target(self) -> None:
        self.blocked = self.target
        self.mark_dirty()

    def ask_rollback(self) -> None:
        self.rollback_asked = True
        self._block(reason.OPERATOR_ROLLBACK)
        self.mark_dirty()

    def note_operator_rollback(self) -> None:
        self.reason = reason.OPERATOR_ROLLBACK

    # -- entering states ---------------------------------------------------------

    def on_enter_idle(self) -> None:
        if not self.ready or self._pending_newer():
            return
        error = version_error(self.desired) if self.desired is not None else None
        if error:
            self._report("FAILED", error)
        elif self.desired is not None and self.desired == self.blocked:
            self._report("FAILED", reason.cancelled_by_operator(self.target, self.running))
        elif self.desired is not None and self.desired == self.running:
            self._report("UPDATED")

    def on_enter_fetching(self) -> None:
        if not self.ready:
            return
        self.target = self._next_target() or self.target
        self.target_title = self.desired_title or self.settings.title
        self.reason, self.transient, self.rollback_asked = "", False, False
        self.fetch_error = None
        self._report("DOWNLOADING")
        self.emit(fetch_effect(self.settings))

    def on_enter_checking_out(self) -> None:
        if self.ready:
            self.emit(checkout_effect(self.settings, self.target))

    def on_enter_building(self) -> None:
        if self.ready:
            self.emit(build_effect(self.settings, self.target))

    def on_enter_swapping(self) -> None:
        if not self.ready:
            return
        self.swap_started_ms = self.now_ms
        self.health_seen = self.window_over = False
        self._report("UPDATING")
        self._request_swap(self.target)

    def on_exit_swapping(self) -> None:
        self.emit(CancelTimer(name="swap_deadline_elapsed"))

    def on_enter_probation(self) -> None:
        if not self.ready:
            return
        self.window_over = False
        self.emit(StartTimer(name="probation_elapsed", seconds=self.settings.probation_s))
        self.emit(StartTimer(name="health_deadline_elapsed", seconds=self.settings.health_timeout_s))

    def on_exit_probation(self) -> None:
        self.emit(CancelTimer(name="probation_elapsed"), CancelTimer(name="health_deadline_elapsed"))

    def on_enter_committing(self) -> None:
        if not self.ready:
            return
        # Persisted before the write goes out: a crash here resumes as committed-to-be.
        self.last_good, self.running = self.target, self.target
        self.running_title = self.target_title or self.settings.title
        self.rebuild = None  # whatever image was missing, the target now runs
        self.emit(record_effect(self.settings, self.target))

    def on_enter_committed(self) -> None:
        if self.ready:
            self.emit(prune_effect(self.settings, self.running, self.last_good))
            self._pending_newer()

    def on_enter_rolling_back(self) -> None:
        if self.ready:
            self._request_swap(self.last_good)

    def on_exit_rolling_back(self) -> None:
        self.emit(CancelTimer(name="swap_deadline_elapsed"))

    def on_enter_failed(self) -> None:
        if not self.ready:
            return
        self._report("FAILED", self.reason)
        self._arm_fetch_retry()
        self._pending_newer()

    def _pending_newer(self) -> bool:
        """Post ``assignment_pending`` when a different version than the last target waits."""
        upcoming = self._next_target()
        if upcoming is None or upcoming == self.target:
            return False
        self.emit(Notify(machine=self.machine_name, name="assignment_pending"))
        return True

    def _request_swap(self, version: str | None) -> None:
        self.emit(Notify(machine="controller", name="swap_requested", data={"version": version}))
        self.emit(StartTimer(name="swap_deadline_elapsed", seconds=self.settings.swap_timeout_s))

    def _arm_fetch_retry(self) -> None:
        if self.transient:
            self.emit(StartTimer(name="fetch_retry_elapsed", seconds=self.settings.fetch_retry_s))

    # -- transition actions: outcomes and reasons ---------------------------------

    def note_health(self) -> None:
        self.health_seen = True
        self.mark_dirty()

    def note_window_over(self) -> None:
        self.window_over = True
        self.mark_dirty()

    def report_downloaded(self) -> None:
        self._report("DOWNLOADED")

    def report_verified(self) -> None:
        self._report("VERIFIED")

    def note_fetch_failed(self, ev: Event) -> None:
        self.fetch_error = reason.error_of(ev)
        self.mark_dirty()
        self.emit(Log(level="WARNING", message=reason.fetch_failed_trying_local(self.target, self.fetch_error)))

    def fail_transient(self, ev: Event) -> None:
        """The fetch failed and the version is not in the local refs either: retried later."""
        self.reason = reason.fetch_failed(self.target, f"{self.fetch_error}; {reason.error_of(ev)}")
        self.transient = True

    def _block(self, why: str) -> None:
        """Fail the target for ``why``; a blocked version is not retried until it is reassigned."""
        self.reason, self.blocked = why, self.target

    def fail_blocking(self, ev: Event) -> None:
        self._block(reason.step_failed(ev.name, self.target, reason.error_of(ev)))

    # Every way into rolling_back blocks the target: a rolled-back release is not retried.
    def note_reason(self, ev: Event) -> None:
        self._block(reason.live_failed(ev.name, self.target, reason.error_of(ev)))

    def note_swap_timeout(self) -> None:
        self._block(reason.swap_timed_out(self.target, self.settings.swap_timeout_s))

    def note_no_health(self) -> None:
        self._block(reason.no_health(self.target, self.settings.health_timeout_s))

    def fail_no_health(self) -> None:
        self.note_no_health()
        self.fail_without_rollback()

    def fail_without_rollback(self, ev: Event | None = None) -> None:
        if ev is not None and ev.name in ("swap_failed", "controller_exited"):
            self.note_reason(ev)
        elif ev is not None and ev.name == "swap_deadline_elapsed":
            self.note_swap_timeout()
        self._block(reason.without_rollback(self.reason, self.target == self.last_good))

    def rolled_back(self) -> None:
        self.running = self.last_good
        self.reason = reason.rolled_back(self.last_good, self.reason)

    def rollback_failed(self, ev: Event) -> None:
        self.running = None
        self.reason = reason.rollback_failed(self.last_good, reason.error_of(ev), self.reason)

    def note_crash_loop(self, ev: Event) -> None:
        self._block(reason.crash_loop(ev.data.get("from_state", ""), self.target))

    def settle_crash_loop(self, ev: Event) -> None:
        """A resume in ``failed``: re-arm the retry timer, or report a crash loop we gave up on."""
        if not ev.data.get("crash_loop"):
            self._arm_fetch_retry()
            return
        self._block(reason.gave_up(ev.data.get("from_state", ""), self.target))
        if ev.data.get("from_state") == "rolling_back":
            self.running = None
        self._report("FAILED", self.reason)

    def rewrite_version_file(self) -> None:
        # reply=None: heals a write lost to a crash; the checkpoint is the truth.
        if self.last_good:
            self.emit(WriteControllerVersion(path=self.settings.version_file, version=self.last_good))

    def report_updated(self) -> None:
        self.reason = ""
        self._report("UPDATED")

    def report_record_failed(self, ev: Event) -> None:
        error = reason.record_failed(self.running, self.settings.version_file, reason.error_of(ev))
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
            payload = dict(self.last_report or {})
        else:
            payload = sw_state_payload(self.running, state, error)
        if payload.get("sw_state") == "UPDATED" and not self.verified(payload.get("current_sw_version")):
            self.held_updated = str(payload.get("sw_error") or "")
            self.mark_dirty()
            return
        self.held_updated = None
        if not payload or (payload == self.last_report and not force):
            return
        self.last_report = payload
        self.mark_dirty()
        self.emit(Publish(topic=TELEMETRY_TOPIC, payload=json.dumps(payload)))
