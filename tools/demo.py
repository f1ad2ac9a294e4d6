"""The demo: the gateway against the bundled ThingsBoard stand-in, on the real Docker engine.

    .venv/bin/python tools/demo.py [--workdir DIR]

Run through ``bash tools/demo.sh`` (it installs and starts what this needs,
including a private Docker engine of its own unless DOCKER_HOST names one).
Shows self-provisioning, telemetry flowing, an RPC, a file pushed, an OTA
update and an automatic rollback (the OTA machine rests in rolled_back), then prints where to look.

The demo never touches a container or image it did not create: it refuses
to run on an engine that already has a ``teg_controller`` container or
``teg-controller-*`` images (a live station's), and afterwards removes only
the container and images that appeared during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import docker  # noqa: E402
import git  # noqa: E402

from tools.tb_standin import StandIn  # noqa: E402

DEVICE = "demo-station-01"
PROFILE_KEY, PROFILE_SECRET = "demo-provision-key", "demo-provision-secret"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait(what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"demo failed: timed out after {timeout:.0f} s waiting for {what}")


RELEASES = (("v1.0.0", "healthy"), ("v2.0.0", "crash"), ("v3.0.0", "healthy"))


def make_controller_repo(
    work: Path, releases: tuple[tuple[str, str], ...] = RELEASES, dockerfile_extra: str = ""
) -> Path:
    """A controller repository with one tag per release (by default v1 and v3 healthy, v2 crashing at start)."""
    origin = work / "controller-origin.git"
    git.Repo.init(origin, bare=True)
    repo_dir = work / "controller"
    repo = git.Repo.init(repo_dir)
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "TEG demo")
        cfg.set_value("user", "email", "demo@teg.invalid")
    docker_dir = repo_dir / "docker"
    docker_dir.mkdir()
    for name in ("Dockerfile", "controller.py"):
        shutil.copy(REPO / "tools" / "demo_controller" / name, docker_dir / name)
    if dockerfile_extra:
        with open(docker_dir / "Dockerfile", "a") as dockerfile:
            dockerfile.write(dockerfile_extra)
    for version, behaviour in releases:
        (docker_dir / "release.env").write_text(f"CONTROLLER_VERSION={version}\nCONTROLLER_BEHAVIOUR={behaviour}\n")
        repo.index.add(["docker/Dockerfile", "docker/controller.py", "docker/release.env"])
        repo.index.commit(f"release {version} ({behaviour})")
        repo.create_tag(version, message=f"release {version}")
    repo.create_remote("origin", str(origin))
    repo.remotes.origin.push(refspec="refs/heads/*:refs/heads/*")
    repo.remotes.origin.push(tags=True)
    return repo_dir


def gateway_env(work: Path, tb: StandIn, repo_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TB_HOST="127.0.0.1",
        TB_PORT=str(tb.tls_port),
        THINGSBOARD_CA_CERT=str(tb.cafile),
        THINGSBOARD_PROVISION_DEVICE_KEY=PROFILE_KEY,
        THINGSBOARD_PROVISION_DEVICE_SECRET=PROFILE_SECRET,
        THINGSBOARD_DEVICE_NAME=DEVICE,
        THINGSBOARD_ACCESS_TOKEN=str(work / "tb_access_token"),
        TEG_DATA_PATH=str(work / "data"),
        TEG_CONTROLLER_GIT_PATH=str(repo_dir / ".git"),
        TEG_CONTROLLER_PRIVILEGED="false",
        TEG_CONTROLLER_EXTRA_MOUNTS="",
        TEG_OTA_PROBATION_S="8",
        TEG_OTA_MIN_FREE_DISK_MB="64",
        TEG_RESTART_BACKOFF_S="5",
        TEG_FILE_CHECK_INTERVAL_S="5",
        LOG_LEVEL="INFO",
    )
    return env


def sw_states(tb: StandIn) -> list[str]:
    return [values for _, values in tb.telemetry(DEVICE, "sw_state")]


def run_demo(work: Path) -> None:
    (work / "data").mkdir(parents=True, exist_ok=True)
    with StandIn(host="127.0.0.1", port=0, tls_port=0) as tb:
        tb.add_provision_profile(PROFILE_KEY, PROFILE_SECRET)
        step(f"ThingsBoard stand-in on 127.0.0.1:{tb.tls_port} (TLS); provisioning profile '{PROFILE_KEY}'")
        repo_dir = make_controller_repo(work)
        print(f"controller repository with tags v1.0.0, v2.0.0 (crashes at start), v3.0.0: {repo_dir}")
        log_path = work / "gateway.log"
        with open(log_path, "w") as log_file:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "teg_fsm.cli", "run"], cwd=REPO, env=gateway_env(work, tb, repo_dir),
                stdout=log_file, stderr=subprocess.STDOUT,
            )
            try:
                show(work, tb)
            finally:
                gateway.send_signal(signal.SIGTERM)
                try:
                    gateway.wait(25)
                except subprocess.TimeoutExpired:
                    gateway.kill()
        print(f"\ngateway log: {log_path}")
    step("Where to look")
    data = work / "data"
    teg = Path(sys.executable).parent / "teg"
    teg = teg if teg.exists() else Path("teg")
    print(f"  {teg} status --data {data}             # every machine's state (as the gateway left them)")
    print(f"  {teg} status --data {data} --mermaid   # diagrams with the active state")
    print(f"  {teg} journal --data {data} --machine ota  # why the gateway did what it did")
    print(f"  {teg} replay {data / 'teg_journal.db'}  # re-run this journal against the machines")


def show(work: Path, tb: StandIn) -> None:
    step("1. Self-provisioning: no token yet, the gateway provisions itself")
    wait("provisioning", lambda: DEVICE in tb.devices(), 30)
    token_file = work / "tb_access_token"
    wait("the token file", token_file.exists, 10)
    print(f"device '{DEVICE}' created; token written to {token_file} (mode {oct(token_file.stat().st_mode & 0o777)})")
    wait("the gateway to connect with its token", lambda: tb.is_connected(DEVICE), 30)
    print("connected over TLS with the new token")

    step("2. OTA: assign controller v1.0.0 (git fetch, checkout, docker build, start, probation)")
    tb.assign_ota(DEVICE, kind="sw", title="co2-controller", version="v1.0.0")
    wait("UPDATED for v1.0.0", lambda: tb.latest(DEVICE).get("current_sw_version") == "v1.0.0"
         and tb.latest(DEVICE).get("sw_state") == "UPDATED", 240)
    print(f"sw_state reports: {' -> '.join(sw_states(tb))}")

    step("3. Telemetry flowing from the controller's SQLite queue")
    before = tb.telemetry_count(DEVICE)
    wait("controller telemetry", lambda: tb.latest(DEVICE).get("co2_ppm") is not None, 60)
    wait("more telemetry", lambda: tb.telemetry_count(DEVICE) > before + 3, 60)
    print(f"latest co2_ppm={tb.latest(DEVICE)['co2_ppm']} ({tb.telemetry_count(DEVICE)} records so far)")

    step("4. RPC: ping, and fsm_state")
    print(f"ping -> {tb.rpc(DEVICE, 'ping', {}, timeout=10)}")
    print(f"fsm_state -> {json.dumps(tb.rpc(DEVICE, 'fsm_state', {}, timeout=10))}")

    step("5. A file pushed through shared attributes (FILES / FILE_CONTENT_config)")
    tb.set_shared(DEVICE, {
        "FILES": {"config": {"path": "$DATA_PATH/config.json", "encoding": "json", "write_version": 1,
                             "create_if_not_exist": True, "restart_controller_on_change": False}},
        "FILE_CONTENT_config": {"measurement_interval_s": 1},
    })
    config_file = work / "data" / "config.json"
    wait("config.json on disk", config_file.exists, 30)
    print(f"{config_file}: {config_file.read_text().strip()}")
    hashes = wait("FILE_HASHES", lambda: tb.client_attributes(DEVICE).get("FILE_HASHES"), 30)
    print(f"client attribute FILE_HASHES = {json.dumps(hashes)}")

    step("6. OTA update to v3.0.0")
    tb.assign_ota(DEVICE, kind="sw", title="co2-controller", version="v3.0.0")
    wait("UPDATED for v3.0.0", lambda: tb.latest(DEVICE).get("current_sw_version") == "v3.0.0"
         and tb.latest(DEVICE).get("sw_state") == "UPDATED", 240)
    print(f"sw_state reports: {' -> '.join(sw_states(tb))}")

    step("7. OTA to v2.0.0, whose controller crashes at start: automatic rollback")
    tb.assign_ota(DEVICE, kind="sw", title="co2-controller", version="v2.0.0")
    wait("FAILED with a rollback", lambda: tb.latest(DEVICE).get("sw_state") == "FAILED", 240)
    print(f"sw_error = {tb.latest(DEVICE).get('sw_error')!r}")
    wait("v3.0.0 running again", lambda: tb.latest(DEVICE).get("current_sw_version") == "v3.0.0", 60)
    print(f"current_sw_version = {tb.latest(DEVICE).get('current_sw_version')}")
    # ThingsBoard knows no rolled-back state: it sees FAILED with sw_error; the OTA
    # machine itself rests in rolled_back, holding the blocked version and the reason.
    def ota_rolled_back() -> dict[str, Any] | None:
        machines = tb.rpc(DEVICE, "fsm_state", {}, timeout=10).get("message") or {}  # RPC answers are {"message": ...}
        ota = machines.get("ota") or {}
        return ota if ota.get("state") == "rolled_back" else None

    ota = wait("the OTA machine to rest in rolled_back", ota_rolled_back, 30)
    print(f"OTA machine: {ota['state']} since {ota['since']} (v2.0.0 stays blocked until it is assigned again)")

    step("8. The machines now (teg status, read from the checkpoints)")
    subprocess.run([sys.executable, "-m", "teg_fsm.cli", "status", "--data", str(work / "data")], cwd=REPO, check=False)


CONTROLLER = "teg_controller"
IMAGE_PREFIX = "teg-controller-"


class EngineGuard:
    """What was on the Docker engine before the demo, so only the demo's own things are removed."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.images_before = self._controller_images()

    def _controller_images(self) -> set[str]:
        return {tag for image in self.client.images.list() for tag in image.tags if tag.startswith(IMAGE_PREFIX)}

    def refusal(self) -> str | None:
        if self.client.containers.list(all=True, filters={"name": f"^/{CONTROLLER}$"}):
            return (f"this Docker engine already has a '{CONTROLLER}' container (a live station?); "
                    "the demo would take it over. Run it on its own engine: unset DOCKER_HOST and use tools/demo.sh")
        if self.images_before:
            return (f"this Docker engine already has controller images ({', '.join(sorted(self.images_before))}); "
                    "the demo runs only on an engine without them (tools/demo.sh starts a private one)")
        return None

    def remove_what_the_demo_created(self) -> None:
        for container in self.client.containers.list(all=True, filters={"name": f"^/{CONTROLLER}$"}):
            container.remove(force=True)  # refusal() made sure none existed before the demo
        for tag in sorted(self._controller_images() - self.images_before):
            try:
                self.client.images.remove(tag)
            except docker.errors.APIError as exc:
                print(f"could not remove demo image {tag}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    client = docker.from_env(timeout=120)
    guard = EngineGuard(client)
    refusal = guard.refusal()
    if refusal is not None:
        raise SystemExit(f"demo refused: {refusal}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="teg-demo-"))
    print(f"demo working directory: {work}; Docker engine: {os.environ.get('DOCKER_HOST') or 'the default socket'}")
    try:
        run_demo(work)
    finally:
        guard.remove_what_the_demo_created()
        client.close()
    print("\ndemo finished")


if __name__ == "__main__":
    main()
