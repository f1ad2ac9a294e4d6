"""The audit's sentences: a step, its guards, its effects and their outcomes, in words.

Plain text for ``teg journal`` and for the HTML report alike (the report
escapes it). Machines already say why in their own words: ``Log`` effects
("controller v2 unhealthy: container exited with code 3; restarting in 5 s")
and ``reason`` / ``error`` fields of events and notifications; those come
first, durations made readable ("21720 s" -> "6 h 2 min"). Guards are named
with their meaning (the guard's docstring, as in ``diagrams/<machine>.md``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from teg_fsm.cli.audit_story import EffectStep, Guard, Outcome, Step

TEXT_LIMIT = 200  # characters of one journal value shown; the rest is "..."
# Fields that identify rather than explain; the effect id is shown separately.
_QUIET = frozenset({"effect_id", "generation", "rpc_request_id", "jitter"})
_FIRST = ("reason", "error", "exit_code", "status", "version", "rpc_method", "method", "timer")
_SECONDS = re.compile(r"\b(\d+(?:\.\d+)?) ?s\b")


def duration(seconds: float) -> str:
    """``21720`` -> ``6 h 2 min``; under two minutes as seconds."""
    if seconds < 120:
        return f"{seconds:g} s"
    minutes = int(round(seconds / 60))
    if minutes < 120:
        return f"{minutes} min"
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min" if minutes else ""]
    return " ".join(p for p in parts if p)


def readable(text: str) -> str:
    """Durations written in seconds become hours and minutes (``limit 21600 s`` -> ``limit 6 h``)."""
    return _SECONDS.sub(lambda m: duration(float(m.group(1))), text)


def value(item: Any, limit: int = TEXT_LIMIT) -> str:
    """A journal value, short: strings as they are, containers as compact JSON."""
    text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fields(data: Any, limit: int = 4) -> str:
    """``key value, key value`` for the fields that explain, the telling ones first."""
    if not isinstance(data, dict):
        return value(data) if data not in (None, "", [], {}) else ""
    keys = [k for k in _FIRST if k in data] + [k for k in data if k not in _FIRST and k not in _QUIET]
    shown = []
    for key in keys[:limit]:
        item = data[key]
        if isinstance(item, dict) and key == "machines":
            item = ", ".join(str(k) for k in item)
        shown.append(f"{str(key).replace('_', ' ')} {value(item, 80)}")
    more = len(keys) - limit
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def event_words(step: Step) -> str:
    if "effect_id" in step.data:  # an outcome: its result is shown with the effect it answers
        error = step.data.get("error")
        return f"{step.event} (outcome of {value(step.data['effect_id'], 60)})" + (f": {value(error)}" if error else "")
    said = fields(step.data)
    return f"{step.event} ({said})" if said else step.event


def guard_words(guard: Guard) -> str:
    negated = guard.expression.startswith("!")
    meaning = guard.meaning.rstrip(".")
    if not meaning:
        return guard.expression
    return f"{guard.expression}: {'not: ' if negated else ''}{meaning}"


def why_lines(step: Step) -> Iterator[str]:
    """Which row decided and why, in evaluation order."""
    if step.error:
        yield f"the step raised: {value(step.error)}; the machine went to its safe state"
    if not step.declared:
        yield "no row of the machine's class matches (class unknown here, or changed since)"
        return
    for passed in step.passed_over:
        tried = " & ".join(g.expression for g in passed.guards)
        yield f"not -> {passed.target}: [{tried}] did not hold"
    if step.guards:
        held = "; ".join(guard_words(g) for g in step.guards)
        also = f" (or a later row to {step.target}: the journal does not say which)" if step.or_guards else ""
        yield f"guard held: {held}{also}"
    elif step.passed_over:
        yield "no guard: the row taken when those above do not apply"


def outcome_words(outcome: Outcome | None, awaits_reply: bool) -> str:
    if outcome is None:
        return "no outcome recorded (yet, or outside the window)" if awaits_reply else "sent"
    kind = outcome.kind.replace("_", " ") or outcome.name
    if outcome.kind in ("failed", "timed_out") or (outcome.kind == "" and isinstance(outcome.detail, str)):
        return f"{kind}: {readable(value(outcome.detail))}" if outcome.detail else kind
    detail = fields(outcome.detail, 3) if isinstance(outcome.detail, dict) else ""
    return f"{kind} ({detail})" if detail else kind


def effect_words(effect: EffectStep) -> str:
    """What the effect asked for; ``effect_and_outcome`` adds how it ended."""
    f = effect.fields
    if effect.type == "Log":
        return f"log {value(f.get('level', ''))}: {readable(value(f.get('message', '')))}"
    if effect.type == "Notify":
        to = f.get("machine") or "every machine that takes it"
        said = fields(f.get("data"))
        return f"tell {value(to, 60)}: {value(f.get('name', ''), 80)}" + (f" ({said})" if said else "")
    if effect.type == "Publish":
        return f"publish {value(f.get('payload', ''), 240)} to {value(f.get('topic', ''), 80)}"
    if effect.type == "StartTimer":
        seconds = f.get("seconds")
        when = duration(float(seconds)) if isinstance(seconds, (int, float)) else value(seconds)
        return f"start timer {value(f.get('name', ''), 80)} ({when})"
    if effect.type == "CancelTimer":
        return f"cancel timer {value(f.get('name', ''), 80)}"
    said = fields(f, 3)
    return spaced(effect.type) + (f" ({said})" if said else "")


def effect_and_outcome(effect: EffectStep) -> str:
    return f"{effect_words(effect)} -> {outcome_words(effect.outcome, effect.awaits_reply)}"


def spaced(name: str) -> str:
    """``FetchControllerRepo`` -> ``fetch controller repo``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def reasons(step: Step) -> list[str]:
    """What the machine said about this step: its log lines, and reasons carried by event or notification."""
    said = []
    for key in ("reason", "error"):
        if isinstance(step.data.get(key), str):
            said.append(readable(value(step.data[key])))
    for effect in step.effects:
        if effect.type == "Log":
            said.append(readable(value(effect.fields.get("message", ""))))
        elif effect.type == "Notify" and isinstance(effect.fields.get("data"), dict):
            reason = effect.fields["data"].get("reason")
            if isinstance(reason, str):
                said.append(readable(value(reason)))
        elif effect.type == "Publish":
            said.append(_sw_error(effect.fields.get("payload")))
    return list(dict.fromkeys(s for s in said if s))


def _sw_error(payload: Any) -> str:
    """The ``sw_error`` an OTA report carries: what ThingsBoard is told went wrong."""
    try:
        report = json.loads(payload) if isinstance(payload, str) else None
    except ValueError:
        return ""
    error = report.get("sw_error") if isinstance(report, dict) else None
    return readable(value(error)) if isinstance(error, str) and error else ""


def headline(step: Step) -> str:
    """``controller: running -> unhealthy on container_exited: container exited with code 3``."""
    move = f"{step.source} -> {step.target}" if step.changes_state else f"stays {step.source}"
    said = reasons(step)
    tail = f": {said[0]}" if said else ""
    return f"{step.machine}: {move} on {step.event}{tail}"
