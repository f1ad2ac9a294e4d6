"""OTA from ThingsBoard's package store, pure: the same machine and states, another fetch effect.

ThingsBoard sets ``sw_size``, ``sw_checksum_algorithm``, ``sw_checksum`` and deletes
``sw_url`` when the package carries a file (DefaultOtaPackageStateService, PROTOCOL.md
section 5.1; DefaultOtaPackageStateService.updateAttributes, the ``else`` branch of
``otaPackage.hasUrl()``); an external package has ``sw_url`` and cannot be fetched over
MQTT (MqttTransportHandler.java:792-799 answers FAILURE). Reports follow the Python device
SDK (tb_device_mqtt.py @00018ac: DOWNLOADING once in ``_on_decoded_message``, DOWNLOADED
then VERIFIED in ``__process_firmware``).
"""

from __future__ import annotations

from pathlib import Path

from teg_fsm.engine.clock import FakeClock
from teg_fsm.engine.effects.ota import DownloadPackage
from teg_fsm.engine.events import Outcome
from teg_fsm.machines.connection import SHARED_KEYS
from teg_fsm.machines.ota import OtaMachine
from tests.machines.ota_fakes import FakeGateway, FakeWorld

FILE = {"sw_size": 4096, "sw_checksum_algorithm": "SHA256", "sw_checksum": "ab" * 32}


def _gateway(tmp_path: Path, world: FakeWorld, **settings: object) -> FakeGateway:
    return FakeGateway(world, tmp_path / "journal.db", FakeClock(), dict(settings))


def test_a_package_with_a_file_is_downloaded_instead_of_fetching_the_remote(tmp_path: Path) -> None:
    # v2 is on no remote at all: only the bundle brings it.
    world = FakeWorld(tags=set(), packages={FILE["sw_checksum"]: "bundle"})
    gateway = _gateway(tmp_path, world, package_dir="/data/ota", chunk_size=8192)
    gateway.assign("v2", push=True, package=FILE)
    gateway.settle()
    [download] = world.downloads
    assert isinstance(download, DownloadPackage)
    assert (download.size, download.checksum, download.checksum_algorithm) == (4096, "ab" * 32, "SHA256")
    assert (download.chunk_size, download.data_dir, download.image) == (8192, "/data/ota", "teg-controller-v2:latest")
    assert world.running == "v2" and world.builds == 1
    # The states ThingsBoard's device SDK reports (DOWNLOADING once, then DOWNLOADED when the file is whole).
    assert world.sw_states() == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]


