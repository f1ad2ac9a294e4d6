"""Events: the only way anything reaches a machine.

An event is an immutable fact with a sequence number (its position in the
dispatcher's order), a wall-clock timestamp in ms (the only clock a machine
ever sees), a source, a name (the machine's transition trigger) and JSON data.
``target`` addresses one machine (timer firings, effect outcomes); ``None``
routes the event to every machine that declares its name.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import attrs

JsonDict = dict[str, Any]


class Source(str, Enum):
    """Where an event came from; journaled with it for audits."""

    MQTT = "mqtt"
    TIMER = "timer"
    QUEUE = "queue"
    EFFECT = "effect"
    SIGNAL = "signal"
    RPC = "rpc"
    SYSTEM = "system"
    DOCKER = "docker"
    FILES = "files"
    TEST = "test"


class Outcome(str, Enum):
    """The closed set of ways an effect can end (Mender's Success/Failure/...)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


@attrs.frozen
class Event:
    """One fact, in dispatcher order."""

    seq: int
    ts_ms: int
    source: str
    name: str
    data: JsonDict = attrs.field(factory=dict)
    target: str | None = None


def outcome_event_name(reply: str, outcome: Outcome) -> str:
    """Name of the event an effect with ``reply`` ends in, e.g. ``fetch_failed``."""
    return f"{reply}_{outcome.value}"


# Events the engine itself posts; machines may declare transitions for them.
RESUMED = "resumed"
STARTED = "gateway_started"
