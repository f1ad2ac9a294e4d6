"""Effects of the controller OTA (handled by ``teg_fsm.components.ota``).

Each names the paths and the version explicitly, so a journal says exactly
what the gateway did to the controller repository and the Docker engine.
"""

from __future__ import annotations

import attrs

from teg_fsm.engine.effects import Effect


@attrs.frozen(kw_only=True)
class FetchControllerRepo(Effect):
    """``git fetch --tags --force`` of the controller repository (``git_dir`` is its ``.git``)."""

    git_dir: str


@attrs.frozen(kw_only=True)
class CheckoutControllerVersion(Effect):
    """Resolve ``version`` (tag or 40-hex commit), force-checkout, hard reset, clean.

    Succeeds with ``{"commit": <hex>}``; fails with a reason when the version
    does not exist in the repository.
    """

    git_dir: str
    version: str


@attrs.frozen(kw_only=True)
class BuildControllerImage(Effect):
    """``docker build`` ``image`` from ``context_dir`` / ``dockerfile``.

    Skipped when the image exists (succeeds with ``{"cached": true}``); otherwise
    fails early when the engine's disk has less than ``min_free_mb`` free.
    """

    context_dir: str
    dockerfile: str
    image: str
    min_free_mb: int
    labels: dict[str, str] = attrs.field(factory=dict)
    network_mode: str | None = None


@attrs.frozen(kw_only=True)
class WriteControllerVersion(Effect):
    """Write ``version`` to ``path`` atomically (temp file, fsync, rename)."""

    path: str
    version: str


@attrs.frozen(kw_only=True)
class PruneControllerImages(Effect):
    """Remove ``teg-controller-*`` images except ``keep`` and the ``keep_count`` newest others."""

    keep: tuple[str, ...]
    keep_count: int


@attrs.frozen(kw_only=True)
class DownloadPackage(Effect):
    """Download the assigned OTA package file through ThingsBoard's chunk protocol and install it.

    The file goes to ``<data_dir>/ota/<checksum>.part`` (progress beside it, so a
    download cut by a disconnect or a restart resumes); ``checksum`` is verified
    with ``checksum_algorithm`` (ThingsBoard's names: MD5, SHA256, ...). Then, by
    content: a ``git bundle`` is fetched into the controller repository
    (``git_dir``), a ``docker save`` archive is loaded and tagged ``image``.
    Succeeds with ``{"kind": "bundle" | "image" | "other", "bytes": n, ...}``
    ("other": not installable, the git remote is used as before); fails with a
    reason before writing anything when ``size`` exceeds the free disk.
    """

    kind: str  # "sw" (or "fw"): the chunk topics v2/<kind>/request|response
    title: str
    version: str
    size: int | None  # sw_size; None when ThingsBoard did not say
    checksum: str
    checksum_algorithm: str
    git_dir: str
    image: str
    chunk_size: int
    data_dir: str
