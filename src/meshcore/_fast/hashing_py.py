"""XXH64 and the SplitMix64 generator, in pure Python (twin of ``hashing_c``).

XXH64 is the hash Envoy uses for ring-hash and Maglev host keys and for request hash
policies (``HashUtil::xxHash64``, seed 0). SplitMix64 is meshcore's own per-balancer PRNG:
64-bit state, one add and three xor-shift-multiplies per draw; both twins produce the same
sequence from the same seed.
"""

from __future__ import annotations

import struct

__all__ = ["SplitMix64", "xxh64"]

_M = 0xFFFFFFFFFFFFFFFF
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M
    return (_rotl(acc, 31) * _P1) & _M


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _M


def xxh64(data: "bytes | str", seed: int = 0) -> int:
    """XXH64 of ``data`` (``str`` is UTF-8 encoded) with a 64-bit ``seed``."""
    if isinstance(data, str):
        data = data.encode()
    seed &= _M
    n = len(data)
    i = 0
    frm = int.from_bytes
    if n >= 32:
        v1 = (seed + _P1 + _P2) & _M
        v2 = (seed + _P2) & _M
        v3 = seed
        v4 = (seed - _P1) & _M
        # The rounds inlined, lanes read four at a time: large inputs (a long hashed header)
        # cost ~4x less than with a call per round.
        stripes = n // 32
        lanes = struct.unpack_from(f"<{4 * stripes}Q", data)
        for k in range(0, 4 * stripes, 4):
            v1 = (v1 + lanes[k] * _P2) & _M
            v1 = ((((v1 << 31) | (v1 >> 33)) & _M) * _P1) & _M
            v2 = (v2 + lanes[k + 1] * _P2) & _M
            v2 = ((((v2 << 31) | (v2 >> 33)) & _M) * _P1) & _M
            v3 = (v3 + lanes[k + 2] * _P2) & _M
            v3 = ((((v3 << 31) | (v3 >> 33)) & _M) * _P1) & _M
            v4 = (v4 + lanes[k + 3] * _P2) & _M
            v4 = ((((v4 << 31) | (v4 >> 33)) & _M) * _P1) & _M
        i = 32 * stripes
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h ^= _round(0, frm(data[i : i + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h ^= (frm(data[i : i + 4], "little") * _P1) & _M
        h = (_rotl(h, 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M
        h = (_rotl(h, 11) * _P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    h ^= h >> 32
    return h


class SplitMix64:
    """SplitMix64 (Steele, Lea, Flood 2014): the balancer's random source."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & _M

    def next(self) -> int:
        """Return the next 64-bit value."""
        self.state = z = (self.state + 0x9E3779B97F4A7C15) & _M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
        return z ^ (z >> 31)
