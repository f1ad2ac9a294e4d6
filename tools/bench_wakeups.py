"""Idle wake-up benchmark: what a controller that only touches its queue file costs the gateway.

    python tools/bench_wakeups.py                    # this checkout, 30 s per case
    python tools/bench_wakeups.py --repo /work/main  # another checkout's gateway (before/after)

Runs the real gateway (`python -m teg_fsm.cli run`, a subprocess) against the
bundled ThingsBoard stand-in, with a controller stand-in that, for each case:

- opens the queue file, reads ``health_check`` and closes it, every 1 s;
- the same every 0.1 s;
- writes one new row per second (open, insert, commit, close).

Over the measured window it counts, per second: wake-ups (``rows_waiting``,
the file watch telling the uplink machine that the queue changed), all events
the gateway dispatched (journal rows), queue transactions (``TransferRows`` and
``SendPacket`` effects: each is a write transaction on the queue file) and
journal rows written, and the gateway's CPU. The target: no wake-up for a
touch, at most one per new row. (A new row then costs its transfer, packet
and acknowledgement: about five events, the traffic that the journal
summarises, see tools/bench_retention.py.) The other machines' own timers
(the file check every 30 s; without Docker, the controller's engine retry
every 10 s) run in every case and set the floor.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

if not __package__:  # run as `python tools/bench_wakeups.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_retention import Gateway, controller, now_ms  # noqa: E402

CASES = (("touch every 1 s", "touch", 1.0), ("touch every 0.1 s", "touch", 10.0), ("1 new row per second", "row", 1.0))
QUEUE_EFFECTS = ("TransferRows", "SendPacket")


def count(db: Path, t0: int, t1: int) -> dict[str, int]:
    """Events, journal rows and queue transactions recorded between ``t0`` and ``t1`` (any journal format)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = events = transactions = wakeups = 0
        for table in ("journal", "journal_traffic"):
            if table not in tables:
                continue
            for name, effects in conn.execute(f"SELECT name, effects FROM {table} WHERE ts_ms >= ? AND ts_ms < ?",
                                              (t0, t1)):
                rows += 1
                events += name != "journal_snapshot"
                wakeups += name == "rows_waiting"
                if effects != "[]":
                    transactions += sum(e.get("type") in QUEUE_EFFECTS for e in json.loads(effects))
        return {"rows": rows, "events": events, "transactions": transactions, "wakeups": wakeups}
    finally:
        conn.close()


def run_case(mode: str, rate: float, seconds: float, repo: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="teg-wakeups-") as tmp_name:
        with Gateway(Path(tmp_name), repo) as gw:
            time.sleep(3)  # start-up traffic settles
            writer = controller(gw.queue, rate, seconds + 4, mode)
            time.sleep(2)
            ps = psutil.Process(gw.proc.pid)
            before, t0 = ps.cpu_times(), now_ms()
            time.sleep(seconds)
            after, t1 = ps.cpu_times(), now_ms()
            writer.wait()
            time.sleep(0.5)  # the journal commits every 100 ms
            counted = count(gw.data / "teg_journal.db", t0, t1)
    window = (t1 - t0) / 1000
    cpu = (after.user + after.system) - (before.user + before.system)
    new_rows = rate * window if mode == "row" else 0
    return {**{k: v / window for k, v in counted.items()}, "cpu_percent": 100 * cpu / window,
            "per_new_row": counted["wakeups"] / new_rows if new_rows else None, "window_s": window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per case")
    parser.add_argument("--repo", type=Path, default=None, help="run this checkout's gateway instead")
    args = parser.parse_args()
    print(f"gateway from {args.repo or 'this checkout'}; measured {args.seconds:g} s per case")
    for label, mode, rate in CASES:
        r = run_case(mode, rate, args.seconds, args.repo)
        per_row = f", {r['per_new_row']:.2f} wake-ups per new row" if r["per_new_row"] is not None else ""
        print(f"  {label:22s}: {r['wakeups']:5.2f} wake-ups (rows_waiting)/s, {r['events']:6.2f} events/s, "
              f"{r['transactions']:5.2f} queue transactions/s, "
              f"{r['rows']:6.2f} journal rows/s, CPU {r['cpu_percent']:.2f} % of a core{per_row}", flush=True)


if __name__ == "__main__":
    main()
