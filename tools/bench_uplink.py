"""Uplink benchmark: drain a pre-filled controller queue to the stand-in over TLS.

    python tools/bench_uplink.py 100000 [1000000 ...]   # drain runs
    python tools/bench_uplink.py --idle 60             # CPU of an idle gateway

Prints, per size: records/s from the first row taken from the queue to the
last record acknowledged (first/last arrival at the stand-in, whose PUBACK
follows storage), time from process start to the first record, gateway CPU
ms per record (/proc via psutil) and peak RSS. The gateway runs as a
subprocess (`python -m teg_fsm.cli run`); the stand-in in this process.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import psutil

if not __package__:  # run as `python tools/bench_uplink.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import uplink_rig as rig  # noqa: E402
from tools.tb_standin import StandIn  # noqa: E402

DEVICE = "station-1"


def _queue_left(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def drain(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="teg-bench-") as tmp, StandIn(tls_port=0) as tb:
        data = Path(tmp) / "data"
        token = tb.add_device(DEVICE)
        rig.fill(data / "communication_queue.db", n)
        env = rig.gateway_env(tb, data, token, LOG_LEVEL="WARNING")
        started = time.monotonic()
        proc = rig.start_gateway(env, Path(tmp) / "gateway.log")
        ps = psutil.Process(proc.pid)
        peak_rss, first_at, last_count = 0, None, 0
        try:
            while True:
                count = tb.telemetry_count(DEVICE)
                now = time.monotonic()
                if count and first_at is None:
                    first_at = now
                peak_rss = max(peak_rss, ps.memory_info().rss)
                if count >= n:
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"gateway exited with {proc.returncode}; see its log")
                last_count = count
                time.sleep(0.01)
            done_at = time.monotonic()
            cpu = ps.cpu_times()
            cpu_s = cpu.user + cpu.system
        finally:
            rig.stop(proc)
        assert first_at is not None and last_count <= n
        return {
            "rows": n,
            "records_per_s": n / max(done_at - first_at, 1e-9),
            "first_record_s": first_at - started,
            "cpu_ms_per_record": cpu_s * 1000 / n,
            "peak_rss_mb": peak_rss / 2**20,
            "left_in_queue": _queue_left(data / "communication_queue.db"),
        }


def idle(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="teg-bench-") as tmp, StandIn(tls_port=0) as tb:
        data = Path(tmp) / "data"
        token = tb.add_device(DEVICE)
        rig.create_queue(data / "communication_queue.db")
        proc = rig.start_gateway(rig.gateway_env(tb, data, token, LOG_LEVEL="WARNING"), Path(tmp) / "gateway.log")
        try:
            rig.wait_for(lambda: tb.is_connected(DEVICE), 20, "gateway connected")
            time.sleep(3)  # let start-up traffic settle
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
    parser.add_argument("--idle", type=float, metavar="SECONDS", help="measure idle CPU over SECONDS")
    args = parser.parse_args()
    for n in args.rows:
        r = drain(n)
        print(f"drain {n:>9,} rows: {r['records_per_s']:>9,.0f} records/s, first record after "
              f"{r['first_record_s']:.2f} s, {r['cpu_ms_per_record']:.4f} CPU ms/record, "
              f"peak RSS {r['peak_rss_mb']:.1f} MB, left in queue {r['left_in_queue']}", flush=True)
    if args.idle:
        r = idle(args.idle)
        print(f"idle {r['idle_s']:.0f} s: {r['cpu_s'] * 1000:.0f} ms CPU = {r['percent_of_one_core']:.3f} % of one core")


if __name__ == "__main__":
    main()
