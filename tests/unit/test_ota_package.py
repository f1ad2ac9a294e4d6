"""The OTA package download adapter: chunks, resume, checksum, disk, what the file is.

Chunks are served by the stand-in's own chunk function (tools/tb_standin/ota.py, which
follows MqttTransportHandler.getOtaPackageCallback: bytes [size*n, size*n+size), empty
past the end), through a fake link that can drop requests.

ThingsBoard sources followed (thingsboard/thingsboard, as cited in PROTOCOL.md 5.2):
MqttTransportHandler.java:678-711 (getOtaPackageCallback: the chunk size payload, the
requestId bound on first use), MTH:774-828 (sendOtaPackage: bytes of the chunk, empty past
the end; sendOtaPackageError on v2/fw/error, for sw too, then close), ChecksumAlgorithm
(MD5, SHA256, SHA384, SHA512, CRC32, MURMUR3_32, MURMUR3_128). The device side follows
the Python device SDK (thingsboard-python-client-sdk tb_device_mqtt.py @00018ac,
``__get_firmware``: stop when the received length equals fw_size).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from teg_fsm.adapters import ota_package
from teg_fsm.adapters.ota_package import (
    ChunkRefused,
    ChunkUnavailable,
    MqttChunks,
    PackageError,
    PartFile,
    download,
    package_kind,
    verify,
)
from tools.tb_standin import ota as standin_ota

DATA = bytes(range(256)) * 400 + b"tail"  # 102,404 bytes: 25 chunks of 4096 and a short one


class Served:
    """ThingsBoard's side of the chunk protocol over an unreliable link."""

    def __init__(self, data: bytes, *, lose: set[int] | None = None, die_after: int | None = None) -> None:
        self.package = standin_ota.make_package("sw", "controller", "v2", data)
        self.lose = set(lose or ())  # chunk indices whose first request gets no answer
        self.die_after = die_after  # raise SystemExit after this many answered requests (a kill)
        self.asked: list[int] = []

    def request(self, kind: str, request_id: int, index: int, size: int, timeout_s: float) -> bytes:
        self.asked.append(index)
        if index in self.lose:
            self.lose.discard(index)
            raise ChunkUnavailable("session lost before the answer")
        if self.die_after is not None and len(self.asked) > self.die_after:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs
        return standin_ota.chunk(self.package, size, index)


def _part(tmp_path: Path, data: bytes = DATA, algorithm: str = "SHA256", size: int | None = -1,
          chunk_size: int = 4096) -> PartFile:
    checksum = standin_ota.checksum(data, algorithm)
    return PartFile(tmp_path / "ota", checksum, algorithm, len(data) if size == -1 else size, chunk_size)


def test_downloads_in_chunks_until_the_size_is_reached(tmp_path: Path) -> None:
    served, part = Served(DATA), _part(tmp_path)
    result = download(served, part, kind="sw", request_id=7)
    assert part.path.read_bytes() == DATA
    assert served.asked == list(range(26))  # the SDK stops at the announced size: no empty-chunk request
    assert result == {"bytes": len(DATA), "resumed_at": 0, "requests": 26}
    verify(part, part.header["checksum"], "SHA256")


def test_without_a_size_it_stops_at_the_empty_chunk(tmp_path: Path) -> None:
    served, part = Served(DATA), _part(tmp_path, size=None)
    download(served, part, kind="sw", request_id=7)
    assert part.path.read_bytes() == DATA and served.asked[-1] == 26


def test_a_lost_chunk_is_asked_again_not_the_whole_file(tmp_path: Path) -> None:
    served, part = Served(DATA, lose={5, 6}), _part(tmp_path)
    download(served, part, kind="sw", request_id=7)
    assert part.path.read_bytes() == DATA
    assert served.asked == [0, 1, 2, 3, 4, 5, 5, 6, 6, *range(7, 26)]


