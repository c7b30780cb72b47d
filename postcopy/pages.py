"""Per-page state for post-copy, in bitmaps: one bit per page, never an object per page.

:class:`Bitmap` is a ``bytearray`` with the kernel's bitmap layout (bit ``i``
is bit ``i % 8`` of byte ``i // 8``, as in ``include/linux/bitmap.h`` and the
KVM dirty log), with range operations that run in C: byte-slice assignment to
set and clear, ``int.bit_count`` to count, and a precompiled ``re`` search for
the first byte that is not all-ones (or all-zeros) to find the next clear (or
set) bit. A 64 GiB guest of 4 KiB pages is 16 Mi pages: 2 MiB per bitmap.

:class:`PageTracker` is the destination's view (QEMU keeps the same three
facts in ``receivedmap`` and its request bookkeeping, ``migration/ram.c``):
which pages are *received* (placed), which are *in flight* (requested, not yet
received), and how often a request or a page arrived twice. Nothing here locks:
the caller serialises (one lock around the tracker).

:func:`page_digests` is the per-page (or per-granule) 64-bit digest both sides
compute to prove the destination's memory equals the source's: ``crc32 << 32 |
adler32`` of the bytes (zlib; fast, not cryptographic), little-endian u64 each.
"""

from __future__ import annotations

import re
import sys
import zlib
from array import array
from collections.abc import Iterator
from typing import Any

_NOT_FF = re.compile(rb"[^\xff]")
_NOT_00 = re.compile(rb"[^\x00]")
_ZEROS = bytes(1 << 16)
_ONES = b"\xff" * (1 << 16)


def _fill(buf: bytearray, a: int, b: int, pattern: bytes) -> None:
    while a < b:
        n = min(b - a, len(pattern))
        buf[a : a + n] = pattern[:n] if n < len(pattern) else pattern
        a += n


