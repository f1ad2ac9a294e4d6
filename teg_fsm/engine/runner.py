"""The effect runner: turns effect commands into actions and outcome events.

Handlers are registered per effect type by the composition root. A handler
receives the effect and a ``Completion`` and settles it exactly once, now or
later (a PUBACK arrives on paho's thread long after ``publish`` returned).
Blocking handlers run on a small worker pool so the dispatcher never waits on
I/O. Whatever happens (exception, timeout, cancel, a late second callback),
each effect ends in exactly one outcome; later settle attempts are ignored.

Deadlines: given a ``driver`` (the gateway's ``Timers``, driven by the
dispatcher's thread), the runner owns no thread for them: the driver asks it
when the next live deadline is and expires the due ones. An effect submitted
by the dispatcher's thread (nearly all are) costs no wake-up: that thread plans
its wait afterwards. One submitted elsewhere wakes it only when its deadline
comes before the driver's next planned look. Without a driver (tests, tools)
a thread of its own does the same.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import attrs

from teg_fsm.engine.effects import Effect
from teg_fsm.engine.events import Outcome

log = logging.getLogger(__name__)

OutcomeSink = Callable[[str, Effect, Outcome, dict[str, Any]], None]


class Completion:
    """Settles one effect; only the first call counts."""

    __slots__ = ("_runner", "effect", "origin", "_settled")

    def __init__(self, runner: EffectRunner, effect: Effect, origin: str) -> None:
        self._runner = runner
        self.effect = effect
        self.origin = origin
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def succeed(self, result: Any = None) -> bool:
        return self._settle(Outcome.SUCCEEDED, {"result": result})

    def fail(self, error: str, details: dict[str, Any] | None = None) -> bool:
        """``details`` (JSON-able, no secrets) travel beside ``error`` in the outcome event."""
        return self._settle(Outcome.FAILED, {**(details or {}), "error": error})

    def time_out(self) -> bool:
        return self._settle(Outcome.TIMED_OUT, {"error": f"timed out after {self.effect.timeout_s} s"})

    def cancel(self) -> bool:
        return self._settle(Outcome.CANCELLED, {"error": "cancelled"})

    def _settle(self, outcome: Outcome, payload: dict[str, Any]) -> bool:
        with self._runner._lock:
            if self._settled:
                return False
            self._settled = True
            self._runner._pending.pop(self.effect.id, None)
        self._runner._deliver(self, outcome, payload)
        return True


Handler = Callable[[Effect, Completion], None]


class DeadlineDriver(Protocol):
    """What watches the runner's deadlines beside its own (``Timers``)."""

    def add_source(self, source: Any) -> None: ...

    def wake_before(self, seconds: float) -> None: ...


@attrs.define
class _Registration:
    handler: Handler
    blocking: bool


