"""The controller machine: keeps one controller container running, of the right version.

What it is for: the gateway supervises one application container,
``teg_controller``, from the image ``teg-controller-<version>:latest``. At start
it adopts a running container of the wanted version (no restart), or starts
one. An exit, a Docker healthcheck gone ``unhealthy`` or a health check older
than ``health_check_max_age_s`` (the controller's ``health_check`` row, default
6 h) makes it ``unhealthy``: the container is stopped if it still runs, and
restarted after a backoff that grows by ``restart_backoff_factor`` per restart
(existing gateway: 600 s x 1.6) and shrinks by the same factor for each
backoff period the controller then stays up. The wanted version is the one
this machine last ran, else ``boot_version`` (last_launched_controller_version.txt,
else TEG_DEFAULT_CONTROLLER_VERSION); with neither, it asks ThingsBoard for
``sw_title,sw_url,sw_version`` and reports ``sw_state`` FAILED, like the
existing gateway, and waits for OTA's ``swap_requested``.

A start that finds no image of the wanted version enters ``awaiting_image``
and asks OTA (``controller_image_missing``) to fetch, check out and build it;
OTA answers with ``swap_requested``. The start is tried again every
``image_retry_s``, asking OTA again.

Events it takes: ``gateway_started``; ``swap_requested`` {version} (OTA) and
``restart_requested`` {reason} (RPC, file sync); the Docker adapter's
``container_exited`` {container_id, exit_code}, ``container_started``
{container_id, started_at_ms}, ``container_health_changed`` {container_id,
status}, ``docker_engine_lost`` / ``docker_engine_returned``; the outcomes of
its effects (``inspect_*``, ``start_*``, ``swap_container_*``, ``stop_*``, ``health_*``,
``sw_info_*``); its timers; ``resumed``.

Effects it emits: InspectController, StartController (reply ``start`` or
``swap_container``), StopController, ReadControllerHealth, Publish (telemetry
``ms_since_controller_startup`` / ``ms_since_last_controller_health_check``
every ``telemetry_interval_s`` while running, ``sw_state`` FAILED,
``docker_engine_reachable``), RequestAttributes, Log, timers, and Notify:
``swap_succeeded`` / ``swap_failed`` / ``controller_image_missing`` to ``ota``;
broadcasts ``controller_started`` {version}, ``controller_exited`` {version,
reason} (only for exits nobody asked for: crash, stale health, failed start,
missing image) and ``controller_health_seen``
{version, health_ts_ms} (a health check newer than the last one reported,
written since the container started; at most once per telemetry tick).

Concurrency: ``swap_requested`` takes over from any state except
``engine_unreachable`` (answered ``swap_failed`` at once) and ``swapping``
(queued, the latest request wins, run when the current swap ends). The Docker
adapter runs lifecycle effects one at a time, in order, so a start the swap
overtook finishes first and the swap replaces it. ``restart_requested`` is
QUEUED (one pending restart, coalesced) while the machine is busy (stopped,
inspecting, starting, restarting, swapping) or the engine is unreachable,
and carried out when the controller is next running; in ``awaiting_version``
there is nothing to restart and it is ignored.

Persisted: the version it runs, the container's id and start time, the
current backoff, when a pending restart is due, a queued restart or swap (a
swap in flight counts as queued), since when the engine is unreachable and
the engine retry delay (``engine_retry_s``, doubled per retry that finds the
engine still down, up to ``engine_retry_max_s``; back to ``engine_retry_s``
once the engine answers). Resume: every state re-enters ``stopped``;
``gateway_started`` then re-inspects the engine, which adopts a running
controller, finishes a pending backoff, or carries out the queued swap. A
crash loop in a busy state lands in ``unhealthy`` (wait the backoff, then
restart; a swap in flight is answered ``swap_failed``).

Read top-down: the resume flags, the states, the transitions (one statement per
event), the data, the guards, then the actions. Pure helpers that need no
machine state (settings, backoff arithmetic, payload builders, texts) are in
``controller_rules``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from statemachine import State

from teg_fsm.engine.effects import CancelTimer, StartTimer
from teg_fsm.engine.effects.controller import InspectController, ReadControllerHealth
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.machines import controller_rules as rules
from teg_fsm.machines.controller_rules import ControllerSettings, stay

__all__ = ["ControllerMachine"]


class ControllerMachine(GatewayMachine):
    """The table, its data, guards and actions; pure helpers are in ``controller_rules``."""

    machine_name = "controller"
    settings_type = ControllerSettings
    resume_table = {
        "stopped": "stopped", "inspecting": "stopped", "starting": "stopped", "running": "stopped",
        "unhealthy": "stopped", "restarting": "stopped", "swapping": "stopped",
        "awaiting_version": "stopped", "awaiting_image": "stopped", "engine_unreachable": "stopped",
    }
    rest_states = frozenset(
        {"stopped", "running", "unhealthy", "awaiting_version", "awaiting_image", "engine_unreachable"}
    )
    crash_loop_state = "unhealthy"
    max_resumes = 3

    stopped = State(initial=True)
    inspecting = State()
    starting = State()
    running = State()
    unhealthy = State()
    restarting = State()
    swapping = State()
    awaiting_version = State()
    awaiting_image = State()
    engine_unreachable = State()

    gateway_started = stopped.to(inspecting)
    inspect_succeeded = (
        inspecting.to(swapping, cond="swap_pending")
        | inspecting.to(restarting, cond=["found_wanted_running", "restart_pending"], on="adopt")
        | inspecting.to(running, cond="found_wanted_running", on="adopt")
        | inspecting.to(unhealthy, cond=["has_version", "backoff_pending"], on="note_backoff_resumed")
        | inspecting.to(starting, cond="has_version")
        | inspecting.to(awaiting_version)
    )
    inspect_failed = inspecting.to(engine_unreachable)
    inspect_timed_out = inspecting.to(engine_unreachable)
    inspect_cancelled = inspecting.to(engine_unreachable)  # only at shutdown; re-inspected on resume
    start_succeeded = (
        starting.to(restarting, cond="restart_pending", on="note_started")
        | restarting.to.itself(cond="restart_pending", on="note_started")
        | starting.to(running, on="note_started")
        | restarting.to(running, on="note_started")
    )
    start_failed = (
        starting.to(engine_unreachable, cond="engine_down") | restarting.to(engine_unreachable, cond="engine_down")
        | starting.to(awaiting_image, cond="image_missing") | restarting.to(awaiting_image, cond="image_missing")
        | starting.to(unhealthy, on="note_start_failure") | restarting.to(unhealthy, on="note_start_failure")
    )
    start_timed_out = starting.to(unhealthy, on="note_start_failure") | restarting.to(unhealthy, on="note_start_failure")
    start_cancelled = starting.to(unhealthy, on="note_start_failure") | restarting.to(unhealthy, on="note_start_failure")

    # running: the container's own events, and the periodic health read
    container_exited = running.to(unhealthy, cond="is_ours", on="note_exit")
    container_health_changed = running.to(unhealthy, cond=["is_ours", "docker_says_unhealthy"], on="note_docker_unhealthy")
    container_started = unhealthy.to(running, cond="is_ours", on="note_restarted_by_engine")
    telemetry_due = running.to.itself(internal=True, on="read_health")
    health_succeeded = (
        running.to(unhealthy, cond="container_gone", on="note_gone")
        | running.to(unhealthy, cond="health_stale", on="note_stale")
        | running.to.itself(internal=True, on="report_health")
    )
    health_failed = running.to(unhealthy, cond="health_stale", on="note_stale") | running.to.itself(internal=True)
    health_timed_out = running.to(unhealthy, cond="health_stale", on="note_stale") | running.to.itself(internal=True)
    health_cancelled = running.to.itself(internal=True)  # only at shutdown
    backoff_decay_due = running.to.itself(internal=True, on="decay_backoff")

    # unhealthy: wait the backoff, then restart
    restart_backoff_elapsed = unhealthy.to(restarting, cond="has_version", on="grow_backoff") | unhealthy.to(awaiting_version)
    stop_succeeded = unhealthy.to.itself(internal=True)
    stop_failed = unhealthy.to.itself(internal=True, on="log_stop_failure")  # the restart removes it anyway
    stop_timed_out = unhealthy.to.itself(internal=True, on="log_stop_failure")
    stop_cancelled = unhealthy.to.itself(internal=True)  # only at shutdown

    # requests from other machines
    restart_requested = (
        running.to(restarting, on="log_restart_request")
        | unhealthy.to(restarting, cond="has_version", on="log_restart_request")
        | stay(stopped, inspecting, starting, restarting, swapping, engine_unreachable, on="queue_restart")
    )
    swap_requested = (
        stay(
            stopped, inspecting, starting, running, unhealthy, restarting, swapping, awaiting_version,
            awaiting_image, engine_unreachable, unless="names_a_version", on="refuse_swap",
        )
        | stopped.to(swapping, on="take_swap") | inspecting.to(swapping, on="take_swap")
        | starting.to(swapping, on="take_swap") | restarting.to(swapping, on="take_swap")
        | running.to(swapping, on="take_swap") | unhealthy.to(swapping, on="take_swap")
        | awaiting_version.to(swapping, on="take_swap") | awaiting_image.to(swapping, on="take_swap")
        | swapping.to.itself(internal=True, on="queue_swap")
        | engine_unreachable.to.itself(internal=True, on="refuse_swap")
    )
    swap_container_succeeded = (
        swapping.to.itself(cond="swap_pending", on="finish_swap")
        | swapping.to(restarting, cond="restart_pending", on="finish_swap")
        | swapping.to(running, on="finish_swap")
    )
    swap_container_failed = (
        swapping.to.itself(cond="swap_pending", on="fail_swap")
        | swapping.to(engine_unreachable, cond="engine_down", on="fail_swap")
        | swapping.to(unhealthy, on="fail_swap")
    )
    swap_container_timed_out = swapping.to.itself(cond="swap_pending", on="fail_swap") | swapping.to(unhealthy, on="fail_swap")
    swap_container_cancelled = swapping.to(unhealthy, on="fail_swap")  # only at shutdown

    # no version known: ask ThingsBoard, report FAILED, wait for OTA
    version_request_due = awaiting_version.to.itself()
    sw_info_succeeded = awaiting_version.to.itself(internal=True, on="log_sw_info")
    sw_info_failed = awaiting_version.to.itself(internal=True)  # version_request_due asks again
    sw_info_timed_out = awaiting_version.to.itself(internal=True)
    sw_info_cancelled = awaiting_version.to.itself(internal=True)

    # no image of the wanted version: OTA's pipeline builds it and answers with a swap;
    # meanwhile the start is tried again now and then (the image may come back)
    image_retry_due = awaiting_image.to(starting, cond="has_version") | awaiting_image.to(awaiting_version)

    # the Docker engine
    docker_engine_lost = (
        running.to(engine_unreachable) | unhealthy.to(engine_unreachable) | awaiting_image.to(engine_unreachable)
    )
    engine_retry_due = engine_unreachable.to(inspecting, on="back_off_engine_retry")
    docker_engine_returned = engine_unreachable.to(inspecting, on="reset_engine_retry")

    resumed = unhealthy.to.itself(internal=True, on="resume_after_crash_loop") | stopped.to.itself(internal=True)

    # -- data ----------------------------------------------------------------

    # The checkpoint holds these attributes of setup()'s, under their own names.
    # Persisted names are a contract (STYLE 4): keep these keys, in this order.
    persisted: ClassVar[tuple[str, ...]] = (
        "version", "container_id", "started_at_ms", "backoff_s", "restart_due_ms",
        "restart_queued", "pending_swap", "swap_version", "engine_down_since_ms", "engine_retry_delay_s",
    )

    def setup(self) -> None:
        self.version: str | None = None
        self.container_id: str | None = None
        self.started_at_ms: int | None = None
        self.backoff_s: float = self.settings.restart_backoff_s
        self.restart_due_ms: int | None = None
        self.restart_queued = False
        self.pending_swap: str | None = None
        self.swap_version: str | None = None
        self.engine_down_since_ms: int | None = None
        self.engine_retry_delay_s: float = self.settings.engine_retry_s
        self.health_ts_ms: int | None = None  # not persisted: re-read within one tick
        self.reported_health_ts_ms = 0
        self.exit_reason = ""
        self.stop_container_id: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.persisted}

    def restore(self, data: Any) -> None:
        for key in self.persisted:
            if key in data:
                setattr(self, key, data[key])
        self.backoff_s = rules.clamp(float(self.backoff_s), self.settings)
        self.engine_retry_delay_s = rules.engine_retry_clamp(float(self.engine_retry_delay_s), self.settings)
        # A swap cut short by a crash is done again: OTA still waits for its answer.
        self.pending_swap = self.pending_swap or self.swap_version
        self.swap_version = None

    @property
    def wanted(self) -> str | None:
        return self.version or self.settings.boot_version

    # -- guards --------------------------------------------------------------

    def names_a_version(self, ev: Event) -> bool:
        """The event names a controller version (a non-empty string)."""
        version = ev.data.get("version")
        return isinstance(version, str) and bool(version)

    def has_version(self) -> bool:
        """A controller version to run is known."""
        return self.wanted is not None

    def swap_pending(self) -> bool:
        """A swap to another version was requested and waits to be carried out."""
        return self.pending_swap is not None

    def restart_pending(self) -> bool:
        """A restart was requested while busy and waits to be carried out."""
        return self.restart_queued

    def backoff_pending(self) -> bool:
        """The restart back-off after a failure has not run out yet."""
        return self.restart_due_ms is not None and self.restart_due_ms > self.now_ms

    def found_wanted_running(self, ev: Event) -> bool:
        """The inspection found the wanted version's container running (any version if none is wanted)."""
        return rules.found_running(rules.result(ev), self.wanted)

    def engine_down(self, ev: Event) -> bool:
        """The effect failed because the Docker engine could not be reached."""
        return bool(ev.data.get("engine_unreachable"))

    def image_missing(self, ev: Event) -> bool:
        """The start failed because the version's image is not on the engine (OTA builds it)."""
        return bool(ev.data.get("image_missing"))

    def is_ours(self, ev: Event) -> bool:
        """The Docker event is about the container this machine started."""
        return self.container_id is not None and ev.data.get("container_id") == self.container_id

    def docker_says_unhealthy(self, ev: Event) -> bool:
        """Docker reports the container's health check as unhealthy."""
        return ev.data.get("status") == "unhealthy"

    def container_gone(self, ev: Event) -> bool:
        """The health read says our container no longer runs."""
        return rules.gone(rules.result(ev), self.container_id)

    def health_stale(self, ev: Event) -> bool:
        """The last sign of life is older than the allowed health-check age."""
        latest = rules.latest_sign_ms(self.health_ts_ms, rules.result(ev), self.started_at_ms)
        return self.now_ms - latest > self.settings.health_check_max_age_s * 1000

    # -- actions: entering states --------------------------------------------
    # Pure, like the guards: they update the machine's data and emit effects.

    def on_enter_inspecting(self) -> None:
        self.emit(InspectController(reply="inspect", timeout_s=60.0))

    # A fresh start serves every restart asked for before it; asks during it queue again.
    def on_enter_starting(self) -> None:
        self.restart_queued = False
        self.emit(rules.start(self.wanted or "", "start", self.settings))

    def on_enter_restarting(self) -> None:
        self.restart_queued = False
        self.restart_due_ms = None
        self.emit(rules.start(self.wanted or "", "start", self.settings))

    def on_enter_swapping(self) -> None:
        self.restart_queued = False
        self.swap_version, self.pending_swap = self.pending_swap, None
        self.emit(rules.start(self.swap_version or "", "swap_container", self.settings))

    def on_enter_running(self) -> None:
        self.restart_due_ms = None
        self.emit(StartTimer(name="telemetry_due", seconds=self.settings.first_check_s))
        if self.backoff_s > self.settings.restart_backoff_s:
            self.emit(StartTimer(name="backoff_decay_due", seconds=self.backoff_s))

    def on_enter_unhealthy(self, ev: Event | None = None) -> None:
        if ev is None:  # entered at construction (crash loop): ``resumed`` does the work
            return
        self.emit(rules.exited(self.wanted, self.exit_reason))
        if self.stop_container_id is not None:
            self.emit(rules.stop(self.stop_container_id, self.settings))
            self.stop_container_id = None
        delay = self._arm_restart()
        self._log("warning", f"controller {self.wanted} unhealthy: {self.exit_reason}; restarting in {delay:.0f} s")

    def on_enter_awaiting_version(self) -> None:
        # A warning, not an error: a fresh install given no version waits here by design,
        # but nothing runs until an operator assigns one.
        self._log("warning", rules.NO_VERSION_LOG)
        self.emit(rules.ask_sw_info(self.settings), rules.no_version_report())
        self.emit(StartTimer(name="version_request_due", seconds=self.settings.version_request_retry_s))

    def on_enter_awaiting_image(self) -> None:
        version = self.wanted
        self._log("warning", rules.image_missing_log(version, self.settings.image_retry_s))
        self.emit(rules.exited(version, rules.image_missing_reason(version)), rules.image_missing(version))
        self.emit(StartTimer(name="image_retry_due", seconds=self.settings.image_retry_s))

    def on_exit_awaiting_image(self) -> None:
        self.emit(CancelTimer(name="image_retry_due"))

    def on_enter_engine_unreachable(self, ev: Event | None = None) -> None:
        if self.engine_down_since_ms is None:
            self.engine_down_since_ms = self.now_ms
            error = (ev.data.get("error") if ev is not None else None) or "no answer"
            self._log("error", rules.engine_unreachable_log(error, self.engine_retry_delay_s, self.settings))
            self.emit(rules.engine_reachable(self.now_ms, False))
        self.emit(StartTimer(name="engine_retry_due", seconds=self.engine_retry_delay_s))

    # -- actions: taking transitions -----------------------------------------

    def on_inspect_succeeded(self) -> None:
        self.reset_engine_retry()
        if self.engine_down_since_ms is not None:
            down_s = (self.now_ms - self.engine_down_since_ms) / 1000
            self._log("info", f"Docker engine reachable again after {down_s:.0f} s")
            self.emit(rules.engine_reachable(self.now_ms, True))
            self.engine_down_since_ms = None

    def adopt(self, ev: Event) -> None:
        self._took_container(rules.result(ev))
        self._log("info", f"adopted the running controller {self.version} ({rules.short_id(self.container_id)})")

    def note_started(self, ev: Event) -> None:
        self._took_container(rules.result(ev))
        self._log("info", f"controller {self.version} started ({rules.short_id(self.container_id)})")

    def note_restarted_by_engine(self, ev: Event) -> None:
        self.started_at_ms = ev.data.get("started_at_ms") or self.now_ms
        self._log("info", f"controller {self.version} restarted by the engine's restart policy")
        self.emit(rules.started(self.version))

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
        latest = rules.latest_sign_ms(self.health_ts_ms, rules.result(ev), self.started_at_ms)
        self.exit_reason = rules.stale_reason(self.now_ms, latest, self.settings)
        self.stop_container_id = self.container_id

    def read_health(self) -> None:
        self.emit(ReadControllerHealth(container_id=self.container_id, reply="health", timeout_s=30.0))
        self.emit(StartTimer(name="telemetry_due", seconds=self.settings.telemetry_interval_s))

    def report_health(self, ev: Event) -> None:
        health = rules.result(ev).get("health_ts_ms")
        if isinstance(health, int):
            self.health_ts_ms = max(self.health_ts_ms or 0, health)
        self.emit(rules.health_report(self.now_ms, self.started_at_ms, self.health_ts_ms))
        if rules.newly_seen(self.health_ts_ms, self.started_at_ms, self.reported_health_ts_ms):
            self.reported_health_ts_ms = self.health_ts_ms or 0
            self.emit(rules.health_seen(self.version, self.health_ts_ms))

    # The event watcher posts docker_engine_returned as soon as the engine answers, so the
    # machine's own retries are a safety net: while the engine stays down they need not
    # cost a journaled inspect and two state points every 10 s. The grown delay is the one
    # the next wait in engine_unreachable uses; a resumed machine continues from it.
    def back_off_engine_retry(self) -> None:
        self.engine_retry_delay_s = rules.engine_retry_grown(self.engine_retry_delay_s, self.settings)

    def reset_engine_retry(self) -> None:
        self.engine_retry_delay_s = self.settings.engine_retry_s

    def decay_backoff(self) -> None:
        self.backoff_s = rules.decayed(self.backoff_s, self.settings)
        self.mark_dirty()
        if self.backoff_s > self.settings.restart_backoff_s:
            self.emit(StartTimer(name="backoff_decay_due", seconds=self.backoff_s))

    def grow_backoff(self) -> None:
        self.backoff_s = rules.grown(self.backoff_s, self.settings)

    def log_stop_failure(self, ev: Event) -> None:
        self._log("warning", f"stopping the unhealthy controller failed: {ev.data.get('error')}")

    def log_restart_request(self, ev: Event) -> None:
        self._log("info", f"controller restart requested: {ev.data.get('reason', rules.NO_REASON)}")

    def queue_restart(self, ev: Event) -> None:
        self.restart_queued = True
        self.mark_dirty()
        reason = ev.data.get("reason", rules.NO_REASON)
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
        self.emit(rules.swap_failed(version, rules.refusal(version, self.names_a_version(ev))))

    def finish_swap(self, ev: Event) -> None:
        self._took_container(rules.result(ev))
        self.version = self.swap_version
        self._log("info", f"swapped to controller {self.version} ({rules.short_id(self.container_id)})")
        self.emit(rules.swap_succeeded(self.swap_version))
        self.swap_version = None

    def fail_swap(self, ev: Event) -> None:
        error = ev.data.get("error") or "unknown error"
        self.exit_reason = f"swap to {self.swap_version} failed: {error}"
        self.emit(rules.swap_failed(self.swap_version, error))
        self.swap_version = None

    def log_sw_info(self, ev: Event) -> None:
        offered = rules.offered(rules.result(ev).get("shared") or {})
        self._log("info", f"ThingsBoard assigns {offered}; waiting for OTA to install it")

    def resume_after_crash_loop(self, ev: Event) -> None:
        self.exit_reason = f"the gateway crashed repeatedly while {ev.data.get('from_state')}"
        if self.pending_swap is not None:
            self.emit(rules.swap_failed(self.pending_swap, self.exit_reason))
            self.pending_swap = None
        delay = self._arm_restart()
        self._log("error", f"{self.exit_reason}: restarting the controller in {delay:.0f} s")

    # -- actions: shared steps -----------------------------------------------

    def _took_container(self, found: dict[str, Any]) -> None:
        self.version = found.get("version") or self.wanted
        self.container_id = found.get("container_id")
        self.started_at_ms = found.get("started_at_ms") or self.now_ms
        self.health_ts_ms = None
        self.reported_health_ts_ms = 0
        self.emit(rules.started(self.version))

    def _arm_restart(self) -> float:
        """Arm the restart timer for the pending backoff, or a fresh one; returns its delay."""
        if not self.backoff_pending():
            self.restart_due_ms = self.now_ms + int(self.backoff_s * 1000)
        delay = ((self.restart_due_ms or self.now_ms) - self.now_ms) / 1000
        self.emit(StartTimer(name="restart_backoff_elapsed", seconds=delay))
        return delay

    def _log(self, level: str, message: str) -> None:
        self.emit(rules.log(level, message))
