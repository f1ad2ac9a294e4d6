"""The one converter between wire/journal data and events and effects.

cattrs does the work; ``forbid_extra_keys`` rejects unknown fields and
``transform_error`` turns nested failures into one message naming the field
(``invalid value for type, expected int @ $.seq``). The same module checks
ThingsBoard's inbound JSON (shared attributes, attribute answers, RPC
requests) before it becomes event data: see ``shared_update_from_wire``.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.preconf.json import make_converter

from teg_fsm.engine.effects import Effect, all_effect_types
from teg_fsm.engine.events import Event

T = TypeVar("T")


class RecordError(ValueError):
    """A journal or wire record that does not fit its type."""


class Codec:
    """Converts events and effects to and from plain JSON-able dicts."""

    def __init__(self) -> None:
        self._converter = make_converter(forbid_extra_keys=True)
        self._effect_types = all_effect_types()

    @property
    def converter(self) -> cattrs.Converter:
        return self._converter

    def structure(self, data: Any, cls: type[T]) -> T:
        """Build ``cls`` from ``data`` or raise RecordError naming the field."""
        try:
            return self._converter.structure(data, cls)
        except Exception as exc:  # cattrs raises several exception types
            raise RecordError(f"{cls.__name__}: {_describe(exc)}") from exc

    def event_to_record(self, event: Event) -> dict[str, Any]:
        return self._converter.unstructure(event)

    def event_from_record(self, record: Any) -> Event:
        return self.structure(record, Event)

    def effect_to_record(self, effect: Effect) -> dict[str, Any]:
        record = self._converter.unstructure(effect)
        record["type"] = type(effect).__name__
        return record

    def effect_from_record(self, record: Any) -> Effect:
        if not isinstance(record, dict):
            raise RecordError(f"effect record must be an object, got {type(record).__name__}")
        fields = dict(record)
        type_name = fields.pop("type", None)
        if type_name is None:
            raise RecordError("effect record: missing field 'type'")
        cls = self._effect_types.get(type_name)
        if cls is None:
            raise RecordError(f"effect record: unknown effect type {type_name!r} @ $.type")
        return self.structure(fields, cls)


def _describe(exc: Exception) -> str:
    if isinstance(exc, (cattrs.ClassValidationError, cattrs.IterableValidationError)):
        return "; ".join(cattrs.transform_error(exc))
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown field(s) {sorted(exc.extra_fields)}"
    return str(exc)


# -- ThingsBoard wire data -> event data ---------------------------------------
#
# Machines trust the shape of their events; everything that comes off the wire is
# checked here first. A malformed field is left out with an error naming it, and
# the rest of the message still goes through.

STRING_ATTRIBUTES = frozenset(
    {"sw_title", "sw_version", "sw_url", "sw_checksum", "sw_checksum_algorithm", "sf_title", "sf_version"}
)
FILES_ATTRIBUTE = "FILES"
# ThingsBoard writes these as JSON numbers (DefaultOtaPackageStateService: a long kv entry).
COUNT_ATTRIBUTES = frozenset({"sw_size"})


@attrs.frozen
class Checked:
    """Event data built from wire data (None when nothing was usable) and what was rejected."""

    data: dict[str, Any] | None
    errors: tuple[str, ...] = ()


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _is_count(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _count_kind(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}"  # a negative number: say which
    if isinstance(value, float):
        return f"the non-integer number {value!r}"
    return _kind(value)


def shared_values_checked(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Shared attribute values with the malformed ones left out, and an error for each."""
    kept: dict[str, Any] = {}
    errors: list[str] = []
    for name, value in values.items():
        if name in STRING_ATTRIBUTES and not isinstance(value, (str, type(None))):
            errors.append(f"{name}: must be a string, got {_kind(value)}")
        elif name in COUNT_ATTRIBUTES and not _is_count(value):
            errors.append(f"{name}: must be a non-negative integer, got {_count_kind(value)}")
        elif name == FILES_ATTRIBUTE:
            files, problems = _files_checked(value)
            errors.extend(problems)
            if files is not None:
                kept[name] = files
        else:
            kept[name] = value
    return kept, errors


def _files_checked(value: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """FILES must be an object (or a JSON string of one) whose entries are objects."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return None, [f"FILES: not valid JSON ({exc})"]
    if not isinstance(value, dict):
        return None, [f"FILES: must be an object of file definitions, got {_kind(value)}"]
    kept = {key: entry for key, entry in value.items() if isinstance(entry, dict)}
    errors = [f"FILES.{key}: a definition must be an object, got {_kind(entry)}"
              for key, entry in value.items() if not isinstance(entry, dict)]
    return kept, errors


def shared_update_from_wire(body: Any) -> Checked:
    """A push on ``v1/devices/me/attributes`` -> ``shared_attributes_updated`` data."""
    if not isinstance(body, dict):
        return Checked(None, (f"a shared-attribute update must be an object, got {_kind(body)}",))
    values = dict(body)
    raw_deleted = values.pop("deleted", [])
    errors: list[str] = []
    deleted: list[str] = []
    if isinstance(raw_deleted, list):
        for index, name in enumerate(raw_deleted):
            if isinstance(name, str):
                deleted.append(name)
            else:
                errors.append(f"deleted[{index}]: must be an attribute name (a string), got {_kind(name)}")
    else:
        errors.append(f"deleted: must be a list of attribute names, got {_kind(raw_deleted)}")
    values, problems = shared_values_checked(values)
    errors.extend(problems)
    data: dict[str, Any] = {"values": values, "deleted": deleted}
    if errors:
        data["rejected"] = errors
    return Checked(data, tuple(errors))


def attributes_answer_from_wire(body: Any) -> Checked:
    """An answer on ``.../attributes/response/<id>`` -> ``{"client": {...}, "shared": {...}}``."""
    body = body if isinstance(body, dict) else {}
    client = body.get("client") if isinstance(body.get("client"), dict) else {}
    shared, errors = shared_values_checked(body["shared"]) if isinstance(body.get("shared"), dict) else ({}, [])
    return Checked({"client": client, "shared": shared}, tuple(errors))


def rpc_request_from_wire(raw_id: str, body: Any) -> Checked:
    """A server-side RPC on ``.../rpc/request/<id>`` -> ``rpc_requested`` data."""
    try:
        request_id = int(raw_id)
    except ValueError:
        return Checked(None, (f"request id: must be a number, got {raw_id[:40]!r}",))
    if not isinstance(body, dict):
        return Checked(None, (f"RPC request {request_id}: must be an object, got {_kind(body)}",))
    method = body.get("method")
    if not isinstance(method, str):
        return Checked(None, (f"RPC request {request_id}: method must be a string, got {_kind(method)}",))
    return Checked({"request_id": request_id, "method": method, "params": body.get("params")})
