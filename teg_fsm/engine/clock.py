"""Injected time (trio's Clock idea): the engine reads time only from here."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time in unix milliseconds (stamped on events)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (used for deadlines)."""


class RealClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to; timers fire on ``advance``."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._start_ms = start_ms
        self._elapsed = 0.0

    def now_ms(self) -> int:
        return self._start_ms + int(round(self._elapsed * 1000))

    def monotonic(self) -> float:
        return self._elapsed

    def set_elapsed(self, seconds: float) -> None:
        self._elapsed = max(self._elapsed, seconds)
