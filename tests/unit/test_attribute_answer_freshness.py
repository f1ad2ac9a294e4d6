"""An attribute answer never undoes a shared-attribute push that arrived while the request was out.

ThingsBoard answers an attribute request from its store and pushes shared-attribute
updates from the device actor; on one session the two can cross, so the answer
may be a snapshot from before the push (PROTOCOL.md §2.2, §2.3). Seen in the
field as an OTA assignment pushed just after a reconnect and then "unassigned"
by the late answer to the on-connect request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from teg_fsm.adapters.mqtt_inbound import Inbound

PUSH = "v1/devices/me/attributes"
KEYS = ("sw_title", "sw_version", "sw_url", "FILES")
TEXT_KEYS = KEYS[:3]  # values the edge checks only for being text


class Answer:
    def __init__(self) -> None:
        self.result: Any = None

    def succeed(self, result: Any) -> bool:
        self.result = result
        return True

    def fail(self, error: str) -> bool:
        raise AssertionError(error)


def _inbound(tmp_path: Path) -> tuple[Inbound, list[tuple[str, dict[str, Any]]]]:
    posted: list[tuple[str, dict[str, Any]]] = []
    return Inbound(lambda name, data: posted.append((name, data)), tmp_path / "token"), posted


def _ask(inbound: Inbound) -> tuple[int, Answer]:
    answer = Answer()
    return inbound.expect("attributes", 1, answer, KEYS), answer


def _send(inbound: Inbound, topic: str, body: Any) -> None:
    inbound.handle(1, topic, json.dumps(body).encode())


def test_a_push_during_the_request_wins_over_the_answers_older_value(tmp_path: Path) -> None:
    inbound, posted = _inbound(tmp_path)
    request_id, answer = _ask(inbound)
    _send(inbound, PUSH, {"sw_version": "v2", "sw_title": "controller"})
    _send(inbound, f"{PUSH}/response/{request_id}", {"shared": {"sw_version": "v1", "sw_title": "controller"}})
    assert answer.result["shared"] == {"sw_version": "v2", "sw_title": "controller"}
    assert posted[0][0] == "shared_attributes_updated"  # the push itself still reaches the machines


def test_a_deletion_during_the_request_removes_the_key_from_the_answer(tmp_path: Path) -> None:
    inbound, _ = _inbound(tmp_path)
    request_id, answer = _ask(inbound)
    _send(inbound, PUSH, {"deleted": ["sw_version"]})
    _send(inbound, f"{PUSH}/response/{request_id}", {"shared": {"sw_version": "v1", "FILES": {}}})
    assert answer.result["shared"] == {"FILES": {}}


def test_pushes_before_the_request_and_keys_not_asked_for_leave_the_answer_alone(tmp_path: Path) -> None:
    inbound, _ = _inbound(tmp_path)
    _send(inbound, PUSH, {"sw_version": "v0"})
    request_id, answer = _ask(inbound)
    _send(inbound, PUSH, {"FILE_CONTENT_x": "text"})
    _send(inbound, f"{PUSH}/response/{request_id}", {"shared": {"sw_version": "v1"}})
    assert answer.result["shared"] == {"sw_version": "v1"}


_values = st.dictionaries(st.sampled_from(TEXT_KEYS + ("other",)), st.text(max_size=3), max_size=3)
_pushes = st.lists(st.tuples(_values, st.lists(st.sampled_from(KEYS + ("other",)), max_size=2)), max_size=5)


@given(answer_values=st.dictionaries(st.sampled_from(TEXT_KEYS), st.text(max_size=3)), pushes=_pushes)
def test_the_answer_equals_the_answer_replayed_with_every_later_push(
    tmp_path_factory: Any, answer_values: dict[str, str], pushes: list[tuple[dict[str, str], list[str]]]
) -> None:
    inbound, _ = _inbound(tmp_path_factory.mktemp("inbound"))
    request_id, answer = _ask(inbound)
    expected = dict(answer_values)
    for values, deleted in pushes:
        _send(inbound, PUSH, {**values, "deleted": deleted})
        expected.update({k: v for k, v in values.items() if k in KEYS})  # ThingsBoard applies values, then deletions
        for key in deleted:
            if key in KEYS:
                expected.pop(key, None)
    _send(inbound, f"{PUSH}/response/{request_id}", {"shared": answer_values})
    assert answer.result["shared"] == expected
