"""OTA package assignment and the MQTT chunk protocol (§5).

Assignment follows ``DefaultOtaPackageStateService``: telemetry ``target_*`` and
``*_state = QUEUED``; when the (here: optionally delayed) queue runs,
``*_state = INITIATED``, then the stale shared attributes are deleted (the device
sees ``{"deleted": [...]}``) and the new ones set in one update.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Any

import mmh3  # C MurmurHash3, a test dependency: an implementation independent of the gateway's

from tools.tb_standin.model import OtaPackage

OTA_KEYS = ("title", "version", "ts", "state", "size", "checksum", "checksum_algorithm", "url", "tag")
_HASHES = {"MD5": "md5", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


class OtaError(Exception):
    """A chunk request TB answers on ``v2/fw/error`` and then disconnects."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def checksum(data: bytes, algorithm: str) -> str:
    """Hex checksum the way TB stores it (the device verifies it).

    BaseOtaPackageService.generateChecksum: Guava's ``Hashing.<algorithm>().hashBytes(data).toString()``.
    MURMUR3_32 and MURMUR3_128 are ``Hashing.murmur3_32()`` / ``murmur3_128()`` with seed 0;
    ``HashCode.toString()`` prints ``asBytes()``, little-endian for these and CRC32 (mmh3's ``digest()``).
    """
    if algorithm in _HASHES:
        return hashlib.new(_HASHES[algorithm], data).hexdigest()
    if algorithm == "CRC32":
        return (zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little").hex()  # HashCode.fromInt: little-endian
    if algorithm == "MURMUR3_32":
        return mmh3.mmh3_32(data, seed=0).digest().hex()
    if algorithm == "MURMUR3_128":
        return mmh3.mmh3_x64_128(data, seed=0).digest().hex()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (ThingsBoard's ChecksumAlgorithm has no such value)")


def make_package(kind: str, title: str, version: str, data: bytes = b"", url: str | None = None,
                 tag: str | None = None, checksum_algorithm: str | None = "SHA256",
                 checksum_value: str | None = None) -> OtaPackage:
    """A package stored in TB (``data``) or an external one (``url``)."""
    if kind not in ("fw", "sw"):
        raise ValueError("kind must be 'fw' or 'sw'")
    if url is None and checksum_value is None:
        checksum_algorithm = checksum_algorithm or "SHA256"  # TB computes SHA256 if none was given
        checksum_value = checksum(data, checksum_algorithm)
    return OtaPackage(kind, title, version, data, url, tag, checksum_algorithm, checksum_value)


def queued_telemetry(package: OtaPackage, ts: int) -> dict[str, Any]:
    """Telemetry TB saves when the package is assigned."""
    p = package.kind
    values: dict[str, Any] = {f"target_{p}_title": package.title, f"target_{p}_version": package.version}
    if package.tag:
        values[f"target_{p}_tag"] = package.tag
    values[f"target_{p}_ts"] = ts
    values[f"{p}_state"] = "QUEUED"
    return values


def shared_update(package: OtaPackage) -> tuple[list[str], dict[str, Any]]:
    """(keys deleted first, attributes then set) when the queued assignment is processed."""
    p = package.kind
    values: dict[str, Any] = {f"{p}_title": package.title, f"{p}_version": package.version}
    deleted: list[str] = []
    if package.tag:
        values[f"{p}_tag"] = package.tag
    else:
        deleted.append(f"{p}_tag")
    if package.url is None:
        values[f"{p}_size"] = len(package.data)
        values[f"{p}_checksum_algorithm"] = package.checksum_algorithm
        values[f"{p}_checksum"] = package.checksum
        deleted.append(f"{p}_url")
    else:
        values[f"{p}_url"] = package.url
        deleted.append(f"{p}_size")  # the size of an external package is unknown
        if package.checksum is not None:
            values[f"{p}_checksum_algorithm"] = package.checksum_algorithm
            values[f"{p}_checksum"] = package.checksum
        else:
            deleted += [f"{p}_checksum_algorithm", f"{p}_checksum"]
    return deleted, values


def unassigned_keys(kind: str) -> list[str]:
    """Shared keys TB deletes when a package is unassigned."""
    return [f"{kind}_{name}" for name in OTA_KEYS]


def check_downloadable(package: OtaPackage | None) -> None:
    """Raise :class:`OtaError` with the status TB's core answers for a package it cannot serve.

    NOT_FOUND: nothing assigned; FAILURE: an external-URL package, which has no data to chunk
    (``OtaPackageCallback.onSuccess`` publishes the status, MTH:792-799).
    """
    if package is None:
        raise OtaError("NOT_FOUND")
    if package.url is not None:
        raise OtaError("FAILURE")


def chunk(package: OtaPackage, size: int, index: int) -> bytes:
    """Bytes ``[size*index, size*index+size)``; empty past the end; size 0 = the whole file."""
    if size <= 0:
        return package.data  # the cache ignores the index when no chunk size is given
    start = size * index
    return package.data[start:start + size]


def parse_chunk_size(payload: bytes) -> int:
    """``Integer.parseInt`` of the payload, 0 when empty (MTH:679-680); OtaError when it throws."""
    text = payload.decode("utf-8", "replace")
    if not text:
        return 0
    if not re.fullmatch(r"[-+]?[0-9]+", text) or not -(2**31) <= int(text) < 2**31:
        raise OtaError("NumberFormatException")
    return int(text)
