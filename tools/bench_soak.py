"""Soak benchmark: the real gateway under steady load, watched for slow leaks.

    python tools/bench_soak.py --minutes 60 [--rows-per-s 50] [--diagnose FILE [--tracemalloc]]

The gateway runs as a subprocess (``teg run``) against the stand-in (TLS) in
this process. Load, for the whole run:

- a controller-like writer: ``--rows-per-s`` rows into the queue, in small
  commits every 100 ms, with a health-check upsert per commit;
- one ``ping`` RPC per second (answer time and failures counted);
- a file push every ``--file-every-min`` minutes (``FILES`` and a new
  ``FILE_CONTENT_soak``: the full file sync pipeline: scan, write, mirror, report);
- an OTA assignment every ``--ota-every-min`` minutes, of a version that does not
  exist in a controller repository the gateway does not have (no Docker here):
  it drives the OTA machine's failure path and its reports, not a build.

Every minute it prints elapsed minutes, gateway RSS (MB), open fds, threads,
rows delivered to the stand-in, pings answered / failed and the slowest ping.
At the end: the RSS slope over the second half of the run (least squares,
MB/min), which is what a slow leak shows as.

``--diagnose FILE`` has the gateway write, every minute from minute 2 on, where
its memory is (SQLite's allocator, glibc malloc arenas, the Python object types
that grew) to FILE; with ``--tracemalloc`` also the allocation sites that grew
most (tracemalloc itself doubles memory use and slows the gateway).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as ``python tools/bench_soak.py`` from the repo root
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import attrs  # noqa: E402
import psutil  # noqa: E402

from tests.integration import uplink_rig as rig  # noqa: E402
from tools.tb_standin import StandIn  # noqa: E402

DEVICE = "soak-station"
TRACEMALLOC_ENV = "TEG_SOAK_TRACEMALLOC"
DIAGNOSE_ENV = "TEG_SOAK_DIAGNOSE"
TRACEMALLOC_BASELINE_S = 120.0


@attrs.define
class Counters:
    rows_written: int = 0
    pings_ok: int = 0
    pings_failed: int = 0
    slowest_ping_s: float = 0.0
    file_pushes: int = 0
    ota_assignments: int = 0
    lock: threading.Lock = attrs.field(factory=threading.Lock)


def write_rows(db: Path, rows_per_s: float, stop: threading.Event, counters: Counters) -> None:
    """Like a controller: a small commit every 100 ms, paced to a fixed schedule (no drift)."""
    rig.create_queue(db)
    conn = sqlite3.connect(db, timeout=30)
    period, started, seq = 0.1, time.monotonic(), 0
    ts0 = int(time.time() * 1000)
    try:
        while not stop.is_set():
            due = int((time.monotonic() - started) * rows_per_s)
            rows = [("measurement", row(i, ts0 + int(i * 1000 / rows_per_s))) for i in range(seq, due)]
            if rows:
                conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
                conn.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) ON CONFLICT(id) "
                             "DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (int(time.time() * 1000),))
                conn.commit()
                seq = due
                counters.rows_written = seq
            stop.wait(period)
    finally:
        conn.close()


def row(seq: int, ts: int) -> str:
    """One controller row; ``ts`` strictly increases (ThingsBoard keeps one value per key and ts)."""
    return json.dumps({"ts": ts, "values": {"seq": seq, "co2": 400 + seq % 100, "temp": 21.5}})


def ping_every_second(tb: StandIn, stop: threading.Event, counters: Counters) -> None:
    next_at = time.monotonic()
    while not stop.is_set():
        asked = time.monotonic()
        try:
            ok = tb.rpc(DEVICE, "ping", timeout=10)["message"] == "Pong"
        except Exception:  # noqa: BLE001 - a timeout or a disconnect is a failed ping, counted
            ok = False
        took = time.monotonic() - asked
        with counters.lock:
            counters.pings_ok += ok
            counters.pings_failed += not ok
            counters.slowest_ping_s = max(counters.slowest_ping_s, took)
        next_at += 1.0
        stop.wait(max(0.0, next_at - time.monotonic()))


def push_file(tb: StandIn, n: int) -> None:
    files = {"soak": {"path": "$DATA_PATH/soak/config.json", "encoding": "json", "write_version": n}}
    tb.set_shared(DEVICE, {"FILES": files, "FILE_CONTENT_soak": {"push": n, "padding": "x" * 2000}})


def assign_missing_ota(tb: StandIn, n: int) -> None:
    tb.assign_ota(DEVICE, title="controller", version=f"v0.{n}.0-does-not-exist", data=b"not a real package")


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB)."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def start_gateway(tb: StandIn, root: Path, diagnose: Path | None, trace: bool) -> subprocess.Popen[bytes]:
    data = root / "data"
    token = tb.add_device(DEVICE)
    env = rig.gateway_env(tb, data, token, THINGSBOARD_DEVICE_NAME=DEVICE, LOG_LEVEL="WARNING",
                          DOCKER_HOST=f"unix://{root}/no-docker.sock")
    rig.create_queue(data / "communication_queue.db")
    log = open(root / "gateway.log", "ab")  # noqa: SIM115 - handed to the child
    if diagnose is None:
        command = [sys.executable, "-m", "teg_fsm.cli", "run"]
    else:
        env[DIAGNOSE_ENV], env[TRACEMALLOC_ENV] = str(diagnose), "1" if trace else ""
        command = [sys.executable, str(Path(__file__).resolve()), "--gateway-child"]
    try:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def sample(ps: psutil.Process) -> tuple[float, int, int]:
    return ps.memory_info().rss / 2**20, ps.num_fds(), ps.num_threads()


def soak(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="teg-soak-") as tmp, StandIn(tls_port=0) as tb:
        root = Path(tmp)
        proc = start_gateway(tb, root, args.diagnose, args.tracemalloc)
        stop, counters = threading.Event(), Counters()
        try:
            rig.wait_for(lambda: "v1/devices/me/rpc/request/+" in tb.subscriptions(DEVICE), 30, "gateway subscribed")
            return _run_load(args, tb, root, proc, stop, counters)
        finally:
            stop.set()
            rig.stop(proc)


def _run_load(args: argparse.Namespace, tb: StandIn, root: Path, proc: subprocess.Popen[bytes],
              stop: threading.Event, counters: Counters) -> int:
    threads = [
        threading.Thread(target=write_rows, args=(root / "data" / "communication_queue.db", args.rows_per_s, stop,
                                                  counters), daemon=True),
        threading.Thread(target=ping_every_second, args=(tb, stop, counters), daemon=True),
    ]
    for t in threads:
        t.start()
    ps = psutil.Process(proc.pid)
    started = time.monotonic()
    points: list[tuple[float, float]] = []
    print("min   RSS_MB  fds  threads  rows_written  rows_delivered  pings_ok  pings_failed  slowest_ping_s  "
          "file_pushes  ota", flush=True)
    for minute in range(0, args.minutes + 1):
        _scheduled_pushes(args, tb, minute, counters)
        stop.wait(max(0.0, started + minute * 60 - time.monotonic()))
        if proc.poll() is not None:
            print(f"gateway exited with {proc.returncode}; log tail:\n{(root / 'gateway.log').read_text()[-3000:]}")
            return 1
        rss, fds, nthreads = sample(ps)
        points.append((minute, rss))
        with counters.lock:
            c = attrs.evolve(counters, lock=threading.Lock())
        print(f"{minute:3d}  {rss:7.1f}  {fds:3d}  {nthreads:7d}  {c.rows_written:12d}  "
              f"{tb.telemetry_count(DEVICE):14d}  {c.pings_ok:8d}  {c.pings_failed:12d}  {c.slowest_ping_s:14.2f}  "
              f"{c.file_pushes:11d}  {c.ota_assignments:3d}", flush=True)
    second_half = [p for p in points if p[0] >= args.minutes / 2]
    print(f"RSS slope over the second half (minutes {args.minutes / 2:g}..{args.minutes}): "
          f"{slope_mb_per_min(second_half):+.4f} MB/min; whole run {slope_mb_per_min(points[1:]):+.4f} MB/min; "
          f"RSS {points[0][1]:.1f} -> {points[-1][1]:.1f} MB", flush=True)
    states = [v for _, v in tb.telemetry(DEVICE, "sw_state")]
    errors = [v for _, v in tb.telemetry(DEVICE, "sw_error")]
    print(f"OTA: {len(states)} sw_state reports ({', '.join(sorted(set(map(str, states))))}); "
          f"last sw_error: {errors[-1] if errors else None!r}", flush=True)
    hashes = tb.client_attributes(DEVICE).get("FILE_HASHES")
    print(f"file sync: FILE_HASHES {hashes!r}", flush=True)
    print(f"gateway log: {(root / 'gateway.log').stat().st_size} bytes; last lines:\n"
          + "\n".join((root / "gateway.log").read_text(errors="replace").splitlines()[-5:]), flush=True)
    return 0


def _scheduled_pushes(args: argparse.Namespace, tb: StandIn, minute: int, counters: Counters) -> None:
    if args.file_every_min and minute >= 1 and (minute - 1) % args.file_every_min == 0:
        counters.file_pushes += 1
        push_file(tb, counters.file_pushes)
    if args.ota_every_min and minute >= 2 and (minute - 2) % args.ota_every_min == 0:
        counters.ota_assignments += 1
        assign_missing_ota(tb, counters.ota_assignments)


# -- the gateway under diagnosis ---------------------------------------------------------------


def gateway_child() -> int:
    """``teg run`` with a thread that writes, every minute, where the process's memory is.

    Always: RSS, SQLite's own allocator (``sqlite3_memory_used``), glibc malloc
    (``mallinfo2``: in use / free in arenas, mmapped) and the Python object types
    whose count grew most since the baseline. With tracemalloc on: the allocation
    sites that grew most.
    """
    import tracemalloc

    from teg_fsm.cli.main import main

    if os.environ.get(TRACEMALLOC_ENV):
        tracemalloc.start(8)
    out = Path(os.environ[DIAGNOSE_ENV])
    connections = _watch_sqlite_connections()
    threading.Thread(target=_dump_growth, args=(out, connections), name="soak-diagnosis", daemon=True).start()
    return main(["run"])


def _watch_sqlite_connections() -> list[tuple[str, sqlite3.Connection]]:
    """Every connection the gateway opens, so its SQLite memory can be read per connection."""
    opened: list[tuple[str, sqlite3.Connection]] = []
    connect = sqlite3.connect

    def watched(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(database, *args, **kwargs)
        opened.append((Path(str(database)).name, conn))
        return conn

    sqlite3.connect = watched  # type: ignore[assignment]
    return opened


def _sqlite_per_connection(connections: list[tuple[str, sqlite3.Connection]]) -> str:
    """Page cache and statement memory of each open connection (sqlite3_db_status; CPython 3.11 layout)."""
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    parts = []
    for name, conn in connections:
        try:
            conn.in_transaction  # noqa: B018 - raises on a closed connection (its handle is gone)
        except sqlite3.ProgrammingError:
            continue
        db = ctypes.c_void_p.from_address(id(conn) + 16)  # pysqlite_Connection.db follows PyObject_HEAD
        used = []
        for op in (1, 3):  # SQLITE_DBSTATUS_CACHE_USED, SQLITE_DBSTATUS_STMT_USED
            cur, high = ctypes.c_int(), ctypes.c_int()
            lib.sqlite3_db_status(db, op, ctypes.byref(cur), ctypes.byref(high), 0)
            used.append(cur.value / 1024)
        parts.append(f"{name} cache {used[0]:.0f} KiB stmts {used[1]:.0f} KiB")
    return "; ".join(parts)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _native_memory() -> str:
    parts = []
    try:
        sqlite = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        parts.append(f"sqlite {sqlite.sqlite3_memory_used() / 2**20:.2f} MB")
    except (OSError, AttributeError):
        parts.append("sqlite ?")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        parts.append(f"malloc in use {info.uordblks / 2**20:.2f} MB, free in arenas {info.fordblks / 2**20:.2f} MB, "
                     f"arena {info.arena / 2**20:.2f} MB, mmapped {info.hblkhd / 2**20:.2f} MB")
    except (OSError, AttributeError):
        parts.append("malloc ?")
    return "; ".join(parts)


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def _bookkeeping_sizes() -> dict[str, int]:
    """Sizes of the containers the gateway's own objects hold (pending maps, heaps, buffers), the larger ones."""
    sizes: dict[str, int] = {}
    for obj in gc.get_objects():
        module = getattr(type(obj), "__module__", "")
        if not isinstance(module, str) or not module.startswith(("teg_fsm", "machines", "paho", "statemachine")) or not hasattr(obj, "__dict__"):
            continue
        try:
            attributes = list(vars(obj).items())
        except TypeError:
            continue
        for attr, value in attributes:
            if isinstance(value, (list, dict, set, collections.deque)) and len(value) >= 20:
                key = f"{type(obj).__qualname__}.{attr}"
                sizes[key] = max(sizes.get(key, 0), len(value))
    return sizes


