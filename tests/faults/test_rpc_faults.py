"""run_command faults over the stand-in: malformed requests get an error reply, a timeout leaves no process.

Field reports: a NUL in an argument got no reply at all; a timed-out command
left its background children running. Also: SIGTERM while a long command runs
stops the gateway and the command. Real gateway process, real stand-in.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

FAILED = "Error - Running command failed: "
STOP_BUDGET_S = 20.0  # a hang detector, not a timing assertion


@pytest.mark.parametrize(("params", "reply"), [
    ({"command": ["echo", "a\0b"]},
     FAILED + "'command' item 1 contains a NUL character, which no program argument can hold"),
    ({"command": "echo hi"}, FAILED + "'command' must be a list of strings"),
    ({"command": ["echo", None]}, FAILED + "'command' must be a list of strings"),
    ({"command": []}, FAILED + "'command' must not be empty and 'timeout_s' must be positive"),
    ({"command": ["echo"], "timeout_s": 10**9}, FAILED + "'timeout_s' must be at most 3600 seconds, got 1000000000"),
    ({"command": ["echo"], "timeout_s": "soon"}, FAILED + "'timeout_s' must be an integer, got str"),
    ({"command": ["echo"], "env": {"A": "1"}}, FAILED + "unknown parameter(s) env"),
    ("echo hi", FAILED + "params is not a dictionary"),
])
def test_every_malformed_run_command_gets_an_error_reply(tb: StandIn, tmp_path: Path, params: Any, reply: str) -> None:
    gateway = rig.start_gateway(tb, tmp_path, TEG_RUN_COMMAND_ENABLED="true")
    try:
        assert gateway.ask("run_command", params) == reply
        uplink_rig.fill(gateway.queue, 20)
        rig.finish(gateway, expected_seqs=range(20))
    finally:
        uplink_rig.stop(gateway.proc)


def _tagged_alive(tag: str) -> list[int]:
    pids = []
    for proc in psutil.process_iter():
        try:
            if tag in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def test_a_timed_out_command_leaves_no_grandchild_running(tb: StandIn, tmp_path: Path) -> None:
    tag = f"teg-fault-{uuid.uuid4().hex}"
    sleeper = f"{sys.executable} -c 'import time; time.sleep(100)' {tag}"
    command = ["sh", "-c", f"{sleeper} & {sleeper} & echo started; {sleeper}", tag]
    gateway = rig.start_gateway(tb, tmp_path, TEG_RUN_COMMAND_ENABLED="true")
    try:
        assert gateway.ask("run_command", {"command": command, "timeout_s": 2}) == (
            f"Error - Error running command '{command}': Timeout after 2 seconds. Output: started\n"
        )
        wait_for(lambda: not _tagged_alive(tag), 10, "no process of the timed-out command left")
        uplink_rig.fill(gateway.queue, 20)
        rig.finish(gateway, expected_seqs=range(20))
    finally:
        uplink_rig.stop(gateway.proc)
        for pid in _tagged_alive(tag):
            psutil.Process(pid).kill()


def test_sigterm_during_a_long_command_stops_the_gateway_and_the_command(tb: StandIn, tmp_path: Path) -> None:
    tag = f"teg-fault-{uuid.uuid4().hex}"
    command = ["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(100)' {tag} & wait", tag]
    gateway = rig.start_gateway(tb, tmp_path, TEG_RUN_COMMAND_ENABLED="true")
    try:
        uplink_rig.fill(gateway.queue, 20)
        rig.finish(gateway, expected_seqs=range(20))
        tb.rpc_async(gateway.device, "run_command", {"command": command, "timeout_s": 3600}, timeout=60)
        wait_for(lambda: _tagged_alive(tag), 10, "the long command running")
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            assert gateway.proc.wait(STOP_BUDGET_S) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGTERM did not stop the gateway:\n{gateway.log_text()[-3000:]}") from None
        wait_for(lambda: not _tagged_alive(tag), 10, "the command's processes gone with the gateway")
    finally:
        uplink_rig.stop(gateway.proc)
        for pid in _tagged_alive(tag):
            psutil.Process(pid).kill()
