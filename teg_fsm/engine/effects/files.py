"""Effects on managed files (handled by the files adapter, ``teg_fsm/adapters/files.py``).

Paths in these effects are the operator's raw definition paths (``$DATA_PATH``
not yet expanded): the adapter alone expands, resolves and confines them, so
the rule "nothing outside the allowed roots" lives in one place.

Also here, pure (no I/O) so the machine and the adapter share them: how a
``FILE_CONTENT_<key>`` value becomes bytes (the machine rejects bad content
before anything is written, the adapter writes the bytes) and how the FILES
and FILE_HASHES attributes are read.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from teg_fsm.engine.effects import Effect

ENCODINGS = ("text", "json", "base64")
NO_FILE = "E_NOFILE"  # the existing gateway's marker for a missing file (hash and mirror)
TOO_LARGE = "E_TOOLARGE"  # mirror marker: the file does not fit in one ThingsBoard message


class ContentError(ValueError):
    """A content value that does not fit its encoding; the message says why."""


def content_bytes(encoding: str, value: Any) -> bytes:
    """The bytes a ``FILE_CONTENT_`` value stands for, or ContentError.

    json content is written as ``json.dumps(value)``, like the existing gateway,
    so a device switching over sees the same bytes and the same md5.
    """
    if encoding == "text":
        if not isinstance(value, str):
            raise ContentError(f"text content must be a string, got {_kind(value)}")
        return value.encode("utf-8")
    if encoding == "json":
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError as exc:
                raise ContentError(f"json content is a string that is not valid JSON ({exc})") from None
            return value.encode("utf-8")
        if not isinstance(value, (dict, list)):
            raise ContentError(f"json content must be a JSON object or array, got {_kind(value)}")
        return json.dumps(value).encode("utf-8")
    if encoding == "base64":
        if not isinstance(value, str):
            raise ContentError(f"base64 content must be a string, got {_kind(value)}")
        try:
            # Line breaks are common in pasted base64 (``base64`` wraps at 76
            # columns); anything else outside the alphabet is an error.
            return base64.b64decode("".join(value.split()).encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
            raise ContentError(f"base64 content does not decode ({exc})") from None
    raise ContentError(f"unknown encoding {encoding!r} (expected one of {', '.join(ENCODINGS)})")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@attrs.frozen(kw_only=True)
class ScanFiles(Effect):
    """Hash the managed files: ``files`` maps key -> raw path.

    Succeeds with ``{key: {"hash": md5 | "E_NOFILE", "path": located}}``, or
    ``{key: {"error": reason}}`` for a path that is refused (outside the roots,
    through a symlink, or not a regular file: a FIFO, a device node, a socket, a
    directory; the reason names which) or unreadable.
    """

    files: dict[str, str]


@attrs.frozen(kw_only=True)
class WriteFile(Effect):
    """Write one file atomically (temp file, fsync, rename), keeping its mode.

    ``content`` is the ``FILE_CONTENT_<key>`` value as ThingsBoard sent it; the
    adapter turns it into bytes with ``content_bytes``. Nothing is written when
    the bytes already match the file. Succeeds with ``{"hash", "changed",
    "path"}``; fails (nothing on disk changed) for a refused path, a missing
    file that may not be created, bad content or an I/O error.
    """

    key: str
    path: str
    encoding: str
    content: Any
    create: bool = True
    force: bool = False  # write even when the bytes match (init_files rewrites everything)


@attrs.frozen(kw_only=True)
class MirrorFiles(Effect):
    """Publish ``FILE_READ_<key>`` for each file: ``files`` maps key -> {path, encoding}.

    The adapter reads and encodes each file and publishes it itself, so file
    contents never enter the journal. Succeeds with ``{key: status}``, status
    being ``sent``, ``missing`` (E_NOFILE sent), ``too_large:<bytes>`` (E_TOOLARGE
    sent instead of the content) or ``error:<reason>``.
    """

    files: dict[str, dict[str, str]]


# -- the FILES and FILE_HASHES attributes (wire format, pure) -------------


def parse_definitions(raw: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """FILES (an object, or a JSON string of one) -> (valid definitions, {key: reason} for the rest).

    A definition becomes ``{path, encoding, write_version, create, restart}``;
    the defaults are the existing gateway's (encoding text, create_if_not_exist
    true, restart_controller_on_change false).
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            return {}, {"FILES": f"not valid JSON ({exc})"}
    if not isinstance(raw, dict):
        return {}, {"FILES": f"must be a JSON object of definitions, got {_kind(raw)}"}
    found: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for key, definition in raw.items():
        try:
            found[str(key)] = _definition(definition)
        except ValueError as exc:
            errors[str(key)] = str(exc)
    return found, errors


def _definition(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"a definition must be an object, got {_kind(raw)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ValueError("missing path" if path in (None, "") else f"path must be a string, got {_kind(path)}")
    encoding = raw.get("encoding") or "text"
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} (expected one of {', '.join(ENCODINGS)})")
    version = raw.get("write_version")
    if version == "":
        version = None
    if version is not None and not isinstance(version, (str, int, float)):
        raise ValueError(f"write_version must be a number or a string, got {_kind(version)}")
    return {
        "path": path,
        "encoding": encoding,
        "write_version": version,
        "create": _flag(raw, "create_if_not_exist", True),
        "restart": _flag(raw, "restart_controller_on_change", False),
    }


def _flag(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_hashes(raw: Any) -> dict[str, dict[str, Any]]:
    """FILE_HASHES (an object, or a JSON string of one) -> {key: {hash, write_version}}; junk is skipped."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    if not isinstance(raw, dict):
        return {}
    return {
        str(key): {"hash": entry["hash"], "write_version": entry.get("write_version")}
        for key, entry in raw.items()
        if isinstance(entry, dict) and isinstance(entry.get("hash"), str)
    }
