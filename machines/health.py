"""The health machine: the gateway's declared degraded conditions, reported to ThingsBoard.

What it is for: a full disk, a storage error or a damaged file the gateway
moved aside is a declared condition, not an exception. The engine (the
dispatcher's idle watch and the composition root at start) turns each into an
event; this machine keeps the set of active conditions, logs each change once
and reports it as telemetry, again after every (re)connect until a report was
acknowledged, so a condition that came and went while offline is still told.

Events: ``condition_raised`` {condition, detail}, ``condition_cleared``
{condition, dropped_rows}, ``file_quarantined`` {file, path},
``shared_attributes_received`` (broadcast after every connect), the outcomes
of its ``report`` publish.
Effects: ``Log``, ``Publish`` (telemetry ``gateway_condition``,
``gateway_degraded``, ``gateway_condition_detail``, ``gateway_quarantined_files``).
Persists whether the last change was reported and the files moved aside.
Resumes in ``normal``: conditions are facts about the running process, which
the engine re-derives within seconds of a start; a condition that was active
at the stop makes the next connect report the fresh picture.
"""

from __future__ import annotations

import json
from typing import Any

from statemachine import State

from teg_fsm.engine.effects import Log
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC, Publish
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine

REPORT_TIMEOUT_S = 30.0
MAX_DETAIL_CHARS = 300


class HealthMachine(GatewayMachine):
    machine_name = "health"
    resume_table = {"normal": "normal", "degraded": "normal"}
    rest_states = frozenset({"normal", "degraded"})

    normal = State(initial=True)
    degraded = State()

    condition_raised = normal.to(degraded) | degraded.to.itself(internal=True)
    condition_cleared = degraded.to(normal, cond="is_last_condition") | degraded.to.itself(internal=True) | normal.to.itself(internal=True)
    file_quarantined = normal.to.itself(internal=True) | degraded.to.itself(internal=True)
    shared_attributes_received = normal.to.itself(internal=True) | degraded.to.itself(internal=True)
    # The report is re-sent after the next connect whatever way it failed.
    report_succeeded = normal.to.itself(internal=True) | degraded.to.itself(internal=True)
    report_failed = normal.to.itself(internal=True) | degraded.to.itself(internal=True)
    report_timed_out = normal.to.itself(internal=True) | degraded.to.itself(internal=True)
    report_cancelled = normal.to.itself(internal=True) | degraded.to.itself(internal=True)

    def setup(self) -> None:
        self.conditions: dict[str, str] = {}
        self.since_ms: dict[str, int] = {}
        self.quarantined: list[str] = []
        self.unreported = False

    # -- guards -----------------------------------------------------------

    def is_last_condition(self, ev: Event) -> bool:
        """The condition that cleared is the only one still raised."""
        return set(self.conditions) <= {ev.data.get("condition")}

    # -- actions ----------------------------------------------------------

    def on_condition_raised(self, ev: Event) -> None:
        condition = str(ev.data.get("condition") or "unknown")
        detail = str(ev.data.get("detail") or "")[:MAX_DETAIL_CHARS]
        if self.conditions.get(condition) == detail:
            return
        self.conditions[condition] = detail
        self.since_ms.setdefault(condition, self.now_ms)
        self.emit(Log(level="ERROR", message=f"degraded mode: {condition.replace('_', ' ')} ({detail})"))
        self._changed()

    def on_condition_cleared(self, ev: Event) -> None:
        condition = str(ev.data.get("condition") or "unknown")
        if self.conditions.pop(condition, None) is None:
            return
        dropped = ev.data.get("dropped_rows") or 0
        lasted_s = (self.now_ms - self.since_ms.pop(condition, self.now_ms)) // 1000
        # Logs written while the disk was full may never have reached ThingsBoard: this one tells the episode.
        self.emit(Log(level="WARNING", message=f"recovered from {condition.replace('_', ' ')} after {lasted_s} s "
                                               f"in degraded mode; {dropped} journal detail rows were not kept"))
        self._changed()

    def on_file_quarantined(self, ev: Event) -> None:
        name = str(ev.data.get("file") or ev.data.get("path") or "?")
        self.quarantined = [*self.quarantined, name][-10:]
        self.emit(Log(level="ERROR", message=f"damaged file moved aside as {name}; a fresh one replaced it"))
        self._changed()

    def on_shared_attributes_received(self) -> None:
        if self.unreported:
            self._report()

    def on_report_succeeded(self) -> None:
        self.unreported = False
        self.quarantined = []
        self.mark_dirty()

    def _changed(self) -> None:
        self.unreported = True
        self.mark_dirty()
        self._report()

    def _report(self) -> None:
        values: dict[str, Any] = {
            "gateway_condition": ",".join(sorted(self.conditions)) or "ok",
            "gateway_degraded": bool(self.conditions),
            "gateway_condition_detail": "; ".join(f"{k}: {v}" for k, v in sorted(self.conditions.items())),
        }
        if self.quarantined:
            values["gateway_quarantined_files"] = ",".join(self.quarantined)
        payload = json.dumps({"ts": self.now_ms, "values": values}, sort_keys=True)
        self.emit(Publish(topic=TELEMETRY_TOPIC, payload=payload, reply="report", timeout_s=REPORT_TIMEOUT_S))

    # -- persistence --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"conditions": dict(self.conditions), "quarantined": list(self.quarantined), "unreported": self.unreported}

    def restore(self, data: dict[str, Any]) -> None:
        quarantined = data.get("quarantined")
        self.quarantined = [str(q) for q in quarantined] if isinstance(quarantined, list) else []
        self.unreported = bool(data.get("unreported") or data.get("conditions"))
