"""OTA package files from ThingsBoard: chunked download that resumes, checksum, what the file is.

Theory of operation
-------------------
ThingsBoard serves a package's file in chunks (PROTOCOL.md section 5.2;
``MqttTransportHandler.getOtaPackageCallback``): the device publishes the chunk
size as text on ``v2/sw/request/<requestId>/chunk/<n>`` and gets bytes
``[size*n, size*n+size)`` on ``v2/sw/response/<requestId>/chunk/<n>``, empty past
the end. Errors come on ``v2/fw/error`` (for ``sw`` too) and close the session.
How a chunk travels is a :class:`ChunkSource`; this module knows files only.

The download goes to ``<dir>/<checksum>.part``. Each chunk is written there,
then one line ``<n> <crc32>`` is appended to ``<dir>/<checksum>.chunks`` (its
first line names the package: checksum, algorithm, size, chunk size). After a
reconnect or a restart the recorded chunks are checked against the part file;
the download continues after the last good one, a torn tail is cut off. A
package file is therefore downloaded once, however often the link or the
process dies. The whole file is then verified with ``sw_checksum_algorithm``;
a mismatch removes both files.

Before the first byte is written, the free space of the directory is checked
against ``sw_size`` (nothing is written when it does not fit), and the checksum
algorithm must be one of ThingsBoard's ``ChecksumAlgorithm`` values (an unknown
name is refused before downloading). MD5 and SHA* come from hashlib, CRC32 from
zlib, MURMUR3_32 and MURMUR3_128 from :mod:`teg_fsm.adapters.murmur3`; every
one is computed block by block, never on the whole file in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from teg_fsm.adapters.murmur3 import Murmur3x64_128, Murmur3x86_32

# ThingsBoard's ChecksumAlgorithm values (common/data/.../ota/ChecksumAlgorithm.java), all of them.
_HASHLIB = {"MD5": "md5", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}
_MURMUR3 = {"MURMUR3_32": Murmur3x86_32, "MURMUR3_128": Murmur3x64_128}
SUPPORTED_ALGORITHMS = (*_HASHLIB, "CRC32", *_MURMUR3)
_READ = 1 << 20


class PackageError(Exception):
    """The download or the install cannot go on; ``transient`` when it may work later (the link)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ChunkUnavailable(Exception):
    """No answer for a chunk request this time (not connected, lost, no answer in time)."""


class ChunkRefused(Exception):
    """ThingsBoard answered on ``v2/fw/error`` (NOT_FOUND, FAILURE, PAYLOAD_TOO_LARGE, ...)."""


class ChunkSource(Protocol):
    def request(self, kind: str, request_id: int, index: int, size: int, timeout_s: float) -> bytes:
        """The bytes of chunk ``index``; raises ChunkUnavailable or ChunkRefused."""


# -- checksums ----------------------------------------------------------------------


def checksum_error(algorithm: str) -> str | None:
    """Why this gateway cannot verify ``algorithm``, or None."""
    if algorithm.upper() in SUPPORTED_ALGORITHMS:
        return None
    return (f"checksum algorithm {algorithm!r} is not supported by this gateway "
            f"(supported: {', '.join(SUPPORTED_ALGORITHMS)}); choose one of them for the OTA package")


def file_checksum(path: Path, algorithm: str) -> str:
    """Hex checksum of ``path`` as ThingsBoard stores it: Guava's ``HashCode.toString()``.

    For CRC32 and MURMUR3_* that is the hash's bytes little-endian (Guava's
    ``HashCode.fromInt``), so CRC32 ``0xcbf43926`` is stored as ``"2639f4cb"``.
    """
    algorithm = algorithm.upper()
    with path.open("rb") as stream:
        if algorithm == "CRC32":
            crc = 0
            while block := stream.read(_READ):
                crc = zlib.crc32(block, crc)
            return (crc & 0xFFFFFFFF).to_bytes(4, "little").hex()
        if algorithm in _MURMUR3:
            # Guava's HashCode.toString(): the hash's bytes in order, little-endian (murmur3.py).
            murmur = _MURMUR3[algorithm]()
            while block := stream.read(_READ):
                murmur.update(block)
            return murmur.digest().hex()
        digest = hashlib.new(_HASHLIB[algorithm])
        while block := stream.read(_READ):
            digest.update(block)
        return digest.hexdigest()


