"""The effect runner's bookkeeping stays bounded under a steady stream of effects (soak finding)."""

from __future__ import annotations

from teg_fsm.engine.effects import Effect
from teg_fsm.engine.events import Outcome
from teg_fsm.engine.runner import Completion, EffectRunner
from tests.engine.examples import FetchThing
from tests.rig.waiting import wait_for


def test_deadlines_of_settled_effects_do_not_pile_up_and_live_ones_still_time_out() -> None:
    outcomes: list[tuple[str, Outcome]] = []
    runner = EffectRunner(lambda origin, effect, outcome, payload: outcomes.append((effect.id, outcome)), workers=1)
    held: list[Completion] = []

    def handler(effect: Effect, completion: Completion) -> None:
        if effect.id == "slow":
            held.append(completion)  # never settled by the handler: must time out
        else:
            completion.succeed(None)

    try:
        runner.register(FetchThing, handler)
        runner.submit("m", FetchThing(id="slow", url="u", reply="x", timeout_s=0.2))
        for i in range(20_000):
            runner.submit("m", FetchThing(id=f"e{i}", url="u", reply="x", timeout_s=3600.0))
            assert len(runner._deadlines) < 1000  # two live effects at most: the heap stays near its floor
        wait_for(lambda: ("slow", Outcome.TIMED_OUT) in outcomes, 10, "the live effect timed out")
        assert sum(1 for _, o in outcomes if o is Outcome.SUCCEEDED) == 20_000
    finally:
        runner.shutdown()


