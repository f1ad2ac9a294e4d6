"""The closing checks every fault test ends with, and a gateway process to fault.

Every fault scenario (issue "Never wedge") ends the same way: the gateway process
still answers ``ping`` within a second, every valid row reached the stand-in, and
every database the gateway touches passes ``PRAGMA integrity_check``. Keeping the
three checks here makes them impossible to forget or to weaken in one test only.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

PING_BUDGET_S = 1.0
GATEWAY_DATABASES = ("gateway_archive.db", "gateway_logs_buffer.db", "teg_journal.db", "communication_queue.db")


@attrs.define
class FaultedGateway:
    """A ``teg run`` subprocess registered as ``device`` on the stand-in."""

    tb: StandIn
    device: str
    proc: subprocess.Popen[bytes]
    data: Path
    log: Path

    @property
    def queue(self) -> Path:
        return self.data / "communication_queue.db"

    def ask(self, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        return self.tb.rpc(self.device, method, params, timeout=timeout)["message"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_gateway(tb: StandIn, root: Path, device: str | None = None, connect: bool = True,
                  **extra: str) -> FaultedGateway:
    """Start ``teg run`` with its data under ``root/data``; wait until ping can be answered."""
    device = device or f"fault-{uuid.uuid4().hex[:8]}"
    token = tb.add_device(device)
    env = uplink_rig.gateway_env(tb, root / "data", token, THINGSBOARD_DEVICE_NAME=device,
                                 DOCKER_HOST=extra.pop("DOCKER_HOST", f"unix://{root}/no-docker.sock"), **extra)
    uplink_rig.create_queue(root / "data" / "communication_queue.db")
    proc = uplink_rig.start_gateway(env, root / "gateway.log")
    gateway = FaultedGateway(tb, device, proc, root / "data", root / "gateway.log")
    if connect:
        wait_until_rpc_ready(gateway)
    return gateway


def wait_until_rpc_ready(gateway: FaultedGateway, timeout: float = 20.0) -> None:
    tb = gateway.tb
    wait_for(lambda: gateway.proc.poll() is not None or "v1/devices/me/rpc/request/+" in tb.subscriptions(gateway.device),
             timeout, "gateway connected and subscribed to RPC")
    assert gateway.proc.poll() is None, gateway.log_text()[-4000:]


def assert_answers_ping(gateway: FaultedGateway, within_s: float = PING_BUDGET_S) -> None:
    """The invariant of every fault test: a live gateway process answers ``ping`` within a second."""
    assert gateway.proc.poll() is None, f"gateway exited ({gateway.proc.returncode}):\n{gateway.log_text()[-4000:]}"
    asked = time.monotonic()
    answer = gateway.ask("ping", timeout=max(within_s, 1.0) + 4.0)
    took = time.monotonic() - asked
    assert answer == "Pong"
    assert took <= within_s, f"ping answered after {took:.2f} s (budget {within_s} s)"


def assert_integrity(paths: Iterable[Path]) -> None:
    """Every existing SQLite file passes ``PRAGMA integrity_check``."""
    checked = 0
    for path in paths:
        if not path.exists():
            continue
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", path
        finally:
            conn.close()
        checked += 1
    assert checked, "no database found to check"


def gateway_databases(data: Path) -> list[Path]:
    return [data / name for name in GATEWAY_DATABASES]


def assert_rows_arrived(tb: StandIn, device: str, expected_seqs: Iterable[int], timeout: float = 30.0) -> None:
    """Every valid row (telemetry key ``seq`` as the rig writes it) reached the stand-in."""
    expected = set(expected_seqs)
    wait_for(lambda: expected <= set(uplink_rig.seqs(tb, device)), timeout,
             f"{len(expected)} valid rows delivered")


def finish(gateway: FaultedGateway, expected_seqs: Iterable[int] = ()) -> None:
    """The closing checks of a fault test, in order: ping, rows, databases."""
    assert_answers_ping(gateway)
    assert_rows_arrived(gateway.tb, gateway.device, expected_seqs)
    assert_integrity(gateway_databases(gateway.data))


@pytest.fixture
def tb() -> Iterator[StandIn]:
    with StandIn(tls_port=0) as standin:
        yield standin