def test_a_killed_download_resumes_after_the_last_recorded_chunk(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        download(Served(DATA, die_after=10), _part(tmp_path), kind="sw", request_id=7)
    served = Served(DATA)
    result = download(served, _part(tmp_path), kind="sw", request_id=8)  # a new process, a new requestId
    assert result["resumed_at"] == 10 and served.asked == list(range(10, 26))
    assert _part(tmp_path).path.read_bytes() == DATA


def test_a_torn_tail_and_a_corrupt_chunk_are_downloaded_again(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        download(Served(DATA, die_after=10), _part(tmp_path), kind="sw", request_id=7)
    part = _part(tmp_path)
    with part.path.open("ab") as stream:
        stream.write(b"half a chunk written when the process died")
    raw = bytearray(part.path.read_bytes())
    raw[8 * 4096 + 3] ^= 0xFF  # chunk 8 rotted on the SD card
    part.path.write_bytes(bytes(raw))
    served = Served(DATA)
    assert download(served, part, kind="sw", request_id=8)["resumed_at"] == 8
    assert part.path.read_bytes() == DATA


def test_another_package_does_not_reuse_a_part_file(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        download(Served(DATA, die_after=3), _part(tmp_path), kind="sw", request_id=7)
    stale = _part(tmp_path)
    stale.progress.write_text(json.dumps({**stale.header, "size": 1}) + "\n0 00000000\n")
    served = Served(DATA)
    assert download(served, _part(tmp_path), kind="sw", request_id=8)["resumed_at"] == 0


def test_part_files_of_other_packages_are_removed(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        download(Served(DATA, die_after=3), _part(tmp_path), kind="sw", request_id=7)
    other = _part(tmp_path, data=DATA[:5000])
    assert sorted(other.remove_others()) == sorted([_part(tmp_path).path.name, _part(tmp_path).progress.name])
    assert not any((tmp_path / "ota").iterdir())


def test_no_chunk_for_the_stall_time_is_a_transient_failure_that_keeps_the_file(tmp_path: Path) -> None:
    class Down:
        def request(self, *args: object) -> bytes:
            raise ChunkUnavailable("not connected to ThingsBoard")

    part = _part(tmp_path)
    with pytest.raises(PackageError, match="no chunk from ThingsBoard for 0.3 s") as caught:
        download(Down(), part, kind="sw", request_id=7, stall_s=0.3)
    assert caught.value.transient and part.progress.exists()


def test_thingsboard_refusing_a_chunk_is_final(tmp_path: Path) -> None:
    class Refusing:
        def request(self, *args: object) -> bytes:
            raise ChunkRefused("NOT_FOUND")

    with pytest.raises(PackageError, match="ThingsBoard refused chunk 0: NOT_FOUND") as caught:
        download(Refusing(), _part(tmp_path), kind="sw", request_id=7)
    assert not caught.value.transient


@pytest.mark.parametrize("algorithm", ["MD5", "SHA256", "SHA384", "SHA512", "CRC32", "MURMUR3_32", "MURMUR3_128"])
def test_every_thingsboard_checksum_algorithm_is_verified_like_thingsboard(tmp_path: Path, algorithm: str) -> None:
    part = _part(tmp_path, algorithm=algorithm)
    download(Served(DATA), part, kind="sw", request_id=7)
    verify(part, standin_ota.checksum(DATA, algorithm), algorithm)
    with pytest.raises(PackageError, match=rf"checksum verification failed \({algorithm}\)"):
        verify(part, standin_ota.checksum(DATA + b"x", algorithm), algorithm)
    assert not part.path.exists() and not part.progress.exists()  # a bad file is not kept


def test_crc32_is_printed_as_guava_prints_it(tmp_path: Path) -> None:
    # BaseOtaPackageService.generateChecksum: Hashing.crc32().hashBytes(data).toString(); crc32 is a
    # 32-bit HashCode.fromInt, whose bytes are little-endian: CRC-32 "123456789" = 0xcbf43926 -> "2639f4cb".
    # thingsboard-python-client-sdk sdk_utils.verify_checksum reverses the byte pairs for CRC32 too.
    path = tmp_path / "package"
    path.write_bytes(b"123456789")
    assert ota_package.file_checksum(path, "CRC32") == "2639f4cb"
    assert standin_ota.checksum(b"123456789", "CRC32") == "2639f4cb"
    path.write_bytes(b"\x00" * 13)  # CRC 0x0f744682: Guava keeps the zero nibble of every byte
    assert ota_package.file_checksum(path, "CRC32") == "8246740f"


def test_crc32_is_also_accepted_as_thingsboards_checksum_util_prints_it(tmp_path: Path) -> None:
    # dao/src/main/java/org/thingsboard/server/dao/ota/util/ChecksumUtil.java checksumCRC32 (thingsboard
    # 2e21742): Long.toHexString(new CRC32().getValue()), big-endian with leading zeros dropped; ThingsBoard
    # versions that keep package files on disk store that spelling. Both name the same CRC.
    guava = ota_package.file_checksum(_written(tmp_path, b"123456789"), "CRC32")
    assert ota_package.same_checksum("cbf43926", guava, "CRC32")
    assert ota_package.same_checksum("CBF43926 ", guava, "CRC32")
    zero_led = ota_package.file_checksum(_written(tmp_path, b"33"), "CRC32")  # CRC 0x0a6216d9
    assert zero_led == "d916620a"
    assert ota_package.same_checksum("a6216d9", zero_led, "CRC32")
    assert not ota_package.same_checksum("0a6216d9x", zero_led, "CRC32")
    assert not ota_package.same_checksum("cbf43927", guava, "CRC32")  # another CRC in either spelling
    assert not ota_package.same_checksum("2639f4cc", guava, "CRC32")
    # Only CRC32 has two spellings: a reversed MURMUR3_32 is a different checksum.
    murmur = ota_package.file_checksum(_written(tmp_path, b"123456789"), "MURMUR3_32")
    reversed_murmur = bytes.fromhex(murmur)[::-1].hex()
    assert reversed_murmur != murmur and not ota_package.same_checksum(reversed_murmur, murmur, "MURMUR3_32")


def _written(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"package-{len(data)}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("algorithm", ["SHA1", "MURMUR3_64", "murmur3"])
def test_algorithms_thingsboard_does_not_have_are_refused_by_name(algorithm: str) -> None:
    error = ota_package.checksum_error(algorithm)
    assert error is not None and algorithm in error and "SHA256" in error


def test_a_package_larger_than_the_free_disk_is_refused_before_writing(tmp_path: Path) -> None:
    huge = 1 << 62
    with pytest.raises(PackageError, match=f"needs {huge} bytes but only"):
        ota_package.check_disk(tmp_path / "ota", huge)
    assert not (tmp_path / "ota").exists()
    ota_package.check_disk(tmp_path / "ota", 1024)  # fits


def _docker_save_like() -> bytes:
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as archive:
        for name, body in (("blobs/sha256/ab", b"layer"), ("manifest.json", b"[]"), ("index.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    return stream.getvalue()


@pytest.mark.parametrize("body,kind", [
    (b"# v2 git bundle\n" + b"0" * 40 + b" refs/tags/v2\n\nPACK", "bundle"),
    (b"# v3 git bundle\n@object-format=sha1\n\nPACK", "bundle"),
    (_docker_save_like(), "image"),
    (b"just a dummy file so that ThingsBoard accepts the package\n", "other"),
    (b"", "other"),
])
def test_the_package_kind_is_told_by_content(tmp_path: Path, body: bytes, kind: str) -> None:
    path = tmp_path / "package"
    path.write_bytes(body)
    assert package_kind(path) == kind


def test_mqtt_chunks_match_responses_by_request_and_index() -> None:
    sent: list[tuple[str, bytes]] = []
    chunks: MqttChunks

    def publish(topic: str, payload: bytes, qos: int, on_done) -> None:  # type: ignore[no-untyped-def]
        sent.append((topic, payload))
        on_done(True, None)
        assert chunks.deliver("v2/sw/response/9/chunk/3", b"late duplicate")  # ours, nobody waits: dropped
        chunks.deliver(topic.replace("request", "response"), b"bytes of " + topic.encode())

    chunks = MqttChunks(publish)
    assert chunks.request("sw", 9, 4, 4096, 1.0) == b"bytes of v2/sw/request/9/chunk/4"
    assert sent == [("v2/sw/request/9/chunk/4", b"4096")]


def test_mqtt_chunks_report_thingsboards_error_topic_and_a_lost_publish() -> None:
    def refused(topic: str, payload: bytes, qos: int, on_done) -> None:  # type: ignore[no-untyped-def]
        chunks.deliver("v2/fw/error", b"NOT_FOUND")  # sw errors come on v2/fw/error too (MTH)

    chunks = MqttChunks(refused)
    with pytest.raises(ChunkRefused, match="NOT_FOUND"):
        chunks.request("sw", 1, 0, 4096, 1.0)
    lost = MqttChunks(lambda topic, payload, qos, on_done: on_done(False, "not connected to ThingsBoard"))
    with pytest.raises(ChunkUnavailable, match="not connected"):
        lost.request("sw", 1, 0, 4096, 1.0)
    silent = MqttChunks(lambda topic, payload, qos, on_done: on_done(True, None))
    with pytest.raises(ChunkUnavailable, match="no answer to chunk 0 within 0.05 s"):
        silent.request("sw", 1, 0, 4096, 0.05)


def test_sha256_of_the_stand_in_is_what_the_adapter_computes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(DATA)
    assert ota_package.file_checksum(path, "SHA256") == hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("algorithm", ["MURMUR3_32", "MURMUR3_128"])
def test_murmur3_is_computed_read_by_read_like_thingsboard_on_the_whole(tmp_path: Path, algorithm: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Reads of 1000 bytes (not a multiple of the 4- or 16-byte block) give ThingsBoard's whole-file hash.
    monkeypatch.setattr(ota_package, "_READ", 1000)
    path = tmp_path / "package"
    path.write_bytes(DATA)
    assert ota_package.file_checksum(path, algorithm) == standin_ota.checksum(DATA, algorithm)
