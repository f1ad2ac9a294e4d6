"""The files adapter against real temporary files: hashing, confinement, atomic writes, mirrors."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from teg_fsm.adapters.files import (
    FileStore,
    FileSyncError,
    PathRefused,
    atomic_write,
    confine,
    md5_file,
    mqtt_publish_size,
)
from teg_fsm.engine.effects.files import NO_FILE, TOO_LARGE, ContentError, content_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]


class Published:
    """Collects what the store hands to MQTT."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict]] = []

    def __call__(self, topic: str, payload: str) -> None:
        self.messages.append((topic, json.loads(payload)))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def store(data_dir: Path) -> FileStore:
    return FileStore(data_dir, [data_dir], Published())


def test_md5_of_a_file_matches_hashlib_and_a_missing_file_has_none(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello\n" * 1000)
    assert md5_file(path) == hashlib.md5(b"hello\n" * 1000).hexdigest()
    assert md5_file(tmp_path / "missing") is None


def test_data_path_expands_to_the_controller_data_dir(data_dir: Path) -> None:
    for raw in ("$DATA_PATH/a.txt", "$DATA_PATH$/a.txt", "%DATA_PATH%/a.txt", "a.txt"):
        assert confine(raw, data_dir, [data_dir]) == data_dir.resolve() / "a.txt"


def test_a_path_escaping_with_dotdot_is_refused(data_dir: Path) -> None:
    with pytest.raises(PathRefused, match="outside the allowed roots"):
        confine("$DATA_PATH/../escape.txt", data_dir, [data_dir])
    with pytest.raises(PathRefused):
        confine("/etc/passwd", data_dir, [data_dir])


def test_a_symlink_below_a_root_is_refused_on_use_not_followed(tmp_path: Path, store: FileStore, data_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("secret")
    (data_dir / "link").symlink_to(outside)
    (data_dir / "file_link").symlink_to(outside / "target.txt")
    found = store.scan({"dir": "$DATA_PATH/link/target.txt", "file": "$DATA_PATH/file_link"})
    assert "link is a symbolic link where a directory is expected" in found["dir"]["error"]
    assert "file_link is a symbolic link, not a regular file" in found["file"]["error"]
    for raw in ("$DATA_PATH/link/target.txt", "$DATA_PATH/file_link"):
        with pytest.raises(PathRefused, match="symbolic link"):
            store.write("a", raw, "text", "x", create=True)
    assert store.mirror({"f": {"path": "$DATA_PATH/file_link", "encoding": "text"}})["f"].startswith("error:")
    assert (outside / "target.txt").read_text() == "secret" and sorted(p.name for p in outside.iterdir()) == ["target.txt"]


def test_a_single_file_can_be_an_allowed_root(tmp_path: Path, data_dir: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("")
    assert confine(str(crontab), data_dir, [data_dir, crontab]) == crontab.resolve()
    with pytest.raises(PathRefused):
        confine(str(tmp_path / "crontab.d" / "x"), data_dir, [data_dir, crontab])


def test_empty_or_missing_paths_are_refused(data_dir: Path) -> None:
    for raw in ("", "  ", None, 5):
        with pytest.raises(PathRefused, match="non-empty string"):
            confine(raw, data_dir, [data_dir])


def test_atomic_write_replaces_content_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "conf"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


def test_atomic_write_removes_temporaries_a_crash_left_behind(tmp_path: Path) -> None:
    path = tmp_path / "conf"
    stale = tmp_path / ".conf.abc123.teg-tmp"
    stale.write_text("half")
    unrelated = tmp_path / ".other.abc.teg-tmp"
    unrelated.write_text("not ours to clean")
    atomic_write(path, b"x")
    assert not stale.exists() and unrelated.exists()


def test_content_bytes_per_encoding() -> None:
    assert content_bytes("text", "a\nb") == b"a\nb"
    assert content_bytes("json", {"a": 1}) == json.dumps({"a": 1}).encode()
    assert content_bytes("base64", "aGVs\nbG8=") == b"hello"


@pytest.mark.parametrize(
    ("encoding", "value", "reason"),
    [
        ("yaml", "a: 1", "unknown encoding 'yaml'"),
        ("text", {"a": 1}, "text content must be a string, got dict"),
        ("json", 42, "json content must be a JSON object or array, got int"),
        ("json", "{not json", "not valid JSON"),
        ("base64", "!!!not base64", "does not decode"),
        ("base64", None, "base64 content must be a string, got null"),
    ],
)
def test_content_of_the_wrong_type_for_its_encoding_is_rejected(encoding: str, value: object, reason: str) -> None:
    with pytest.raises(ContentError, match=reason):
        content_bytes(encoding, value)


def test_store_write_skips_identical_content_and_reports_changes(store: FileStore, data_dir: Path) -> None:
    first = store.write("a", "$DATA_PATH/sub/a.txt", "text", "one", create=True)
    assert first["changed"] and (data_dir / "sub" / "a.txt").read_text() == "one"
    assert first["hash"] == hashlib.md5(b"one").hexdigest()
    again = store.write("a", "$DATA_PATH/sub/a.txt", "text", "one", create=True)
    assert not again["changed"] and again["hash"] == first["hash"]


def test_store_refuses_to_create_when_create_if_not_exist_is_false(store: FileStore, data_dir: Path) -> None:
    with pytest.raises(FileSyncError, match="create_if_not_exist is false"):
        store.write("a", "a.txt", "text", "x", create=False)
    assert not (data_dir / "a.txt").exists()


def test_store_writes_nothing_outside_the_roots(tmp_path: Path, store: FileStore, data_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (data_dir / "link").symlink_to(outside)
    for raw in ("$DATA_PATH/../x.txt", "$DATA_PATH/link/x.txt"):
        with pytest.raises(PathRefused):
            store.write("a", raw, "text", "x", create=True)
    assert list(outside.iterdir()) == [] and not (tmp_path / "x.txt").exists()


def test_store_refuses_a_symlinked_file_even_inside_the_roots(store: FileStore, data_dir: Path) -> None:
    (data_dir / "real.txt").write_text("old")
    (data_dir / "alias.txt").symlink_to(data_dir / "real.txt")
    with pytest.raises(PathRefused, match="alias.txt is a symbolic link, not a regular file"):
        store.write("a", "alias.txt", "text", "new", create=True)
    assert (data_dir / "alias.txt").is_symlink() and (data_dir / "real.txt").read_text() == "old"


def test_scan_reports_hashes_missing_files_and_refusals(store: FileStore, data_dir: Path) -> None:
    (data_dir / "a.txt").write_text("a")
    found = store.scan({"a": "a.txt", "b": "b.txt", "c": "/etc/passwd"})
    assert found["a"]["hash"] == hashlib.md5(b"a").hexdigest()
    assert found["b"]["hash"] == NO_FILE
    assert "outside the allowed roots" in found["c"]["error"]


def test_mirror_publishes_each_encoding_and_marks_missing_files(data_dir: Path) -> None:
    published = Published()
    store = FileStore(data_dir, [data_dir], published)
    (data_dir / "t.txt").write_text("hi")
    (data_dir / "j.json").write_text('{"a": 1}')
    (data_dir / "b.bin").write_bytes(b"\x00\xff")
    statuses = store.mirror(
        {
            "t": {"path": "t.txt", "encoding": "text"},
            "j": {"path": "j.json", "encoding": "json"},
            "b": {"path": "b.bin", "encoding": "base64"},
            "m": {"path": "m.txt", "encoding": "text"},
        },
    )
    assert statuses == {"t": "sent", "j": "sent", "b": "sent", "m": "missing"}
    values = {k: v for _, payload in published.messages for k, v in payload.items()}
    assert values == {"FILE_READ_t": "hi", "FILE_READ_j": {"a": 1}, "FILE_READ_b": "AP8=", "FILE_READ_m": NO_FILE}
    assert {topic for topic, _ in published.messages} == {"v1/devices/me/attributes"}


def test_a_mirror_that_is_not_acknowledged_is_reported_as_not_published(data_dir: Path) -> None:
    store = FileStore(data_dir, [data_dir], lambda topic, payload: "not connected to ThingsBoard")
    (data_dir / "t.txt").write_text("hi")
    statuses = store.mirror({"t": {"path": "t.txt", "encoding": "text"}})
    assert statuses == {"t": "error:not published: not connected to ThingsBoard"}


def test_a_mirror_over_the_thingsboard_packet_limit_is_replaced_by_a_marker(data_dir: Path) -> None:
    published = Published()
    store = FileStore(data_dir, [data_dir], published)
    (data_dir / "big.txt").write_text("x" * 70_000)
    statuses = store.mirror({"big": {"path": "big.txt", "encoding": "text"}})
    assert statuses["big"].startswith("too_large:") and int(statuses["big"].split(":")[1]) > 65_536
    assert published.messages == [("v1/devices/me/attributes", {"FILE_READ_big": TOO_LARGE})]


def test_a_mirror_of_exactly_the_packet_limit_is_sent_and_one_byte_more_is_not(data_dir: Path) -> None:
    published = Published()
    store = FileStore(data_dir, [data_dir], published)

    def packet(n: int) -> int:
        return mqtt_publish_size("v1/devices/me/attributes", json.dumps({"FILE_READ_k": "y" * n}).encode())

    n = max(i for i in range(65_400, 65_536) if packet(i) <= 65_536)
    assert packet(n) == 65_536
    (data_dir / "k.txt").write_text("y" * n)
    assert store.mirror({"k": {"path": "k.txt", "encoding": "text"}}) == {"k": "sent"}
    (data_dir / "k.txt").write_text("y" * (n + 1))
    assert store.mirror({"k": {"path": "k.txt", "encoding": "text"}}) == {"k": "too_large:65537"}


_WRITER = """
import sys
from pathlib import Path
from teg_fsm.adapters.files import atomic_write
path, size = Path(sys.argv[1]), int(sys.argv[2])
blobs = [b"A" * size, b"B" * size]
print("ready", flush=True)
i = 1
while True:
    atomic_write(path, blobs[i % 2])
    i += 1
"""


def test_sigkill_during_a_large_write_leaves_the_old_or_the_new_content(tmp_path: Path) -> None:
    size = 8 * 1024 * 1024
    path = tmp_path / "large.bin"
    path.write_bytes(b"A" * size)
    valid = {hashlib.md5(b"A" * size).hexdigest(), hashlib.md5(b"B" * size).hexdigest()}
    rng = random.Random(7)
    interrupted = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(size)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.01, 0.4))  # a random moment inside the write loop
            assert proc.poll() is None, "the writer must still be running when it is killed"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        assert path.stat().st_size == size
        assert md5_file(path) in valid
        interrupted += any(p.name.endswith(".teg-tmp") for p in tmp_path.iterdir())
    # The kills must really land inside writes, or this test proves nothing.
    assert interrupted >= 1
    atomic_write(path, b"done")  # also sweeps up the temporaries the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.bin"]
