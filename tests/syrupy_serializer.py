"""The project's snapshot serializer (after Home Assistant's ``tests/syrupy.py``).

Snapshots must not change because a journal was recorded on another day, in
another temp directory or with other generated ids. Before the Amber format
renders the data, this serializer masks:

- effect ids (``ota:12:0``) and ``effect_id`` values -> ``<effect-id>``;
- timestamps: integer values of ``ts``/``*_ms``/``timestamp*`` keys, 13-digit
  unix-ms numbers and ISO or compact date-times inside strings -> ``<ts>``;
- temp paths (``/tmp/pytest-of-root/pytest-12/test_x0``, ``/tmp/teg-...``,
  ``/tmp/tmpab12cd34``) -> ``<tmp>``;
- generated tokens (ThingsBoard-like 20-character alphanumerics, and any
  string under a token/secret/credentials key) -> ``<token>``;
- per-run names: the test session label and the OTA tests' version suffixes;
- Docker container/image ids (12 or 64 hex digits) -> ``<docker-id>`` and
  ephemeral local ports (``localhost:38939``) -> ``localhost:<port>``.

md5 file hashes (32 hex digits) are content, not ids, and stay.

``VERSION`` is written into every snapshot file's header; bump it whenever the
masking changes, so that stale snapshots are reported instead of silently
compared with differently masked data.
"""

from __future__ import annotations

import re
from typing import Any

from syrupy.extensions.amber import AmberDataSerializer, AmberSnapshotExtension

SERIALIZER_VERSION = "1"

_EFFECT_ID = re.compile(r"^[a-z_]+:\d+:\d+$")
_TS_KEY = re.compile(r"(^|_)ts(_ms)?$|_ms$|^timestamp")
_SECRET_KEY = re.compile(r"token$|secret|password|credentialsvalue|accesstoken", re.IGNORECASE)
_RUN_KEYS = frozenset({"teg-test-session"})
_STRING_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s\"']+"), "<tmp>"),
    (re.compile(r"/tmp/(?:teg-|tmp)[A-Za-z0-9_.-]+"), "<tmp>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?"), "<ts>"),
    (re.compile(r"\b\d{8}T\d{6}Z\b"), "<ts>"),
    (re.compile(r"\b1\d{12}\b"), "<ts>"),
    (re.compile(r"\b(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{20}\b"), "<token>"),
    (re.compile(r"\b(v\d+)-[0-9a-f]{6}\b"), r"\1-<run>"),
    (re.compile(r"\b[0-9a-f]{64}\b|\b[0-9a-f]{12}\b"), "<docker-id>"),
    (re.compile(r"\b(localhost|127\.0\.0\.1):\d{4,5}\b"), r"\1:<port>"),
)


def mask_string(text: str) -> str:
    """Mask temp paths, date-times, unix-ms numbers, tokens and run suffixes in a string."""
    for pattern, replacement in _STRING_MASKS:
        text = pattern.sub(replacement, text)
    return text


def mask(data: Any, key: str = "") -> Any:
    """A copy of ``data`` (JSON-like) with everything run-specific masked."""
    if isinstance(data, dict):
        return {k: mask(v, str(k)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(mask(v, key) for v in data)
    if isinstance(data, bool) or data is None:
        return data
    if key in ("id", "effect_id") and isinstance(data, str) and _EFFECT_ID.match(data):
        return "<effect-id>"
    if key in _RUN_KEYS:
        return "<run>"
    if isinstance(data, int) and _TS_KEY.search(key):
        return "<ts>"
    if isinstance(data, str):
        return "<token>" if _SECRET_KEY.search(key) else mask_string(data)
    return data


class TegSnapshotSerializer(AmberDataSerializer):
    """Amber, with run-specific values masked first; the version says which masking."""

    VERSION = f"{AmberDataSerializer.VERSION}.teg-{SERIALIZER_VERSION}"

    @classmethod
    def _serialize(cls, data: Any, *, depth: int = 0, **kwargs: Any) -> str:
        if depth == 0:
            data = mask(data)
        return super()._serialize(data, depth=depth, **kwargs)


class TegSnapshotExtension(AmberSnapshotExtension):
    """The ``snapshot`` extension tests of the project use (see tests/replay/conftest.py)."""

    serializer_class = TegSnapshotSerializer
