"""The Debian package, installed with apt and run by systemd, as an operator would.

A Debian bookworm container with systemd as PID 1 (unprivileged: private
cgroup namespace, tmpfs /run, host networking) gets the ``.deb`` built from
this checkout by ``tools/packaging/build_deb.sh``. The gateway then runs from
the installed package only: ``/usr/bin/teg``, the private virtualenv, the
unit with its hardening, ``/etc/teg-fsm/teg.env``. The ThingsBoard stand-in
runs in this process on 127.0.0.1, reachable through the host network; the
Docker engine of the test run is mounted as ``/run/docker.sock`` so the
hardened unit has to reach it the way it would on a device.

The systemd image is built once per engine (its tag carries a hash of its
Dockerfile) and kept; the package is built once per session.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from teg_fsm.machines.controller_rules import NO_VERSION_LOG
from tests.rig.protocol import protocol_env
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEVICE = "deb-station-01"
KEY, SECRET = "deb-provision-key", "deb-provision-secret"
ENV_FILE = "/etc/teg-fsm/teg.env"
NO_VERSION_LINE = f"teg.machines: controller: {NO_VERSION_LOG}"
SYSTEMD_DOCKERFILE = """\
FROM {base}
RUN apt-get update -q \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
      systemd systemd-sysv dbus python3-venv git ca-certificates >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# Units that need hardware or privileges a container does not have.
RUN systemctl mask getty@tty1.service console-getty.service systemd-udevd.service \\
      systemd-remount-fs.service dev-hugepages.mount sys-fs-fuse-connections.mount systemd-logind.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
