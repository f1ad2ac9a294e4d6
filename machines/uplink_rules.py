"""The uplink's rules: its settings, one send pipeline's position, the table helper.

Nothing here keeps machine state or emits: ``machines/uplink.py`` holds the
table, the machine's data, its handlers and the planning and rate budget that
decide what goes out next; it builds its ``Stream``s and reads
``PACKET_OVERHEAD`` from here.
"""

from __future__ import annotations

import attrs
from statemachine import State
from statemachine.transition_list import TransitionList

from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC

# MQTT remaining length = 2 + topic + 2 (packet id) [+ MQTT 5 property length]; the
# limit counts all of it (PROTOCOL.md §1.2). A few bytes of slack on top.
PACKET_OVERHEAD = 2 + len(TELEMETRY_TOPIC) + 2 + 1 + 4


@attrs.define
class UplinkSettings:
    batch_rows: int = 2000
    pending_max_rows: int = 5_000_000
    max_inflight: int = 16
    max_payload_size: int = 65536
    rate_messages: str = ""
    rate_telemetry_messages: str = ""
    rate_data_points: str = ""
    # A PUBACK later than this on a live session: the session is stuck. The gateway passes
    # TEG_UPLINK_PUBACK_TIMEOUT_S (10 s); 60 stays the default so journals recorded before
    # that setting existed replay unchanged.
    packet_timeout_s: float = 60.0
    stall_timeout_max_s: float = 60.0  # the bound doubles after each stuck session, up to this
    transfer_timeout_s: float = 120.0
    retry_s: float = 1.0
    transfer_retry_s: float = 5.0


@attrs.define
class Stream:
    """Where one send pipeline stands: ids known to exist vs. ids already taken."""

    reply: str
    known_top: int | None = None  # highest id known to be pending; None: unknown, probe
    sent_top: int = 0  # highest id the adapter has looked at since the cursor restarted
    in_flight: int = 0
    restart: bool = True

    @property
    def waiting(self) -> bool:
        return self.known_top is None or self.known_top > self.sent_top


def loops(*states: State) -> TransitionList:
    """Internal self-transitions in every given state (bookkeeping events)."""
    transitions = TransitionList()
    for state in states:
        transitions = transitions | state.to.itself(internal=True)
    return transitions
