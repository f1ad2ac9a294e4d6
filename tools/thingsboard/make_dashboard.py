"""Write the TEG-FSM ThingsBoard dashboard (``teg-fsm-dashboard.json``) from the machine classes.

Run ``python -m tools.thingsboard.make_dashboard`` after a machine gains, loses
or renames a state: the State charts map each state name to a row of the
chart, and a state missing from the map is not drawn. ``--check`` exits 1 when
the file on disk differs (tests/unit/test_thingsboard_dashboard.py runs it).

The format is ThingsBoard's dashboard export (3.7 and later, the first with the
ECharts ``state_chart`` and ``time_series_chart``): widgets by ``typeFullFqn``,
entity aliases, a key filter, dashboard states. tools/thingsboard/README.md
names the sources followed and the widgets used.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import uuid
from pathlib import Path
from typing import Any

from teg_fsm.components.fsm_report import attribute_key, state_key
from teg_fsm.engine.machine import GatewayMachine

OUT = Path(__file__).resolve().parent / "teg-fsm-dashboard.json"
TITLE = "TEG-FSM gateways"
# Machines shown first, in this order; any other machine follows by name.
ORDER = ("connection", "ota", "controller", "uplink", "file_sync", "provisioning", "health", "rpc")
FLEET_STATE, GATEWAY_STATE = "default", "gateway"
SW_STATES = ("QUEUED", "INITIATED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED", "FAILED")
RPC_BUTTONS = (("ping", "Ping"), ("restart_controller", "Restart controller"))
NAMESPACE = uuid.UUID("6f1c1f7e-5d2a-4f0e-9a57-1e2c7a3b9d10")  # stable ids: the file only changes when content does


def machine_states() -> dict[str, list[str]]:
    """Every machine the gateway runs (found in ``teg_fsm.machines``) and its states, in declaration order."""
    import teg_fsm.machines as package

    found: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            name = cls.__dict__.get("machine_name")
            if issubclass(cls, GatewayMachine) and isinstance(name, str) and name:
                found[name] = [state.id for state in cls.states]
    ranked = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {name: found[name] for name in ranked}


def _id(*parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "/".join(parts)))


def _key(name: str, kind: str, label: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "label": label, "color": "#2196f3", "settings": settings,
            "_hash": 0.5, "units": None, "decimals": None, "funcBody": None,
            "usePostProcessing": None, "postFuncBody": None}


def _datasource(alias_id: str, keys: list[dict[str, Any]], filter_id: str | None = None) -> dict[str, Any]:
    return {"type": "entity", "name": None, "entityAliasId": alias_id, "filterId": filter_id, "dataKeys": keys}


def _widget(fqn: str, kind: str, title: str, size: tuple[int, int], config: dict[str, Any]) -> dict[str, Any]:
    return {"typeFullFqn": f"system.{fqn}", "type": kind, "sizeX": size[0], "sizeY": size[1],
            "id": _id("widget", title),
            "config": {"title": title, "showTitle": True, "dropShadow": True, "enableFullscreen": True,
                       "useDashboardTimewindow": True, "showLegend": False, "actions": {}, **config}}


# -- the widgets --------------------------------------------------------------------


def current_states(alias: str, machines: list[str]) -> dict[str, Any]:
    keys = [_key(attribute_key(m), "attribute", m) for m in machines]
    return _widget("cards.attributes_card", "latest", "Machine states now (fsm_<machine>)", (8, 6),
                   {"datasources": [_datasource(alias, keys)], "settings": {}})


def state_chart(alias: str, machine: str, states: list[str]) -> dict[str, Any]:
    # The State chart maps each string value to a row (ThingsBoard's TimeSeriesChartStateValueConverter:
    # constant states by sourceValue); "end" steps hold a state until the next change.
    rows = [{"label": s, "value": i, "sourceType": "constant", "sourceValue": s} for i, s in enumerate(states)]
    key = _key(state_key(machine), "timeseries", machine, type="line", showInLegend=False,
               lineSettings={"showLine": True, "step": True, "stepType": "end", "smooth": False, "showPoints": True,
                             "pointSize": 6})
    return _widget("state_chart", "timeseries", f"{machine} state timeline", (8, max(3, 1 + len(states) // 3)),
                   {"datasources": [_datasource(alias, [key])],
                    "settings": {"states": rows, "dataZoom": True, "showLegend": False, "showTooltip": True}})


def ota_progress(alias: str) -> list[dict[str, Any]]:
    rows = [{"label": s, "value": i, "sourceType": "constant", "sourceValue": s} for i, s in enumerate(SW_STATES)]
    chart = _widget("state_chart", "timeseries", "OTA progress (sw_state)", (8, 4), {
        "datasources": [_datasource(alias, [_key("sw_state", "timeseries", "sw_state", type="line",
                                                  lineSettings={"step": True, "stepType": "end", "showPoints": True})])],
        "settings": {"states": rows, "dataZoom": True, "showLegend": False}})
    table = _widget("cards.timeseries_table", "timeseries", "OTA reports (sw_state, sw_error)", (16, 4), {
        "datasources": [_datasource(alias, [
            _key("sw_state", "timeseries", "sw_state"), _key("sw_error", "timeseries", "sw_error"),
            _key("current_sw_version", "timeseries", "running version")])],
        "settings": {"showTimestamp": True, "displayPagination": True, "defaultPageSize": 10, "hideEmptyLines": True,
                     "dateFormat": {"format": "yyyy-MM-dd HH:mm:ss"}}})
    return [chart, table]


def queue_chart(alias: str) -> dict[str, Any]:
    keys = [_key("queue_depth", "timeseries", "rows not yet delivered", type="line",
                 lineSettings={"step": True, "stepType": "end"}),
            _key("queue_dead_letters", "timeseries", "dead letters", type="line",
                 lineSettings={"step": True, "stepType": "end"})]
    return _widget("time_series_chart", "timeseries", "Queue depth and dead letters", (12, 5),
                   {"datasources": [_datasource(alias, keys)], "settings": {"showLegend": True, "dataZoom": True}})


def logs_table(alias: str) -> dict[str, Any]:
    keys = [_key("severity", "timeseries", "severity"), _key("message", "timeseries", "message")]
    return _widget("cards.timeseries_table", "timeseries", "Gateway logs", (12, 5), {
        "datasources": [_datasource(alias, keys)],
        "settings": {"showTimestamp": True, "displayPagination": True, "defaultPageSize": 20, "hideEmptyLines": True,
                     "enableSearch": True, "dateFormat": {"format": "yyyy-MM-dd HH:mm:ss.SSS"}}})


def rpc_button(alias: str, method: str, text: str) -> dict[str, Any]:
    widget = _widget("control_widgets.rpcbutton", "rpc", text, (4, 2), {
        "targetDevice": {"type": "entity", "entityAliasId": alias},
        "settings": {"methodName": method, "methodParams": "{}", "oneWayElseTwoWay": False, "requestTimeout": 10000,
                     "buttonText": text, "showError": True, "styleButton": {"isRaised": True, "isPrimary": True}}})
    widget["config"]["showTitle"] = False
    return widget


def rpc_terminal(alias: str) -> dict[str, Any]:
    return _widget("control_widgets.rpc_debug_terminal", "rpc", "RPC (list, fsm_state, ota_retry, ...)", (8, 4), {
        "targetDevice": {"type": "entity", "entityAliasId": alias}, "settings": {"requestTimeout": 10000}})


def fleet_table(alias: str, filter_id: str, machines: list[str]) -> dict[str, Any]:
    first = ("ota", "controller")
    ordered = [m for m in first if m in machines] + [m for m in machines if m not in first]
    keys = [_key(attribute_key(m), "attribute", m) for m in ordered]
    keys += [_key("current_sw_version", "timeseries", "running version"), _key("sw_state", "timeseries", "sw_state")]
    widget = _widget("cards.entities_table", "latest", "Gateways by OTA and controller state", (24, 12), {
        "datasources": [_datasource(alias, keys, filter_id)],
        "settings": {"entitiesTitle": "TEG-FSM gateways", "enableSearch": True, "displayEntityName": True,
                     "entityNameColumnTitle": "Gateway", "displayPagination": True, "defaultPageSize": 20,
                     "defaultSortOrder": attribute_key("ota"), "enableSelectColumnDisplay": True,
                     "enableStickyHeader": True}})
    widget["config"]["actions"] = {"rowClick": [{
        "name": "Open gateway", "icon": "open_in_new", "type": "openDashboardState",
        "targetDashboardStateId": GATEWAY_STATE, "setEntityId": True, "stateEntityParamName": None,
        "openInSeparateDialog": False, "openRightLayout": False, "id": _id("action", "open gateway")}]}
    return widget


# -- the dashboard ------------------------------------------------------------------


def _layout(widgets: list[dict[str, Any]]) -> dict[str, Any]:
    """Place widgets left to right on ThingsBoard's 24-column grid."""
    placed, row, col, row_height = {}, 0, 0, 0
    for w in widgets:
        if col + w["sizeX"] > 24:
            row, col, row_height = row + row_height, 0, 0
        w["row"], w["col"] = row, col
        placed[w["id"]] = {"sizeX": w["sizeX"], "sizeY": w["sizeY"], "row": row, "col": col}
        col += w["sizeX"]
        row_height = max(row_height, w["sizeY"])
    return {"main": {"widgets": placed, "gridSettings": {
        "backgroundColor": "#eeeeee", "columns": 24, "margin": 10, "outerMargin": True,
        "backgroundSizeMode": "100%", "autoFillHeight": False, "mobileAutoFillHeight": False, "mobileRowHeight": 70}}}


