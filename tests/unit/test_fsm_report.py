"""The state reporter: which transitions become ThingsBoard telemetry and attributes, and when."""

from __future__ import annotations

import json
from typing import Any

from teg_fsm.components.fsm_report import StateReporter
from teg_fsm.engine.dispatcher import Dispatched
from teg_fsm.engine.effects.mqtt import ATTRIBUTES_TOPIC, TELEMETRY_TOPIC
from teg_fsm.engine.events import STARTED, Event
from teg_fsm.engine.journal import Transition

INTERVAL_MS = 60_000


class Recorder:
    def __init__(self) -> None:
        self.said: list[tuple[str, Any, int]] = []

    def __call__(self, topic: str, payload: str, now_ms: int) -> None:
        self.said.append((topic, json.loads(payload), now_ms))

    def points(self) -> list[tuple[int, str, str]]:
        return [(e["ts"], k, v) for topic, payload, _ in self.said if topic == TELEMETRY_TOPIC
                for e in payload for k, v in e["values"].items()]

    def messages(self, topic: str) -> list[Any]:
        return [payload for t, payload, _ in self.said if t == topic]

    def attributes(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for payload in self.messages(ATTRIBUTES_TOPIC):
            merged.update(payload)
        return merged


def _reporter(states: dict[str, str]) -> tuple[StateReporter, Recorder]:
    recorder = Recorder()
    return StateReporter(recorder, lambda: dict(states), interval_ms=INTERVAL_MS), recorder


def _step(ts: int, name: str, *moves: tuple[str, str, str], source: str = "mqtt") -> Dispatched:
    event = Event(1, ts, source, name)
    return Dispatched(event, [Transition(m, a, b, name) for m, a, b in moves], [])


def test_every_state_change_is_telemetry_with_the_event_ts_and_an_attribute() -> None:
    reporter, said = _reporter({"connection": "online", "ota": "idle"})
    reporter.observe(_step(1000, "ota_assigned", ("ota", "idle", "fetching"), ("ota", "fetching", "building")))
    reporter.observe(_step(2000, "report_succeeded", ("ota", "building", "building")))  # internal: not a change
    assert said.points() == [(1000, "fsm_ota_state", "fetching"), (1000, "fsm_ota_state", "building")]
    assert said.attributes() == {"fsm_ota": "building"}


def test_moves_within_a_second_are_one_telemetry_message_and_nothing_is_lost() -> None:
    reporter, said = _reporter({"connection": "online"})
    for i in range(10):  # a connect: many moves a few ms apart
        a, b = ("connecting", "backoff") if i % 2 == 0 else ("backoff", "connecting")
        reporter.observe(_step(5000 + 5 * i, "x", ("connection", a, b)))
    assert len(said.messages(TELEMETRY_TOPIC)) == 1  # the first went at once, the rest wait
    reporter.flush(5999)
    assert len(said.messages(TELEMETRY_TOPIC)) == 1
    reporter.flush(6000)
    assert len(said.messages(TELEMETRY_TOPIC)) == 2
    assert [ts for ts, _, _ in said.points()] == [5000 + 5 * i for i in range(10)]


def test_start_reports_every_machine_and_a_connect_says_every_attribute() -> None:
    states = {"connection": "connecting", "ota": "probation"}
    reporter, said = _reporter(states)
    reporter.observe(_step(500, STARTED, source="system"))
    assert sorted(said.points()) == [(500, "fsm_connection_state", "connecting"), (500, "fsm_ota_state", "probation")]
    assert said.messages(ATTRIBUTES_TOPIC) == []  # nothing reaches ThingsBoard before the connect, which says them
    said.said.clear()
    states["connection"] = "online"
    reporter.observe(_step(1900, "mqtt_connected", ("connection", "connecting", "online")))
    assert said.points() == [(1900, "fsm_connection_state", "online")]
    assert said.messages(ATTRIBUTES_TOPIC) == [{"fsm_connection": "online", "fsm_ota": "probation"}]


def test_attribute_changes_are_merged_within_an_interval() -> None:
    reporter, said = _reporter({"ota": "idle", "controller": "running"})
    reporter.observe(_step(0, "mqtt_connected"))
    reporter.observe(_step(10_000, "a", ("ota", "idle", "fetching")))
    reporter.observe(_step(20_000, "b", ("ota", "fetching", "building"), ("controller", "running", "swapping")))
    assert len(said.messages(ATTRIBUTES_TOPIC)) == 1
    reporter.flush(INTERVAL_MS)
    assert said.messages(ATTRIBUTES_TOPIC)[1:] == [{"fsm_controller": "swapping", "fsm_ota": "building"}]


def test_stopping_says_everything_held_at_once() -> None:
    reporter, said = _reporter({"ota": "idle"})
    reporter.observe(_step(0, "mqtt_connected"))
    reporter.observe(_step(10, "a", ("ota", "idle", "fetching")))
    reporter.observe(_step(20, "gateway_stopping", ("ota", "fetching", "idle")))
    assert said.points()[-1] == (20, "fsm_ota_state", "idle")
    assert said.attributes() == {"fsm_ota": "idle"}


def test_uplink_churn_is_coalesced_to_one_point_per_interval_with_the_last_state_and_its_ts() -> None:
    reporter, said = _reporter({"uplink": "idle"})
    reporter.observe(_step(0, STARTED, source="system"))
    said.said.clear()
    for i in range(200):  # a drain: idle <-> draining per batch, 10 ms apart
        a, b = ("idle", "draining") if i % 2 == 0 else ("draining", "idle")
        reporter.observe(_step(1000 + 10 * i, "work_changed", ("uplink", a, b)))
    assert said.points() == []  # all inside the first window after the start report
    reporter.flush(INTERVAL_MS)
    # The window's last move (draining -> idle) ends where the start report left it: nothing new to show.
    assert said.points() == []
    reporter.observe(_step(INTERVAL_MS + 1000, "work_changed", ("uplink", "idle", "draining")))
    reporter.observe(_step(INTERVAL_MS + 1010, "work_changed", ("uplink", "draining", "throttled")))
    assert said.points() == [(INTERVAL_MS + 1000, "fsm_uplink_state", "draining")]
    reporter.observe(_step(2 * INTERVAL_MS + 1000, "work_changed", ("uplink", "throttled", "idle")))
    # The held move is replaced by the later one, which arrives after the window: reported at once.
    assert said.points()[1:] == [(2 * INTERVAL_MS + 1000, "fsm_uplink_state", "idle")]
    said.said.clear()
    reporter.observe(_step(3 * INTERVAL_MS + 5000, "work_changed", ("uplink", "idle", "draining")))
    reporter.observe(_step(3 * INTERVAL_MS + 6000, "work_changed", ("uplink", "draining", "throttled")))
    assert said.points() == [(3 * INTERVAL_MS + 5000, "fsm_uplink_state", "draining")]
    reporter.flush(4 * INTERVAL_MS + 4999)
    assert len(said.points()) == 1
    reporter.flush(4 * INTERVAL_MS + 5000)  # the held move goes out with its own ts
    assert said.points()[-1] == (3 * INTERVAL_MS + 6000, "fsm_uplink_state", "throttled")
    assert said.attributes()["fsm_uplink"] == "throttled"


def test_decision_machines_are_never_coalesced() -> None:
    reporter, said = _reporter({"connection": "connecting"})
    for i in range(50):
        a, b = ("connecting", "backoff") if i % 2 == 0 else ("backoff", "connecting")
        reporter.observe(_step(1000 * i, "x", ("connection", a, b)))
    assert len(said.points()) == 50


def test_flush_tells_when_the_next_held_report_is_due_and_none_when_nothing_waits() -> None:
    # The dispatcher sleeps until then (no idle tick): a held move must name its own time.
    reporter, said = _reporter({"uplink": "idle"})
    reporter.observe(_step(0, STARTED, source="system"))
    assert reporter.flush(0) is None
    reporter.observe(_step(1000, "work_changed", ("uplink", "idle", "draining")))  # held: last point at 0
    assert reporter.flush(1000) == 59.0
    assert reporter.flush(30_000) == 30.0
    assert reporter.flush(INTERVAL_MS) is None
    assert said.points()[-1] == (1000, "fsm_uplink_state", "draining")