"""


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``teg-fsm_<version>_all.deb`` built from this checkout."""
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run(["bash", str(REPO / "tools" / "packaging" / "build_deb.sh"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"build_deb.sh failed:\n{done.stdout}\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def systemd_image(docker_client: docker.DockerClient, base_image: str) -> str:
    """Debian bookworm with systemd, from the local base image; built once per engine and kept."""
    dockerfile = SYSTEMD_DOCKERFILE.format(base=base_image)
    base_id = docker_client.images.get(base_image).id
    tag = f"teg-systemd-test:{hashlib.sha256((dockerfile + base_id).encode()).hexdigest()[:12]}"
    try:
        docker_client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    try:
        docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, forcerm=True,
                                   pull=False, network_mode="host", labels={"teg-test": "1"})
    except docker.errors.BuildError as exc:
        log = "".join(str(chunk.get("stream", chunk)) for chunk in exc.build_log)
        pytest.fail(f"building {tag} failed: {exc.msg}\n{log}", pytrace=False)
    return tag


def _engine_socket() -> str:
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    assert host.startswith("unix://"), f"the systemd test needs a local engine socket, not {host}"
    return host[len("unix://"):]


class Machine:
    """The systemd container, seen through ``docker exec``."""

    def __init__(self, container: Container) -> None:
        self.container = container

    def sh(self, command: str, *, check: bool = True) -> str:
        code, output = self.container.exec_run(["bash", "-c", command], demux=False)
        text = output.decode(errors="replace") if output else ""
        if check:
            assert code == 0, f"`{command}` exited {code}:\n{text}"
        return text

    def put(self, path: str, content: bytes, mode: int = 0o600) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(Path(path).name)
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
        assert self.container.put_archive(str(Path(path).parent), buf.getvalue())

    def unit(self) -> dict[str, str]:
        props = "ActiveState,SubState,Result,ExecMainStatus,NRestarts,StatusText,MainPID,ExecMainPID"
        out = self.sh(f"systemctl show teg-fsm --property={props}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *options: str, pid: str | None = None) -> list[str]:
        """Lines the gateway process itself wrote (systemd's own notes about the unit are left out)."""
        out = self.sh("journalctl --no-pager -o json -u teg-fsm " + " ".join(options))
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e["MESSAGE"] for e in entries
                if e.get("SYSLOG_IDENTIFIER") == "teg" and (pid is None or e.get("_PID") == pid)]

    def set_env(self, values: dict[str, str]) -> None:
        """Edit the installed env file as an operator would: replace or add KEY=value lines."""
        lines = self.sh(f"cat {ENV_FILE}").splitlines()
        for key, value in values.items():
            lines = [line for line in lines if not line.startswith(f"{key}=")] + [f"{key}={value}"]
        self.put(ENV_FILE, ("\n".join(lines) + "\n").encode())


@pytest.fixture(scope="module")
def installed(docker_client: docker.DockerClient, systemd_image: str, deb_package: Path,
              docker_test_labels: dict[str, str]) -> Iterator[Machine]:
    container = docker_client.containers.run(
        systemd_image, detach=True, name=f"teg-deb-systemd-{uuid.uuid4().hex[:8]}", network_mode="host",
        tmpfs={"/run": "", "/run/lock": ""}, cgroupns="private", labels=dict(docker_test_labels),
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                 str(deb_package.parent): {"bind": "/deb", "mode": "ro"},
                 _engine_socket(): {"bind": "/run/docker.sock", "mode": "rw"}},
    )
    machine = Machine(container)
    try:
        wait_for(lambda: machine.sh("systemctl is-system-running", check=False).strip() in ("running", "degraded"),
                 60, "systemd up in the container", interval=0.2)
        machine.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q /deb/{deb_package.name}")
        yield machine
    finally:
        container.remove(force=True)


def test_the_wheel_in_the_package_holds_every_package_of_the_checkout(deb_package: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb_package), str(tmp_path)], check=True)
    (wheel,) = (tmp_path / "opt" / "teg-fsm" / "wheels").glob("teg_fsm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {str(Path(name).parent) for name in archive.namelist() if name.endswith("/__init__.py")}
    # machines/ installs as teg_fsm/machines (pyproject's package-dir): no top-level "machines" package.
    in_checkout = {str(p.parent.relative_to(REPO)) for p in (REPO / "teg_fsm").rglob("__init__.py")}
    in_checkout |= {"teg_fsm/" + str(p.parent.relative_to(REPO)) for p in (REPO / "machines").rglob("__init__.py")}
    assert packaged == in_checkout
    assert any(name.endswith("/licenses/LICENSE") for name in zipfile.ZipFile(wheel).namelist())


def test_package_installs_into_a_private_venv_and_leaves_the_system_python_alone(installed: Machine) -> None:
    assert installed.sh("dpkg-query -W -f='${Status} ${Architecture}' teg-fsm") == "install ok installed all"
    assert installed.sh("readlink -f /usr/bin/teg") == "/opt/teg-fsm/venv/bin/teg\n"
    assert installed.sh("teg --version").startswith("teg-fsm ")
    # The venv runs on Debian's python3.11; the system interpreter cannot import the gateway.
    assert installed.sh("/opt/teg-fsm/venv/bin/python -c 'import sys; print(sys.version_info[:2])'") == "(3, 11)\n"
    assert installed.sh("python3 -c 'import teg_fsm' 2>&1", check=False).count("ModuleNotFoundError") == 1
    assert installed.sh("dpkg-query -W -f='${Conffiles}' teg-fsm").split()[0] == ENV_FILE
    # Every subpackage is in the wheel: the commands that import them all work.
    assert "ota.mmd" in installed.sh("cd /tmp && teg diagrams --out /tmp/d >/dev/null && ls /tmp/d && rm -r /tmp/d")


def test_unit_provisions_logs_for_journald_and_stops_cleanly(installed: Machine, docker_client: docker.DockerClient) -> None:
    with StandIn(host="127.0.0.1", port=0, tls_port=0) as tb:
        tb.add_provision_profile(KEY, SECRET)
        installed.put("/etc/teg-fsm/ca.pem", Path(tb.cafile).read_bytes(), mode=0o644)
        installed.set_env({
            "TB_HOST": "127.0.0.1", "TB_PORT": str(tb.tls_port), "THINGSBOARD_CA_CERT": "/etc/teg-fsm/ca.pem",
            "THINGSBOARD_DEVICE_NAME": DEVICE, "THINGSBOARD_PROVISION_DEVICE_KEY": KEY,
            "THINGSBOARD_PROVISION_DEVICE_SECRET": SECRET, "DOCKER_HOST": "unix:///run/docker.sock",
            **protocol_env(),
        })
        installed.sh("teg config --check --env-file /etc/teg-fsm/teg.env")
        installed.sh("systemctl start teg-fsm")  # Type=notify: returns once READY=1 arrived
        unit = installed.unit()
        assert (unit["ActiveState"], unit["SubState"], unit["NRestarts"]) == ("active", "running", "0")
        assert "connection=" in unit["StatusText"]
        wait_for(lambda: tb.is_connected(DEVICE), 60, "the installed gateway provisioned and connected")
        assert installed.sh("stat -c %a /var/lib/teg-fsm/tb_access_token") == "600\n"
        status = installed.sh("teg status")
        assert f"running, pid {unit['MainPID']}" in status and "teg-fsm.service active (running)" in status
        wait_for(lambda: any("provisioning: requesting -> provisioned" in line for line in installed.journal()),
                 30, "the provisioning transition logged at INFO")
        # The hardened unit reached the Docker engine through the socket (an unreachable
        # engine would show as inspecting -> engine_unreachable).
        # docker-py is imported on first use, so the first inspection may finish after provisioning.
        wait_for(lambda: "teg.transitions: controller: inspecting -> awaiting_version (on inspect_succeeded)"
                 in installed.journal(), 30, "the controller's first inspection reached the engine")
        # A first start of a device given no controller version says so once; nothing else warns.
        # (At warning level: the device waits for an OTA assignment by design.)
        assert installed.journal("-p", "warning") == [NO_VERSION_LINE]
        secret_lines = [line for line in installed.journal() if SECRET in line]
        assert secret_lines == []
        installed.sh("systemctl stop teg-fsm")
        stopped = installed.unit()
        assert (stopped["ActiveState"], stopped["Result"], stopped["ExecMainStatus"]) == ("inactive", "success", "0")
        assert not tb.is_connected(DEVICE)
        assert "not running" in installed.sh("teg status")


def test_an_upgrade_keeps_the_settings_and_brings_a_running_service_back(installed: Machine, deb_package: Path) -> None:
    installed.set_env({"TB_HOST": "127.0.0.1", "TB_PORT": "1", "TEG_TLS": "false"})  # nothing listens: runs offline
    installed.sh("systemctl start teg-fsm")
    before = installed.unit()["MainPID"]
    installed.sh(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall /deb/{deb_package.name}")
    after = installed.unit()
    assert (after["ActiveState"], after["SubState"]) == ("active", "running") and after["MainPID"] != before
    assert "TB_PORT=1\n" in installed.sh(f"cat {ENV_FILE}")  # a conffile: the operator's edits survive
    installed.sh("systemctl stop teg-fsm")


def test_configuration_error_fails_the_unit_with_the_variable_named_and_no_restart_loop(installed: Machine) -> None:
    installed.sh("systemctl stop teg-fsm; systemctl reset-failed teg-fsm", check=False)
    installed.set_env({"TB_HOST": "127.0.0.1", "TB_PORT": "70000"})
    assert installed.sh("systemctl start teg-fsm 2>&1", check=False) != ""  # systemctl reports the failure
    unit = wait_for(lambda: (u := installed.unit())["ActiveState"] == "failed" and u, 30, "the unit failed")
    # `failed`, not `activating (auto-restart)`: RestartPreventExitStatus=78 stopped the loop.
    assert (unit["SubState"], unit["Result"], unit["ExecMainStatus"], unit["NRestarts"]) == (
        "failed", "exit-code", "78", "0")
    pid = installed.sh("systemctl show teg-fsm --property=ExecMainPID --value").strip()
    errors = installed.journal("-p", "err", pid=pid)
    assert "teg: configuration error: TB_PORT=70000: must be an integer from 1 to 65535" in errors
