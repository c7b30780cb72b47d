"""The per-memslot dirty bitmap: ``KVM_GET_DIRTY_LOG`` and ``KVM_CLEAR_DIRTY_LOG``.

Follows ``virt/kvm/kvm_main.c`` (``kvm_get_dirty_log_protect``,
``kvm_clear_dirty_log_protect``, ``kvm_dirty_bitmap_bytes``) and api.rst §4.37
/ §4.117 / §7.18 (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``):

* the bitmap has ``ALIGN(npages, 64) / 8`` bytes; bit ``i`` (byte ``i // 8``,
  bit ``i % 8``, i.e. little-endian ``unsigned long`` words) is gfn
  ``base_gfn + i``;
* without manual protect, GET returns the bits and clears them (the pages get
  write-protected again); with it, GET only copies and CLEAR clears the bits
  the caller passes (``first_page`` 64-aligned, ``num_pages`` a multiple of 64
  unless it reaches the end of the slot);
* with ``KVM_DIRTY_LOG_INITIALLY_SET`` a new log starts with every bit set.

Pure state: no fds, no I/O. The caller holds the VM's MMU lock and turns the
"re-protected" ranges returned here into vCPU invalidations.
"""

from __future__ import annotations

import errno

_WORD = 64


def bitmap_bytes(npages: int) -> int:
    """``kvm_dirty_bitmap_bytes``: ALIGN(npages, BITS_PER_LONG) / 8."""
    return ((npages + _WORD - 1) // _WORD) * (_WORD // 8)


class DirtyBitmap:
    """One memslot's dirty log."""

    __slots__ = ("bits", "npages")

    def __init__(self, npages: int, initially_set: bool = False) -> None:
        self.npages = npages
        self.bits = bytearray(bitmap_bytes(npages))
        if initially_set:
            self.set_all()

    def set_all(self) -> None:
        """``bitmap_set(dirty_bitmap, 0, npages)``: bits beyond npages stay clear."""
        full, rem = divmod(self.npages, 8)
        self.bits[:full] = b"\xff" * full
        if rem:
            self.bits[full] = (1 << rem) - 1

    # -- hot path --------------------------------------------------------------------
    def mark(self, rel_gfn: int) -> None:
        """``mark_page_dirty_in_slot``."""
        self.bits[rel_gfn >> 3] |= 1 << (rel_gfn & 7)

    def test(self, rel_gfn: int) -> bool:
        return bool(self.bits[rel_gfn >> 3] >> (rel_gfn & 7) & 1)

    # -- ioctls ----------------------------------------------------------------------
    def get(self, manual_protect: bool) -> tuple[bytes, list[tuple[int, int]]]:
        """KVM_GET_DIRTY_LOG: (bitmap bytes to copy out, re-protected [start, end) page runs)."""
        snap = bytes(self.bits)
        if manual_protect:
            return snap, []
        runs = _runs(snap)
        if runs:
            self.bits[:] = bytes(len(self.bits))
        return snap, runs

    def clear(self, first_page: int, num_pages: int, user: bytes) -> list[tuple[int, int]]:
        """KVM_CLEAR_DIRTY_LOG after validation; ``user`` holds ALIGN(num_pages,64)/8 bytes.

        Clears the bits set in ``user`` (fetch_andnot per word) and returns the runs of
        pages whose bit really went from 1 to 0 (those get write-protected again).
        """
        nwords = (num_pages + _WORD - 1) // _WORD
        start = first_page // 8
        bits = self.bits
        old = int.from_bytes(bits[start : start + nwords * 8], "little")
        mask = int.from_bytes(user[: nwords * 8], "little")
        cleared = old & mask
        if not cleared:
            return []
        bits[start : start + nwords * 8] = (old & ~mask).to_bytes(nwords * 8, "little")
        return [(first_page + s, first_page + e) for s, e in _runs_of_int(cleared)]


def validate_clear(first_page: int, num_pages: int, npages: int) -> None:
    """The range checks of ``kvm_clear_dirty_log_protect`` (after the slot lookup)."""
    if (
        first_page > npages
        or num_pages > npages - first_page
        or (num_pages < npages - first_page and num_pages & 63)
    ):
        raise OSError(errno.EINVAL, "KVM_CLEAR_DIRTY_LOG: range outside the memslot")


_CHUNK = 4096
_ZERO_CHUNK = bytes(_CHUNK)


def _runs(bitmap: bytes) -> list[tuple[int, int]]:
    """[start, end) runs of set bits, per 64-bit word span (coarse: lowest..highest bit).

    All-zero 4 KiB chunks are skipped with one compare, so collecting a clean 64 GiB
    log costs microseconds, not a Python loop over 262 144 words.
    """
    out: list[tuple[int, int]] = []
    n = len(bitmap)
    for c in range(0, n, _CHUNK):
        chunk = bitmap[c : c + _CHUNK]
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            continue
        words = memoryview(chunk).cast("Q")
        for i, w in enumerate(words):
            if w:
                lo = (w & -w).bit_length() - 1
                hi = w.bit_length()
                base = c * 8 + i * _WORD
                if out and out[-1][1] == base + lo:
                    out[-1] = (out[-1][0], base + hi)
                else:
                    out.append((base + lo, base + hi))
    return out


def _runs_of_int(v: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while v:
        tz = (v & -v).bit_length() - 1
        v >>= tz
        pos += tz
        ones = (~v & (v + 1)).bit_length() - 1
        out.append((pos, pos + ones))
        v >>= ones
        pos += ones
    return out
