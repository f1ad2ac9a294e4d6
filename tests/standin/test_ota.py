"""OTA assignment and chunked download (§5, §7 item 9)."""

from __future__ import annotations

import hashlib

import pytest

from tests.standin.helpers import Device, acked
from tools.tb_standin import StandIn, ota

ATTRIBUTES = "v1/devices/me/attributes"
PACKAGE = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes


def test_assignment_writes_queued_then_initiated_and_deletes_before_setting(connected: Device,
                                                                            standin: StandIn) -> None:
    connected.subscribe(ATTRIBUTES)
    standin.assign_ota("dev1", "sw", "app", "1.2.3", PACKAGE)
    assert connected.expect_json(ATTRIBUTES) == {"deleted": ["sw_tag", "sw_url"]}
    assert connected.expect_json(ATTRIBUTES) == {
        "sw_title": "app", "sw_version": "1.2.3", "sw_size": len(PACKAGE), "sw_checksum_algorithm": "SHA256",
        "sw_checksum": hashlib.sha256(PACKAGE).hexdigest()}
    states = [v for _, v in standin.telemetry("dev1", "sw_state")]
    assert states == ["QUEUED", "INITIATED"]
    latest = standin.latest("dev1")
    assert latest["target_sw_title"] == "app" and latest["target_sw_version"] == "1.2.3"
    assert "target_sw_ts" in latest


def test_initiation_can_lag_like_the_ota_queue(connected: Device, standin: StandIn) -> None:
    connected.subscribe(ATTRIBUTES)
    standin.assign_ota("dev1", "fw", "fw", "2.0", PACKAGE, tag="v2", initiate_after=0.2)
    assert [v for _, v in standin.telemetry("dev1", "fw_state")] == ["QUEUED"]
    assert connected.expect_json(ATTRIBUTES) == {"deleted": ["fw_url"]}
    assert connected.expect_json(ATTRIBUTES)["fw_tag"] == "v2"
    assert [v for _, v in standin.telemetry("dev1", "fw_state")] == ["QUEUED", "INITIATED"]


def test_url_package_and_unassignment(connected: Device, standin: StandIn) -> None:
    connected.subscribe(ATTRIBUTES)
    standin.assign_ota("dev1", "fw", "ext", "3", url="https://example.invalid/fw.bin")
    assert connected.expect_json(ATTRIBUTES) == {
        "deleted": ["fw_tag", "fw_size", "fw_checksum_algorithm", "fw_checksum"]}
    assert connected.expect_json(ATTRIBUTES) == {"fw_title": "ext", "fw_version": "3",
                                                 "fw_url": "https://example.invalid/fw.bin"}
    standin.unassign_ota("dev1", "fw")
    assert connected.expect_json(ATTRIBUTES)["deleted"] == [
        "fw_title", "fw_version", "fw_ts", "fw_state", "fw_size", "fw_checksum", "fw_checksum_algorithm",
        "fw_url", "fw_tag"]


@pytest.mark.parametrize("kind", ["fw", "sw"])
def test_chunked_download_until_the_empty_chunk(connected: Device, standin: StandIn, kind: str) -> None:
    standin.assign_ota("dev1", kind, "pkg", "1", PACKAGE)
    # The SDK's filter is refused by TB; chunks must arrive anyway.
    assert connected.subscribe(f"v2/{kind}/response/+") == [connected.code(0x80, 0x8F)]
    received, index = b"", 0
    while True:
        connected.publish(f"v2/{kind}/request/7/chunk/{index}", "4096")
        chunk = connected.expect(f"v2/{kind}/response/7/chunk/{index}").payload
        if not chunk:
            break
        received += chunk
        index += 1
    assert received == PACKAGE and index == 3


def test_empty_payload_reuses_the_chunk_size_and_zero_means_whole_file(connected: Device, standin: StandIn) -> None:
    standin.assign_ota("dev1", "sw", "pkg", "1", PACKAGE)
    connected.publish("v2/sw/request/1/chunk/0", "1000")
    assert connected.expect("v2/sw/response/1/chunk/0").payload == PACKAGE[:1000]
    connected.publish("v2/sw/request/1/chunk/1", b"")
    assert connected.expect("v2/sw/response/1/chunk/1").payload == PACKAGE[1000:2000]
    connected.publish("v2/sw/request/2/chunk/0", "0")
    assert connected.expect("v2/sw/response/2/chunk/0").payload == PACKAGE


def test_request_id_stays_bound_to_the_first_package(connected: Device, standin: StandIn) -> None:
    standin.assign_ota("dev1", "sw", "pkg", "1", b"old-bytes")
    connected.publish("v2/sw/request/3/chunk/0", "3")
    assert connected.expect("v2/sw/response/3/chunk/0").payload == b"old"
    standin.assign_ota("dev1", "sw", "pkg", "2", b"NEW-BYTES")
    connected.publish("v2/sw/request/3/chunk/1", "3")
    assert connected.expect("v2/sw/response/3/chunk/1").payload == b"-by"


