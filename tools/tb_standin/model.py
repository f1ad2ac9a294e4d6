"""What ThingsBoard keeps about devices, and how it reads what devices send.

Pure data and parsing, no I/O: the transport (``transport.py``) calls these
functions and turns their exceptions into ThingsBoard's reactions (for MQTT
3.1.1: close the connection without a PUBACK). Section numbers refer to
``PROTOCOL.md``.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

MAX_PAYLOAD_SIZE = 65536  # transport.mqtt.netty.max_payload_size (§1.2)
MAX_INFLIGHT = 100  # msg_queue_size_per_device_limit, reported by getSessionLimits
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
# Apache NumberUtils.isParsable, which TB's type cast uses (§1.1): no sign '+', no exponent.
_PARSABLE = re.compile(r"-?(\d+(\.\d+)?|\.\d+)\Z")

ALLOW_CREATE = "ALLOW_CREATE_NEW_DEVICES"
CHECK_PRE_PROVISIONED = "CHECK_PRE_PROVISIONED_DEVICES"
PROVISION_NOT_FOUND = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}
PROVISION_FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}


class InvalidPayload(ValueError):
    """The payload is not one ThingsBoard's JSON converter accepts (an AdaptorException)."""


@dataclass
class OtaPackage:
    """An OTA package assigned to a device; ``data`` empty and ``url`` set for external packages."""

    kind: str  # "fw" or "sw"
    title: str
    version: str
    data: bytes = b""
    url: str | None = None
    tag: str | None = None
    checksum_algorithm: str | None = "SHA256"
    checksum: str | None = None


@dataclass
class Device:
    """One device: credentials, attribute scopes and time series, like TB's tables."""

    name: str
    token: str | None
    profile: str = "default"
    basic: tuple[str | None, str | None, str | None] | None = None  # clientId, userName, password
    client: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    # Telemetry records in arrival order: (ts, values as received); one record per timestamp
    # group. Readers apply typed_values(), see parse_telemetry(). Write with store_telemetry().
    telemetry: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    data_points: int = 0
    ota: dict[str, OtaPackage] = field(default_factory=dict)
    # ts -> the keys stored at it: the first record's own values dict (no copy), a set after that.
    keys_at_ts: dict[int, dict[str, Any] | set[str]] = field(default_factory=dict, repr=False)

    def store_telemetry(self, records: list[tuple[int, dict[str, Any]]]) -> None:
        """Store records as ThingsBoard does: one value per key and ts, a later write replacing.

        ``ts_kv`` has PRIMARY KEY (entity_id, key, ts)
        (dao/src/main/resources/sql/schema-ts-psql.sql:27; PROTOCOL.md §9), so a value
        for a key and ts already stored replaces the stored one. Null values are
        skipped by the converter and replace nothing.
        """
        for ts, values in records:
            held = self.keys_at_ts.get(ts)
            if held is None:  # the usual case: a new ts
                self.keys_at_ts[ts] = values
                self.telemetry.append((ts, values))
                continue
            keys = {k for k, v in values.items() if v is not None}
            held_keys = set(held.keys() if isinstance(held, dict) else held)
            replaced = held_keys & keys
            if replaced:  # rare: rebuild the list without the replaced values
                self.telemetry = [kept for kept in (_without(r, ts, replaced) for r in self.telemetry) if kept]
            self.keys_at_ts[ts] = held_keys | keys
            self.telemetry.append((ts, values))


def _without(record: tuple[int, dict[str, Any]], ts: int, keys: set[str]) -> tuple[int, dict[str, Any]] | None:
    """``record`` minus the values of ``keys`` at ``ts``; None when nothing is left."""
    at, values = record
    if at != ts or not keys & values.keys():
        return record
    rest = {k: v for k, v in values.items() if k not in keys}
    return (at, rest) if rest else None


@dataclass
class ProvisionProfile:
    """A device profile's provisioning settings (§4)."""

    name: str
    key: str
    secret: str
    strategy: str = ALLOW_CREATE


def now_ms() -> int:
    """Server timestamp as TB assigns it: epoch milliseconds."""
    return int(time.time() * 1000)


def dumps(value: Any) -> bytes:
    """JSON as TB's Gson writes it: compact, no spaces."""
    return json.dumps(value, separators=(",", ":")).encode()


