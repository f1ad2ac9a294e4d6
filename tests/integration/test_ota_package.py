"""OTA from ThingsBoard's package store, end to end: ``teg run`` against the stand-in.

The station has no route to the git host (its ``origin`` points nowhere); the
stand-in serves the package's file in chunks as ThingsBoard does
(``MqttTransportHandler.getOtaPackageCallback``/``sendOtaPackage``, PROTOCOL.md
section 5.2). One station lives through: a package too large for its disk, a
checksum mismatch (SHA256, then MURMUR3_32), a git bundle verified with
MURMUR3_128 whose download is cut by a disconnect, a ``docker save`` archive
whose download is cut by SIGKILL, and a package too large for its disk assigned
while the station is down (its ``sw_size`` learnt from the attribute answer
after the connect). The controller
image is built from the local base image, never pulled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import git
import pytest

from tests.rig.docker_engine import remove_controller, remove_controller_images
from tests.rig.protocol import protocol_env
from tests.rig.waiting import wait_for
from tools.demo import DEVICE, PROFILE_KEY, PROFILE_SECRET, gateway_env, make_controller_repo
from tools.tb_standin import StandIn
from tools.tb_standin import ota as standin_ota

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PAYLOAD_MB = 8  # incompressible bytes in the bundle's v2, so the download takes many chunks
CHUNK = 65536  # TEG_OTA_CHUNK_SIZE's default


class Station:
    """``teg run`` in a subprocess that can be killed and started again."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = work / "gateway.log"

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen([sys.executable, "-m", "teg_fsm.cli", "run"], cwd=REPO, env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(25) == 0

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def versions() -> dict[str, str]:
    run = uuid.uuid4().hex[:6]
    return {name: f"{name}.0.0-{run}" for name in ("v1", "v2", "v3", "v4", "v7", "v8", "v9")}


@pytest.fixture
def upstream(tmp_path: Path, base_image: str, docker_test_labels: dict[str, str],
             versions: dict[str, str]) -> tuple[Path, Path]:
    """(the station's repository with only v1, an upstream clone with v2, v3, v4 that the station cannot reach)."""
    labels = " ".join(f"{k}={v}" for k, v in docker_test_labels.items())
    station_repo = make_controller_repo(tmp_path, releases=((versions["v1"], "healthy"),),
                                        dockerfile_extra=f"LABEL {labels}\n")
    clone = tmp_path / "upstream"
    repo = git.Repo.clone_from(tmp_path / "controller-origin.git", clone)
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "TEG test")
        cfg.set_value("user", "email", "test@teg.invalid")
    for name in ("v2", "v3", "v4"):
        (clone / "docker" / "release.env").write_text(
            f"CONTROLLER_VERSION={versions[name]}\nCONTROLLER_BEHAVIOUR=healthy\n")
        paths = ["docker/release.env"]
        if name == "v2":
            (clone / "payload.bin").write_bytes(os.urandom(PAYLOAD_MB << 20))
            paths.append("payload.bin")
        repo.index.add(paths)
        repo.index.commit(f"release {versions[name]}")
        repo.create_tag(versions[name], message=f"release {versions[name]}")
    # No route to the git host: only OTA packages can bring new versions.
    git.Repo(station_repo).remotes.origin.set_url(str(tmp_path / "no-such-host" / "controller.git"))
    return station_repo, clone


@pytest.fixture
def engine(docker_client: docker.DockerClient, versions: dict[str, str]) -> Iterator[docker.DockerClient]:
    remove_controller(docker_client)
    yield docker_client
    remove_controller(docker_client)
    remove_controller_images(docker_client, list(versions.values()))


def _bundle(clone: Path) -> bytes:
    """What an operator uploads: ``git bundle create controller.bundle --all``."""
    path = clone.parent / "controller.bundle"
    subprocess.run(["git", "-C", str(clone), "bundle", "create", str(path), "--all"], check=True,
                   capture_output=True)
    return path.read_bytes()


def _image_archive(client: docker.DockerClient, clone: Path, version: str, labels: dict[str, str]) -> bytes:
    """What an operator uploads: ``docker save`` of the controller image, built from the tag elsewhere."""
    worktree = clone.parent / f"build-{version}"
    subprocess.run(["git", "-C", str(clone), "worktree", "add", "--detach", str(worktree), version], check=True,
                   capture_output=True)
    tag = f"teg-pkgsrc-{version}:latest"
    client.images.build(path=str(worktree / "docker"), tag=tag, labels=labels, rm=True, pull=False,
                        network_mode="host")
    archive = b"".join(client.images.get(tag).save(named=True))
    client.images.remove(tag)  # the station's engine must get it from the package only
    return archive


