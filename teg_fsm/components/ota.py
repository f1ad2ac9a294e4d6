"""The OTA component: the OTA machine, the controller repository and its images.

Settings come from the configuration (TEG_CONTROLLER_GIT_PATH, ..._DOCKERCONTEXT_PATH,
..._DOCKERFILE_PATH, TEG_OTA_*); the last good version is read at boot from
``last_launched_controller_version.txt`` (or TEG_DEFAULT_CONTROLLER_VERSION);
a checkpoint, when there is one, wins. Every handler runs on the worker pool
and settles its effect exactly once with a reason a person can act on.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teg_fsm.adapters import ota_package
from teg_fsm.adapters.docker_engine import NoEngineSocket, open_client
from teg_fsm.adapters.files import atomic_write
from teg_fsm.adapters.git_repo import ControllerRepo, GitRepoError
from teg_fsm.adapters.ota_package import MqttChunks, PackageError, PartFile
from teg_fsm.engine.dispatcher import MachineSpec
from teg_fsm.engine.effects.ota import (
    BuildControllerImage,
    CheckoutControllerVersion,
    DownloadPackage,
    FetchControllerRepo,
    PruneControllerImages,
    WriteControllerVersion,
)
from teg_fsm.engine.runner import Completion
from teg_fsm.engine.sqlite_files import read_text_checked
from teg_fsm.machines.ota import OtaMachine, version_error

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
        "package_dir": str(config.data_path / "ota"),
        "chunk_size": config.ota_chunk_size,
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
        self._chunks: MqttChunks | None = None
        # Give up a download (kept for the next attempt) after this long without a chunk.
        self.stall_s = 120.0

    def machine_specs(self) -> list[MachineSpec]:
        return [MachineSpec(OtaMachine, self.settings)]

    def install(self) -> None:
        register = self.gateway.runner.register
        register(FetchControllerRepo, self._fetch, blocking=True)
        register(DownloadPackage, self._download, blocking=True)
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

    def chunks(self) -> MqttChunks | None:
        """The chunk source on the MQTT link (None without one), hooked into its inbound routing."""
        with self._client_lock:
            if self._chunks is None:
                link = getattr(self.gateway.components.get("mqtt"), "link", None)
                if link is None:
                    return None
                self._chunks = MqttChunks(link.publish_async)
                link.inbound.chunk_sink = self._chunks.deliver
            return self._chunks

    def _download(self, effect: DownloadPackage, completion: Completion) -> None:
        try:
            result = self.download_and_install(effect, stopped=lambda: completion.settled)
        except PackageError as exc:
            completion.fail(str(exc), {"transient": exc.transient})
            return
        except OSError as exc:  # the disk filled up under the download, permissions
            completion.fail(f"writing the OTA package failed: {exc.strerror or exc} ({exc.filename})")
            return
        completion.succeed(result)

    def download_and_install(self, effect: DownloadPackage, stopped: Any = lambda: False) -> dict[str, Any]:
        """Download (resuming), verify, then install by content; PackageError says why not."""
        error = ota_package.checksum_error(effect.checksum_algorithm)
        if error:
            raise PackageError(error)
        directory = Path(effect.data_dir or self.settings["package_dir"])
        part = PartFile(directory, effect.checksum, effect.checksum_algorithm.upper(), effect.size, effect.chunk_size)
        part.remove_others()  # one package at a time: a superseded download's file only takes space
        ota_package.check_disk(directory, effect.size, have=part.existing_bytes())  # before anything is written
        source = self.chunks()
        if source is None:
            raise PackageError("no MQTT link to download the package over", transient=True)
        started = time.monotonic()
        # "The requestId has to be different for each firmware update" (ThingsBoard's OTA docs).
        fetched = ota_package.download(
            source, part, kind=effect.kind, request_id=random.randint(1, 2**31 - 1), stall_s=self.stall_s,
            stopped=stopped, progress=_progress_logger(effect.version))
        seconds = round(time.monotonic() - started, 3)
        log.info("OTA package of %s: downloaded %d bytes in %.3f s (%d chunk requests, resumed at chunk %d)",
                 effect.version, fetched["bytes"], seconds, fetched["requests"], fetched["resumed_at"])
        ota_package.verify(part, effect.checksum, effect.checksum_algorithm)
        kind = ota_package.package_kind(part.path)
        try:
            self._install(kind, part.path, effect)
        finally:
            part.remove()  # installed (or not installable): the file itself is not kept
        log.info("OTA package of %s installed from a %s", effect.version,
                 {"bundle": "git bundle", "image": "docker image archive"}.get(kind, "file that is neither"))
        return {"kind": kind, "seconds": seconds, **fetched}

    def _install(self, kind: str, path: Path, effect: DownloadPackage) -> None:
        if kind == "bundle":
            try:
                ControllerRepo(effect.git_dir).fetch_bundle(path)
            except GitRepoError as exc:
                raise PackageError(f"fetching from the git bundle failed: {exc}") from None
        elif kind == "image":
            try:
                self.images().load(path, effect.image)
            except ImageError as exc:
                raise PackageError(str(exc)) from None
            except docker.errors.DockerException as exc:
                raise PackageError(f"Docker engine unreachable or failing: {exc}", transient=True) from None

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


def _progress_logger(version: str) -> Any:
    """Log every tenth of the download (ThingsBoard hears DOWNLOADING once, as from its own SDK)."""
    said = [-1]

    def progress(done: int, size: int | None) -> None:
        if size:
            tenth = done * 10 // size
            if tenth > said[0]:
                said[0] = tenth
                log.info("downloading the OTA package of %s: %d of %d bytes", version, done, size)

    return progress