def dashboard() -> dict[str, Any]:
    states = machine_states()
    machines = list(states)
    fleet, one = _id("alias", "fleet"), _id("alias", "gateway")
    teg_only = _id("filter", "teg")
    fleet_widgets = [fleet_table(fleet, teg_only, machines)]
    gateway_widgets = [current_states(one, machines)]
    gateway_widgets += [rpc_button(one, method, text) for method, text in RPC_BUTTONS]
    gateway_widgets += [rpc_terminal(one)]
    gateway_widgets += [state_chart(one, m, s) for m, s in states.items() if len(s) > 1]
    gateway_widgets += ota_progress(one)
    gateway_widgets += [queue_chart(one), logs_table(one)]
    return {
        "title": TITLE,
        "image": None,
        "mobileHide": False,
        "mobileOrder": None,
        "configuration": {
            "description": "TEG-FSM: machine states, OTA, queue and logs of each gateway; generated by "
                           "tools/thingsboard/make_dashboard.py",
            "widgets": {w["id"]: w for w in fleet_widgets + gateway_widgets},
            "states": {
                FLEET_STATE: {"name": TITLE, "root": True, "layouts": _layout(fleet_widgets)},
                GATEWAY_STATE: {"name": "${entityName}", "root": False, "layouts": _layout(gateway_widgets)},
            },
            "entityAliases": {
                fleet: {"id": fleet, "alias": "TEG-FSM gateways",
                        "filter": {"type": "entityType", "resolveMultiple": True, "entityType": "DEVICE"}},
                one: {"id": one, "alias": "Selected gateway",
                      "filter": {"type": "stateEntity", "resolveMultiple": False, "stateEntityParamName": None,
                                 "defaultStateEntity": None}},
            },
            "filters": {
                teg_only: {"id": teg_only, "filter": "TEG-FSM gateways only", "editable": False, "keyFilters": [{
                    "key": {"type": "CLIENT_ATTRIBUTE", "key": "teg_gateway"}, "valueType": "STRING",
                    "predicates": [{"keyFilterPredicate": {
                        "operation": "EQUAL", "value": {"defaultValue": "TEG-FSM", "dynamicValue": None},
                        "ignoreCase": False, "type": "STRING"},
                        "userInfo": {"editable": False, "label": "", "autogeneratedLabel": True, "order": 0}}]}]},
            },
            # State charts and log tables show raw values: no aggregation (AVG of a state name is nothing).
            "timewindow": {"selectedTab": 0, "realtime": {"realtimeType": 0, "interval": 1000,
                                                          "timewindowMs": 86_400_000},
                           "aggregation": {"type": "NONE", "limit": 50_000}},
            "settings": {"stateControllerId": "entity", "showTitle": False, "showDashboardsSelect": True,
                         "showEntitiesSelect": True, "showDashboardTimewindow": True, "showDashboardExport": True,
                         "toolbarAlwaysOpen": True, "showFilters": True},
        },
        "name": TITLE,
        "resources": [],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python -m tools.thingsboard.make_dashboard", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