def random_token(length: int = 20) -> str:
    """A token like the ones TB generates (20 alphanumeric characters)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _cast_string(value: str) -> Any:
    """TB's ``type_cast_enabled: true``: a numeric string becomes a LONG or a DOUBLE."""
    if _PARSABLE.match(value):
        if "." in value:
            return float(value)
        number = int(value)
        return number if LONG_MIN <= number <= LONG_MAX else value
    return value


def typed_values(values: dict[str, Any]) -> dict[str, Any]:
    """Apply TB's typing to one key/value object; ``null`` values are skipped (§1.1)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = value.__class__
        if kind is str:
            value = _cast_string(value)
        elif value is None:
            continue
        elif kind is int and not LONG_MIN <= value <= LONG_MAX:
            value = str(value)  # beyond the long range TB keeps the text (type cast on)
        out[key] = value
    return out


def _load_json(payload: bytes) -> Any:
    if not payload:
        raise InvalidPayload("empty payload")
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"invalid JSON: {exc}") from None


def _telemetry_element(element: Any, server_ts: int) -> tuple[int, dict[str, Any]]:
    if element.__class__ is not dict:
        raise InvalidPayload("telemetry element is not a JSON object")
    if "ts" in element and "values" in element:  # timestamped only with both keys (§1.1)
        values = element["values"]
        if values.__class__ is not dict:
            raise InvalidPayload("'values' is not a JSON object")
        ts = element["ts"]
        if ts.__class__ is not int:
            try:
                ts = int(ts)  # getAsLong(): numeric strings work too
            except (TypeError, ValueError):
                raise InvalidPayload("'ts' is not a number") from None
        return ts, values
    return server_ts, element


def _fast_array(data: list[Any]) -> list[tuple[int, dict[str, Any]]] | None:
    """The common case, an array of well-formed ``{ts, values}``, checked in bulk; else None."""
    try:
        records = [(e["ts"], e["values"]) for e in data]
    except (KeyError, TypeError):
        return None
    if set(map(type, data)) != {dict} or set(map(type, (r[0] for r in records))) != {int} \
            or set(map(type, (r[1] for r in records))) != {dict}:
        return None
    return records


def parse_telemetry(payload: bytes) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Records of a telemetry publish (an object, ``{ts, values}`` or an array) and their data points.

    The values are validated here but stored untyped; :func:`typed_values` is applied
    when they are read. Typing never rejects anything, so this is what TB stores,
    without paying for the type cast on the hot path (the benchmark's target).
    """
    data = _load_json(payload)
    server_ts = now_ms()  # elements without ts share one server timestamp
    if data.__class__ is list:
        records = _fast_array(data) or [_telemetry_element(e, server_ts) for e in data]
    else:
        records = [_telemetry_element(data, server_ts)]
    if b"null" in payload:  # null values are skipped, so they are no data points
        points = sum(1 for _, values in records for v in values.values() if v is not None)
    else:
        points = sum([len(values) for _, values in records])
    return records, points


def parse_attributes(payload: bytes) -> dict[str, Any]:
    """Client attributes: the payload must be a JSON object (§2.1)."""
    data = _load_json(payload)
    if not isinstance(data, dict):
        raise InvalidPayload("attributes payload is not a JSON object")
    return typed_values(data)


def _split_keys(value: Any) -> list[str]:
    """Gson ``getAsString().split(",")``: one-element arrays work, keys are not trimmed."""
    if isinstance(value, list):
        if len(value) != 1:
            raise InvalidPayload("key list must be a string")
        value = value[0]
    if isinstance(value, (dict, list)) or value is None:
        raise InvalidPayload("key list must be a string")
    text = value if isinstance(value, str) else json.dumps(value)
    return text.split(",")


def attribute_response(device: Device, payload: bytes) -> dict[str, Any]:
    """Answer to ``attributes/request/{id}`` (§2.2): sections only when non-empty; ``{}`` = all."""
    request = _load_json(payload)
    if not isinstance(request, dict):
        raise InvalidPayload("attribute request is not a JSON object")
    client_keys = _split_keys(request["clientKeys"]) if "clientKeys" in request else None
    shared_keys = _split_keys(request["sharedKeys"]) if "sharedKeys" in request else None
    response: dict[str, Any] = {}
    if client_keys is None and shared_keys is None:
        client, shared = dict(device.client), dict(device.shared)
    else:
        client = {k: device.client[k] for k in client_keys or [] if k in device.client}
        shared = {k: device.shared[k] for k in shared_keys or [] if k in device.shared}
    if client:
        response["client"] = client
    if shared:
        response["shared"] = shared
    return response
