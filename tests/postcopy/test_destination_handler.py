"""The fault handler's corner cases, driven deterministically through a scripted `Kernel`.

No thread, no fd: a :class:`Script` kernel answers each uffd ioctl from a list
of outcomes (what the real kernel does, uapi.md §5) and records every call.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from fakekvm.abi import uffd
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg
from postcopy.destination import Destination
from postcopy.mechanisms.base import UffdPlacer, pagefaults, uffd_fault_loop
from postcopy.mechanisms.uffd_missing import UffdMissing

PS = 4096
BASE = 0x7F0000000000
COPY = uffd.uffdio_copy_fmt
CONT = uffd.uffdio_continue_fmt


def _fault(page: int, tid: int = 0, flags: int = 0) -> bytes:
    return uffd.uffd_msg_pagefault_fmt.pack(uffd.UFFD_EVENT_PAGEFAULT, flags, BASE + page * PS, tid)


def _remove(start: int, end: int) -> bytes:
    return uffd.uffd_msg_remove_fmt.pack(uffd.UFFD_EVENT_REMOVE, start, end)


class Script(ForwardingKernel):
    """Answers ioctls from ``outcomes`` (errno or None, output field) and reads from ``reads``."""

    def __init__(self) -> None:
        super().__init__(RealKernel())
        self.outcomes: list[tuple[int | None, int]] = []
        self.reads: list[bytes] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.polls = 0

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        assert isinstance(arg, bytearray)
        if request == uffd.UFFDIO_WAKE:
            self.calls.append(("WAKE", uffd.uffdio_range_fmt.unpack(arg)))
            return 0
        name, fmt, out = {
            uffd.UFFDIO_COPY: ("COPY", COPY, 4),
            uffd.UFFDIO_CONTINUE: ("CONTINUE", CONT, 3),
            uffd.UFFDIO_ZEROPAGE: ("ZEROPAGE", uffd.uffdio_zeropage_fmt, 3),
        }[request]
        fields = list(fmt.unpack(arg))
        self.calls.append((name, tuple(fields)))
        err, value = self.outcomes.pop(0)
        fields[out] = value
        arg[:] = fmt.pack(*fields)
        if err is not None:
            raise OSError(err, "scripted")
        return 0

    def read(self, fd: int, n: int) -> bytes:
        if not self.reads:
            raise BlockingIOError(errno.EAGAIN, "nothing pending")
        return self.reads.pop(0)


def test_copy_eexist_is_followed_by_an_explicit_wake() -> None:
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    k.outcomes = [(errno.EEXIST, -errno.EEXIST)]
    p.copy(5, 1, 0x1000)
    assert k.calls == [
        ("COPY", (BASE + 5 * PS, 0x1000, PS, 0, 0)),
        ("WAKE", (BASE + 5 * PS, PS)),
    ]
    assert (p.eexist, p.wakes) == (1, 1)


def test_partial_copy_then_eexist_skips_only_the_present_page() -> None:
    """3 pages: the kernel copies 1, stops at a present one (-1/EAGAIN, copy=4096);
    the retry gets EEXIST there (wake it), then the last page is copied."""
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    k.outcomes = [(errno.EAGAIN, PS), (errno.EEXIST, -errno.EEXIST), (None, PS)]
    p.copy(10, 3, 0x10000)
    d = BASE + 10 * PS
    assert [c[0] for c in k.calls] == ["COPY", "COPY", "WAKE", "COPY"]
    assert k.calls[1][1][:3] == (d + PS, 0x10000 + PS, 2 * PS)
    assert k.calls[2][1] == (d + PS, PS)
    assert k.calls[3][1][:3] == (d + 2 * PS, 0x10000 + 2 * PS, PS)


def test_eagain_drains_events_and_retries_the_rest() -> None:
    """A REMOVE is unread: COPY fails EAGAIN with copy = -EAGAIN (no progress, the
    field is signed); the placer reads the events itself, queues the page fault it
    found for the fault thread, and retries the whole range."""
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    removed: list[tuple[int, int]] = []
    kicked = threading.Event()
    p.on_remove = lambda s, e: removed.append((s, e))
    p.on_pending = kicked.set
    k.outcomes = [(errno.EAGAIN, -errno.EAGAIN), (None, 2 * PS)]
    k.reads = [_remove(BASE, BASE + PS) + _fault(7, tid=42)]
    p.copy(0, 2, 0x2000)
    assert [c[0] for c in k.calls] == ["COPY", "COPY"]
    assert k.calls[1][1][:3] == (BASE, 0x2000, 2 * PS), "nothing was counted as done"
    assert removed == [(BASE, BASE + PS)]
    assert kicked.is_set() and p.eagain == 1
    data, _t = p.pending.popleft()
    assert pagefaults(data, BASE, PS, 100) == [(7, 0, 42)]


def test_continue_eexist_wakes() -> None:
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    k.outcomes = [(errno.EEXIST, -errno.EEXIST)]
    p.cont(4, 1)
    assert k.calls[-1] == ("WAKE", (BASE + 4 * PS, PS))


def test_other_errors_are_raised_with_the_ioctl_name() -> None:
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    k.outcomes = [(errno.EFAULT, -errno.EFAULT)]
    with pytest.raises(OSError, match="UFFDIO_COPY") as ei:
        p.copy(0, 1, 0)
    assert ei.value.errno == errno.EFAULT


def test_fault_on_a_placed_page_is_woken_not_requested() -> None:
    """ZEROPAGE on a present page: EEXIST, then the explicit wake."""
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    k.outcomes = [(errno.EEXIST, -errno.EEXIST)]
    p.zeropage_or_wake(9)
    assert [c[0] for c in k.calls] == ["ZEROPAGE", "WAKE"]


def test_fault_on_a_placed_page_of_an_unregistered_range_is_left_alone() -> None:
    """ZEROPAGE answers ENOENT once the range is no longer registered (``dst not in a
    uffd-registered VMA``, uapi.md): a late fault handled while the destination tears down.
    Unregistering woke every waiter, so there is nothing to wake and nothing to raise; any
    other error still raises."""
    k = Script()
    p = UffdPlacer(k, 3, BASE, PS)
    k.outcomes = [(errno.ENOENT, -errno.ENOENT)]
    p.zeropage_or_wake(9)
    assert [c[0] for c in k.calls] == ["ZEROPAGE"] and p.gone == 1
    k.outcomes = [(errno.EFAULT, -errno.EFAULT)]
    with pytest.raises(OSError, match="UFFDIO_ZEROPAGE"):
        p.zeropage_or_wake(9)


class _Ctx:
    """A FaultContext that records what the fault loop asks for."""

    def __init__(self, kernel: Script, placed: Sequence[int] = ()) -> None:
        self.kernel = kernel
        self.stop = threading.Event()
        self.placed = set(placed)
        self.fetched: list[list[int]] = []
        self.begun: list[tuple[int, int]] = []
        self.resolved: list[int] = []

    def vcpu_of_tid(self, tid: int) -> int:
        return {100: 0, 101: 1}.get(tid, -1)

    def fault_observed(self, page: int, vcpu: int, t_ns: int) -> bool:
        self.begun.append((page, vcpu))
        return page in self.placed

    def fault_resolved_now(self, page: int, vcpu: int, t_begin_ns: int) -> None:
        self.resolved.append(page)

    def fetch(self, pages: list[int]) -> None:
        self.fetched.append(pages)
        self.stop.set()  # one round is enough

    def pages_removed(self, start: int, count: int) -> None:
        pass


class _PollOnce(Script):
    def poll(self, fds: Any, timeout_ms: int | None) -> list[tuple[int, int]]:
        return [(3, 1)]


def test_fault_loop_duplicates_and_placed_pages() -> None:
    """Two vCPUs fault on page 5 in one read, one on the already placed page 6:
    page 6 is woken at once, page 5 is fetched (the destination de-duplicates)."""
    k = _PollOnce()
    ctx = _Ctx(k, placed=[6])
    placer = UffdPlacer(k, 3, BASE, PS)
    k.reads = [_fault(5, 100) + _fault(5, 101) + _fault(6, 100)]
    woken: list[int] = []
    uffd_fault_loop(ctx, placer, 99, 64, woken.append)  # type: ignore[arg-type]
    assert ctx.begun == [(5, 0), (5, 1), (6, 0)]
    assert woken == [6] and ctx.resolved == [6]
    assert ctx.fetched == [[5, 5]]


class _Client:
    def __init__(self) -> None:
        self.requested: list[tuple[int, int]] = []
        self.waited: list[tuple[int, int]] = []

    def request(self, start: int, count: int = 1) -> list[tuple[int, int]]:
        self.requested.append((start, count))
        return [(start, count)]

    def wait_pages(self, start: int, count: int = 1, timeout: float | None = None) -> None:
        self.waited.append((start, count))


def test_destination_fetch_coalesces_and_deduplicates() -> None:
    d = Destination(RealKernel(), UffdMissing(), address="/nonexistent")
    c = _Client()
    d.client = c  # type: ignore[assignment]
    d.fetch([5, 5, 6, 9, 7])
    assert c.requested == [(5, 3), (9, 1)]
    assert c.waited == [(5, 3), (9, 1)]


def test_destination_accounting_of_a_fault_placed_meanwhile() -> None:
    """A fault observed before its page is placed ends at the placement; one observed
    after it is reported as present (the caller wakes it)."""
    from postcopy.mechanisms.base import MemoryLayout
    from postcopy.pages import Bitmap
    from postcopy.stats import MigrationStats

    class _Nop(UffdMissing):
        def place(self, start: int, count: int, demand: bool) -> None:
            pass

    d = Destination(RealKernel(), _Nop(), address="/nonexistent")
    d.layout = MemoryLayout(16 * PS)
    d.placed = Bitmap(16)
    d.stats = MigrationStats(2)
    assert d.fault_observed(3, 0, 1000) is False
    assert d.fault_observed(3, 1, 1500) is False  # the same page, another vCPU
    d.placed_pages(2, 4, True)
    assert d.stats.faults == 2 and d.stats.vcpu_faults[0] == d.stats.vcpu_faults[1] == 1
    assert d.fault_observed(4, 0, 5000) is True
    assert not d._open
