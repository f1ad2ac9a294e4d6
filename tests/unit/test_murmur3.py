"""MurmurHash3 as ThingsBoard's MURMUR3_32 / MURMUR3_128 checksums (teg_fsm/adapters/murmur3.py).

Known answers: Guava's own tests (guava-tests/test/com/google/common/hash/
Murmur3Hash32Test.java and Murmur3Hash128Test.java; ThingsBoard hashes with Guava),
smhasher's verification values (the ``testParanoid`` constants there), and the ``mmh3``
C extension as an independent oracle on random data cut at random places (streaming).
The stored string is Guava's ``HashCode.toString()``: the little-endian bytes in order
(BaseOtaPackageService.generateChecksum), which thingsboard-python-client-sdk
``sdk_utils.verify_checksum`` reproduces by reversing the byte pairs of the integer's hex.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teg_fsm.adapters.murmur3 import Murmur3x64_128, Murmur3x86_32

QUICK_FOX = b"The quick brown fox jumps over the lazy dog"


def _hash(make: Callable[[int], object], data: bytes, seed: int = 0) -> bytes:
    hasher = make(seed)
    hasher.update(data)  # type: ignore[attr-defined]
    return hasher.digest()  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed,h1,h2,text", [
    (0, 0x629942693E10F867, 0x92DB0B82BAEB5347, b"hell"),
    (1, 0xA78DDFF5ADAE8D10, 0x128900EF20900135, b"hello"),
    (2, 0x8A486B23F422E826, 0xF962A2C58947765F, b"hello "),
    (3, 0x2EA59F466F6BED8C, 0xC610990ACC428A17, b"hello w"),
    (4, 0x79F6305A386C572C, 0x46305AED3483B94E, b"hello wo"),
    (5, 0xC2219D213EC1F1B5, 0xA1D8E2E0A52785BD, b"hello wor"),
    (0, 0xE34BBC7BBC071B6C, 0x7A433CA9C49A9347, QUICK_FOX),
    (0, 0x658CA970FF85269A, 0x43FEE3EAA68E5C3E, b"The quick brown fox jumps over the lazy cog"),
])
def test_murmur3_128_gives_guavas_known_values(seed: int, h1: int, h2: int, text: bytes) -> None:
    # Murmur3Hash128Test.assertHash: the expected bytes are h1, h2 as LITTLE_ENDIAN longs.
    assert _hash(Murmur3x64_128, text, seed) == struct.pack("<QQ", h1, h2)


@pytest.mark.parametrize("expected,text", [
    (0, ""), (679745764, "k"), (-675079799, "hello"), (1935035788, "http://www.google.com/"),
    (-528633700, QUICK_FOX.decode()),
])
def test_murmur3_32_gives_guavas_known_values(expected: int, text: str) -> None:
    # Murmur3Hash32Test.testKnownStringInputs hashes the chars (putUnencodedChars: UTF-16LE).
    digest = _hash(Murmur3x86_32, text.encode("utf-16-le"))
    assert struct.unpack("<i", digest)[0] == expected


@pytest.mark.parametrize("make,verification", [(Murmur3x86_32, 0xB0F57EE3), (Murmur3x64_128, 0x6384BA69)])
def test_smhashers_verification_value(make: Callable[[int], object], verification: int) -> None:
    # smhasher VerificationTest: hash keys {}, {0}, {0,1}, ... with seed 256-i, then the hashes with seed 0.
    hashes = b"".join(_hash(make, bytes(range(i)), 256 - i) for i in range(256))
    assert int.from_bytes(_hash(make, hashes)[:4], "little") == verification


def test_the_hex_is_what_thingsboard_stores() -> None:
    # Guava HashCode.toString() of murmur3_32().hashBytes("hello") (0x248bfa47): bytes little-endian.
    assert _hash(Murmur3x86_32, b"hello").hex() == "47fa8b24"
    assert _hash(Murmur3x64_128, QUICK_FOX).hex() == "6c1b07bc7bbc4be347939ac4a93c437a"
    # What the ThingsBoard Python SDK computes from mmh3's integer (sdk_utils.verify_checksum).
    for data in (b"hello", QUICK_FOX, bytes(range(200))):
        for value, hexed in ((mmh3.hash(data, signed=False), _hash(Murmur3x86_32, data).hex()),
                             (mmh3.hash128(data, signed=False), _hash(Murmur3x64_128, data).hex())):
            text = f"{value:X}"
            text = "0" * (len(text) % 2) + text
            sdk = "".join(reversed([text[i:i + 2] for i in range(0, len(text), 2)])).lower()
            assert hexed.startswith(sdk)  # the SDK drops high zero bytes; the rest is the same order


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=4))
def test_streamed_in_any_pieces_it_equals_mmh3(data: bytes, cuts: list[int]) -> None:
    edges = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    small, large = Murmur3x86_32(), Murmur3x64_128()
    for start, end in zip(edges, edges[1:]):
        small.update(data[start:end])
        large.update(data[start:end])
    assert small.digest() == mmh3.mmh3_32(data).digest()
    assert large.digest() == mmh3.mmh3_x64_128(data).digest()
