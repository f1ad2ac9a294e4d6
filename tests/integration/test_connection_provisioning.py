"""The gateway's connection and provisioning against the real stand-in over TLS, with real files.

Only the MQTT component runs (it brings both machines), so these tests need
no Docker; everything else is the real gateway: engine, journal, adapter.
"""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.app import Gateway
from teg_fsm.components.mqtt import MqttComponent
from teg_fsm.config import load_config
from teg_fsm.engine.dispatcher import Dispatched
from tests.rig.protocol import protocol_env
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration
KEY, SECRET, DEVICE = "prov-key-1", "prov-secret-s3cr3t", "teg-test-device"


class Running:
    """A started gateway and the events it dispatched."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._lock = threading.Lock()
        self._events: list[Dispatched] = []
        gateway.dispatcher.observers.append(self._observe)

    def _observe(self, done: Dispatched) -> None:
        with self._lock:
            self._events.append(done)

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [d.event.data for d in self._events if d.event.name == name]

    def state(self, machine: str) -> str:
        return self.gateway.dispatcher.machines[machine].state_name


def make_standin(tls: Any, tls_port: int = 0) -> StandIn:
    return StandIn(host="127.0.0.1", tls_port=tls_port, certfile=str(tls.server_cert), keyfile=str(tls.server_key)).start()


@pytest.fixture
def standin(tls_material: Any) -> Iterator[StandIn]:
    running = make_standin(tls_material)
    yield running
    running.stop()


@pytest.fixture
def start_gateway(tmp_path: Path, tls_material: Any) -> Iterator[Callable[..., Running]]:
    started: list[Gateway] = []

    def start(port: int, **env: str) -> Running:
        config = load_config({
            "TB_HOST": "localhost",
            "TB_PORT": str(port),
            "THINGSBOARD_CA_CERT": str(tls_material.ca_cert),
            "THINGSBOARD_DEVICE_NAME": DEVICE,
            "THINGSBOARD_ACCESS_TOKEN": str(tmp_path / "tb_access_token"),
            "TEG_DATA_PATH": str(tmp_path / "data"),
            "TEG_RECONNECT_MIN_S": "0.2",
            "TEG_RECONNECT_MAX_S": "1",
            **protocol_env(),
            **env,
        })
        gateway = Gateway(config, components=lambda g: [MqttComponent(g)])
        running = Running(gateway)
        gateway.start()
        started.append(gateway)
        return running

    yield start
    for gateway in started:
        gateway.stop()


def provisioning_env() -> dict[str, str]:
    return {"THINGSBOARD_PROVISION_DEVICE_KEY": KEY, "THINGSBOARD_PROVISION_DEVICE_SECRET": SECRET}


def journal_text(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return "\n".join(db.iterdump())


def assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_first_start_without_token_self_provisions_writes_a_0600_token_and_connects_with_it(
    standin: StandIn, start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    standin.add_provision_profile(KEY, SECRET)
    gw = start_gateway(standin.tls_port, **provisioning_env())
    wait_for(lambda: gw.state("connection") == "online", what="online")
    token_file = tmp_path / "tb_access_token"
    token = token_file.read_text()
    assert standin.devices()[DEVICE] == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tb_access_token")] == []  # no temp file left
    assert wait_for(lambda: standin.is_connected(DEVICE))
    assert wait_for(lambda: standin.client_attributes(DEVICE).get("teg_gateway")) == "TEG-FSM"
    assert gw.state("provisioning") == "provisioned"
    gw.gateway.stop()
    assert_no_secret([journal_text(gw.gateway.config.journal_db), caplog.text], [SECRET, token])
    assert "provision_succeeded" in journal_text(gw.gateway.config.journal_db)


def test_a_rejected_token_is_moved_aside_kept_and_the_device_reprovisioned(
    standin: StandIn, start_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    standin.add_provision_profile(KEY, SECRET)
    (tmp_path / "tb_access_token").write_text("revoked-token-123\n")
    gw = start_gateway(standin.tls_port, **provisioning_env())
    wait_for(lambda: gw.state("connection") == "online", what="online again")
    kept = list(tmp_path.glob("tb_access_token.rejected-*"))
    assert len(kept) == 1 and kept[0].read_text() == "revoked-token-123\n"
    new_token = (tmp_path / "tb_access_token").read_text()
    assert new_token == standin.devices()[DEVICE] != "revoked-token-123"
    assert any(e.get("not_authorized") for e in gw.events("connect_failed"))
    gw.gateway.stop()
    assert_no_secret([journal_text(gw.gateway.config.journal_db), caplog.text], [SECRET, new_token])


def test_refused_provisioning_is_retried_with_backoff_and_thingsboards_error_logged(
    standin: StandIn, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    gw = start_gateway(standin.tls_port, **provisioning_env())  # no such profile: NOT_FOUND
    wait_for(lambda: len(gw.events("provision_succeeded")) >= 2, what="a retried provisioning")
    answers = gw.events("provision_succeeded")
    assert {a["result"]["status"] for a in answers} == {"NOT_FOUND"}
    assert "Provision data was not found!" in caplog.text
    assert gw.state("connection") == "offline"


def test_a_stopped_and_restarted_server_leads_to_backoff_and_a_reconnect(
    standin: StandIn, start_gateway: Any, tmp_path: Path, tls_material: Any
) -> None:
    standin.add_device(DEVICE, token="known-token")
    (tmp_path / "tb_access_token").write_text("known-token")
    gw = start_gateway(standin.tls_port)
    wait_for(lambda: gw.state("connection") == "online", what="online")
    port = standin.tls_port
    standin.stop()
    wait_for(lambda: len(gw.events("connect_failed")) >= 2, what="failed reconnects while the server is down")
    assert gw.state("connection") in ("backoff", "connecting")
    assert gw.events("mqtt_disconnected")
    again = make_standin(tls_material, tls_port=port)
    try:
        again.add_device(DEVICE, token="known-token")
        wait_for(lambda: again.is_connected(DEVICE), what="reconnected")
        wait_for(lambda: len(gw.events("connect_succeeded")) == 2, what="a second session")
    finally:
        gw.gateway.stop()
        again.stop()


def test_on_connect_the_session_limits_and_shared_attributes_are_broadcast(
    standin: StandIn, start_gateway: Any, tmp_path: Path
) -> None:
    standin.add_device(DEVICE, token="known-token")
    standin.set_shared(DEVICE, {"sw_title": "controller", "sw_version": "v1.0.0", "FILES": {"a": {"path": "x"}}})
    standin.set_session_limits(max_payload_size=32768, max_inflight_messages=50, messages="100:1",
                               telemetry_messages="50:1", telemetry_data_points="500:1")
    (tmp_path / "tb_access_token").write_text("known-token")
    gw = start_gateway(standin.tls_port)
    limits = wait_for(lambda: gw.events("session_limits_received"), what="session limits")[0]
    assert limits == {"maxPayloadSize": 32768, "maxInflightMessages": 50,
                      "rateLimits": {"messages": "100:1", "telemetryMessages": "50:1", "telemetryDataPoints": "500:1"}}
    shared = wait_for(lambda: gw.events("shared_attributes_received"), what="shared attributes")[0]
    assert shared["shared"] == {"sw_title": "controller", "sw_version": "v1.0.0", "FILES": {"a": {"path": "x"}}}
