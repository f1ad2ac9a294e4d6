"""The effect runner: every effect ends in exactly one outcome."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from teg_fsm.engine.effects import Effect
from teg_fsm.engine.events import Outcome
from teg_fsm.engine.runner import Completion, EffectRunner
from tests.engine.examples import FetchThing


class Outcomes:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, Outcome, dict[str, Any]]] = []
        self.arrived = threading.Condition()

    def __call__(self, origin: str, effect: Effect, outcome: Outcome, payload: dict[str, Any]) -> None:
        with self.arrived:
            self.items.append((origin, effect.id, outcome, payload))
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, str, Outcome, dict[str, Any]]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.items) >= count, timeout), self.items
            return list(self.items)


@pytest.fixture
def runner_and_outcomes():  # type: ignore[no-untyped-def]
    outcomes = Outcomes()
    runner = EffectRunner(outcomes, workers=2)
    yield runner, outcomes
    runner.shutdown()


def _by_url(effect: Effect, completion: Completion) -> None:
    url = effect.url  # type: ignore[attr-defined]
    if url == "ok":
        completion.succeed({"got": url})
    elif url == "raise":
        raise RuntimeError("disk on fire")
    elif url == "hang":
        time.sleep(0.5)
        completion.succeed("too late")
    elif url == "twice":
        completion.succeed(1)
        completion.fail("second settle is ignored")


def test_each_outcome_is_delivered_once(runner_and_outcomes) -> None:  # type: ignore[no-untyped-def]
    runner, outcomes = runner_and_outcomes
    runner.register(FetchThing, _by_url, blocking=True)
    runner.submit("m", FetchThing(id="m:1:0", url="ok", reply="f"))
    runner.submit("m", FetchThing(id="m:2:0", url="raise", reply="f"))
    runner.submit("m", FetchThing(id="m:3:0", url="hang", reply="f", timeout_s=0.05))
    runner.submit("m", FetchThing(id="m:4:0", url="twice", reply="f"))
    items = outcomes.wait_for(4)
    time.sleep(0.6)  # let the hung handler finish: its late success must be dropped
    by_id = {effect_id: (outcome, payload) for _, effect_id, outcome, payload in outcomes.items}
    assert len(outcomes.items) == 4, items
    assert by_id["m:1:0"] == (Outcome.SUCCEEDED, {"result": {"got": "ok"}})
    assert by_id["m:2:0"] == (Outcome.FAILED, {"error": "RuntimeError: disk on fire"})
    assert by_id["m:3:0"][0] is Outcome.TIMED_OUT
    assert by_id["m:4:0"] == (Outcome.SUCCEEDED, {"result": 1})


def test_a_short_timeout_behind_long_and_settled_ones_fires_on_time(runner_and_outcomes) -> None:  # type: ignore[no-untyped-def]
    # The deadline watcher is woken only for a deadline earlier than the one it sleeps
    # towards, and skips the deadlines of settled effects: neither may delay a live one.
    runner, outcomes = runner_and_outcomes
    runner.register(FetchThing, _by_url, blocking=True)
    runner.submit("m", FetchThing(id="m:1:0", url="ok", reply="f", timeout_s=20))
    runner.submit("m", FetchThing(id="m:2:0", url="hang", reply="f", timeout_s=30))
    outcomes.wait_for(1)
    asked = time.monotonic()
    runner.submit("m", FetchThing(id="m:3:0", url="hang", reply="f", timeout_s=0.05))
    items = outcomes.wait_for(2)
    assert items[1][1:3] == ("m:3:0", Outcome.TIMED_OUT)
    assert time.monotonic() - asked < 0.4
    items = outcomes.wait_for(3)  # the long one was not timed out with it: it ends on its own
    assert items[2][1:3] == ("m:2:0", Outcome.SUCCEEDED)
    time.sleep(0.3)
    assert len(outcomes.items) == 3  # m:3:0's late success is dropped


def test_a_running_effect_can_be_cancelled(runner_and_outcomes) -> None:  # type: ignore[no-untyped-def]
    runner, outcomes = runner_and_outcomes
    release = threading.Event()

    def slow(effect: Effect, completion: Completion) -> None:
        release.wait(5)
        completion.succeed("finished")

    runner.register(FetchThing, slow, blocking=True)
    runner.submit("m", FetchThing(id="m:1:0", url="x", reply="f"))
    assert runner.cancel("m:1:0")
    release.set()
    [(origin, effect_id, outcome, payload)] = outcomes.wait_for(1)
    assert (origin, effect_id, outcome) == ("m", "m:1:0", Outcome.CANCELLED)


def test_an_effect_without_handler_fails_with_the_reason(runner_and_outcomes) -> None:  # type: ignore[no-untyped-def]
    runner, outcomes = runner_and_outcomes
    runner.submit("m", FetchThing(id="m:1:0", url="x", reply="f"))
    [(_, _, outcome, payload)] = outcomes.wait_for(1)
    assert outcome is Outcome.FAILED and "no handler for effect FetchThing" in payload["error"]


class _CountedRunner(EffectRunner):
    """Counts the driver's looks (it asks its sources once per plan)."""

    looks = 0

    def seconds_to_next_deadline(self) -> float | None:
        self.looks += 1
        return super().seconds_to_next_deadline()


