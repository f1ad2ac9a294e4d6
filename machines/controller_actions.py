"""The controller machine's actions: entering its states and taking its transitions.

``ControllerMachine`` (``machines/controller.py``) holds the table: states,
transitions, guards and persisted data. The entry actions (``on_enter_<state>``)
and the transition actions its table names (``on="adopt"``, ...) are here, in a
plain mixin: python-statemachine finds callbacks by name on the machine, so
inherited methods serve as well as the machine's own. Pure, like the machine:
they update its data and emit effects, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from teg_fsm.machines import controller_support as support
from teg_fsm.engine.effects import CancelTimer, StartTimer
from teg_fsm.engine.effects.controller import InspectController, ReadControllerHealth
from teg_fsm.engine.events import Event

if TYPE_CHECKING:
    from teg_fsm.machines.controller_support import ControllerSettings
    from teg_fsm.engine.effects import Effect


class ControllerActions:
    """Entry and transition actions of ``ControllerMachine``."""

    # What ControllerMachine provides (GatewayMachine, setup()'s data, guards), declared for
    # type checkers only: defined at run time they would shadow GatewayMachine's (MRO order).
    if TYPE_CHECKING:
        settings: ControllerSettings
        now_ms: int
        version: str | None
        container_id: str | None
        started_at_ms: int | None
        backoff_s: float
        restart_due_ms: int | None
        restart_queued: bool
        pending_swap: str | None
        swap_version: str | None
        engine_down_since_ms: int | None
        health_ts_ms: int | None
        reported_health_ts_ms: int
        exit_reason: str
        stop_container_id: str | None

        @property
        def state_name(self) -> str: ...
        @property
        def wanted(self) -> str | None: ...
        def emit(self, *effects: Effect) -> None: ...
        def mark_dirty(self) -> None: ...
        def backoff_pending(self) -> bool: ...
        def names_a_version(self, ev: Event) -> bool: ...

    # -- entering states -----------------------------------------------------

    def on_enter_inspecting(self) -> None:
        self.emit(InspectController(reply="inspect", timeout_s=60.0))

    # A fresh start serves every restart asked for before it; asks during it queue again.
    def on_enter_starting(self) -> None:
        self.restart_queued = False
        self.emit(support.start(self.wanted or "", "start", self.settings))

    def on_enter_restarting(self) -> None:
        self.restart_queued = False
        self.restart_due_ms = None
        self.emit(support.start(self.wanted or "", "start", self.settings))

    def on_enter_swapping(self) -> None:
        self.restart_queued = False
        self.swap_version, self.pending_swap = self.pending_swap, None
        self.emit(support.start(self.swap_version or "", "swap_container", self.settings))

    def on_enter_running(self) -> None:
        self.restart_due_ms = None
        self.emit(StartTimer(name="telemetry_due", seconds=self.settings.first_check_s))
        if self.backoff_s > self.settings.restart_backoff_s:
            self.emit(StartTimer(name="backoff_decay_due", seconds=self.backoff_s))

    def on_enter_unhealthy(self, ev: Event | None = None) -> None:
        if ev is None:  # entered at construction (crash loop): ``resumed`` does the work
            return
        self.emit(support.exited(self.wanted, self.exit_reason))
        if self.stop_container_id is not None:
            self.emit(support.stop(self.stop_container_id, self.settings))
            self.stop_container_id = None
        delay = self._arm_restart()
        self._log("warning", f"controller {self.wanted} unhealthy: {self.exit_reason}; restarting in {delay:.0f} s")

    def on_enter_awaiting_version(self) -> None:
        # A warning, not an error: a fresh install given no version waits here by design,
        # but nothing runs until an operator assigns one.
        self._log("warning", support.NO_VERSION_LOG)
        self.emit(support.ask_sw_info(self.settings), support.no_version_report())
        self.emit(StartTimer(name="version_request_due", seconds=self.settings.version_request_retry_s))

    def on_enter_awaiting_image(self) -> None:
        version = self.wanted
        self._log("warning", support.image_missing_log(version, self.settings.image_retry_s))
        self.emit(support.exited(version, support.image_missing_reason(version)), support.image_missing(version))
        self.emit(StartTimer(name="image_retry_due", seconds=self.settings.image_retry_s))

    def on_exit_awaiting_image(self) -> None:
        self.emit(CancelTimer(name="image_retry_due"))

    def on_enter_engine_unreachable(self, ev: Event | None = None) -> None:
        if self.engine_down_since_ms is None:
            self.engine_down_since_ms = self.now_ms
            error = (ev.data.get("error") if ev is not None else None) or "no answer"
            self._log("error", f"Docker engine unreachable ({error}); retrying every {self.settings.engine_retry_s:g} s")
            self.emit(support.engine_reachable(self.now_ms, False))
        self.emit(StartTimer(name="engine_retry_due", seconds=self.settings.engine_retry_s))

    # -- transition actions --------------------------------------------------

    def on_inspect_succeeded(self) -> None:
        if self.engine_down_since_ms is not None:
            down_s = (self.now_ms - self.engine_down_since_ms) / 1000
            self._log("info", f"Docker engine reachable again after {down_s:.0f} s")
            self.emit(support.engine_reachable(self.now_ms, True))
            self.engine_down_since_ms = None

    def adopt(self, ev: Event) -> None:
        self._took_container(support.result(ev))
        self._log("info", f"adopted the running controller {self.version} ({support.short_id(self.container_id)})")

    def note_started(self, ev: Event) -> None:
        self._took_container(support.result(ev))
        self._log("info", f"controller {self.version} started ({support.short_id(self.container_id)})")

    def note_restarted_by_engine(self, ev: Event) -> None:
        self.started_at_ms = ev.data.get("started_at_ms") or self.now_ms
        self._log("info", f"controller {self.version} restarted by the engine's restart policy")
        self.emit(support.started(self.version))

    def note_backoff_resumed(self) -> None:
        self.exit_reason = "gateway restarted during the restart backoff"

    def note_start_failure(self, ev: Event) -> None:
        self.exit_reason = f"start of {self.wanted} failed: {ev.data.get('error')}"

    def note_exit(self, ev: Event) -> None:
        self.exit_reason = f"container exited with code {ev.data.get('exit_code')}"

    def note_docker_unhealthy(self) -> None:
        self.exit_reason = "the Docker healthcheck reports unhealthy"
        self.stop_container_id = self.container_id

    def note_gone(self) -> None:
        self.exit_reason = "container no longer running (periodic check)"

    def note_stale(self, ev: Event) -> None:
        latest = support.latest_sign_ms(self.health_ts_ms, support.result(ev), self.started_at_ms)
        self.exit_reason = support.stale_reason(self.now_ms, latest, self.settings)
        self.stop_container_id = self.container_id

    def read_health(self) -> None:
        self.emit(ReadControllerHealth(container_id=self.container_id, reply="health", timeout_s=30.0))
        self.emit(StartTimer(name="telemetry_due", seconds=self.settings.telemetry_interval_s))

    def report_health(self, ev: Event) -> None:
        health = support.result(ev).get("health_ts_ms")
        if isinstance(health, int):
            self.health_ts_ms = max(self.health_ts_ms or 0, health)
        self.emit(support.health_report(self.now_ms, self.started_at_ms, self.health_ts_ms))
        if support.newly_seen(self.health_ts_ms, self.started_at_ms, self.reported_health_ts_ms):
            self.reported_health_ts_ms = self.health_ts_ms or 0
            self.emit(support.health_seen(self.version, self.health_ts_ms))

    def decay_backoff(self) -> None:
        self.backoff_s = support.decayed(self.backoff_s, self.settings)
        self.mark_dirty()
        if self.backoff_s > self.settings.restart_backoff_s:
            self.emit(StartTimer(name="backoff_decay_due", seconds=self.backoff_s))

    def grow_backoff(self) -> None:
        self.backoff_s = support.grown(self.backoff_s, self.settings)

    def log_stop_failure(self, ev: Event) -> None:
        self._log("warning", f"stopping the unhealthy controller failed: {ev.data.get('error')}")

    def log_restart_request(self, ev: Event) -> None:
        self._log("info", f"controller restart requested: {ev.data.get('reason', support.NO_REASON)}")

    def queue_restart(self, ev: Event) -> None:
        self.restart_queued = True
        self.mark_dirty()
        reason = ev.data.get("reason", support.NO_REASON)
        self._log("info", f"controller restart requested ({reason}) while {self.state_name}: queued until it runs")

    def take_swap(self, ev: Event) -> None:
        self.pending_swap = ev.data["version"]

    def queue_swap(self, ev: Event) -> None:
        version = ev.data["version"]
        if version == self.swap_version and self.pending_swap is None:
            return  # the swap in flight is this one
        self.pending_swap = version
        self.mark_dirty()
        self._log("info", f"swap to {version} queued behind the swap to {self.swap_version}")

    def refuse_swap(self, ev: Event) -> None:
        version = ev.data.get("version")
        self.emit(support.swap_failed(version, support.refusal(version, self.names_a_version(ev))))

    def finish_swap(self, ev: Event) -> None:
        self._took_container(support.result(ev))
        self.version = self.swap_version
        self._log("info", f"swapped to controller {self.version} ({support.short_id(self.container_id)})")
        self.emit(support.swap_succeeded(self.swap_version))
        self.swap_version = None

    def fail_swap(self, ev: Event) -> None:
        error = ev.data.get("error") or "unknown error"
        self.exit_reason = f"swap to {self.swap_version} failed: {error}"
        self.emit(support.swap_failed(self.swap_version, error))
        self.swap_version = None

    def log_sw_info(self, ev: Event) -> None:
        offered = support.offered(support.result(ev).get("shared") or {})
        self._log("info", f"ThingsBoard assigns {offered}; waiting for OTA to install it")

    def resume_after_crash_loop(self, ev: Event) -> None:
        self.exit_reason = f"the gateway crashed repeatedly while {ev.data.get('from_state')}"
        if self.pending_swap is not None:
            self.emit(support.swap_failed(self.pending_swap, self.exit_reason))
            self.pending_swap = None
        delay = self._arm_restart()
        self._log("error", f"{self.exit_reason}: restarting the controller in {delay:.0f} s")

    # -- helpers -------------------------------------------------------------

    def _took_container(self, found: dict[str, Any]) -> None:
        self.version = found.get("version") or self.wanted
        self.container_id = found.get("container_id")
        self.started_at_ms = found.get("started_at_ms") or self.now_ms
        self.health_ts_ms = None
        self.reported_health_ts_ms = 0
        self.emit(support.started(self.version))

    def _arm_restart(self) -> float:
        """Arm the restart timer for the pending backoff, or a fresh one; returns its delay."""
        if not self.backoff_pending():
            self.restart_due_ms = self.now_ms + int(self.backoff_s * 1000)
        delay = ((self.restart_due_ms or self.now_ms) - self.now_ms) / 1000
        self.emit(StartTimer(name="restart_backoff_elapsed", seconds=delay))
        return delay

    def _log(self, level: str, message: str) -> None:
        self.emit(support.log(level, message))
