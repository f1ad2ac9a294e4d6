"""Engine-owned timers: ``StartTimer`` in, a timer event out.

Timers are keyed by (machine, name). Each start bumps a generation number that
travels in the fired event; the dispatcher drops a firing whose generation is
no longer current, which makes cancel-after-fire races harmless.

The real-time driver (``run_forever``, the gateway's one timer thread) also
watches the deadlines of other sources (the effect runner's timeouts, see
``add_source``). It is woken only by a deadline earlier than the one it sleeps
towards: re-arming a timer for later, or an effect due after the next timer,
costs no wake-up.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import threading
from collections.abc import Callable
from typing import Protocol

from teg_fsm.engine.clock import Clock

TimerKey = tuple[str, str]
FireCallback = Callable[[str, str, int], None]

log = logging.getLogger(__name__)


class DeadlineSource(Protocol):
    """Deadlines kept elsewhere that the timer thread watches too (the effect runner's)."""

    def seconds_to_next_deadline(self) -> float | None: ...

    def expire_due(self) -> None: ...


class Timers:
    """A heap of deadlines on an injected clock."""

    def __init__(self, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, str, str]] = []
        self._current: dict[TimerKey, int] = {}
        self._generation = 0
        self._lock = threading.Condition()
        self._sources: list[DeadlineSource] = []
        # When run_forever looks next (clock time); -inf while it is awake, inf when it waits for
        # nothing. A new deadline before it sets ``_kicked`` and wakes it; a later one costs nothing.
        self._wake_at = -math.inf
        self._kicked = False

    def start(self, machine: str, name: str, seconds: float, jitter: float = 0.0) -> float:
        """Arm (or re-arm) a timer; returns the delay actually used."""
        if jitter:
            seconds *= 1.0 + self._rng.uniform(-jitter, jitter)
        seconds = max(0.0, seconds)
        with self._lock:
            self._generation += 1
            self._current[(machine, name)] = self._generation
            deadline = self._clock.monotonic() + seconds
            heapq.heappush(self._heap, (deadline, self._generation, machine, name))
            self._kick_if_before(deadline)
        return seconds

    def add_source(self, source: DeadlineSource) -> None:
        """Watch ``source``'s deadlines in ``run_forever`` too."""
        with self._lock:
            self._sources.append(source)

    def wake_before(self, seconds: float) -> None:
        """A source has a new deadline ``seconds`` from now: wake the driver if it would sleep past it."""
        with self._lock:
            self._kick_if_before(self._clock.monotonic() + seconds)

    def _kick_if_before(self, deadline: float) -> None:
        if deadline < self._wake_at or self._wake_at == -math.inf:
            self._kicked = True
            self._lock.notify_all()

    def cancel(self, machine: str, name: str) -> None:
        with self._lock:
            self._current.pop((machine, name), None)

    def is_current(self, machine: str, name: str, generation: int) -> bool:
        with self._lock:
            return self._current.get((machine, name)) == generation

    def consume(self, machine: str, name: str, generation: int) -> bool:
        """True once for a live firing; the timer is then no longer armed."""
        with self._lock:
            if self._current.get((machine, name)) != generation:
                return False
            del self._current[(machine, name)]
            return True

    def active(self) -> list[TimerKey]:
        with self._lock:
            return sorted(self._current)

    def next_deadline(self) -> float | None:
        with self._lock:
            self._drop_dead()
            return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[str, str, int]]:
        """Remove and return the live timers whose deadline is <= now."""
        due: list[tuple[str, str, int]] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, generation, machine, name = heapq.heappop(self._heap)
                if self._current.get((machine, name)) == generation:
                    due.append((machine, name, generation))
        return due

    def _drop_dead(self) -> None:
        while self._heap:
            _, generation, machine, name = self._heap[0]
            if self._current.get((machine, name)) == generation:
                return
            heapq.heappop(self._heap)

    def run_forever(self, fire: FireCallback, stop: threading.Event) -> None:
        """Real-time driver: sleep until the next deadline (own or a source's), then fire."""
        while not stop.is_set():
            # Asked outside the lock: a source takes its own lock, and calls wake_before under it.
            waits = [w for w in (s.seconds_to_next_deadline() for s in self._sources) if w is not None]
            with self._lock:
                if not self._kicked:  # else something changed since the sources were asked: look again
                    self._drop_dead()
                    now = self._clock.monotonic()
                    if self._heap:
                        waits.append(max(0.0, self._heap[0][0] - now))
                    wait = min(waits) if waits else None
                    if wait is None or wait > 0:
                        self._wake_at = math.inf if wait is None else now + wait
                        self._lock.wait(timeout=wait)
                self._wake_at, self._kicked = -math.inf, False
            for machine, name, generation in self.pop_due(self._clock.monotonic()):
                try:
                    fire(machine, name, generation)
                except Exception:  # one bad firing must not stop every later timer
                    log.exception("firing timer %s of %s failed", name, machine)
            for source in self._sources:
                try:
                    source.expire_due()
                except Exception:
                    log.exception("expiring the deadlines of %r failed", source)

    def wake(self) -> None:
        with self._lock:
            self._kicked = True
            self._lock.notify_all()
