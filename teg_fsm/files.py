"""The files adapter: path confinement, hashing, atomic writes, FILE_READ_ mirrors.

Theory of operation
-------------------
Every path an operator defines in ``FILES`` goes through ``FileStore.resolve``:
``$DATA_PATH`` (and the legacy ``$DATA_PATH$`` / ``%DATA_PATH%``) expands to the
controller data dir, a relative path is taken relative to that dir, then all
symlinks and ``..`` are resolved and the result must be an allowed root or lie
below one. The check runs again on every write, so a symlink planted between a
scan and a write cannot redirect the write.

A write never leaves a half-written file: the bytes go to a temporary file in
the same folder, are fsynced, get the old file's mode (and owner, when we are
root), and are renamed over the target; then the folder is fsynced so the
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
import glob
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from teg_fsm.effects.files import (
    NO_FILE,
    TOO_LARGE,
    ContentError,
    MirrorFiles,
    ScanFiles,
    WriteFile,
    content_bytes,
)
from teg_fsm.effects.mqtt import ATTRIBUTES_TOPIC
from teg_fsm.runner import Completion

log = logging.getLogger(__name__)

TMP_SUFFIX = ".teg-tmp"
DEFAULT_NEW_FILE_MODE = 0o644
_DATA_PATH_MARKERS = ("%DATA_PATH%", "$DATA_PATH$", "$DATA_PATH")  # longest first

PublishFn = Callable[[str, str], "str | None"]  # (topic, payload) -> None once acknowledged, else why not


class FileSyncError(Exception):
    """A file operation that was refused or failed; the message says why."""


class PathRefused(FileSyncError):
    """A path outside the allowed roots (after following symlinks)."""


def md5_file(path: Path) -> str | None:
    """md5 hex digest of a file's bytes; None when it does not exist."""
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def expand_path(raw: str, data_dir: Path) -> Path:
    """Expand ``$DATA_PATH``; a relative path is relative to the controller data dir."""
    text = raw
    for marker in _DATA_PATH_MARKERS:
        text = text.replace(marker, str(data_dir))
    path = Path(text)
    return path if path.is_absolute() else data_dir / path


def confine(raw: Any, data_dir: Path, roots: Iterable[Path]) -> Path:
    """The resolved path (symlinks followed), or PathRefused when it is outside every root."""
    if not isinstance(raw, str) or not raw.strip():
        raise PathRefused(f"path must be a non-empty string, got {raw!r}")
    try:
        resolved = Path(os.path.realpath(expand_path(raw, data_dir)))
    except (ValueError, OSError) as exc:  # e.g. a NUL byte in the path
        raise PathRefused(f"path {raw!r} cannot be resolved ({exc})") from None
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    for root in real_roots:
        if resolved == root or root in resolved.parents:
            return resolved
    allowed = ", ".join(str(r) for r in real_roots) or "none"
    raise PathRefused(
        f"path {raw!r} resolves to {resolved}, outside the allowed roots ({allowed}); "
        "extend TEG_FILE_ALLOWED_ROOTS to allow it"
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a mix."""
    try:
        st = os.stat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = DEFAULT_NEW_FILE_MODE, None
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)  # root writing e.g. /etc/crontab keeps its owner
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files a crash left behind for this file (only ours: prefix and suffix match)."""
    pattern = str(path.parent / f".{glob.escape(path.name)}.*{TMP_SUFFIX}")
    for leftover in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.unlink(leftover)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def resolve(self, raw: Any) -> Path:
        return confine(raw, self.data_dir, self.roots)

    def scan(self, files: Mapping[str, str]) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for key, raw in files.items():
            try:
                path = self.resolve(raw)
                found[key] = {"hash": md5_file(path) or NO_FILE, "path": str(path)}
            except (FileSyncError, OSError) as exc:
                found[key] = {"error": _reason(exc)}
        return found

    def write(self, key: str, raw: str, encoding: str, content: Any, create: bool, force: bool = False) -> dict:
        try:
            data = content_bytes(encoding, content)
            path = self.resolve(raw)
            new = hashlib.md5(data).hexdigest()
            old = md5_file(path)
            if old == new and not force:
                return {"hash": new, "changed": False, "path": str(path)}
            if old is None and not create:
                raise FileSyncError(f"{path} does not exist and create_if_not_exist is false")
            if old is None:
                path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
            changed = old != new
        except (ContentError, OSError) as exc:
            raise FileSyncError(_reason(exc)) from exc
        log.info("file %s: wrote %d bytes to %s", key, len(data), path)
        return {"hash": new, "changed": changed, "path": str(path)}

    def mirror(self, files: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        statuses: dict[str, str] = {}
        for key, spec in files.items():
            attribute = f"FILE_READ_{key}"
            try:
                path = self.resolve(spec.get("path"))
                data = path.read_bytes()
            except FileNotFoundError:
                value: Any = NO_FILE
                statuses[key] = "missing"
            except (FileSyncError, OSError) as exc:
                statuses[key] = f"error:{_reason(exc)}"
                continue
            else:
                value = mirror_value(data, spec.get("encoding", "text"))
                statuses[key] = "sent"
            payload = json.dumps({attribute: value})
            size = mqtt_publish_size(ATTRIBUTES_TOPIC, payload.encode("utf-8"))
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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)
