"""Engine-owned timers: ``StartTimer`` in, a timer event out.

Timers are keyed by (machine, name). Each start bumps a generation number that
travels in the fired event; the dispatcher drops a firing whose generation is
no longer current, which makes cancel-after-fire races harmless.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
from collections.abc import Callable

from teg_fsm.engine.clock import Clock

TimerKey = tuple[str, str]
FireCallback = Callable[[str, str, int], None]

log = logging.getLogger(__name__)


class Timers:
    """A heap of deadlines on an injected clock."""

    def __init__(self, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, str, str]] = []
        self._current: dict[TimerKey, int] = {}
        self._generation = 0
        self._lock = threading.Condition()

    def start(self, machine: str, name: str, seconds: float, jitter: float = 0.0) -> float:
        """Arm (or re-arm) a timer; returns the delay actually used."""
        if jitter:
            seconds *= 1.0 + self._rng.uniform(-jitter, jitter)
        seconds = max(0.0, seconds)
        with self._lock:
            self._generation += 1
            self._current[(machine, name)] = self._generation
            heapq.heappush(
                self._heap, (self._clock.monotonic() + seconds, self._generation, machine, name)
            )
            self._lock.notify()
        return seconds

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
        """Real-time driver: sleep until the next deadline, then fire."""
        while not stop.is_set():
            with self._lock:
                self._drop_dead()
                wait = None
                if self._heap:
                    wait = max(0.0, self._heap[0][0] - self._clock.monotonic())
                if wait is None or wait > 0:
                    # start() and wake() notify, so an idle gateway sleeps until the next deadline.
                    self._lock.wait(timeout=wait)
            for machine, name, generation in self.pop_due(self._clock.monotonic()):
                try:
                    fire(machine, name, generation)
                except Exception:  # one bad firing must not stop every later timer
                    log.exception("firing timer %s of %s failed", name, machine)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()
