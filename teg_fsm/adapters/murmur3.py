"""MurmurHash3 (x86_32 and x64_128), streaming, as ThingsBoard's MURMUR3_32 / MURMUR3_128.

ThingsBoard computes an OTA package's checksum with Guava
(``BaseOtaPackageService.generateChecksum``: ``Hashing.murmur3_32()`` /
``Hashing.murmur3_128()``, seed 0, then ``HashCode.toString()``), and
``OtaPackageDataValidator`` only accepts a given checksum equal to that string.
``HashCode.toString()`` prints ``asBytes()`` in order, and Guava's bytes are
little-endian: the 32-bit hash ``0x248bfa47`` is stored as ``"47fa8b24"``, the
128-bit one as ``h1`` then ``h2``, each little-endian. That is exactly the
``digest()`` of Austin Appleby's reference (and of the ``mmh3`` package).

Pure Python on purpose. The C extension ``mmh3`` is some 200 times faster, but
the Debian package ships pure-Python wheels only, one package for every
architecture and Python (tools/packaging/build_deb.sh), and one code path is
what the integration tests exercise. Measured on the 2-core rig (100 MB file):
MURMUR3_32 8-10 MB/s, MURMUR3_128 13-16 MB/s (mmh3: 1.5 and 3.2 GB/s); a 170 MB
package is verified in 11-21 s, once, after a chunk download that takes longer.
``mmh3`` stays a test dependency, as the independent oracle (and the stand-in's
hash, as Guava is ThingsBoard's). ``update()`` takes blocks of any size, so a
package is hashed as it is read and never held in memory.
"""

from __future__ import annotations

import struct

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


class _Blocks:
    """Cuts a stream into whole blocks of ``size`` bytes; keeps the rest for the next update or the tail."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pending = b""
        self.length = 0

    def whole(self, data: bytes) -> memoryview:
        self.length += len(data)
        if self._pending:
            data = self._pending + data
        cut = len(data) - len(data) % self._size
        self._pending = bytes(data[cut:])
        return memoryview(data)[:cut]

    @property
    def tail(self) -> bytes:
        return self._pending


class Murmur3x86_32:
    """MurmurHash3_x86_32, seed 0 by default; ``digest()`` is little-endian like Guava's asBytes()."""

    def __init__(self, seed: int = 0) -> None:
        self._h = seed & _M32
        self._blocks = _Blocks(4)

    def update(self, data: bytes) -> None:
        h = self._h
        # The one real algorithm loop of this module: locals and one unpack per block for speed.
        for (k,) in struct.iter_unpack("<I", self._blocks.whole(data)):
            k = (k * 0xCC9E2D51) & _M32
            k = ((k << 15) | (k >> 17)) & _M32
            h ^= (k * 0x1B873593) & _M32
            h = ((h << 13) | (h >> 19)) & _M32
            h = (h * 5 + 0xE6546B64) & _M32
        self._h = h

    def digest(self) -> bytes:
        h = self._h
        tail = self._blocks.tail
        if tail:
            k = (int.from_bytes(tail, "little") * 0xCC9E2D51) & _M32
            k = ((k << 15) | (k >> 17)) & _M32
            h ^= (k * 0x1B873593) & _M32
        h ^= self._blocks.length & _M32
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & _M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _M32
        h ^= h >> 16
        return h.to_bytes(4, "little")


_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _M64
    return k ^ (k >> 33)


class Murmur3x64_128:
    """MurmurHash3_x64_128, seed 0 by default; ``digest()`` is h1 then h2, each little-endian (Guava's asBytes())."""

    def __init__(self, seed: int = 0) -> None:
        self._h1 = self._h2 = seed & _M32
        self._blocks = _Blocks(16)

    def update(self, data: bytes) -> None:
        h1, h2 = self._h1, self._h2
        for k1, k2 in struct.iter_unpack("<QQ", self._blocks.whole(data)):
            k1 = (k1 * _C1) & _M64
            k1 = ((k1 << 31) | (k1 >> 33)) & _M64
            h1 ^= (k1 * _C2) & _M64
            h1 = ((h1 << 27) | (h1 >> 37)) & _M64
            h1 = ((h1 + h2) * 5 + 0x52DCE729) & _M64
            k2 = (k2 * _C2) & _M64
            k2 = ((k2 << 33) | (k2 >> 31)) & _M64
            h2 ^= (k2 * _C1) & _M64
            h2 = ((h2 << 31) | (h2 >> 33)) & _M64
            h2 = ((h2 + h1) * 5 + 0x38495AB5) & _M64
        self._h1, self._h2 = h1, h2

    def digest(self) -> bytes:
        h1, h2 = self._h1, self._h2
        tail = self._blocks.tail
        if len(tail) > 8:
            k2 = (int.from_bytes(tail[8:], "little") * _C2) & _M64
            k2 = ((k2 << 33) | (k2 >> 31)) & _M64
            h2 ^= (k2 * _C1) & _M64
        if tail:
            k1 = (int.from_bytes(tail[:8], "little") * _C1) & _M64
            k1 = ((k1 << 31) | (k1 >> 33)) & _M64
            h1 ^= (k1 * _C2) & _M64
        length = self._blocks.length
        h1 ^= length
        h2 ^= length
        h1 = (h1 + h2) & _M64
        h2 = (h2 + h1) & _M64
        h1, h2 = _fmix64(h1), _fmix64(h2)
        h1 = (h1 + h2) & _M64
        h2 = (h2 + h1) & _M64
        return h1.to_bytes(8, "little") + h2.to_bytes(8, "little")
