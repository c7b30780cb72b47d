"""The userfaultfd mechanisms against the live kernel, without a VM: REMOVE, EAGAIN, late pages.

Synchronisation is by ``poll`` on the userfaultfd (the kernel says when an
event is pending) and by joining the thread that the kernel blocks; the
``GUARD_S`` timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import ctypes
import threading

import pytest

from fakekvm.abi import mman
from fakekvm.kernel.real import RealKernel
from postcopy.mechanisms.base import POLLIN, MemoryLayout, pagefaults
from postcopy.mechanisms.uffd_minor import UffdMinor, hugetlb_available
from postcopy.mechanisms.uffd_missing import UffdMissing

pytestmark = pytest.mark.real_uffd

PS = mman.PAGE_SIZE
GUARD_S = 30.0
_libc = ctypes.CDLL(None)
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _fill(m: UffdMissing | UffdMinor, start: int, count: int, byte: int, demand: bool) -> None:
    buf = m.buffer_for(start, count, demand)
    buf[:] = bytes([byte]) * len(buf)
    m.place(start, count, demand)


def test_remove_event_makes_copy_eagain_and_is_drained() -> None:
    """madvise(MADV_DONTNEED) of a placed page raises a REMOVE event and blocks the
    caller until it is read; meanwhile COPY fails EAGAIN; the placer reads the event
    itself and the copy completes. A later fault on the removed page gets zeros."""
    k = RealKernel()
    m = UffdMissing()
    m.arm(k, MemoryLayout(16 * PS))
    assert m.memory is not None and m.placer is not None
    removed: list[tuple[int, int]] = []
    m.placer.on_remove = lambda s, e: removed.append((s, e))
    base = m.memory.address
    try:
        _fill(m, 0, 1, 0x11, True)
        t = threading.Thread(target=k.madvise, args=(base, PS, mman.MADV_DONTNEED), daemon=True)
        t.start()
        assert k.poll([(m.uffd, POLLIN)], int(GUARD_S * 1000)), "no REMOVE event"
        _fill(m, 4, 4, 0x44, False)  # EAGAIN, drain, retry
        t.join(GUARD_S)
        assert not t.is_alive()
        assert m.placer.eagain >= 1
        assert removed == [(base, base + PS)]
        view = m.guest_view()
        assert bytes(view[4 * PS : 8 * PS]) == b"\x44" * (4 * PS)
        # the removed page faults again: resolved with zeros (ZEROPAGE), not refetched
        got = ctypes.c_ubyte(0xFF)
        # through libc (the GIL is released while the kernel blocks the access)
        reader = threading.Thread(
            target=_libc.memcpy, args=(ctypes.addressof(got), base + 17, 1), daemon=True
        )
        reader.start()
        assert k.poll([(m.uffd, POLLIN)], int(GUARD_S * 1000)), "no page fault"
        faults = pagefaults(m.placer.read_messages(), base, PS, 16)
        assert [f[0] for f in faults] == [0]
        m.placer.zeropage_or_wake(0)
        reader.join(GUARD_S)
        assert got.value == 0
        view.release()
    finally:
        m.complete()
        m.disarm()


def test_duplicate_and_late_pages() -> None:
    """A page placed twice is not overwritten (EEXIST + wake); after complete() a
    page still in flight is dropped, not an error."""
    k = RealKernel()
    for m in (UffdMissing(), UffdMinor()):
        m.arm(k, MemoryLayout(8 * PS))
        try:
            _fill(m, 0, 2, 0x22, True)
            view = m.guest_view()
            view[5] = 0x99  # the guest wrote to page 0 after it was placed
            _fill(m, 0, 4, 0x33, False)  # a background batch overlapping it
            assert view[5] == 0x99 and view[PS] == 0x22 and view[2 * PS] == 0x33
            _fill(m, 4, 4, 0x55, False)
            m.complete()
            _fill(m, 1, 1, 0x77, True)  # a demand reply that arrived too late
            assert view[PS] == 0x22
            view.release()
        finally:
            m.disarm()


def test_minor_huge_pages() -> None:
    ok, reason = hugetlb_available()
    if not ok:
        pytest.skip(f"uffd-minor --huge: {reason}")
    k = RealKernel()
    m = UffdMinor(huge=True)
    m.arm(k, MemoryLayout(4 << 20))
    try:
        per = (2 << 20) // PS
        _fill(m, 0, per - 1, 0x66, False)
        assert m.ready.count(0, per) == 0, "half a huge page is not continued"
        _fill(m, per - 1, 1, 0x66, True)
        assert m.ready.count(0, per) == per
    finally:
        m.complete()
        m.disarm()
