"""A machine with compound states runs, journals, resumes and fails like a flat one."""

from __future__ import annotations

from pathlib import Path

from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.journal import Checkpoint, read_journal
from tests.engine.examples import Download, UpdaterMachine
from tests.engine.harness import make_engine


def _moves(done: list, machine: str = "updater") -> list[tuple[str, str, str]]:
    return [(t.source, t.target, t.event) for d in done for t in d.transitions if t.machine == machine]


def test_transitions_are_journaled_between_nested_states(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(UpdaterMachine)], tmp_path / "j.db")
    for name in ("start", "progress", "downloaded", "progress", "cancel"):
        dispatcher.post("test", name, {"step": 2})
    done = dispatcher.run_until_idle()
    assert _moves(done) == [
        ("idle", "downloading", "start"),  # into the compound state, landing in its initial state
        ("downloading", "downloading", "progress"),  # targetless: logged, no exit/entry
        ("downloading", "installing", "downloaded"),
        ("installing", "installing", "progress"),
        ("installing", "idle", "cancel"),  # declared on the compound state, taken from the nested one
    ]
    machine = dispatcher.machines["updater"]
    assert machine.entered == ["working", "downloading", "installing", "-working"]
    assert machine.progress_seen == 4
    assert journal is not None
    stored = [t for e in read_journal(journal.path) for t in e.transitions]
    assert [(t["source"], t["target"]) for t in stored] == [(s, t) for s, t, _ in _moves(done)]


def test_the_nested_state_is_checkpointed_and_resumed_into_with_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    dispatcher, _, journal = make_engine([MachineSpec(UpdaterMachine)], path)
    dispatcher.post("test", "start")
    dispatcher.post("test", "downloaded")
    dispatcher.run_until_idle()
    assert journal is not None
    assert journal.load_checkpoints()["updater"].state == "installing"
    journal.close()

    dispatcher, _, journal = make_engine([MachineSpec(UpdaterMachine)], path)
    machine = dispatcher.machines["updater"]
    assert machine.state_name == "installing"
    assert {s.id for s in machine.configuration} == {"working", "installing"}
    assert machine.entered == ["working", "installing"]  # re-entered from the outside in
    assert machine.attempts == 1  # restored, not counted again
    assert (machine.can_take("cancel"), machine.can_take("installed")) == (True, True)
    assert (machine.can_take("downloaded"), machine.can_take("start")) == (False, False)
    dispatcher.post("test", "cancel")
    assert _moves(dispatcher.run_until_idle()) == [("installing", "idle", "cancel")]
    assert journal is not None
    resumed = [e for e in read_journal(journal.path) if e.name == "resumed"]
    assert resumed[-1].data == {"from_state": "installing", "crash_loop": False}


def test_a_nested_step_that_raises_drops_its_effects_and_goes_to_the_error_state(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(UpdaterMachine)], tmp_path / "j.db")
    dispatcher.post("test", "start")
    dispatcher.post("test", "downloaded")
    dispatcher.post("test", "install_failed")
    dispatcher.post("test", "start")
    *_, failed, started = dispatcher.run_until_idle()
    assert failed.effects == []  # the half-done step's Download(attempt=-1) never goes out
    [failure] = failed.transitions
    assert (failure.source, failure.target, failure.error) == ("installing", "halted", "RuntimeError: install script crashed")
    machine = dispatcher.machines["updater"]
    assert _moves([started]) == [("halted", "downloading", "start")]
    assert [e.attempt for e in started.effects if isinstance(e, Download)] == [2]
    assert {s.id for s in machine.configuration} == {"working", "downloading"}


class StaysPut(UpdaterMachine):
    error_state = None


def test_without_an_error_state_a_raising_nested_step_leaves_the_machine_where_it_was(tmp_path: Path) -> None:
    dispatcher, _, _ = make_engine([MachineSpec(StaysPut)], None)
    for name in ("start", "downloaded", "install_failed"):
        dispatcher.post("test", name)
    *_, failed = dispatcher.run_until_idle()
    assert [(t.source, t.target) for t in failed.transitions] == [("installing", "installing")]
    machine = dispatcher.machines["updater"]
    assert {s.id for s in machine.configuration} == {"working", "installing"}
    dispatcher.post("test", "installed")
    assert _moves(dispatcher.run_until_idle()) == [("installing", "idle", "installed")]


def test_placing_a_machine_in_a_compound_state_puts_it_in_the_initial_nested_state() -> None:
    machine = UpdaterMachine({})
    machine.place("working")
    assert machine.state_name == "downloading"
    assert {s.id for s in machine.configuration} == {"working", "downloading"}
    machine.place("idle")
    assert machine.state_name == "idle" and [s.id for s in machine.configuration] == ["idle"]
