"""Engine faults against the real ``teg run``: a full disk, a corrupt journal, a malformed shared attribute.

Field reports (issue 11): a journal COMMIT that raised "database or disk is full"
killed the dispatcher thread (no RPC, no drain, no recovery); a corrupt
``teg_journal.db`` made every start exit 1; ``{"deleted": [1, 2, {"a": 1}]}``
raised inside the file-sync machine and the journal that recorded it crashed
``teg replay``. Each test ends with the closing checks of ``tests/faults/rig.py``.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from teg_fsm.engine.journal import read_journal
from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

REPO = Path(__file__).resolve().parents[2]
TMPFS_SIZE = "16m"
ROWS_PER_COMMIT = 100


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/data`` on its own 16 MB tmpfs, unmounted whatever happens."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", str(data)], check=True)


def _write_rows(queue: Path, start: int, count: int) -> int:
    """Commit rows like the controller does, until the disk refuses one; returns the next seq."""
    conn = sqlite3.connect(queue, timeout=30)
    try:
        for first in range(start, start + count, ROWS_PER_COMMIT):
            rows = [("measurement", uplink_rig.record(i)) for i in range(first, first + ROWS_PER_COMMIT)]
            try:
                conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
                conn.commit()
            except sqlite3.OperationalError as exc:
                assert "full" in str(exc) or "disk" in str(exc), exc
                conn.rollback()
                return first
        return start + count
    finally:
        conn.close()


def _fill_disk(filler: Path) -> None:
    """Write zeros until the file system says ENOSPC, in big then page-sized pieces."""
    with open(filler, "wb", buffering=0) as out:
        for size in (256 * 1024, 4096):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def _condition(tb: StandIn, device: str) -> object:
    return tb.latest(device).get("gateway_condition")


def _teg(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_a_full_disk_degrades_the_gateway_which_keeps_answering_and_recovers_by_itself(
    tb: StandIn, tmp_path: Path, small_disk: Path
) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    filler = small_disk / "filler"
    try:
        tb.delay_pubacks(3.0)  # packets stay in flight, so the disk fills in the middle of the drain
        written = _write_rows(gateway.queue, 0, 20_000)
        wait_for(lambda: len(uplink_rig.seqs(tb, gateway.device)) > 0, 30, "the drain started")
        _fill_disk(filler)
        # The controller keeps writing: the queue's WAL absorbs a little, then its commits fail too.
        before_full = written
        written = _write_rows(gateway.queue, written, 50_000)
        assert written < before_full + 50_000, "no controller commit failed: the disk was not full"
        tb.delay_pubacks(0)

        wait_for(lambda: _condition(tb, gateway.device) == "disk_full", 30, "disk_full reported as telemetry")
        rig.assert_answers_ping(gateway)
        wait_for(lambda: "DEGRADED disk_full" in _teg("status", "--data", str(small_disk)).stdout, 30,
                 "teg status shows the degraded mode")
        assert "degraded mode: disk full" in gateway.log_text()

        filler.unlink()
        wait_for(lambda: _condition(tb, gateway.device) == "ok", 60, "recovery reported as telemetry")
        written = _write_rows(gateway.queue, written, 500)
        assert "recovered from disk full" in gateway.log_text()
        wait_for(lambda: any("recovered from disk full after" in str(m) for _, m in tb.telemetry(gateway.device, "message")),
                 30, "the episode told in the gateway's log at ThingsBoard")
        rig.finish(gateway, expected_seqs=range(written))
    finally:
        uplink_rig.stop(gateway.proc)


def test_a_corrupt_journal_is_moved_aside_at_start_and_the_gateway_works(tb: StandIn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    garbage = b"SQLite format 3\x00" + os.urandom(64 * 1024)
    (data / "teg_journal.db").write_bytes(garbage)
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        moved = sorted(data.glob("teg_journal.db.corrupt-*"))
        assert [p.read_bytes() for p in moved] == [garbage], moved
        wait_for(lambda: moved[0].name in str(tb.latest(gateway.device).get("gateway_quarantined_files")), 30,
                 "the quarantine reported as telemetry")
        assert f"moved aside to {moved[0]}" in gateway.log_text()
        uplink_rig.fill(gateway.queue, 50)
        rig.finish(gateway, expected_seqs=range(50))
    finally:
        uplink_rig.stop(gateway.proc)
    assert gateway.proc.returncode == 0, gateway.log_text()[-4000:]


def test_a_malformed_shared_attribute_is_rejected_by_name_and_the_journal_replays(
    tb: StandIn, tmp_path: Path
) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        uplink_rig.fill(gateway.queue, 50)
        tb.set_shared(gateway.device, {"deleted": [1, 2, {"a": 1}]})
        tb.set_shared(gateway.device, {"FILES": [1, 2], "sw_version": {"v": 1}, "colour": "blue"})
        wait_for(lambda: "FILES: must be an object" in gateway.log_text(), 20, "the second update rejected")
        log = gateway.log_text()
        for field in ("deleted[0]", "deleted[1]", "deleted[2]", "sw_version: must be a string"):
            assert field in log, field
        assert " failed on event #" not in log  # no machine step raised
        wait_for(lambda: any("deleted[2]" in str(m) for _, m in tb.telemetry(gateway.device, "message")), 30,
                 "the rejection reported to ThingsBoard in the gateway's log")
        rig.finish(gateway, expected_seqs=range(50))
    finally:
        uplink_rig.stop(gateway.proc)
    replay = _teg("replay", str(gateway.data / "teg_journal.db"))
    assert "Traceback" not in replay.stdout + replay.stderr
    assert replay.returncode == 0 and replay.stdout.startswith("identical"), replay.stdout + replay.stderr


def test_a_gateway_restarted_on_a_full_disk_starts_degraded_and_recovers(
    tb: StandIn, tmp_path: Path, small_disk: Path
) -> None:
    first = rig.start_gateway(tb, tmp_path)
    try:
        written = _write_rows(first.queue, 0, 1_000)
        rig.assert_rows_arrived(tb, first.device, range(written))
    finally:
        uplink_rig.stop(first.proc)
    _fill_disk(small_disk / "filler")
    env = uplink_rig.gateway_env(tb, tmp_path / "elsewhere", tb.devices()[first.device] or "",
                                 THINGSBOARD_DEVICE_NAME=first.device, TEG_DATA_PATH=str(small_disk),
                                 THINGSBOARD_ACCESS_TOKEN=str(small_disk / "tb_access_token"),
                                 DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    proc = uplink_rig.start_gateway(env, tmp_path / "gateway-2.log")
    gateway = rig.FaultedGateway(tb, first.device, proc, small_disk, tmp_path / "gateway-2.log")
    try:
        rig.wait_until_rpc_ready(gateway)
        rig.assert_answers_ping(gateway)
        wait_for(lambda: _condition(tb, gateway.device) == "disk_full", 30, "disk_full reported after the restart")
        (small_disk / "filler").unlink()
        wait_for(lambda: _condition(tb, gateway.device) == "ok", 60, "recovery reported")
        written = _write_rows(gateway.queue, written, 500)
        rig.finish(gateway, expected_seqs=range(written))
    finally:
        uplink_rig.stop(gateway.proc)
    # The checkpoints were read without room for SQLite's -shm file: the machines resumed.
    starts = [e for e in read_journal(small_disk / "teg_journal.db") if e.name == "gateway_started"]
    assert len(starts) == 2 and "connection" in starts[1].data["resumed"], starts[-1].data


def test_a_damaged_version_file_is_moved_aside_at_start_and_the_gateway_works(tb: StandIn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    damaged = b"\xff\xfe\x00v1.2\x80"
    (data / "last_launched_controller_version.txt").write_bytes(damaged)
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        moved = sorted(data.glob("last_launched_controller_version.txt.corrupt-*"))
        assert [p.read_bytes() for p in moved] == [damaged], moved
        wait_for(lambda: moved[0].name in str(tb.latest(gateway.device).get("gateway_quarantined_files")), 30,
                 "the quarantine reported as telemetry")
        uplink_rig.fill(gateway.queue, 50)
        rig.finish(gateway, expected_seqs=range(50))
    finally:
        uplink_rig.stop(gateway.proc)
