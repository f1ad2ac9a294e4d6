"""Telemetry packets from queue rows: validation, data-point cost, size limits.

A packet is a JSON array of ``{"ts", "values"}`` records (PROTOCOL.md §1.1),
built by joining the rows' own JSON text, never re-serialised. Rows are parsed
when they leave the controller queue (validation, ts, archive); at send time
only rows we did not validate ourselves, or data points under a rate limit,
need another parse.

A row that ThingsBoard would refuse must be refused here: one bad record makes
the server drop the whole packet and close the session (PROTOCOL.md §0.5), so
a bad row that got through would be resent after every reconnect, forever.
Hence: strict JSON (no NaN/Infinity), ``ts`` within Java's long range, and at
most ``MAX_NESTING`` levels (Gson's default nesting limit; Python's own
recursion limit is near 1000 and must never be the one that trips).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import attrs

Reason = str

MAX_NESTING = 255  # Gson's JsonReader default nesting limit (Gson >= 2.11)
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (ThingsBoard refuses it)")


def parse_record(text: object) -> tuple[int, int] | Reason:
    """``(ts, data points)`` of a queue row, or why it cannot be sent."""
    parsed = parse_values(text)
    return parsed if isinstance(parsed, str) else parsed[:2]


def parse_values(text: object) -> tuple[int, int, str] | Reason:
    """``(ts, data points, values as JSON text)`` of a queue row, or why it cannot be sent."""
    if not isinstance(text, str):
        return "message is not text" if text is not None else "message is NULL"
    # Counting brackets costs little; only a row with many of them has its depth measured.
    if text.count("{") + text.count("[") > MAX_NESTING and _nesting(text) > MAX_NESTING:
        return f"JSON nested deeper than {MAX_NESTING} levels"
    fast = _parse_usual_shape(text)
    if fast is not None:
        return fast
    try:
        obj = _strict_loads(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    except RecursionError:  # cannot happen under MAX_NESTING; kept so no row can raise
        return "JSON nested too deeply"
    if not isinstance(obj, dict):
        return f"message is a JSON {type(obj).__name__}, not an object"
    if "ts" not in obj or "values" not in obj:
        return "message lacks " + " and ".join(k for k in ("ts", "values") if k not in obj)
    ts, values = obj["ts"], obj["values"]
    if isinstance(ts, bool) or not isinstance(ts, (int, str)) or (isinstance(ts, str) and not (ts.isascii() and ts.isdigit())):
        return f"ts is not a number of milliseconds: {str(ts)[:40]!r}"
    if not isinstance(values, dict):
        return "values is not an object"
    return _checked_ts(int(ts)) or (int(ts), len(values), _compact(values))


def _checked_ts(ts: int) -> Reason | None:
    """Why ``ts`` cannot be sent (ThingsBoard reads it as a Java long), or None."""
    if LONG_MIN <= ts <= LONG_MAX:
        return None
    return f"ts {str(ts)[:30]}... is beyond the 64-bit range"


def _nesting(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "}]":
            depth -= 1
    return deepest


# Rows nearly always read `{"ts": <digits>, "values": {...}}`: for those the
# values object is decoded once and its text sliced out for the archive,
# instead of decoding the whole row and encoding the values again.
# JSON whitespace only: ``\s`` and str.strip() also take Unicode spaces, which JSON refuses.
_WS = " \t\n\r"
_USUAL_PREFIX = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"ts"[ \t\n\r]*:[ \t\n\r]*([0-9]+)[ \t\n\r]*,'
                           r'[ \t\n\r]*"values"[ \t\n\r]*:[ \t\n\r]*')
# parse_constant is only called for NaN/Infinity, so strictness costs nothing on usual rows.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_strict_loads = _decoder.decode


def _parse_usual_shape(text: str) -> tuple[int, int, str] | None:
    match = _USUAL_PREFIX.match(text)
    if match is None:
        return None
    try:
        values, end = _decoder.raw_decode(text, match.end())
    except ValueError:
        return None
    if not isinstance(values, dict) or text[end:].strip(_WS) != "}" or len(match.group(1)) > 18:
        return None  # not the usual shape (or a ts that needs its range checked): the slow path decides
    return int(match.group(1)), len(values), text[match.end():end]


def archived_values(values_text: str) -> str:
    """What the archive keeps of a valid row: its ``values`` object as JSON text.

    The existing gateway archives ``json.dumps(values)`` beside ``timestamp_ms``;
    its archive files must stay readable (and republishable) after the switch.
    """
    return values_text


# ASCII escapes, as the existing gateway's json.dumps: a lone surrogate in the values
# (valid as a JSON escape) then stays an escape instead of text SQLite cannot store.
_compact = json.JSONEncoder(separators=(",", ":")).encode


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
