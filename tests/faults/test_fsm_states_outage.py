"""Every state change the journal shows reaches ThingsBoard as telemetry, with its own ts, in order.

A real ``teg run`` against the stand-in over TLS (no Docker engine: the
controller machine meets an unreachable engine, which is a state change too).
The gateway connects, drains a queue (the uplink's busy/idle churn), loses
ThingsBoard (the connection machine's retries happen offline), is restarted
while offline (every machine's state at the new start is reported), and meets
ThingsBoard again while more rows are drained.

The journal is the record of what the machines did. From it the test derives
what ThingsBoard must hold for each ``fsm_<machine>_state`` key: at each
``gateway_started`` every machine's state after that event, and each later
move to another state, with the event's ts (1 ms later when an earlier value
of the key already took that ts: ThingsBoard keeps one value per key and ts).
Decision machines must arrive complete and in that order; the uplink, which is
coalesced, must arrive as a subset with its own ts and fewer points than it
made moves. The ``fsm_<machine>`` attributes must equal the final states.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from teg_fsm.components.fsm_report import COALESCED_MACHINES, attribute_key, state_key
from teg_fsm.engine.dispatcher import load_class
from teg_fsm.engine.events import STARTED
from teg_fsm.engine.journal import read_journal
from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

ROWS = 3000
MORE_ROWS = 1500
BAD = ROWS + 700  # a malformed row: a dead letter
CONNECT_FAILED = "connecting to ThingsBoard failed"
INTERVAL_S = 2


def expected_points(journal: Path) -> dict[str, list[tuple[int, str]]]:
    """Per machine, the (ts, state) values ThingsBoard must keep, derived from the journal alone."""
    points: dict[str, list[tuple[int, str]]] = {}

    def add(machine: str, ts: int, state: str) -> None:
        series = points.setdefault(machine, [])
        if series and ts <= series[-1][0]:  # the outbox keeps ts strictly increasing per key
            ts = series[-1][0] + 1
        series.append((ts, state))

    for entry in read_journal(journal):
        if entry.name == STARTED and entry.source == "system":
            states = {}
            for name, spec in entry.data["machines"].items():
                plan = entry.data.get("resumed", {}).get(name)
                cls = load_class(spec["class"])
                states[name] = plan["state"] if plan else cls.initial_state.id
            for t in entry.transitions:
                states[t["machine"]] = t["target"]
            for name, state in states.items():
                add(name, entry.ts_ms, state)
            continue
        for t in entry.transitions:
            if t["source"] != t["target"]:
                add(t["machine"], entry.ts_ms, t["target"])
    return points


def arrived(tb: StandIn, device: str, machine: str) -> list[tuple[int, str]]:
    """What ThingsBoard keeps of the machine's key: one value per ts, first arrival (resends repeat it)."""
    seen: dict[int, str] = {}
    for ts, value in tb.telemetry(device, state_key(machine)):
        seen.setdefault(ts, value)
    return list(seen.items())


def in_arrival_order_increasing(tb: StandIn, device: str, machine: str) -> bool:
    stamps = list(dict.fromkeys(ts for ts, _ in tb.telemetry(device, state_key(machine))))
    return stamps == sorted(stamps)


def final_states(journal: Path) -> dict[str, str]:
    return {machine: series[-1][1] for machine, series in expected_points(journal).items()}


