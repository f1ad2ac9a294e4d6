"""The RPC component: runs handler methods and answers machine-routed RPCs.

Handler methods (reboot, run_command, archive, fsm_state, ...) run on the
effect runner's worker threads, so a 30 s ``run_command`` never delays a
``ping`` (answered by the rpc machine in the dispatcher thread). Methods that
are events for another machine are answered by an observer of the dispatcher:
it sees the transitions that event caused, or refuses with the state the
machine is in.

``run_command`` runs the command without a shell in a session (process group)
of its own; on timeout, and when the command itself ends, the whole group is
killed, so background children never outlive it. Its output is read with a
bound. Every request gets a reply: bad params are refused by the rpc machine
(machines/rpc_rules.py) and a handler that raises is answered with the error.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from teg_fsm.engine.dispatcher import Dispatched, MachineSpec
from teg_fsm.engine.effects.mqtt import RPC_RESPONSE_TOPIC
from teg_fsm.engine.effects.rpc import RunRpc
from teg_fsm.engine.runner import Completion
from teg_fsm.machines.rpc import RpcMachine
from teg_fsm.machines.rpc_rules import METHODS_BY_NAME

if TYPE_CHECKING:
    from teg_fsm.app import Gateway

log = logging.getLogger(__name__)

# The existing gateway's archive RPCs only accept ranges inside these bounds.
_ARCHIVE_MIN_MS, _ARCHIVE_MAX_MS = 1735719469_000, 2524637869_000


class RpcComponent:
    name = "rpc"

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.action_delay_s = 1.0
        self.commands = CommandGroups()

    def machine_specs(self) -> list[MachineSpec]:
        return [MachineSpec(RpcMachine)]

    def install(self) -> None:
        self.gateway.runner.register(RunRpc, self._run, blocking=True)
        self.gateway.dispatcher.observers.append(self._answer_machine_rpc)

    def start(self) -> None: ...

    def stop(self) -> None:
        """End running commands: a worker thread busy with a 1 h command would hold up the process's exit."""
        self.commands.kill_all()

    # -- replies ----------------------------------------------------------

    def reply(self, request_id: int, message: Any) -> None:
        mqtt = self.gateway.components.get("mqtt")
        if mqtt is None:
            log.warning("no MQTT link; dropping the reply to RPC %s", request_id)
            return
        payload = json.dumps({"message": message}).encode()
        mqtt.link.publish_async(RPC_RESPONSE_TOPIC.format(request_id), payload, 1, lambda ok, err: None)  # type: ignore[attr-defined]

    def _answer_machine_rpc(self, dispatched: Dispatched) -> None:
        """Observer (dispatcher thread): reply to an RPC that was an event for a machine."""
        event = dispatched.event
        request_id = event.data.get("rpc_request_id")
        if request_id is None or event.target is None:
            return
        method = METHODS_BY_NAME[event.data["rpc_method"]]
        machine = self.gateway.dispatcher.machines.get(event.target)
        moved = [t for t in dispatched.transitions if t.machine == event.target]
        if machine is None:
            self.reply(request_id, f"Error - {method.name} refused: no {event.target} machine in this gateway")
        elif not moved:
            self.reply(
                request_id,
                f"Error - {method.name} refused: {event.target} is '{machine.state_name}' and cannot take {event.name} now",
            )
        elif method.accepted_reply is not None:
            self.reply(request_id, method.accepted_reply)
        else:
            self.reply(request_id, {"transitions": [f"{t.machine}: {t.source} -> {t.target}" for t in moved]})

    # -- handler methods (worker threads) -----------------------------------

    def _run(self, effect: RunRpc, completion: Completion) -> None:
        """Every request gets a reply: a handler that raises is answered with what went wrong."""
        try:
            message = getattr(self, f"_rpc_{effect.method}")(effect.params)
        except Exception as exc:  # noqa: BLE001 - the operator waits for an answer
            log.exception("RPC %s failed", effect.method)
            prefix = METHODS_BY_NAME[effect.method].error_prefix if effect.method in METHODS_BY_NAME else ""
            message = f"Error - {prefix}{type(exc).__name__}: {exc}"
        self.reply(effect.request_id, message)
        completion.succeed(None)

    def _later(self, action: Any) -> None:
        """Act after the reply had time to leave (the existing gateway waits too)."""
        threading.Timer(self.action_delay_s, action).start()

    def _rpc_reboot(self, _params: Any) -> str:
        log.warning("RPC: rebooting the device")
        self._later(lambda: subprocess.run(list(self.config.reboot_command), check=False))
        return "OK - Rebooting"

    def _rpc_shutdown(self, _params: Any) -> str:
        log.warning("RPC: shutting the device down")
        self._later(lambda: subprocess.run(list(self.config.shutdown_command), check=False))
        return "OK - Shutting down"

    def _rpc_exit(self, _params: Any) -> str:
        log.warning("RPC: exiting the gateway")
        self._later(self.gateway.stopped.set)
        return "OK - Exiting"

    def _rpc_fsm_state(self, _params: Any) -> dict[str, Any]:
        states = self.gateway.dispatcher.states()
        return {
            name: {**info, "since": _iso(info["since_ms"]) if info.get("since_ms") else None}
            for name, info in states.items()
        }

    def _rpc_run_command(self, params: dict[str, Any]) -> str:
        if not self.config.run_command_enabled:
            return (
                "Error - Running command failed: run_command is disabled; set TEG_RUN_COMMAND_ENABLED=true "
                "in the gateway's environment to enable it"
            )
        command, timeout_s = params["command"], params["timeout_s"]
        log.info("RPC: running command %s", command)
        try:
            done = run_in_own_group(command, timeout_s, self.config.run_command_output_cap, self.commands)
        except OSError as exc:  # no shell: a missing or non-executable program ends here, named
            named = f": {exc.filename!r}" if exc.filename is not None else ""
            return f"Error - Running command failed: {exc.strerror or exc}{named}"
        except ValueError as exc:  # e.g. a NUL the parser let through: still an answer
            return f"Error - Running command failed: {exc}"
        output = done.output_text(self.config.run_command_output_cap)
        if done.timed_out:
            return f"Error - Error running command '{command}': Timeout after {timeout_s} seconds. Output: {output}"
        return f"OK - Command executed - Command '{command}' exited with code {done.returncode}. Output: {output}"

    def _rpc_archive_republish_messages(self, params: dict[str, Any]) -> str:
        start, end = params["start_timestamp_ms"], params["end_timestamp_ms"]
        if start <= _ARCHIVE_MIN_MS or end >= _ARCHIVE_MAX_MS:
            return (
                "Error - Republishing archived messages failed: 'start_timestamp_ms' and 'end_timestamp_ms' "
                "must be within the range of 1735719469_000 and 2524637869_000"
            )
        uplink = self.gateway.components.get("uplink")
        if uplink is None:
            return "Error - Republishing archived messages failed: archive database unavailable"
        result = uplink.archive_republish(start, end)  # type: ignore[attr-defined]
        return f"OK - {result['rows']} messages republished - {start} -> {end}"

    def _rpc_archive_discard_messages(self, params: dict[str, Any]) -> str:
        start, end = params["start_timestamp_ms"], params["end_timestamp_ms"]
        if end >= _ARCHIVE_MAX_MS:
            return "Error - Discarding archived messages failed: 'end_timestamp_ms' must be < 2524637869_000"
        uplink = self.gateway.components.get("uplink")
        if uplink is None:
            return "Error - Discarding archived messages failed: archive database unavailable"
        result = uplink.archive_discard(start, end)  # type: ignore[attr-defined]
        return f"OK - {result['rows']} messages discarded - {start} -> {end}"


