"""The rpc machine: routes server-side RPCs.

What it is for: every RPC from ThingsBoard becomes a journaled event here, is
checked against the RPC table and its parameter rules (``machines/rpc_rules.py``)
and then answered at once (``ping``, ``list``, unknown method, bad params),
handed to the RPC component's worker threads (``RunRpc``: reboot, run_command, archive, ...), or
turned into an event for the machine that owns the action (restart_controller
-> controller, init_files -> file_sync, ota_retry/ota_rollback -> ota). For
those the engine's answer hook replies with the transition the event caused,
or refuses with that machine's current state.

Events: ``rpc_requested`` {request_id, method, params}.
Effects: ``Publish`` (the reply), ``RunRpc``, ``Notify`` (with rpc_request_id).
Persists nothing: a restart drops RPCs in flight (ThingsBoard times them out)
and resumes in ``serving``, its only state.
"""

from __future__ import annotations

import json
from typing import Any

from statemachine import State

from teg_fsm.engine.effects import Notify
from teg_fsm.engine.effects.mqtt import RPC_RESPONSE_TOPIC, Publish
from teg_fsm.engine.effects.rpc import RunRpc
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.machines.rpc_rules import METHODS_BY_NAME, list_text, parse_params, plain_params


class RpcMachine(GatewayMachine):
    machine_name = "rpc"
    resume_table = {"serving": "serving"}
    rest_states = frozenset({"serving"})

    serving = State(initial=True)

    rpc_requested = serving.to.itself(internal=True)

    @classmethod
    def notified_events(cls) -> list[tuple[str | None, str]]:
        """(machine, event) of every ``Notify`` the RPC table can route (read by the diagrams)."""
        return [(m.machine, m.event) for m in METHODS_BY_NAME.values() if m.event is not None]

    def on_rpc_requested(self, ev: Event) -> None:
        request_id = ev.data.get("request_id")
        method_name = ev.data.get("method")
        method = METHODS_BY_NAME.get(method_name) if isinstance(method_name, str) else None
        if method_name == "list":
            self._reply(request_id, list_text())
        elif method is None:
            self._reply(
                request_id, f"Unknown RPC method: '{method_name}' - use command 'list' to get a list of available methods"
            )
        elif method.name == "ping":
            self._reply(request_id, "Pong")
        else:
            self._route(request_id, method, ev.data.get("params"))

    def _route(self, request_id: Any, method: Any, raw_params: Any) -> None:
        params, error = parse_params(method, raw_params)
        if error is not None:
            self._reply(request_id, f"Error - {method.error_prefix}{error}")
        elif method.handler is not None:
            self.emit(RunRpc(request_id=request_id, method=method.name, params=plain_params(params)))
        else:
            self.emit(Notify(machine=method.machine, name=method.event, data={"rpc_request_id": request_id, "rpc_method": method.name}))

    def _reply(self, request_id: Any, message: Any) -> None:
        self.emit(Publish(topic=RPC_RESPONSE_TOPIC.format(request_id), payload=json.dumps({"message": message}), qos=1))
