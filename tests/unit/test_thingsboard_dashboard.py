"""The ThingsBoard dashboard in tools/thingsboard: current, well-formed, and asking only for what the gateway sends.

Which keys the gateway sends: the existing gateway's keys its users rely on
(tests/fixtures/existing_gateway_keys.json, checked on the stand-in by
tests/integration/test_drop_in_keys.py), plus the keys this gateway adds and
tests elsewhere on the stand-in: ``fsm_<machine>_state`` / ``fsm_<machine>``
and ``queue_depth`` / ``queue_dead_letters``
(tests/faults/test_fsm_states_outage.py), ``sw_error`` (with ``sw_state`` FAILED, e.g.
tests/integration/test_ota_e2e.py),
``teg_gateway`` / ``teg_version`` (the client attributes of every connect,
tests/integration/test_connection_provisioning.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.app import Gateway
from teg_fsm.components.fsm_report import attribute_key, state_key
from teg_fsm.config import load_config
from teg_fsm.machines.rpc_rules import METHODS_BY_NAME
from tools.thingsboard import make_dashboard

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "tools" / "thingsboard" / "teg-fsm-dashboard.json"
README = REPO / "tools" / "thingsboard" / "README.md"
FIXTURE = REPO / "tests" / "fixtures" / "existing_gateway_keys.json"
NEW_TELEMETRY = {"queue_depth", "queue_dead_letters", "sw_error"}
NEW_ATTRIBUTES = {"teg_gateway", "teg_version"}
RPC_ANSWERED_BY_THE_MACHINE = {"list"}  # machines/rpc.py answers it itself


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def gateway_machines(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The machines a real gateway runs (its composition root), not the generator's own discovery."""
    data = tmp_path_factory.mktemp("gw")
    config = load_config({"TB_HOST": "127.0.0.1", "TB_PORT": "1883", "TEG_DATA_PATH": str(data),
                          "THINGSBOARD_ACCESS_TOKEN": str(data / "token"), "TEG_CONTROLLER_DATA_PATH": str(data)})
    gateway = Gateway(config)
    try:
        return [spec.cls.machine_name for spec in gateway.machine_specs()]
    finally:
        gateway.journal.close()


def _widgets(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from dashboard["configuration"]["widgets"].values()


def _data_keys(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for widget in _widgets(dashboard):
        for source in widget["config"].get("datasources") or []:
            for key in source["dataKeys"]:
                yield key["type"], key["name"]


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    assert make_dashboard.main(["--check"]) == 0, "run python -m tools.thingsboard.make_dashboard"


def test_dashboard_has_the_export_shape_thingsboard_imports(dashboard: dict[str, Any]) -> None:
    config = dashboard["configuration"]
    assert dashboard["title"] and set(config) >= {"widgets", "states", "entityAliases", "filters", "timewindow"}
    roots = [s for s in config["states"].values() if s["root"]]
    assert len(roots) == 1
    placed = {wid for state in config["states"].values() for wid in state["layouts"]["main"]["widgets"]}
    assert placed == set(config["widgets"]), "every widget is in a layout and every layout entry is a widget"
    for wid, widget in config["widgets"].items():
        assert widget["id"] == wid
        assert widget["typeFullFqn"].startswith("system.") and widget["type"] in {"timeseries", "latest", "rpc"}
        for source in widget["config"].get("datasources") or []:
            assert source["entityAliasId"] in config["entityAliases"], widget["config"]["title"]
            assert source["filterId"] is None or source["filterId"] in config["filters"]
        if widget["type"] == "rpc":
            assert widget["config"]["targetDevice"]["entityAliasId"] in config["entityAliases"]
    # String states cannot be averaged: the dashboard's time window must not aggregate.
    assert config["timewindow"]["aggregation"]["type"] == "NONE"


def test_dashboard_uses_only_widgets_named_in_the_readme(dashboard: dict[str, Any]) -> None:
    readme = README.read_text()
    for fqn in {w["typeFullFqn"] for w in _widgets(dashboard)}:
        assert f"`{fqn}`" in readme, f"{fqn} is not named in tools/thingsboard/README.md"


def test_dashboard_reads_only_keys_the_gateway_sends(dashboard: dict[str, Any], gateway_machines: list[str]) -> None:
    existing = json.loads(FIXTURE.read_text())
    telemetry = set(existing["telemetry"]) | NEW_TELEMETRY | {state_key(m) for m in gateway_machines}
    attributes = set(existing["client_attributes"]) | NEW_ATTRIBUTES | {attribute_key(m) for m in gateway_machines}
    for kind, name in _data_keys(dashboard):
        assert name in (telemetry if kind == "timeseries" else attributes), f"{kind} {name} is never sent"
    for flt in dashboard["configuration"]["filters"].values():
        for key_filter in flt["keyFilters"]:
            assert key_filter["key"]["type"] == "CLIENT_ATTRIBUTE" and key_filter["key"]["key"] in attributes


def test_dashboard_shows_every_machine_and_charts_each_one_with_its_real_states(
        dashboard: dict[str, Any], gateway_machines: list[str]) -> None:
    keys = set(_data_keys(dashboard))
    assert {("attribute", attribute_key(m)) for m in gateway_machines} <= keys
    charts = {w["config"]["datasources"][0]["dataKeys"][0]["name"]: w for w in _widgets(dashboard)
              if w["typeFullFqn"] == "system.state_chart"}
    states = make_dashboard.machine_states()
    assert set(states) == set(gateway_machines)
    for machine in gateway_machines:
        if len(states[machine]) == 1:
            continue  # a machine with one state (rpc) has no timeline to draw
        mapped = [s["sourceValue"] for s in charts[state_key(machine)]["config"]["settings"]["states"]]
        assert mapped == states[machine]
    for wanted in ("queue_depth", "queue_dead_letters", "sw_state", "sw_error", "severity", "message"):
        assert ("timeseries", wanted) in keys


def test_dashboard_buttons_call_rpc_methods_the_gateway_answers(dashboard: dict[str, Any]) -> None:
    methods = [w["config"]["settings"]["methodName"] for w in _widgets(dashboard)
               if w["typeFullFqn"] == "system.control_widgets.rpcbutton"]
    assert set(methods) == {"ping", "restart_controller"}
    assert set(methods) <= set(METHODS_BY_NAME) | RPC_ANSWERED_BY_THE_MACHINE


def test_fleet_table_lists_gateways_by_ota_and_controller_state(dashboard: dict[str, Any]) -> None:
    config = dashboard["configuration"]
    root = next(s for s in config["states"].values() if s["root"])
    (table_id,) = root["layouts"]["main"]["widgets"]
    table = config["widgets"][table_id]
    assert table["typeFullFqn"] == "system.cards.entities_table"
    names = [k["name"] for k in table["config"]["datasources"][0]["dataKeys"]]
    assert names[:2] == ["fsm_ota", "fsm_controller"]
    assert table["config"]["datasources"][0]["filterId"] in config["filters"]
    (click,) = table["config"]["actions"]["rowClick"]
    assert click["targetDashboardStateId"] in config["states"] and click["setEntityId"]
