"""``uffd-minor``: guest memory in a memfd mapped twice; pages written through the alias, then ``UFFDIO_CONTINUE``.

The design of Cloud Hypervisor/Firecracker-style snapshot restore and of the
kernel selftest ``demand_paging_test -u MINOR``
(``tools/testing/selftests/kvm/demand_paging_test.c``): the guest mapping of a
shmem (or hugetlbfs) file is registered ``MISSING | MINOR``
(``Documentation/admin-guide/mm/userfaultfd.rst``, "minor faults"); a second,
unregistered ``MAP_SHARED`` mapping of the same file (the *alias*) is where
received bytes land -- the receiver reads the socket straight into the page
cache, with no staging copy -- and ``UFFDIO_CONTINUE`` then maps the
page-cache page into the guest mapping and wakes whoever waits on it. A fault
on a page not yet in the page cache arrives as MISSING, one on a page in the
cache but not mapped as MINOR; both are resolved by CONTINUE once the bytes are
there (``EEXIST``: mapped already -> explicit ``UFFDIO_WAKE``).

``huge=True`` backs memory with ``MFD_HUGETLB`` 2 MiB pages: a huge page is
continued only once all of its 4 KiB protocol pages arrived (a per-huge-page
counter, ``array('H')``), and a fault asks for the whole huge page.
"""

from __future__ import annotations

import errno
import threading
from array import array
from typing import TYPE_CHECKING

from fakekvm.abi import mman, uffd
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel
from postcopy.mechanisms.base import (
    FaultContext,
    MemoryLayout,
    Staging,
    UffdMechanism,
    UffdPlacer,
    new_eventfd,
    open_uffd,
    uffd_fault_loop,
    uffd_register,
)
from postcopy.pages import Bitmap

if TYPE_CHECKING:
    from postcopy.guestrun import DestVM

FEATURES = (
    uffd.UFFD_FEATURE_THREAD_ID
    | uffd.UFFD_FEATURE_MISSING_SHMEM
    | uffd.UFFD_FEATURE_MINOR_SHMEM
    | uffd.UFFD_FEATURE_EVENT_REMOVE
)
HUGE_FEATURES = (
    uffd.UFFD_FEATURE_THREAD_ID
    | uffd.UFFD_FEATURE_MISSING_HUGETLBFS
    | uffd.UFFD_FEATURE_MINOR_HUGETLBFS
)
HUGE_PAGE = 2 << 20


def hugetlb_available() -> tuple[bool, str]:
    """Is there a free 2 MiB huge page in the pool? (reason when not)"""
    try:
        with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
            free = int(f.read())
    except OSError as e:
        return False, f"no 2 MiB hugetlb pool: {e.strerror}"
    if free <= 0:
        return False, "the 2 MiB hugetlb pool is empty (vm.nr_hugepages = 0)"
    return True, f"{free} free 2 MiB huge pages"


