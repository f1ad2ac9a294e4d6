"""``teg migrate --check``: what switching from the existing gateway keeps, and what to stop first.

Read-only by design: it lists containers and images, reads the old runner's
environment from ``docker inspect`` (it was started with ``--env-file .env``),
looks at files, and prints. It never stops, removes or writes anything; the
operator runs the commands it prints (docs/MIGRATION.md walks through them).

The one thing that must not happen is two gateways driving ``teg_controller``
with the same token: each would restart the other's container and ThingsBoard
would see the device flap between two sessions. So a running old runner, or a
runner whose restart policy would bring it back after a reboot, is a blocker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.config import SERVICE_DIR, read_config, read_env_file

# Names the existing gateway's install guides give its runner container, and its image.
RUNNER_NAMES = ("thingsboard-edge-gateway-runner", "thingsboard_edge_gateway")
RUNNER_IMAGE_PREFIX = "thingsboard-edge-gateway"
CONTROLLER = "teg_controller"
# The runner mounts the host's / at /host; paths in its .env may carry that prefix.
HOST_MOUNT = "/host"
CARRIED_VARIABLES = (
    "TB_HOST", "TB_PORT", "THINGSBOARD_CA_CERT", "THINGSBOARD_DEVICE_NAME", "THINGSBOARD_ACCESS_TOKEN",
    "THINGSBOARD_PROVISION_DEVICE_KEY", "THINGSBOARD_PROVISION_DEVICE_SECRET", "TEG_DATA_PATH",
    "TEG_CONTROLLER_DATA_PATH", "TEG_CONTROLLER_LOGS_PATH", "TEG_CONTROLLER_GIT_PATH",
    "TEG_CONTROLLER_DOCKERCONTEXT_PATH", "TEG_CONTROLLER_DOCKERFILE_PATH", "TEG_DEFAULT_CONTROLLER_VERSION",
)
SECRETS = ("THINGSBOARD_PROVISION_DEVICE_KEY", "THINGSBOARD_PROVISION_DEVICE_SECRET")
GATEWAY_FILES = ("gateway_archive.db", "gateway_logs_buffer.db", "last_launched_controller_version.txt")


@attrs.define
class Findings:
    keep: list[str] = attrs.field(factory=list)
    stop: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    blockers: list[str] = attrs.field(factory=list)

    def lines(self) -> Iterator[str]:
        for title, items in (("will be kept", self.keep), ("to stop before starting teg-fsm", self.stop),
                             ("notes", self.notes)):
            yield f"{title}:"
            yield from (f"  - {item}" for item in items) if items else ["  (nothing)"]
        if self.blockers:
            yield "NOT ready to switch:"
            yield from (f"  ! {item}" for item in self.blockers)
        else:
            yield "ready to switch: `systemctl enable --now teg-fsm` (nothing was changed by this check)"


def inspect_host(*, ours: Mapping[str, str], ours_origin: str, old_env_file: Path | None) -> Findings:
    findings = Findings()
    old_env: dict[str, str] = {}
    client = _docker_client(findings)
    if client is not None:
        old_env.update(_inspect_runners(client, findings))
        _inspect_controller(client, findings)
    if old_env_file is not None:
        try:
            old_env.update(read_env_file(old_env_file))
        except OSError as exc:
            findings.notes.append(f"cannot read the existing gateway's .env {old_env_file}: {exc.strerror}")
    _compare_settings(old_env, ours, ours_origin, findings)
    _inspect_files(old_env or dict(ours), findings)
    _check_ours(ours, ours_origin, findings)
    return findings


def _docker_client(findings: Findings) -> Any:
    import docker

    try:
        client = docker.from_env(timeout=20)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot look at containers"
        findings.notes.append(f"Docker engine not reachable ({exc}); containers not inspected")
        return None


def _is_runner(container: Any) -> bool:
    image_tags = container.attrs.get("Config", {}).get("Image", "")
    return container.name in RUNNER_NAMES or image_tags.startswith(RUNNER_IMAGE_PREFIX)


def _inspect_runners(client: Any, findings: Findings) -> dict[str, str]:
    env: dict[str, str] = {}
    for container in client.containers.list(all=True):
        if not _is_runner(container):
            continue
        policy = container.attrs.get("HostConfig", {}).get("RestartPolicy", {}).get("Name") or "no"
        status = container.status
        env.update(_container_env(container))
        what = f"existing gateway runner container {container.name!r} ({status}, restart policy {policy})"
        if status in ("running", "restarting"):
            findings.stop.append(f"{what}: `docker update --restart=no {container.name} && docker stop {container.name}`")
            findings.blockers.append(f"{container.name} is {status}: it drives {CONTROLLER} with the same token")
        elif policy not in ("no", ""):
            findings.stop.append(f"{what}: `docker update --restart=no {container.name}` so a reboot does not revive it")
            findings.blockers.append(f"{container.name} would restart with the Docker engine (policy {policy})")
        else:
            findings.keep.append(f"{what}: stopped; keep it for a rollback, or `docker rm` it later")
    if not env:
        findings.notes.append(f"no existing gateway runner container found (looked for {', '.join(RUNNER_NAMES)})")
    return env


def _container_env(container: Any) -> dict[str, str]:
    pairs = container.attrs.get("Config", {}).get("Env") or []
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair and pair.split("=", 1)[0] in CARRIED_VARIABLES)


def _inspect_controller(client: Any, findings: Findings) -> None:
    import docker.errors

    try:
        controller = client.containers.get(CONTROLLER)
    except docker.errors.NotFound:
        findings.notes.append(f"no {CONTROLLER} container: teg-fsm builds and starts one from TEG_DEFAULT_CONTROLLER_VERSION")
    else:
        image = ", ".join(controller.image.tags) or controller.image.short_id
        findings.keep.append(f"container {CONTROLLER} ({controller.status}, image {image}): teg-fsm adopts it, no rebuild")
    images = sorted(t for image in client.images.list() for t in image.tags if t.startswith("teg-controller-"))
    if images:
        findings.keep.append(f"controller images: {', '.join(images)}")


def _host_path(raw: str) -> Path:
    path = Path(raw)
    if raw.startswith(HOST_MOUNT + "/") and not path.exists():
        return Path(raw[len(HOST_MOUNT):])
    return path


def _compare_settings(old: Mapping[str, str], ours: Mapping[str, str], origin: str, findings: Findings) -> None:
    for name in CARRIED_VARIABLES:
        if name not in old:
            continue
        old_value, our_value = old[name], ours.get(name)
        shown_old = "***" if name in SECRETS else old_value
        if our_value is None:
            findings.notes.append(f"{name}={shown_old} in the existing gateway's settings: copy it into {origin}")
        elif our_value != old_value and str(_host_path(old_value)) != our_value:
            findings.notes.append(f"{name} differs: existing gateway {shown_old}, {origin} "
                                  f"{'***' if name in SECRETS else our_value}")


def _inspect_files(env: Mapping[str, str], findings: Findings) -> None:
    data = _host_path(env.get("TEG_DATA_PATH", "")) if env.get("TEG_DATA_PATH") else None
    if data is not None:
        present = [name for name in GATEWAY_FILES if (data / name).exists()]
        findings.keep.append(f"data directory {data}: {', '.join(present) or 'no gateway files yet'}")
    controller = _host_path(env["TEG_CONTROLLER_DATA_PATH"]) if env.get("TEG_CONTROLLER_DATA_PATH") else data
    if controller is not None:
        queue = controller / "communication_queue.db"
        findings.keep.append(f"controller queue {queue}: {'present, rows are drained, never dropped' if queue.exists() else 'not there yet'}")
    token = env.get("THINGSBOARD_ACCESS_TOKEN")
    if token is None:
        findings.notes.append("THINGSBOARD_ACCESS_TOKEN not set: teg-fsm looks for ./tb_access_token in "
                              "/var/lib/teg-fsm; set it to the existing token file's absolute path to keep the device")
    else:
        path = _host_path(token)
        state = "present" if path.is_file() else "MISSING (the device will provision again if it has credentials)"
        findings.keep.append(f"token file {path}: {state}")
    git = env.get("TEG_CONTROLLER_GIT_PATH")
    if git:
        findings.keep.append(f"controller repository {_host_path(git)}: {'present' if _host_path(git).is_dir() else 'MISSING'}")
    _note_write_paths(env, findings)


def _note_write_paths(env: Mapping[str, str], findings: Findings) -> None:
    """The unit may write only /var/lib/teg-fsm; the existing gateway's places need a drop-in."""
    wanted = [env.get(name) for name in ("TEG_DATA_PATH", "TEG_CONTROLLER_DATA_PATH", "TEG_CONTROLLER_LOGS_PATH")]
    token, git = env.get("THINGSBOARD_ACCESS_TOKEN"), env.get("TEG_CONTROLLER_GIT_PATH")
    wanted += [str(Path(token).parent) if token else None, str(Path(git).parent) if git else None]
    paths: list[str] = []
    for raw in wanted:
        if raw and Path(raw).is_absolute():
            path = str(_host_path(raw))
            if path not in paths and not path.startswith(str(SERVICE_DIR)):
                paths.append(path)
    if paths:
        findings.notes.append("the service may write only /var/lib/teg-fsm: run `systemctl edit teg-fsm` and add "
                              f"[Service] ReadWritePaths={' '.join(paths)}")


def _check_ours(ours: Mapping[str, str], origin: str, findings: Findings) -> None:
    _config, problems = read_config(ours)
    for problem in problems:
        findings.blockers.append(f"{origin}: {problem}")
    if ours.get("TEG_RUN_COMMAND_ENABLED", "").lower() not in ("1", "true", "yes", "on"):
        findings.notes.append("run_command RPC is OFF in teg-fsm (on in the existing gateway); "
                              f"set TEG_RUN_COMMAND_ENABLED=true in {origin} if dashboards use it")
