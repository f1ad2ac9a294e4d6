"""The rpc machine's rules: the RPC table, every method, its parameters, its replies.

Pure data and functions (no I/O, no machine state), shared by the rpc machine
(machines/rpc.py) and the RPC component. A method
is either answered by the rpc machine itself (``reply``), run by the RPC
component on a worker thread (``handler``), or turned into an event for
another machine (``machine``/``event``); for those the reply says whether the
machine took the event and which transition it caused.

Response texts of the existing gateway's methods are kept word for word,
operators' dashboards match on them.
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

MAX_RUN_COMMAND_TIMEOUT_S = 3600  # a worker thread is held for this long at most


@attrs.frozen
class RunCommandParams:
    command: list[str]
    timeout_s: int = 30


@attrs.frozen
class TimeRangeParams:
    start_timestamp_ms: int
    end_timestamp_ms: int


@attrs.frozen
class RpcMethod:
    name: str
    description: str
    params: type | None = None
    handler: str | None = None
    machine: str | None = None
    event: str | None = None
    accepted_reply: str | None = None
    error_prefix: str = ""


RPC_METHODS: tuple[RpcMethod, ...] = (
    RpcMethod("reboot", "Reboot the device", handler="reboot"),
    RpcMethod("shutdown", "Shutdown the device", handler="shutdown"),
    RpcMethod("exit", "Exits the gateway process (triggers gateway restart)", handler="exit"),
    RpcMethod("ping", "Ping the device (returns 'pong' reply)"),
    RpcMethod(
        "init_files",
        "Initialize file-related client attributes (FILE_HASHES, FILE_READ_*)",
        machine="file_sync",
        event="init_files_requested",
        accepted_reply="Files client attributes initialized",
    ),
    RpcMethod(
        "restart_controller",
        "Restart the controller docker container",
        machine="controller",
        event="restart_requested",
        accepted_reply="OK - Restarting Controller",
    ),
    RpcMethod(
        "run_command",
        "Run arbitrary command ({command: list [str], timeout_s: int [default 30s]}) - use with caution!",
        params=RunCommandParams,
        handler="run_command",
        error_prefix="Running command failed: ",
    ),
    RpcMethod(
        "archive_republish_messages",
        "Republish messages from archive ({start_timestamp_ms: int, end_timestamp_ms: int})",
        params=TimeRangeParams,
        handler="archive_republish_messages",
        error_prefix="Republishing archived messages failed: ",
    ),
    RpcMethod(
        "archive_discard_messages",
        "Discard messages from archive ({start_timestamp_ms: int, end_timestamp_ms: int})",
        params=TimeRangeParams,
        handler="archive_discard_messages",
        error_prefix="Discarding archived messages failed: ",
    ),
    RpcMethod("fsm_state", "Every state machine's current state and since when", handler="fsm_state"),
    RpcMethod(
        "ota_retry",
        "Retry the assigned controller version (also one that was rolled back)",
        machine="ota",
        event="ota_retry_requested",
    ),
    RpcMethod("ota_rollback", "Roll the controller back to the last good version", machine="ota", event="ota_rollback_requested"),
)

METHODS_BY_NAME: dict[str, RpcMethod] = {m.name: m for m in RPC_METHODS}


def list_text() -> list[str]:
    """The ``list`` reply, in the existing gateway's format."""
    return ["Available RPC methods:"] + [f"{m.name}: {m.description}" for m in RPC_METHODS]


def _strict_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)

    def strict_int(value: Any, _: type) -> int:
        if type(value) is not int:
            raise TypeError(f"must be an integer, got {type(value).__name__}")
        return value

    def strict_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, got {type(value).__name__}")
        return value

    def strict_list_of_str(value: Any, _: type) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("must be a list of strings")
        return list(value)

    converter.register_structure_hook(int, strict_int)
    converter.register_structure_hook(str, strict_str)
    converter.register_structure_hook_func(lambda t: t == list[str], strict_list_of_str)
    return converter


def parse_params(method: RpcMethod, params: Any) -> tuple[Any, str | None]:
    """Structured params, or an error naming the parameter. Never raises: every request gets a reply."""
    if method.params is None:
        return None, None
    if not isinstance(params, dict):
        return None, "params is not a dictionary"
    try:
        parsed = _strict_converter().structure(params, method.params)
    except cattrs.ClassValidationError as exc:
        return None, "; ".join(_describe(e) for e in exc.exceptions)
    except cattrs.ForbiddenExtraKeysError as exc:
        return None, f"unknown parameter(s) {', '.join(sorted(map(str, exc.extra_fields)))}"
    except Exception as exc:  # noqa: BLE001 - a converter surprise still gets a reply naming it
        return None, f"params not understood ({type(exc).__name__}: {exc})"
    error = _check(parsed)
    return (None, error) if error is not None else (parsed, None)


def plain_params(params: Any) -> Any:
    """Parsed params as the plain dict ``RunRpc`` carries into the journal (None stays None)."""
    return None if params is None else attrs.asdict(params)


def _check(parsed: Any) -> str | None:
    """The rules beyond types: ranges, and what ``execve`` cannot take."""
    if isinstance(parsed, TimeRangeParams) and parsed.start_timestamp_ms >= parsed.end_timestamp_ms:
        return "'start_timestamp_ms' must be less than 'end_timestamp_ms'"
    if isinstance(parsed, RunCommandParams):
        if not parsed.command or parsed.timeout_s <= 0:
            return "'command' must not be empty and 'timeout_s' must be positive"
        if parsed.timeout_s > MAX_RUN_COMMAND_TIMEOUT_S:
            return f"'timeout_s' must be at most {MAX_RUN_COMMAND_TIMEOUT_S} seconds, got {parsed.timeout_s}"
        if not parsed.command[0]:
            return "'command' must start with a program name, got an empty string"
        nul = next((i for i, arg in enumerate(parsed.command) if "\0" in arg), None)
        if nul is not None:
            return f"'command' item {nul} contains a NUL character, which no program argument can hold"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown parameter(s) {', '.join(sorted(map(str, exc.extra_fields)))}"
    note = getattr(exc, "__notes__", [""])[0]
    field = note.rsplit(" ", 1)[-1] if note else "?"
    if isinstance(exc, KeyError):
        return f"missing '{field}' in params"
    return f"'{field}' {exc}"
