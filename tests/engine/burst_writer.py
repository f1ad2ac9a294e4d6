"""Subprocess for the kill tests: runs a real dispatcher thread over a journal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from teg_fsm.engine.clock import RealClock
from teg_fsm.engine.dispatcher import Dispatcher, MachineSpec
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.timers import Timers
from tests.engine.examples import CounterMachine, FetcherMachine


def main(journal_path: str, mode: str) -> None:
    clock = RealClock()
    journal = Journal(Path(journal_path))
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal)
    dispatcher.boot([MachineSpec(CounterMachine), MachineSpec(FetcherMachine)], journal.load_checkpoints())
    dispatcher.start()
    if mode == "fetch":
        # No runner: the fetch never completes, so the machine stays in `fetching`.
        dispatcher.post("test", "fetch_requested", {"url": "https://example.invalid/x"})
        while journal.load_checkpoints().get("fetcher", None) is None:
            time.sleep(0.01)
        print("in-fetching", flush=True)
        time.sleep(60)
        return
    announced = False
    while True:
        for _ in range(500):
            dispatcher.post("test", "tick")
        if not announced and dispatcher.dispatched_count > 2000:
            print("bursting", flush=True)
            announced = True
        time.sleep(0.001)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
