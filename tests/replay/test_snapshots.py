"""Replay from any retained point: journal snapshots, trimmed journals, windows, summarised traffic.

Each corpus journal is journaled again through a dispatcher that writes
snapshots (every few decisions, as the gateway does every hour), so the
snapshot rows sit exactly where the gateway would put them. Then the journal
is trimmed at its head, cut to a window, or has its traffic summarised, and
every variant must replay identical to the recording, with the same trace for
the events it still holds.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.cli.diagrams import machine_classes
from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.codec import Codec
from teg_fsm.engine.dispatcher import Dispatcher, class_path
from teg_fsm.engine.events import STARTED, Event
from teg_fsm.engine.images import machine_image, restore_image
from teg_fsm.engine.journal import SNAPSHOT, SUMMARY, Journal, read_entries, read_journal
from teg_fsm.engine.replay import replay_entries, replay_journal
from teg_fsm.engine.timers import Timers

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.jsonl"))
IDS = [p.stem for p in CORPUS]


def rejournal(source: Path, db: Path, *, every: int = 3, detail_window_s: float = 600) -> Journal:
    """Journal ``source`` again, with snapshots every ``every`` decisions; returns the (closed) journal."""
    journal = Journal(db, detail_window_s=detail_window_s)
    clock = FakeClock()
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal, codec=Codec())
    dispatcher.replaying = True  # the recorded consequences are in the journal already
    dispatcher.snapshot_every_decisions = every
    for entry in read_entries(source):
        if entry.name == STARTED and entry.source == "system":
            dispatcher.build_machines(entry.data)
        dispatcher.dispatch(Event(entry.seq, entry.ts_ms, entry.source, entry.name, entry.data, entry.target))
    journal.close()
    return journal


def _rows(db: Path) -> list[tuple[int, int, str, str]]:
    """(id, ts_ms, source, name) of every row of every journal table, in id order."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT id, ts_ms, source, name FROM journal UNION ALL SELECT id, ts_ms, source, name FROM journal_traffic"
            " ORDER BY id"
        ).fetchall()


def _delete_before(db: Path, first_id: int) -> None:
    conn = sqlite3.connect(db)
    for table in ("journal", "journal_traffic", "journal_summary"):
        conn.execute(f"DELETE FROM {table} WHERE id < ?", (first_id,))
    conn.commit()
    conn.close()


def _assert_part_of(part: list[dict[str, Any]], whole: list[dict[str, Any]]) -> None:
    """``part`` is a contiguous stretch of ``whole`` (the same events, transitions and effects)."""
    assert part, "the replay replayed nothing"
    start = next(i for i, step in enumerate(whole) if step["seq"] == part[0]["seq"])
    assert whole[start:start + len(part)] == part


@pytest.mark.parametrize("path", CORPUS, ids=IDS)
def test_a_journal_with_snapshots_replays_identical_to_the_recording(path: Path, tmp_path: Path) -> None:
    db = tmp_path / "teg_journal.db"
    rejournal(path, db)
    names = [e.name for e in read_journal(db, snapshots=True)]
    assert names.count(SNAPSHOT) >= 2, "a snapshot after each start and then every few decisions"
    assert names[names.index(STARTED) + 1] == SNAPSHOT, "a snapshot right after the start"
    full, recorded = replay_journal(db), replay_journal(path)
    assert full.divergence is None, full.divergence.describe()
    assert full.trace == recorded.trace, "snapshot rows are not events: the trace is the recording's"


@pytest.mark.parametrize("path", CORPUS, ids=IDS)
def test_a_journal_trimmed_anywhere_replays_identical_from_its_oldest_snapshot(path: Path, tmp_path: Path) -> None:
    db = tmp_path / "teg_journal.db"
    rejournal(path, db)
    whole = replay_journal(db).trace
    rows = _rows(db)
    first_snapshot = next(i for i, row in enumerate(rows) if row[3] == SNAPSHOT)
    trimmed_replays = 0
    for cut in range(first_snapshot + 1, len(rows)):
        trimmed = tmp_path / f"trimmed-{cut}.db"
        trimmed.write_bytes(db.read_bytes())
        _delete_before(trimmed, rows[cut][0])
        result = replay_journal(trimmed)
        assert result.divergence is None, f"cut at row {cut}: {result.divergence.describe()}"
        if result.trace:
            _assert_part_of(result.trace, whole)
            trimmed_replays += 1
        trimmed.unlink()
    assert trimmed_replays > 0


