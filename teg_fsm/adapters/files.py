"""The files adapter: path confinement, hashing, atomic writes, FILE_READ_ mirrors.

Theory of operation
-------------------
Every path an operator defines in ``FILES`` goes through ``locate``:
``$DATA_PATH`` (and the legacy ``$DATA_PATH$`` / ``%DATA_PATH%``) expands to the
controller data dir, a relative path is taken relative to that dir, ``..`` is
folded lexically, and the result must be an allowed root or lie below one. That
gives an *anchor* (the root, resolved once: roots are trusted configuration)
and the components below it.

Checking a path and then opening it by name is a race: a directory swapped for
a symlink in between redirects the open anywhere. So nothing here opens a
managed file by its full name. Every operation opens the anchor, walks the
components one by one relative to the directory handle it holds
(``openat`` with ``O_NOFOLLOW | O_DIRECTORY``), and reads, hashes, writes and
renames relative to the handle of the file's folder. A symlink anywhere below
a root is refused, not followed, at the moment of use; a directory renamed
away while we hold its handle is still the one inside the root.

Only regular files are managed. A FIFO, a device node, a socket, a directory
or a symlink where a file should be is refused with a message naming what it
is: opened by name, a FIFO blocks the reader for good (and a worker thread
blocked in ``open`` keeps the process from exiting), a device can be endless.
The final open therefore also carries ``O_NONBLOCK``, and ``fstat`` of the
open handle decides, so a file swapped between the check and the open is
refused too.

A write never leaves a half-written file: the bytes go to a temporary file in
the same folder (created ``O_EXCL | O_NOFOLLOW``), are fsynced, get the old
file's mode (and owner, when we are root), and are renamed over the target
(``rename`` never follows the target name); then the folder is fsynced so the
rename survives a power cut. A crash leaves at worst a stray temporary file
(``.<name>.*.teg-tmp``), which the next write to that file removes.

Mirrors (``FILE_READ_<key>``) are read and published here, not by the machine,
so file contents stay out of the journal. The component hands in a ``publish``
that waits for the PUBACK, so a mirror reported ``sent`` reached ThingsBoard;
one that did not is sent again by the full pass after the next connect.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.engine.effects.files import (
    NO_FILE,
    TOO_LARGE,
    ContentError,
    MirrorFiles,
    ScanFiles,
    WriteFile,
    content_bytes,
)
from teg_fsm.engine.effects.mqtt import ATTRIBUTES_TOPIC
from teg_fsm.engine.runner import Completion

log = logging.getLogger(__name__)

TMP_SUFFIX = ".teg-tmp"
DEFAULT_NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o755
_DATA_PATH_MARKERS = ("%DATA_PATH%", "$DATA_PATH$", "$DATA_PATH")  # longest first
_CHUNK = 1 << 20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC

PublishFn = Callable[[str, str], "str | None"]  # (topic, payload) -> None once acknowledged, else why not


class FileSyncError(Exception):
    """A file operation that was refused or failed; the message says why."""


class PathRefused(FileSyncError):
    """A path outside the allowed roots, through a symlink, or naming something that is not a regular file."""


@attrs.frozen
class Located:
    """A managed path: a trusted ``anchor`` folder and the components below it (never followed if symlinks)."""

    raw: str
    anchor: Path
    parts: tuple[str, ...]

    @property
    def path(self) -> Path:
        return self.anchor.joinpath(*self.parts)

    @property
    def name(self) -> str:
        return self.parts[-1]


def expand_path(raw: str, data_dir: Path) -> Path:
    """Expand ``$DATA_PATH``; a relative path is relative to the controller data dir."""
    text = raw
    for marker in _DATA_PATH_MARKERS:
        text = text.replace(marker, str(data_dir))
    path = Path(text)
    return path if path.is_absolute() else data_dir / path


def locate(raw: Any, data_dir: Path, roots: Iterable[Path]) -> Located:
    """Where ``raw`` lies below the most specific allowed root, or PathRefused. Touches nothing below the roots."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathRefused(f"path must be a non-empty string, got {raw!r}")
    if "\0" in raw:
        raise PathRefused(f"path {raw!r} contains a NUL character")
    wanted = Path(os.path.normpath(expand_path(raw, data_dir)))
    best: Located | None = None
    for root in roots:
        found = _below(raw, wanted, Path(root))
        if found is not None and (best is None or len(found.parts) < len(best.parts)):
            best = found
    if best is None:
        allowed = ", ".join(str(r) for r in roots) or "none"
        raise PathRefused(
            f"path {raw!r} is {wanted}, outside the allowed roots ({allowed}); extend TEG_FILE_ALLOWED_ROOTS to allow it"
        )
    return best