def _latest(tb: StandIn, key: str) -> Any:
    return tb.latest(DEVICE).get(key)


def _latest_shared(tb: StandIn, key: str) -> Any:
    return tb.shared(DEVICE).get(key)


def _wait_state(tb: StandIn, state: str, version: str | None = None, timeout: float = 240) -> None:
    wait_for(lambda: _latest(tb, "sw_state") == state
             and (version is None or _latest(tb, "current_sw_version") == version), timeout,
             f"sw_state {state} {version or ''}", 0.2)


def _wait_error(tb: StandIn, prefix: str, timeout: float = 120) -> None:
    wait_for(lambda: _latest(tb, "sw_state") == "FAILED" and str(_latest(tb, "sw_error")).startswith(prefix),
             timeout, f"FAILED with {prefix!r}", 0.2)


def _chunks_since(tb: StandIn, since: float) -> list[tuple[str, int]]:
    """(requestId, chunk index) of every chunk request the stand-in saw since ``since``."""
    found = []
    for event in tb.events(DEVICE, "ota_chunk_request"):
        if event.ts >= since:
            _kind, request_id, index = event.detail.split()
            found.append((request_id, int(index)))
    return found


def _running_image(client: docker.DockerClient) -> str:
    try:
        attrs = client.containers.get("teg_controller").attrs
    except docker.errors.NotFound:
        return ""
    return attrs["Config"]["Image"] if attrs["State"]["Running"] else ""


