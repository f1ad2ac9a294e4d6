"""Benchmark: dispatcher + journal CPU per controller row, the uplink's two regimes.

    python tools/bench_dispatcher.py [--rows 100000] [--trickle 2000]

Runs the real uplink machine in a dispatcher with the journal on (a real
SQLite file) and a stand-in for the controller queue adapter that answers
each effect at once with the outcome the real adapter would post, in the
order the real adapter posts them (see the uplink corpus journals in
tests/replay/corpus):

- drain: ``--rows`` rows are waiting when the session comes up; the uplink
  moves them in ``TransferRows`` batches and sends them as ``SendPacket``
  packets (72 bytes a row, as the recorded journals show) until the queue
  is empty. Figure: CPU per drained row.
- trickle (1 row/s): one row arrives, the adapter posts ``rows_waiting``;
  transfer, packet, PUBACK and the ``work_changed`` notices follow; the queue
  runs dry and the journal commits, as it does between rows at 1 row/s.
  Figure: CPU per row, i.e. the whole event sequence one row causes.

CPU is process time (``time.process_time``: user + system, every thread of
this process) over the measured loop only; everything runs on the calling
thread, so it is the dispatcher, the machine, the journal and the stand-in
(whose share is a few dict operations per event).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teg_fsm.engine.clock import FakeClock  # noqa: E402
from teg_fsm.engine.dispatcher import Dispatched, Dispatcher, MachineSpec  # noqa: E402
from teg_fsm.engine.effects import Effect  # noqa: E402
from teg_fsm.engine.effects.uplink import SendPacket, TransferRows  # noqa: E402
from teg_fsm.engine.events import Outcome, Source  # noqa: E402
from teg_fsm.engine.journal import Journal  # noqa: E402
from teg_fsm.engine.timers import Timers  # noqa: E402
from teg_fsm.machines.uplink import UplinkMachine  # noqa: E402

ROW_BYTES = 72  # 498 rows in 35 747 bytes in tests/replay/corpus/uplink_malformed_rows_dead_lettered.jsonl
POINTS_PER_ROW = 2


class QueueStandIn:
    """The controller queue as the uplink sees it: answers TransferRows and SendPacket at once."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.waiting = 0  # rows in ``messages``
        self.top = 0  # id of the newest row moved to pending
        self.acked = 0  # id of the newest row deleted after its PUBACK
        self.cursor = 0  # id of the newest row sent
        self.answers: list[tuple[Effect, dict[str, Any]]] = []

    def observe(self, done: Dispatched) -> None:
        for effect in done.effects:
            if isinstance(effect, TransferRows):
                self.answers.append((effect, self._transfer(effect)))
            elif isinstance(effect, SendPacket):
                self.answers.append((effect, self._packet(effect)))

    def _transfer(self, effect: TransferRows) -> dict[str, Any]:
        moved = min(self.waiting, effect.max_rows)
        self.waiting -= moved
        self.top += moved
        return {"moved": moved, "dead": 0, "more": self.waiting > 0, "full": False,
                "pending_rows": self.top - self.acked, "pending_top": self.top}

    def _packet(self, effect: SendPacket) -> dict[str, Any]:
        if effect.stream != "data":
            return {"rows": 0, "points": 0, "bytes": 0, "first_id": 0, "last_id": 0, "more": False, "top": 0,
                    "needs_points": None, "max_points": None}
        if effect.restart:
            self.cursor = self.acked
        rows = min(self.top - self.cursor, max(1, effect.max_payload_bytes // ROW_BYTES))
        first, self.cursor = self.cursor, self.cursor + rows
        self.acked = self.cursor  # the PUBACK comes back before the next packet is asked for
        return {"rows": rows, "points": rows * POINTS_PER_ROW, "bytes": rows * ROW_BYTES, "first_id": first,
                "last_id": self.cursor, "more": self.cursor < self.top, "top": self.cursor,
                "needs_points": None, "max_points": None}

    def settle(self) -> int:
        """Post the outcomes of the effects issued so far and run them; returns events dispatched."""
        count = len(self.dispatcher.run_until_idle())
        while self.answers:
            answers, self.answers = self.answers, []
            for effect, result in answers:
                self.dispatcher.post_outcome("uplink", effect, Outcome.SUCCEEDED, {"result": result})
            count += len(self.dispatcher.run_until_idle())
        return count


def _engine(tmp: Path) -> tuple[Dispatcher, QueueStandIn, Journal]:
    clock = FakeClock(1_700_000_000_000)
    journal = Journal(tmp / "teg_journal.db")
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal)
    dispatcher.boot([MachineSpec(UplinkMachine)])
    queue = QueueStandIn(dispatcher)
    dispatcher.observers.append(queue.observe)
    dispatcher.run_until_idle()
    dispatcher.post(Source.MQTT, "mqtt_connected", {"session": 1})
    queue.settle()
    return dispatcher, queue, journal


def drain(rows: int) -> tuple[float, int]:
    """CPU seconds and events to drain ``rows`` waiting rows."""
    with tempfile.TemporaryDirectory() as tmp:
        dispatcher, queue, journal = _engine(Path(tmp))
        queue.waiting = rows
        start = time.process_time()
        dispatcher.post(Source.QUEUE, "rows_waiting", {})
        events = queue.settle()
        dispatcher.idle()
        cpu = time.process_time() - start
        assert queue.acked == rows, (queue.acked, rows)
        journal.close()
    return cpu, events


def trickle(rows: int) -> tuple[float, int]:
    """CPU seconds and events for ``rows`` rows arriving one at a time, the queue running dry between them."""
    with tempfile.TemporaryDirectory() as tmp:
        dispatcher, queue, journal = _engine(Path(tmp))
        events = 0
        start = time.process_time()
        for _ in range(rows):
            queue.waiting += 1
            dispatcher.post(Source.QUEUE, "rows_waiting", {})
            events += queue.settle()
            dispatcher.idle()
        cpu = time.process_time() - start
        assert queue.acked == rows, (queue.acked, rows)
        journal.close()
    return cpu, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows waiting for the drain")
    parser.add_argument("--trickle", type=int, default=2_000, help="rows for the 1 row/s figure")
    args = parser.parse_args()
    cpu, events = drain(args.rows)
    print(f"drain {args.rows} rows: {cpu * 1e6 / args.rows:.2f} us CPU per drained row "
          f"({events} events, {cpu * 1e6 / events:.0f} us per event)")
    cpu, events = trickle(args.trickle)
    print(f"1 row/s, {args.trickle} rows: {cpu * 1e6 / args.trickle:.0f} us CPU per controller row "
          f"({events / args.trickle:.1f} events per row, {cpu * 1e6 / events:.0f} us per event)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB")


if __name__ == "__main__":
    main()
