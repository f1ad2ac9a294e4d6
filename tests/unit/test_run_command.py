"""run_command runs in its own process group and leaves no process behind (real processes)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import psutil
import pytest

from teg_fsm.components.rpc import run_in_own_group
from tests.rig.waiting import wait_for


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique argument so this test's processes can be found (and nothing else's)."""
    tag = f"teg-run-command-{uuid.uuid4().hex}"
    yield tag
    for proc in _tagged(tag):
        proc.kill()


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if tag in " ".join(proc.cmdline()) and proc.pid != os.getpid():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _alive(tag: str) -> list[psutil.Process]:
    return [p for p in _tagged(tag) if p.status() != psutil.STATUS_ZOMBIE]


def _sleeper(tag: str) -> str:
    return f"{sys.executable} -c 'import time; time.sleep(100)' {tag}"


def test_a_timeout_kills_the_command_and_every_background_child(marker: str) -> None:
    script = f"echo started; {_sleeper(marker)} & {_sleeper(marker)} & {_sleeper(marker)}"
    done = run_in_own_group(["sh", "-c", script, marker], 1, 1000)
    assert done.timed_out and done.returncode is None
    assert done.output_text(1000) == "started\n"
    wait_for(lambda: not _alive(marker), 10, "every process of the command gone")


def test_a_command_that_ends_takes_its_leftover_background_children_with_it(marker: str) -> None:
    script = f"{_sleeper(marker)} >/dev/null 2>&1 & echo left one behind; exit 4"
    done = run_in_own_group(["sh", "-c", script, marker], 30, 1000)
    assert not done.timed_out and done.returncode == 4
    assert done.output_text(1000) == "left one behind\n"
    wait_for(lambda: not _alive(marker), 10, "the background child gone")


def test_a_background_child_holding_the_output_does_not_make_a_finished_command_time_out(marker: str) -> None:
    done = run_in_own_group(["sh", "-c", f"{_sleeper(marker)} & echo done", marker], 30, 1000)
    assert not done.timed_out and done.returncode == 0 and done.output_text(1000) == "done\n"
    wait_for(lambda: not _alive(marker), 10, "the background child gone")


def test_the_command_runs_in_a_session_of_its_own() -> None:
    done = run_in_own_group([sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid())"], 30, 100)
    assert done.output_text(100) == "True\n"


def test_huge_output_is_kept_bounded_and_the_rest_counted() -> None:
    done = run_in_own_group(["seq", "1", "2000000"], 30, 10)
    assert len(done.kept) <= 1 << 20 and done.total > 10 * (1 << 20)
    text = done.output_text(10)
    assert text.startswith("1\n2\n3\n4\n5\n... [") and text.endswith("more bytes cut]")
