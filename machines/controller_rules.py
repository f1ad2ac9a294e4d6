"""The controller machine's pure rules: settings, backoff arithmetic, payloads, texts.

Nothing here keeps state or emits: ``machines/controller.py`` holds the machine
(table, guards, actions), whose guards and actions call these to compute values
and build the effects they then emit, so they stay one or two lines each.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from statemachine import State

from teg_fsm.engine.effects import Log, Notify
from teg_fsm.engine.effects.controller import ENGINE_UNREACHABLE, StartController, StopController
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC, Publish, RequestAttributes
from teg_fsm.engine.events import Event

NO_VERSION_ERROR = "No previous version known to launch from, requested version info from ThingsBoard"
NO_VERSION_LOG = (
    "No controller version known (no last launched version, no TEG_DEFAULT_CONTROLLER_VERSION): "
    "asked ThingsBoard for sw_title,sw_url,sw_version; waiting for an OTA assignment"
)
SW_INFO_KEYS = ("sw_title", "sw_url", "sw_version")
NO_REASON = "no reason given"

@attrs.define
class ControllerSettings:
    boot_version: str | None = None
    health_check_max_age_s: float = 6 * 3600.0
    restart_backoff_s: float = 600.0
    restart_backoff_factor: float = 1.6
    restart_backoff_max_s: float = 24 * 3600.0
    stop_timeout_s: float = 60.0
    telemetry_interval_s: float = 20.0
    first_check_s: float = 5.0
    engine_retry_s: float = 10.0  # the first retry after the engine stopped answering
    engine_retry_max_s: float = 300.0  # the retries double up to this (the event watcher is faster)
    version_request_retry_s: float = 600.0
    attributes_timeout_s: float = 30.0
    image_retry_s: float = 600.0


def stay(*states: State, **options: Any) -> Any:
    """The same internal (no exit/enter) transition out of each of ``states``."""
    transitions = states[0].to.itself(internal=True, **options)
    for state in states[1:]:
        transitions = transitions | state.to.itself(internal=True, **options)
    return transitions


def result(ev: Event) -> dict[str, Any]:
    """The ``result`` of an effect outcome, ``{}`` when it has none."""
    found = ev.data.get("result")
    return found if isinstance(found, dict) else {}


def short_id(container_id: str | None) -> str:
    return (container_id or "")[:12]


# -- backoff -----------------------------------------------------------------


def clamp(backoff_s: float, settings: ControllerSettings) -> float:
    return min(max(backoff_s, settings.restart_backoff_s), settings.restart_backoff_max_s)


def grown(backoff_s: float, settings: ControllerSettings) -> float:
    """The backoff after one more restart (the existing gateway grows it per restart)."""
    return clamp(backoff_s * settings.restart_backoff_factor, settings)


def decayed(backoff_s: float, settings: ControllerSettings) -> float:
    """The backoff after one backoff period the controller stayed up."""
    return max(settings.restart_backoff_s, backoff_s / settings.restart_backoff_factor)


def engine_retry_clamp(delay_s: float, settings: ControllerSettings) -> float:
    """``delay_s`` within [engine_retry_s, engine_retry_max_s] (a cap below the base means no backoff)."""
    return min(max(delay_s, settings.engine_retry_s), max(settings.engine_retry_s, settings.engine_retry_max_s))


def engine_retry_grown(delay_s: float, settings: ControllerSettings) -> float:
    """The engine retry delay after one more retry that found the engine down: doubled, capped."""
    return engine_retry_clamp(delay_s * 2, settings)


# -- health ------------------------------------------------------------------


def found_running(found: dict[str, Any], wanted: str | None) -> bool:
    """An inspection found a running controller of the wanted version (any, if none is wanted)."""
    version = found.get("version")
    return bool(found.get("running")) and version is not None and wanted in (None, version)


def gone(found: dict[str, Any], container_id: str | None) -> bool:
    """A health read says our container no longer runs."""
    if found.get("running") is None or found.get("asked_for") != container_id:
        return False  # the engine did not answer, or a late answer about a replaced container
    return found.get("running") is False or found.get("container_id") != container_id


def latest_sign_ms(health_ts_ms: int | None, found: dict[str, Any], started_at_ms: int | None) -> int:
    """The last sign of life: a health check seen before, the one just read, or the start."""
    return max(health_ts_ms or 0, found.get("health_ts_ms") or 0, started_at_ms or 0)


def stale_reason(now_ms: int, latest_ms: int, settings: ControllerSettings) -> str:
    limit = settings.health_check_max_age_s
    return f"no health check for {(now_ms - latest_ms) / 1000:.0f} s (limit {limit:g} s)"


def newly_seen(health_ts_ms: int | None, started_at_ms: int | None, reported_ms: int) -> bool:
    """A health check written since the container started and newer than the last one reported."""
    fresh = health_ts_ms is not None and health_ts_ms >= (started_at_ms or 0)
    return fresh and health_ts_ms > reported_ms  # type: ignore[operator]


# -- effects -----------------------------------------------------------------


def start(version: str, reply: str, settings: ControllerSettings) -> StartController:
    return StartController(version=version, reply=reply, timeout_s=settings.stop_timeout_s + 120)


def stop(container_id: str, settings: ControllerSettings) -> StopController:
    return StopController(container_id=container_id, reply="stop", timeout_s=settings.stop_timeout_s + 30)


def ask_sw_info(settings: ControllerSettings) -> RequestAttributes:
    return RequestAttributes(shared_keys=SW_INFO_KEYS, reply="sw_info", timeout_s=settings.attributes_timeout_s)


def telemetry(payload: dict[str, Any]) -> Publish:
    return Publish(topic=TELEMETRY_TOPIC, payload=json.dumps(payload, sort_keys=True))


def no_version_report() -> Publish:
    """``sw_state`` FAILED, as the existing gateway reports when it has no version to run."""
    return telemetry({"current_sw_title": "UNKNOWN", "current_sw_version": "UNKNOWN", "sw_state": "FAILED",
                      "sw_error": NO_VERSION_ERROR})


def engine_reachable(now_ms: int, reachable: bool) -> Publish:
    return telemetry({"ts": now_ms, "values": {"docker_engine_reachable": reachable}})


def health_report(now_ms: int, started_at_ms: int | None, health_ts_ms: int | None) -> Publish:
    # Like the existing gateway: with no health check yet the age is ``now - 0`` (its
    # dashboard expects the key every time; a huge value reads as "never").
    values = {"ms_since_controller_startup": now_ms - (started_at_ms or now_ms),
              "ms_since_last_controller_health_check": now_ms - (health_ts_ms or 0)}
    return telemetry({"ts": now_ms, "values": values})


def started(version: str | None) -> Notify:
    return Notify(machine=None, name="controller_started", data={"version": version})


def exited(version: str | None, reason: str) -> Notify:
    return Notify(machine=None, name="controller_exited", data={"version": version, "reason": reason})


def health_seen(version: str | None, health_ts_ms: int | None) -> Notify:
    return Notify(machine=None, name="controller_health_seen", data={"version": version, "health_ts_ms": health_ts_ms})


def image_missing(version: str | None) -> Notify:
    """Ask OTA to bring ``version`` into service through its pipeline (fetch, check out, build, swap)."""
    return Notify(machine="ota", name="controller_image_missing", data={"version": version})


def swap_succeeded(version: str | None) -> Notify:
    return Notify(machine="ota", name="swap_succeeded", data={"version": version})


def swap_failed(version: Any, error: str) -> Notify:
    return Notify(machine="ota", name="swap_failed", data={"version": version, "error": error})


def log(level: str, message: str) -> Log:
    return Log(level=level, message=message)


# -- texts -------------------------------------------------------------------


def refusal(version: Any, names_a_version: bool) -> str:
    """Why a swap is refused: no version named, else the engine is down."""
    if not names_a_version:
        return f"swap_requested without a version: {version!r}"
    return f"{ENGINE_UNREACHABLE}: cannot swap now"


def image_missing_reason(version: str | None) -> str:
    return f"image teg-controller-{version}:latest not found"


def image_missing_log(version: str | None, retry_s: float) -> str:
    return (f"{image_missing_reason(version)}: asked OTA to fetch, check out and build {version}; "
            f"trying the start again in {retry_s:g} s")


def engine_unreachable_log(error: str, delay_s: float, settings: ControllerSettings) -> str:
    """Said once per outage: when the next inspect comes and how the retries then back off."""
    cap = max(settings.engine_retry_s, settings.engine_retry_max_s)
    if delay_s >= cap:
        return f"Docker engine unreachable ({error}); retrying every {cap:g} s"
    return (f"Docker engine unreachable ({error}); retrying in {delay_s:g} s, "
            f"then backing off (doubling) to every {cap:g} s")


def offered(shared: dict[str, Any]) -> str:
    """What ThingsBoard assigns, e.g. ``sw_title=ctl, sw_version=v2``."""
    return ", ".join(f"{k}={shared[k]}" for k in ("sw_title", "sw_version") if k in shared) or "no version"
