"""What one journal group commit writes at rest: WAL frames per commit, which pages, bytes per row.

    python tools/bench_journal_frames.py --rows 600          # one controller row a second, 10 minutes

In process, no gateway: a ``Journal`` receives what the dispatcher records for
one controller row at rest (the uplink's five traffic rows: rows_waiting,
transfer, work_changed, data packet, work_changed, and the uplink's two
non-urgent checkpoints, idle -> draining -> idle), then one group commit, as
``tools/bench_rest.py`` sees it; every tenth row a controller engine retry
(two decisions) comes along, as in a gateway with no Docker engine.

It prints, over the rows: WAL frames per commit (min/median/max, read from
the -wal file's frame headers), the tables/indexes those frames belong to
(``dbstat``), and bytes written per row by this process (``/proc/self/io``
wchar: the WAL frames, the WAL checkpoints into the database file and the
pruning rounds), so a change to the journal's layout can be A/B measured
without the noise of a whole gateway.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import struct
import sys
import tempfile
from pathlib import Path

from teg_fsm.engine.events import Event
from teg_fsm.engine.journal import Checkpoint, Journal, Transition

_WAL_HEADER, _FRAME_HEADER = 32, 24


def wal_frames(wal: Path) -> list[int]:
    """Page numbers of the valid frames in the -wal file (those carrying its header's salts)."""
    try:
        raw = wal.read_bytes()
    except FileNotFoundError:
        return []
    if len(raw) < _WAL_HEADER:
        return []
    page_size = struct.unpack(">I", raw[8:12])[0]
    salts = raw[16:24]
    pages, offset = [], _WAL_HEADER
    while offset + _FRAME_HEADER + page_size <= len(raw):
        if raw[offset + 8:offset + 16] != salts:
            break
        pages.append(struct.unpack(">I", raw[offset:offset + 4])[0])
        offset += _FRAME_HEADER + page_size
    return pages


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _event(seq: int, ts: int, source: str, name: str, data: dict, target: str = "uplink") -> Event:
    return Event(seq, ts, source, name, data, target)


def one_row(journal: Journal, seq: int, ts: int) -> int:
    """Record one controller row's traffic as the dispatcher does; returns the next seq."""
    move = lambda name, a, b: [Transition("uplink", a, b, name)]  # noqa: E731
    rows = [
        (_event(seq, ts, "queue", "rows_waiting", {}), move("rows_waiting", "idle", "idle"),
         [{"id": f"uplink:{seq}:0", "reply": "transfer", "timeout_s": 120.0, "max_rows": 2000,
           "pending_max_rows": 5000000, "type": "TransferRows"}]),
        (_event(seq + 1, ts + 4, "effect", "transfer_succeeded",
                {"id": f"uplink:{seq}:0", "result": {"moved": 1, "dead": 0, "rows": 1, "bytes": 180, "points": 4,
                                                    "pending": 0, "pending_bytes": 0}}),
         move("transfer_succeeded", "idle", "idle"),
         [{"id": f"uplink:{seq + 1}:0", "reply": "data_packet", "timeout_s": 10.0, "stream": "data",
           "restart": False, "max_payload_bytes": 65504, "max_points": None, "points_capacity": None,
           "type": "SendPacket"},
          {"id": f"uplink:{seq + 1}:1", "reply": None, "timeout_s": None, "machine": "uplink",
           "name": "work_changed", "data": {}, "type": "Notify"}]),
        (_event(seq + 2, ts + 9, "system", "work_changed", {}), move("work_changed", "idle", "draining"), []),
        (_event(seq + 3, ts + 10, "effect", "data_packet_succeeded",
                {"id": f"uplink:{seq + 1}:0", "result": {"rows": 1, "bytes": 180, "points": 4, "packets": 1,
                                                        "acked_ms": ts + 10, "stream": "data", "more": False}}),
         move("data_packet_succeeded", "draining", "draining"),
         [{"id": f"uplink:{seq + 3}:0", "reply": None, "timeout_s": None, "machine": "uplink",
           "name": "work_changed", "data": {}, "type": "Notify"}]),
        (_event(seq + 4, ts + 11, "system", "work_changed", {}), move("work_changed", "draining", "idle"), []),
    ]
    for number, (event, transitions, effects) in enumerate(rows):
        journal.record(event, transitions, effects)
        if number in (2, 4):
            state = "draining" if number == 2 else "idle"
            journal.save_checkpoint(Checkpoint("uplink", state, {}, 0), event.ts_ms, urgent=False)
    seq += len(rows)
    if seq // 5 % 10 == 0:  # the controller's engine retry, every 10 s at one row every 2 s
        data = {"error": "Cannot connect to the Docker daemon at unix:///nonexistent.sock", "attempt": seq}
        journal.record(_event(seq, ts + 20, "timer", "engine_retry_due", {}, "controller"),
                       [Transition("controller", "engine_unreachable", "inspecting", "engine_retry_due")],
                       [{"id": f"controller:{seq}:0", "reply": "inspect", "timeout_s": 30.0, "type": "InspectEngine"}])
        journal.record(_event(seq + 1, ts + 25, "effect", "inspect_failed", data, "controller"),
                       [Transition("controller", "inspecting", "engine_unreachable", "inspect_failed")],
                       [{"id": f"controller:{seq + 1}:0", "reply": None, "timeout_s": None, "name": "engine_retry_due",
                         "seconds": 10.0, "jitter": 0.1, "type": "StartTimer"}])
        seq += 2
    return seq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600, help="controller rows (one a second)")
    parser.add_argument("--warm", type=int, default=200, help="rows written before measuring")
    args = parser.parse_args(argv)
    clock = [0.0]
    with tempfile.TemporaryDirectory(prefix="teg-frames-") as tmp:
        path = Path(tmp) / "teg_journal.db"
        journal = Journal(path, monotonic=lambda: clock[0])
        for machine in ("controller", "connection", "provisioning", "file_sync"):
            journal.save_checkpoint(Checkpoint(machine, "idle", {"attempts": 0, "pad": "x" * 200}, 0), 0)
        seq, ts = journal.last_seq() + 1, 1_796_000_000_000
        wal = Path(str(path) + "-wal")
        per_commit: list[int] = []
        pages: collections.Counter[int] = collections.Counter()
        written = 0
        for number in range(args.warm + args.rows):
            before_frames = wal_frames(wal)
            before = wchar()
            seq = one_row(journal, seq, ts)
            clock[0] += 1.0
            ts += 1000
            journal.flush_due()
            after_frames = wal_frames(wal)
            if number < args.warm:
                continue
            written += wchar() - before
            new = after_frames[len(before_frames):] if after_frames[:len(before_frames)] == before_frames else after_frames
            per_commit.append(len(new))
            pages.update(new)
        names = dict(journal._db.execute("SELECT pageno, name FROM dbstat").fetchall())  # noqa: SLF001
        page_size = journal._db.execute("PRAGMA page_size").fetchone()[0]  # noqa: SLF001
        journal.close()
    by_name: collections.Counter[str] = collections.Counter()
    for page, count in pages.items():
        by_name["page 1 (header)" if page == 1 else names.get(page, "new/free page")] += count
    print(f"page_size {page_size}; {args.rows} rows, one commit each")
    print(f"WAL frames per commit: min {min(per_commit)} median {statistics.median(per_commit)} max {max(per_commit)}"
          f" mean {statistics.mean(per_commit):.2f}")
    print("frames by table: " + ", ".join(f"{name} {count / args.rows:.2f}" for name, count in by_name.most_common()))
    print(f"written by this process: {written / args.rows / 1024:.1f} KB/row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
