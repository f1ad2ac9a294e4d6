"""Builds an engine around example machines with a fake clock (pure tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatcher, MachineSpec
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.timers import Timers


def make_engine(
    specs: Sequence[MachineSpec], journal_path: Path | None = None, start_ms: int = 1_700_000_000_000
) -> tuple[Dispatcher, FakeClock, Journal | None]:
    """``start_ms`` must not lie before a journal's existing rows, or age pruning drops the new ones."""
    clock = FakeClock(start_ms)
    journal = Journal(journal_path) if journal_path else None
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal)
    dispatcher.boot(specs, journal.load_checkpoints() if journal else None)
    dispatcher.run_until_idle()
    return dispatcher, clock, journal
