"""OTA end to end: a real git repository with tags, a real Docker engine, a real
gateway (dispatcher threads, journal, worker pool); the controller side of the
swap is a small stand-in acting on the real engine (tests/integration/ota_rig.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.integration.ota_rig import EXITS, HEALTHY, OtaRig, controller_files

# no_mqtt: the gateway here has only its OTA component and a rig stand-in for the controller: no MQTT (the MQTT 5 pass leaves it out).
pytestmark = [pytest.mark.integration, pytest.mark.no_mqtt]


@pytest.fixture
def versions() -> dict[str, str]:
    # Unique per run: image names are global in the engine.
    suffix = uuid.uuid4().hex[:6]
    return {name: f"{name}-{suffix}" for name in ("v1", "v2", "v3", "v4")}


@pytest.fixture
def rig(tmp_path: Path, git_repo_factory, docker_client: docker.DockerClient, base_image: str,
        docker_test_labels: dict[str, str], versions: dict[str, str]) -> Iterator[OtaRig]:
    repo = git_repo_factory("controller")
    for name, script in (("v1", HEALTHY), ("v2", EXITS), ("v3", HEALTHY)):
        repo.commit(controller_files(base_image, script + f"# {name}\n"), f"controller {name}")
        repo.tag(versions[name])
    repo.push()
    device_repo = tmp_path / "device" / "controller"
    repo.clone(device_repo)
    # v4 is tagged only after the device cloned: fetching is what brings it.
    repo.commit(controller_files(base_image, HEALTHY + "# v4\n"), "controller v4")
    repo.tag(versions["v4"])
    repo.push()
    rig = OtaRig(client=docker_client, data_dir=tmp_path / "data", git_dir=device_repo / ".git",
                 labels=docker_test_labels)
    rig.start()
    try:
        yield rig
    finally:
        rig.stop()
        rig.controller.remove()
        rig.remove_images()


def test_assign_good_bad_missing_and_good_again(rig: OtaRig, versions: dict[str, str]) -> None:
    v1, v2, v3 = versions["v1"], versions["v2"], versions["v3"]

    mark = len(rig.reports)
    rig.assign(v1)
    updated = rig.wait_report("UPDATED", mark)
    assert updated["current_sw_version"] == v1
    assert rig.controller.running_version() == v1
    assert (rig.data_dir / "last_launched_controller_version.txt").read_text().strip() == v1
    assert [r["sw_state"] for r in rig.reports[mark:]] == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]

    mark = len(rig.reports)
    rig.assign(v2)  # exits at start
    failed = rig.wait_report("FAILED", mark)
    assert failed["sw_error"].startswith(f"rolled back to {v1}: probation of {v2} failed")
    assert failed["current_sw_version"] == v1
    rig.wait_for(lambda: rig.controller.running_version() == v1, 30, "v1 running again")
    assert (rig.data_dir / "last_launched_controller_version.txt").read_text().strip() == v1

    mark = len(rig.reports)
    rig.assign("v9-does-not-exist")
    failed = rig.wait_report("FAILED", mark)
    assert "tag v9-does-not-exist does not exist" in failed["sw_error"]
    assert [r["sw_state"] for r in rig.reports[mark:]] == ["DOWNLOADING", "FAILED"]
    assert rig.controller.running_version() == v1

    mark = len(rig.reports)
    rig.assign(v3)
    updated = rig.wait_report("UPDATED", mark)
    assert updated["current_sw_version"] == v3 and rig.controller.running_version() == v3
    assert (rig.data_dir / "last_launched_controller_version.txt").read_text().strip() == v3


def test_refused_version_touches_neither_git_nor_docker(rig: OtaRig, versions: dict[str, str]) -> None:
    mark = len(rig.reports)
    rig.assign("v1; docker rm -f teg_controller")
    failed = rig.wait_report("FAILED", mark, timeout_s=10)
    assert "refused version" in failed["sw_error"]
    assert rig.ota_state() == "idle"


def test_tag_pushed_after_clone_is_fetched_and_installed(rig: OtaRig, versions: dict[str, str]) -> None:
    mark = len(rig.reports)
    rig.assign(versions["v4"])
    rig.wait_report("UPDATED", mark)
    assert rig.controller.running_version() == versions["v4"]


def test_gateway_killed_in_probation_resumes_and_commits(rig: OtaRig, versions: dict[str, str]) -> None:
    v1 = versions["v1"]
    rig.settings["probation_s"] = 4.0
    rig.stop()
    rig.start()
    mark = len(rig.reports)
    rig.assign(v1)
    rig.wait_for(lambda: rig.ota_state() == "probation", 60, "probation")
    rig.stop()  # the process dies; the new controller keeps running
    rig.start()
    rig.wait_report("UPDATED", mark)
    assert rig.controller.running_version() == v1


def test_gateway_killed_while_building_resumes_and_commits(rig: OtaRig, versions: dict[str, str]) -> None:
    v3 = versions["v3"]
    mark = len(rig.reports)
    rig.assign(v3)
    rig.wait_for(lambda: rig.ota_state() == "building", 60, "building")
    rig.stop()
    rig.start()
    rig.wait_report("UPDATED", mark)
    assert rig.controller.running_version() == v3
