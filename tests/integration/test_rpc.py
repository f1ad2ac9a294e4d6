"""Every RPC method end to end: the stand-in's server-side RPC (over TLS) to a running gateway and back.

Most tests share one gateway subprocess (`python -m teg_fsm.cli run`, every
default component) with run_command enabled, a small output cap and harmless
reboot/shutdown commands that write marker files. Its DOCKER_HOST names a
socket that does not exist: the default controller component would otherwise
adopt and restart whatever `teg_controller` runs on the shared test engine.
Gateways that must differ (run_command disabled, `exit`) are started per test.
`restart_controller` against a real controller container runs in-process, with
a uniquely named container built from the local base image.
"""

from __future__ import annotations

import collections
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import attrs
import docker
import docker.errors
import psutil
import pytest

from teg_fsm.app import Gateway
from teg_fsm.components.controller import ControllerComponent
from teg_fsm.components.mqtt import MqttComponent
from teg_fsm.components.rpc import RpcComponent
from teg_fsm.config import load_config
from teg_fsm.engine.effects.controller import image_name
from tests.integration import uplink_rig as rig
from tests.rig.docker_engine import BuildImage
from tests.rig.protocol import protocol_env
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration

DEVICE = "rpc-station"
OUTPUT_CAP = 40
ARCHIVE_T0 = 1_750_000_000_000  # inside the archive RPCs' accepted range (2025-01-01 .. 2050-01-01)

EXISTING_LIST = [
    "Available RPC methods:",
    "reboot: Reboot the device",
    "shutdown: Shutdown the device",
    "exit: Exits the gateway process (triggers gateway restart)",
    "ping: Ping the device (returns 'pong' reply)",
    "init_files: Initialize file-related client attributes (FILE_HASHES, FILE_READ_*)",
    "restart_controller: Restart the controller docker container",
    "run_command: Run arbitrary command ({command: list [str], timeout_s: int [default 30s]}) - use with caution!",
    "archive_republish_messages: Republish messages from archive ({start_timestamp_ms: int, end_timestamp_ms: int})",
    "archive_discard_messages: Discard messages from archive ({start_timestamp_ms: int, end_timestamp_ms: int})",
    "fsm_state: Every state machine's current state and since when",
    "ota_retry: Retry the assigned controller version (also one that was rolled back)",
    "ota_rollback: Roll the controller back to the last good version",
]
MACHINES = {"connection", "provisioning", "uplink", "rpc", "file_sync", "ota", "controller", "health"}


