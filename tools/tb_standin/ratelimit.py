"""ThingsBoard's "capacity:seconds,capacity:seconds" rate limits (§6.2).

TB uses bucket4j with greedy refill (``TbRateLimits``): every window is a token
bucket that starts full and refills continuously at capacity/seconds; a request
passes only if every window has the tokens, and then takes them from all.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimit:
    """All windows of one limit string, e.g. ``"100:1,1000:60"``; ``None`` or ``""`` = unlimited."""

    def __init__(self, spec: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec or None
        self._clock = clock
        self._windows: list[list[float]] = []  # [capacity, rate per second, tokens, last refill]
        now = clock()
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            capacity_text, _, seconds_text = part.partition(":")
            capacity, seconds = float(capacity_text), float(seconds_text)
            if capacity <= 0 or seconds <= 0:
                raise ValueError(f"invalid rate limit window {part!r} in {spec!r}")
            self._windows.append([capacity, capacity / seconds, capacity, now])

    def try_consume(self, tokens: int = 1) -> bool:
        """Take ``tokens`` from every window if all have them; False means "rate limited"."""
        if not self._windows:
            return True
        now = self._clock()
        for window in self._windows:
            capacity, rate, available, last = window
            window[2] = min(capacity, available + (now - last) * rate)
            window[3] = now
        if any(window[2] < tokens for window in self._windows):
            return False
        for window in self._windows:
            window[2] -= tokens
        return True


class DeviceLimits:
    """The three per-device buckets TB checks for a device session."""

    def __init__(self, messages: str | None, telemetry_messages: str | None, telemetry_data_points: str | None) -> None:
        self.messages = RateLimit(messages)
        self.telemetry_messages = RateLimit(telemetry_messages)
        self.telemetry_data_points = RateLimit(telemetry_data_points)

    def allow_message(self) -> bool:
        """Any message without data points: connect, subscribe, attribute request, RPC, OTA chunk."""
        return self.messages.try_consume(1)

    def allow_telemetry(self, points: int) -> bool:
        """Telemetry and client-attribute posts: 1 telemetry message and ``points`` data points.

        Checked one bucket after the other, as TB does; a refusal closes the session anyway.
        """
        return self.telemetry_messages.try_consume(1) and self.telemetry_data_points.try_consume(points)