def same_checksum(expected: str, actual: str, algorithm: str) -> bool:
    """Whether ``expected`` (ThingsBoard's ``sw_checksum``) names the file whose checksum is ``actual``.

    ``actual`` is Guava's string (``file_checksum``), which BaseOtaPackageService.generateChecksum
    stores and OtaPackageDataValidator compares exactly. CRC32 has a second spelling: ThingsBoard
    versions that keep package files on disk compute it with dao/ota/util/ChecksumUtil.checksumCRC32,
    ``Long.toHexString(new CRC32().getValue())``: big-endian, leading zeros dropped. Both name one
    CRC, so both are accepted; every other algorithm has one spelling and is compared exactly.
    """
    expected = expected.strip().lower()
    if expected == actual:
        return True
    if algorithm.upper() == "CRC32" and len(actual) == 8:
        return expected == format(int.from_bytes(bytes.fromhex(actual), "little"), "x")
    return False


# -- the part file and its progress ----------------------------------------------------


class PartFile:
    """``<checksum>.part`` and its progress file ``<checksum>.chunks`` in ``directory``."""

    def __init__(self, directory: Path, checksum: str, algorithm: str, size: int | None, chunk_size: int) -> None:
        name = re.sub(r"[^0-9a-zA-Z]", "", checksum)[:128] or "package"
        self.directory = directory
        self.path = directory / f"{name}.part"
        self.progress = directory / f"{name}.chunks"
        self.header = {"checksum": checksum, "algorithm": algorithm, "size": size, "chunk_size": chunk_size}
        self.chunk_size = chunk_size
        self.length = 0

    def existing_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def resume(self) -> int:
        """The next chunk index: recorded chunks that the part file still holds intact."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = self.progress.read_text().splitlines() if self.progress.exists() else []
        if not lines or _json(lines[0]) != self.header or not self.path.exists():
            self._start_over()
            return 0
        good = 0
        with self.path.open("rb") as part:
            for line in lines[1:]:
                fields = line.split()
                if len(fields) != 2 or fields[0] != str(good):
                    break  # a line torn by a crash: what follows is not trusted
                data = part.read(self.chunk_size)
                if len(data) == 0 or format(zlib.crc32(data), "08x") != fields[1]:
                    break
                good += 1
                self.length = part.tell()
        # Cut the tail that has no (valid) record, and the records past it.
        with self.path.open("r+b") as part:
            part.truncate(self.length)
        self.progress.write_text("\n".join(lines[:good + 1]) + "\n")
        return good

    def _start_over(self) -> None:
        self.path.write_bytes(b"")
        self.progress.write_text(json.dumps(self.header, sort_keys=True) + "\n")
        self.length = 0

    def append(self, index: int, data: bytes) -> None:
        # The chunk is on disk before its record: a crash between the two leaves a tail the resume cuts.
        with self.path.open("ab") as part:
            part.write(data)
            part.flush()
            os.fsync(part.fileno())
        with self.progress.open("a") as progress:
            progress.write(f"{index} {zlib.crc32(data):08x}\n")
        self.length += len(data)

    def remove(self) -> None:
        for path in (self.path, self.progress):
            path.unlink(missing_ok=True)

    def remove_others(self) -> list[str]:
        """Delete the part files of other packages (superseded mid-download); returns their names."""
        if not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.iterdir()
                 if p.suffix in (".part", ".chunks") and p not in (self.path, self.progress)]
        for path in stale:
            path.unlink(missing_ok=True)
        return [p.name for p in stale]


def _json(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


# -- download ---------------------------------------------------------------------------


def check_disk(directory: Path, size: int | None, have: int = 0) -> None:
    """Refuse before writing anything when ``size`` does not fit in the free space of ``directory``."""
    if size is None:
        return
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if size - have > free:
        raise PackageError(f"the package needs {size - have} bytes but only {free} bytes are free in {directory}: "
                           "free disk space or use a smaller package")


def download(source: ChunkSource, part: PartFile, *, kind: str, request_id: int, stall_s: float = 120.0,
             chunk_timeout_s: float = 10.0, stopped: Callable[[], bool] = lambda: False,
             progress: Callable[[int, int | None], None] | None = None) -> dict[str, int]:
    """Fill ``part`` chunk by chunk from where it stopped; returns ``{"bytes", "resumed_at", "requests"}``.

    A chunk that does not come (link down, lost, slow) is asked for again until
    ``stall_s`` passes without progress: then a transient PackageError (the part file stays).
    """
    size = part.header["size"]
    index = resumed_at = part.resume()
    requests = 0
    last_progress = time.monotonic()
    while size is None or part.length < size:
        if stopped():
            raise PackageError("the download was stopped", transient=True)
        try:
            requests += 1
            data = source.request(kind, request_id, index, part.chunk_size, chunk_timeout_s)
        except ChunkUnavailable as exc:
            if time.monotonic() - last_progress > stall_s:
                raise PackageError(f"no chunk from ThingsBoard for {stall_s:g} s ({exc}); "
                                   f"{part.length} bytes kept for the next attempt", transient=True) from None
            time.sleep(0.2)
            continue
        except ChunkRefused as exc:
            raise PackageError(f"ThingsBoard refused chunk {index}: {exc}") from None
        if not data:
            break  # past the end: "until the received chunk size is zero" (ThingsBoard's OTA docs)
        part.append(index, data)
        index += 1
        last_progress = time.monotonic()
        if progress is not None:
            progress(part.length, size)
    if size is not None and part.length != size:
        raise PackageError(f"the package has {part.length} bytes, ThingsBoard announced {size}")
    return {"bytes": part.length, "resumed_at": resumed_at, "requests": requests}


def verify(part: PartFile, expected: str, algorithm: str) -> None:
    """Raise (and remove the download) when the file's checksum is not ``expected``."""
    actual = file_checksum(part.path, algorithm)
    if not same_checksum(expected, actual, algorithm):
        part.remove()
        raise PackageError(f"checksum verification failed ({algorithm.upper()}): expected {expected}, got {actual}")


