"""The one converter between wire/journal data and events and effects.

cattrs does the work; ``forbid_extra_keys`` rejects unknown fields and
``transform_error`` turns nested failures into one message naming the field
(``invalid value for type, expected int @ $.seq``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs
from cattrs.preconf.json import make_converter

from teg_fsm.effects import Effect, all_effect_types
from teg_fsm.events import Event

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
