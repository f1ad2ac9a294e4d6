"""Uplink benchmark: drain a pre-filled controller queue over TLS, beside the box's ceiling.

    python tools/bench_uplink.py 100000 --runs 3                 # mosquitto and the stand-in
    python tools/bench_uplink.py 100000 --broker mosquitto --against /work/wt/base
    taskset -c 0 python tools/bench_uplink.py 100000             # everything on one core
    python tools/bench_uplink.py --idle 60                       # CPU of an idle gateway

Each run measures, on the same broker and right before the drain, the ceiling
of ``tools/bench_ceiling.py`` (pre-built 64 KiB packets published with paho at
QoS 1, plus the minimal SQLite batch read/delete of the same rows), then starts
the gateway (``python -m teg_fsm.cli run``, a subprocess) on a queue holding
the same rows and prints:

- records/s from the first row taken from ``messages`` to the moment
  ``messages`` and ``pending_mqtt_messages`` are both empty (the gateway deletes
  a row only after its PUBACK, so that is the last record acknowledged);
- its ratio to the combined ceiling of the same run;
- gateway CPU ms per record: over the drain only (CPU at the end minus CPU when
  the first row was taken) and over the whole process (start-up included);
- time from process start to the first row taken, peak RSS, the 1-minute load
  average at the end of the run.

The brokers run in their own processes (Debian's mosquitto, the bundled
stand-in), so the benchmark process only polls the queue file. ``--against
DIR`` also runs another checkout's gateway (its ``.venv``), alternating which
goes first, for A/B figures on a shared box. Summary: min/median/max per
figure over ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

if not __package__:  # run as `python tools/bench_uplink.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import uplink_rig as rig  # noqa: E402
from tools.bench_ceiling import TOKEN, Broker, ceiling, describe, run_broker  # noqa: E402

POLL_S = 0.005


class Gateway:
    """Which gateway to run: a checkout and its Python."""

    def __init__(self, name: str, repo: Path, python: str) -> None:
        self.name, self.repo, self.python = name, repo, python

    def start(self, env: dict[str, str], log_path: Path) -> psutil.Popen:
        env = {**env, "PYTHONPATH": str(self.repo)}
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            return psutil.Popen([self.python, "-m", "teg_fsm.cli", "run"], env=env, cwd=self.repo,
                                stdout=log, stderr=log)
        finally:
            log.close()


def _probe(conn: sqlite3.Connection) -> tuple[Any, Any]:
    """(lowest id in messages, any pending id); (None, None) once drained."""
    try:
        return conn.execute("SELECT (SELECT id FROM messages ORDER BY id LIMIT 1), "
                            "(SELECT id FROM pending_mqtt_messages LIMIT 1)").fetchone()
    except sqlite3.OperationalError:  # pending not created yet, or a lock
        return (1, None)


def drain(gateway: Gateway, broker: Broker, n: int, workdir: Path) -> dict[str, float]:
    data = workdir / f"data-{time.monotonic_ns()}"
    db = data / "communication_queue.db"
    rig.fill(db, n)
    env = rig.gateway_env(broker, data, TOKEN, LOG_LEVEL="WARNING")
    started = time.monotonic()
    proc = gateway.start(env, workdir / "gateway.log")
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    peak_rss, first_at, cpu_at_first = 0, None, 0.0
    try:
        while True:
            low, pending = _probe(conn)
            now = time.monotonic()
            if first_at is None and (low is None or low > 1):
                first_at = now
                cpu = proc.cpu_times()
                cpu_at_first = cpu.user + cpu.system
            if first_at is not None and low is None and pending is None:
                break
            peak_rss = max(peak_rss, proc.memory_info().rss)
            if proc.poll() is not None:
                raise SystemExit(f"{gateway.name}: gateway exited with {proc.returncode}; see {workdir}/gateway.log")
            if now - started > 600:
                raise SystemExit(f"{gateway.name}: not drained after 600 s")
            time.sleep(POLL_S)
        done_at = time.monotonic()
        cpu = proc.cpu_times()
        cpu_s = cpu.user + cpu.system
    finally:
        conn.close()
        rig.stop(proc)
    assert first_at is not None
    return {
        "records_per_s": n / max(done_at - first_at, 1e-9),
        "first_row_s": first_at - started,
        "cpu_ms_per_record": (cpu_s - cpu_at_first) * 1000 / n,
        "cpu_ms_per_record_whole": cpu_s * 1000 / n,
        "peak_rss_mb": peak_rss / 2**20,
    }


def _spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def bench(n: int, kind: str, gateways: list[Gateway], runs: int) -> None:
    results: dict[str, list[dict[str, float]]] = {g.name: [] for g in gateways}
    for run in range(runs):
        order = gateways if run % 2 == 0 else gateways[::-1]  # alternate A/B on a shared box
        for gateway in order:
            # A fresh broker each time: the stand-in keeps every record it got and slows down with them.
            with tempfile.TemporaryDirectory(prefix="teg-bench-") as tmp, run_broker(kind, Path(tmp)) as broker:
                ceil = ceiling(n, broker, Path(tmp))
                r = drain(gateway, broker, n, Path(tmp))
                r.update(ceiling=ceil["combined_per_s"], ratio=r["records_per_s"] / ceil["combined_per_s"],
                         load=os.getloadavg()[0])
                results[gateway.name].append(r)
                print(f"{kind} {gateway.name:<6} run {run + 1}: {r['records_per_s']:>9,.0f} records/s = "
                      f"{100 * r['ratio']:.0f} % of ceiling ({describe(ceil)}); "
                      f"{r['cpu_ms_per_record']:.4f} CPU ms/record drain ({r['cpu_ms_per_record_whole']:.4f} whole); "
                      f"first row after {r['first_row_s']:.2f} s; peak RSS {r['peak_rss_mb']:.1f} MB; "
                      f"load avg {r['load']:.2f}", flush=True)
    for name, rs in results.items():
        col = {k: [r[k] for r in rs] for k in rs[0]}
        print(f"SUMMARY {kind} {name} {n:,} rows x{len(rs)} (median [min-max]): "
              f"{_spread(col['records_per_s'], ',.0f')} records/s; "
              f"ratio to ceiling {_spread([100 * x for x in col['ratio']], '.0f')} %; "
              f"ceiling {_spread(col['ceiling'], ',.0f')} records/s; "
              f"CPU ms/record {_spread(col['cpu_ms_per_record'], '.4f')} drain, "
              f"{_spread(col['cpu_ms_per_record_whole'], '.4f')} whole; load avg {_spread(col['load'], '.2f')}; "
              f"affinity {sorted(os.sched_getaffinity(0))}", flush=True)


def idle(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="teg-bench-") as tmp, run_broker("standin", Path(tmp)) as broker:
        data = Path(tmp) / "data"
        rig.create_queue(data / "communication_queue.db")
        proc = rig.start_gateway(rig.gateway_env(broker, data, TOKEN, LOG_LEVEL="WARNING"), Path(tmp) / "gateway.log")
        try:
            time.sleep(8)  # connect and let start-up traffic settle
            ps = psutil.Process(proc.pid)
            before, t0 = ps.cpu_times(), time.monotonic()
            time.sleep(seconds)
            after, t1 = ps.cpu_times(), time.monotonic()
        finally:
            rig.stop(proc)
    used = (after.user + after.system) - (before.user + before.system)
    return {"idle_s": t1 - t0, "cpu_s": used, "percent_of_one_core": 100 * used / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", type=int, help="queue sizes to drain (e.g. 100000 1000000)")
    parser.add_argument("--broker", action="append", choices=("mosquitto", "standin"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", type=Path, metavar="DIR", help="also run the gateway of this checkout (A/B)")
    parser.add_argument("--idle", type=float, metavar="SECONDS", help="measure idle CPU over SECONDS")
    args = parser.parse_args()
    gateways = [Gateway("this", rig.REPO, sys.executable)]
    if args.against:
        gateways.insert(0, Gateway("other", args.against.resolve(), str(args.against.resolve() / ".venv/bin/python")))
    for n in args.rows:
        for kind in args.broker or ["mosquitto", "standin"]:
            bench(n, kind, gateways, args.runs)
    if args.idle:
        r = idle(args.idle)
        print(f"idle {r['idle_s']:.0f} s: {r['cpu_s'] * 1000:.0f} ms CPU = {r['percent_of_one_core']:.3f} % of one core")


if __name__ == "__main__":
    main()
