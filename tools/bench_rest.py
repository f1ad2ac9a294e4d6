"""At-rest benchmark: what the gateway costs while a controller writes one row a second.

    python tools/bench_rest.py --minutes 10 --settle 1          # the issue's window
    python tools/bench_rest.py --minutes 2 --settle 0.5          # a quick iteration
    python tools/bench_rest.py --minutes 2 --strace              # where the writes go, per file
    python tools/bench_rest.py --backlog 1000000 --minutes 0     # RSS at a 1M-row backlog
    python tools/bench_rest.py --minutes 2 --pin                 # the gateway on one core (taskset -c 0)
    python tools/bench_rest.py --starts 5                        # only start to first record, 5 times
    python tools/bench_rest.py --minutes 2 --files 3             # a station managing 3 files (drift checks)

Gateways start from compiled bytecode (cached outside the tree), as an installed
package does; ``--no-bytecode`` compiles from source at every start instead.

The gateway runs as a subprocess (``teg run``) against the stand-in (TLS) in
this process, with no Docker engine (``DOCKER_HOST`` names a missing socket).
One row is in the queue before the process starts: the time from ``Popen`` to
its arrival at the stand-in is "start to first record". After the connect and
``--settle`` minutes of idling it prints idle RSS and threads, then, for each
controller variant (``reopen``: connect, insert, commit, close for every row,
as the existing controller does; ``open``: one connection kept open), writes
one row a second for ``--minutes`` and prints over that window:

- gateway CPU seconds (user + system) and per 10 minutes;
- bytes written to disk (``/proc/<pid>/io`` write_bytes) per row and per hour;
- voluntary context switches of all its threads (each is one wake-up of a thread
  that blocked), per row;
- journal growth (``teg_journal.db`` and its -wal) per hour.

``--threads`` also prints the wake-ups per row of each thread (a ``sitecustomize``
on the gateway's path gives each Python thread its name as the OS thread name).

``--strace`` traces the gateway's write/pwrite64/fsync/fdatasync calls during the
window and sums bytes and syncs per file (strace slows the traced process: use
it to see where the writes go, not for the CPU figure). ``--backlog N`` first
fills N rows and reports RSS while they drain (peak, and after the drain).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as ``python tools/bench_rest.py`` from the repo root
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import psutil  # noqa: E402

from tests.integration import uplink_rig as rig  # noqa: E402
from tools.tb_standin import StandIn  # noqa: E402

DEVICE = "rest-station"


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def voluntary_switches(pid: int) -> int:
    """Summed over every thread (/proc/<pid>/status shows the main thread only)."""
    return sum(by_thread(pid, task_switches).values())


def by_thread(pid: int, read: Callable[[str], int]) -> collections.Counter[str]:
    """``read(task directory)`` summed per thread name (``comm``: set by ``--threads``, else all are "python")."""
    out: collections.Counter[str] = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = f"/proc/{pid}/task/{tid}"
        try:
            out[Path(f"{task}/comm").read_text().strip()] += read(task)
        except (FileNotFoundError, StopIteration):
            pass  # a thread that ended
    return out


def task_switches(task: str) -> int:
    """Voluntary context switches: the thread's wake-ups."""
    with open(f"{task}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def task_cpu_ns(task: str) -> int:
    """Time on CPU in ns (``schedstat``: finer than the clock ticks of ``stat``)."""
    return int(Path(f"{task}/schedstat").read_text().split()[0])


# Loaded by the gateway through PYTHONPATH with ``--threads``: gives each Python thread its name
# as the OS thread name (15 bytes), so /proc/<pid>/task/*/comm tells the threads apart.
_NAME_THREADS = """
import ctypes, threading
_libc = ctypes.CDLL(None)
_inner = threading.Thread._bootstrap_inner
def _named(self):
    _libc.prctl(15, self.name.encode()[:15], 0, 0, 0)
    _inner(self)
threading.Thread._bootstrap_inner = _named
"""


def journal_bytes(data: Path) -> int:
    return sum(p.stat().st_size for p in data.glob("teg_journal.db*") if p.is_file())


def cpu_s(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def controller(db: Path, variant: str, seconds: float, stop: threading.Event, written: list[int]) -> None:
    """One row a second on a fixed schedule; ``reopen`` opens and closes the file for every row.

    ``idle`` writes nothing: the window then shows what the gateway costs on its own account
    (keepalives, health reports, timers), the floor under the per-row figures.
    """
    if variant == "idle":
        stop.wait(seconds)
        return
    conn = sqlite3.connect(db, timeout=30) if variant == "open" else None
    started, seq = time.monotonic(), 0
    try:
        while not stop.is_set() and seq < seconds:
            c = conn or sqlite3.connect(db, timeout=30)
            c.execute("INSERT INTO messages (type, message) VALUES (?, ?)",
                      ("measurement", json.dumps({"ts": int(time.time() * 1000), "values": {"seq": seq, "co2": 400}})))
            c.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) ON CONFLICT(id) "
                      "DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (int(time.time() * 1000),))
            c.commit()
            if conn is None:
                c.close()
            seq += 1
            written[0] = seq
            stop.wait(max(0.0, started + seq - time.monotonic()))
    finally:
        if conn is not None:
            conn.close()


def _with_bytecode(env: dict[str, str]) -> None:
    """Start like an installed gateway, from compiled bytecode (the package compiles it at install).

    The test environment sets PYTHONDONTWRITEBYTECODE (tests must leave no files in the
    tree), which makes every start compile each of the gateway's modules from source
    (~0.4 s of a loaded 2-core box). The caches go to a directory outside the tree.
    """
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / f"teg-bench-pycache-{os.getuid()}")
    subprocess.run([sys.executable, "-m", "compileall", "-q", "teg_fsm", "machines"], env=env, cwd=REPO,
                   check=False, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-c", "import teg_fsm.app, teg_fsm.cli.main, paho.mqtt.client, statemachine"],
                   env=env, cwd=REPO, check=True)


