"""Retention benchmark: what the journal costs per day, by meaning, and how long decisions last.

    python tools/bench_retention.py                  # 1 and 50 rows/s, 120 s measured each
    python tools/bench_retention.py --rates 1 --seconds 600

Runs the real gateway (`python -m teg_fsm.cli run`, a subprocess) against the
bundled ThingsBoard stand-in, with a controller stand-in that writes R rows
per second into the queue the way the demo controller does (open the file,
insert one row, commit, close). After a settling period it measures a window
of W seconds, stops the gateway and reads its journal:

- decisions: rows of ``journal`` except snapshots (kept for the age bound).
  A decision that repeats (the file check every 30 s, a retry every 10 s) is
  kept in full once a day, or up to MOVES_KEPT_PER_DAY times when it moves a
  machine to another state, and counted in summaries otherwise, so a short
  window cannot be scaled up linearly: each repeating kind (seen as a routine
  repeat in the window) is counted that many times a day (or as often as it
  occurs, if less), the other decisions linearly;
- traffic summaries: the window's traffic summarised as the gateway does
  after the detail window (``Journal.prune`` on a copy), per day;
- detail window: traffic in full detail, the bytes it holds at any time
  (``TEG_JOURNAL_DETAIL_WINDOW_S``);
- snapshots: the size of one snapshot times the snapshots per day the policy
  takes at the measured decision rate (``teg_fsm.engine.dispatcher``).

Bytes are on-disk bytes: each category's share of the JSON it stores, scaled
by the file's pages (SQLite ``dbstat``: tables, indexes, page slack).
Per-day figures are EXTRAPOLATED from the measured window, and printed as such.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python tools/bench_retention.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teg_fsm.engine import dispatcher as policy  # noqa: E402
from teg_fsm.engine.events import Event  # noqa: E402
from teg_fsm.engine.journal import (  # noqa: E402
    DECISION,
    DEFAULT_DETAIL_WINDOW_S,
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_BYTES,
    MOVES_KEPT_PER_DAY,
    ROUTINE_MEMORY_MS,
    SNAPSHOT,
    SNAPSHOT_THIN_AFTER_MS,
    Journal,
    Transition,
    classify,
    decision_pattern,
)
from tests.integration import uplink_rig as rig  # noqa: E402
from tools.tb_standin import StandIn  # noqa: E402

DEVICE = "station-1"
DAY_S = 86_400
MIB = 1024 * 1024
WRITER = r"""
import json, sqlite3, sys, time
path, rate, seconds, mode = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
period, start, i = 1.0 / rate, time.monotonic(), 0
while time.monotonic() - start < seconds:
    conn = sqlite3.connect(path, timeout=30)
    if mode == "row":
        ts = int(time.time() * 1000)
        conn.execute("INSERT INTO messages (type, message) VALUES ('measurement', ?)",
                     (json.dumps({"ts": ts, "values": {"seq": i, "co2": 400 + i % 100, "temp": 21.5}}),))
        conn.commit()
    else:  # touch: open, read, close; no new row
        conn.execute("SELECT count(*) FROM health_check").fetchone()
    conn.close()
    i += 1
    time.sleep(max(0.0, start + i * period - time.monotonic()))
"""


def controller(queue: Path, rate: float, seconds: float, mode: str = "row") -> subprocess.Popen[bytes]:
    """A controller stand-in: ``row`` writes one row per tick, ``touch`` only opens and closes the file."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(queue), str(rate), str(seconds), mode])


class Gateway:
    """The stand-in and a gateway subprocess with a fresh data dir (``repo`` picks the checkout to run)."""

    def __init__(self, tmp: Path, repo: Path | None = None, **env: str) -> None:
        self.tmp, self.repo, self.extra = tmp, repo, env
        self.data = tmp / "data"
        self.queue = self.data / "communication_queue.db"

    def __enter__(self) -> Gateway:
        self.tb = StandIn(tls_port=0).__enter__()
        token = self.tb.add_device(DEVICE)
        rig.create_queue(self.queue)
        env = rig.gateway_env(self.tb, self.data, token, LOG_LEVEL="WARNING", **self.extra)
        if self.repo is None:
            self.proc = rig.start_gateway(env, self.tmp / "gateway.log")
        else:
            env["PYTHONPATH"] = str(self.repo)
            log = open(self.tmp / "gateway.log", "ab")  # noqa: SIM115 - handed to the child
            own = self.repo / ".venv" / "bin" / "python"  # that checkout's own install, if it has one
            python = str(own) if own.exists() else sys.executable
            self.proc = subprocess.Popen([python, "-m", "teg_fsm.cli", "run"], env=env, cwd=self.repo,
                                         stdout=log, stderr=subprocess.STDOUT)
            log.close()
        rig.wait_for(lambda: self.tb.is_connected(DEVICE), 30, "gateway connected")
        return self

    def __exit__(self, *exc: Any) -> None:
        rig.stop(self.proc)
        self.tb.__exit__(*exc)

    def journal_copy(self, into: Path) -> Path:
        """A copy of the journal (with its WAL) to read and summarise without touching the original."""
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.data / 'teg_journal.db'}{suffix}")
            if source.exists():
                shutil.copyfile(source, f"{into}{suffix}")
        return into


