"""ThingsBoard's "capacity:seconds,capacity:seconds" rate limits, on the sender's side.

Pure arithmetic with time passed in (ms), so the uplink machine can use it and
stay replayable. ThingsBoard (bucket4j, greedy refill) keeps one token bucket
per window; a message passes only if every window has the tokens. A refused
telemetry message closes the session, so the sender must never overdraw.

Why the sender models the buckets *more tightly* than the server: tokens are
taken when a packet leaves, but the server takes them when it arrives, and
network or broker jitter can bunch packets that left evenly. A capacity margin
absorbs that bunching, a rate margin absorbs clock drift.
"""

from __future__ import annotations

import math

import attrs

CAPACITY_MARGIN = 0.8
RATE_MARGIN = 0.9


class LimitSpecError(ValueError):
    """A limit string that is not "cap:sec[,cap:sec...]"."""


def parse_limit(spec: str | None) -> tuple[tuple[float, float], ...]:
    """``"100:1,3000:60"`` -> ((100, 1), (3000, 60)); empty or None means unlimited."""
    windows = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        capacity_text, sep, seconds_text = part.partition(":")
        try:
            capacity, seconds = float(capacity_text), float(seconds_text)
        except ValueError:
            raise LimitSpecError(f"rate limit window {part!r} in {spec!r} is not capacity:seconds") from None
        if not sep or capacity <= 0 or seconds <= 0:
            raise LimitSpecError(f"rate limit window {part!r} in {spec!r} needs positive capacity and seconds")
        windows.append((capacity, seconds))
    return tuple(windows)


@attrs.define
class _Window:
    capacity: float
    per_ms: float
    tokens: float
    at_ms: int

    def refill(self, now_ms: int) -> None:
        if now_ms > self.at_ms:
            self.tokens = min(self.capacity, self.tokens + (now_ms - self.at_ms) * self.per_ms)
            self.at_ms = now_ms


class TokenBuckets:
    """All windows of one limit; ``unlimited`` when the spec has none.

    Buckets start *empty*: after a restart we cannot know how much of the
    server's bucket the previous run used, so we assume all of it.
    """

    def __init__(self, spec: str | None, now_ms: int, *, start_full: bool = False) -> None:
        self.spec = spec or ""
        self._windows = [
            _Window(
                capacity=math.floor(capacity * CAPACITY_MARGIN) or 1.0,
                per_ms=capacity * RATE_MARGIN / (seconds * 1000.0),
                tokens=(math.floor(capacity * CAPACITY_MARGIN) or 1.0) if start_full else 0.0,
                at_ms=now_ms,
            )
            for capacity, seconds in parse_limit(spec)
        ]

    @property
    def unlimited(self) -> bool:
        return not self._windows

    @property
    def capacity(self) -> float:
        """The most one message may ever cost (the smallest window)."""
        return min((w.capacity for w in self._windows), default=math.inf)

    def available(self, now_ms: int) -> float:
        for window in self._windows:
            window.refill(now_ms)
        return min((w.tokens for w in self._windows), default=math.inf)

    def take(self, tokens: float, now_ms: int) -> None:
        """Spend ``tokens`` (callers check ``available`` first; overdraw goes negative)."""
        for window in self._windows:
            window.refill(now_ms)
            window.tokens -= tokens

    def give_back(self, tokens: float, now_ms: int) -> None:
        """Return tokens reserved but not used (never above capacity)."""
        for window in self._windows:
            window.refill(now_ms)
            window.tokens = min(window.capacity, window.tokens + tokens)

    def wait_s(self, tokens: float, now_ms: int) -> float:
        """Seconds until ``tokens`` are available in every window (inf if never)."""
        if tokens > self.capacity:
            return math.inf
        wait_ms = 0.0
        for window in self._windows:
            window.refill(now_ms)
            missing = tokens - window.tokens
            if missing > 0:
                wait_ms = max(wait_ms, missing / window.per_ms)
        return wait_ms / 1000.0
