"""The uplink end to end: a controller-like writer process, the gateway as a subprocess
(`python -m teg_fsm.cli run`), the ThingsBoard stand-in over TLS, real SQLite files.

Sizes are CI-sized; the spec's sizes are available through the environment:
TEG_TEST_KILL_ROWS (spec 50000), TEG_TEST_KILLS (spec 10), TEG_TEST_OUTAGE_S (spec 30).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import uplink_rig as rig
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration
DEVICE = "station-1"


@pytest.fixture
def tb() -> Iterator[StandIn]:
    with StandIn(tls_port=0) as standin:
        yield standin


@pytest.fixture
def gateway(tmp_path: Path, tb: StandIn) -> Iterator[dict]:
    """Starts gateways on demand; kills whatever is left at the end."""
    token = tb.add_device(DEVICE)
    procs: list = []
    env = rig.gateway_env(tb, tmp_path / "data", token)

    def start(**extra: str):  # type: ignore[no-untyped-def]
        proc = rig.start_gateway({**env, **extra}, tmp_path / "gateway.log")
        procs.append(proc)
        return proc

    yield {"start": start, "data": tmp_path / "data", "log": tmp_path / "gateway.log"}
    for proc in procs:
        rig.stop(proc)


def _queue(gw: dict) -> Path:
    return gw["data"] / "communication_queue.db"


def _outage(tb: StandIn, seconds: float) -> None:
    """ThingsBoard unreachable: listeners closed, sessions dropped, data kept."""
    tb._await(tb._server.stop("outage"))  # noqa: SLF001 - the stand-in has no public "down for a while"
    time.sleep(seconds)
    tb._await(tb._server.start())  # noqa: SLF001


def test_rows_written_by_another_process_arrive_exactly_once_in_ts_order(tb: StandIn, gateway: dict) -> None:
    n = 10_000
    rig.create_queue(_queue(gateway))
    proc = gateway["start"]()
    writer = rig.writer_process(_queue(gateway), n, per_commit=100, pause_s=0.002)
    try:
        assert writer.wait(120) == 0
        rig.wait_for(lambda: len(rig.seqs(tb)) >= n, 60, "all rows delivered")
        time.sleep(0.5)  # a duplicate would arrive right behind
        assert rig.seqs(tb) == list(range(n))
        ts = [t for t, _ in tb.telemetry(DEVICE, "seq")]
        assert ts == sorted(ts)
        assert proc.poll() is None
    finally:
        writer.kill()


def test_sigkilled_gateway_delivers_every_row_at_least_once(tb: StandIn, gateway: dict) -> None:
    n = int(os.environ.get("TEG_TEST_KILL_ROWS", "10000"))
    kills = int(os.environ.get("TEG_TEST_KILLS", "3"))
    rig.fill(_queue(gateway), n)
    rng = random.Random(4)
    for _ in range(kills):
        proc = gateway["start"]()
        rig.wait_for(lambda: tb.is_connected(DEVICE), 20, "gateway connected")
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gateway["start"]()
    rig.wait_for(lambda: set(rig.seqs(tb)) >= set(range(n)), 120, "every row delivered after the kills")
    delivered = rig.seqs(tb)
    duplicates = len(delivered) - len(set(delivered))
    print(f"\nSIGKILL test: {n} rows, {kills} kills, {duplicates} duplicates")
    assert set(delivered) == set(range(n))


def test_thingsboard_outage_during_a_drain_loses_nothing(tb: StandIn, gateway: dict) -> None:
    n, outage_s = 30_000, float(os.environ.get("TEG_TEST_OUTAGE_S", "4"))
    rig.fill(_queue(gateway), n)
    gateway["start"](TEG_UPLINK_MAX_INFLIGHT="2")
    rig.wait_for(lambda: len(rig.seqs(tb)) > 0, 20, "drain started")
    _outage(tb, outage_s)
    assert len(rig.seqs(tb)) < n, "the outage must hit the drain midway"  # checked after: the store kept what arrived
    rig.wait_for(lambda: set(rig.seqs(tb)) >= set(range(n)), 90, "every row delivered after the outage")
    assert set(rig.seqs(tb)) == set(range(n))


def test_with_rate_limits_the_gateway_is_never_disconnected_and_still_drains(tb: StandIn, gateway: dict) -> None:
    n = 3_000  # 9,000 data points at 3 per row
    tb.set_limits(messages="50:1,1000:60", telemetry_messages="10:1,300:60", telemetry_data_points="3000:1,60000:60")
    rig.fill(_queue(gateway), n)
    gateway["start"]()
    rig.wait_for(lambda: set(rig.seqs(tb)) >= set(range(n)), 60, "drain under rate limits")
    assert tb.disconnect_reasons(DEVICE) == []
    assert tb.is_connected(DEVICE)


def test_malformed_rows_go_to_dead_letters_and_later_rows_are_delivered(tb: StandIn, gateway: dict) -> None:
    n, bad = 500, (100, 300)
    rig.create_queue(_queue(gateway))
    gateway["start"]()
    writer = rig.writer_process(_queue(gateway), n, per_commit=50, pause_s=0.01, bad=bad)
    assert writer.wait(60) == 0
    good = sorted(set(range(n)) - set(bad))
    rig.wait_for(lambda: rig.seqs(tb) == good, 30, "the good rows delivered")
    conn = sqlite3.connect(_queue(gateway))
    reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letters ORDER BY id")]
    conn.close()
    assert len(reasons) == 4
    assert sum("invalid JSON" in r for r in reasons) == 2 and sum("lacks ts" in r for r in reasons) == 2
    logs = rig.wait_for(lambda: [m for _, m in tb.telemetry(DEVICE, "message") if "dead_letters" in m], 10,
                        "dead letters reported in the gateway log telemetry")
    assert all(m.startswith("GATEWAY - ") for m in logs)


def test_gateway_logs_written_offline_reach_thingsboard_with_severity_and_prefix(
        tb: StandIn, gateway: dict, tmp_path: Path) -> None:
    tb.set_limits()
    buffer = gateway["data"] / "gateway_logs_buffer.db"
    proc = gateway["start"](TB_PORT="1")  # nothing listens on port 1: the gateway stays offline
    rig.wait_for(lambda: buffer.exists() and _log_rows(buffer) > 0, 20, "logs buffered while offline")
    rig.stop(proc)
    gateway["start"]()
    records = rig.wait_for(lambda: [v for _, v in tb.telemetry(DEVICE) if "severity" in v], 20, "log telemetry")
    assert all(v["message"].startswith("GATEWAY - ") for v in records)
    assert {"INFO"} <= {v["severity"] for v in records}
    assert any("gateway started" in v["message"] for v in records)
    rig.wait_for(lambda: _log_rows(buffer) == 0, 20, "acknowledged log records leave the buffer")
    token = (gateway["data"] / "tb_access_token").read_text()
    assert not any(token in json.dumps(v) for v in records)


def _log_rows(buffer: Path) -> int:
    conn = sqlite3.connect(buffer)
    try:
        return conn.execute("SELECT count(*) FROM log_buffer").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
