"""SIGTERM ends `teg run` cleanly: the gateway subprocess is draining a backlog to the stand-in
(TLS) when it gets the signal; it must stop taking work, flush, close its databases and exit 0
within 20 s (systemd's stop budget), leaving intact databases from which a restart delivers every row.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from teg_fsm.app import Gateway
from teg_fsm.components.mqtt import MqttComponent
from teg_fsm.config import load_config
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.journal import read_journal
from tests.integration import uplink_rig as rig
from tests.rig.protocol import protocol_env
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration
DEVICE = "sigterm-station"
ROWS = 100_000
STOP_BUDGET_S = 20.0


@pytest.fixture
def tb() -> Iterator[StandIn]:
    with StandIn(tls_port=0) as standin:
        yield standin


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_sigterm_during_a_drain_exits_0_within_20_s_with_intact_databases(tb: StandIn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    rig.fill(data / "communication_queue.db", ROWS)
    # No Docker engine behind DOCKER_HOST: the default controller component must not touch the shared one.
    env = rig.gateway_env(tb, data, tb.add_device(DEVICE), THINGSBOARD_DEVICE_NAME=DEVICE,
                          DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    log_path = tmp_path / "gateway.log"
    proc = rig.start_gateway(env, log_path)
    try:
        rig.wait_for(lambda: tb.telemetry_count(DEVICE) >= 5_000, 30, "the drain under way")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        at_signal = tb.telemetry_count(DEVICE)
        code = proc.wait(STOP_BUDGET_S + 5)
        took = time.monotonic() - signalled
    finally:
        rig.stop(proc)
    print(f"\nSIGTERM with {ROWS - at_signal} of {ROWS} rows still to send: exit {code} after {took:.2f} s")
    assert at_signal < ROWS, "the signal must hit the drain midway"
    assert code == 0
    assert took < STOP_BUDGET_S

    log = log_path.read_text()
    assert "signal SIGTERM: stopping" in log and "Traceback" not in log
    # Stopped taking work: one session, ended by the gateway's own DISCONNECT (no reconnect while stopping).
    assert len(tb.events(DEVICE, "connected")) == 1
    assert tb.disconnect_reasons(DEVICE) == ["client_disconnect"]

    journal = data / "teg_journal.db"
    for db in (journal, data / "communication_queue.db", data / "gateway_archive.db", data / "gateway_logs_buffer.db"):
        assert _integrity(db) == "ok", db.name
    assert any(entry.name == "gateway_started" for entry in read_journal(journal))

    # What was flushed is consistent: a restarted gateway delivers every row (at least once).
    proc = rig.start_gateway(env, log_path)
    try:
        rig.wait_for(lambda: set(rig.seqs(tb, DEVICE)) >= set(range(ROWS)), 60, "every row delivered after the restart")
    finally:
        rig.stop(proc)
    delivered = rig.seqs(tb, DEVICE)
    print(f"after the restart: {len(delivered) - ROWS} duplicates")
    assert set(delivered) == set(range(ROWS))


class SlowToStop:
    """A component whose stop takes a while, as the controller's does while an engine call finishes."""

    name = "slow"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def machine_specs(self) -> list[MachineSpec]:
        return []

    def install(self) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None:
        time.sleep(1.5)


def test_a_stopping_gateway_does_not_reconnect_while_its_other_components_stop(tb: StandIn, tmp_path: Path) -> None:
    token = tmp_path / "tb_access_token"
    token.write_text(tb.add_device(DEVICE))
    config = load_config({
        "TB_HOST": "127.0.0.1", "TB_PORT": str(tb.tls_port), "TEG_TLS": "1", "THINGSBOARD_CA_CERT": str(tb.cafile),
        "THINGSBOARD_ACCESS_TOKEN": str(token), "THINGSBOARD_DEVICE_NAME": DEVICE,
        "TEG_DATA_PATH": str(tmp_path / "data"), "TEG_RECONNECT_MIN_S": "0.1", "TEG_RECONNECT_MAX_S": "0.2",
        **protocol_env(),
    })
    gateway = Gateway(config, components=lambda g: [SlowToStop(g), MqttComponent(g)])  # MQTT stops first
    gateway.start()
    try:
        rig.wait_for(lambda: tb.is_connected(DEVICE), 20, "connected")
    finally:
        gateway.stop()
    assert not tb.is_connected(DEVICE)
    assert len(tb.events(DEVICE, "connected")) == 1
    assert tb.disconnect_reasons(DEVICE) == ["client_disconnect"]
