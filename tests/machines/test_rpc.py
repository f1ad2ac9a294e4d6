"""The rpc machine: replies, handler hand-off, machine events, bad input."""

from __future__ import annotations

import json
from typing import Any

from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects import Notify
from teg_fsm.engine.effects.mqtt import Publish
from teg_fsm.engine.effects.rpc import RunRpc
from teg_fsm.machines.rpc import RpcMachine
from tests.engine.harness import make_engine


def _ask(method: Any, params: Any = None, request_id: int = 7) -> list[Any]:
    dispatcher, _, _ = make_engine([MachineSpec(RpcMachine)])
    dispatcher.post("mqtt", "rpc_requested", {"request_id": request_id, "method": method, "params": params})
    done = dispatcher.run_until_idle()
    return done[0].effects


def _reply(effects: list[Any]) -> Any:
    [publish] = effects
    assert isinstance(publish, Publish) and publish.topic == "v1/devices/me/rpc/response/7"
    return json.loads(publish.payload)["message"]


def test_ping_answers_pong_at_once() -> None:
    assert _reply(_ask("ping")) == "Pong"


def test_list_names_every_method_in_the_existing_format() -> None:
    lines = _reply(_ask("list"))
    assert lines[0] == "Available RPC methods:"
    assert "ping: Ping the device (returns 'pong' reply)" in lines
    assert any(line.startswith("fsm_state: ") for line in lines)


def test_an_unknown_method_gets_the_existing_error_text() -> None:
    assert _reply(_ask("self_destruct")) == (
        "Unknown RPC method: 'self_destruct' - use command 'list' to get a list of available methods"
    )


def test_a_non_string_method_is_unknown_not_a_crash() -> None:
    assert "Unknown RPC method" in _reply(_ask(["ping"]))


def test_bad_params_name_the_parameter() -> None:
    message = _reply(_ask("archive_discard_messages", {"start_timestamp_ms": "yesterday", "end_timestamp_ms": 2}))
    assert message == "Error - Discarding archived messages failed: 'start_timestamp_ms' must be an integer, got str"
    message = _reply(_ask("run_command", {"command": "ls -l"}))
    assert message == "Error - Running command failed: 'command' must be a list of strings"
    message = _reply(_ask("run_command", {"timeout_s": 3}))
    assert message == "Error - Running command failed: missing 'command' in params"
    message = _reply(_ask("archive_republish_messages", "all"))
    assert message == "Error - Republishing archived messages failed: params is not a dictionary"


def test_handler_methods_go_to_the_worker_with_parsed_params() -> None:
    [run] = _ask("run_command", {"command": ["echo", "hi"]})
    assert run == RunRpc(id=run.id, request_id=7, method="run_command", params={"command": ["echo", "hi"], "timeout_s": 30})


def test_machine_methods_become_events_for_their_machine() -> None:
    [notify] = _ask("restart_controller")
    assert isinstance(notify, Notify)
    assert (notify.machine, notify.name) == ("controller", "restart_requested")
    assert notify.data == {"rpc_request_id": 7, "rpc_method": "restart_controller"}
