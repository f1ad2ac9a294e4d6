"""A real mosquitto broker (Debian's ``/usr/sbin/mosquitto``) for a test session.

Plain and TLS listeners on free loopback ports, anonymous access. The broker is a
child process of the test run, with its own generated config, so it never
touches a system mosquitto service that the Debian package may have started.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.rig.tls import TlsMaterial

MOSQUITTO_BIN = "/usr/sbin/mosquitto"
_START_TIMEOUT_S = 10.0


@attrs.frozen
class Mosquitto:
    """Where a running broker listens."""

    host: str
    port: int
    tls_port: int
    ca_cert: Path
    log_path: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port (the small race with other binders is accepted)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _config(port: int, tls_port: int, tls: TlsMaterial, extra: str) -> str:
    # `user` = ourselves: as root mosquitto would otherwise drop to the
    # `mosquitto` user, which may not exist and cannot read our tmp files.
    return "\n".join([
        "per_listener_settings false",
        "allow_anonymous true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        f"user {getpass.getuser()}",
        f"listener {port} 127.0.0.1",
        f"listener {tls_port} 127.0.0.1",
        f"cafile {tls.ca_cert}",
        f"certfile {tls.server_cert}",
        f"keyfile {tls.server_key}",
        extra,
        "",
    ])


@contextlib.contextmanager
def run_mosquitto(workdir: Path, tls: TlsMaterial, extra_config: str = "") -> Iterator[Mosquitto]:
    """Start mosquitto in ``workdir``; fail the test with its log if it won't start.

    ``extra_config`` is appended to the generated config (e.g. a password_file).
    """
    if not shutil.which(MOSQUITTO_BIN):
        pytest.fail(f"{MOSQUITTO_BIN} not found: install Debian's mosquitto "
                    "(tools/ci/test.sh does)", pytrace=False)
    host, port, tls_port = "127.0.0.1", free_port(), free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(_config(port, tls_port, tls, extra_config))
    log_path = workdir / "mosquitto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not (_accepts(host, port) and _accepts(host, tls_port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start (exit code {proc.poll()}); "
                            f"log:\n{log_path.read_text()}", pytrace=False)
            time.sleep(0.05)
        yield Mosquitto(host=host, port=port, tls_port=tls_port,
                        ca_cert=tls.ca_cert, log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, tls_material: TlsMaterial) -> Iterator[Mosquitto]:
    """A session broker: host, port (plain), tls_port, ca_cert."""
    with run_mosquitto(tmp_path_factory.mktemp("mosquitto"), tls_material) as broker:
        yield broker