class EffectRunner:
    """Runs effects; every one ends in exactly one outcome."""

    def __init__(self, sink: OutcomeSink, workers: int = 4, driver: DeadlineDriver | None = None) -> None:
        self._sink = sink
        self._handlers: dict[type[Effect], _Registration] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teg-effect")
        self._lock = threading.RLock()
        self._pending: dict[str, Completion] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._deadline_cv = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._monotonic = _monotonic
        self._driver = driver
        self._deadline_thread: threading.Thread | None = None
        if driver is not None:
            driver.add_source(self)
        else:
            self._deadline_thread = threading.Thread(
                target=self._watch_deadlines, name="teg-effect-deadlines", daemon=True
            )
            self._deadline_thread.start()

    def register(self, effect_type: type[Effect], handler: Handler, *, blocking: bool = False) -> None:
        self._handlers[effect_type] = _Registration(handler, blocking)

    def handles(self, effect_type: type[Effect]) -> bool:
        return effect_type in self._handlers

    def busy(self) -> bool:
        """Whether any effect is still to be settled."""
        with self._lock:
            return bool(self._pending)

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def submit(self, origin: str, effect: Effect) -> Completion:
        completion = Completion(self, effect, origin)
        registration = self._handlers.get(type(effect))
        if registration is None:
            completion.fail(f"no handler for effect {type(effect).__name__}")
            return completion
        with self._lock:
            self._pending[effect.id] = completion
            if effect.timeout_s is not None:
                deadline = self._monotonic() + effect.timeout_s
                # Wake the watcher only when it would otherwise sleep past this deadline:
                # effects mostly come with equal timeouts, so their deadlines arrive in
                # order and all but the first of a quiet spell cost the watcher nothing.
                earliest = self._deadlines[0][0] if self._deadlines else None
                heapq.heappush(self._deadlines, (deadline, effect.id))
                self._compact_deadlines()
                if self._driver is None and (earliest is None or deadline < earliest):
                    self._deadline_cv.notify()
        if self._driver is not None and effect.timeout_s is not None:
            self._driver.wake_before(effect.timeout_s)
        if registration.blocking:
            self._pool.submit(self._run, registration.handler, effect, completion)
        else:
            self._run(registration.handler, effect, completion)
        return completion

    def _compact_deadlines(self) -> None:
        """Drop the deadlines of settled effects once they outnumber the live ones (lock held).

        A settled effect's deadline otherwise stays until it passes: at 50 rows/s
        the uplink's 60-120 s timeouts kept ~3000 dead entries in the heap.
        """
        if len(self._deadlines) > 2 * len(self._pending) + 256:
            self._deadlines = [d for d in self._deadlines if d[1] in self._pending]
            heapq.heapify(self._deadlines)

    def cancel(self, effect_id: str) -> bool:
        with self._lock:
            completion = self._pending.get(effect_id)
        return completion.cancel() if completion else False

    def shutdown(self, wait: bool = True) -> None:
        self._stopping.set()
        with self._lock:
            self._deadline_cv.notify_all()
        self._pool.shutdown(wait=wait, cancel_futures=True)
        with self._lock:
            leftovers = list(self._pending.values())
        for completion in leftovers:
            completion.cancel()

    def _run(self, handler: Handler, effect: Effect, completion: Completion) -> None:
        if completion.settled:  # cancelled or timed out while queued
            return
        try:
            handler(effect, completion)
        except Exception as exc:  # a handler bug must still end the effect
            log.debug("effect %s raised", effect.id, exc_info=True)
            completion.fail(f"{type(exc).__name__}: {exc}")

    def _deliver(self, completion: Completion, outcome: Outcome, payload: dict[str, Any]) -> None:
        try:
            self._sink(completion.origin, completion.effect, outcome, payload)
        except Exception:
            log.exception("outcome sink failed for %s", completion.effect.id)

    def seconds_to_next_deadline(self) -> float | None:
        """For the driver: how long until the next live deadline (None: none)."""
        with self._lock:
            while self._deadlines and self._deadlines[0][1] not in self._pending:
                heapq.heappop(self._deadlines)
            return max(self._deadlines[0][0] - self._monotonic(), 0.0) if self._deadlines else None

    def expire_due(self) -> None:
        """For the driver: time out every live effect whose deadline passed."""
        with self._lock:
            expired = self._pop_expired(self._monotonic())
        for completion in expired:
            completion.time_out()

    def _pop_expired(self, now: float) -> list[Completion]:
        # Past deadlines, and those of effects already settled (most of them: they
        # end long before their timeout), so the watcher sleeps until a live one.
        expired: list[Completion] = []
        while self._deadlines and (self._deadlines[0][0] <= now or self._deadlines[0][1] not in self._pending):
            deadline, effect_id = heapq.heappop(self._deadlines)
            completion = self._pending.get(effect_id)
            if completion is not None and deadline <= now:
                expired.append(completion)
        return expired

    def _watch_deadlines(self) -> None:
        while not self._stopping.is_set():
            with self._deadline_cv:
                now = self._monotonic()
                expired = self._pop_expired(now)
                if not expired:
                    # submit() notifies, so with nothing pending this sleeps until needed.
                    wait = max(self._deadlines[0][0] - now, 0.001) if self._deadlines else None
                    self._deadline_cv.wait(timeout=wait)
            for completion in expired:
                completion.time_out()


def _monotonic() -> float:
    import time

    return time.monotonic()