@attrs.define
class Running:
    """A gateway subprocess registered as ``device`` on the stand-in."""

    tb: StandIn
    device: str
    proc: subprocess.Popen[bytes]
    data: Path
    markers: Path

    def ask(self, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        """The ``message`` of the gateway's reply."""
        return self.tb.rpc(self.device, method, params, timeout=timeout)["message"]

    def ask_async(self, method: str, params: Any = None, timeout: float = 10.0) -> Future[Any]:
        return self.tb.rpc_async(self.device, method, params, timeout=timeout)


@pytest.fixture(scope="module")
def tb() -> Iterator[StandIn]:
    with StandIn(tls_port=0) as standin:
        yield standin


def _start(tb: StandIn, root: Path, device: str, **extra: str) -> Running:
    token = tb.add_device(device)
    markers = root / "markers"
    markers.mkdir(parents=True)
    env = rig.gateway_env(tb, root / "data", token, THINGSBOARD_DEVICE_NAME=device,
                          DOCKER_HOST=f"unix://{root}/no-docker.sock", **extra)
    proc = rig.start_gateway(env, root / "gateway.log")
    running = Running(tb, device, proc, root / "data", markers)
    rig.wait_for(lambda: tb.is_connected(device) or proc.poll() is not None, 20, "gateway connected")
    assert proc.poll() is None, (root / "gateway.log").read_text()
    # The RPC subscription is the last step of a connect; ping answers once it is in place.
    rig.wait_for(lambda: "v1/devices/me/rpc/request/+" in tb.subscriptions(device), 10, "RPC subscription")
    return running


@pytest.fixture(scope="module")
def gw(tb: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The shared gateway: run_command enabled, output capped, harmless reboot/shutdown."""
    root = tmp_path_factory.mktemp("rpc-gw")
    markers = root / "markers"
    running = _start(
        tb, root, DEVICE,
        TEG_RUN_COMMAND_ENABLED="true", TEG_RUN_COMMAND_OUTPUT_CAP=str(OUTPUT_CAP),
        TEG_REBOOT_COMMAND=f"touch {markers}/rebooted", TEG_SHUTDOWN_COMMAND=f"touch {markers}/shut_down",
    )
    yield running
    rig.stop(running.proc)


@pytest.fixture
def fresh(tb: StandIn, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """A gateway of this test's own, default settings unless told otherwise."""
    started: list[Running] = []

    def start(**extra: str) -> Running:
        started.append(_start(tb, tmp_path / f"gw{len(started)}", f"rpc-fresh-{uuid.uuid4().hex[:8]}", **extra))
        return started[-1]

    yield start
    for running in started:
        rig.stop(running.proc)


# -- answered by the rpc machine ------------------------------------------------


def test_list_names_every_method_in_the_existing_format(gw: Running) -> None:
    assert gw.ask("list") == EXISTING_LIST


def test_ping_answers_pong(gw: Running) -> None:
    assert gw.ask("ping") == "Pong"


def test_an_unknown_method_gets_the_existing_error_text(gw: Running) -> None:
    assert gw.ask("self_destruct", {"now": True}) == (
        "Unknown RPC method: 'self_destruct' - use command 'list' to get a list of available methods"
    )


@pytest.mark.parametrize(("method", "params", "reply"), [
    ("run_command", {"command": "ls -l"}, "Error - Running command failed: 'command' must be a list of strings"),
    ("run_command", {"command": ["ls", 1]}, "Error - Running command failed: 'command' must be a list of strings"),
    ("run_command", {"command": ["ls"], "timeout_s": "5"},
     "Error - Running command failed: 'timeout_s' must be an integer, got str"),
    ("run_command", {"command": ["ls"], "timeout_s": True},
     "Error - Running command failed: 'timeout_s' must be an integer, got bool"),
    ("run_command", {"timeout_s": 3}, "Error - Running command failed: missing 'command' in params"),
    ("run_command", {"command": ["ls"], "shell": True}, "Error - Running command failed: unknown parameter(s) shell"),
    ("run_command", {"command": [], "timeout_s": 3},
     "Error - Running command failed: 'command' must not be empty and 'timeout_s' must be positive"),
    ("run_command", {"command": ["ls"], "timeout_s": 0},
     "Error - Running command failed: 'command' must not be empty and 'timeout_s' must be positive"),
    ("run_command", ["ls"], "Error - Running command failed: params is not a dictionary"),
    ("run_command", None, "Error - Running command failed: params is not a dictionary"),
    ("archive_republish_messages", "all", "Error - Republishing archived messages failed: params is not a dictionary"),
    ("archive_republish_messages", {"start_timestamp_ms": ARCHIVE_T0},
     "Error - Republishing archived messages failed: missing 'end_timestamp_ms' in params"),
    ("archive_republish_messages", {"start_timestamp_ms": ARCHIVE_T0, "end_timestamp_ms": ARCHIVE_T0 + 1, "x": 1},
     "Error - Republishing archived messages failed: unknown parameter(s) x"),
    ("archive_republish_messages", {"start_timestamp_ms": ARCHIVE_T0 + 5, "end_timestamp_ms": ARCHIVE_T0},
     "Error - Republishing archived messages failed: 'start_timestamp_ms' must be less than 'end_timestamp_ms'"),
    ("archive_discard_messages", {"start_timestamp_ms": "yesterday", "end_timestamp_ms": ARCHIVE_T0},
     "Error - Discarding archived messages failed: 'start_timestamp_ms' must be an integer, got str"),
    ("archive_discard_messages", {"start_timestamp_ms": 1.5, "end_timestamp_ms": ARCHIVE_T0},
     "Error - Discarding archived messages failed: 'start_timestamp_ms' must be an integer, got float"),
])
def test_bad_params_are_refused_naming_the_parameter(gw: Running, method: str, params: Any, reply: str) -> None:
    assert gw.ask(method, params) == reply


def test_fsm_state_reports_every_machine_state_and_since_when(gw: Running) -> None:
    states = gw.ask("fsm_state")
    assert set(states) == MACHINES
    for info in states.values():
        assert isinstance(info["state"], str) and isinstance(info["since_ms"], int)
        assert info["since"].endswith("+00:00") and info["since"][:4] == time.strftime("%Y", time.gmtime())
    assert {name: states[name]["state"] for name in ("connection", "provisioning", "rpc", "ota", "controller")} == {
        "connection": "online", "provisioning": "provisioned", "rpc": "serving", "ota": "idle",
        "controller": "engine_unreachable",  # DOCKER_HOST names a socket that does not exist
    }


# -- handler methods (worker threads) ----------------------------------------------


def test_reboot_replies_then_runs_the_reboot_command(gw: Running) -> None:
    assert gw.ask("reboot") == "OK - Rebooting"
    rig.wait_for((gw.markers / "rebooted").exists, 10, "the reboot command ran")
    assert gw.proc.poll() is None


def test_shutdown_replies_then_runs_the_shutdown_command(gw: Running) -> None:
    assert gw.ask("shutdown") == "OK - Shutting down"
    rig.wait_for((gw.markers / "shut_down").exists, 10, "the shutdown command ran")
    assert gw.proc.poll() is None


def test_exit_replies_then_the_gateway_exits_0_by_itself(fresh: Callable[..., Running]) -> None:
    running = fresh()
    assert running.ask("exit") == "OK - Exiting"
    asked = time.monotonic()
    assert running.proc.wait(20) == 0
    print(f"\nexit: process gone {time.monotonic() - asked:.2f} s after the reply")
    assert running.device in running.tb.devices() and not running.tb.is_connected(running.device)


def test_run_command_is_disabled_by_default_and_the_error_says_how_to_enable_it(
        fresh: Callable[..., Running]) -> None:
    running = fresh()
    assert running.ask("run_command", {"command": ["touch", str(running.markers / "ran")]}) == (
        "Error - Running command failed: run_command is disabled; set TEG_RUN_COMMAND_ENABLED=true "
        "in the gateway's environment to enable it"
    )
    assert not (running.markers / "ran").exists()


def test_run_command_runs_the_command_and_returns_its_exit_code_and_output(gw: Running) -> None:
    assert gw.ask("run_command", {"command": ["echo", "hi"]}) == (
        "OK - Command executed - Command '['echo', 'hi']' exited with code 0. Output: hi\n"
    )
    assert gw.ask("run_command", {"command": ["sh", "-c", "echo oops >&2; exit 3"], "timeout_s": 5}) == (
        "OK - Command executed - Command '['sh', '-c', 'echo oops >&2; exit 3']' exited with code 3. Output: oops\n"
    )


def test_run_command_uses_no_shell(gw: Running) -> None:
    assert gw.ask("run_command", {"command": ["echo", "$HOME", "*"]}) == (
        "OK - Command executed - Command '['echo', '$HOME', '*']' exited with code 0. Output: $HOME *\n"
    )
    assert gw.ask("run_command", {"command": ["echo $HOME"]}) == (
        "Error - Running command failed: No such file or directory: 'echo $HOME'"
    )


def test_run_command_past_its_timeout_is_killed_and_reports_the_output_so_far(gw: Running) -> None:
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    asked = time.monotonic()
    assert gw.ask("run_command", {"command": command, "timeout_s": 1}) == (
        f"Error - Error running command '{command}': Timeout after 1 seconds. Output: started\n"
    )
    assert time.monotonic() - asked < 5


def test_run_command_output_is_capped(gw: Running) -> None:
    full = "".join(f"{i}\n" for i in range(1, 101))
    assert gw.ask("run_command", {"command": ["seq", "1", "100"]}) == (
        f"OK - Command executed - Command '['seq', '1', '100']' exited with code 0. Output: "
        f"{full[:OUTPUT_CAP]}... [{len(full) - OUTPUT_CAP} more characters cut]"
    )


def test_a_long_run_command_does_not_delay_a_ping(gw: Running) -> None:
    long = gw.ask_async("run_command", {"command": ["sleep", "5"], "timeout_s": 10}, timeout=15)
    gateway = psutil.Process(gw.proc.pid)
    rig.wait_for(lambda: any(c.cmdline() == ["sleep", "5"] for c in gateway.children()), 5, "the command running")
    asked = time.monotonic()
    assert gw.ask("ping") == "Pong"
    answered = time.monotonic()
    assert not long.done(), "ping must be answered while the command still runs"
    print(f"\nping during a 5 s run_command: {(answered - asked) * 1000:.1f} ms")
    assert long.result(15)["message"] == (
        "OK - Command executed - Command '['sleep', '5']' exited with code 0. Output: "
    )


# -- archive -------------------------------------------------------------------------


def _archived(data: Path) -> list[int]:
    conn = sqlite3.connect(data / "gateway_archive.db", timeout=10)
    try:
        return [ts for (ts,) in conn.execute(
            "SELECT timestamp_ms FROM controller_archive WHERE timestamp_ms BETWEEN ? AND ? ORDER BY timestamp_ms",
            (ARCHIVE_T0, ARCHIVE_T0 + 10_000))]
    finally:
        conn.close()


def _write_rows(queue_db: Path, n: int) -> None:
    """As a controller would: measurements with ts ARCHIVE_T0 + i, and one log row (never archived)."""
    rig.create_queue(queue_db)
    conn = sqlite3.connect(queue_db, timeout=10)
    rows = [("measurement", f'{{"ts": {ARCHIVE_T0 + i}, "values": {{"arc_seq": {i}}}}}') for i in range(n)]
    rows.append(("log", f'{{"ts": {ARCHIVE_T0 + n}, "values": {{"arc_log": "a log line"}}}}'))
    conn.executemany("INSERT INTO messages (type, message) VALUES (?, ?)", rows)
    conn.commit()
    conn.close()


def test_archive_republish_and_discard_act_on_the_rows_the_uplink_archived(gw: Running) -> None:
    n, tb = 50, gw.tb
    _write_rows(gw.data / "communication_queue.db", n)

    def delivered() -> list[int]:
        return [int(v) for _, v in tb.telemetry(gw.device, "arc_seq")]

    rig.wait_for(lambda: len(delivered()) >= n and tb.telemetry(gw.device, "arc_log"), 20, "rows delivered")
    assert rig.wait_for(lambda: len(_archived(gw.data)) == n, 10, "rows archived")
    assert _archived(gw.data) == [ARCHIVE_T0 + i for i in range(n)]  # not the log row

    # Bounds are exclusive, as in the existing gateway: (T0+9, T0+20) is rows 10..19.
    start, end = ARCHIVE_T0 + 9, ARCHIVE_T0 + 20
    span = {"start_timestamp_ms": start, "end_timestamp_ms": end}
    uploaded = tb.data_points(gw.device)
    assert gw.ask("archive_republish_messages", span) == f"OK - 10 messages republished - {start} -> {end}"
    rig.wait_for(lambda: tb.data_points(gw.device) >= uploaded + 10, 20, "republished rows delivered again")
    time.sleep(0.3)  # anything extra would arrive right behind
    # Sent again with their original ts, so ThingsBoard (one value per key and ts) still holds one of each.
    assert collections.Counter(delivered()) == {i: 1 for i in range(n)}
    republished = sorted(ts for ts, v in tb.telemetry(gw.device, "arc_seq") if 10 <= int(v) < 20)
    assert republished == [ARCHIVE_T0 + i for i in range(10, 20)]

    start, end = ARCHIVE_T0 + 29, ARCHIVE_T0 + 40
    span = {"start_timestamp_ms": start, "end_timestamp_ms": end}
    assert gw.ask("archive_discard_messages", span) == f"OK - 10 messages discarded - {start} -> {end}"
    assert _archived(gw.data) == [ARCHIVE_T0 + i for i in range(n) if not 30 <= i < 40]
    assert gw.ask("archive_republish_messages", span) == f"OK - 0 messages republished - {start} -> {end}"
    assert gw.ask("archive_discard_messages", span) == f"OK - 0 messages discarded - {start} -> {end}"


OUT_OF_RANGE = (
    "Error - Republishing archived messages failed: 'start_timestamp_ms' and 'end_timestamp_ms' "
    "must be within the range of 1735719469_000 and 2524637869_000"
)


@pytest.mark.parametrize(("method", "start", "end", "reply"), [
    ("archive_republish_messages", 1735719469_000, ARCHIVE_T0, OUT_OF_RANGE),
    ("archive_republish_messages", ARCHIVE_T0, 2524637869_000, OUT_OF_RANGE),
    ("archive_discard_messages", ARCHIVE_T0, 2524637869_000,
     "Error - Discarding archived messages failed: 'end_timestamp_ms' must be < 2524637869_000"),
    ("archive_discard_messages", 0, 1_000, "OK - 0 messages discarded - 0 -> 1000"),  # no lower bound on discard
])
def test_archive_rpcs_keep_the_existing_range_checks(gw: Running, method: str, start: int, end: int,
                                                     reply: str) -> None:
    assert gw.ask(method, {"start_timestamp_ms": start, "end_timestamp_ms": end}) == reply


# -- events for other machines ----------------------------------------------------


def test_init_files_is_taken_by_file_sync(gw: Running) -> None:
    assert gw.ask("init_files") == "Files client attributes initialized"
    rig.wait_for(lambda: "FILE_HASHES" in gw.tb.client_attributes(gw.device), 10, "FILE_HASHES reported")


def test_ota_retry_and_rollback_are_refused_while_ota_is_idle(gw: Running) -> None:
    assert gw.ask("ota_retry") == "Error - ota_retry refused: ota is 'idle' and cannot take ota_retry_requested now"
    assert gw.ask("ota_rollback") == (
        "Error - ota_rollback refused: ota is 'idle' and cannot take ota_rollback_requested now"
    )
    assert gw.ask("fsm_state")["ota"]["state"] == "idle"


def test_restart_controller_while_the_engine_is_unreachable_is_accepted_and_queued(gw: Running) -> None:
    assert gw.ask("restart_controller") == "OK - Restarting Controller"
    assert gw.ask("fsm_state")["controller"]["state"] == "engine_unreachable"


# -- restart_controller with the real controller component (in-process, real engine) --------

CONTROLLER = """\
import signal, sqlite3, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 has no default SIGTERM action
db = sqlite3.connect("/root/data/communication_queue.db", timeout=5)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS health_check (id INTEGER PRIMARY KEY, timestamp_ms INTEGER)")
while True:
    db.execute("INSERT INTO health_check (id, timestamp_ms) VALUES (1, ?) "
               "ON CONFLICT(id) DO UPDATE SET timestamp_ms = excluded.timestamp_ms", (int(time.time() * 1000),))
    db.commit()
    time.sleep(0.2)
"""


@pytest.fixture(scope="module")
def controller_version(build_image: BuildImage, base_image: str) -> str:
    version = f"v0.0.8-rpc{uuid.uuid4().hex[:8]}"
    build_image(image_name(version), f'FROM {base_image}\nCOPY c.py /c.py\nCMD ["python3", "-u", "/c.py"]\n',
                {"c.py": CONTROLLER})
    return version


@attrs.define
class InProcess:
    gateway: Gateway
    device: str
    container: str | None

    def state(self, machine: str) -> str:
        return self.gateway.dispatcher.machines[machine].state_name


@pytest.fixture
def in_process(tb: StandIn, tmp_path: Path) -> Iterator[Callable[..., InProcess]]:
    """Gateways in this process: RPC + MQTT, with the controller component when ``controller`` is set."""
    made: list[InProcess] = []
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")

    def start(controller: bool, version: str | None = None) -> InProcess:
        device, root = f"rpc-inproc-{uuid.uuid4().hex[:8]}", tmp_path / f"g{len(made)}"
        (root / "controller").mkdir(parents=True)
        token_file = root / "tb_access_token"
        token_file.write_text(tb.add_device(device))
        config = load_config({
            "TB_HOST": "127.0.0.1", "TB_PORT": str(tb.tls_port), "TEG_TLS": "1", "THINGSBOARD_CA_CERT": str(tb.cafile),
            "THINGSBOARD_ACCESS_TOKEN": str(token_file), "THINGSBOARD_DEVICE_NAME": device,
            "TEG_DATA_PATH": str(root / "data"), "TEG_CONTROLLER_DATA_PATH": str(root / "controller"),
            "DOCKER_HOST": docker_host, "TEG_CONTROLLER_PRIVILEGED": "false", "TEG_CONTROLLER_EXTRA_MOUNTS": "",
            "TEG_CONTROLLER_RESTART_POLICY": "no", "TEG_CONTROLLER_STOP_TIMEOUT_S": "5",
            "TEG_RECONNECT_MIN_S": "0.2", "TEG_RECONNECT_MAX_S": "1", **protocol_env(),
            **({"TEG_DEFAULT_CONTROLLER_VERSION": version} if version else {}),
        })
        container = f"teg_controller_rpc{uuid.uuid4().hex[:8]}" if controller else None

        def components(g: Gateway) -> list[Any]:
            parts: list[Any] = [RpcComponent(g)]
            if container is not None:
                parts.append(ControllerComponent(g, container, first_check_s=0.5, telemetry_interval_s=0.5))
            return [*parts, MqttComponent(g)]

        gateway = Gateway(config, components=components)
        gateway.start()
        made.append(InProcess(gateway, device, container))
        rig.wait_for(lambda: "v1/devices/me/rpc/request/+" in tb.subscriptions(device), 20, "RPC subscription")
        return made[-1]

    yield start
    for running in made:
        running.gateway.stop()
    containers = [r.container for r in made if r.container is not None]
    if containers:  # the gateway never stops its controller: the test does
        client = docker.DockerClient(base_url=docker_host)
        try:
            for name in containers:
                _remove(client, name)
        finally:
            client.close()


def _remove(client: docker.DockerClient, name: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            client.containers.get(name).remove(force=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:  # 409: a removal is already in progress
            if exc.status_code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_machine_rpcs_without_their_machine_are_refused_with_a_reason(
        tb: StandIn, in_process: Callable[..., InProcess]) -> None:
    running = in_process(controller=False)
    ask = lambda method: tb.rpc(running.device, method)["message"]
    assert ask("restart_controller") == "Error - restart_controller refused: no controller machine in this gateway"
    assert ask("init_files") == "Error - init_files refused: no file_sync machine in this gateway"
    assert ask("ota_retry") == "Error - ota_retry refused: no ota machine in this gateway"


def test_restart_controller_is_refused_while_no_controller_version_is_known(
        tb: StandIn, in_process: Callable[..., InProcess], docker_client: docker.DockerClient) -> None:
    running = in_process(controller=True)
    rig.wait_for(lambda: running.state("controller") == "awaiting_version", 20, "controller awaiting a version")
    assert tb.rpc(running.device, "restart_controller")["message"] == (
        "Error - restart_controller refused: controller is 'awaiting_version' and cannot take restart_requested now"
    )
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(running.container)


def test_restart_controller_restarts_the_running_controller(
        tb: StandIn, in_process: Callable[..., InProcess], docker_client: docker.DockerClient,
        controller_version: str) -> None:
    running = in_process(controller=True, version=controller_version)
    rig.wait_for(lambda: running.state("controller") == "running", 30, "controller running")
    before = docker_client.containers.get(running.container).attrs
    assert tb.rpc(running.device, "restart_controller")["message"] == "OK - Restarting Controller"

    def restarted() -> dict[str, Any] | None:
        try:
            now = docker_client.containers.get(running.container).attrs
        except docker.errors.NotFound:
            return None
        changed = (now["Id"], now["State"]["StartedAt"]) != (before["Id"], before["State"]["StartedAt"])
        return now if changed and now["State"]["Running"] else None

    after = rig.wait_for(restarted, 30, "the controller container restarted")
    assert after is not None
    rig.wait_for(lambda: running.state("controller") == "running", 30, "controller running again")
    assert after["Config"]["Image"] == image_name(controller_version)
    machine: Any = running.gateway.dispatcher.machines["controller"]
    assert machine.container_id == after["Id"]


def test_the_gateway_socket_has_nagle_off_so_a_reply_does_not_wait_for_a_delayed_ack(
        in_process: Callable[..., InProcess]) -> None:
    running = in_process(controller=False)
    session = running.gateway.components["mqtt"].link.session  # type: ignore[attr-defined]
    assert session.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
