"""Telemetry packets from queue rows: validation, data-point cost, size limits.

A packet is a JSON array of ``{"ts", "values"}`` records (PROTOCOL.md §1.1),
built by joining the rows' own JSON text, never re-serialised. Rows are parsed
when they leave the controller queue (validation, ts, archive); at send time
only rows we did not validate ourselves, or data points under a rate limit,
need another parse.
"""

from __future__ import annotations

import json
import re
from typing import Any
from collections.abc import Iterable

import attrs

Reason = str


def parse_record(text: object) -> tuple[int, int] | Reason:
    """``(ts, data points)`` of a queue row, or why it cannot be sent."""
    parsed = parse_values(text)
    return parsed if isinstance(parsed, str) else parsed[:2]


def parse_values(text: object) -> tuple[int, int, str] | Reason:
    """``(ts, data points, values as JSON text)`` of a queue row, or why it cannot be sent."""
    if not isinstance(text, str):
        return "message is not text" if text is not None else "message is NULL"
    fast = _parse_usual_shape(text)
    if fast is not None:
        return fast
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return f"message is a JSON {type(obj).__name__}, not an object"
    if "ts" not in obj or "values" not in obj:
        return "message lacks " + " and ".join(k for k in ("ts", "values") if k not in obj)
    ts, values = obj["ts"], obj["values"]
    if isinstance(ts, bool) or not isinstance(ts, (int, str)) or (isinstance(ts, str) and not ts.isdigit()):
        return f"ts is not a number of milliseconds: {str(ts)[:40]!r}"
    if not isinstance(values, dict):
        return "values is not an object"
    return int(ts), len(values), _compact(values)


# Rows nearly always read `{"ts": <digits>, "values": {...}}`: for those the
# values object is decoded once and its text sliced out for the archive,
# instead of decoding the whole row and encoding the values again.
_USUAL_PREFIX = re.compile(r'\s*\{\s*"ts"\s*:\s*(\d+)\s*,\s*"values"\s*:\s*')
_decoder = json.JSONDecoder()


def _parse_usual_shape(text: str) -> tuple[int, int, str] | None:
    match = _USUAL_PREFIX.match(text)
    if match is None:
        return None
    try:
        values, end = _decoder.raw_decode(text, match.end())
    except ValueError:
        return None
    if not isinstance(values, dict) or text[end:].strip() != "}":
        return None
    return int(match.group(1)), len(values), text[match.end():end]


def archived_values(values_text: str) -> str:
    """What the archive keeps of a valid row: its ``values`` object as JSON text.

    The existing gateway archives ``json.dumps(values)`` beside ``timestamp_ms``;
    its archive files must stay readable (and republishable) after the switch.
    """
    return values_text


_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


@attrs.define
class Packet:
    """One packet's rows: ``after_id < id <= last_id``; ``dead`` rows are to be dead-lettered."""

    after_id: int
    last_id: int
    payload: bytes = b""
    rows: int = 0
    points: int = 0
    more: bool = False
    needs_points: int | None = None
    dead: list[tuple[int, Reason]] = attrs.field(factory=list)


def build_packet(
    rows: Iterable[tuple[int, int, int, str] | tuple[int, Reason]],
    after_id: int,
    max_bytes: int,
    max_points: int | None,
    points_capacity: int | None,
) -> Packet:
    """Fill one packet from ``(id, ts, points, text)`` rows (or ``(id, reason)`` for bad ones).

    Stops before the row that would break ``max_bytes`` or ``max_points``. A
    row that alone exceeds the packet size, or costs more data points than
    the smallest rate-limit window holds, can never be sent: it goes to
    ``dead``. Records keep id order: the transfer stored each batch in ts order.
    """
    packet = Packet(after_id=after_id, last_id=after_id)
    records: list[tuple[int, str]] = []
    size = 1  # "[" ... "]" and commas: one byte per record plus one
    for row in rows:
        if len(row) == 2:
            packet.dead.append((row[0], row[1]))  # type: ignore[arg-type]
            packet.last_id = row[0]
            continue
        row_id, ts, points, text = row  # type: ignore[misc]
        nbytes = text_bytes(text)
        if nbytes + 2 > max_bytes:
            packet.dead.append((row_id, f"record of {nbytes} bytes exceeds the packet limit of {max_bytes}"))
        elif points_capacity is not None and points > points_capacity:
            packet.dead.append((row_id, f"record has {points} data points, more than the rate limit allows at once"))
        elif max_points is not None and packet.points + points > max_points:
            packet.more = True
            if not records:
                packet.needs_points = points
            break
        elif size + nbytes + 1 > max_bytes:
            packet.more = True
            break
        else:
            records.append((ts, text))
            size += nbytes + 1
            packet.points += points
        packet.last_id = row_id
    packet.rows = len(records)
    if records:
        packet.payload = ("[" + ",".join(text for _, text in records) + "]").encode("utf-8")
    return packet
