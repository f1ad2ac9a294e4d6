"""File sync's rules: the plan's type, settings, the table helper, payloads and texts.

Nothing here keeps state or emits: ``machines/file_sync.py`` holds the table,
the machine's data and its actions; they call these to decide and to build the
effects they then emit.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
from statemachine import State

from teg_fsm.engine.effects.files import MirrorFiles, ScanFiles, WriteFile, content_bytes
from teg_fsm.engine.effects.mqtt import ATTRIBUTES_TOPIC, Publish, RequestAttributes

CONTENT_PREFIX = "FILE_CONTENT_"
LOG_CAP = 500
OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")
REPLIES = {"request", "scan", "fetch", "write", "mirror", "report"}
NEWS = "shared_attributes_received shared_attributes_updated init_files_requested check_due"


@attrs.define
class Plan:
    """What is still to do; rebuilt after a restart, so never persisted."""

    full: bool = False  # a full pass is wanted (requesting comes next)
    in_full: bool = False  # a full pass is under way: fetch, mirror and report everything
    force: bool = False  # init_files: rewrite even identical files
    scan: bool = False
    changed: set[str] = attrs.field(factory=set)  # definitions that changed: fetch after the scan
    fetch: set[str] = attrs.field(factory=set)
    fetching: list[str] = attrs.field(factory=list)
    writes: dict[str, Any] = attrs.field(factory=dict)  # key -> content, in arrival order
    writing: str | None = None
    mirror: set[str] = attrs.field(factory=set)
    report: bool = False

    def forget(self, key: str) -> None:
        for keys in (self.changed, self.fetch, self.mirror):
            keys.discard(key)
        self.writes.pop(key, None)


@attrs.define
class FileSyncSettings:
    check_interval_s: float = 30.0
    request_timeout_s: float = 30.0
    write_timeout_s: float = 120.0


def onward(src: State, steps: list[tuple[State, str]], last: State, reply: str) -> Any:
    """``src`` on every outcome of ``reply``: to the first step the plan needs, else ``last``."""
    event = " ".join(f"{reply}_{outcome}" for outcome in OUTCOMES) if reply in REPLIES else reply
    chain = None
    for target, guard in steps:
        transition = src.to(target, cond=guard, event=event, validators="take_in")
        chain = transition if chain is None else chain | transition
    if last is src:
        return chain | src.to.itself(internal=True, event=event, validators="take_in")
    return chain | src.to(last, event=event, validators="take_in")


# -- decisions ---------------------------------------------------------------


def content_key(name: str) -> str | None:
    """``FILE_CONTENT_a`` -> ``a``; None for any other attribute."""
    return name[len(CONTENT_PREFIX):] if name.startswith(CONTENT_PREFIX) else None


def digest(encoding: str, value: Any) -> str:
    """The md5 the file would have with ``value`` as its content; ContentError if it cannot."""
    return hashlib.md5(content_bytes(encoding, value)).hexdigest()


def drifted(local_hash: str, recorded: dict[str, Any], write_version: Any) -> bool:
    """The file differs from what was last reported: changed on disk, or a new write_version."""
    if local_hash != recorded.get("hash"):
        return True
    return write_version is not None and write_version != recorded.get("write_version")


def hashes_attribute(recorded: dict[str, dict[str, Any]], definitions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """FILE_HASHES as reported: managed files only, write_version only when set."""
    hashes = {}
    for key in sorted(recorded):
        if key in definitions:
            entry = {"hash": recorded[key]["hash"]}
            if recorded[key].get("write_version") is not None:
                entry["write_version"] = recorded[key]["write_version"]
            hashes[key] = entry
    return hashes


# -- effects -----------------------------------------------------------------


def request_definitions(settings: FileSyncSettings) -> RequestAttributes:
    return RequestAttributes(client_keys=("FILE_HASHES",), shared_keys=("FILES",), reply="request",
                             timeout_s=settings.request_timeout_s)


def scan(definitions: dict[str, dict[str, Any]]) -> ScanFiles:
    return ScanFiles(files={k: d["path"] for k, d in definitions.items()}, reply="scan")


def fetch(keys: list[str], settings: FileSyncSettings) -> RequestAttributes:
    shared = tuple(CONTENT_PREFIX + k for k in keys)
    return RequestAttributes(shared_keys=shared, reply="fetch", timeout_s=settings.request_timeout_s)


def write(key: str, d: dict[str, Any], content: Any, force: bool, settings: FileSyncSettings) -> WriteFile:
    return WriteFile(key=key, path=d["path"], encoding=d["encoding"], content=content, create=d["create"],
                     force=force, reply="write", timeout_s=settings.write_timeout_s)


def mirror(keys: list[str], definitions: dict[str, dict[str, Any]]) -> MirrorFiles:
    files = {k: {"path": definitions[k]["path"], "encoding": definitions[k]["encoding"]} for k in keys}
    return MirrorFiles(files=files, reply="mirror")


def report(hashes: dict[str, dict[str, Any]], settings: FileSyncSettings) -> Publish:
    payload = json.dumps({"FILE_HASHES": hashes}, sort_keys=True)
    return Publish(topic=ATTRIBUTES_TOPIC, payload=payload, reply="report", timeout_s=settings.request_timeout_s)


# -- texts -------------------------------------------------------------------


def capped(message: str) -> str:
    """``message`` cut to LOG_CAP: a value quoted in an error can be a whole file."""
    return message[:LOG_CAP] + "..." if len(message) > LOG_CAP else message


def mirror_problem(key: str, status: str) -> str | None:
    """The error to log for a MirrorFiles status, None when it went fine."""
    if status.startswith("too_large:"):
        size = status.partition(":")[2]
        return (f"file {key}: too large to mirror into FILE_READ_{key} "
                f"({size} bytes, ThingsBoard accepts 65536 per message); sent E_TOOLARGE")
    if status.startswith("error:"):
        return f"file {key}: cannot be mirrored: {status.partition(':')[2]}"
    return None
