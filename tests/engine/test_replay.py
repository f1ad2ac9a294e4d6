"""Replay: a recorded journal replays identically; a changed machine diverges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from statemachine import State

from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.events import Outcome
from teg_fsm.engine.journal import read_journal
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.replay import replay_journal
from tests.engine.examples import FetcherMachine, FetcherSettings
from tests.engine.harness import make_engine

REPO = Path(__file__).resolve().parents[2]


def _record(path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(FetcherMachine, {"retry_s": 4})], path)
    dispatcher.post("test", "fetch_requested", {"url": "a"})
    [started] = dispatcher.run_until_idle()
    dispatcher.post_outcome("fetcher", started.effects[0], Outcome.TIMED_OUT, {"error": "slow"})
    dispatcher.run_until_idle()
    [retry] = dispatcher.advance(5)
    dispatcher.post_outcome("fetcher", retry.effects[0], Outcome.SUCCEEDED, {"result": "body"})
    dispatcher.run_until_idle()
    assert journal is not None
    journal.close()


class ImpatientFetcher(GatewayMachine):
    """A deliberately changed fetcher: gives up on a timeout instead of retrying."""

    machine_name = "fetcher"
    settings_type = FetcherSettings
    resume_table = FetcherMachine.resume_table

    idle = State(initial=True)
    fetching = State()
    waiting = State()
    done = State()
    failed = State()

    fetch_requested = idle.to(fetching) | failed.to(fetching) | done.to(fetching)
    fetch_succeeded = fetching.to(done)
    fetch_timed_out = fetching.to(failed)
    fetch_failed = fetching.to(waiting)
    retry_elapsed = waiting.to(fetching)

    setup = FetcherMachine.setup
    on_fetch_requested = FetcherMachine.on_fetch_requested
    on_enter_fetching = FetcherMachine.on_enter_fetching


def test_replay_of_a_recorded_journal_is_identical_twice(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    _record(path)
    first = replay_journal(path)
    second = replay_journal(path)
    assert first.identical and second.identical
    assert first.events == len(list(read_journal(path))) == 5
    assert first.trace == second.trace


def test_a_changed_machine_is_reported_at_the_first_divergent_event(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    _record(path)
    result = replay_journal(path, overrides={"fetcher": ImpatientFetcher})
    assert result.divergence is not None
    timed_out = [e for e in read_journal(path) if e.name == "fetch_timed_out"][0]
    assert result.divergence.seq == timed_out.seq
    assert result.divergence.actual_transitions[0]["target"] == "failed"
    assert result.divergence.expected_transitions[0]["target"] == "waiting"
    assert "divergence at event #" in result.divergence.describe()


def test_teg_replay_command_prints_identical_and_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    _record(path)
    done = subprocess.run(
        [sys.executable, "-m", "teg_fsm.cli", "replay", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "identical: 5 events"


def test_teg_journal_filters_by_machine(tmp_path: Path) -> None:
    path = tmp_path / "teg_journal.db"
    _record(path)
    done = subprocess.run(
        [sys.executable, "-m", "teg_fsm.cli", "journal", "--file", str(path), "--machine", "fetcher"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    # One line per event; the indented lines under it say why (guards, outcomes, reasons).
    lines = [line for line in done.stdout.strip().splitlines() if not line.startswith(" ")]
    assert len(lines) == 4  # everything but gateway_started concerns the fetcher
    assert "fetcher: idle->fetching" in lines[0] and "FetchThing(fetcher:" in lines[0]
    assert "test:fetch_requested" in lines[0]