def now_ms() -> int:
    return int(time.time() * 1000)


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _payload(table: str, where: str = "") -> str:
    return (f"SELECT count(*), coalesce(sum(length(data) + length(transitions) + length(effects) + length(name)"
            f" + length(source) + coalesce(length(target), 0) + 24), 0) FROM {table} {where}")


def page_factor(conn: sqlite3.Connection) -> float:
    """On-disk bytes per payload byte over the whole file (indexes and page slack included)."""
    pages = conn.execute("SELECT sum(pgsize) FROM dbstat").fetchone()[0] or 0
    payload = sum(conn.execute(_payload(t)).fetchone()[1] for t in ("journal", "journal_traffic", "journal_summary")
                  if t in _tables(conn))
    return pages / payload if payload else 1.0


def measure(rate: float, seconds: float, settle_s: float = 35.0) -> dict[str, Any]:
    """Run the gateway with a controller at ``rate`` rows/s and measure its journal over ``seconds``.

    The settling time covers the longest routine period (the file check, 30 s), so every
    periodic decision has been made once before the window opens.
    """
    with tempfile.TemporaryDirectory(prefix="teg-retention-") as tmp_name:
        tmp = Path(tmp_name)
        with Gateway(tmp) as gw:
            writer = controller(gw.queue, rate, settle_s + seconds + 1)
            time.sleep(settle_s)
            t0 = now_ms()
            time.sleep(seconds)
            t1 = now_ms()
            writer.wait()
            time.sleep(1.0)
            sent = gw.tb.telemetry_count(DEVICE)
        copy = gw.journal_copy(tmp / "measured.db")
        return _analyse(copy, t0, t1, rate, sent)


def _rows(conn: sqlite3.Connection, table: str, where: str) -> list[tuple[tuple[Any, ...], bool, int]]:
    """(decision pattern, is it uplink traffic, payload bytes) of each row of ``table`` in the window."""
    out = []
    for source, name, target, data, transitions, effects in conn.execute(
            f"SELECT source, name, target, data, transitions, effects FROM {table} {where}"):
        moves = [Transition(t["machine"], t["source"], t["target"], t["event"], t.get("error"))
                 for t in json.loads(transitions)]
        event = Event(0, 0, source, name, json.loads(data), target)
        kinds = json.loads(effects)
        size = len(data) + len(transitions) + len(effects) + len(name) + len(source) + len(target or "") + 24
        out.append((decision_pattern(event, moves, kinds), classify(event, moves, kinds) != DECISION, size))
    return out


