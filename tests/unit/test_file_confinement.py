"""File sync cannot be tricked or wedged: no symlink race, no special file, no path escape.

Against real files in a temporary directory. The race tests swap a directory
below the root for a symlink to an outside directory from another process
(``renameat2(RENAME_EXCHANGE)``: atomic, so the name always exists) while the
store writes, reads and hashes through it thousands of times.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teg_fsm.adapters.files import FileStore, FileSyncError, PathRefused, locate
from teg_fsm.engine.effects.files import NO_FILE

RACE_ROUNDS = 3000
NO_HANG_S = 30.0  # a refusal comes at once; this only turns a hang into a failure

_SWAPPER = """
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print("swapping", flush=True)
while True:
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        sys.exit("renameat2 failed: errno %d" % ctypes.get_errno())
"""


def _has_rename_exchange(tmp: Path) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    (tmp / "probe_a").mkdir()
    (tmp / "probe_b").symlink_to(tmp)
    try:
        return libc.renameat2(-100, os.fsencode(tmp / "probe_a"), -100, os.fsencode(tmp / "probe_b"), 2) == 0
    finally:
        (tmp / "probe_a").unlink()
        (tmp / "probe_b").rmdir()


class Published:
    def __init__(self) -> None:
        self.payloads: list[str] = []

    def __call__(self, topic: str, payload: str) -> None:
        self.payloads.append(payload)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def store(data_dir: Path) -> FileStore:
    return FileStore(data_dir, [data_dir], Published())


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "f.txt").write_text("OUTSIDE")
    return path


@pytest.fixture
def swapping(tmp_path: Path, data_dir: Path, outside: Path) -> Iterator[None]:
    """``data/sub`` flips between a real directory and a symlink to ``outside``, as fast as the kernel allows."""
    if not _has_rename_exchange(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available on this kernel/libc")
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "f.txt").write_text("inside")
    (data_dir / "swap").symlink_to(outside)
    proc = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(data_dir / "sub"), str(data_dir / "swap")],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"swapping"
        yield
        assert proc.poll() is None, "the swapper died during the race"
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _outside_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert (outside / "f.txt").read_text() == "OUTSIDE"


def _tally(action: Callable[[int], Any], rounds: int = RACE_ROUNDS) -> tuple[list[Any], int]:
    results, refused = [], 0
    for i in range(rounds):
        try:
            results.append(action(i))
        except PathRefused as exc:
            assert "symbolic link" in str(exc) or "changing under us" in str(exc), exc
            refused += 1
    return results, refused


# -- the race ---------------------------------------------------------------------------------


def test_writes_never_land_outside_the_roots_while_a_directory_is_swapped_for_a_symlink(
        store: FileStore, data_dir: Path, outside: Path, swapping: None) -> None:
    results, refused = _tally(lambda i: store.write("k", "$DATA_PATH/sub/f.txt", "text", f"round {i}", create=True))
    _outside_untouched(outside)
    # Both sides of the swap were really met, or the race proved nothing.
    assert results and refused, (len(results), refused)


def test_reads_and_hashes_never_see_outside_bytes_while_a_directory_is_swapped(
        store: FileStore, outside: Path, swapping: None) -> None:
    outside_md5 = hashlib.md5(b"OUTSIDE").hexdigest()
    hashes, refused_hashes = _tally(lambda i: store.hash("$DATA_PATH/sub/f.txt"))
    reads, refused_reads = _tally(lambda i: store.read("$DATA_PATH/sub/f.txt"))
    assert outside_md5 not in hashes and all(r is None or b"OUTSIDE" not in r[0] for r in reads)
    assert hashes and refused_hashes and reads and refused_reads
    statuses = [store.mirror({"k": {"path": "$DATA_PATH/sub/f.txt", "encoding": "text"}})["k"] for _ in range(300)]
    assert all(s == "sent" or "symbolic link" in s or "changing under us" in s for s in statuses), set(statuses)
    assert not any("OUTSIDE" in p for p in store._publish.payloads)  # type: ignore[attr-defined]
    _outside_untouched(outside)


def test_the_swapper_does_redirect_a_writer_that_checks_then_opens(data_dir: Path, outside: Path,
                                                                   swapping: None) -> None:
    """The control: the race above is real, a check-then-open writer is redirected outside."""
    target = data_dir / "sub" / "naive.txt"
    for _ in range(50 * RACE_ROUNDS):
        try:  # realpath itself races the swapper (lstat says link, readlink finds a directory)
            if Path(os.path.realpath(target)).is_relative_to(data_dir):
                with open(target, "w") as f:
                    f.write("escaped")
        except OSError:
            continue
        if (outside / "naive.txt").exists():
            break
    assert (outside / "naive.txt").exists()


# -- special files ----------------------------------------------------------------------------


def _special_files(data_dir: Path) -> dict[str, str]:
    os.mkfifo(data_dir / "fifo")
    os.mknod(data_dir / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(data_dir / "sock"))
    sock.close()
    (data_dir / "dir").mkdir()
    return {"fifo": "a FIFO (named pipe)", "null": "a character device node", "sock": "a socket", "dir": "a directory"}


def _within(seconds: float, action: Callable[[], Any]) -> Any:
    """Run ``action`` on a thread: a hang (a FIFO opened for reading) becomes a failure, not a stuck test."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(action()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "file sync blocked on a special file"
    assert out, "the action raised (see the thread's traceback above)"
    return out[0]


