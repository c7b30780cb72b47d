"""A sparse bitset: one bit per page, in lazily allocated ``bytearray`` chunks.

The fake's page-table state (present, uffd-wp, poison) is indexed by virtual
page number, like the kernel's PTE bits (``include/linux/pgtable.h``) and the
per-page bitmaps of ``include/linux/bitmap.h``. A chunk is 4 KiB (32768 bits =
128 MiB of 4 KiB pages) and exists only while one of its bits is set, so a
64 GiB reservation costs nothing until it is touched, and a fully populated
1 GiB region costs 32 KiB.

Range operations never loop per bit: whole bytes are written with slice
assignment, byte boundaries with masks, searches use ``re`` over the bytes (a C
scan, no copy) and counts use ``int.bit_count``. Bit ``i`` of a chunk is bit
``i & 7`` of byte ``i >> 3`` (little-endian bit order, like the kernel's
``test_bit`` on x86 and KVM's dirty bitmap).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

CHUNK_SHIFT = 15
CHUNK_BITS = 1 << CHUNK_SHIFT
CHUNK_BYTES = CHUNK_BITS >> 3
_CMASK = CHUNK_BITS - 1

_ONES = b"\xff" * CHUNK_BYTES
_ZEROS = bytes(CHUNK_BYTES)
_NONZERO = re.compile(b"[^\x00]")
_NONFULL = re.compile(b"[^\xff]")


def _fill(buf: bytearray, lo: int, hi: int, value: bool) -> None:
    """Set (value) or clear bits [lo, hi) of one chunk; lo < hi <= CHUNK_BITS."""
    lb, lo_bit = lo >> 3, lo & 7
    hb, hi_bit = hi >> 3, hi & 7
    if lb == hb:
        m = ((1 << (hi_bit - lo_bit)) - 1) << lo_bit
        if value:
            buf[lb] |= m
        else:
            buf[lb] &= ~m & 0xFF
        return
    if lo_bit:
        m = (0xFF << lo_bit) & 0xFF
        if value:
            buf[lb] |= m
        else:
            buf[lb] &= ~m & 0xFF
        lb += 1
    if hb > lb:
        buf[lb:hb] = (_ONES if value else _ZEROS)[: hb - lb]
    if hi_bit:
        m = (1 << hi_bit) - 1
        if value:
            buf[hb] |= m
        else:
            buf[hb] &= ~m & 0xFF


def _chunk_bits(buf: bytearray, lo: int, hi: int) -> int:
    """Bits [lo, hi) of a chunk as an int (bit 0 = bit lo)."""
    lb = lo >> 3
    hb = (hi + 7) >> 3
    x = int.from_bytes(buf[lb:hb], "little") >> (lo & 7)
    return x & ((1 << (hi - lo)) - 1)


class Bitmap:
    """A sparse bitset over non-negative bit numbers (page numbers)."""

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}

    # -- single bits ---------------------------------------------------------------
    def test(self, i: int) -> bool:
        c = self._chunks.get(i >> CHUNK_SHIFT)
        if c is None:
            return False
        return bool((c[(i & _CMASK) >> 3] >> (i & 7)) & 1)

    __contains__ = test

    def set(self, i: int) -> None:
        ci = i >> CHUNK_SHIFT
        c = self._chunks.get(ci)
        if c is None:
            c = self._chunks[ci] = bytearray(CHUNK_BYTES)
        c[(i & _CMASK) >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        c = self._chunks.get(i >> CHUNK_SHIFT)
        if c is not None:
            c[(i & _CMASK) >> 3] &= ~(1 << (i & 7)) & 0xFF

    # -- ranges [start, end) ---------------------------------------------------------
    def _spans(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, lo, hi) pieces of [start, end)."""
        while start < end:
            ci = start >> CHUNK_SHIFT
            lo = start & _CMASK
            hi = min(CHUNK_BITS, lo + (end - start))
            yield ci, lo, hi
            start += hi - lo

    def set_range(self, start: int, end: int) -> None:
        for ci, lo, hi in self._spans(start, end):
            c = self._chunks.get(ci)
            if c is None:
                c = self._chunks[ci] = bytearray(CHUNK_BYTES)
            _fill(c, lo, hi, True)

    def clear_range(self, start: int, end: int) -> None:
        for ci, lo, hi in self._spans(start, end):
            c = self._chunks.get(ci)
            if c is None:
                continue
            if lo == 0 and hi == CHUNK_BITS:
                del self._chunks[ci]
                continue
            _fill(c, lo, hi, False)
            if _NONZERO.search(c) is None:
                del self._chunks[ci]

    def count(self, start: int, end: int) -> int:
        n = 0
        for ci, lo, hi in self._spans(start, end):
            c = self._chunks.get(ci)
            if c is not None:
                n += _chunk_bits(c, lo, hi).bit_count()
        return n

    def any(self, start: int, end: int) -> bool:
        return self.find_next_set(start, end) >= 0

    def all(self, start: int, end: int) -> bool:
        return self.find_next_clear(start, end) < 0

    def find_next_set(self, start: int, end: int) -> int:
        """First set bit in [start, end), or -1."""
        chunks = self._chunks
        while start < end:
            ci = start >> CHUNK_SHIFT
            lo = start & _CMASK
            hi = min(CHUNK_BITS, lo + (end - start))
            c = chunks.get(ci)
            if c is not None:
                # first byte holding lo: mask off the bits below lo
                b = lo >> 3
                x = c[b] >> (lo & 7)
                if x:
                    pos = lo + ((x & -x).bit_length() - 1)
                    return start - lo + pos if pos < hi else -1
                m = _NONZERO.search(c, b + 1, (hi + 7) >> 3)
                if m is not None:
                    y = c[m.start()]
                    pos = (m.start() << 3) + ((y & -y).bit_length() - 1)
                    return start - lo + pos if pos < hi else -1
            elif end - start > 4 * CHUNK_BITS:
                # skip the hole to the next allocated chunk (sparse address spaces)
                nxt = self._next_chunk(ci + 1, (end - 1) >> CHUNK_SHIFT)
                if nxt is None:
                    return -1
                start = nxt << CHUNK_SHIFT
                continue
            start += hi - lo
        return -1

    def _next_chunk(self, ci: int, last: int) -> int | None:
        """Smallest allocated chunk index in [ci, last], or None."""
        best = None
        for k in self._chunks:
            if ci <= k <= last and (best is None or k < best):
                best = k
        return best

    def find_next_clear(self, start: int, end: int) -> int:
        """First clear bit in [start, end), or -1."""
        while start < end:
            ci = start >> CHUNK_SHIFT
            lo = start & _CMASK
            hi = min(CHUNK_BITS, lo + (end - start))
            c = self._chunks.get(ci)
            if c is None:
                return start
            b = lo >> 3
            x = (~(c[b] >> (lo & 7))) & (0xFF >> (lo & 7))
            if x:
                pos = lo + ((x & -x).bit_length() - 1)
                return start - lo + pos if pos < hi else -1
            m = _NONFULL.search(c, b + 1, (hi + 7) >> 3)
            if m is not None:
                y = ~c[m.start()] & 0xFF
                pos = (m.start() << 3) + ((y & -y).bit_length() - 1)
                return start - lo + pos if pos < hi else -1
            start += hi - lo
        return -1

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Maximal runs [a, b) of set bits inside [start, end)."""
        while start < end:
            a = self.find_next_set(start, end)
            if a < 0:
                return
            b = self.find_next_clear(a, end)
            if b < 0:
                b = end
            yield a, b
            start = b

    # -- bulk moves (mremap) ------------------------------------------------------------
    def get_bits(self, start: int, end: int) -> int:
        """Bits [start, end) as an int, bit 0 = ``start``."""
        out = 0
        for ci, lo, hi in self._spans(start, end):
            c = self._chunks.get(ci)
            if c is not None:
                out |= _chunk_bits(c, lo, hi) << ((ci << CHUNK_SHIFT) + lo - start)
        return out

    def put_bits(self, start: int, end: int, value: int) -> None:
        """Overwrite bits [start, end) with ``value`` (bit 0 -> ``start``)."""
        for ci, lo, hi in self._spans(start, end):
            n = hi - lo
            part = (value >> ((ci << CHUNK_SHIFT) + lo - start)) & ((1 << n) - 1)
            c = self._chunks.get(ci)
            if part == 0:
                if c is not None:
                    self.clear_range((ci << CHUNK_SHIFT) + lo, (ci << CHUNK_SHIFT) + hi)
                continue
            if c is None:
                c = self._chunks[ci] = bytearray(CHUNK_BYTES)
            if lo & 7 == 0 and hi & 7 == 0:
                c[lo >> 3 : hi >> 3] = part.to_bytes(n >> 3, "little")
                continue
            lb = lo >> 3
            hb = (hi + 7) >> 3
            old = int.from_bytes(c[lb:hb], "little")
            sh = lo & 7
            mask = ((1 << n) - 1) << sh
            new = (old & ~mask) | (part << sh)
            c[lb:hb] = new.to_bytes(hb - lb, "little")

    def move(self, src: int, dst: int, n: int) -> None:
        """Move bits [src, src+n) to [dst, dst+n); the source becomes clear."""
        v = self.get_bits(src, src + n)
        self.clear_range(src, src + n)
        self.put_bits(dst, dst + n, v)

    # -- whole bitmap ---------------------------------------------------------------------
    def clear_all(self) -> None:
        self._chunks.clear()

    def nbytes(self) -> int:
        """Bytes of memory this bitmap uses (chunks + dict)."""
        return sys.getsizeof(self._chunks) + sum(sys.getsizeof(c) for c in self._chunks.values())

    def __bool__(self) -> bool:
        """True if any bit may be set (a chunk is allocated)."""
        return bool(self._chunks)

    def __len__(self) -> int:
        """Number of set bits."""
        return sum(int.from_bytes(c, "little").bit_count() for c in self._chunks.values())

    def __iter__(self) -> Iterator[int]:
        for ci in sorted(self._chunks):
            base = ci << CHUNK_SHIFT
            for a, b in self.runs(base, base + CHUNK_BITS):
                yield from range(a, b)

    def __repr__(self) -> str:
        return f"<Bitmap {len(self)} set in {len(self._chunks)} chunks>"
