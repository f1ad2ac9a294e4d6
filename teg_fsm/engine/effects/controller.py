"""Effects on the controller container (handled by ``teg_fsm/adapters/docker_engine.py``).

Also the naming contract of the existing gateway (container ``teg_controller``,
images ``teg-controller-<version>:latest``) and the error prefix an adapter
uses when the Docker engine itself is unreachable. These are pure, so the
machine, the adapter and the OTA image code can all import them.
"""

from __future__ import annotations

import attrs

from teg_fsm.engine.effects import Effect

CONTAINER_NAME = "teg_controller"
IMAGE_PREFIX = "teg-controller-"
IMAGE_SUFFIX = ":latest"
# Failed effects say "no engine, not a bad controller" by starting their error
# with this text and carrying ``{"engine_unreachable": true}`` beside it.
ENGINE_UNREACHABLE = "docker engine unreachable"


def image_name(version: str) -> str:
    """``v1.2.3`` -> ``teg-controller-v1.2.3:latest``."""
    return f"{IMAGE_PREFIX}{version}{IMAGE_SUFFIX}"


def version_of_image(image: str) -> str | None:
    """The version in a controller image name, or None if it is not one of ours."""
    name = image.removeprefix("docker.io/library/")
    if not name.startswith(IMAGE_PREFIX):
        return None
    version = name[len(IMAGE_PREFIX):]
    version = version.removesuffix(IMAGE_SUFFIX)
    return version or None


@attrs.frozen(kw_only=True)
class InspectController(Effect):
    """Look at the controller container.

    Succeeds with ``{"found", "running", "version", "container_id",
    "started_at_ms"}`` (version None when the image is not a controller image).
    """


@attrs.frozen(kw_only=True)
class StartController(Effect):
    """Replace whatever controller container exists by a fresh one of ``version``.

    Stops a running one (with the configured stop timeout), removes stopped
    leftovers of that name, then creates and starts the container from
    ``teg-controller-<version>:latest``. Succeeds with ``{"container_id",
    "started_at_ms", "version"}``.
    """

    version: str


@attrs.frozen(kw_only=True)
class StopController(Effect):
    """Stop the container ``container_id`` (not "whatever has the name": a newer
    container may already carry it when this runs)."""

    container_id: str


@attrs.frozen(kw_only=True)
class ReadControllerHealth(Effect):
    """Read the controller's last health check and whether its container runs.

    Succeeds with ``{"health_ts_ms": int | None, "running": bool | None,
    "container_id": str | None, "asked_for": <container_id>}``; ``None`` means
    unknown (no table yet, or the engine did not answer). ``container_id`` is the
    container the machine believes runs; it comes back as ``asked_for`` so a late
    answer about a container replaced meanwhile can be told apart.
    """

    container_id: str | None = None