def test_a_package_learnt_from_the_answer_after_a_connect_carries_its_size(tmp_path: Path) -> None:
    # Assigned while the gateway was down: only the attribute answer after the connect tells it, and the
    # connection machine asks for sw_size there, so the download can be refused for the disk before a chunk.
    assert {"sw_size", "sw_checksum", "sw_checksum_algorithm"} <= set(SHARED_KEYS)
    world = FakeWorld(tags=set(), packages={FILE["sw_checksum"]: "bundle"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", package=FILE)
    gateway.settle()
    [download] = world.downloads
    assert (download.size, download.checksum, download.checksum_algorithm) == (4096, "ab" * 32, "SHA256")


def test_an_image_archive_skips_checkout_and_build(tmp_path: Path) -> None:
    world = FakeWorld(tags=set(), local_tags=set(), packages={FILE["sw_checksum"]: "image"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True, package=FILE)
    assert gateway.run_until_state("building")
    gateway.settle()
    assert world.running == "v2" and world.builds == 0  # the loaded image is used as it is
    assert world.sw_states() == ["DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING", "UPDATED"]


def test_a_dummy_file_falls_back_to_the_git_remote(tmp_path: Path) -> None:
    """Operators used to upload any file just to create a package: the remote is fetched as before."""
    world = FakeWorld(tags={"v1", "v2"}, packages={FILE["sw_checksum"]: "other"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True, package=FILE)
    gateway.settle()
    assert len(world.downloads) == 1 and "v2" in world.local_tags
    assert world.running == "v2" and world.sw_states()[-1] == "UPDATED"


def test_an_external_url_package_uses_the_git_remote(tmp_path: Path) -> None:
    world = FakeWorld(tags={"v1", "v2"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True, package={"sw_url": "https://example.invalid/v2.bin", "sw_checksum": "ab" * 32})
    gateway.settle()
    assert world.downloads == [] and world.running == "v2"


def test_checksum_mismatch_fails_and_blocks_without_touching_the_controller(tmp_path: Path) -> None:
    world = FakeWorld(tags=set(), packages={FILE["sw_checksum"]: "bundle"})
    world.faults["DownloadPackage"] = (Outcome.FAILED, "checksum mismatch (SHA256): expected abab..., got 0000...")
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True, package=FILE)
    gateway.settle()
    assert world.sw_states() == ["DOWNLOADING", "FAILED"]
    assert world.reports[-1]["sw_error"].startswith("downloading the OTA package of v2 failed: checksum mismatch")
    assert world.running == "v1" and world.builds == 0
    assert gateway.ota.state_name == "failed" and gateway.ota.data.blocked == "v2"
    gateway.settle(3600)
    assert len(world.downloads) == 0  # blocked: not retried until reassigned or ota_retry


def test_a_download_cut_off_is_retried_later_and_resumes(tmp_path: Path) -> None:
    world = FakeWorld(tags=set(), packages={FILE["sw_checksum"]: "bundle"})
    world.faults["DownloadPackage"] = (Outcome.FAILED, "no chunk for 60 s", {"transient": True})
    gateway = _gateway(tmp_path, world, fetch_retry_s=600.0)
    gateway.assign("v2", push=True, package=FILE)
    assert gateway.run_until_state("failed")
    assert gateway.ota.data.blocked is None and gateway.ota.data.transient
    gateway.settle(700)  # the fetch retry timer re-enters fetching: a new DownloadPackage (it resumes the part file)
    assert len(world.downloads) == 1 and world.running == "v2"
    assert world.sw_states()[-1] == "UPDATED"


def test_killed_while_downloading_reissues_the_download(tmp_path: Path) -> None:
    world = FakeWorld(tags=set(), packages={FILE["sw_checksum"]: "image"}, held={"DownloadPackage"})
    clock = FakeClock()
    gateway = FakeGateway(world, tmp_path / "journal.db", clock)
    gateway.assign("v2", push=True, package=FILE)
    assert gateway.run_until_state("fetching")
    gateway.kill()
    world.held.clear()
    gateway = FakeGateway(world, tmp_path / "journal.db", clock)
    gateway.settle()
    assert len(world.downloads) == 1  # the held one never ran; the resumed machine asked again
    assert world.running == "v2" and world.sw_states().count("DOWNLOADING") == 1


def test_the_package_is_persisted_and_forgotten_when_unassigned(tmp_path: Path) -> None:
    world = FakeWorld(tags={"v1", "v2", "v3"}, packages={FILE["sw_checksum"]: "bundle"})
    gateway = _gateway(tmp_path, world)
    gateway.assign("v2", push=True, package=FILE)
    gateway.settle()
    assert gateway.ota.snapshot()["package"] == {"checksum": "ab" * 32, "algorithm": "SHA256", "size": 4096}
    gateway.assign("v3", push=True)  # a package without a file
    gateway.settle()
    assert "package" not in gateway.ota.snapshot()  # absent, as in checkpoints from before packages
    assert len(world.downloads) == 1 and world.running == "v3"


def test_the_diagram_shows_both_fetch_paths() -> None:
    events = {t.event for t in OtaMachine.states_map["fetching"].transitions}
    assert {"fetch_succeeded", "download_succeeded", "download_failed", "download_timed_out",
            "download_cancelled"} <= events
