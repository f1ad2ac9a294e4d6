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
