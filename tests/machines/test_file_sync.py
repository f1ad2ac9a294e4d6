"""The file_sync machine, pure: a fake ThingsBoard and a fake disk settle its effects (FakeClock)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from statemachine import State

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.dispatcher import Dispatched, Dispatcher, MachineSpec
from teg_fsm.engine.effects import Effect, Log
from teg_fsm.engine.effects.files import (
    NO_FILE,
    TOO_LARGE,
    MirrorFiles,
    ScanFiles,
    WriteFile,
    content_bytes,
)
from teg_fsm.engine.effects.mqtt import Publish, RequestAttributes
from teg_fsm.engine.events import Event, Outcome
from teg_fsm.engine.journal import Journal
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.engine.timers import Timers
from teg_fsm.machines.file_sync import FileSyncMachine

DATA = "/data"


class FakeController(GatewayMachine):
    """Stands in for the controller machine: counts restart requests."""

    machine_name = "controller"
    resume_table = {"running": "running"}
    rest_states = frozenset({"running"})
    running = State(initial=True)
    restart_requested = running.to.itself(internal=True)

    def setup(self) -> None:
        self.reasons: list[str] = []

    def on_restart_requested(self, ev: Event) -> None:
        self.reasons.append(ev.data["reason"])


class World:
    """A fake ThingsBoard (shared/client attributes) and a fake disk; settles file_sync's effects."""

    def __init__(self, tmp_path: Path | None = None, interval: float = 30.0) -> None:
        specs = [MachineSpec(FileSyncMachine, {"check_interval_s": interval}), MachineSpec(FakeController)]
        self.clock = FakeClock()
        self.journal = Journal(tmp_path / "journal.db") if tmp_path else None
        self.dispatcher = Dispatcher(clock=self.clock, timers=Timers(self.clock), journal=self.journal)
        self.dispatcher.boot(specs, self.journal.load_checkpoints() if self.journal else None)
        self.shared: dict[str, Any] = {}
        self.client: dict[str, Any] = {}
        self.disk: dict[str, bytes] = {}
        self.effects: list[Effect] = []
        self.fail: dict[type, Outcome] = {}  # effect type -> forced outcome
        self.max_mirror = 65_536
        self.settle(self.dispatcher.run_until_idle())

    @property
    def machine(self) -> FileSyncMachine:
        return self.dispatcher.machines["file_sync"]  # type: ignore[return-value]

    @property
    def restarts(self) -> list[str]:
        return self.dispatcher.machines["controller"].reasons  # type: ignore[attr-defined]

    def logs(self, level: str = "ERROR") -> list[str]:
        return [e.message for e in self.effects if isinstance(e, Log) and e.level == level]

    def writes(self) -> list[WriteFile]:
        return [e for e in self.effects if isinstance(e, WriteFile)]

    # -- driving ---------------------------------------------------------

    def post(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.dispatcher.post("test", name, data or {})
        self.settle(self.dispatcher.run_until_idle())

    def connect(self) -> None:
        self.post("shared_attributes_received", {"client": {}, "shared": {"FILES": self.shared.get("FILES")}})

    def push(self, **values: Any) -> None:
        self.shared.update(values)
        self.post("shared_attributes_updated", {"values": values, "deleted": []})

    def delete(self, *names: str) -> None:
        for name in names:
            self.shared.pop(name, None)
        self.post("shared_attributes_updated", {"values": {}, "deleted": list(names)})

    def advance(self, seconds: float) -> None:
        self.settle(self.dispatcher.advance(seconds))

    def settle(self, done: list[Dispatched]) -> None:
        while done:
            for dispatched in done:
                for effect in dispatched.effects:
                    if effect.id.startswith("file_sync:"):
                        self.effects.append(effect)
                        self._answer(effect)
            done = self.dispatcher.run_until_idle()

    def _answer(self, effect: Effect) -> None:
        if effect.reply is None:
            return
        forced = self.fail.get(type(effect))
        if forced is not None:
            self.dispatcher.post_outcome("file_sync", effect, forced, {"error": f"forced {forced.value}"})
            return
        try:
            result = self._result(effect)
        except ValueError as exc:
            self.dispatcher.post_outcome("file_sync", effect, Outcome.FAILED, {"error": str(exc)})
            return
        self.dispatcher.post_outcome("file_sync", effect, Outcome.SUCCEEDED, {"result": result})

    def _result(self, effect: Effect) -> Any:
        if isinstance(effect, RequestAttributes):
            return {
                "client": {k: self.client[k] for k in effect.client_keys if k in self.client},
                "shared": {k: self.shared[k] for k in effect.shared_keys if k in self.shared},
            }
        if isinstance(effect, ScanFiles):
            return {key: self._scan(raw) for key, raw in effect.files.items()}
        if isinstance(effect, WriteFile):
            path = self._path(effect.path)
            data = content_bytes(effect.encoding, effect.content)
            old = self.disk.get(path)
            if old is None and not effect.create:
                raise ValueError("missing and create_if_not_exist is false")
            self.disk[path] = data
            return {"hash": _md5(data), "changed": old != data, "path": path}
        if isinstance(effect, MirrorFiles):
            return {key: self._mirror(key, spec) for key, spec in effect.files.items()}
        if isinstance(effect, Publish):
            self.client.update(json.loads(effect.payload))
            return None
        raise AssertionError(f"unexpected effect {effect}")

    def _path(self, raw: str) -> str:
        path = raw.replace("$DATA_PATH", DATA)
        path = path if path.startswith("/") else f"{DATA}/{path}"
        if not path.startswith(DATA + "/") or ".." in path:
            raise ValueError(f"path {raw!r} is outside the allowed roots")
        return path

    def _scan(self, raw: str) -> dict[str, str]:
        try:
            path = self._path(raw)
        except ValueError as exc:
            return {"error": str(exc)}
        data = self.disk.get(path)
        return {"hash": _md5(data) if data is not None else NO_FILE, "path": path}

    def _mirror(self, key: str, spec: dict[str, str]) -> str:
        data = self.disk.get(self._path(spec["path"]))
        if data is None:
            self.client[f"FILE_READ_{key}"] = NO_FILE
            return "missing"
        if len(data) > self.max_mirror:
            self.client[f"FILE_READ_{key}"] = TOO_LARGE
            return f"too_large:{len(data) + 40}"
        if spec["encoding"] == "base64":
            self.client[f"FILE_READ_{key}"] = base64.b64encode(data).decode()
        elif spec["encoding"] == "json":
            self.client[f"FILE_READ_{key}"] = json.loads(data)
        else:
            self.client[f"FILE_READ_{key}"] = data.decode()
        return "sent"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _files(**definitions: dict[str, Any]) -> dict[str, Any]:
    return {"FILES": definitions}


@pytest.fixture
def world() -> World:
    return World()


def test_connect_creates_a_missing_file_reports_its_hash_and_mirrors_it(world: World) -> None:
    world.shared.update(_files(cfg={"path": "$DATA_PATH/cfg.txt", "encoding": "text"}), FILE_CONTENT_cfg="a=1\n")
    world.connect()
    assert world.disk["/data/cfg.txt"] == b"a=1\n"
    assert world.client["FILE_HASHES"] == {"cfg": {"hash": _md5(b"a=1\n")}}
    assert world.client["FILE_READ_cfg"] == "a=1\n"
    assert world.machine.state_name == "in_sync"


def test_a_file_already_matching_its_content_is_not_rewritten(world: World) -> None:
    world.disk["/data/cfg.txt"] = b"same"
    world.shared.update(_files(cfg={"path": "$DATA_PATH/cfg.txt"}), FILE_CONTENT_cfg="same")
    world.connect()
    assert world.writes() == []
    assert world.client["FILE_HASHES"] == {"cfg": {"hash": _md5(b"same")}}


def test_pushed_text_json_and_base64_contents_are_written_as_their_bytes(world: World) -> None:
    world.shared.update(
        _files(
            t={"path": "$DATA_PATH/t.txt", "encoding": "text"},
            j={"path": "$DATA_PATH/j.json", "encoding": "json"},
            b={"path": "$DATA_PATH/b.bin", "encoding": "base64"},
        )
    )
    world.connect()
    world.push(FILE_CONTENT_t="hello", FILE_CONTENT_j={"k": [1, 2]}, FILE_CONTENT_b="AAE=")
    assert world.disk["/data/t.txt"] == b"hello"
    assert world.disk["/data/j.json"] == json.dumps({"k": [1, 2]}).encode()
    assert world.disk["/data/b.bin"] == b"\x00\x01"
    assert world.client["FILE_READ_j"] == {"k": [1, 2]} and world.client["FILE_READ_b"] == "AAE="
    assert set(world.client["FILE_HASHES"]) == {"t", "j", "b"}
    world.push(FILE_CONTENT_t="hello again")
    assert world.disk["/data/t.txt"] == b"hello again"
    assert world.client["FILE_HASHES"]["t"] == {"hash": _md5(b"hello again")}


def test_a_write_version_bump_fetches_the_content_and_records_the_version(world: World) -> None:
    world.shared.update(_files(cfg={"path": "cfg.txt", "write_version": 1}), FILE_CONTENT_cfg="v1")
    world.connect()
    assert world.client["FILE_HASHES"]["cfg"] == {"hash": _md5(b"v1"), "write_version": 1}
    # The content changed while the gateway missed the push; the version bump brings it in.
    world.shared["FILE_CONTENT_cfg"] = "v2"
    world.push(FILES={"cfg": {"path": "cfg.txt", "write_version": 2}})
    assert world.disk["/data/cfg.txt"] == b"v2"
    assert world.client["FILE_HASHES"]["cfg"] == {"hash": _md5(b"v2"), "write_version": 2}


def test_local_tampering_is_detected_at_the_next_check_and_the_content_restored(world: World) -> None:
    world.shared.update(_files(cfg={"path": "cfg.txt"}), FILE_CONTENT_cfg="good")
    world.connect()
    world.disk["/data/cfg.txt"] = b"tampered"
    world.advance(29)
    assert world.disk["/data/cfg.txt"] == b"tampered"
    world.advance(2)
    assert world.disk["/data/cfg.txt"] == b"good"
    assert world.client["FILE_READ_cfg"] == "good"
    assert world.client["FILE_HASHES"]["cfg"] == {"hash": _md5(b"good")}


def test_with_no_managed_file_there_is_no_periodic_check_and_a_new_files_starts_it(world: World) -> None:
    def scans() -> int:
        return sum(isinstance(e, ScanFiles) for e in world.effects)

    world.connect()  # no FILES: the full pass finds nothing to manage
    assert world.machine.state_name == "in_sync" and scans() == 1
    world.advance(3600)  # an hour at rest: no timer, no scan, no move
    assert scans() == 1 and world.machine.state_name == "in_sync"
    world.push(**_files(cfg={"path": "cfg.txt"}), FILE_CONTENT_cfg="good")
    assert world.disk["/data/cfg.txt"] == b"good" and scans() == 2
    world.disk["/data/cfg.txt"] = b"tampered"
    world.advance(31)  # managed again: the check runs every 30 s and restores the file
    assert scans() == 3 and world.disk["/data/cfg.txt"] == b"good"
    world.delete("FILES")
    world.advance(3600)  # the timer armed before FILES went away fires once and finds nothing to check
    assert scans() == 3 and world.machine.state_name == "in_sync"


def test_a_file_without_content_is_mirrored_read_only_and_never_written(world: World) -> None:
    world.disk["/data/ro.txt"] = b"local"
    world.shared.update(_files(ro={"path": "ro.txt"}, gone={"path": "gone.txt"}))
    world.connect()
    assert world.client["FILE_READ_ro"] == "local" and world.client["FILE_READ_gone"] == NO_FILE
    assert world.client["FILE_HASHES"] == {"ro": {"hash": _md5(b"local")}, "gone": {"hash": NO_FILE}}
    world.disk["/data/ro.txt"] = b"edited on the device"
    world.advance(31)
    assert world.writes() == []
    assert world.client["FILE_READ_ro"] == "edited on the device"
    assert world.client["FILE_HASHES"]["ro"] == {"hash": _md5(b"edited on the device")}


def test_a_key_removed_from_files_stops_being_managed(world: World) -> None:
    world.shared.update(_files(a={"path": "a.txt"}, b={"path": "b.txt"}), FILE_CONTENT_a="A", FILE_CONTENT_b="B")
    world.connect()
    world.push(FILES={"a": {"path": "a.txt"}})
    assert world.client["FILE_HASHES"] == {"a": {"hash": _md5(b"A")}}
    world.disk["/data/b.txt"] = b"changed"
    world.push(FILE_CONTENT_b="B2")
    world.advance(31)
    assert world.disk["/data/b.txt"] == b"changed"
    assert any("FILE_CONTENT_b has no definition" in m for m in world.logs("WARNING"))


def test_deleting_files_stops_managing_everything(world: World) -> None:
    world.shared.update(_files(a={"path": "a.txt"}), FILE_CONTENT_a="A")
    world.connect()
    world.delete("FILES")
    assert world.client["FILE_HASHES"] == {}
    assert world.machine.definitions == {}


def test_a_deleted_content_attribute_makes_the_file_read_only(world: World) -> None:
    world.shared.update(_files(a={"path": "a.txt"}), FILE_CONTENT_a="A")
    world.connect()
    world.delete("FILE_CONTENT_a")
    world.disk["/data/a.txt"] = b"local edit"
    world.advance(31)
    assert world.disk["/data/a.txt"] == b"local edit"
    assert world.client["FILE_READ_a"] == "local edit"


def test_files_may_arrive_as_a_json_string(world: World) -> None:
    world.shared.update(FILES=json.dumps({"a": {"path": "a.txt"}}), FILE_CONTENT_a="A")
    world.connect()
    assert world.disk["/data/a.txt"] == b"A"


_REJECTED = "file x: content rejected, nothing written: "


@pytest.mark.parametrize(
    ("definition", "content", "reason"),
    [
        ({"path": "x.txt", "encoding": "yaml"}, "x", "file x: invalid definition, ignored: unknown encoding 'yaml'"),
        ({"encoding": "text"}, "x", "file x: invalid definition, ignored: missing path"),
        ({"path": "x.txt", "encoding": "text"}, {"a": 1}, f"{_REJECTED}text content must be a string"),
        ({"path": "x.txt", "encoding": "json"}, 5, f"{_REJECTED}json content must be a JSON object"),
        ({"path": "x.txt", "encoding": "base64"}, "%%%", f"{_REJECTED}base64 content does not decode"),
    ],
)
def test_invalid_definitions_and_contents_are_logged_by_key_and_change_nothing(
    world: World, definition: dict[str, Any], content: Any, reason: str
) -> None:
    world.disk["/data/x.txt"] = b"original"
    world.shared.update(_files(x=definition), FILE_CONTENT_x=content)
    world.connect()
    world.push(FILE_CONTENT_x=content)
    assert world.disk == {"/data/x.txt": b"original"} and world.writes() == []
    errors = world.logs()
    assert any(m.startswith(reason) for m in errors), errors
    assert world.machine.state_name == "in_sync"


def test_a_path_outside_the_allowed_roots_is_refused_with_an_error_and_never_written(world: World) -> None:
    world.shared.update(_files(evil={"path": "$DATA_PATH/../etc/passwd"}), FILE_CONTENT_evil="root::0:0")
    world.connect()
    world.push(FILE_CONTENT_evil="root::0:0")
    assert world.disk == {}
    assert any("file evil: refused" in m and "outside the allowed roots" in m for m in world.logs())
    assert "evil" not in world.client["FILE_HASHES"]


def test_a_missing_file_that_may_not_be_created_is_left_missing(world: World) -> None:
    world.shared.update(_files(a={"path": "a.txt", "create_if_not_exist": "False"}), FILE_CONTENT_a="A")
    world.connect()
    assert world.disk == {} and world.writes() == []
    assert world.client["FILE_HASHES"] == {"a": {"hash": NO_FILE}}


def test_restart_is_requested_exactly_once_per_changed_write(world: World) -> None:
    world.shared.update(
        _files(a={"path": "a.txt", "restart_controller_on_change": True}, b={"path": "b.txt"}),
        FILE_CONTENT_a="1",
        FILE_CONTENT_b="1",
    )
    world.connect()
    assert world.restarts == ["file a changed"]
    world.push(FILE_CONTENT_a="1")  # same content: no change, no restart
    world.push(FILE_CONTENT_b="2")  # no restart flag
    world.connect()  # a reconnect finds everything in place
    world.post("init_files_requested")  # rewrites identical bytes: not a change
    assert world.restarts == ["file a changed"]
    world.push(FILE_CONTENT_a="2")
    world.disk["/data/a.txt"] = b"tampered"
    world.advance(31)
    assert world.restarts == ["file a changed"] * 3


def test_init_files_refetches_definitions_and_rewrites_every_file(world: World) -> None:
    world.shared.update(_files(a={"path": "a.txt"}, b={"path": "b.txt"}), FILE_CONTENT_a="A", FILE_CONTENT_b="B")
    world.connect()
    before = len(world.writes())
    world.post("init_files_requested")
    rewritten = world.writes()[before:]
    assert sorted(w.key for w in rewritten) == ["a", "b"] and all(w.force for w in rewritten)
    requests = [e for e in world.effects if isinstance(e, RequestAttributes)]
    assert requests[-2].shared_keys == ("FILES",) and requests[-1].shared_keys == ("FILE_CONTENT_a", "FILE_CONTENT_b")


def test_a_file_too_large_to_mirror_is_reported_instead(world: World) -> None:
    world.max_mirror = 10
    world.shared.update(_files(big={"path": "big.txt"}), FILE_CONTENT_big="x" * 100)
    world.connect()
    assert world.client["FILE_READ_big"] == TOO_LARGE
    assert any(m.startswith("file big: too large to mirror") for m in world.logs())


def test_content_pushed_during_a_step_is_written_when_the_step_ends(world: World) -> None:
    world.shared.update(_files(a={"path": "a.txt"}), FILE_CONTENT_a="A")
    world.connect()
    held = world.dispatcher.advance(31)  # the check starts scanning; its effect is not answered yet
    assert world.machine.state_name == "scanning"
    world.shared["FILE_CONTENT_a"] = "A2"
    world.dispatcher.post("test", "shared_attributes_updated", {"values": {"FILE_CONTENT_a": "A2"}, "deleted": []})
    world.settle(held + world.dispatcher.run_until_idle())
    assert world.disk["/data/a.txt"] == b"A2" and world.machine.state_name == "in_sync"
    assert world.client["FILE_READ_a"] == "A2"


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.TIMED_OUT, Outcome.CANCELLED])
@pytest.mark.parametrize("effect_type", [RequestAttributes, ScanFiles, WriteFile, MirrorFiles, Publish])
def test_every_step_ends_in_sync_whatever_its_outcome(world: World, effect_type: type, outcome: Outcome) -> None:
    world.fail[effect_type] = outcome
    world.shared.update(_files(a={"path": "a.txt"}), FILE_CONTENT_a="A")
    world.connect()
    assert world.machine.state_name == "in_sync"
    assert any(isinstance(e, effect_type) for e in world.effects)
    del world.fail[effect_type]
    world.connect()  # and the next pass completes the work
    assert world.disk["/data/a.txt"] == b"A" and world.client["FILE_HASHES"] == {"a": {"hash": _md5(b"A")}}