def _weakrefs() -> dict[int, Any]:
    """Weak references alive now (weakrefs are not tracked by the gc: found through their referrers)."""
    import weakref

    found: dict[int, Any] = {}
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            if isinstance(ref, weakref.ReferenceType):
                found[id(ref)] = (ref, obj)
    return found


def _holder(obj: Any) -> str:
    """What holds a weakref: the container's type and size, and for a dict the type of its owner."""
    size = len(obj) if hasattr(obj, "__len__") else -1
    owners = [type(o).__qualname__ for o in gc.get_referrers(obj)[:3] if not isinstance(o, (list, dict)) or True]
    return f"{type(obj).__qualname__}[{size}] in {'/'.join(owners[:2])}" if size > 50 else type(obj).__qualname__


def _describe_new_weakrefs(before: set[int]) -> str:
    new = [found for i, found in _weakrefs().items() if i not in before]
    kinds = collections.Counter(
        f"{type(r()).__qualname__ if r() is not None else 'dead'} cb={getattr(r.__callback__, '__qualname__', None)}"
        f" held by {_holder(container)}"
        for r, container in new[:200])
    return f"{len(new)} new weakrefs: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common(6))


def _dump_growth(out: Path, connections: list[tuple[str, sqlite3.Connection]]) -> None:
    import tracemalloc

    time.sleep(TRACEMALLOC_BASELINE_S)
    baseline = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    types0, refs0, started = _type_counts(), set(_weakrefs()), time.monotonic()
    while True:
        time.sleep(60)
        rss = psutil.Process().memory_info().rss / 2**20
        lines = [f"== {(time.monotonic() - started) / 60:.1f} min after the baseline: RSS {rss:.1f} MB; "
                 f"{_native_memory()}"]
        grown = (_type_counts() - types0).most_common(8)
        lines.append("   object types grown: " + ", ".join(f"{name} +{n}" for name, n in grown))
        lines.append("   " + _describe_new_weakrefs(refs0))
        lines.append("   sqlite per connection: " + _sqlite_per_connection(connections))
        sizes = sorted(_bookkeeping_sizes().items(), key=lambda kv: -kv[1])[:12]
        lines.append("   largest containers: " + ", ".join(f"{k}={n}" for k, n in sizes))
        if baseline is not None:
            lines.append(f"   traced {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB")
            for stat in tracemalloc.take_snapshot().compare_to(baseline, "traceback")[:10]:
                lines.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
                lines += [f"      {frame}" for frame in stat.traceback.format()[-10:]]
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10, help="how long to run (default 10)")
    parser.add_argument("--rows-per-s", type=float, default=50.0, help="controller rows per second (default 50)")
    parser.add_argument("--file-every-min", type=int, default=3, help="file push period in minutes (0: none)")
    parser.add_argument("--ota-every-min", type=int, default=4, help="OTA assignment period in minutes (0: none)")
    parser.add_argument("--diagnose", type=Path, metavar="FILE",
                        help="every minute, write where the gateway's memory is (SQLite, malloc, object types) to FILE")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="with --diagnose: also trace allocations (doubles memory, slows the gateway)")
    parser.add_argument("--gateway-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gateway_child:
        return gateway_child()
    if args.diagnose is not None:
        args.diagnose = args.diagnose.resolve()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # so the gateway subprocess is stopped too
    return soak(args)


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