# -- what the file is ---------------------------------------------------------------------

BUNDLE_SIGNATURES = (b"# v2 git bundle\n", b"# v3 git bundle\n")


def package_kind(path: Path) -> str:
    """``bundle`` (git bundle), ``image`` (``docker save`` archive) or ``other``, by content."""
    with path.open("rb") as stream:
        head = stream.read(512)
    if head.startswith(BUNDLE_SIGNATURES):
        return "bundle"
    if len(head) >= 262 and head[257:262] == b"ustar":
        import tarfile  # here, not at the top: only a received package needs it (idle RSS, issue #16)

        try:
            with tarfile.open(path, "r:") as archive:
                for member in archive:
                    if member.name in ("manifest.json", "./manifest.json"):
                        return "image"
        except tarfile.TarError:
            return "other"
    return "other"


# -- chunks over the MQTT link ---------------------------------------------------------------

_RESPONSE = re.compile(r"v2/(fw|sw)/response/(\d+)/chunk/(\d+)")
FW_ERROR_TOPIC = "v2/fw/error"  # ThingsBoard publishes sw errors here too (DEVICE_FIRMWARE_ERROR_TOPIC)


class MqttChunks:
    """A ChunkSource over ``MqttLink``: publish the request, wait for its response topic.

    Responses arrive on paho's thread through ``Inbound.chunk_sink`` (``deliver``),
    matched by (kind, requestId, chunk); no SUBSCRIBE is needed, ThingsBoard writes
    chunks and errors to the session whether or not it subscribed (PROTOCOL.md
    section 0.2, MqttDeviceAwareSessionContext.getQoSForTopic). A late or
    duplicate response finds nobody waiting and is dropped.
    """

    def __init__(self, publish: Callable[..., None]) -> None:
        self._publish = publish  # MqttLink.publish_async
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int, int], Any] = {}
        self._errors: list[Any] = []

    def request(self, kind: str, request_id: int, index: int, size: int, timeout_s: float) -> bytes:
        answer: queue.Queue[tuple[str, Any]] = queue.Queue()
        key = (kind, request_id, index)
        with self._lock:
            self._waiting[key] = answer
            self._errors.append(answer)

        def published(ok: bool, error: str | None) -> None:
            if not ok:
                answer.put(("lost", error or "not acknowledged"))

        try:
            self._publish(f"v2/{kind}/request/{request_id}/chunk/{index}", str(size).encode(), 1, published)
            try:
                what, value = answer.get(timeout=timeout_s)
            except queue.Empty:
                raise ChunkUnavailable(f"no answer to chunk {index} within {timeout_s:g} s") from None
        finally:
            with self._lock:
                self._waiting.pop(key, None)
                self._errors.remove(answer)
        if what == "chunk":
            return bytes(value)
        if what == "error":
            raise ChunkRefused(str(value))
        raise ChunkUnavailable(str(value))

    def deliver(self, topic: str, payload: bytes) -> bool:
        """From paho's thread: a chunk or an OTA error; True when the topic was ours."""
        if topic == FW_ERROR_TOPIC:
            with self._lock:
                waiting = list(self._errors)
            for answer in waiting:
                answer.put(("error", payload.decode("utf-8", "replace")[:200]))
            return True
        match = _RESPONSE.fullmatch(topic)
        if match is None:
            return False
        with self._lock:
            answer = self._waiting.get((match.group(1), int(match.group(2)), int(match.group(3))))
        if answer is not None:
            answer.put(("chunk", payload))
        return True
