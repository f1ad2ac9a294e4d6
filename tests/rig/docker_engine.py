"""Docker fixtures: the engine ``tools/ci/test.sh`` made reachable, the local base
image, a helper to build small test images, and a leak check.

Everything the rig creates carries ``teg-test=1`` and a per-session label, so a
session cleans up only its own containers and images even on a shared engine.
Images built with :func:`build_image` carry the labels too, and Docker copies
image labels onto containers, so containers the gateway's own adapter starts
from a test image are tracked as well.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.images import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
# The one place the base image name lives; tools/ci/base_image.sh reads it too.
BASE_IMAGE_NAME_FILE = REPO_ROOT / "tools" / "ci" / "base-image-name"
TEST_LABEL = "teg-test"
SESSION_LABEL = "teg-test-session"

BuildImage = Callable[..., Image]


def base_image_name() -> str:
    """The local base image's name, e.g. ``teg-base:latest``."""
    return BASE_IMAGE_NAME_FILE.read_text().strip()


@pytest.fixture(scope="session")
def docker_test_labels() -> dict[str, str]:
    """Labels to put on every container or image a test creates."""
    return {TEST_LABEL: "1", SESSION_LABEL: uuid.uuid4().hex}


def _session_filter(labels: Mapping[str, str]) -> dict[str, list[str]]:
    return {"label": [f"{SESSION_LABEL}={labels[SESSION_LABEL]}"]}


def _cleanup(client: docker.DockerClient, labels: Mapping[str, str], tags: list[str]) -> None:
    # Best effort: a failed cleanup must not hide the test results.
    for container in client.containers.list(all=True, filters=_session_filter(labels)):
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass
    for tag in tags:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.APIError:
            pass


@pytest.fixture(scope="session")
def _built_image_tags() -> list[str]:
    return []


@pytest.fixture(scope="session")
def docker_client(
    docker_test_labels: dict[str, str], _built_image_tags: list[str]
) -> Iterator[docker.DockerClient]:
    """A client for DOCKER_HOST (or the default socket); fails if unreachable."""
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    error = None
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no engine"
        error = exc
    if error is not None:  # failing outside `except` keeps the report to one line
        pytest.fail(f"Docker engine unreachable at {where}: {error}. "
                    "Run the tests through tools/ci/test.sh, which starts one.",
                    pytrace=False)
    try:
        yield client
    finally:
        _cleanup(client, docker_test_labels, _built_image_tags)
        client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """The local base image's name; fails if the image is not in the engine."""
    name = base_image_name()
    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        pytest.fail(f"base image {name} missing: run tools/ci/base_image.sh "
                    "(tools/ci/test.sh does)", pytrace=False)
    return name


def _context_tar(dockerfile_text: str, files: Mapping[str, str | bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in {"Dockerfile": dockerfile_text, **files}.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@pytest.fixture(scope="session")
def build_image(
    docker_client: docker.DockerClient,
    base_image: str,
    docker_test_labels: dict[str, str],
    _built_image_tags: list[str],
) -> BuildImage:
    """``build_image(tag, dockerfile_text, context_files=None) -> Image``.

    Builds with the engine (no registry: start ``FROM`` the base image, whose
    name is ``base_image``), labelled for cleanup, removed at session end.
    """

    def build(tag: str, dockerfile_text: str,
              context_files: Mapping[str, str | bytes] | None = None) -> Image:
        _built_image_tags.append(tag)
        try:
            image, _logs = docker_client.images.build(
                fileobj=_context_tar(dockerfile_text, context_files or {}),
                custom_context=True, tag=tag, labels=dict(docker_test_labels),
                rm=True, forcerm=True, pull=False,
                # The rig's private engine has no bridge network.
                network_mode="host",
            )
        except docker.errors.BuildError as exc:
            log = "".join(str(chunk.get("stream", chunk)) for chunk in exc.build_log)
            pytest.fail(f"docker build of {tag} failed: {exc.msg}\n{log}", pytrace=False)
        return image

    return build


def _running(client: docker.DockerClient, labels: Mapping[str, str]) -> dict[str, str]:
    found = client.containers.list(filters=_session_filter(labels))
    return {c.id: c.name for c in found}


@pytest.fixture(autouse=True)
def _no_leaked_test_containers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a Docker-using test that leaves this session's containers running."""
    if "docker_client" not in request.fixturenames:
        yield
        return
    client: docker.DockerClient = request.getfixturevalue("docker_client")
    labels: dict[str, str] = request.getfixturevalue("docker_test_labels")
    before = _running(client, labels)
    yield
    leaked = {cid: name for cid, name in _running(client, labels).items() if cid not in before}
    if leaked:
        for cid in leaked:
            try:
                client.containers.get(cid).remove(force=True)
            except docker.errors.APIError:
                pass
        pytest.fail(f"test left containers running: {sorted(leaked.values())}", pytrace=False)


CONTROLLER = "teg_controller"


def remove_controller(client: docker.DockerClient) -> None:
    """Remove the gateway's controller container if there is one (a test owns the engine's while it runs)."""
    try:
        client.containers.get(CONTROLLER).remove(force=True)
    except docker.errors.NotFound:
        pass


def remove_controller_images(client: docker.DockerClient, versions: list[str]) -> None:
    for version in versions:
        try:
            client.images.remove(f"teg-controller-{version}:latest", force=True)
        except docker.errors.APIError:
            pass


@pytest.fixture
def controller_release(docker_client: docker.DockerClient, base_image: str) -> Iterator[str]:
    """A controller version unique to this test; no controller before, its container and image gone after."""
    version = f"v1.0.0-{uuid.uuid4().hex[:6]}"
    remove_controller(docker_client)
    yield version
    remove_controller(docker_client)
    remove_controller_images(docker_client, [version])
