"""The reasons the ota machine gives in ``sw_error``, one function per text.

Operators read these on ThingsBoard and recorded journals contain them:
change a text and the replay snapshots change with it. Pure, no I/O.
"""

from __future__ import annotations

from typing import Any

from teg_fsm.engine.events import Event

OPERATOR_ROLLBACK = "operator asked for a rollback"


def error_of(ev: Event) -> str:
    """What went wrong, as an outcome event tells it."""
    return str(ev.data.get("error") or ev.data.get("reason") or ev.name.replace("_", " "))


def spaced(state_name: Any) -> str:
    """``rolling_back`` -> ``rolling back``."""
    return str(state_name).replace("_", " ")


def fetch_failed(target: str | None, error: str) -> str:
    return f"fetching the controller repository for {target} failed: {error}"


def fetch_failed_trying_local(target: str | None, error: str) -> str:
    return f"fetching the controller repository for {target} failed ({error}); trying the local refs"


def image_missing(version: str) -> str:
    return f"the controller has no image of {version}: fetching, checking out and building it"


def step_failed(event_name: str, target: str | None, error: str) -> str:
    step = "checking out" if event_name.startswith("checkout") else "building the image of"
    return f"{step} {target} failed: {error}"


def live_failed(event_name: str, target: str | None, error: str) -> str:
    what = "starting" if event_name.startswith("swap") else "probation of"
    return f"{what} {target} failed: {error}"


def swap_timed_out(target: str | None, seconds: float) -> str:
    return f"the swap to {target} did not finish within {seconds:g} s"


def no_health(target: str | None, seconds: float) -> str:
    return f"{target} wrote no health check within {seconds:g} s"


def without_rollback(reason: str, target_is_last_good: bool = False) -> str:
    if target_is_last_good:
        return f"{reason}; it is the last good version: the controller machine keeps restarting it"
    return f"{reason}; no last good version to roll back to"


def rolled_back(last_good: str | None, reason: str) -> str:
    return f"rolled back to {last_good}: {reason}"


def rollback_failed(last_good: str | None, error: str, reason: str) -> str:
    return f"rolling back to {last_good} failed ({error}) after: {reason}"


def crash_loop(from_state: Any, target: str | None) -> str:
    return f"the gateway restarted repeatedly during {spaced(from_state)} of {target}"


def gave_up(from_state: Any, target: str | None) -> str:
    return f"gave up on {target}: the gateway restarted repeatedly while {spaced(from_state)}"


def cancelled_by_operator(target: str | None, running: str | None) -> str:
    return f"update to {target} cancelled by operator; {running} still running"


def record_failed(running: str | None, version_file: str, error: str) -> str:
    return f"{running} runs, but {version_file} could not be written ({error}); free space or fix permissions"