class CommandRun:
    """What a ``run_command`` produced: exit code, whether it timed out, the output (kept up to a bound)."""

    def __init__(self, returncode: int | None, timed_out: bool, kept: bytes, total: int) -> None:
        self.returncode, self.timed_out, self.kept, self.total = returncode, timed_out, kept, total

    def output_text(self, cap: int) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        unread = self.total - len(self.kept)
        if len(text) <= cap and not unread:
            return text
        cut = f"{len(text) - cap} more characters" if not unread else f"{len(text) - cap} more characters and {unread} more bytes"
        return text[:cap] + f"... [{cut} cut]"


_DRAIN_AFTER_KILL_S = 2.0


class CommandGroups:
    """The process groups of the commands running now, so that stopping the gateway can end them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[int] = set()

    def add(self, pgid: int) -> None:
        with self._lock:
            self._running.add(pgid)

    def discard(self, pgid: int) -> None:
        with self._lock:
            self._running.discard(pgid)

    def kill_all(self) -> None:
        with self._lock:
            running = sorted(self._running)
        for pgid in running:
            _kill_group(pgid)


def run_in_own_group(command: list[str], timeout_s: float, cap: int, groups: CommandGroups | None = None) -> CommandRun:
    """Run ``command`` (no shell) in a new session; on timeout, and when it ends, kill its whole process group.

    A command's background children (``sh -c 'sleep 100 &'``) share its process
    group, so killing the group leaves nothing behind; they also hold the output
    pipe open, so waiting for end-of-output alone would wait for them.
    """
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    groups = groups or CommandGroups()
    groups.add(proc.pid)
    output = _BoundedOutput(max(4 * cap + 4, 1 << 20))
    try:
        timed_out = not output.read_until(proc, time.monotonic() + timeout_s)
    finally:
        _kill_group(proc.pid)  # its leftovers too, when the leader ended on its own
        groups.discard(proc.pid)  # before the leader is reaped: its pid cannot be reused until then
        proc.wait()
        output.drain(proc, time.monotonic() + _DRAIN_AFTER_KILL_S)
        proc.stdout.close()
    return CommandRun(None if timed_out else proc.returncode, timed_out, bytes(output.kept), output.total)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    except PermissionError:
        log.warning("run_command: cannot kill process group %s (a member changed its user)", pgid)


class _BoundedOutput:
    """Reads a command's output, keeping the first ``limit`` bytes and counting the rest."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept, self.total = limit, bytearray(), 0

    def _take(self, fd: int) -> bool:
        chunk = os.read(fd, 65536)
        self.total += len(chunk)
        self.kept += chunk[: max(0, self.limit - len(self.kept))]
        return bool(chunk)

    def read_until(self, proc: subprocess.Popen[bytes], deadline: float) -> bool:
        """True when the command ended before ``deadline`` (output read to that point)."""
        fd, ended_output = proc.stdout.fileno(), False  # type: ignore[union-attr]
        while (left := deadline - time.monotonic()) > 0:
            if ended_output:  # every writer closed the pipe; the leader may still run
                try:
                    proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    return False
                return True
            if select.select([fd], [], [], min(left, 0.2))[0]:
                ended_output = not self._take(fd)
            elif proc.poll() is not None:
                return True  # ended; background children may still hold the pipe (killed next)
        return False

    def drain(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
            if not self._take(fd):
                return


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
