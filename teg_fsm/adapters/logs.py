"""Logging set-up, with secrets kept out of every record.

Under systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) stderr goes to
journald, which stamps every line itself and reads a ``<N>`` syslog priority
prefix (sd-daemon(3)): so there each line is ``<N>name: message`` with no
timestamp, and ``journalctl -p warning`` finds our warnings. In a terminal
lines carry one timestamp and the level name.

``TransitionLog`` turns the dispatcher's record of what each event did into
one INFO line per transition an operator cares about (connection, OTA steps,
controller restarts, file writes, degraded modes), so the journal of the
service tells the story without ``teg journal``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Collection, Mapping
from typing import Any, TextIO

_SECRET_PATTERNS = (
    re.compile(r'("?(?:credentialsValue|provisionDeviceSecret|accessToken|token|password)"?\s*[:=]\s*"?)([^",\s}]+)', re.I),
)

# sd-daemon(3) / syslog(3) priorities.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7

# Machines whose every transition is worth a line in the service log; the
# uplink's idle/draining flips at every controller row would drown them.
OPERATOR_MACHINES = frozenset({"connection", "provisioning", "controller", "ota", "file_sync", "rpc"})


class RedactSecrets(logging.Filter):
    """Masks values of secret-looking keys in formatted messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _SECRET_PATTERNS:
            redacted = pattern.sub(r"\1***", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


def under_journald(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


class JournaldFormatter(logging.Formatter):
    """``<N>name: message``; journald adds the time, the unit and the pid."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # Every line of a traceback gets the prefix, or journald files it at the default priority.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure_logging(
    level: str, *, env: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    if under_journald(env):
        handler.setFormatter(JournaldFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))
    return handler


def print_error(message: str, *, env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> None:
    """A message before logging is set up (configuration errors), at error priority under journald."""
    prefix = "<3>" if under_journald(env) else ""
    print(f"{prefix}{message}", file=stream or sys.stderr, flush=True)


# Periodic checks that usually find nothing: their round trip (out of a state
# and straight back) is not logged; anything else they lead to is.
ROUTINE_EVENTS = frozenset({("file_sync", "check_due")})


class TransitionLog:
    """A dispatcher observer: one INFO line per transition of an operator-facing machine."""

    def __init__(
        self,
        machines: Collection[str] = OPERATOR_MACHINES,
        routine: Collection[tuple[str, str]] = ROUTINE_EVENTS,
        logger: logging.Logger | None = None,
    ) -> None:
        self._machines = machines
        self._routine = routine
        self._held: dict[str, Any] = {}  # machine -> a routine transition not yet told
        self._log = logger or logging.getLogger("teg.transitions")

    def __call__(self, dispatched: Any) -> None:
        # Runs in the dispatcher thread: keep it to formatting, and never let it raise.
        try:
            for move in dispatched.transitions:
                notable = move.machine in self._machines or "degraded" in f"{move.source} {move.target}"
                if notable and move.source != move.target:
                    self._consider(move)
        except Exception:  # noqa: BLE001 - a log line must never stop the dispatcher
            self._log.debug("could not log a transition", exc_info=True)

    def _consider(self, move: Any) -> None:
        held = self._held.pop(move.machine, None)
        if held is not None and move.target == held.source:
            return  # the routine check came straight back: nothing happened
        if held is not None:
            self._tell(held)
        if (move.machine, move.event) in self._routine:
            self._held[move.machine] = move
        else:
            self._tell(move)

    def _tell(self, move: Any) -> None:
        self._log.info("%s: %s -> %s (on %s)", move.machine, move.source, move.target, move.event)
