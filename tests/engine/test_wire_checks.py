"""ThingsBoard's inbound JSON is checked at the edge: a valid event or a clear rejection, never an exception."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teg_fsm.adapters.mqtt_inbound import Inbound
from teg_fsm.engine import codec
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.machines.file_sync import FileSyncMachine
from teg_fsm.machines.ota import OtaMachine
from teg_fsm.machines.rpc import RpcMachine
from tests.engine.harness import make_engine

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=20)
# Objects that look like shared-attribute pushes: the keys the machines read, with any values.
KEYS = st.sampled_from(["deleted", "FILES", "FILE_CONTENT_a", "sw_version", "sw_title", "sf_version", "sw_size",
                        "colour"])
PUSH = st.dictionaries(KEYS, JSON, max_size=5) | JSON


def _assert_valid_shared_values(values: dict[str, Any]) -> None:
    for name in codec.STRING_ATTRIBUTES & set(values):
        assert values[name] is None or isinstance(values[name], str)
    if "FILES" in values:
        assert isinstance(values["FILES"], dict) and all(isinstance(v, dict) for v in values["FILES"].values())
    for name in codec.COUNT_ATTRIBUTES & set(values):
        size = values[name]
        assert size is None or (type(size) is int and size >= 0), size


@settings(max_examples=300, deadline=None)
@given(PUSH)
def test_any_json_push_becomes_a_valid_update_or_a_named_rejection(body: Any) -> None:
    checked = codec.shared_update_from_wire(body)
    assert all(isinstance(e, str) and ("must" in e or "not valid JSON" in e) for e in checked.errors)
    if checked.data is None:
        assert checked.errors
        return
    assert all(isinstance(name, str) for name in checked.data["deleted"])
    _assert_valid_shared_values(checked.data["values"])
    assert checked.data.get("rejected", []) == list(checked.errors)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(KEYS, JSON, max_size=5))
def test_whatever_passes_the_edge_never_raises_in_file_sync_or_ota(tmp_path_factory: pytest.TempPathFactory,
                                                                    body: dict[str, Any]) -> None:
    checked = codec.shared_update_from_wire(body)
    assert checked.data is not None
    dispatcher, _, _ = make_engine([MachineSpec(FileSyncMachine), MachineSpec(OtaMachine)])
    dispatcher.post("mqtt", "shared_attributes_updated", checked.data)
    dispatcher.post("system", "shared_attributes_received", {"client": {}, "shared": checked.data["values"]})
    for done in dispatcher.run_until_idle():
        assert all(t.error is None for t in done.transitions), done.transitions


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_attribute_answer_has_the_client_and_shared_sections(body: Any) -> None:
    checked = codec.attributes_answer_from_wire(body)
    assert checked.data is not None
    assert isinstance(checked.data["client"], dict) and isinstance(checked.data["shared"], dict)
    _assert_valid_shared_values(checked.data["shared"])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12) | st.integers().map(str), JSON | st.fixed_dictionaries({"method": JSON, "params": JSON}))
def test_any_rpc_request_becomes_a_valid_event_or_a_named_rejection(raw_id: str, body: Any) -> None:
    checked = codec.rpc_request_from_wire(raw_id, body)
    if checked.data is None:
        assert len(checked.errors) == 1 and checked.errors[0]
        return
    assert isinstance(checked.data["request_id"], int) and isinstance(checked.data["method"], str)


METHODS = st.sampled_from(["ping", "list", "run_command", "archive_republish_messages", "restart_controller",
                           "init_files", "ota_retry", "no_such_method"])


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=1, max_value=10**6), METHODS, JSON)
def test_any_params_of_a_known_method_are_answered_never_raise_in_the_rpc_machine(
    request_id: int, method: str, params: Any
) -> None:
    checked = codec.rpc_request_from_wire(str(request_id), {"method": method, "params": params})
    assert checked.data is not None
    dispatcher, _, _ = make_engine([MachineSpec(RpcMachine)])
    dispatcher.post("mqtt", "rpc_requested", checked.data)
    answered, *handed_over = dispatcher.run_until_idle()
    assert answered.effects, answered  # a reply, a worker job or a hand-over: never silence
    assert all(t.error is None for done in [answered, *handed_over] for t in done.transitions)


def test_the_field_push_is_rejected_by_element_and_the_rest_of_the_update_still_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    posted: list[tuple[str, dict[str, Any]]] = []
    inbound = Inbound(lambda name, data: posted.append((name, data)), tmp_path / "token")
    body = {"deleted": [1, "sw_url", {"a": 1}], "FILES": {"good": {"path": "a.txt"}, "bad": 5}, "sw_version": [1]}
    with caplog.at_level(logging.ERROR):
        inbound.handle(1, "v1/devices/me/attributes", json.dumps(body).encode())
    [(name, data)] = posted
    assert name == "shared_attributes_updated"
    assert data["deleted"] == ["sw_url"] and data["values"] == {"FILES": {"good": {"path": "a.txt"}}}
    for field in ("deleted[0]", "deleted[2]", "FILES.bad", "sw_version"):
        assert any(field in message for message in caplog.messages), field


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0) | st.none(), JSON)
def test_sw_size_passes_as_a_non_negative_integer_and_anything_else_is_dropped_by_name(size: Any, other: Any) -> None:
    good = codec.attributes_answer_from_wire({"shared": {"sw_size": size, "sw_version": "v2"}})
    assert good.data is not None and good.data["shared"] == {"sw_size": size, "sw_version": "v2"} and not good.errors
    bad = other if not (other is None or (type(other) is int and other >= 0)) else str(other)
    checked = codec.attributes_answer_from_wire({"shared": {"sw_size": bad, "sw_version": "v2"}})
    assert checked.data is not None and checked.data["shared"] == {"sw_version": "v2"}  # the rest goes through
    [error] = checked.errors
    assert error.startswith("sw_size: must be a non-negative integer, got ")


@pytest.mark.parametrize("size,said", [("4096", "a string"), (-1, "-1"), (4096.0, "the non-integer number 4096.0"),
                                       (True, "a boolean"), ([4096], "a list")])
def test_a_mistyped_sw_size_is_named_with_what_came(size: Any, said: str) -> None:
    checked = codec.shared_update_from_wire({"sw_size": size, "sw_checksum": "ab"})
    assert checked.errors == (f"sw_size: must be a non-negative integer, got {said}",)
    assert checked.data is not None and checked.data["values"] == {"sw_checksum": "ab"}


def test_a_push_that_is_not_an_object_posts_nothing_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    posted: list[Any] = []
    inbound = Inbound(lambda name, data: posted.append(name), tmp_path / "token")
    with caplog.at_level(logging.ERROR):
        inbound.handle(1, "v1/devices/me/attributes", b"[1, 2]")
    assert posted == [] and "must be an object, got a list" in caplog.text
