"""Journal records in and out: malformed ones are rejected naming the field."""

from __future__ import annotations

import pytest

from teg_fsm.engine.codec import Codec, RecordError
from teg_fsm.engine.effects import StartTimer
from teg_fsm.engine.events import Event


def test_events_and_effects_round_trip() -> None:
    codec = Codec()
    event = Event(7, 1_700_000_000_000, "mqtt", "rpc_requested", {"method": "ping"}, None)
    assert codec.event_from_record(codec.event_to_record(event)) == event
    timer = StartTimer(id="c:1:0", name="backoff_elapsed", seconds=2.5, jitter=0.1)
    assert codec.effect_from_record(codec.effect_to_record(timer)) == timer


def test_a_mistyped_field_is_named() -> None:
    codec = Codec()
    with pytest.raises(RecordError, match=r"\$\.seq"):
        codec.event_from_record({"seq": "seven", "ts_ms": 1, "source": "x", "name": "y", "data": {}, "target": None})


def test_an_unknown_field_is_named() -> None:
    codec = Codec()
    with pytest.raises(RecordError, match="colour"):
        codec.event_from_record({"seq": 1, "ts_ms": 1, "source": "x", "name": "y", "colour": "red"})


def test_an_unknown_effect_type_is_rejected() -> None:
    with pytest.raises(RecordError, match=r"unknown effect type 'LaunchRocket' @ \$\.type"):
        Codec().effect_from_record({"type": "LaunchRocket", "id": "x"})


def test_a_missing_required_effect_field_is_named() -> None:
    with pytest.raises(RecordError, match="seconds"):
        Codec().effect_from_record({"type": "StartTimer", "name": "t"})