def _below(raw: str, wanted: Path, root: Path) -> Located | None:
    """``wanted`` relative to ``root`` (as configured or resolved); the root itself maps to its resolved self."""
    configured = Path(os.path.normpath(root.absolute()))
    real = Path(os.path.realpath(root))
    for form in dict.fromkeys((configured, real)):
        if wanted == form:
            return Located(raw, real.parent, (real.name,))
        if form in wanted.parents:
            return Located(raw, real, wanted.relative_to(form).parts)
    return None


def confine(raw: Any, data_dir: Path, roots: Iterable[Path]) -> Path:
    """The path ``raw`` names below an allowed root (not resolved: symlinks below a root are refused on use)."""
    return locate(raw, data_dir, roots).path


# -- walking below a root without following symlinks ---------------------------------------


def _describe(st: os.stat_result) -> str:
    mode = st.st_mode
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device node"),
        (stat.S_ISBLK, "a block device node"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((text for test, text in kinds if test(mode)), f"a special file (mode {mode:o})")


def _not_regular(shown: Path, st: os.stat_result) -> PathRefused:
    return PathRefused(
        f"{shown} is {_describe(st)}, not a regular file; file sync only reads and writes regular files "
        "and never follows symlinks below an allowed root"
    )


def _refused_component(folder: int, part: str, shown: Path, error: int) -> PathRefused:
    what = "a symbolic link"
    if error != errno.ELOOP:
        try:
            what = _describe(os.stat(part, dir_fd=folder, follow_symlinks=False))
        except OSError:
            what = "gone"
        if what == "a directory":  # it was something else a moment ago: someone is swapping it
            what = "changing under us (not a directory when opened)"
    return PathRefused(
        f"{shown} is {what} where a directory is expected; file sync never follows symlinks below an allowed root"
    )


def _open_anchor(anchor: Path, create: bool) -> int:
    """The anchor is trusted configuration (a root or a file root's folder): followed as configured."""
    if create:
        os.makedirs(anchor, mode=NEW_DIR_MODE, exist_ok=True)
    return os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)


