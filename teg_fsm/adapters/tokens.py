"""The access-token file: read it, write it atomically with mode 0600, move it aside.

The token is a secret: nothing here logs it, and callers keep it out of
events and effects (both are journaled). A rejected token is never deleted:
it is renamed with a UTC timestamp suffix so an operator can still inspect it.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from teg_fsm.engine.sqlite_files import quarantine

_MODE = 0o600


def read_token(path: Path) -> str | None:
    """The token in ``path`` (whitespace stripped), or None when missing or empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:  # a damaged file: kept aside, and the device has no token
        quarantine(path, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
        return None
    return token or None


def token_present(path: Path) -> bool:
    try:
        return read_token(path) is not None
    except OSError:
        return False


def write_token(path: Path, token: str) -> None:
    """Replace ``path`` with ``token`` so a crash leaves the old file or the new one.

    Temp file in the same directory (same file system, so the rename is
    atomic), created 0600 before any byte is written, fsynced, renamed over
    the target, then the directory is fsynced so the rename survives a power cut.
    """
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def move_aside(path: Path, now: datetime | None = None) -> Path | None:
    """Rename a rejected token file to ``<name>.rejected-<UTC timestamp>``; None if absent."""
    if not path.exists():
        return None
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.rejected-{stamp}")
    counter = 1
    while target.exists():  # two rejections within a second keep both files
        target = path.with_name(f"{path.name}.rejected-{stamp}-{counter}")
        counter += 1
    os.replace(path, target)
    fsync_directory(path.parent if str(path.parent) else Path("."))
    return target


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (token files here, ``teg migrate``'s converted files)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still done
    finally:
        os.close(fd)
