"""Telemetry upload: shapes, typing, PUBACK after store, invalid and oversize packets (§1, §0.5, §7 item 4)."""

from __future__ import annotations

import pytest

from tests.standin.helpers import Device, acked
from tools.tb_standin import StandIn

TELEMETRY = "v1/devices/me/telemetry"


def test_plain_object_gets_one_server_timestamp(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"temperature": 21.5, "on": True})
    [(ts, values)] = standin.telemetry("dev1")
    assert values == {"temperature": 21.5, "on": True}
    assert ts > 1_600_000_000_000


def test_timestamped_object_keeps_its_ts_and_string_ts_works(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"ts": 1451649600512, "values": {"a": 1}})
    connected.publish_acked(TELEMETRY, {"ts": "1451649600513", "values": {"a": 2}})
    assert standin.telemetry("dev1") == [(1451649600512, {"a": 1}), (1451649600513, {"a": 2})]


def test_ts_without_values_is_an_ordinary_key(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"ts": 123})
    [(ts, values)] = standin.telemetry("dev1")
    assert values == {"ts": 123} and ts != 123


def test_array_of_mixed_elements_shares_one_server_ts(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, [{"a": 1}, {"ts": 5, "values": {"b": 2}}, {"c": 3}])
    records = standin.telemetry("dev1")
    assert [values for _, values in records] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert records[0][0] == records[2][0] != 5 and records[1][0] == 5
    assert standin.telemetry_count("dev1") == 3 and standin.data_points("dev1") == 3


def test_typing_casts_numeric_strings_and_skips_nulls(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"l": "42", "d": "4.5", "s": "4.5.1", "plus": "+1", "n": None,
                                        "big": 2**64, "nested": {"x": [1, 2]}})
    assert standin.latest("dev1") == {"l": 42, "d": 4.5, "s": "4.5.1", "plus": "+1", "big": str(2**64),
                                      "nested": {"x": [1, 2]}}
    assert standin.data_points("dev1") == 6  # the null is no data point


def test_qos0_is_stored_too(connected: Device, standin: StandIn) -> None:
    connected.publish(TELEMETRY, {"q": 0}, qos=0)
    assert standin.wait_for(lambda: standin.telemetry("dev1", "q"))


def test_puback_arrives_only_after_the_data_is_stored(connected: Device, standin: StandIn) -> None:
    for i in range(20):
        info = connected.publish(TELEMETRY, [{"ts": i * 10 + k, "values": {"i": i}} for k in range(10)])
        info.wait_for_publish(5)
        assert acked(info)
        assert standin.telemetry_count("dev1") == (i + 1) * 10  # no waiting: stored before the ack


@pytest.mark.parametrize("payload", [
    b"not json", b"", b"42", b"null", b'"text"', b'[{"a":1}, 5]', b'{"ts":1,"values":[1]}', b'{"ts":"x","values":{}}',
], ids=["invalid-json", "empty", "number", "null", "string", "non-object-element", "values-not-object", "bad-ts"])
def test_invalid_payload_is_refused(connected: Device, standin: StandIn, payload: bytes) -> None:
    """MTH:668-676: closed without PUBACK on 3.1.1, PUBACK 0x99 on MQTT 5; nothing stored."""
    info = connected.publish(TELEMETRY, payload)
    connected.expect_invalid_payload_answer(info, standin)
    assert standin.telemetry_count("dev1") == 0


def test_packet_over_65536_bytes_closes_without_puback(connected: Device, standin: StandIn) -> None:
    """Netty MqttDecoder(maxPayloadSize) fails; MTH:208-212 closes with MALFORMED_PACKET (0x81 on MQTT 5)."""
    # Remaining length = 2 + len(topic) + 2 (packet id) [+ 1, MQTT 5 property length] + payload.
    overhead = 27 + (1 if connected.v5 else 0)
    at_limit = b'{"k":"' + b"x" * (65536 - overhead - 8) + b'"}'
    connected.publish_acked(TELEMETRY, at_limit)
    info = connected.publish(TELEMETRY, at_limit[:-2] + b'x"}')
    connected.expect_server_disconnect(0x81)
    assert not acked(info)
    assert standin.telemetry_count("dev1") == 1
    assert standin.disconnect_reasons("dev1") == ["packet_too_large"]


def test_unknown_topic_gets_a_puback_and_the_session_stays(connected: Device, standin: StandIn) -> None:
    """MTH:648-651: PUBACK TOPIC_NAME_INVALID (0x90 on MQTT 5, a plain PUBACK on 3.1.1); the session stays."""
    assert connected.publish_acked("v1/devices/me/nonsense", {"a": 1}) == connected.code(0, 0x90)
    connected.publish_acked(TELEMETRY, {"after": 1})
    assert standin.is_connected("dev1")
    assert standin.latest("dev1") == {"after": 1}


def test_claim_is_acknowledged(connected: Device, standin: StandIn) -> None:
    connected.publish_acked("v1/devices/me/claim", {"secretKey": "s", "durationMs": 60000})
    assert standin.is_connected("dev1")


# -- ThingsBoard's storage rule: one value per device, key and ts (PROTOCOL.md §9) -----------------
# ts_kv has PRIMARY KEY (entity_id, key, ts): dao/src/main/resources/sql/schema-ts-psql.sql:27.


def test_a_later_value_with_the_same_key_and_ts_replaces_the_earlier(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"ts": 1000, "values": {"sw_state": "DOWNLOADING", "other": 1}})
    connected.publish_acked(TELEMETRY, {"ts": 1000, "values": {"sw_state": "FAILED"}})
    connected.publish_acked(TELEMETRY, {"ts": 1001, "values": {"sw_state": "UPDATED"}})
    assert standin.telemetry("dev1", "sw_state") == [(1000, "FAILED"), (1001, "UPDATED")]
    assert standin.telemetry("dev1", "other") == [(1000, 1)]  # other keys of that ts stay


def test_reports_without_ts_in_one_array_share_the_arrival_ts_and_keep_one_value(connected: Device,
                                                                                 standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, [{"sw_state": "DOWNLOADING"}, {"sw_state": "FAILED"}])
    [(ts, value)] = standin.telemetry("dev1", "sw_state")
    assert value == "FAILED" and standin.telemetry_count("dev1") == 1


def test_a_null_value_replaces_nothing(connected: Device, standin: StandIn) -> None:
    connected.publish_acked(TELEMETRY, {"ts": 5, "values": {"a": 1}})
    connected.publish_acked(TELEMETRY, {"ts": 5, "values": {"a": None, "b": 2}})
    assert standin.latest("dev1") == {"a": 1, "b": 2}


def test_invalid_payload_at_qos0_closes_on_both_versions(connected: Device, standin: StandIn) -> None:
    """MTH:669: the PUBACK 0x99 needs a packet id (msgId > 0); at QoS 0 MQTT 5 closes too, with
    DISCONNECT PAYLOAD_FORMAT_INVALID (MTH:674)."""
    connected.publish(TELEMETRY, b"not json", qos=0)
    connected.expect_server_disconnect(0x99)
    assert standin.disconnect_reasons("dev1") == ["invalid_payload"]
