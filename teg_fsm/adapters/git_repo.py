"""The controller repository (GitPython): fetch, resolve, forced checkout, reset, clean.

Runs on the effect runner's worker threads. Every git call carries
``kill_after_timeout`` so a hung fetch (dead network, stuck credential
prompt) kills the git process instead of holding a worker forever.
GitPython's ``GitCommandError`` text is long and multi-line; ``_reason`` keeps
the part a person can act on. The version is validated by the OTA machine
before it gets here, and is passed as an argument, never through a shell.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import git

# Never prompt for credentials on a device nobody watches; fail instead.
_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}


class GitRepoError(Exception):
    """A git step failed; the message says why, for sw_error."""


def _reason(exc: git.GitCommandError) -> str:
    stderr = (exc.stderr or "").strip().strip("'").strip()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    detail = "; ".join(line.removeprefix("stderr: ").strip() for line in lines[-3:]) or str(exc.status)
    return f"git {exc.command[1] if len(exc.command) > 1 else ''} failed: {detail}".replace("  ", " ")


class ControllerRepo:
    """One controller repository, addressed by its ``.git`` directory."""

    def __init__(self, git_dir: str | Path, timeout_s: float = 300.0) -> None:
        if not str(git_dir).strip():  # Path("") is ".", the gateway's own directory
            raise GitRepoError("no controller repository configured: set TEG_CONTROLLER_GIT_PATH")
        self.git_dir = Path(git_dir)
        self.timeout_s = timeout_s

    def _repo(self) -> git.Repo:
        # GitPython is imported on the first git step, not at gateway start (~4 MB, ~40 ms):
        # OTA is rare, and every git step goes through here first.
        import git

        if not self.git_dir.is_dir():
            raise GitRepoError(f"controller repository {self.git_dir} does not exist (TEG_CONTROLLER_GIT_PATH)")
        try:
            repo = git.Repo(self.git_dir)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
            raise GitRepoError(f"{self.git_dir} is not a git repository (TEG_CONTROLLER_GIT_PATH): {exc}") from None
        if repo.bare:
            raise GitRepoError(f"{self.git_dir} is a bare repository; the controller needs a work tree")
        return repo

    def _git(self, repo: git.Repo, *args: str, timeout_s: float | None = None) -> str:
        import git  # loaded already by _repo

        try:
            with repo.git.custom_environment(**_ENV):
                return repo.git.execute(
                    ["git", *args], kill_after_timeout=timeout_s or self.timeout_s, with_extended_output=False
                )
        except git.GitCommandError as exc:
            raise GitRepoError(_reason(exc)) from None

    def fetch(self, timeout_s: float | None = None) -> str | None:
        """Fetch branches and tags (moved tags included) from the first remote; returns its name.

        A repository without a remote has nothing to fetch: None, and the checkout
        works from its local refs (the existing gateway ignores a failed fetch).
        """
        repo = self._repo()
        if not repo.remotes:
            return None
        remote = "origin" if "origin" in [r.name for r in repo.remotes] else repo.remotes[0].name
        self._git(repo, "fetch", "--tags", "--force", "--prune", remote, timeout_s=timeout_s)
        return remote

    def fetch_bundle(self, bundle: str | Path, timeout_s: float | None = None) -> None:
        """Fetch tags and branches from a ``git bundle`` file (an OTA package) instead of the remote.

        Tags overwrite local ones (as ``fetch --tags --force`` does); branches land
        under ``refs/remotes/ota-bundle/`` so no local branch moves.
        """
        repo = self._repo()
        self._git(repo, "bundle", "verify", str(bundle), timeout_s=timeout_s)
        self._git(repo, "fetch", "--force", str(bundle), "+refs/tags/*:refs/tags/*",
                  "+refs/heads/*:refs/remotes/ota-bundle/*", timeout_s=timeout_s)

    def resolve(self, version: str) -> str:
        """The commit a tag or a full commit hash names."""
        repo = self._repo()
        ref = version if _is_commit(version) else f"refs/tags/{version}"
        try:
            return self._git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
        except GitRepoError:
            kind = "commit" if _is_commit(version) else "tag"
            raise GitRepoError(f"{kind} {version} does not exist in the controller repository "
                               "(after fetching; is it pushed?)") from None

    def checkout(self, version: str, timeout_s: float | None = None) -> str:
        """Forced detached checkout of ``version``, hard reset and clean; returns the commit."""
        repo = self._repo()
        commit = self.resolve(version)
        self._git(repo, "checkout", "--force", "--detach", commit, timeout_s=timeout_s)
        self._git(repo, "reset", "--hard", commit, timeout_s=timeout_s)
        # -d removes untracked files and directories; ignored files (local
        # settings, caches) survive: no -x.
        self._git(repo, "clean", "-f", "-f", "-d", timeout_s=timeout_s)
        head = repo.head.commit.hexsha
        if head != commit:
            raise GitRepoError(f"checkout of {version} left HEAD at {head}, expected {commit}")
        return commit

    @property
    def work_tree(self) -> Path:
        return Path(self._repo().working_tree_dir or os.fspath(self.git_dir.parent))


def _is_commit(version: str) -> bool:
    return len(version) == 40 and all(c in "0123456789abcdef" for c in version)
