"""Engine-owned timers: ``StartTimer`` in, a timer event out.

Timers are keyed by (machine, name). Each start bumps a generation number that
travels in the fired event; the dispatcher drops a firing whose generation is
no longer current, which makes cancel-after-fire races harmless.

In production the dispatcher's thread drives them (there is no timer thread):
before it blocks on its queue it asks ``plan`` how long it may sleep (the next
deadline of its own timers and of other sources: the effect runner's timeouts,
see ``add_source``), and after waking ``fire_due`` fires what is due. Timers and
effects are nearly always started by that same thread, which plans again before
it sleeps: they cost no wake-up at all, and a deadline whose effect settled
first is dropped before the next plan, so it never wakes anybody either. Only a
deadline added from another thread, earlier than the one the driver sleeps
towards, calls ``waker`` (the dispatcher puts a no-op on its queue).
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
    """Deadlines kept elsewhere that the driver watches too (the effect runner's)."""

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
        self._lock = threading.Lock()
        self._sources: list[DeadlineSource] = []
        # The driver's thread, and when it looks next (clock time): -inf while it is awake, inf
        # when it waits for nothing. Another thread's deadline before that calls ``waker``; one
        # added while the driver is awake sets ``_kicked``, so its next ``plan`` asks again.
        self.waker: Callable[[], None] | None = None
        self._driver: int | None = None
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
        """Watch ``source``'s deadlines too (``plan`` and ``fire_due``)."""
        with self._lock:
            self._sources.append(source)

    def wake_before(self, seconds: float) -> None:
        """A source has a new deadline ``seconds`` from now: wake the driver if it would sleep past it."""
        with self._lock:
            self._kick_if_before(self._clock.monotonic() + seconds)

    def _kick_if_before(self, deadline: float) -> None:
        if self._driver is None or self._driver == threading.get_ident():
            return  # no driver yet, or the driver itself: it plans again before it sleeps
        if self._wake_at == -math.inf:
            self._kicked = True
        elif deadline < self._wake_at:
            self._wake_at = -math.inf  # one wake-up is enough: the driver plans again
            if self.waker is not None:
                self.waker()

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

    def drive_from_this_thread(self) -> None:
        """The calling thread is the driver from now on (it calls ``plan`` and ``fire_due``)."""
        with self._lock:
            self._driver, self._wake_at, self._kicked = threading.get_ident(), -math.inf, False

    def plan(self, other: float | None = None) -> float | None:
        """The driver is about to sleep: seconds until it must look again (None: no deadline).

        ``other`` is a deadline of the driver's own (seconds from now) that counts too.
        """
        # Asked outside the lock: a source takes its own lock, and calls wake_before under it.
        waits = [w for w in (s.seconds_to_next_deadline() for s in self._sources) if w is not None]
        if other is not None:
            waits.append(other)
        with self._lock:
            if self._kicked:  # a deadline came from elsewhere since the sources were asked: look again
                self._kicked = False
                return 0.0
            self._drop_dead()
            now = self._clock.monotonic()
            if self._heap:
                waits.append(max(0.0, self._heap[0][0] - now))
            wait = min(waits) if waits else None
            self._wake_at = math.inf if wait is None else now + wait
            return wait

    def awake(self) -> None:
        """The driver woke: until it plans again, it sees every new deadline by itself."""
        with self._lock:
            self._wake_at = -math.inf

    def fire_due(self, fire: FireCallback) -> None:
        """Fire the timers that are due and expire the sources' due deadlines (the driver calls this)."""
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
