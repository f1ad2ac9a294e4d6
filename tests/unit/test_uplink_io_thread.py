"""The uplink's one I/O thread: jobs and the queue watch in one ``select`` (real SQLite, real inotify)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.adapters import file_watch
from teg_fsm.adapters.gateway_logs import BufferingLogHandler, LogBuffer
from teg_fsm.adapters.queue_store import QueueStore
from teg_fsm.adapters.uplink_io import UplinkIO
from tests.integration import uplink_rig as rig

WAIT_S = 10.0


class _Posts:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.changed = threading.Condition()

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        with self.changed:
            self.names.append(name)
            self.changed.notify_all()

    def wait_for(self, name: str, count: int = 1) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.names.count(name) >= count, WAIT_S)


def _io(tmp_path: Path, posts: _Posts, coalesce_s: float = 0.0) -> UplinkIO:
    db = tmp_path / "communication_queue.db"
    rig.create_queue(db)
    io = UplinkIO(store=lambda: QueueStore(db, tmp_path / "gateway_archive.db", archive_max_rows=10**9,
                                           archive_max_bytes=10**12),
                  logs=lambda: LogBuffer(tmp_path / "logs.db"), handler=BufferingLogHandler(), post=posts,
                  coalesce_s=coalesce_s)
    io.open()
    return io


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "stat-polling"])
def test_a_controller_row_posts_rows_waiting_from_the_io_thread_alone(tmp_path: Path, inotify: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not inotify:
        monkeypatch.setattr(file_watch.FileWatch, "_inotify", lambda self: None)
    posts = _Posts()
    io = _io(tmp_path, posts)
    before = _threads()
    io.start()
    try:
        assert _threads() - before == {"teg-uplink-io"}  # no watch thread of its own
        rig.fill(tmp_path / "communication_queue.db", 3)
        assert posts.wait_for("rows_waiting")
        done = threading.Event()
        io.submit(done.set)  # jobs still run on the same thread
        assert done.wait(WAIT_S)
    finally:
        io.stop()
    assert "teg-uplink-io" not in _threads()


def test_rows_written_within_the_coalescing_window_make_one_notice(tmp_path: Path) -> None:
    posts = _Posts()
    io = _io(tmp_path, posts, coalesce_s=0.5)
    io.start()
    try:
        for start in range(0, 50, 10):
            rig.fill(tmp_path / "communication_queue.db", 10, start=start)
        assert posts.wait_for("rows_waiting")
        after_look = threading.Event()
        io.submit(after_look.set)
        assert after_look.wait(WAIT_S)
        assert posts.names.count("rows_waiting") == 1
    finally:
        io.stop()


def test_a_write_to_another_file_in_the_directory_posts_nothing(tmp_path: Path) -> None:
    posts = _Posts()
    io = _io(tmp_path, posts)
    io.start()
    try:
        rig.create_queue(tmp_path / "other.db")
        rig.fill(tmp_path / "other.db", 3)
        rig.fill(tmp_path / "communication_queue.db", 1)
        assert posts.wait_for("rows_waiting")
        assert posts.names.count("rows_waiting") == 1
    finally:
        io.stop()


def test_jobs_submitted_from_many_threads_all_run_without_a_lost_wake_up(tmp_path: Path) -> None:
    # Each submitter waits for its job before the next: a lost wake-up byte would leave one waiting.
    io = _io(tmp_path, _Posts())
    io.start()
    failures: list[int] = []

    def submitter() -> None:
        for i in range(2_000):
            ran = threading.Event()
            io.submit(ran.set)
            if not ran.wait(WAIT_S):
                failures.append(i)
                return

    try:
        threads = [threading.Thread(target=submitter) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
    finally:
        io.stop()