def _analyse(db: Path, t0: int, t1: int, rate: float, sent: int) -> dict[str, Any]:
    window_s = (t1 - t0) / 1000
    conn = sqlite3.connect(db)
    factor = page_factor(conn)
    in_window = f"WHERE ts_ms >= {t0} AND ts_ms < {t1}"
    decided = _rows(conn, "journal", f"{in_window} AND name != '{SNAPSHOT}'")
    detail = _rows(conn, "journal_traffic", in_window)
    # Repeating kinds: routine repeats seen in the window, or decisions already made in the settling time.
    before = {pattern for pattern, _, _ in _rows(conn, "journal", f"WHERE ts_ms < {t0} AND name != '{SNAPSHOT}'")}
    repeating = {pattern for pattern, traffic, _ in detail if not traffic}
    repeating |= {pattern for pattern, _, _ in decided if pattern in before}
    once = [size for pattern, _, size in decided if pattern not in repeating]
    sizes: dict[tuple[Any, ...], list[int]] = {}
    for pattern, traffic, size in decided + detail:
        if pattern in repeating:
            sizes.setdefault(pattern, []).append(size)
    days_per_memory = DAY_S * 1000 / ROUTINE_MEMORY_MS

    def kept_per_day(pattern: tuple[Any, ...], seen: int) -> float:
        """How often a repeating kind is kept in full a day: once, or up to MOVES_KEPT_PER_DAY when it moves."""
        if not any(source != target for _, source, target, _ in pattern[3]):
            return days_per_memory
        return min(seen / window_s * DAY_S, MOVES_KEPT_PER_DAY * days_per_memory)

    repeating_B_day = sum(sum(v) / len(v) * kept_per_day(pattern, len(v)) for pattern, v in sizes.items())
    other_per_day = len(once) / window_s * DAY_S
    names = conn.execute(f"SELECT name, target, count(*) FROM journal_traffic {in_window} AND target IS NOT 'uplink'"
                         " GROUP BY name, target ORDER BY count(*) DESC LIMIT 6").fetchall()
    traffic = conn.execute(_payload("journal_traffic", in_window)).fetchone()
    snapshot = conn.execute(f"SELECT length(data) + 40 FROM journal WHERE name = '{SNAPSHOT}' ORDER BY id DESC LIMIT 1"
                            ).fetchone()
    machines_with_traffic = conn.execute(
        f"SELECT count(DISTINCT coalesce(target, '')) FROM journal_traffic {in_window}").fetchone()[0]
    conn.close()
    # Summarise everything measured, as the gateway does once the detail window has passed.
    journal = Journal(db, detail_window_s=0, max_bytes=1 << 40)
    journal.prune(t1 + 120_000)
    journal.close()
    conn = sqlite3.connect(db)
    summaries = conn.execute(_payload("journal_summary", f"WHERE ts_ms >= {t0 - 60_000} AND ts_ms < {t1}")).fetchone()
    conn.close()
    summary_B = summaries[1] / summaries[0] * factor if summaries[0] else 0.0
    # A day later the minute summaries are merged into one per hour and machine.
    journal = Journal(db, detail_window_s=0, max_bytes=1 << 40)
    journal.prune(t1 + 2 * DAY_S * 1000)
    journal.close()
    conn = sqlite3.connect(db)
    hourly = conn.execute(_payload("journal_summary", f"WHERE ts_ms >= {t0 - 3_600_000} AND ts_ms < {t1}"
                                   " AND json_extract(data, '$.interval_s') = 3600")).fetchone()
    conn.close()
    hourly_B = hourly[1] / hourly[0] * factor if hourly[0] else summary_B
    snapshots_per_day = _snapshots_per_day(other_per_day)
    return {
        "rate": rate,
        "window_s": window_s,
        "rows_sent": sent,
        "decision_rows_per_day": other_per_day + sum(kept_per_day(pattern, len(v)) for pattern, v in sizes.items()),
        "repeating_kinds": len(sizes),
        "top_routine": names,
        "decisions_B_day": (sum(once) / window_s * DAY_S + repeating_B_day) * factor,
        "traffic_rows_per_s": traffic[0] / window_s,
        "detail_B_s": traffic[1] * factor / window_s,
        "detail_window_B": traffic[1] * factor / window_s * DEFAULT_DETAIL_WINDOW_S,
        # One summary per minute and machine with traffic or routine repeats in that minute.
        "summaries_B_day": summary_B * machines_with_traffic * DAY_S / 60,
        "hourly_B_day": hourly_B * machines_with_traffic * 24,
        "summary_B": summary_B,
        "hourly_B": hourly_B,
        "summary_machines": machines_with_traffic,
        "snapshot_B": (snapshot[0] if snapshot else 0) * factor,
        "snapshots_per_day": snapshots_per_day,
        # Kept: every snapshot of the last week, then the first of each day (journal.SNAPSHOT_THIN_AFTER_MS).
        "snapshots_B_day": (snapshot[0] if snapshot else 0) * factor * _kept_per_day(snapshots_per_day),
        "page_factor": factor,
    }


def _snapshots_per_day(decisions_per_day: float) -> float:
    """The dispatcher's policy: every N decisions, at most hourly for any decision, at least daily."""
    hourly = DAY_S * 1000 / policy.SNAPSHOT_INTERVAL_MS
    daily = DAY_S * 1000 / policy.SNAPSHOT_MAX_INTERVAL_MS
    return max(daily, min(hourly, decisions_per_day)) + decisions_per_day / policy.SNAPSHOT_EVERY_DECISIONS