def start(tb: StandIn, root: Path, extra: dict[str, str], pin: bool,
          bytecode: bool = True, threads: bool = False, files: int = 0) -> tuple[subprocess.Popen[bytes], float]:
    data = root / "data"
    token = tb.add_device(DEVICE)
    if files:  # managed files: the file sync hashes them every TEG_FILE_CHECK_INTERVAL_S
        tb.set_shared(DEVICE, {"FILES": {f"f{i}": {"path": f"$DATA_PATH/f{i}.conf"} for i in range(files)},
                               **{f"FILE_CONTENT_f{i}": f"setting_{i}=1\n" * 20 for i in range(files)}})
    env = rig.gateway_env(tb, data, token, THINGSBOARD_DEVICE_NAME=DEVICE, LOG_LEVEL="WARNING",
                          DOCKER_HOST=f"unix://{root}/no-docker.sock", **extra)
    if bytecode:
        _with_bytecode(env)
    if threads:
        (root / "site").mkdir(exist_ok=True)
        (root / "site" / "sitecustomize.py").write_text(_NAME_THREADS)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "site"), env.get("PYTHONPATH")]))
    db = data / "communication_queue.db"
    rig.create_queue(db)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO messages (type, message) VALUES ('measurement', ?)",
                 (json.dumps({"ts": int(time.time() * 1000), "values": {"first": 1}}),))
    conn.commit()
    conn.close()
    started = time.monotonic()
    proc = rig.start_gateway(env, root / "gateway.log")
    if pin:  # like ``taskset -c 0``: set before the interpreter starts its threads, which inherit it
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            os.sched_setaffinity(int(tid), {0})
    return proc, started


def first_record_s(tb: StandIn, proc: subprocess.Popen[bytes], started: float) -> float:
    while tb.telemetry_count(DEVICE) == 0:
        if proc.poll() is not None:
            raise SystemExit("gateway exited before the first record")
        if time.monotonic() - started > 60:
            raise SystemExit("no record within 60 s")
        time.sleep(0.002)
    return time.monotonic() - started


