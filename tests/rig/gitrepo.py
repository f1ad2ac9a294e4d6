"""Real git repositories (GitPython) for tests: a work repo plus a bare "origin".

The controller repository on a device is a clone of a remote; OTA fetches tags
from it. ``git_repo_factory`` gives a test both ends so it can commit, tag, push
and then fetch/clone like the gateway does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs
import git
import pytest

BRANCH = "main"


def _configure(repo: git.Repo) -> None:
    # Local config only, so a CI machine needs no global identity, and a dev's
    # global settings (signing, hooks) cannot break a test.
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "TEG Test")
        cfg.set_value("user", "email", "teg-test@example.invalid")
        cfg.set_value("commit", "gpgsign", "false")
        cfg.set_value("tag", "gpgsign", "false")


@attrs.define
class GitRepo:
    """A work repository with an ``origin`` remote pointing at a bare repo."""

    path: Path
    repo: git.Repo
    origin_path: Path

    @property
    def origin_url(self) -> str:
        return str(self.origin_path)

    def commit(self, files: Mapping[str, str | bytes], message: str = "update") -> str:
        """Write ``files`` (relative path -> content), commit them; return the hash."""
        for rel, content in files.items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        self.repo.index.add([str(rel) for rel in files])
        return self.repo.index.commit(message).hexsha

    def tag(self, name: str, ref: str = "HEAD", message: str | None = None) -> git.TagReference:
        """Create a tag (annotated when ``message`` is given)."""
        return self.repo.create_tag(name, ref=ref, message=message)

    def push(self) -> None:
        """Push the branch and all tags to origin; raise on any rejection."""
        remote = self.repo.remote("origin")
        remote.push(refspec=f"{BRANCH}:{BRANCH}").raise_if_error()
        remote.push(tags=True).raise_if_error()

    def clone(self, dest: Path) -> git.Repo:
        """Clone origin into ``dest`` (as a device would)."""
        return git.Repo.clone_from(self.origin_url, dest)


@attrs.define
class GitRepoFactory:
    """Creates :class:`GitRepo` instances under one tmp dir."""

    root: Path

    def __call__(self, name: str = "repo") -> GitRepo:
        origin_path = self.root / f"{name}-origin.git"
        git.Repo.init(origin_path, bare=True, initial_branch=BRANCH)
        path = self.root / name
        repo = git.Repo.init(path, initial_branch=BRANCH)
        _configure(repo)
        repo.create_remote("origin", str(origin_path))
        return GitRepo(path=path, repo=repo, origin_path=origin_path)


@pytest.fixture
def git_repo_factory(tmp_path_factory: pytest.TempPathFactory) -> GitRepoFactory:
    """``git_repo_factory(name="repo") -> GitRepo`` with commit/tag/push/clone."""
    return GitRepoFactory(tmp_path_factory.mktemp("git"))
