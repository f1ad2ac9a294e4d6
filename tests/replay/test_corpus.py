"""The replay corpus: journals recorded from real scenario runs (tools/record_journal.py).

Every ``corpus/*.jsonl`` is found by glob and replayed twice through the current
machines: both replays must reproduce the recording and each other, and the
trace (per event: seq, name, transitions, effects) is snapshotted with the
project serializer. A machine that changes on purpose means re-recording the
corpus and reviewing the snapshot diff (docs/REPLAY.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from syrupy.assertion import SnapshotAssertion

from teg_fsm.engine.effects import StartTimer
from teg_fsm.engine.events import STARTED
from teg_fsm.engine.journal import JournalEntry, read_entries
from teg_fsm.engine.replay import replay_entries, replay_journal
from teg_fsm.machines.ota import OtaMachine
from tests.engine.test_replay import _record as record_fetcher_journal
from tools.record_journal import KNOWN_SECRETS, MAX_BYTES, SCENARIOS

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.jsonl"))
REPO = Path(__file__).resolve().parents[2]
# Keys under which a secret would travel; none may appear anywhere in a journal.
SECRET_KEYS = {"credentialsValue", "accessToken", "token", "password", "provisionDeviceSecret", "secret"}
GENERATED_TOKEN = re.compile(r"\b(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{20}\b")


def trace_view(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The snapshotted form of a replay trace: transitions as one line each, effects without nulls."""
    return [
        {
            "seq": step["seq"],
            "event": step["event"],
            "transitions": [f"{t['machine']}: {t['source']} -> {t['target']}" for t in step["transitions"]],
            "effects": [{k: v for k, v in e.items() if v is not None} for e in step["effects"]],
        }
        for step in trace
    ]


def recorded_trace(entries: list[JournalEntry]) -> list[dict[str, Any]]:
    """What the gateway recorded, in the shape of a replay trace."""
    return [
        {"seq": e.seq, "event": e.name, "transitions": e.transitions, "effects": e.effects} for e in entries
    ]


def strings_and_keys(value: Any) -> list[str]:
    """Every dict key and string inside a JSON value."""
    if isinstance(value, dict):
        return [*value.keys(), *(s for v in value.values() for s in strings_and_keys(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings_and_keys(v)]
    return [value] if isinstance(value, str) else []


def attrs_dict(entry: JournalEntry) -> dict[str, Any]:
    """The journaled JSON parts of an entry."""
    return {"data": entry.data, "transitions": entry.transitions, "effects": entry.effects}


class HastyOtaMachine(OtaMachine):
    """A deliberately changed OTA machine: its probation window is half the configured one."""

    def on_enter_probation(self) -> None:
        if not self.ready:
            return
        self.data.window_over = False
        self.emit(StartTimer(name="probation_elapsed", seconds=self.settings.probation_s / 2))
        self.emit(StartTimer(name="health_deadline_elapsed", seconds=self.settings.health_timeout_s))


def test_the_corpus_holds_a_journal_for_every_recorder_scenario() -> None:
    assert sorted(p.stem for p in CORPUS) == sorted(SCENARIOS)


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_journal_replays_twice_identical_to_the_recording(path: Path, snapshot: SnapshotAssertion) -> None:
    entries = list(read_entries(path))
    first, second = replay_journal(path), replay_journal(path)
    assert first.divergence is None, first.divergence.describe()
    assert second.divergence is None, second.divergence.describe()
    assert first.events == second.events == len(entries)
    assert first.trace == second.trace
    assert first.trace == json.loads(json.dumps(recorded_trace(entries)))
    assert trace_view(first.trace) == snapshot


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_journal_starts_at_gateway_started_and_stays_small(path: Path) -> None:
    entries = list(read_entries(path))
    assert entries[0].name == STARTED and entries[0].source == "system"
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert path.stat().st_size <= MAX_BYTES


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_journal_holds_no_token_or_secret(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not [s for s in KNOWN_SECRETS if s in text]
    found = [s for e in read_entries(path) for s in strings_and_keys(attrs_dict(e))]
    assert not SECRET_KEYS.intersection(found)
    assert not [s for s in found if GENERATED_TOKEN.search(s)]


def test_a_restarted_gateway_keeps_both_runs_in_one_journal() -> None:
    entries = list(read_entries(CORPUS_DIR / "ota_killed_in_probation_resumes.jsonl"))
    starts = [e for e in entries if e.name == STARTED]
    assert len(starts) >= 2
    assert starts[-1].data["resumed"]["ota"]["stored_state"] == "probation"


def test_a_changed_machine_fails_the_corpus_at_the_first_divergent_event() -> None:
    entries = list(read_entries(CORPUS_DIR / "ota_success_rollback_missing_tag.jsonl"))
    first_probation = next(
        i for i, e in enumerate(entries) if any(t["target"] == "probation" for t in e.transitions)
    )
    result = replay_entries(entries, overrides={"ota": HastyOtaMachine})
    assert result.divergence is not None
    assert result.divergence.seq == entries[first_probation].seq
    assert result.events == first_probation + 1  # replay stopped right there
    [hasty] = [e for e in result.divergence.actual_effects if e.get("name") == "probation_elapsed"]
    [recorded] = [e for e in result.divergence.expected_effects if e.get("name") == "probation_elapsed"]
    assert hasty["seconds"] == recorded["seconds"] / 2
    assert result.divergence.actual_transitions == result.divergence.expected_transitions


def test_teg_replay_accepts_a_jsonl_export_and_teg_journal_writes_one(tmp_path: Path) -> None:
    path = CORPUS_DIR / "provisioning_first_start.jsonl"
    replayed = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "replay", str(path)],
                              cwd=REPO, capture_output=True, text=True, check=False)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"identical: {len(path.read_text().splitlines())} events"
    exported = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "journal", "--file", str(path), "--jsonl"],
                              cwd=REPO, capture_output=True, text=True, check=False)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == path.read_text(encoding="utf-8")


def test_a_journal_database_exported_with_teg_journal_jsonl_replays_identically(tmp_path: Path) -> None:
    db = tmp_path / "teg_journal.db"
    record_fetcher_journal(db)
    exported = subprocess.run([sys.executable, "-m", "teg_fsm.cli", "journal", "--file", str(db), "--jsonl"],
                              cwd=REPO, capture_output=True, text=True, check=False)
    assert exported.returncode == 0, exported.stderr
    jsonl = tmp_path / "fetcher.jsonl"
    jsonl.write_text(exported.stdout, encoding="utf-8")
    assert list(read_entries(jsonl)) == list(read_entries(db))
    from_db, from_jsonl = replay_journal(db), replay_journal(jsonl)
    assert from_jsonl.identical and from_jsonl.events == 5
    assert from_jsonl.trace == from_db.trace
