"""Never wedge: failures of a machine, the journal or a checkpoint are contained, declared and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from statemachine import State

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import CONDITION_CLEARED, CONDITION_RAISED, Dispatcher, MachineSpec
from teg_fsm.engine.effects import Log
from teg_fsm.engine.effects.mqtt import Publish
from teg_fsm.engine.events import Event
from teg_fsm.engine.journal import DISK_FULL, STORAGE_ERROR, Checkpoint, Journal, read_journal
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.replay import replay_journal
from teg_fsm.engine.timers import Timers
from teg_fsm.machines.file_sync import FileSyncMachine
from teg_fsm.machines.health import HealthMachine
from tests.engine.harness import make_engine

REPO = Path(__file__).resolve().parents[2]
MALFORMED_PUSH = {"values": {}, "deleted": [1, 2, {"a": 1}]}  # as the field testers' broker delivered it


class Brittle(GatewayMachine):
    """Raises on ``poison`` after having issued an effect; moves on ``tick``."""

    machine_name = "brittle"
    resume_table = {"calm": "calm", "busy": "busy", "halted": "halted"}
    error_state = "halted"

    calm = State(initial=True)
    busy = State()
    halted = State()

    tick = calm.to(busy) | busy.to(calm) | halted.to(calm)
    poison = calm.to(busy) | busy.to(calm)
    freeze = busy.to(halted)

    def on_poison(self) -> None:
        self.emit(Log(level="INFO", message="half done"))
        raise ValueError("poisoned")


def _journal(tmp_path: Path, **kwargs: object) -> tuple[Journal, FakeClock]:
    clock = FakeClock()
    return Journal(tmp_path / "teg_journal.db", monotonic=clock.monotonic, **kwargs), clock  # type: ignore[arg-type]


# -- machine errors ------------------------------------------------------------------


def test_a_raising_step_is_journaled_as_an_error_and_the_machine_goes_to_its_error_state(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(Brittle)], tmp_path / "j.db")
    dispatcher.post("test", "poison")
    dispatcher.post("test", "tick")
    poisoned, ticked = dispatcher.run_until_idle()
    assert poisoned.effects == []  # the half-done step's effect never goes out
    [failure] = poisoned.transitions
    assert (failure.source, failure.target, failure.error) == ("calm", "halted", "ValueError: poisoned")
    assert [(t.source, t.target) for t in ticked.transitions] == [("halted", "calm")]
    assert journal is not None
    stored = [e for e in read_journal(journal.path) if e.name == "poison"]
    assert stored[0].transitions[0]["error"] == "ValueError: poisoned"


def test_a_raising_observer_does_not_stop_the_effects_or_the_next_event() -> None:
    clock = FakeClock()
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock))
    dispatcher.boot([MachineSpec(Brittle)])
    dispatcher.observers.append(lambda _result: 1 / 0)
    dispatcher.post("test", "tick")
    dispatcher.post("test", "tick")
    done = dispatcher.run_until_idle()
    assert [t.target for d in done for t in d.transitions] == ["busy", "calm"]


def test_the_file_sync_crash_from_the_field_is_contained_and_its_journal_replays_identical(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(FileSyncMachine)], tmp_path / "j.db")
    dispatcher.post("mqtt", "shared_attributes_updated", MALFORMED_PUSH)  # past the edge checks, as on main
    dispatcher.post("mqtt", "shared_attributes_updated", {"values": {"FILES": {}}, "deleted": []})
    crashed, after = dispatcher.run_until_idle()[-2:]
    assert "AttributeError" in (crashed.transitions[0].error or "")
    assert all(t.error is None for t in after.transitions)
    assert journal is not None
    journal.flush()
    result = replay_journal(journal.path)
    assert result.identical, result.divergence and result.divergence.describe()
    assert any(t.get("error") for step in result.trace for t in step["transitions"])


# -- total replay -------------------------------------------------------------------------


def _teg_replay(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", "replay", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_replay_of_a_journal_whose_machine_code_changed_reports_the_divergence_not_a_traceback(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(FileSyncMachine)], tmp_path / "j.db")
    dispatcher.post("mqtt", "shared_attributes_updated", MALFORMED_PUSH)
    dispatcher.run_until_idle()
    assert journal is not None
    journal.close()
    lines = [json.loads(line) for line in _export(journal.path)]
    for line in lines:  # as if the recorded run's machine had not failed
        line["transitions"] = [{k: v for k, v in t.items() if k != "error"} for t in line["transitions"]]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = _teg_replay(edited)
    assert (done.returncode, "Traceback" in done.stderr) == (1, False), done.stderr
    assert done.stdout.startswith("divergence at event #") and "AttributeError" in done.stdout


def _export(path: Path) -> list[str]:
    from teg_fsm.engine.journal import entry_to_jsonl, read_entries

    return [entry_to_jsonl(e) + "\n" for e in read_entries(path)]


@pytest.mark.parametrize(
    "content",
    [
        b"SQLite format 3\x00" + bytes(range(256)) * 64,
        b'{"seq": 1, "ts_ms": 1}\n',
        b'{"seq":1,"ts_ms":1,"source":"system","name":"gateway_started","target":null,'
        b'"data":{"machines":{"x":{"class":"machines.gone:Gone"}}},"transitions":[],"effects":[]}\n',
    ],
    ids=["garbage-after-header", "jsonl-missing-fields", "start-record-names-a-missing-class"],
)
def test_replay_of_a_damaged_journal_ends_in_a_finding_never_a_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / ("journal.db" if content.startswith(b"SQLite") else "journal.jsonl")
    path.write_bytes(content)
    done = _teg_replay(path)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.stdout.startswith("divergence at event #")


# -- the journal: declared conditions instead of exceptions -------------------------------------


def test_a_corrupt_journal_is_moved_aside_with_a_timestamp_and_replaced(tmp_path: Path) -> None:
    garbage = b"SQLite format 3\x00" + os.urandom(32 * 1024)
    (tmp_path / "teg_journal.db").write_bytes(garbage)
    journal, _ = _journal(tmp_path)
    [moved] = journal.quarantined
    assert moved.name.startswith("teg_journal.db.corrupt-") and moved.read_bytes() == garbage
    journal.save_checkpoint(Checkpoint("m", "s", {}, 0), 1)
    assert journal.condition is None and journal.load_checkpoints()["m"].state == "s"
    journal.close()


def test_a_journal_that_cannot_open_is_a_storage_condition_not_a_failed_start(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    journal = Journal(tmp_path / "not-a-folder" / "teg_journal.db")
    journal.record(Event(1, 1, "test", "tick"), [], [])
    journal.save_checkpoint(Checkpoint("m", "s", {}, 0), 1)
    assert journal.condition == STORAGE_ERROR and journal.last_seq() == 0 and journal.load_checkpoints() == {}
    journal.close()


def test_a_full_disk_keeps_decisions_in_memory_drops_detail_and_writes_them_when_space_returns(tmp_path: Path) -> None:
    journal, clock = _journal(tmp_path, reserve_bytes=2**62)  # more than any disk has free: "full"
    journal.check_space()
    assert journal.condition == DISK_FULL
    journal.record(Event(1, 1, "test", "noise"), [], [])  # detail: given up while full
    journal.record(Event(2, 2, "test", "decision"), [], [{"type": "Log", "id": "m:2:0"}])
    journal.save_checkpoint(Checkpoint("m", "s", {"k": 1}, 0), 2)
    assert list(read_journal(journal.path)) == []
    journal.reserve_bytes = 0  # space came back
    clock.set_elapsed(60)
    journal.check_space()
    assert journal.condition is None and journal.dropped_rows == 1
    assert [e.name for e in read_journal(journal.path)] == ["decision"]
    assert journal.load_checkpoints()["m"].data == {"k": 1}
    journal.close()


def test_the_dispatcher_announces_the_condition_and_the_health_machine_reports_it(tmp_path: Path) -> None:
    journal, clock = _journal(tmp_path, reserve_bytes=2**62)
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock), journal=journal)
    dispatcher.boot([MachineSpec(HealthMachine)])
    dispatcher.run_until_idle()
    dispatcher.idle()
    [raised] = dispatcher.run_until_idle()
    assert raised.event.name == CONDITION_RAISED and dispatcher.machines["health"].state_name == "degraded"
    assert _telemetry(raised)["gateway_condition"] == "disk_full"
    assert any(isinstance(e, Log) and "degraded mode: disk full" in e.message for e in raised.effects)
    journal.reserve_bytes = 0
    clock.set_elapsed(60)
    dispatcher.idle()
    [cleared] = dispatcher.run_until_idle()
    assert cleared.event.name == CONDITION_CLEARED and dispatcher.machines["health"].state_name == "normal"
    assert _telemetry(cleared)["gateway_condition"] == "ok"
    journal.close()


def _telemetry(dispatched: object) -> dict[str, object]:
    [publish] = [e for e in dispatched.effects if isinstance(e, Publish)]  # type: ignore[attr-defined]
    return json.loads(publish.payload)["values"]


def test_a_report_that_did_not_reach_thingsboard_is_sent_again_after_the_next_connect() -> None:
    clock = FakeClock()
    dispatcher = Dispatcher(clock=clock, timers=Timers(clock))
    dispatcher.boot([MachineSpec(HealthMachine)])
    dispatcher.post("system", "file_quarantined", {"file": "teg_journal.db.corrupt-20260101T000000Z"})
    [quarantined] = dispatcher.run_until_idle()[-1:]
    effect_id = [e for e in quarantined.effects if isinstance(e, Publish)][0].id
    dispatcher.post("effect", "report_failed", {"effect_id": effect_id, "error": "not connected"}, target="health")
    dispatcher.post("system", "shared_attributes_received", {"client": {}, "shared": {}})
    resent = dispatcher.run_until_idle()[-1]
    assert "teg_journal.db.corrupt-" in str(_telemetry(resent)["gateway_quarantined_files"])
    dispatcher.post("effect", "report_succeeded", {"effect_id": resent.effects[0].id}, target="health")
    dispatcher.post("system", "shared_attributes_received", {"client": {}, "shared": {}})
    assert dispatcher.run_until_idle()[-1].effects == []


def test_a_checkpoint_the_machine_cannot_take_back_starts_it_fresh_instead_of_failing_the_start(tmp_path: Path) -> None:
    journal, _ = _journal(tmp_path)
    journal.save_checkpoint(Checkpoint("brittle", "a_state_since_renamed", {}, 0), 1)
    journal.close()
    dispatcher, _, reopened = make_engine([MachineSpec(Brittle)], tmp_path / "teg_journal.db")
    assert dispatcher.machines["brittle"].state_name == "calm"
    assert reopened is not None
    reopened.close()


def test_a_timer_whose_firing_raises_does_not_stop_the_later_ones() -> None:
    clock = FakeClock()
    timers = Timers(clock)
    fired: list[str] = []

    def fire(machine: str, name: str, generation: int) -> None:
        fired.append(name)
        if name == "first":
            raise RuntimeError("sink broke")

    timers.start("m", "first", 0)
    timers.start("m", "second", 0)
    timers.fire_due(fire)
    assert fired == ["first", "second"]


def test_events_no_machine_could_take_replay_identical(tmp_path: Path) -> None:
    dispatcher, _, journal = make_engine([MachineSpec(Brittle)], tmp_path / "j.db")
    dispatcher.post("test", "freeze")  # no transition from calm
    dispatcher.post("test", "tick", target="gone")  # a machine this build does not have
    dispatcher.post("test", "no_machine_declares_this", {"x": [1, {"y": None}]})
    dispatcher.post("test", "poison")
    done = dispatcher.run_until_idle()
    assert [d.transitions for d in done[:3]] == [[], [], []]
    assert journal is not None
    journal.close()
    result = replay_journal(journal.path)
    assert result.identical and result.events == 5, result.divergence


def test_teg_journal_and_status_on_a_damaged_journal_say_so_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "teg_journal.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    for command in (["journal", "--data", str(tmp_path)], ["status", "--data", str(tmp_path)]):
        done = subprocess.run([sys.executable, "-m", "teg_fsm.cli", *command], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "cannot read" in done.stderr


def test_the_status_line_and_file_lead_with_the_degraded_mode(tmp_path: Path) -> None:
    from teg_fsm.adapters.systemd import StatusFile, read_status, status_line

    states = {"uplink": {"state": "draining"}, "health": {"state": "degraded"}}
    assert status_line(states, {"disk_full": "x"}) == "DEGRADED (disk_full) health=degraded uplink=draining"
    status = StatusFile(tmp_path / "teg_status.json")
    size = status.path.stat().st_size
    status.write({"conditions": {"disk_full": "database or disk is full"}, "pid": 1})
    status.write({"conditions": {}, "pid": 1})  # shorter: rewritten in place, still one JSON document
    status.close()
    assert status.path.stat().st_size == size and read_status(status.path) == {"conditions": {}, "pid": 1}


def test_a_token_file_that_is_not_text_is_moved_aside_and_reads_as_no_token(tmp_path: Path) -> None:
    from teg_fsm.adapters.tokens import read_token

    damaged = tmp_path / "tb_access_token"
    damaged.write_bytes(b"\xff\xfeAbc\x80")
    assert read_token(damaged) is None and not damaged.exists()
    [moved] = tmp_path.glob("tb_access_token.corrupt-*")
    assert moved.read_bytes() == b"\xff\xfeAbc\x80"