def strace_start(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["strace", "-f", "-y", "-qq", "-e", "trace=write,pwrite64,fsync,fdatasync",
                             "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL)


_CALL = re.compile(r"(\w+)\((\d+)<([^>]*)>.*\)\s+=\s+(-?\d+)")


def strace_summary(out: Path) -> str:
    """Bytes written and syncs per file from an ``strace -y`` log."""
    written: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    syncs: collections.Counter[str] = collections.Counter()
    for line in out.read_text(errors="replace").splitlines():
        m = _CALL.search(line)
        if not m:
            continue
        call, _fd, path, ret = m.groups()
        name = Path(path).name if "/" in path else path
        if call in ("fsync", "fdatasync"):
            syncs[name] += 1
        elif int(ret) > 0:
            written[name] += int(ret)
            calls[name] += 1
    names = sorted(set(written) | set(syncs), key=lambda n: -written[n])
    return "\n".join(f"  {n:42s} {written[n]:>11,d} B in {calls[n]:6d} writes, {syncs[n]:5d} syncs" for n in names)


def window(args: argparse.Namespace, proc: subprocess.Popen[bytes], root: Path, variant: str) -> dict[str, float]:
    ps, data = psutil.Process(proc.pid), root / "data"
    seconds = args.minutes * 60
    trace = root / f"strace-{variant}.log"
    tracer = strace_start(proc.pid, trace) if args.strace else None
    if tracer is not None:
        time.sleep(1.0)  # attached to every thread before the window starts
    stop, written = threading.Event(), [0]
    cpu0, wb0, vcs0, j0 = cpu_s(ps), write_bytes(proc.pid), voluntary_switches(proc.pid), journal_bytes(data)
    per_thread0, cpu_per_thread0 = by_thread(proc.pid, task_switches), by_thread(proc.pid, task_cpu_ns)
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    writer = threading.Thread(target=controller, args=(data / "communication_queue.db", variant, seconds, stop,
                                                       written), daemon=True)
    writer.start()
    writer.join()
    time.sleep(1.0)  # the last row's transfer and send
    elapsed = time.monotonic() - t0
    cpu1, wb1, vcs1, j1 = cpu_s(ps), write_bytes(proc.pid), voluntary_switches(proc.pid), journal_bytes(data)
    if tracer is not None:
        tracer.terminate()
        tracer.wait()
    hour = 3600 / elapsed
    # Per row while a controller writes; per minute for the idle window, which has no rows.
    idle = variant == "idle"
    unit, per_unit = ("min", 60 / elapsed) if idle else ("row", 1 / max(1, written[0]))
    result = {"rows": 0 if idle else written[0], "cpu_s": cpu1 - cpu0,
              "cpu_s_per_10min": (cpu1 - cpu0) * 600 / elapsed,
              f"write_kb_per_{unit}": (wb1 - wb0) * per_unit / 1024, "write_mb_per_hour": (wb1 - wb0) * hour / 2**20,
              f"wakeups_per_{unit}": (vcs1 - vcs0) * per_unit, "journal_kb_per_hour": (j1 - j0) * hour / 1024,
              "load": (load0 + os.getloadavg()[0]) / 2}
    print(f"{variant:6s} {args.minutes:g} min, {'no' if idle else written[0]} rows: CPU {result['cpu_s']:.2f} s "
          f"({result['cpu_s_per_10min']:.2f} per 10 min); written {result[f'write_kb_per_{unit}']:.1f} KB/{unit}, "
          f"{result['write_mb_per_hour']:.1f} MB/h; wake-ups {result[f'wakeups_per_{unit}']:.1f}/{unit}; "
          f"journal +{result['journal_kb_per_hour']:.0f} KB/h; load {result['load']:.2f}", flush=True)
    if args.threads:
        per_thread = by_thread(proc.pid, task_switches)
        per_thread.subtract(per_thread0)
        print(f"  wake-ups per {unit} by thread: " + ", ".join(
            f"{name} {n * per_unit:.2f}" for name, n in per_thread.most_common() if n), flush=True)
        cpu_per_thread = by_thread(proc.pid, task_cpu_ns)
        cpu_per_thread.subtract(cpu_per_thread0)
        print(f"  CPU ms per {unit} by thread: " + ", ".join(
            f"{name} {ns / 1e6 * per_unit:.2f}" for name, ns in cpu_per_thread.most_common() if ns >= 1e5),
            flush=True)
    if tracer is not None:
        print(strace_summary(trace), flush=True)
    return result


def backlog(args: argparse.Namespace, tb: StandIn, root: Path, proc: subprocess.Popen[bytes]) -> None:
    """Fill ``--backlog`` rows (the gateway drains while they are written) and watch RSS until all arrived."""
    ps = psutil.Process(proc.pid)
    base = tb.telemetry_count(DEVICE)
    peak, done = [0], threading.Event()

    def watch_rss() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], ps.memory_info().rss)
            done.wait(0.1)

    watcher = threading.Thread(target=watch_rss, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    rig.fill(root / "data" / "communication_queue.db", args.backlog, start=10_000_000)
    filled = time.monotonic() - t0
    while tb.telemetry_count(DEVICE) < base + args.backlog:
        if time.monotonic() - t0 > 1800 or proc.poll() is not None:
            raise SystemExit("backlog did not drain")
        time.sleep(0.1)
    took = time.monotonic() - t0
    time.sleep(2.0)
    done.set()
    watcher.join()
    print(f"backlog {args.backlog} rows: written in {filled:.1f} s, all arrived {took:.1f} s after the first write; "
          f"RSS peak {peak[0] / 2**20:.1f} MB, after {ps.memory_info().rss / 2**20:.1f} MB, threads {ps.num_threads()}",
          flush=True)


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="teg-rest-") as tmp, StandIn(tls_port=0) as tb:
        root = Path(tmp)
        extra = dict(kv.split("=", 1) for kv in args.env)
        proc, started = start(tb, root, extra, args.pin, not args.no_bytecode, args.threads, args.files)
        try:
            first = first_record_s(tb, proc, started)
            ps = psutil.Process(proc.pid)
            time.sleep(args.settle * 60)
            print(f"start to first record {first:.3f} s; idle RSS {ps.memory_info().rss / 2**20:.1f} MB, "
                  f"threads {ps.num_threads()} (after {args.settle:g} min settle); load {os.getloadavg()[0]:.2f}",
                  flush=True)
            if args.minutes > 0:
                for variant in args.variants:
                    results.append(window(args, proc, root, variant))
            if args.backlog:
                backlog(args, tb, root, proc)
        finally:
            rig.stop(proc)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="window per controller variant (default 10)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle minutes after the connect (default 1)")
    parser.add_argument("--variants", nargs="+", default=["reopen", "open"], choices=["reopen", "open", "idle"],
                        help="controller variants, one window each (idle: no rows, the gateway's own floor)")
    parser.add_argument("--strace", action="store_true", help="sum writes and syncs per file (slows the gateway)")
    parser.add_argument("--backlog", type=int, default=0, help="then fill this many rows and watch RSS drain them")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="start compiling from source (as under PYTHONDONTWRITEBYTECODE), not from cached bytecode")
    parser.add_argument("--starts", type=int, default=0, help="only time this many starts to the first record")
    parser.add_argument("--pin", action="store_true", help="pin the gateway to CPU 0 (like taskset -c 0)")
    parser.add_argument("--threads", action="store_true", help="wake-ups per row of each thread (names OS threads)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="extra gateway setting")
    parser.add_argument("--files", type=int, default=0, metavar="N",
                        help="the device manages N small files (FILES): the file sync's periodic check runs")
    args = parser.parse_args()
    if args.starts:
        return starts(args)
    run(args)
    return 0


def starts(args: argparse.Namespace) -> int:
    """Start to first record, ``--starts`` times, each in a fresh directory."""
    times = []
    for _ in range(args.starts):
        with tempfile.TemporaryDirectory(prefix="teg-rest-") as tmp, StandIn(tls_port=0) as tb:
            proc, started = start(tb, Path(tmp), dict(kv.split("=", 1) for kv in args.env), args.pin,
                                  not args.no_bytecode)
            try:
                times.append(first_record_s(tb, proc, started))
            finally:
                rig.stop(proc)
    times.sort()
    print(f"start to first record over {len(times)} starts: min {times[0]:.3f} median {times[len(times) // 2]:.3f} "
          f"max {times[-1]:.3f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
