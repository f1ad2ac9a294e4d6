"""Controller images on the Docker engine: exists, build, free disk, prune.

Runs on the effect runner's worker threads. Builds are serialised by a lock:
a build whose effect timed out keeps running in the engine, and the next one
waits for it, so there are never two builds at once. Only images named
``teg-controller-*`` are ever removed (no engine-wide prune), and never one a
container uses (removal without force fails for those; we skip them).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

# docker-py on import: this module is itself imported only when the first image is needed.
import docker
import docker.errors

log = logging.getLogger(__name__)

PREFIX = "teg-controller-"


class ImageError(Exception):
    """A build or disk check failed; the message says why, for sw_error."""


class ControllerImages:
    """The gateway's view of the engine's controller images."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self._build_lock = threading.Lock()

    def exists(self, image: str) -> bool:
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            return False
        return True

    def free_mb(self, fallback: Path | None = None) -> int | None:
        """Free space where the engine keeps images, when that path is visible from here."""
        for candidate in (self._root_dir(), fallback):
            if candidate is not None and candidate.exists():
                return shutil.disk_usage(candidate).free // (1024 * 1024)
        return None

    def _root_dir(self) -> Path | None:
        try:
            root = self.client.info().get("DockerRootDir")
        except docker.errors.APIError:
            return None
        return Path(root) if root else None

    def build(self, *, context_dir: str, dockerfile: str, image: str, min_free_mb: int,
              labels: Mapping[str, str] | None = None, network_mode: str | None = None,
              timeout_s: float | None = None) -> dict[str, object]:
        """Build ``image`` unless it exists; returns ``{"cached": bool, "image_id": str}``."""
        with self._build_lock:
            if self.exists(image):
                return {"cached": True, "image_id": self.client.images.get(image).id}
            if not context_dir.strip():
                raise ImageError("no docker context configured: set TEG_CONTROLLER_DOCKERCONTEXT_PATH")
            context = Path(context_dir)
            if not context.is_dir():
                raise ImageError(f"docker context {context} does not exist (TEG_CONTROLLER_DOCKERCONTEXT_PATH)")
            rel = _dockerfile_in_context(context, dockerfile)
            free = self.free_mb(context)
            if free is not None and free < min_free_mb:
                raise ImageError(f"only {free} MB free for the image, {min_free_mb} MB needed: free disk space "
                                 "or lower TEG_OTA_MIN_FREE_DISK_MB")
            try:
                built, _logs = self.client.images.build(
                    path=str(context), dockerfile=rel, tag=image, labels=dict(labels or {}),
                    rm=True, forcerm=True, pull=False, network_mode=network_mode, timeout=timeout_s,
                )
            except docker.errors.BuildError as exc:
                raise ImageError(f"docker build failed: {_last_lines(exc.build_log) or exc.msg}") from None
            except docker.errors.APIError as exc:
                raise ImageError(f"docker build failed: {exc.explanation or exc}") from None
            return {"cached": False, "image_id": built.id}

    def load(self, archive: Path, image: str) -> dict[str, object]:
        """``docker load`` a ``docker save`` archive and tag its (first) image as ``image``."""
        with self._build_lock, archive.open("rb") as stream:
            try:
                loaded = self.client.images.load(stream)
            except docker.errors.APIError as exc:
                raise ImageError(f"docker load failed: {exc.explanation or exc}") from None
            if not loaded:
                raise ImageError("docker load found no image in the package")
            repository, _, tag = image.rpartition(":")
            loaded[0].tag(repository, tag or "latest")
            return {"image_id": loaded[0].id, "loaded": [t for img in loaded for t in img.tags]}

    def prune(self, keep: Iterable[str], keep_count: int) -> list[str]:
        """Remove controller images not in ``keep`` beyond the ``keep_count`` newest; returns removed tags."""
        keep_set = set(keep)
        others = []
        for img in self.client.images.list():
            tags = [t for t in img.tags if t.startswith(PREFIX)]
            if tags and not keep_set.intersection(img.tags):
                others.append((img.attrs.get("Created", ""), tags))
        others.sort(reverse=True)  # newest first (ISO timestamps sort as text)
        removed: list[str] = []
        for _created, tags in others[max(keep_count, 0):]:
            for tag in tags:
                try:
                    self.client.images.remove(tag, noprune=False)
                    removed.append(tag)
                except docker.errors.APIError as exc:  # in use by a container, or already gone
                    log.info("keeping image %s: %s", tag, getattr(exc, "explanation", exc))
        return removed


def _dockerfile_in_context(context: Path, dockerfile: str) -> str:
    """The Dockerfile path relative to the context, as the engine wants it."""
    path = Path(dockerfile)
    full = path if path.is_absolute() else context / path
    if not full.is_file():
        raise ImageError(f"Dockerfile {full} does not exist (TEG_CONTROLLER_DOCKERFILE_PATH)")
    try:
        return str(full.resolve().relative_to(context.resolve()))
    except ValueError:
        raise ImageError(f"Dockerfile {full} lies outside the docker context {context}") from None


def _last_lines(build_log: Iterable[Mapping[str, object]], count: int = 3) -> str:
    lines: list[str] = []
    for chunk in build_log:
        text = str(chunk.get("stream") or chunk.get("error") or "").strip()
        if text:
            lines.append(text)
    return " | ".join(lines[-count:])
