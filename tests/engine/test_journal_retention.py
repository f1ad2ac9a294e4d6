"""Retention by meaning: decisions stay, uplink traffic is summarised, the size bound takes traffic first."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from teg_fsm.engine.events import Event
from teg_fsm.engine.journal import (
    DECISION,
    KEPT_AGAIN,
    MOVES_KEPT_PER_DAY,
    ROUTINE,
    SNAPSHOT,
    SUMMARY,
    TRAFFIC,
    Journal,
    Transition,
    classify,
    read_journal,
)

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000_000
TRANSFER = {"type": "TransferRows", "id": "uplink:1:0", "reply": "transfer", "max_rows": 2000}
SEND = {"type": "SendPacket", "id": "uplink:1:1", "reply": "data_packet", "stream": "data"}


def _traffic(seq: int, ts_ms: int, name: str = "data_packet_succeeded", **result: int) -> Event:
    data = {"effect_id": f"uplink:{seq}:0", "result": result} if result else {}
    return Event(seq, ts_ms, "effect", name, data, "uplink")


def _loop(name: str) -> list[Transition]:
    return [Transition("uplink", "draining", "draining", name)]


def _write_drain(journal: Journal, minutes: int, per_minute: int = 30, first_seq: int = 1) -> int:
    """A normal drain: per controller row a transfer and a packet; a decision every minute."""
    seq = first_seq
    for minute in range(minutes):
        for i in range(per_minute):
            ts = T0 + minute * 60_000 + i * (60_000 // per_minute)
            journal.record(_traffic(seq, ts, "rows_waiting"), _loop("rows_waiting"), [TRANSFER])
            journal.record(_traffic(seq + 1, ts + 1, "transfer_succeeded", moved=1, pending_rows=1),
                           _loop("transfer_succeeded"), [SEND])
            journal.record(_traffic(seq + 2, ts + 2, rows=1, bytes=90, points=3), _loop("data_packet_succeeded"), [])
            seq += 3
        # A different decision each minute (a repeat of one would be routine).
        journal.record(Event(seq, T0 + minute * 60_000 + 59_000, "docker", "container_exited", {"code": 1}),
                       [Transition("controller", "running", f"restarting_{minute}", "container_exited")], [])
        seq += 1
    journal.flush()
    return seq


def test_uplink_bookkeeping_of_a_normal_drain_is_traffic_and_everything_else_a_decision() -> None:
    assert classify(_traffic(1, T0, "rows_waiting"), _loop("rows_waiting"), [TRANSFER]) == TRAFFIC
    assert classify(_traffic(1, T0, moved=3), _loop("transfer_succeeded"), [SEND]) == TRAFFIC
    dead = _traffic(1, T0, "transfer_succeeded", moved=3, dead=1)
    assert classify(dead, _loop("transfer_succeeded"), []) == DECISION, "dead letters are findings"
    failed = _traffic(1, T0, "data_packet_failed")
    assert classify(failed, _loop("data_packet_failed"), []) == DECISION, "every effect failure is a decision"
    log = {"type": "Log", "id": "uplink:1:0", "level": "WARNING", "message": "pending buffer full"}
    assert classify(_traffic(1, T0, moved=1), _loop("transfer_succeeded"), [log]) == DECISION
    other = [Transition("connection", "online", "backoff", "work_changed")]
    assert classify(_traffic(1, T0, "work_changed"), other, []) == DECISION
    assert classify(Event(1, T0, "mqtt", "mqtt_disconnected", {}), [], []) == DECISION


def test_a_decision_repeated_within_a_day_is_routine_and_summarised(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db, detail_window_s=0)
    scan = [Transition("file_sync", "in_sync", "scanning", "check_due")]
    kinds = [journal.record(Event(i, T0 + i * 30_000, "timer", "check_due", {"generation": i}, "file_sync"), scan,
                            [{"type": "ScanFiles", "id": f"file_sync:{i}:0", "reply": "scan"}]) for i in range(1, 200)]
    # It moves the machine (in_sync -> scanning): the first MOVES_KEPT_PER_DAY of the day in full, then counted.
    assert kinds[0] == DECISION and set(kinds[1:MOVES_KEPT_PER_DAY]) == {KEPT_AGAIN}
    assert set(kinds[MOVES_KEPT_PER_DAY:]) == {ROUTINE}, "a loop beyond that is counted, not kept"
    moved = [Transition("file_sync", "in_sync", "fetching", "check_due")]
    assert journal.record(Event(300, T0 + 300 * 30_000, "timer", "check_due", {}, "file_sync"), moved, []) == DECISION
    day_later = Event(301, T0 + 24 * 3600_000 + 60_000, "timer", "check_due", {}, "file_sync")
    scan_effect = [{"type": "ScanFiles", "id": "file_sync:301:0", "reply": "scan"}]
    assert journal.record(day_later, scan, scan_effect) == KEPT_AGAIN, "a day later one is kept in full again"
    journal.flush()
    journal.prune(T0 + 24 * 3600_000 + 180_000)
    entries = list(read_journal(db))
    summaries = [e for e in entries if e.name == SUMMARY]
    assert summaries and summaries[0].data["machines"] == ["file_sync"]
    assert set(summaries[0].data["moves"]) == {"file_sync: in_sync->scanning"}
    assert sum(s.data["events"]["check_due"] for s in summaries) == 199 - MOVES_KEPT_PER_DAY
    assert [e.seq for e in entries if e.name == "check_due"] == [*range(1, MOVES_KEPT_PER_DAY + 1), 300, 301]
    journal.close()


def test_traffic_older_than_the_detail_window_becomes_one_summary_per_minute(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db, detail_window_s=120)
    _write_drain(journal, minutes=5)
    journal.prune()
    entries = list(read_journal(db))
    summaries = [e for e in entries if e.name == SUMMARY]
    # The last event is at 4 min 59 s; 120 s back is 2 min 59 s: minutes 0 and 1 are wholly older.
    assert len(summaries) == 2
    first = summaries[0]
    assert first.source == "journal" and first.target == "uplink" and first.transitions == []
    assert first.data["events"] == {"rows_waiting": 30, "transfer_succeeded": 30, "data_packet_succeeded": 30}
    assert first.data["totals"]["transfer_succeeded"]["moved"] == 30
    assert first.data["totals"]["data_packet_succeeded"] == {"rows": 30, "bytes": 2700, "points": 90}
    assert first.data["machines"] == ["uplink"] and first.data["interval_s"] == 60
    assert first.data["from_ms"] == T0 and first.data["first_seq"] == 1
    decisions = [e for e in entries if e.name == "container_exited"]
    assert len(decisions) == 5, "every decision is kept"
    detail = [e for e in entries if e.name == "rows_waiting"]
    assert len(detail) == 90, "minutes 2 to 4 in full detail"
    assert [e.seq for e in entries] == sorted(e.seq for e in entries), "summaries sit where their traffic was"
    journal.close()


def test_minute_summaries_a_day_old_are_merged_into_one_per_hour(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db, detail_window_s=0)
    _write_drain(journal, minutes=90)  # T0 is on an hour: minutes 0-59 and 60-89
    journal.prune(T0 + 3 * 3600_000)
    minutes = [e for e in read_journal(db) if e.name == SUMMARY]
    assert len(minutes) == 90
    journal.prune(T0 + 26 * 3600_000)
    hours = [e for e in read_journal(db) if e.name == SUMMARY]
    assert [h.data["interval_s"] for h in hours] == [3600, 3600]
    assert hours[0].data["events"]["data_packet_succeeded"] == 60 * 30
    assert hours[0].data["totals"]["data_packet_succeeded"]["bytes"] == 60 * 30 * 90
    assert hours[1].data["first_seq"] == minutes[60].data["first_seq"]
    assert hours[1].data["last_seq"] == minutes[-1].data["last_seq"]
    assert len([e for e in read_journal(db) if e.name == "container_exited"]) == 90
    journal.close()


def test_a_summary_is_not_shown_while_its_detail_is_still_there(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db, detail_window_s=600)
    _write_drain(journal, minutes=2)
    journal.prune()
    assert not [e for e in read_journal(db) if e.name == SUMMARY]
    journal.close()


def test_over_the_size_bound_traffic_goes_before_any_decision(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db, max_bytes=1024 * 1024, detail_window_s=7 * 24 * 3600)
    _write_drain(journal, minutes=40, per_minute=200)
    journal.prune()
    entries = list(read_journal(db))
    assert len([e for e in entries if e.name == "container_exited"]) == 40, "no decision was dropped"
    assert [e for e in entries if e.name == SUMMARY], "the oldest traffic was summarised, not just dropped"
    assert journal._used_bytes() <= 1024 * 1024
    journal.close()


def test_decisions_go_only_when_they_alone_exceed_the_bound(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db, max_bytes=1024 * 1024)
    for seq in range(1, 3001):
        journal.record(Event(seq, T0 + seq, "test", "tick", {"blob": "x" * 500}), [], [])
    journal.flush()
    journal.prune()
    seqs = [e.seq for e in read_journal(db)]
    assert 0 < len(seqs) < 3000 and seqs == list(range(seqs[0], 3001))
    journal.close()


def test_a_restart_never_reuses_a_sequence_number_of_a_traffic_row(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db)
    journal.record(Event(1, T0, "test", "tick", {}), [], [])
    journal.record(_traffic(2, T0 + 1, "rows_waiting"), _loop("rows_waiting"), [TRANSFER])
    journal.close()
    assert Journal(db).last_seq() == 2


def test_snapshots_older_than_a_week_are_thinned_to_one_a_day(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db)
    day = 24 * 3600_000
    start = T0 // day * day
    for hour in range(10 * 24):
        journal.record_snapshot(hour, start + hour * 3600_000, {"format": 1, "machines": {}})
    journal.record(Event(1, start + 10 * day, "test", "tick", {}), [], [])
    journal.flush()
    journal.prune()
    kept = [e.ts_ms for e in read_journal(db, snapshots=True) if e.name == SNAPSHOT]
    old = [ts for ts in kept if ts < start + 3 * day]
    assert old == [start, start + day, start + 2 * day], "the first of each day older than a week"
    assert len(kept) == 3 + 7 * 24, "the last week keeps every snapshot"
    journal.close()


def test_snapshot_rows_are_read_only_when_asked_for(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    journal = Journal(db)
    journal.record(Event(1, T0, "test", "tick", {}), [], [])
    journal.record_snapshot(1, T0, {"format": 1, "machines": {}})
    journal.close()
    assert [e.name for e in read_journal(db)] == ["tick"]
    assert [e.name for e in read_journal(db, snapshots=True)] == ["tick", SNAPSHOT]


def test_older_readers_still_read_the_decisions_table(tmp_path: Path) -> None:
    """A reader that knows only ``journal`` (an older gateway's teg journal) sees every decision."""
    db = tmp_path / "j.db"
    journal = Journal(db, detail_window_s=0)
    _write_drain(journal, minutes=2)
    journal.record_snapshot(999, T0 + 200_000, {"format": 1, "machines": {}})
    journal.close()
    with sqlite3.connect(db) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM journal ORDER BY id")]
    assert names == ["container_exited", "container_exited", SNAPSHOT]


def test_teg_journal_prints_summaries_in_words(tmp_path: Path) -> None:
    db = tmp_path / "teg_journal.db"
    journal = Journal(db, detail_window_s=0)
    _write_drain(journal, minutes=2)
    journal.prune(T0 + 10 * 60_000)
    journal.close()
    out = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "journal", "--file", str(db)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    summary_lines = [line for line in out.splitlines() if "traffic_summary" in line]
    assert len(summary_lines) == 2
    assert "30 data_packet_succeeded" in summary_lines[0] and "rows moved 30, sent 30" in summary_lines[0]
    as_json = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "journal", "--file", str(db), "--jsonl"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(as_json.splitlines()[0])["name"] == SUMMARY


def test_a_repeat_that_moves_no_machine_is_routine_at_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", detail_window_s=0)
    stay = [Transition("rpc", "serving", "serving", "rpc_requested")]
    kinds = [journal.record(Event(i, T0 + i * 1000, "mqtt", "rpc_requested", {"n": i}, "rpc"), stay, [])
             for i in range(1, 5)]
    assert kinds == [DECISION, ROUTINE, ROUTINE, ROUTINE]


def test_the_time_of_every_restart_is_kept_when_a_machine_moves_a_few_times_a_day(tmp_path: Path) -> None:
    # "Why was the controller restarted at 03:12?": a handful of identical restarts a day stay in full.
    db = tmp_path / "j.db"
    journal = Journal(db, detail_window_s=0)
    restart = [Transition("controller", "running", "restarting", "health_stale")]
    kinds = [journal.record(Event(i, T0 + i * 3 * 3600_000, "timer", "health_stale", {}, "controller"), restart, [])
             for i in range(1, 8)]
    assert ROUTINE not in kinds
    journal.flush()
    assert [e.seq for e in read_journal(db) if e.name == "health_stale"] == list(range(1, 8))
