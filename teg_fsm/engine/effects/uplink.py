"""Effects of the uplink: move controller rows, send packets, manage the archive.

Rows never travel in effects or events (both are journaled): effects say how
much to take, results say which id range was taken and what it cost.
"""

from __future__ import annotations

import attrs

from teg_fsm.engine.effects import Effect

DATA = "data"
LOGS = "logs"


@attrs.frozen(kw_only=True)
class TransferRows(Effect):
    """Move up to ``max_rows`` rows from the controller's ``messages`` table.

    In one transaction: valid non-log rows are copied to the archive, valid
    rows go to ``pending_mqtt_messages``, malformed ones to the dead letters,
    and all of them leave ``messages``. Nothing moves while pending holds
    ``pending_max_rows`` rows. Succeeds with ``{"moved", "dead", "more",
    "pending_rows", "pending_top", "full"}``.
    """

    max_rows: int
    pending_max_rows: int


@attrs.frozen(kw_only=True)
class SendPacket(Effect):
    """Publish the next rows of ``stream`` (data or logs) as one telemetry array, QoS 1.

    The adapter keeps a cursor per stream; ``restart`` moves it back to the
    oldest unacknowledged row (after a reconnect). The packet stays under
    ``max_payload_bytes`` and, when given, ``max_points`` data points. Rows are
    deleted after the PUBACK, then the effect succeeds with ``{"rows",
    "points", "bytes", "first_id", "last_id", "more", "top", "needs_points"}``
    (``rows`` 0 when there was nothing to send, or ``needs_points`` when the
    next row alone costs more than ``max_points``). It fails when the session
    drops before the PUBACK; the rows stay pending.
    """

    stream: str = DATA
    restart: bool = False
    max_payload_bytes: int
    max_points: int | None = None
    points_capacity: int | None = None


@attrs.frozen(kw_only=True)
class RepublishArchived(Effect):
    """Copy archived rows with ``start_ms <= timestamp_ms <= end_ms`` back into pending."""

    start_ms: int
    end_ms: int


@attrs.frozen(kw_only=True)
class DiscardArchived(Effect):
    """Delete archived rows with ``start_ms <= timestamp_ms <= end_ms``."""

    start_ms: int
    end_ms: int
