"""The OTA component: the OTA machine, the controller repository and its images.

Settings come from the configuration (TEG_CONTROLLER_GIT_PATH, ..._DOCKERCONTEXT_PATH,
..._DOCKERFILE_PATH, TEG_OTA_*); the last good version is read at boot from
``last_launched_controller_version.txt`` (or TEG_DEFAULT_CONTROLLER_VERSION);
a checkpoint, when there is one, wins. Every handler runs on the worker pool
and settles its effect exactly once with a reason a person can act on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teg_fsm.machines.ota import OtaMachine, version_error
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.adapters.docker_engine import NoEngineSocket, open_client
from teg_fsm.engine.effects.ota import (
    BuildControllerImage,
    CheckoutControllerVersion,
    FetchControllerRepo,
    PruneControllerImages,
    WriteControllerVersion,
)
from teg_fsm.adapters.files import atomic_write
from teg_fsm.adapters.git_repo import ControllerRepo, GitRepoError
from teg_fsm.engine.runner import Completion
from teg_fsm.engine.sqlite_files import read_text_checked

if TYPE_CHECKING:
    import docker

    from teg_fsm.adapters.docker_images import ControllerImages
    from teg_fsm.app import Gateway
    from teg_fsm.config import Config

log = logging.getLogger(__name__)


def read_last_good(config: Config) -> str | None:
    """The version the existing gateway (or we) last launched, if it is a valid one."""
    text = read_text_checked(config.last_version_file).strip()  # a damaged file is quarantined
    for candidate in (text, config.default_controller_version):
        if candidate and version_error(candidate, assigned=False) is None:
            return candidate
    return None


def ota_settings(config: Config, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OTA machine's settings from the configuration (JSON-able: they are journaled)."""
    git_dir = config.controller_git_path
    context = config.docker_context_path
    settings: dict[str, Any] = {
        "git_dir": str(git_dir) if git_dir else "",
        "context_dir": str(context) if context else "",
        "dockerfile": config.dockerfile_path,
        "version_file": str(config.last_version_file),
        "last_good": read_last_good(config),
        "probation_s": config.probation_s,
        "health_timeout_s": config.probation_s,
        "min_free_disk_mb": config.min_free_disk_mb,
        "keep_images": config.keep_images,
    }
    settings.update(overrides or {})
    return settings


class OtaComponent:
    """Wires the OTA machine to git and the Docker engine."""

    name = "ota"

    def __init__(self, gateway: Gateway, settings: Mapping[str, Any] | None = None,
                 client: docker.DockerClient | None = None) -> None:
        self.gateway = gateway
        self.settings = ota_settings(gateway.config, settings)
        self._client = client
        self._client_lock = threading.Lock()
        self._images: ControllerImages | None = None

    def machine_specs(self) -> list[MachineSpec]:
        return [MachineSpec(OtaMachine, self.settings)]

    def install(self) -> None:
        register = self.gateway.runner.register
        register(FetchControllerRepo, self._fetch, blocking=True)
        register(CheckoutControllerVersion, self._checkout, blocking=True)
        register(BuildControllerImage, self._build, blocking=True)
        register(WriteControllerVersion, self._write_version, blocking=True)
        register(PruneControllerImages, self._prune, blocking=True)

    def start(self) -> None:
        """Nothing to start: the OTA machine acts only on events."""

    def stop(self) -> None:
        with self._client_lock:
            if self._client is not None and self._images is not None:
                self._client.close()

    def images(self) -> ControllerImages:
        # Created on first use, so a Docker engine that is down at boot delays
        # nothing but the first build, and docker-py is not imported before.
        from teg_fsm.adapters.docker_images import ControllerImages

        with self._client_lock:
            if self._images is None:
                if self._client is None:
                    self._client = open_client(self.gateway.config.docker_host, 600)
                self._images = ControllerImages(self._client)
            return self._images

    # -- handlers (worker threads) ---------------------------------------------

    def _fetch(self, effect: FetchControllerRepo, completion: Completion) -> None:
        try:
            remote = ControllerRepo(effect.git_dir).fetch(timeout_s=effect.timeout_s)
        except GitRepoError as exc:
            completion.fail(str(exc))
            return
        completion.succeed({"remote": remote})

    def _checkout(self, effect: CheckoutControllerVersion, completion: Completion) -> None:
        # Checked again (the effect may come from a replayed journal); the shape only:
        # the machine refuses numeric-looking assignments, but rebuilds such a running version.
        error = version_error(effect.version, assigned=False)
        if error:
            completion.fail(error)
            return
        try:
            commit = ControllerRepo(effect.git_dir).checkout(effect.version, timeout_s=effect.timeout_s)
        except GitRepoError as exc:
            completion.fail(str(exc))
            return
        completion.succeed({"commit": commit})

    def _build(self, effect: BuildControllerImage, completion: Completion) -> None:
        import docker.errors

        from teg_fsm.adapters.docker_images import ImageError

        try:
            result = self.images().build(
                context_dir=effect.context_dir, dockerfile=effect.dockerfile, image=effect.image,
                min_free_mb=effect.min_free_mb, labels=effect.labels, network_mode=effect.network_mode,
                timeout_s=effect.timeout_s,
            )
        except ImageError as exc:
            completion.fail(str(exc))
            return
        except (docker.errors.DockerException, NoEngineSocket) as exc:
            completion.fail(f"Docker engine unreachable or failing: {exc}")
            return
        completion.succeed(result)

    def _write_version(self, effect: WriteControllerVersion, completion: Completion) -> None:
        try:
            atomic_write(Path(effect.path), (effect.version + "\n").encode())
        except OSError as exc:
            completion.fail(f"{exc.strerror or exc} ({effect.path})")
            return
        completion.succeed(None)

    def _prune(self, effect: PruneControllerImages, completion: Completion) -> None:
        import docker.errors

        try:
            removed = self.images().prune(effect.keep, effect.keep_count)
        except (docker.errors.DockerException, NoEngineSocket) as exc:
            completion.fail(f"pruning controller images failed: {exc}")
            return
        completion.succeed({"removed": removed})
