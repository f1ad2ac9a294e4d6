"""Every RPC request gets a reply: malformed params are answered with an error naming the problem.

Property tests (hypothesis) on ``parse_params`` and on the rpc machine: whatever
JSON arrives as ``params``, parsing returns valid params or an error text (it
never raises), and the machine answers (a Publish) or hands a valid request to
the worker (RunRpc), exactly once.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects import Notify
from teg_fsm.engine.effects.mqtt import Publish
from teg_fsm.engine.effects.rpc import RunRpc
from teg_fsm.machines.rpc import RpcMachine
from teg_fsm.machines.rpc_rules import (
    MAX_RUN_COMMAND_TIMEOUT_S,
    METHODS_BY_NAME,
    RPC_METHODS,
    RunCommandParams,
    TimeRangeParams,
    parse_params,
)
from tests.engine.harness import make_engine

RUN_COMMAND = METHODS_BY_NAME["run_command"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Close to valid: right keys, wrong shapes, NULs, edge numbers.
arguments = st.text(alphabet=st.sampled_from(["a", " ", "\0", "-", "é", "/"]) | st.characters(), max_size=6)
commands = st.one_of(
    st.lists(arguments, max_size=4),
    st.lists(json_values, max_size=3),
    json_values,
)
timeouts = st.one_of(
    st.integers(min_value=-5, max_value=MAX_RUN_COMMAND_TIMEOUT_S + 5),
    st.sampled_from([0, 1, MAX_RUN_COMMAND_TIMEOUT_S, MAX_RUN_COMMAND_TIMEOUT_S + 1, 10**30, -(10**30)]),
    json_values,
)
run_command_params = st.one_of(
    st.fixed_dictionaries({"command": commands}, optional={"timeout_s": timeouts}),
    st.fixed_dictionaries({"command": commands, "timeout_s": timeouts},
                          optional={"shell": json_values, "cwd": json_values, "": json_values}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4),
    json_values,
)


def _valid_run_command(parsed: Any) -> bool:
    return (
        isinstance(parsed, RunCommandParams)
        and isinstance(parsed.command, list) and bool(parsed.command) and bool(parsed.command[0])
        and all(isinstance(a, str) and "\0" not in a for a in parsed.command)
        and type(parsed.timeout_s) is int and 0 < parsed.timeout_s <= MAX_RUN_COMMAND_TIMEOUT_S
    )


@settings(max_examples=600, deadline=None)
@given(run_command_params)
def test_run_command_params_parse_to_valid_params_or_an_error_text(params: Any) -> None:
    parsed, error = parse_params(RUN_COMMAND, params)
    if error is None:
        assert _valid_run_command(parsed), parsed
    else:
        assert parsed is None and isinstance(error, str) and error


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([m for m in RPC_METHODS if m.params is not None]), json_values)
def test_every_method_with_params_parses_or_explains(method: Any, params: Any) -> None:
    parsed, error = parse_params(method, params)
    assert (parsed is None) != (error is None)
    if isinstance(parsed, TimeRangeParams):
        assert parsed.start_timestamp_ms < parsed.end_timestamp_ms


def _effects(method: Any, params: Any) -> list[Any]:
    dispatcher, _, _ = make_engine([MachineSpec(RpcMachine)])
    dispatcher.post("mqtt", "rpc_requested", {"request_id": 7, "method": method, "params": params})
    [done] = dispatcher.run_until_idle()
    return done.effects


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["run_command", "archive_republish_messages", "archive_discard_messages", "ping"])
       | json_values, run_command_params)
def test_the_rpc_machine_answers_or_hands_off_every_request_exactly_once(method: Any, params: Any) -> None:
    [effect] = _effects(method, params)
    if isinstance(effect, Publish):
        assert effect.topic == "v1/devices/me/rpc/response/7"
        assert json.loads(effect.payload)["message"]
    else:
        assert isinstance(effect, RunRpc | Notify)
        if isinstance(effect, RunRpc) and effect.method == "run_command":
            assert _valid_run_command(RunCommandParams(**effect.params))


def _error(params: Any) -> str:
    parsed, error = parse_params(RUN_COMMAND, params)
    assert parsed is None and error is not None
    return error


def test_a_nul_in_an_argument_is_refused_naming_the_item() -> None:
    assert _error({"command": ["echo", "a\0b"]}) == (
        "'command' item 1 contains a NUL character, which no program argument can hold"
    )


def test_a_timeout_out_of_range_or_of_the_wrong_type_is_refused() -> None:
    assert _error({"command": ["ls"], "timeout_s": MAX_RUN_COMMAND_TIMEOUT_S + 1}) == (
        f"'timeout_s' must be at most {MAX_RUN_COMMAND_TIMEOUT_S} seconds, got {MAX_RUN_COMMAND_TIMEOUT_S + 1}"
    )
    assert _error({"command": ["ls"], "timeout_s": -1}) == "'command' must not be empty and 'timeout_s' must be positive"
    assert _error({"command": ["ls"], "timeout_s": 2.5}) == "'timeout_s' must be an integer, got float"
    assert _error({"command": ["ls"], "timeout_s": None}) == "'timeout_s' must be an integer, got NoneType"


def test_an_empty_program_name_is_refused() -> None:
    assert _error({"command": [""]}) == "'command' must start with a program name, got an empty string"


def test_the_machine_replies_to_a_nul_argument_with_the_error() -> None:
    [reply] = _effects("run_command", {"command": ["echo", "\0"]})
    assert isinstance(reply, Publish)
    assert json.loads(reply.payload)["message"] == (
        "Error - Running command failed: 'command' item 1 contains a NUL character, which no program argument can hold"
    )