def _kept_per_day(taken_per_day: float, days: float = 400.0) -> float:
    """Snapshots kept per day on average over ``days``: all of the last week, one a day before it."""
    week = SNAPSHOT_THIN_AFTER_MS / 1000 / DAY_S
    return (min(days, week) * taken_per_day + max(0.0, days - week) * min(1.0, taken_per_day)) / days


def report(r: dict[str, Any]) -> str:
    kept_per_day = r["decisions_B_day"] + r["snapshots_B_day"]
    budget = DEFAULT_MAX_BYTES - r["detail_window_B"]
    days_by_size = budget / kept_per_day if kept_per_day else float("inf")
    days = min(days_by_size, DEFAULT_MAX_AGE_S / DAY_S)
    at_age_bound = kept_per_day * DEFAULT_MAX_AGE_S / DAY_S
    summary_room = max(0.0, budget - at_age_bound - r["summaries_B_day"])
    summary_days = 1 + summary_room / r["hourly_B_day"] if r["hourly_B_day"] else float("inf")
    lines = [
        f"controller at {r['rate']:g} rows/s, measured window {r['window_s']:.0f} s "
        f"({r['rows_sent']} rows reached the stand-in in all); per-day figures EXTRAPOLATED from the window:",
        f"  decisions          {r['decisions_B_day'] / 1024:10.1f} KiB/day  ({r['decision_rows_per_day']:.0f} rows/day; "
        f"{r['repeating_kinds']} repeating kinds, each kept in full once a day, "
        f"or up to {MOVES_KEPT_PER_DAY} times when it moves a machine)",
        f"  traffic summaries  {r['summaries_B_day'] / 1024:10.1f} KiB/day  for the last day (one row per minute for "
        f"each of {r['summary_machines']} machines, {r['summary_B']:.0f} B each),",
        f"                     {r['hourly_B_day'] / 1024:10.1f} KiB/day  after a day (one row per hour, "
        f"{r['hourly_B']:.0f} B each)",
        f"  detail window      {r['detail_window_B'] / MIB:10.2f} MiB held  ({r['detail_B_s'] / 1024:.1f} KiB/s of "
        f"traffic rows, {r['traffic_rows_per_s']:.1f} rows/s, kept {DEFAULT_DETAIL_WINDOW_S:g} s)",
        f"  snapshots          {r['snapshots_B_day'] / 1024:10.1f} KiB/day  (kept over 400 days; taken "
        f"{r['snapshots_per_day']:.0f}/day, one a day kept after a week, of "
        f"{r['snapshot_B'] / 1024:.1f} KiB)",
        f"  (full detail, as before: {r['detail_B_s'] * DAY_S / MIB:.0f} MiB/day of traffic rows)",
        f"  days of decisions kept in the default budget ({DEFAULT_MAX_BYTES // MIB} MiB): {days:.0f} "
        f"(age bound {DEFAULT_MAX_AGE_S // DAY_S} days; the size alone would keep {days_by_size:,.0f} days); "
        f"summaries kept ~{min(summary_days, DEFAULT_MAX_AGE_S / DAY_S):.0f} days",
        f"  the budget holds 400 days of up to {_decisions_for_400_days(r):,.0f} decisions a day "
        f"(at the measured {r['decisions_B_day'] / max(r['decision_rows_per_day'], 1):.0f} B each; summaries and "
        "detail give way first)",
        "  routine repeats in the window: " + ", ".join(f"{n}->{t or '*'} x{c}" for n, t, c in r["top_routine"]),
    ]
    return "\n".join(lines)


def _decisions_for_400_days(r: dict[str, Any]) -> float:
    """How many new decisions a day the default budget keeps for 400 days (snapshots grow with them)."""
    per_row = r["decisions_B_day"] / max(r["decision_rows_per_day"], 1)
    room = (DEFAULT_MAX_BYTES - r["detail_window_B"]) / 400

    def cost(n: float) -> float:
        return n * per_row + r["snapshot_B"] * _kept_per_day(_snapshots_per_day(n))

    low, high = 0.0, 1e7
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) <= room else (low, mid)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 50.0], help="controller rows per second")
    parser.add_argument("--seconds", type=float, default=120.0, help="measured window per rate")
    args = parser.parse_args()
    for rate in args.rates:
        print(report(measure(rate, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