def test_every_state_change_reaches_thingsboard_in_order_across_an_outage_and_a_restart(
        tb: StandIn, tmp_path: Path) -> None:
    device = f"fsm-{uuid.uuid4().hex[:6]}"
    data = tmp_path / "data"
    journal = data / "teg_journal.db"
    env = uplink_rig.gateway_env(tb, data, tb.add_device(device), THINGSBOARD_DEVICE_NAME=device,
                                 DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock",
                                 TEG_FSM_REPORT_INTERVAL_S=str(INTERVAL_S), TEG_UPLINK_BATCH_ROWS="50",
                                 # No read coalescing: the uplink must churn (one move per small batch)
                                 # for the report's own coalescing to have something to do.
                                 TEG_UPLINK_COALESCE_MS="0",
                                 # The file sync's periodic check moves its machine throughout the test
                                 # (it has a file to check, below): every check below must hold while
                                 # the gateway is not at rest.
                                 TEG_FILE_CHECK_INTERVAL_S="1")
    tb.set_shared(device, {"FILES": {"probe": {"path": "$DATA_PATH/probe.txt"}}, "FILE_CONTENT_probe": "checked"})
    uplink_rig.fill(data / "communication_queue.db", ROWS)
    proc = uplink_rig.start_gateway(env, tmp_path / "gateway.log")
    gateway = rig.FaultedGateway(tb, device, proc, data, tmp_path / "gateway.log")
    try:
        rig.wait_until_rpc_ready(gateway, 30)
        rig.assert_rows_arrived(tb, device, range(ROWS), timeout=60)

        # ThingsBoard goes away: the connection machine's retries are made offline ...
        tb.down()
        wait_for(lambda: gateway.log_text().count(CONNECT_FAILED) >= 3, 30, "connect failures offline")
        # ... and the gateway restarts while still offline
        uplink_rig.stop(gateway.proc)
        gateway.proc = uplink_rig.start_gateway(env, tmp_path / "gateway.log")
        wait_for(lambda: gateway.log_text().split("signal SIGTERM")[-1].count(CONNECT_FAILED) >= 3,
                 30, "the restarted gateway offline")
        tb.up()
        rig.wait_until_rpc_ready(gateway, 30)
        # a controller writing small commits: the uplink goes idle -> draining -> idle for each
        writer = uplink_rig.writer_process(data / "communication_queue.db", MORE_ROWS, start=ROWS, per_commit=10,
                                           pause_s=0.04, bad=(BAD,))
        assert writer.wait(60) == 0
        delivered = [i for i in range(ROWS + MORE_ROWS) if i != BAD]
        rig.assert_rows_arrived(tb, device, delivered, timeout=60)

        decisions = [m for m in expected_points(journal) if m not in COALESCED_MACHINES]
        assert {"connection", "controller", "uplink"} <= set(expected_points(journal))
        for machine in decisions:
            wait_for(lambda m=machine: arrived(tb, device, m) == expected_points(journal)[m], 30,
                     f"every {machine} state change delivered with its ts")
            assert in_arrival_order_increasing(tb, device, machine), tb.telemetry(device, state_key(machine))
        expected = expected_points(journal)
        restarts = [e.ts_ms for e in read_journal(journal) if e.name == STARTED]
        assert len(restarts) == 2
        offline = [p for p in expected["connection"] if restarts[0] < p[0] and p[1] != "connected"]
        assert len(offline) >= 4, expected["connection"]  # moves made while ThingsBoard was away arrived too

        # The uplink, coalesced: each point it sent is one of its moves (own ts), far fewer than it made.
        # Its last state, not necessarily its last move: a held move back to the state last reported is
        # not said again (fsm_report.StateReporter.flush), so idle -> draining -> idle within one window
        # leaves the earlier idle point as the last one.
        wait_for(lambda: [s for _, s in arrived(tb, device, "uplink")[-1:]]
                 == [s for _, s in expected_points(journal)["uplink"][-1:]],
                 INTERVAL_S * 10, "the uplink's last state delivered")
        sent, uplink_moves = arrived(tb, device, "uplink"), expected_points(journal)["uplink"]
        assert set(sent) <= set(uplink_moves), sorted(set(sent) - set(uplink_moves))
        print(f"uplink: {len(uplink_moves)} moves in the journal, {len(sent)} points sent")
        assert len(uplink_moves) > 3 * len(sent), (len(uplink_moves), len(sent))
        assert in_arrival_order_increasing(tb, device, "uplink")

        # The attributes say the final states (as the fsm_state RPC does). The file sync's periodic check
        # may start a scan at any moment, so each look compares one fresh reading of the
        # journal with one of ThingsBoard / the RPC: they must agree at a moment the gateway is at rest.
        def attributes_match_journal() -> bool:
            finals = final_states(journal)
            return {m: tb.client_attributes(device).get(attribute_key(m)) for m in finals} == finals

        def rpc_matches_journal() -> bool:
            answer: Any = gateway.ask("fsm_state")
            return {m: info["state"] for m, info in answer.items()} == final_states(journal)

        wait_for(attributes_match_journal, INTERVAL_S * 10, "fsm_<machine> attributes equal the final states")
        wait_for(rpc_matches_journal, INTERVAL_S * 10, "the fsm_state RPC equals the journal's final states",
                 interval=0.2)
        wait_for(lambda: 2 in [v for _, v in tb.telemetry(device, "queue_dead_letters")], INTERVAL_S * 10,
                 "the dead letters counted")  # the malformed row and the row without ts
        wait_for(lambda: [v for _, v in tb.telemetry(device, "queue_depth")][-1:] == [0], INTERVAL_S * 10,
                 "an empty queue reported")
        rig.finish(gateway, expected_seqs=delivered)
    except BaseException:
        print(gateway.log_text()[-6000:])
        for machine, series in expected_points(journal).items():
            print(machine, "expected:", series[-12:], "arrived:", arrived(tb, device, machine)[-12:])
        raise
    finally:
        uplink_rig.stop(gateway.proc)