def test_packages_from_thingsboard_install_without_the_git_host(
    tmp_path: Path, engine: docker.DockerClient, upstream: tuple[Path, Path], versions: dict[str, str],
    docker_test_labels: dict[str, str],
) -> None:
    station_repo, clone = upstream
    v1, v2, v3, v4 = (versions[n] for n in ("v1", "v2", "v3", "v4"))
    bundle = _bundle(clone)
    archive = _image_archive(engine, clone, v3, docker_test_labels)
    ota_dir = tmp_path / "data" / "ota"
    with StandIn(tls_port=0) as tb:
        tb.add_provision_profile(PROFILE_KEY, PROFILE_SECRET)
        env = {**gateway_env(tmp_path, tb, station_repo), "DOCKER_HOST": os.environ.get("DOCKER_HOST", ""),
               "TEG_DEFAULT_CONTROLLER_VERSION": v1, **protocol_env()}
        station = Station(tmp_path, env)
        station.start()
        try:
            # First start: v1 is in the local refs; the failed fetch does not stop it.
            wait_for(lambda: _running_image(engine) == f"teg-controller-{v1}:latest", 240, "v1 running", 0.2)

            # Larger than the disk: refused before one chunk is asked for, nothing written.
            mark = time.time()
            tb.set_shared(DEVICE, {"sw_title": "controller", "sw_version": versions["v9"], "sw_size": 1 << 60,
                                   "sw_checksum_algorithm": "SHA256", "sw_checksum": "ab" * 32})
            _wait_error(tb, f"downloading the OTA package of {versions['v9']} failed: the package needs")
            assert re.search(r"needs \d+ bytes but only \d+ bytes are free", _latest(tb, "sw_error"))
            assert _chunks_since(tb, mark) == [] and not any(ota_dir.glob("*"))

            # Checksum mismatch (the operator typed a wrong checksum): FAILED, nothing installed, file removed.
            tb.assign_ota(DEVICE, "sw", "controller", v4, bundle, checksum="0" * 64)
            _wait_error(tb, f"downloading the OTA package of {v4} failed: checksum verification failed (SHA256)")
            assert _latest(tb, "current_sw_version") == v1
            assert v4 not in [t.name for t in git.Repo(station_repo).tags]
            assert not any(ota_dir.glob("*")) and _running_image(engine) == f"teg-controller-{v1}:latest"
            # A wrong MURMUR3_32 checksum (ThingsBoard's Guava hex of other bytes): refused the same way.
            # (Another version: a release that failed stays blocked until reassigned differently.)
            v7 = versions["v7"]
            tb.assign_ota(DEVICE, "sw", "controller", v7, bundle, checksum_algorithm="MURMUR3_32",
                          checksum=standin_ota.checksum(bundle + b"x", "MURMUR3_32"))
            _wait_error(tb, f"downloading the OTA package of {v7} failed: checksum verification failed (MURMUR3_32)")
            assert _latest(tb, "current_sw_version") == v1
            assert v7 not in [t.name for t in git.Repo(station_repo).tags]
            assert not any(ota_dir.glob("*")) and _running_image(engine) == f"teg-controller-{v1}:latest"
            rate = re.findall(r"downloaded (\d+) bytes in ([\d.]+) s", station.log())[-1]
            print(f"\nOTA package download: {int(rate[0]) / 1e6:.2f} MB in {rate[1]} s "
                  f"({int(rate[0]) / 1e6 / float(rate[1]):.2f} MB/s, 64 KiB chunks)")

            # A git bundle checksummed with MURMUR3_128 (as ThingsBoard computes it), its download cut by a
            # disconnect: it resumes, it does not start over.
            tb.delay_pubacks(0.005)  # each chunk follows its PUBACK: slow enough to cut in the middle
            mark = time.time()
            tb.assign_ota(DEVICE, "sw", "controller", v2, bundle, checksum_algorithm="MURMUR3_128")
            assert _latest_shared(tb, "sw_checksum") == standin_ota.checksum(bundle, "MURMUR3_128")
            wait_for(lambda: len(_chunks_since(tb, mark)) >= 40, 60, "40 chunk requests", 0.02)
            assert tb.disconnect(DEVICE)
            tb.delay_pubacks(0.0)
            _wait_state(tb, "UPDATED", v2)
            asked = [index for _, index in _chunks_since(tb, mark)]
            assert asked.count(0) == 1 and max(asked) >= len(bundle) // CHUNK
            assert len(asked) < len(bundle) // CHUNK + 10  # a few chunks asked again, not the file
            assert _running_image(engine) == f"teg-controller-{v2}:latest"
            states = [value for ts, value in tb.telemetry(DEVICE, "sw_state") if ts >= mark * 1000]
            assert states[-5:] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]

            # A docker image archive, the gateway SIGKILLed in the middle of its download.
            mark = time.time()
            tb.assign_ota(DEVICE, "sw", "controller", v3, archive)
            wait_for(lambda: len(_chunks_since(tb, mark)) >= 40, 60, "40 chunk requests", 0.02)
            station.kill()
            killed_at = max(index for _, index in _chunks_since(tb, mark))
            assert killed_at < len(archive) // CHUNK
            station.start()
            _wait_state(tb, "UPDATED", v3)
            requests = _chunks_since(tb, mark)
            assert len({request_id for request_id, _ in requests}) == 2  # one download per process
            after = [index for request_id, index in requests if request_id == requests[-1][0]]
            assert after[0] > 0 and after[0] >= killed_at - 1  # resumed after the last recorded chunk
            assert [index for _, index in requests].count(0) == 1
            assert _running_image(engine) == f"teg-controller-{v3}:latest"
            station_git = git.Repo(station_repo)
            assert station_git.head.commit == station_git.tags[v2].commit  # no checkout of v3: the image was used
            assert not any(ota_dir.glob("*"))

            # Assigned while the station is down, larger than its disk: after the restart the attribute
            # answer carries sw_size (connection.SHARED_KEYS), so it is refused before one chunk.
            station.stop()
            tb.set_shared(DEVICE, {"sw_title": "controller", "sw_version": versions["v8"], "sw_size": 1 << 60,
                                   "sw_checksum_algorithm": "SHA256", "sw_checksum": "cd" * 32})
            mark = time.time()
            station.start()
            _wait_error(tb, f"downloading the OTA package of {versions['v8']} failed: the package needs")
            assert _chunks_since(tb, mark) == [] and not any(ota_dir.glob("*"))
            assert _running_image(engine) == f"teg-controller-{v3}:latest"
        except BaseException:
            print(station.log()[-8000:])
            raise
        finally:
            station.stop()
    for tag in (f"teg-pkgsrc-{v3}:latest",):
        try:
            engine.images.remove(tag)
        except docker.errors.APIError:
            pass
