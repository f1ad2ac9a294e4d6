"""Benchmark: events/s through the dispatcher into a machine, journal on.

    python tools/bench_dispatcher.py [--events 200000]

Prints events/s (post to dispatched, producer and dispatcher on their own
threads, the journal committing to a real SQLite file) and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from statemachine import State  # noqa: E402

from teg_fsm.engine.machine import GatewayMachine  # noqa: E402
from teg_fsm.engine.clock import RealClock  # noqa: E402
from teg_fsm.engine.dispatcher import Dispatcher, MachineSpec  # noqa: E402
from teg_fsm.engine.journal import Journal  # noqa: E402
from teg_fsm.engine.timers import Timers  # noqa: E402


class RowsWaitingMachine(GatewayMachine):
    """Shaped like the uplink's hot path: a notice, a state flip, a count."""

    machine_name = "bench"
    resume_table = {"idle": "idle", "draining": "draining"}
    idle = State(initial=True)
    draining = State()
    rows_waiting = idle.to(draining) | draining.to.itself(internal=True)

    def setup(self) -> None:
        self.seen = 0

    def on_rows_waiting(self) -> None:
        self.seen += 1


def run(events: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        clock = RealClock()
        journal = Journal(Path(tmp) / "teg_journal.db")
        dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal)
        dispatcher.boot([MachineSpec(RowsWaitingMachine)])
        done = threading.Event()
        dispatcher.observers.append(lambda d: dispatcher.dispatched_count >= events + 1 and done.set())
        dispatcher.start()
        start = time.perf_counter()
        for i in range(events):
            dispatcher.post("queue", "rows_waiting", {"n": i})
        done.wait()
        elapsed = time.perf_counter() - start
        dispatcher.stop()
        journal.close()
        machine = dispatcher.machines["bench"]
        assert machine.seen == events, (machine.seen, events)
        rows = len(list(__import__("teg_fsm.engine.journal", fromlist=["x"]).read_journal(Path(tmp) / "teg_journal.db")))
        assert rows == events + 1, rows
    return events / elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    rate, rss = run(args.events)
    print(f"dispatcher: {args.events} events, {rate:,.0f} events/s with the journal on, peak RSS {rss:.1f} MB")


if __name__ == "__main__":
    main()