def test_driven_by_the_dispatcher_thread_deadlines_need_no_thread_and_only_an_earlier_one_wakes_it() -> None:
    from teg_fsm.engine.clock import RealClock
    from teg_fsm.engine.dispatcher import Dispatcher
    from teg_fsm.engine.timers import Timers

    clock = RealClock()
    timers, outcomes = Timers(clock), Outcomes()
    before = {t.name for t in threading.enumerate()}
    runner = _CountedRunner(outcomes, workers=1, driver=timers)
    assert {t.name for t in threading.enumerate()} - before == set()
    held: list[Completion] = []
    runner.register(FetchThing, lambda effect, completion: held.append(completion))
    dispatcher = Dispatcher(clock=clock, timers=timers)
    on_driver: list[str] = []

    def submit_once_on_the_driver() -> None:  # an idle hook: runs on the dispatcher's thread
        if not on_driver:
            on_driver.append(threading.current_thread().name)
            runner.submit("m", FetchThing(id="m:0:0", url="x", reply="f", timeout_s=0.05))

    dispatcher.idle_hooks.append(submit_once_on_the_driver)
    dispatcher.start()
    wakes = 0
    waker = timers.waker
    assert waker is not None

    def counted_waker() -> None:
        nonlocal wakes
        wakes += 1
        waker()

    timers.waker = counted_waker
    try:
        # Submitted on the driver's own thread: it times out with no wake-up from anyone.
        dispatcher.post("test", "anything")
        [(_, effect_id, outcome, _)] = outcomes.wait_for(1)
        assert (effect_id, outcome, on_driver, wakes) == ("m:0:0", Outcome.TIMED_OUT, ["teg-dispatcher"], 0)
        timers.start("m", "tick", 30.0)
        runner.submit("m", FetchThing(id="m:1:0", url="x", reply="f", timeout_s=0.05))  # from this thread
        assert outcomes.wait_for(2)[1][1:3] == ("m:1:0", Outcome.TIMED_OUT)
        assert wakes == 1
        # The driver now sleeps towards the 30 s timer: effects due later, and a timer re-armed
        # for later still, do not wake it.
        deadline = time.monotonic() + 5
        while not 0 < timers._wake_at < 1e300:  # until it sleeps again
            assert time.monotonic() < deadline
            time.sleep(0.01)
        looks = runner.looks
        for i in range(20):
            runner.submit("m", FetchThing(id=f"m:{i + 2}:0", url="x", reply="f", timeout_s=60.0))
            timers.start("m", "tick", 40.0)
        time.sleep(0.2)
        assert (runner.looks, wakes) == (looks, 1)
        runner.submit("m", FetchThing(id="m:99:0", url="x", reply="f", timeout_s=0.05))  # earlier: wakes it
        assert outcomes.wait_for(3)[2][1:3] == ("m:99:0", Outcome.TIMED_OUT)
        assert wakes == 2
    finally:
        dispatcher.stop()
        runner.shutdown()