def test_after_a_restart_the_reported_hashes_are_kept_and_a_mid_step_crash_resumes_in_sync(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.shared.update(_files(a={"path": "a.txt"}), FILE_CONTENT_a="A")
    world.connect()
    world.dispatcher.post("test", "init_files_requested")
    world.dispatcher.run_until_idle()  # crash while requesting: its effect never settles
    assert world.machine.state_name == "requesting"
    world.journal.close()
    again = World(tmp_path)
    again.disk, again.shared = world.disk, world.shared
    assert again.machine.state_name == "in_sync"
    assert again.machine.recorded == {"a": {"hash": _md5(b"A"), "write_version": None}}
    again.connect()
    assert again.writes() == []  # nothing to do: the file is as reported
    again.journal.close()


def test_repeated_crashes_mid_pass_suspend_file_sync_until_init_files(tmp_path: Path) -> None:
    for _ in range(FileSyncMachine.max_resumes + 2):
        world = World(tmp_path)
        world.shared.update(_files(a={"path": "a.txt"}), FILE_CONTENT_a="A")
        if world.machine.state_name == "suspended":
            break
        world.dispatcher.post("test", "shared_attributes_received", {"client": {}, "shared": {}})
        world.dispatcher.run_until_idle()  # dies while requesting
        world.journal.close()
    assert world.machine.state_name == "suspended"
    assert any("suspended after repeated crashes" in m for m in world.logs())
    world.connect()
    assert world.disk == {}
    world.post("init_files_requested")
    assert world.disk == {"/data/a.txt": b"A"} and world.machine.state_name == "in_sync"
    world.journal.close()