def test_scan_refuses_special_files_by_kind_and_still_hashes_the_regular_ones(store: FileStore, data_dir: Path) -> None:
    kinds = _special_files(data_dir)
    (data_dir / "ok.txt").write_text("ok")
    found = _within(NO_HANG_S, lambda: store.scan({**{k: k for k in kinds}, "ok": "ok.txt", "new": "new.txt"}))
    for key, kind in kinds.items():
        assert f"{data_dir / key} is {kind}, not a regular file" in found[key]["error"]
    assert found["ok"]["hash"] == hashlib.md5(b"ok").hexdigest() and found["new"]["hash"] == NO_FILE


def test_writes_refuse_special_files_and_leave_them_as_they_were(store: FileStore, data_dir: Path) -> None:
    kinds = _special_files(data_dir)
    for key, kind in kinds.items():
        before = os.lstat(data_dir / key)

        def write(key: str = key) -> str:
            try:
                store.write(key, key, "text", "x", create=True)
            except FileSyncError as exc:
                return str(exc)
            return "written"

        assert kind in _within(NO_HANG_S, write)
        after = os.lstat(data_dir / key)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not [p for p in data_dir.iterdir() if p.name.endswith(".teg-tmp")]


def test_mirrors_refuse_special_files_and_publish_nothing_for_them(data_dir: Path) -> None:
    published = Published()
    store = FileStore(data_dir, [data_dir], published)
    kinds = _special_files(data_dir)
    statuses = _within(NO_HANG_S, lambda: store.mirror({k: {"path": k, "encoding": "text"} for k in kinds}))
    for key, kind in kinds.items():
        assert statuses[key].startswith("error:") and kind in statuses[key]
    assert published.payloads == []


def test_a_file_where_a_folder_is_expected_is_refused(store: FileStore, data_dir: Path) -> None:
    (data_dir / "plain").write_text("x")
    with pytest.raises(PathRefused, match="plain is a regular file where a directory is expected"):
        store.write("k", "plain/inner.txt", "text", "x", create=True)
    assert "plain is a regular file where a directory is expected" in store.scan({"k": "plain/inner.txt"})["k"]["error"]
    assert (data_dir / "plain").read_text() == "x"


def test_missing_folders_are_created_only_when_creating(store: FileStore, data_dir: Path) -> None:
    with pytest.raises(FileSyncError, match="does not exist and create_if_not_exist is false"):
        store.write("k", "a/b/c.txt", "text", "x", create=False)
    assert not (data_dir / "a").exists()
    assert store.write("k", "a/b/c.txt", "text", "x", create=True)["changed"]
    assert (data_dir / "a" / "b" / "c.txt").read_text() == "x"


def test_a_nul_in_a_path_is_refused_with_a_clear_reason(store: FileStore) -> None:
    assert "NUL" in store.scan({"k": "a\0b"})["k"]["error"]


# -- lexical confinement (property) ------------------------------------------------------------

_component = st.sampled_from(["..", ".", "a", "b", "", "$DATA_PATH", "..a", "a..", " "])


@settings(max_examples=300, deadline=None)
@given(st.lists(_component, min_size=1, max_size=8), st.booleans())
def test_a_located_path_always_lies_below_its_root(parts: list[str], absolute: bool) -> None:
    root = Path("/srv/teg/data")
    raw = ("/" if absolute else "") + "/".join(parts)
    try:
        located = locate(raw, root, [root])
    except PathRefused:
        return
    assert located.anchor in (root, root.parent)
    assert ".." not in located.parts and "." not in located.parts and "" not in located.parts
    assert located.path == root or root in located.path.parents