@pytest.mark.parametrize("path", CORPUS, ids=IDS)
def test_a_window_replays_identical_from_the_snapshot_before_it(path: Path, tmp_path: Path) -> None:
    db = tmp_path / "teg_journal.db"
    rejournal(path, db)
    whole = replay_journal(db).trace
    times = sorted({row[1] for row in _rows(db)})
    since, until = times[len(times) // 3], times[2 * len(times) // 3]
    result = replay_journal(db, since_ms=since, until_ms=until)
    assert result.divergence is None, result.divergence.describe()
    _assert_part_of(result.trace, whole)
    assert result.events < len(whole)
    entries = [e for e in read_journal(db, snapshots=True)]
    last_in_window = max(e.seq for e in entries if e.ts_ms <= until and e.name != SNAPSHOT)
    assert result.trace[-1]["seq"] == last_in_window
    # The same window of a JSON Lines export replays the same.
    export = tmp_path / "export.jsonl"
    from teg_fsm.engine.journal import write_jsonl

    with open(export, "w", encoding="utf-8") as out:
        write_jsonl(read_journal(db, snapshots=True), out)
    assert replay_journal(export, since_ms=since, until_ms=until).trace == result.trace


@pytest.mark.parametrize("path", [p for p in CORPUS if p.stem.startswith("uplink_")], ids=lambda p: p.stem)
def test_summarised_traffic_replays_identical_for_every_other_machine(path: Path, tmp_path: Path) -> None:
    db = tmp_path / "teg_journal.db"
    journal = rejournal(path, db, detail_window_s=0)
    reopened = Journal(db, detail_window_s=0)
    last_ts = max(row[1] for row in _rows(db))
    reopened.prune(last_ts + 120_000)  # every minute of traffic is over the (zero) detail window
    reopened.close()
    entries = list(read_journal(db, snapshots=True))
    summaries = [e for e in entries if e.name == SUMMARY]
    assert [e for e in summaries if e.target == "uplink"], "the uplink's traffic is summarised"
    assert not [e for e in entries if e.name in ("rows_waiting", "data_packet_succeeded") and not e.transitions]
    result = replay_entries(entries)
    assert result.divergence is None, result.divergence.describe()
    machines_seen = {t["machine"] for step in result.trace for t in step["transitions"]}
    assert machines_seen - {"uplink"}, "the other machines' decisions are still compared"
    assert journal is not None


def test_a_snapshot_that_disagrees_with_the_replay_is_a_divergence(tmp_path: Path) -> None:
    source = CORPUS[0]
    db = tmp_path / "teg_journal.db"
    rejournal(source, db, every=1)
    entries = list(read_journal(db, snapshots=True))
    later = [i for i, e in enumerate(entries) if e.name == SNAPSHOT][-1]
    machine = next(iter(entries[later].data["machines"]))
    entries[later].data["machines"][machine]["state"] = "no_such_state"
    result = replay_entries(entries)
    assert result.divergence is not None and "no_such_state" in result.divergence.reason


@pytest.mark.parametrize("cls", machine_classes(), ids=lambda c: c.machine_name)
def test_every_machine_comes_back_from_its_image_exactly(cls: type, tmp_path: Path) -> None:
    """The corpus drives each machine somewhere interesting; its image must bring it back there."""
    found = 0
    for path in CORPUS:
        db = tmp_path / f"{path.stem}.db"
        rejournal(path, db, every=1)
        for entry in read_journal(db, snapshots=True):
            if entry.name != SNAPSHOT or cls.machine_name not in entry.data["machines"]:
                continue
            recorded = entry.data["machines"][cls.machine_name]
            if recorded["class"] != class_path(cls):
                continue  # a scenario's stand-in for this machine (the OTA rig's fake controller)
            machine = cls(recorded["settings"])
            restore_image(machine, recorded["image"])
            assert machine_image(machine) == recorded["image"]
            found += 1
    assert found, f"no corpus journal has {cls.machine_name}"


def test_teg_replay_takes_a_window_in_iso_time_or_unix_ms(tmp_path: Path) -> None:
    import subprocess
    import sys
    from datetime import datetime, timezone

    db = tmp_path / "teg_journal.db"
    rejournal(CORPUS[0], db)
    times = sorted({row[1] for row in _rows(db)})
    since, until = times[len(times) // 2], times[-2]
    expected = replay_journal(db, since_ms=since, until_ms=until).events
    iso = datetime.fromtimestamp(since / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
    repo = Path(__file__).resolve().parents[2]
    for start in (str(since), iso):
        out = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "replay", str(db), "--since", start,
                              "--until", str(until)], cwd=repo, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == f"identical: {expected} events"
    bad = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "replay", str(db), "--since", "yesterday"],
                         cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and "bad time" in bad.stderr


@pytest.mark.parametrize("cls", machine_classes(), ids=lambda c: c.machine_name)
def test_every_gateway_machine_has_an_image_that_round_trips(cls: type) -> None:
    # A machine without an image makes the dispatcher skip every snapshot (its
    # step is contained and only logged), so a live gateway's journal would have none.
    machine = cls()
    for state in cls.states_map.values():
        if not state.is_atomic:
            continue
        machine.place(state.value)
        image = machine_image(machine)
        again = cls()
        restore_image(again, image)
        assert again.state_name == state.value
        assert machine_image(again) == image
