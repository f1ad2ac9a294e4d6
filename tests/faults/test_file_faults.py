"""File sync faults: special files named in FILES, and a symlink swapped in while files are written.

Field reports: a FIFO or a device node in ``FILES`` hung file sync in
``scanning`` for good (later files never written) and SIGTERM no longer stopped
the gateway. Here a real gateway process gets a FIFO and a character device
node (``/dev/null``'s numbers, made in the test's tmp dir) next to ordinary
files: they are refused, named by kind, on their key (gateway log, forwarded to
ThingsBoard as telemetry), the ordinary files are written, a later push is
written too, and SIGTERM stops the gateway.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

STOP_BUDGET_S = 20.0  # a hang detector, not a timing assertion


def _special_files(data: Path) -> None:
    os.mkfifo(data / "pipe")
    os.mknod(data / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))


def _forwarded_messages(tb: StandIn, device: str) -> list[str]:
    return [str(v) for _, v in tb.telemetry(device, "message")]


def _hashes(tb: StandIn, device: str) -> dict[str, Any]:
    return tb.client_attributes(device).get("FILE_HASHES") or {}


def test_special_files_in_files_are_refused_and_later_files_still_written(tb: StandIn, tmp_path: Path) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        _special_files(gateway.data)
        tb.set_shared(gateway.device, {
            "FILES": {"pipe": {"path": "$DATA_PATH/pipe"}, "null": {"path": "$DATA_PATH/null"},
                      "good": {"path": "$DATA_PATH/conf/good.txt"}},
            "FILE_CONTENT_pipe": "into the pipe", "FILE_CONTENT_null": "into the device",
            "FILE_CONTENT_good": "hello",
        })
        good = gateway.data / "conf" / "good.txt"
        wait_for(lambda: good.exists() and good.read_text() == "hello", 30, "the ordinary file written")
        for key, kind in (("pipe", "a FIFO (named pipe)"), ("null", "a character device node")):
            expected = f"file {key}: refused: {gateway.data / key} is {kind}, not a regular file"
            wait_for(lambda e=expected: any(e in m for m in _forwarded_messages(tb, gateway.device)), 30,
                     f"the refusal of {key} forwarded to ThingsBoard")
        wait_for(lambda: "good" in _hashes(tb, gateway.device), 30, "FILE_HASHES reported")
        assert set(_hashes(tb, gateway.device)) == {"good"}

        # A later push is written: file sync is not stuck in scanning.
        tb.set_shared(gateway.device, {"FILE_CONTENT_good": "hello again"})
        wait_for(lambda: good.read_text() == "hello again", 30, "the later push written")
        assert stat.S_ISFIFO(os.lstat(gateway.data / "pipe").st_mode)
        assert stat.S_ISCHR(os.lstat(gateway.data / "null").st_mode)

        uplink_rig.fill(gateway.queue, 30)
        rig.finish(gateway, expected_seqs=range(30))
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            assert gateway.proc.wait(STOP_BUDGET_S) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGTERM did not stop the gateway:\n{gateway.log_text()[-3000:]}") from None
    finally:
        uplink_rig.stop(gateway.proc)


def test_a_special_file_swapped_in_after_the_definition_is_refused_on_the_next_check(
        tb: StandIn, tmp_path: Path) -> None:
    gateway = rig.start_gateway(tb, tmp_path, TEG_FILE_CHECK_INTERVAL_S="1")
    try:
        tb.set_shared(gateway.device, {"FILES": {"f": {"path": "$DATA_PATH/f.txt"}}, "FILE_CONTENT_f": "v1"})
        target = gateway.data / "f.txt"
        wait_for(lambda: target.exists() and target.read_text() == "v1", 30, "the file written")
        target.unlink()
        os.mkfifo(target)
        expected = f"file f: refused: {target} is a FIFO (named pipe), not a regular file"
        wait_for(lambda: any(expected in m for m in _forwarded_messages(tb, gateway.device)), 30,
                 "the swapped-in FIFO refused")
        uplink_rig.fill(gateway.queue, 10)
        rig.finish(gateway, expected_seqs=range(10))
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(STOP_BUDGET_S) == 0
    finally:
        uplink_rig.stop(gateway.proc)