class UffdMinor(UffdMechanism):
    name = "uffd-minor"

    def __init__(
        self, *, huge: bool = False, preallocate: bool = False, bulk_slots: int = 2
    ) -> None:
        super().__init__()
        self.bulk_slots = bulk_slots
        self.huge = huge
        self.preallocate = preallocate
        self.memfd = -1
        self.memory: Mapping | None = None  # the guest mapping (registered)
        self.alias: Mapping | None = None  # where bytes are written
        self.alias_view: memoryview | None = None
        self.uffd = -1
        self.stop_fd = -1
        self.placer: UffdPlacer | None = None
        self._registered = False
        self.staging: Staging | None = None
        #: pages whose bytes some receiver is writing or wrote into the page cache:
        #: a second copy of a page must never land there (the guest may own it by then)
        self.claimed = Bitmap(0)
        self.ready = Bitmap(0)
        self._claim_lock = threading.Lock()
        #: (demand, slot) -> the batch went to a staging buffer (a duplicate)
        self._scratch: dict[tuple[bool, int], bool] = {}
        self._huge_lock = threading.Lock()
        self._huge_have = array("H")
        self._per_huge = 1

    def arm(self, kernel: Kernel, layout: MemoryLayout) -> None:
        self.kernel, self.layout = kernel, layout
        size = layout.mem_size
        flags = mman.MFD_CLOEXEC
        if self.huge:
            if size % HUGE_PAGE:
                raise ValueError("huge pages need a memory size that is a multiple of 2 MiB")
            flags |= mman.MFD_HUGETLB | mman.MAP_HUGE_2MB
            self._per_huge = HUGE_PAGE // layout.page_size
            self._huge_have = array("H", bytes(2 * (size // HUGE_PAGE)))
        self.memfd = kernel.memfd_create("fakekvm-postcopy-guest", flags)
        kernel.ftruncate(self.memfd, size)
        rw = mman.PROT_READ | mman.PROT_WRITE
        self.memory = kernel.mmap(self.memfd, size, rw, mman.MAP_SHARED)
        self.alias = kernel.mmap(self.memfd, size, rw, mman.MAP_SHARED)
        self.alias_view = self.alias.view()
        self.uffd = open_uffd(kernel, HUGE_FEATURES if self.huge else FEATURES)
        uffd_register(
            kernel,
            self.uffd,
            self.memory.address,
            size,
            uffd.UFFDIO_REGISTER_MODE_MISSING | uffd.UFFDIO_REGISTER_MODE_MINOR,
        )
        self._registered = True
        self.stop_fd = new_eventfd(kernel)
        self.placer = UffdPlacer(kernel, self.uffd, self.memory.address, layout.page_size)
        self.placer.on_pending = self.kick  # faults drained by a placer: wake the fault thread
        self.staging = Staging(kernel, layout.page_size, 256, self.bulk_slots)
        self.claimed = Bitmap(layout.nr_pages)
        self.ready = Bitmap(layout.nr_pages)  # CONTINUEd by their first receiver

    def bind(self, vm: DestVM) -> None:
        assert self.memory is not None
        vm.set_region(0, self.slot_flags, 0, self.layout.mem_size, self.memory.address)

    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        return self._buffer(start, count, demand, 0)

    def buffer_for_slot(self, start: int, count: int, slot: int) -> memoryview:
        return self._buffer(start, count, False, slot)

    def place(self, start: int, count: int, demand: bool) -> None:
        self._place(start, count, demand, 0)

    def place_slot(self, start: int, count: int, slot: int) -> None:
        self._place(start, count, False, slot)

    def _buffer(self, start: int, count: int, demand: bool, slot: int) -> memoryview:
        """The page cache itself (through the alias) when no page of the range was
        claimed before; else a staging buffer (a duplicate: see :meth:`place`)."""
        assert self.alias_view is not None and self.staging is not None
        with self._claim_lock:
            fresh = self.claimed.count(start, count) == 0
            if fresh:
                self.claimed.set_range(start, count)
        self._scratch[demand, slot] = not fresh
        if fresh:
            ps = self.layout.page_size
            if self.preallocate and not self.huge:
                # allocate the page-cache pages in one call rather than one fault per
                # page inside recv(); a guest access to them is a MINOR fault still
                assert self.kernel is not None
                self.kernel.fallocate(self.memfd, 0, start * ps, count * ps)
            return self.alias_view[start * ps : (start + count) * ps]
        return self.staging.get(count, demand, slot)[1]

    def _place(self, start: int, count: int, demand: bool, slot: int) -> None:
        assert self.placer is not None and self.staging is not None
        assert self.alias_view is not None
        if self._scratch.get((demand, slot)):
            # copy in only the pages nobody claimed; the claimed ones are (being)
            # placed by their first receiver, which also wakes their waiters
            ps = self.layout.page_size
            _, src = self.staging.get(count, demand, slot)
            with self._claim_lock:
                runs = list(self.claimed.runs(start, start + count, clear=True))
                for s, c in runs:
                    self.claimed.set_range(s, c)
            for s, c in runs:
                o = (s - start) * ps
                self.alias_view[s * ps : (s + c) * ps] = src[o : o + c * ps]
                self._continue(s, c)
            return
        self._continue(start, count)

    def _continue(self, start: int, count: int) -> None:
        assert self.placer is not None
        if not self.huge:
            self._cont(start, count)
            with self._claim_lock:
                self.ready.set_range(start, count)
            return
        per = self._per_huge
        ready: list[int] = []
        with self._huge_lock:
            for p in range(start, start + count):  # a huge page is whole 4 KiB pages
                h = p // per
                self._huge_have[h] += 1
                if self._huge_have[h] == per:
                    ready.append(h)
        for h in ready:
            self.placer.cont(h * per, per)
            with self._claim_lock:
                self.ready.set_range(h * per, per)

    def _resolve_present(self, page: int) -> None:
        """A fault on a page reported placed: CONTINUE it (EEXIST -> wake) once its first
        receiver made it ready; until then that receiver's CONTINUE wakes the fault."""
        assert self.placer is not None
        per = self._per_huge
        first = page // per * per
        with self._claim_lock:
            ready = self.ready.test(page)
        if ready:
            if self.huge:
                self.placer.cont(first, per)
            else:
                self._cont(first, per)

    def _cont(self, start: int, count: int) -> None:
        """CONTINUE 4 KiB pages; a page a balloon's ``MADV_REMOVE`` punched out of the page
        cache meanwhile (CONTINUE fails ``EFAULT``: ``mfill_atomic_pte_continue`` finds no
        folio) gets a zero page from ``fallocate`` (which fills holes only) and is continued
        again: the guest gave that page up, zeros are what it may find there."""
        assert self.placer is not None and self.kernel is not None
        ps = self.layout.page_size
        for _ in range(100):
            try:
                self.placer.cont(start, count)
                return
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                self.kernel.fallocate(self.memfd, 0, start * ps, count * ps)
        raise OSError(errno.EFAULT, "UFFDIO_CONTINUE: page-cache pages keep disappearing")

    def run_fault_loop(self, ctx: FaultContext) -> None:
        assert self.placer is not None
        placer = self.placer
        if self.huge:
            per = self._per_huge

            class _Whole:
                """Ask for every 4 KiB page of a faulting huge page."""

                def __getattr__(self, name: str) -> object:
                    return getattr(ctx, name)

                def fetch(self, pages: list[int]) -> None:
                    ctx.fetch([h * per + i for h in {p // per for p in pages} for i in range(per)])

            uffd_fault_loop(
                _Whole(),  # type: ignore[arg-type]
                placer,
                self.stop_fd,
                self.layout.nr_pages,
                self._resolve_present,
            )
            return
        uffd_fault_loop(ctx, placer, self.stop_fd, self.layout.nr_pages, self._resolve_present)

    def disarm(self) -> None:
        k = self.kernel
        if k is None:
            return
        if self.alias_view is not None:
            self.alias_view.release()
            self.alias_view = None
        self._release_uffd(k)
        for m in (self.memory, self.alias):
            if m is not None:
                k.munmap(m.address, m.length)
        self.memory = self.alias = None
        if self.memfd >= 0:
            k.close(self.memfd)
            self.memfd = -1
