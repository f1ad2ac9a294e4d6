"""What the ota machine (machines/ota.py) computes without its state.

Pure functions and data, no I/O and no machine state: the version rule, the
machine's settings, how an assignment is read from shared attributes, which
version to install next, the effect commands of each step, the ``sw_state``
telemetry payload and the texts of ``sw_error``.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from teg_fsm.engine.effects.controller import image_name
from teg_fsm.engine.effects.ota import (
    BuildControllerImage,
    CheckoutControllerVersion,
    DownloadPackage,
    FetchControllerRepo,
    PruneControllerImages,
    WriteControllerVersion,
)
from teg_fsm.engine.events import Event

# Docker repository path component (lowercase, separators . _ __ -), so the
# image name is valid; it also rules out spaces, shell characters and "..".
_TAG = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
VERSION_RULE = (
    "a version must be a git tag of lowercase letters, digits and . _ - "
    "(e.g. v1.2.3, at most 128 characters) or a full 40-hex commit hash"
)
# ThingsBoard's JsonConverter (transport.json.type_cast_enabled, on by default)
# stores every string value that commons-lang3 NumberUtils.isParsable accepts as
# a number: an optional "-", then digits with at most one ".", not ending in
# "." (PROTOCOL.md section 9). "1.10" would come back as 1.1 and "007" as 7, so
# the version ThingsBoard shows would no longer be the version that runs.
# Scientific and hex forms ("1e3", "0x10") are not parsable there: they stay text.
_TB_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
NUMERIC_RULE = (
    "ThingsBoard would store it as a number (its JSON type cast turns 1.10 into 1.1); "
    "use a tag with a letter, e.g. v{version}"
)


def looks_numeric(version: str) -> bool:
    """ThingsBoard would turn this string into a number (NumberUtils.isParsable, no trailing ".")."""
    return bool(_TB_NUMBER.fullmatch(version)) and not version.endswith(".")


def version_error(version: Any, *, assigned: bool = True) -> str | None:
    """Why ``version`` cannot be installed, or None when it is acceptable.

    ``assigned=False`` for a version the device already runs (version file,
    TEG_DEFAULT_CONTROLLER_VERSION): a numeric-looking one from the existing
    gateway is still rebuilt when its image is missing; only a new assignment is
    refused for it.
    """
    if not isinstance(version, str) or not version:
        return f"refused version {version!r}: {VERSION_RULE}"
    if assigned and looks_numeric(version):
        return f"refused version {version!r}: " + NUMERIC_RULE.format(version=version)
    if _COMMIT.fullmatch(version) or (
        len(version) <= 128 and _TAG.fullmatch(version) and not version.endswith(".lock")
    ):
        return None
    return f"refused version {version!r}: {VERSION_RULE}"


@attrs.define
class OtaSettings:
    git_dir: str = ""
    context_dir: str = ""
    dockerfile: str = "./Dockerfile"
    version_file: str = "last_launched_controller_version.txt"
    last_good: str | None = None  # read from version_file at boot; a checkpoint wins
    title: str = "controller"  # current_sw_title until a package title is known
    probation_s: float = 120.0
    health_timeout_s: float = 120.0
    min_free_disk_mb: int = 1024
    keep_images: int = 2
    fetch_timeout_s: float = 300.0
    fetch_retry_s: float = 600.0
    checkout_timeout_s: float = 120.0
    build_timeout_s: float = 3600.0
    swap_timeout_s: float = 300.0
    record_timeout_s: float = 30.0
    image_labels: dict[str, str] = attrs.field(factory=dict)
    build_network_mode: str | None = None
    package_dir: str = ""  # where package downloads (part files) go; the component sets <data dir>/ota
    chunk_size: int = 65536  # bytes per chunk request (ThingsBoard's cap, max_payload_size)
    download_timeout_s: float = 3600.0


# -- assignments ---------------------------------------------------------------

Assignment = tuple[str | None, str | None]  # (version, title)


def assigned(ev: Event, current: Assignment) -> Assignment:
    """(version, title) after an attribute push or response; ``current`` when it names none."""
    if ev.name == "shared_attributes_received":
        shared = ev.data.get("shared") or {}
        return shared.get("sw_version", shared.get("sf_version")), shared.get("sw_title", shared.get("sf_title"))
    values, deleted = ev.data.get("values") or {}, ev.data.get("deleted") or []
    for prefix in ("sw", "sf"):  # sw_* first, then the legacy sf_*
        if f"{prefix}_version" in values:
            return values[f"{prefix}_version"], values.get(f"{prefix}_title")
    if "sw_version" in deleted or "sf_version" in deleted:
        return None, None
    return current


def package_of(ev: Event, current: dict[str, Any] | None) -> dict[str, Any] | None:
    """The file of the assigned package (size, checksum, algorithm) after an attribute push or response.

    ThingsBoard writes ``sw_size``, ``sw_checksum_algorithm`` and ``sw_checksum`` and
    deletes ``sw_url`` for a package stored with a file; an external package has
    ``sw_url`` and cannot be downloaded over MQTT (PROTOCOL.md section 5.1,
    DefaultOtaPackageStateService). A message that assigns no version keeps ``current``.
    ``sw_size`` is asked for after every connect (connection.SHARED_KEYS) and checked by the
    codec (a non-negative integer); a package without one is downloaded until the empty chunk.
    """
    if ev.name == "shared_attributes_received":
        values = ev.data.get("shared") or {}
        if "sw_version" not in values:
            return None  # nothing assigned, or the legacy sf_version (which never has a file)
    else:
        values = ev.data.get("values") or {}
        if "sw_version" not in values:
            deleted = ev.data.get("deleted") or []
            reassigned = "sf_version" in values or "sw_version" in deleted or "sf_version" in deleted
            return None if reassigned else current
    checksum, algorithm, size = values.get("sw_checksum"), values.get("sw_checksum_algorithm"), values.get("sw_size")
    if values.get("sw_url") or not isinstance(checksum, str) or not checksum:
        return None
    return {
        "checksum": checksum,
        "algorithm": algorithm if isinstance(algorithm, str) else "SHA256",
        "size": size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
    }


def next_target(desired: str | None, running: str | None, blocked: str | None) -> str | None:
    """The version to install next, or None (nothing assigned, refused, running or blocked)."""
    if desired is None or version_error(desired) or desired == running or desired == blocked:
        return None
    return desired


# -- effect commands -------------------------------------------------------------


def fetch_effect(s: OtaSettings) -> FetchControllerRepo:
    return FetchControllerRepo(git_dir=s.git_dir, reply="fetch", timeout_s=s.fetch_timeout_s)


def download_effect(s: OtaSettings, version: str | None, title: str | None,
                    package: dict[str, Any]) -> DownloadPackage:
    return DownloadPackage(
        kind="sw", title=title or s.title, version=version or "", size=package.get("size"),
        checksum=str(package.get("checksum") or ""), checksum_algorithm=str(package.get("algorithm") or ""),
        git_dir=s.git_dir, image=image_name(version or ""), chunk_size=s.chunk_size, data_dir=s.package_dir,
        reply="download", timeout_s=s.download_timeout_s)


def checkout_effect(s: OtaSettings, version: str | None) -> CheckoutControllerVersion:
    return CheckoutControllerVersion(
        git_dir=s.git_dir, version=version or "", reply="checkout", timeout_s=s.checkout_timeout_s)


def build_effect(s: OtaSettings, version: str | None) -> BuildControllerImage:
    return BuildControllerImage(
        context_dir=s.context_dir, dockerfile=s.dockerfile, image=image_name(version or ""),
        min_free_mb=s.min_free_disk_mb, labels=dict(s.image_labels), network_mode=s.build_network_mode,
        reply="build", timeout_s=s.build_timeout_s)


def record_effect(s: OtaSettings, version: str | None) -> WriteControllerVersion:
    return WriteControllerVersion(
        path=s.version_file, version=version or "", reply="record", timeout_s=s.record_timeout_s)


def prune_effect(s: OtaSettings, *versions: str | None) -> PruneControllerImages:
    """Prune old images, keeping those of ``versions``; reply=None: nothing depends on its outcome."""
    keep = tuple(v for v in versions if v)
    return PruneControllerImages(keep=tuple(image_name(v) for v in keep), keep_count=s.keep_images)


# -- sw_state telemetry ----------------------------------------------------------


def sw_state_payload(running: str | None, state: str, error: str | None) -> dict[str, Any]:
    """The ``sw_state`` telemetry ThingsBoard's OTA dashboard reads (keys in this order).

    ``current_sw_title`` carries the version string, as the existing gateway sends
    it (its dashboard shows the title); both keys are left out while no version runs.
    """
    payload: dict[str, Any] = {}
    if running is not None:
        payload["current_sw_title"] = running
        payload["current_sw_version"] = running
    payload["sw_state"] = state
    if error:
        payload["sw_error"] = error
    return payload


# -- sw_error reasons ------------------------------------------------------------
# One function per text. Operators read these on ThingsBoard and recorded journals
# contain them: change a text and the replay snapshots change with it.

OPERATOR_ROLLBACK = "operator asked for a rollback"


def error_of(ev: Event) -> str:
    """What went wrong, as an outcome event tells it."""
    return str(ev.data.get("error") or ev.data.get("reason") or ev.name.replace("_", " "))


def spaced(state_name: Any) -> str:
    """``rolling_back`` -> ``rolling back``."""
    return str(state_name).replace("_", " ")


def fetch_failed(target: str | None, error: str) -> str:
    return f"fetching the controller repository for {target} failed: {error}"


def fetch_failed_trying_local(target: str | None, error: str) -> str:
    return f"fetching the controller repository for {target} failed ({error}); trying the local refs"


def download_failed(target: str | None, error: str) -> str:
    return f"downloading the OTA package of {target} failed: {error}"


def package_not_installable(target: str | None) -> str:
    return (f"the OTA package of {target} is neither a git bundle nor a docker image archive: "
            "fetching the controller repository instead")


def image_missing(version: str) -> str:
    return f"the controller has no image of {version}: fetching, checking out and building it"


def step_failed(event_name: str, target: str | None, error: str) -> str:
    step = "checking out" if event_name.startswith("checkout") else "building the image of"
    return f"{step} {target} failed: {error}"


def live_failed(event_name: str, target: str | None, error: str) -> str:
    what = "starting" if event_name.startswith("swap") else "probation of"
    return f"{what} {target} failed: {error}"


def swap_timed_out(target: str | None, seconds: float) -> str:
    return f"the swap to {target} did not finish within {seconds:g} s"


def no_health(target: str | None, seconds: float) -> str:
    return f"{target} wrote no health check within {seconds:g} s"


def without_rollback(reason: str, target_is_last_good: bool = False) -> str:
    if target_is_last_good:
        return f"{reason}; it is the last good version: the controller machine keeps restarting it"
    return f"{reason}; no last good version to roll back to"


ROLLED_BACK_PREFIX = "rolled back to "


def rolled_back(last_good: str | None, reason: str) -> str:
    return f"{ROLLED_BACK_PREFIX}{last_good}: {reason}"


def is_rollback_reason(reason: str) -> bool:
    """``reason`` is the text written after a completed rollback (``rolled_back``)."""
    return reason.startswith(ROLLED_BACK_PREFIX)


def rollback_failed(last_good: str | None, error: str, reason: str) -> str:
    return f"rolling back to {last_good} failed ({error}) after: {reason}"


def crash_loop(from_state: Any, target: str | None) -> str:
    return f"the gateway restarted repeatedly during {spaced(from_state)} of {target}"


def gave_up(from_state: Any, target: str | None) -> str:
    return f"gave up on {target}: the gateway restarted repeatedly while {spaced(from_state)}"


def cancelled_by_operator(target: str | None, running: str | None) -> str:
    return f"update to {target} cancelled by operator; {running} still running"


def record_failed(running: str | None, version_file: str, error: str) -> str:
    return f"{running} runs, but {version_file} could not be written ({error}); free space or fix permissions"