@pytest.mark.parametrize("setup,topic,payload,error", [
    (None, "v2/fw/request/1/chunk/0", "1024", "NOT_FOUND"),
    (None, "v2/sw/request/1/chunk/0", "1024", "NOT_FOUND"),  # sw errors also go to v2/fw/error
    ("url", "v2/fw/request/1/chunk/0", "1024", "FAILURE"),
    ("data", "v2/fw/request/1/chunk/0", "65537", "PAYLOAD_TOO_LARGE"),
], ids=["fw-not-assigned", "sw-not-assigned", "url-package", "chunk-too-large"])
def test_chunk_errors_go_to_fw_error_then_disconnect(connected: Device, standin: StandIn, setup: str | None,
                                                     topic: str, payload: str, error: str) -> None:
    """sendOtaPackageError (MTH:822-828): the error on v2/fw/error, then closeCtx(IMPLEMENTATION_SPECIFIC_ERROR,
    DISCONNECT 0x83 on MQTT 5), and no PUBACK: only sendOtaPackage acks (MTH:809-811)."""
    if setup == "url":
        standin.assign_ota("dev1", "fw", "ext", "1", url="https://example.invalid/x")
    elif setup == "data":
        standin.assign_ota("dev1", "fw", "pkg", "1", PACKAGE)
    info = connected.publish(topic, payload)
    assert connected.expect("v2/fw/error").payload.decode() == error
    connected.expect_server_disconnect(0x83)
    assert not acked(info)
    assert standin.disconnect_reasons("dev1") == [f"ota_{error.lower()}"]


def test_oversized_chunk_is_payload_too_large_even_without_a_package(connected: Device, standin: StandIn) -> None:
    """MTH:690-693 checks the chunk size against max_payload_size before the package lookup (MTH:695-710),
    so with nothing assigned the answer is PAYLOAD_TOO_LARGE, not NOT_FOUND."""
    info = connected.publish("v2/sw/request/1/chunk/0", "65537")
    assert connected.expect("v2/fw/error").payload == b"PAYLOAD_TOO_LARGE"
    connected.expect_server_disconnect(0x83)
    assert not acked(info)
    assert standin.disconnect_reasons("dev1") == ["ota_payload_too_large"]


def test_chunk_is_acked_just_before_it_is_sent(connected: Device, standin: StandIn) -> None:
    """sendOtaPackage (MTH:809-816): PUBACK SUCCESS, then the chunk on v2/<kind>/response/<id>/chunk/<n>."""
    standin.assign_ota("dev1", "fw", "pkg", "1", PACKAGE)
    info = connected.publish("v2/fw/request/5/chunk/1", "100")
    assert connected.expect("v2/fw/response/5/chunk/1").payload == PACKAGE[100:200]
    assert connected.puback_code(info) == 0


def test_non_numeric_chunk_size_closes_without_an_error_message(connected: Device, standin: StandIn) -> None:
    """MTH:680 Integer.parseInt throws NumberFormatException, which nothing in processDevicePublish catches:
    exceptionCaught closes with SERVER_SHUTTING_DOWN (0x8B on MQTT 5, MTH:1165-1189); nothing is published."""
    standin.assign_ota("dev1", "fw", "pkg", "1", PACKAGE)
    info = connected.publish("v2/fw/request/1/chunk/0", " 4096")
    connected.expect_server_disconnect(0x8B)
    assert not acked(info) and connected.messages.empty()
    assert standin.disconnect_reasons("dev1") == ["ota_bad_chunk_size"]


def test_device_reported_states_are_ordinary_telemetry(connected: Device, standin: StandIn) -> None:
    for state in ("DOWNLOADING", "DOWNLOADED", "VERIFIED", "UPDATING"):
        connected.publish_acked("v1/devices/me/telemetry", {"sw_state": state})
    connected.publish_acked("v1/devices/me/telemetry", {"current_sw_title": "app", "current_sw_version": "1.2.3",
                                                        "sw_state": "UPDATED"})
    assert [v for _, v in standin.telemetry("dev1", "sw_state")][-1] == "UPDATED"


@pytest.mark.parametrize("algorithm,expected", [
    # Guava's HashCode.toString() of murmur3_32/murmur3_128 (seed 0) and crc32: the bytes little-endian.
    ("MURMUR3_32", "47fa8b24"), ("MURMUR3_128", "029bbd41b3a7d8cb191dae486a901e5b"), ("CRC32", "86a61036"),
])
def test_a_package_is_checksummed_as_thingsboards_generate_checksum_does(algorithm: str, expected: str) -> None:
    # BaseOtaPackageService.generateChecksum; the values follow Guava's Murmur3Hash*Test vectors and smhasher.
    package = ota.make_package("sw", "app", "1.2.3", b"hello", checksum_algorithm=algorithm)
    assert package.checksum == expected
    _, values = ota.shared_update(package)
    assert values["sw_checksum_algorithm"] == algorithm and values["sw_checksum"] == expected