def _step(folder: int, part: str, create: bool, shown: Path) -> int:
    """Open the directory ``part`` inside ``folder`` (creating it if asked); closes ``folder``."""
    try:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, NEW_DIR_MODE, dir_fd=folder)
            return os.open(part, _DIR_FLAGS, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refused_component(folder, part, shown, exc.errno) from None
        raise
    finally:
        os.close(folder)


def open_folder(located: Located, create: bool = False) -> int:
    """A handle of the folder holding ``located``'s file, walked without following symlinks.

    FileNotFoundError when a folder on the way is missing (and ``create`` is false).
    """
    folder = _open_anchor(located.anchor, create)
    for depth, part in enumerate(located.parts[:-1], start=1):
        folder = _step(folder, part, create, located.anchor.joinpath(*located.parts[:depth]))
    return folder


def _lstat(folder: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_regular(folder: int, name: str, shown: Path) -> int | None:
    """A read handle of the regular file ``name`` in ``folder``; None if missing; PathRefused for anything else."""
    st = _lstat(folder, name)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(shown, st)
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=folder)  # O_NONBLOCK: a FIFO swapped in now cannot block us
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathRefused(f"{shown} is a symbolic link; file sync never follows symlinks below an allowed root") from None
        raise
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        raise _not_regular(shown, opened)
    return fd


def _md5_fd(fd: int) -> str:
    digest = hashlib.md5()
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _read_fd(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes (a mirror never needs more than one packet's worth)."""
    parts, left = [], limit
    while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def md5_file(path: Path) -> str | None:
    """md5 hex digest of a regular file's bytes; None when it does not exist; PathRefused for a special file."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        fd = _open_regular(folder, path.name, path)
    finally:
        os.close(folder)
    if fd is None:
        return None
    try:
        return _md5_fd(fd)
    finally:
        os.close(fd)


# -- atomic replacement --------------------------------------------------------------------


def replace_in(folder: int, name: str, data: bytes, old: os.stat_result | None) -> None:
    """Replace ``name`` in ``folder`` with ``data`` so that readers see the old or the new bytes, never a mix."""
    mode = stat.S_IMODE(old.st_mode) if old is not None else DEFAULT_NEW_FILE_MODE
    _remove_stale_temporaries(folder, name)
    tmp = f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if old is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), old.st_uid, old.st_gid)  # root writing e.g. /etc/crontab keeps its owner
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise
    os.fsync(folder)  # the rename survives a power cut


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` (a trusted path, e.g. the gateway's own files) atomically, keeping its mode."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        old = _lstat(folder, path.name)
        replace_in(folder, path.name, data, old if old is not None and stat.S_ISREG(old.st_mode) else None)
    finally:
        os.close(folder)


def _remove_stale_temporaries(folder: int, name: str) -> None:
    """Temporary files a crash left behind for this file (only ours: prefix, one random part, suffix)."""
    prefix = f".{name}."
    for leftover in os.listdir(folder):
        middle = leftover[len(prefix):-len(TMP_SUFFIX)]
        if leftover.startswith(prefix) and leftover.endswith(TMP_SUFFIX) and middle and "." not in middle:
            with contextlib.suppress(OSError):
                os.unlink(leftover, dir_fd=folder)


def mirror_value(data: bytes, encoding: str) -> Any:
    """A file's bytes as its ``FILE_READ_`` value: base64 text, parsed JSON, or text."""
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    text = data.decode("utf-8", errors="replace")
    if encoding == "json":
        try:
            return json.loads(text)
        except ValueError:
            return text  # a damaged JSON file is still shown to the operator as it is
    return text


def mqtt_publish_size(topic: str, payload: bytes, qos: int = 1) -> int:
    """Bytes of the whole MQTT 3.1.1 PUBLISH packet (ThingsBoard's limit counts all of it)."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


class FileStore:
    """The file system side of file sync; one instance per gateway."""

    def __init__(self, data_dir: Path, roots: Iterable[Path], publish: PublishFn, max_packet_bytes: int = 65_536):
        self.data_dir = Path(data_dir)
        self.roots = tuple(Path(r) for r in roots)
        self._publish = publish
        self.max_packet_bytes = max_packet_bytes

    def locate(self, raw: Any) -> Located:
        return locate(raw, self.data_dir, self.roots)

    def resolve(self, raw: Any) -> Path:
        return self.locate(raw).path

    def read(self, raw: Any, limit: int | None = None) -> tuple[bytes, int] | None:
        """A managed file's bytes (at most ``limit``) and its size, None when it does not exist."""
        with self._opened(self.locate(raw)) as fd:
            if fd is None:
                return None
            return _read_fd(fd, limit if limit is not None else os.fstat(fd).st_size + 1), os.fstat(fd).st_size

    def hash(self, raw: Any) -> str | None:
        """md5 of a managed file, None when it does not exist."""
        with self._opened(self.locate(raw)) as fd:
            return None if fd is None else _md5_fd(fd)

    @contextlib.contextmanager
    def _opened(self, located: Located) -> Any:
        try:
            folder = open_folder(located)
        except FileNotFoundError:
            yield None
            return
        try:
            fd = _open_regular(folder, located.name, located.path)
        finally:
            os.close(folder)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def scan(self, files: Mapping[str, str]) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for key, raw in files.items():
            try:
                found[key] = {"hash": self.hash(raw) or NO_FILE, "path": str(self.resolve(raw))}
            except (FileSyncError, OSError) as exc:
                found[key] = {"error": _reason(exc)}
        return found

    def write(self, key: str, raw: str, encoding: str, content: Any, create: bool, force: bool = False) -> dict:
        try:
            data = content_bytes(encoding, content)
            located = self.locate(raw)
            new = hashlib.md5(data).hexdigest()
            changed = self._write_located(located, data, new, create, force)
        except (ContentError, OSError) as exc:
            raise FileSyncError(_reason(exc)) from exc
        if changed is not None:
            log.info("file %s: wrote %d bytes to %s", key, len(data), located.path)
        return {"hash": new, "changed": bool(changed), "path": str(located.path)}

    def _write_located(self, located: Located, data: bytes, new: str, create: bool, force: bool) -> bool | None:
        """Write unless identical (None: nothing written); True when the bytes changed."""
        try:
            folder = open_folder(located, create=create)
        except FileNotFoundError:
            raise FileSyncError(f"{located.path} does not exist and create_if_not_exist is false") from None
        try:
            old_stat = _lstat(folder, located.name)
            if old_stat is None and not create:
                raise FileSyncError(f"{located.path} does not exist and create_if_not_exist is false")
            old = _current_hash(folder, located) if old_stat is not None else None
            if old == new and not force:
                return None
            replace_in(folder, located.name, data, old_stat if old is not None else None)
            return old != new
        finally:
            os.close(folder)

    def mirror(self, files: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        statuses: dict[str, str] = {}
        for key, spec in files.items():
            attribute = f"FILE_READ_{key}"
            try:
                # Anything over one packet is too large whatever its encoding: read no more than that.
                found = self.read(spec.get("path"), limit=self.max_packet_bytes + 1)
            except (FileSyncError, OSError) as exc:
                statuses[key] = f"error:{_reason(exc)}"
                continue
            value: Any = NO_FILE if found is None else mirror_value(found[0], spec.get("encoding", "text"))
            statuses[key] = "missing" if found is None else "sent"
            payload = json.dumps({attribute: value})
            size = max(mqtt_publish_size(ATTRIBUTES_TOPIC, payload.encode("utf-8")), found[1] if found else 0)
            if size > self.max_packet_bytes:
                # ThingsBoard drops the session on an oversized packet, so say so instead.
                payload = json.dumps({attribute: TOO_LARGE})
                statuses[key] = f"too_large:{size}"
            error = self._publish(ATTRIBUTES_TOPIC, payload)
            if error is not None:
                statuses[key] = f"error:not published: {error}"
        return statuses

    # -- effect handlers (run on the runner's worker pool) ----------------

    def handle_scan(self, effect: ScanFiles, completion: Completion) -> None:
        completion.succeed(self.scan(effect.files))

    def handle_write(self, effect: WriteFile, completion: Completion) -> None:
        try:
            e = effect
            completion.succeed(self.write(e.key, e.path, e.encoding, e.content, e.create, e.force))
        except FileSyncError as exc:
            completion.fail(str(exc))

    def handle_mirror(self, effect: MirrorFiles, completion: Completion) -> None:
        completion.succeed(self.mirror(effect.files))


def _current_hash(folder: int, located: Located) -> str | None:
    fd = _open_regular(folder, located.name, located.path)  # refuses a FIFO, a device node, a symlink
    if fd is None:
        return None
    try:
        return _md5_fd(fd)
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)