class Bitmap:
    """``nbits`` bits, all clear at first."""

    __slots__ = ("buf", "nbits")

    def __init__(self, nbits: int) -> None:
        if nbits < 0:
            raise ValueError(f"negative bitmap size {nbits}")
        self.nbits = nbits
        self.buf = bytearray((nbits + 7) >> 3)

    def __len__(self) -> int:
        return self.nbits

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.nbits:
            raise IndexError(f"bits [{start}, {start + count}) outside a bitmap of {self.nbits}")

    def test(self, i: int) -> bool:
        if not 0 <= i < self.nbits:
            raise IndexError(f"bit {i} outside a bitmap of {self.nbits}")
        return bool(self.buf[i >> 3] & (1 << (i & 7)))

    __getitem__ = test

    def set(self, i: int) -> None:
        self._check(i, 1)
        self.buf[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self._check(i, 1)
        self.buf[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def set_range(self, start: int, count: int) -> None:
        self._apply(start, count, True)

    def clear_range(self, start: int, count: int) -> None:
        self._apply(start, count, False)

    def _apply(self, start: int, count: int, value: bool) -> None:
        self._check(start, count)
        if count == 0:
            return
        end = start + count
        buf = self.buf
        a, b = start >> 3, end >> 3
        if a == b:  # inside one byte
            mask = ((1 << count) - 1) << (start & 7)
            buf[a] = (buf[a] | mask) if value else (buf[a] & ~mask & 0xFF)
            return
        if start & 7:
            mask = (0xFF << (start & 7)) & 0xFF
            buf[a] = (buf[a] | mask) if value else (buf[a] & ~mask & 0xFF)
            a += 1
        _fill(buf, a, b, _ONES if value else _ZEROS)
        if end & 7:
            mask = (1 << (end & 7)) - 1
            buf[b] = (buf[b] | mask) if value else (buf[b] & ~mask & 0xFF)

    def count(self, start: int = 0, count: int | None = None) -> int:
        """Number of set bits in ``[start, start + count)`` (default: to the end)."""
        if count is None:
            count = self.nbits - start
        self._check(start, count)
        if count == 0:
            return 0
        end = start + count
        a, b = start >> 3, (end + 7) >> 3
        v = int.from_bytes(self.buf[a:b], "little")
        v >>= start & 7
        v &= (1 << count) - 1
        return v.bit_count()

    def all_set(self, start: int = 0, count: int | None = None) -> bool:
        if count is None:
            count = self.nbits - start
        if count == 1:
            return self.test(start)
        return self.next_clear(start) >= start + count

    def next_clear(self, i: int = 0) -> int:
        """The first clear bit at or after ``i``; ``nbits`` if none."""
        return self._next(i, _NOT_FF, 0xFF, True)

    def next_set(self, i: int = 0) -> int:
        """The first set bit at or after ``i``; ``nbits`` if none."""
        return self._next(i, _NOT_00, 0x00, False)

    def _next(self, i: int, pat: re.Pattern[bytes], full: int, want_clear: bool) -> int:
        n = self.nbits
        if i < 0:
            i = 0
        if i >= n:
            return n
        buf = self.buf
        byte = i >> 3
        v = buf[byte]
        if want_clear:
            v = ~v & 0xFF
        v &= (0xFF << (i & 7)) & 0xFF
        if v:
            r = (byte << 3) + ((v & -v).bit_length() - 1)
            return r if r < n else n
        m = pat.search(buf, byte + 1)
        if m is None:
            return n
        byte = m.start()
        v = buf[byte]
        if want_clear:
            v = ~v & 0xFF
        r = (byte << 3) + ((v & -v).bit_length() - 1)
        return r if r < n else n

    def runs(
        self,
        start: int = 0,
        end: int | None = None,
        *,
        clear: bool = True,
        max_run: int | None = None,
    ) -> Iterator[tuple[int, int]]:
        """Contiguous runs ``(start, count)`` of clear (or set) bits in ``[start, end)``,
        each at most ``max_run`` long."""
        end = self.nbits if end is None else min(end, self.nbits)
        i = start
        first, other = (
            (self.next_clear, self.next_set) if clear else (self.next_set, self.next_clear)
        )
        while i < end:
            a = first(i)
            if a >= end:
                return
            b = min(other(a), end)
            if max_run:
                while b - a > max_run:
                    yield a, max_run
                    a += max_run
            yield a, b - a
            i = b


class PageTracker:
    """The destination's page state: received, in flight, duplicates.

    :meth:`want` turns a wish for pages into the sub-ranges that still need a
    request (neither received nor already in flight) and marks them in flight:
    a second fault on a page already requested asks nothing (duplicate-request
    suppression). :meth:`mark_received` records arriving pages and returns how
    many were new; the rest are counted as :attr:`duplicate_pages`.
    """

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        self.received = Bitmap(nr_pages)
        self.inflight = Bitmap(nr_pages)
        self.nr_received = 0
        self.duplicate_pages = 0
        self.suppressed_requests = 0

    @property
    def missing(self) -> int:
        return self.nr_pages - self.nr_received

    @property
    def complete(self) -> bool:
        return self.nr_received == self.nr_pages

    def is_received(self, page: int) -> bool:
        return self.received.test(page)

    def want(self, start: int, count: int = 1) -> list[tuple[int, int]]:
        """Sub-ranges of ``[start, start+count)`` to request now; marks them in flight."""
        if start < 0 or count <= 0 or start + count > self.nr_pages:
            raise IndexError(f"pages [{start}, {start + count}) outside {self.nr_pages} pages")
        rec, fl = self.received, self.inflight
        if count == 1:  # the fault path
            byte, bit = start >> 3, 1 << (start & 7)
            if (rec.buf[byte] | fl.buf[byte]) & bit:
                if not rec.buf[byte] & bit:
                    self.suppressed_requests += 1
                return []
            fl.buf[byte] |= bit
            return [(start, 1)]
        end = start + count
        out: list[tuple[int, int]] = []
        i = start
        while i < end:
            a = rec.next_clear(i)
            if a >= end:
                break
            b = min(rec.next_set(a), end)
            # inside [a, b) nothing is received; skip what is in flight
            j = a
            while j < b:
                c = fl.next_clear(j)
                if c >= b:
                    break
                d = min(fl.next_set(c), b)
                out.append((c, d - c))
                j = d
            i = b
        asked = sum(n for _, n in out)
        missing = count - rec.count(start, count)
        self.suppressed_requests += missing - asked
        for s, n in out:
            fl.set_range(s, n)
        return out

    def mark_received(self, start: int, count: int) -> int:
        """Record ``count`` pages from ``start`` as placed; returns how many were new."""
        if count == 1:
            byte, bit = start >> 3, 1 << (start & 7)
            rb = self.received.buf
            if not 0 <= start < self.nr_pages:
                raise IndexError(f"page {start} outside {self.nr_pages} pages")
            if rb[byte] & bit:
                self.duplicate_pages += 1
                return 0
            rb[byte] |= bit
            self.inflight.buf[byte] &= ~bit & 0xFF
            self.nr_received += 1
            return 1
        already = self.received.count(start, count)
        if already < count:
            self.received.set_range(start, count)
        self.inflight.clear_range(start, count)
        new = count - already
        self.nr_received += new
        self.duplicate_pages += already
        return new

    def next_missing(self, page: int = 0) -> int:
        """First page at or after ``page`` not received (``nr_pages`` if none)."""
        return self.received.next_clear(page)

    def missing_runs(
        self, start: int = 0, *, max_run: int | None = None
    ) -> Iterator[tuple[int, int]]:
        return self.received.runs(start, clear=True, max_run=max_run)


def page_digests(
    memory: Any, start: int, count: int, granule: int = 1, page_size: int = 4096
) -> bytes:
    """Digests of ``count`` pages from ``start``, one per ``granule`` pages (the last may
    cover fewer), as little-endian u64s."""
    mv = memoryview(memory)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if start < 0 or count <= 0 or granule <= 0 or (start + count) * page_size > mv.nbytes:
        raise IndexError(f"pages [{start}, {start + count}) by {granule} outside the memory")
    out = array("Q")
    crc32, adler32 = zlib.crc32, zlib.adler32
    end = start + count
    for i in range(start, end, granule):
        chunk = mv[i * page_size : min(i + granule, end) * page_size]
        out.append((crc32(chunk) << 32) | adler32(chunk))
    if sys.byteorder != "little":  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def first_difference(a: bytes, b: bytes) -> int | None:
    """Index of the first differing 8-byte digest (None when equal)."""
    if a == b:
        return None
    n = min(len(a), len(b)) // 8
    for i in range(n):
        if a[8 * i : 8 * i + 8] != b[8 * i : 8 * i + 8]:
            return i
    return n
