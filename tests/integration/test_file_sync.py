"""Remote file management end to end: the real gateway (file sync + MQTT), the stand-in, real files.

After each step the test checks what ThingsBoard sees (client attributes
FILE_HASHES and FILE_READ_<key>) and what is on disk. The controller machine is
not part of this gateway, so ``restart_requested`` notifications are counted in
the journal, where every event is recorded whether or not a machine takes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.app import Gateway
from teg_fsm.components.file_sync import FileSyncComponent
from teg_fsm.components.mqtt import MqttComponent
from teg_fsm.config import load_config
from teg_fsm.engine.journal import read_journal
from tests.rig.protocol import protocol_env
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration
DEVICE, TOKEN = "teg-files-device", "files-token-0123456"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    tb = StandIn(host="127.0.0.1", port=0, tls_port=None).start()
    tb.add_device(DEVICE, TOKEN)
    yield tb
    tb.stop()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def gateway(standin: StandIn, tmp_path: Path, data: Path) -> Iterator[Callable[[], Gateway]]:
    started: list[Gateway] = []

    def start() -> Gateway:
        token = tmp_path / "tb_access_token"
        token.write_text(TOKEN)
        config = load_config({
            "TB_HOST": "127.0.0.1",
            "TB_PORT": str(standin.port),
            "TEG_TLS": "false",
            "THINGSBOARD_DEVICE_NAME": DEVICE,
            "THINGSBOARD_ACCESS_TOKEN": str(token),
            "TEG_DATA_PATH": str(tmp_path / "gateway"),
            "TEG_CONTROLLER_DATA_PATH": str(data),
            "TEG_FILE_CHECK_INTERVAL_S": "0.3",
            "TEG_RECONNECT_MIN_S": "0.2",
            "TEG_RECONNECT_MAX_S": "1",
            **protocol_env(),
        })
        gw = Gateway(config, components=lambda g: [FileSyncComponent(g), MqttComponent(g)])
        gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


class Seen:
    """What ThingsBoard has from the device."""

    def __init__(self, tb: StandIn) -> None:
        self.tb = tb

    def attr(self, name: str) -> Any:
        value = self.tb.client_attributes(DEVICE).get(name)
        return json.loads(value) if isinstance(value, str) and name == "FILE_HASHES" else value

    def hash_of(self, key: str) -> dict[str, Any] | None:
        return (self.attr("FILE_HASHES") or {}).get(key)


# The journal belongs to the dispatcher thread, which commits each group within its
# flush interval (0.1 s): these read what is committed and never flush from the test's thread.
def journal_events(gw: Gateway, name: str) -> list[dict[str, Any]]:
    return [e.data for e in read_journal(gw.config.journal_db) if e.name == name]


def journal_logs(gw: Gateway) -> list[str]:
    return [
        effect["message"]
        for entry in read_journal(gw.config.journal_db, machine="file_sync")
        for effect in entry.effects
        if effect.get("type") == "Log"
    ]


def test_files_are_created_updated_versioned_restored_mirrored_and_released(
    standin: StandIn, gateway: Callable[[], Gateway], data: Path
) -> None:
    seen = Seen(standin)
    (data / "ro.txt").write_text("local only")
    (data / "big.log").write_text("x" * 70_000)
    standin.set_shared(DEVICE, {
        "FILES": {
            "cfg": {"path": "$DATA_PATH/conf/cfg.txt", "encoding": "text", "restart_controller_on_change": True},
            "js": {"path": "$DATA_PATH/settings.json", "encoding": "json"},
            "bin": {"path": "$DATA_PATH/blob.bin", "encoding": "base64"},
            "ro": {"path": "$DATA_PATH/ro.txt", "encoding": "text"},
            "big": {"path": "$DATA_PATH/big.log", "encoding": "text"},
        },
        "FILE_CONTENT_cfg": "interval=10\n",
        "FILE_CONTENT_js": {"a": 1},
        "FILE_CONTENT_bin": base64.b64encode(b"\x00\x01\x02").decode(),
    })
    gw = gateway()

    # Creation: every file written, hashed, mirrored; the read-only one mirrored as it is.
    wait_for(lambda: len(seen.attr("FILE_HASHES") or {}) == 5, what="FILE_HASHES for five files")
    assert (data / "conf" / "cfg.txt").read_text() == "interval=10\n"
    assert (data / "settings.json").read_bytes() == json.dumps({"a": 1}).encode()
    assert (data / "blob.bin").read_bytes() == b"\x00\x01\x02"
    assert seen.hash_of("cfg") == {"hash": md5(b"interval=10\n")}
    assert seen.hash_of("ro") == {"hash": md5(b"local only")}
    wait_for(lambda: seen.attr("FILE_READ_bin") == "AAEC", what="FILE_READ_bin")
    assert seen.attr("FILE_READ_cfg") == "interval=10\n"
    assert seen.attr("FILE_READ_js") == {"a": 1}
    assert seen.attr("FILE_READ_ro") == "local only"
    assert (data / "ro.txt").read_text() == "local only"
    # A mirror over ThingsBoard's 65,536-byte packet limit is replaced by a marker and an error.
    assert seen.attr("FILE_READ_big") == "E_TOOLARGE"
    wait_for(lambda: any(m.startswith("file big: too large to mirror") for m in journal_logs(gw)),
             what="too-large mirror logged")

    # Update (text), keeping the file's mode.
    (data / "conf" / "cfg.txt").chmod(0o640)
    standin.set_shared(DEVICE, {"FILE_CONTENT_cfg": "interval=20\n"})
    wait_for(lambda: seen.hash_of("cfg") == {"hash": md5(b"interval=20\n")}, what="cfg updated")
    assert (data / "conf" / "cfg.txt").read_text() == "interval=20\n"
    assert (data / "conf" / "cfg.txt").stat().st_mode & 0o777 == 0o640
    wait_for(lambda: seen.attr("FILE_READ_cfg") == "interval=20\n", what="cfg mirrored")

    # A write_version bump is applied and recorded (same content: no rewrite, no restart).
    files = standin.shared(DEVICE)["FILES"]
    files = json.loads(files) if isinstance(files, str) else files
    files["cfg"]["write_version"] = 3
    standin.set_shared(DEVICE, {"FILES": files})
    wait_for(lambda: seen.hash_of("cfg") == {"hash": md5(b"interval=20\n"), "write_version": 3}, what="version")

    # Local tampering is noticed by the periodic check and the server's content restored.
    (data / "conf" / "cfg.txt").write_text("tampered")
    wait_for(lambda: (data / "conf" / "cfg.txt").read_text() == "interval=20\n", what="cfg restored")

    # The read-only file follows local edits in FILE_READ_ and is never written.
    (data / "ro.txt").write_text("edited on the device")
    wait_for(lambda: seen.attr("FILE_READ_ro") == "edited on the device", what="ro mirrored again")
    wait_for(lambda: seen.hash_of("ro") == {"hash": md5(b"edited on the device")}, what="ro hash")

    # A key removed from FILES stops being managed; a deleted content makes a file read-only.
    del files["bin"]
    standin.set_shared(DEVICE, {"FILES": files})
    wait_for(lambda: "bin" not in (seen.attr("FILE_HASHES") or {"bin": 1}), what="bin released")
    standin.delete_shared(DEVICE, ["FILE_CONTENT_js"])
    (data / "blob.bin").write_bytes(b"mine now")
    (data / "settings.json").write_text('{"edited": true}')
    wait_for(lambda: seen.attr("FILE_READ_js") == {"edited": True}, what="js mirrored read-only")
    assert (data / "blob.bin").read_bytes() == b"mine now"
    assert (data / "settings.json").read_text() == '{"edited": true}'

    # Bad content is refused with an error naming the file; nothing on disk changes.
    standin.set_shared(DEVICE, {"FILE_CONTENT_cfg": {"not": "text"}})
    wait_for(lambda: any("file cfg: content rejected" in m for m in journal_logs(gw)), what="rejection logged")
    assert (data / "conf" / "cfg.txt").read_text() == "interval=20\n"

    # Created, updated, restored: three changed writes, three restart requests.
    restarts = journal_events(gw, "restart_requested")
    assert restarts == [{"reason": "file cfg changed"}] * 3
    assert standin.disconnect_reasons(DEVICE) == []


def test_paths_outside_the_allowed_roots_are_refused_and_nothing_is_written(
    standin: StandIn, gateway: Callable[[], Gateway], data: Path, tmp_path: Path
) -> None:
    seen = Seen(standin)
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "link").symlink_to(outside)
    (data / "escape.txt").symlink_to(outside / "target.txt")
    standin.set_shared(DEVICE, {
        "FILES": {
            "dotdot": {"path": "$DATA_PATH/../outside/a.txt"},
            "viadir": {"path": "$DATA_PATH/link/b.txt"},
            "viafile": {"path": "$DATA_PATH/escape.txt"},
            "ok": {"path": "$DATA_PATH/ok.txt"},
        },
        "FILE_CONTENT_dotdot": "x",
        "FILE_CONTENT_viadir": "x",
        "FILE_CONTENT_viafile": "x",
        "FILE_CONTENT_ok": "fine",
    })
    gw = gateway()
    wait_for(lambda: seen.hash_of("ok") == {"hash": md5(b"fine")}, what="the allowed file")
    logs = wait_for(lambda: [m for m in journal_logs(gw) if "refused" in m] or None, what="refusals logged")
    reasons = {"dotdot": "outside the allowed roots", "viadir": "is a symbolic link where a directory is expected",
               "viafile": "is a symbolic link, not a regular file"}
    for key, reason in reasons.items():
        assert any(m.startswith(f"file {key}: refused") and reason in m for m in logs), key
    assert set(seen.attr("FILE_HASHES")) == {"ok"}
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in data.iterdir()) == ["escape.txt", "link", "ok.txt"]
