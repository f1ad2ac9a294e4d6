"""The OTA adapters against real git and a real Docker engine."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import docker
import pytest

from teg_fsm.adapters.docker_images import ControllerImages, ImageError
from teg_fsm.adapters.git_repo import ControllerRepo, GitRepoError
from tests.integration.ota_rig import HEALTHY, controller_files

# no_mqtt: the OTA adapters against real git and Docker, no gateway and no MQTT (the MQTT 5 pass leaves it out).
pytestmark = [pytest.mark.integration, pytest.mark.no_mqtt]


@pytest.fixture
def device_repo(tmp_path: Path, git_repo_factory):
    repo = git_repo_factory("controller")
    first = repo.commit({"docker/Dockerfile": "FROM scratch\n", "README": "one\n"}, "one")
    repo.tag("v1")
    repo.push()
    clone = tmp_path / "device"
    repo.clone(clone)
    return repo, clone, first


def test_fetch_brings_new_tags_and_checkout_resolves_them(device_repo) -> None:
    repo, clone, first = device_repo
    second = repo.commit({"README": "two\n"}, "two")
    repo.tag("v2")
    repo.push()
    controller = ControllerRepo(clone / ".git")
    with pytest.raises(GitRepoError, match="tag v2 does not exist"):
        controller.checkout("v2")
    assert controller.fetch() == "origin"
    assert controller.checkout("v2") == second
    assert (clone / "README").read_text() == "two\n"
    assert controller.checkout(first) == first  # a full commit hash works too
    assert (clone / "README").read_text() == "one\n"


def test_checkout_discards_local_edits_and_untracked_files_but_keeps_ignored(device_repo) -> None:
    _repo, clone, _first = device_repo
    (clone / "README").write_text("edited on the device\n")
    (clone / "stray.txt").write_text("x")
    (clone / ".git" / "info" / "exclude").write_text("local.env\n")
    (clone / "local.env").write_text("SECRET=1\n")
    ControllerRepo(clone / ".git").checkout("v1")
    assert (clone / "README").read_text() == "one\n"
    assert not (clone / "stray.txt").exists()
    assert (clone / "local.env").exists()


def test_missing_commit_and_missing_repository_say_what_to_fix(device_repo, tmp_path: Path) -> None:
    _repo, clone, _first = device_repo
    with pytest.raises(GitRepoError, match="commit 0{40} does not exist"):
        ControllerRepo(clone / ".git").checkout("0" * 40)
    with pytest.raises(GitRepoError, match="TEG_CONTROLLER_GIT_PATH"):
        ControllerRepo(tmp_path / "nowhere" / ".git").fetch()
    with pytest.raises(GitRepoError, match="TEG_CONTROLLER_GIT_PATH"):
        ControllerRepo("").fetch()


def test_a_repository_without_a_remote_fetches_nothing_and_checks_out_its_local_tags(tmp_path: Path) -> None:
    import git
    work = tmp_path / "local"
    repo = git.Repo.init(work)
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "TEG Test")
        cfg.set_value("user", "email", "teg-test@example.invalid")
    (work / "README").write_text("local\n")
    repo.index.add(["README"])
    commit = repo.index.commit("local only").hexsha
    repo.create_tag("v1-local")
    controller = ControllerRepo(work / ".git")
    assert controller.fetch() is None
    assert controller.checkout("v1-local") == commit


def test_fetch_from_an_unreachable_remote_fails_with_gits_reason(device_repo, tmp_path: Path) -> None:
    _repo, clone, _first = device_repo
    controller = ControllerRepo(clone / ".git")
    import git
    git.Repo(clone).remote("origin").set_url(str(tmp_path / "gone.git"))
    with pytest.raises(GitRepoError, match="git fetch failed"):
        controller.fetch(timeout_s=30)


def _context(tmp_path: Path, base_image: str, script: str = HEALTHY) -> Path:
    for rel, text in controller_files(base_image, script).items():
        path = tmp_path / "repo" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "repo" / "docker"


def test_build_then_cached_then_prune_keeps_last_good_and_newest(
    tmp_path: Path, docker_client: docker.DockerClient, base_image: str, docker_test_labels: dict[str, str]
) -> None:
    images = ControllerImages(docker_client)
    context = _context(tmp_path, base_image)
    tag = uuid.uuid4().hex[:6]
    names = [f"teg-controller-p{i}-{tag}:latest" for i in range(4)]
    try:
        for i, name in enumerate(names):
            (context / "controller.py").write_text(HEALTHY + f"# {i}\n")  # distinct images
            result = images.build(context_dir=str(context), dockerfile="./Dockerfile", image=name,
                                  min_free_mb=1, labels=docker_test_labels, network_mode="host")
            assert result["cached"] is False
        again = images.build(context_dir=str(context), dockerfile="./Dockerfile", image=names[0],
                             min_free_mb=1, labels=docker_test_labels, network_mode="host")
        assert again["cached"] is True
        removed = images.prune(keep=[names[0]], keep_count=1)
        assert set(names[1:3]) <= set(removed)  # p3 is the newest other: kept
        assert images.exists(names[0]) and images.exists(names[3])
        assert not images.exists(names[1]) and not images.exists(names[2])
        assert docker_client.images.get(base_image)  # never touches other images
    finally:
        for name in names:
            try:
                docker_client.images.remove(name, force=True)
            except docker.errors.APIError:
                pass


def test_build_refuses_when_disk_is_short_and_reports_build_errors(
    tmp_path: Path, docker_client: docker.DockerClient, base_image: str, docker_test_labels: dict[str, str]
) -> None:
    images = ControllerImages(docker_client)
    context = _context(tmp_path, base_image)
    name = f"teg-controller-d-{uuid.uuid4().hex[:6]}:latest"
    with pytest.raises(ImageError, match="TEG_OTA_MIN_FREE_DISK_MB"):
        images.build(context_dir=str(context), dockerfile="./Dockerfile", image=name,
                     min_free_mb=10**9, labels=docker_test_labels, network_mode="host")
    (context / "Dockerfile").write_text(f"FROM {base_image}\nCOPY missing.py /app/\n")
    with pytest.raises(ImageError, match="docker build failed"):
        images.build(context_dir=str(context), dockerfile="./Dockerfile", image=name,
                     min_free_mb=1, labels=docker_test_labels, network_mode="host")
    with pytest.raises(ImageError, match="TEG_CONTROLLER_DOCKERFILE_PATH"):
        images.build(context_dir=str(context), dockerfile="nope/Dockerfile", image=name,
                     min_free_mb=1, labels=docker_test_labels, network_mode="host")
    assert not images.exists(name)


def test_a_git_bundle_brings_tags_without_the_remote(device_repo, tmp_path: Path) -> None:
    """An OTA package made with ``git bundle create x.bundle --all`` replaces the fetch."""
    repo, clone, _first = device_repo
    second = repo.commit({"README": "two\n"}, "two")
    repo.tag("v2")
    bundle = tmp_path / "controller.bundle"
    subprocess.run(["git", "-C", str(repo.path), "bundle", "create", str(bundle), "--all"], check=True,
                   capture_output=True)
    controller = ControllerRepo(clone / ".git")
    controller.fetch_bundle(bundle)
    assert controller.checkout("v2") == second
    assert (clone / "README").read_text() == "two\n"


def test_an_incremental_bundle_needs_its_prerequisites(device_repo, tmp_path: Path) -> None:
    repo, _clone, _first = device_repo
    repo.commit({"README": "two\n"}, "two")
    repo.tag("v2")
    repo.commit({"README": "three\n"}, "three")
    repo.tag("v3")
    bundle = tmp_path / "v2..v3.bundle"
    subprocess.run(["git", "-C", str(repo.path), "bundle", "create", str(bundle), "v2..v3"], check=True,
                   capture_output=True)
    # The station has only v1: git refuses the bundle, with its reason.
    with pytest.raises(GitRepoError, match="(?i)prerequisite|lacks"):
        ControllerRepo(_clone / ".git").fetch_bundle(bundle)
