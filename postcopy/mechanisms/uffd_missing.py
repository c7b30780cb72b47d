"""``uffd-missing``: anonymous guest memory, userfaultfd MISSING mode, ``UFFDIO_COPY`` (QEMU's design).

QEMU ``migration/postcopy-ram.c``: the destination's RAM is anonymous memory
registered ``UFFDIO_REGISTER_MODE_MISSING``; a vCPU (or KVM on its behalf)
touching a page that is not there sleeps in ``handle_userfault`` and a
``UFFD_EVENT_PAGEFAULT`` message reaches the fault thread; pages are placed
atomically with ``UFFDIO_COPY`` from a staging buffer
(``postcopy_place_page``), which also wakes the sleepers. Features asked:
``UFFD_FEATURE_THREAD_ID`` (which vCPU faulted) and ``UFFD_FEATURE_EVENT_REMOVE``
(a ``madvise(MADV_DONTNEED)`` of guest memory is reported, as with a balloon).

Here a received batch of contiguous pages is placed with one ``UFFDIO_COPY``;
background batches go through ``bulk_slots`` staging buffers so that the
next one is received while this one is copied (the destination's placer thread).
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from postcopy.guestrun import DestVM

FEATURES = uffd.UFFD_FEATURE_THREAD_ID | uffd.UFFD_FEATURE_EVENT_REMOVE


class UffdMissing(UffdMechanism):
    name = "uffd-missing"

    def __init__(self, *, staging_pages: int = 512, bulk_slots: int = 2) -> None:
        super().__init__()
        self.staging_pages = staging_pages
        self.bulk_slots = bulk_slots
        self.memory: Mapping | None = None
        self.uffd = -1
        self.stop_fd = -1
        self.placer: UffdPlacer | None = None
        self.staging: Staging | None = None
        self._registered = False

    def arm(self, kernel: Kernel, layout: MemoryLayout) -> None:
        self.kernel, self.layout = kernel, layout
        self.memory = kernel.mmap(
            -1,
            layout.mem_size,
            mman.PROT_READ | mman.PROT_WRITE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE,
        )
        self.uffd = open_uffd(kernel, FEATURES)
        uffd_register(
            kernel,
            self.uffd,
            self.memory.address,
            layout.mem_size,
            uffd.UFFDIO_REGISTER_MODE_MISSING,
        )
        self._registered = True
        self.stop_fd = new_eventfd(kernel)
        self.placer = UffdPlacer(kernel, self.uffd, self.memory.address, layout.page_size)
        self.placer.on_pending = self.kick  # faults drained by a placer: wake the fault thread
        self.staging = Staging(kernel, layout.page_size, self.staging_pages, self.bulk_slots)

    def bind(self, vm: DestVM) -> None:
        assert self.memory is not None
        vm.set_region(0, self.slot_flags, 0, self.layout.mem_size, self.memory.address)

    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        assert self.staging is not None
        return self.staging.get(count, demand)[1]

    def buffer_for_slot(self, start: int, count: int, slot: int) -> memoryview:
        assert self.staging is not None
        return self.staging.get(count, False, slot)[1]

    def place(self, start: int, count: int, demand: bool) -> None:
        self._place(start, count, demand, 0)

    def place_slot(self, start: int, count: int, slot: int) -> None:
        self._place(start, count, False, slot)

    def _place(self, start: int, count: int, demand: bool, slot: int) -> None:
        """One ``UFFDIO_COPY`` for the batch. A duplicate arriving after :meth:`complete`
        (a request still in flight when the last page came) is dropped: every page
        is there and the range is no longer registered (``ENOENT``)."""
        assert self.staging is not None and self.placer is not None
        if not self._registered:
            return
        src, _ = self.staging.get(count, demand, slot)
        try:
            self.placer.copy(start, count, src)
        except FileNotFoundError:
            if self._registered:
                raise

    def run_fault_loop(self, ctx: FaultContext) -> None:
        assert self.placer is not None
        uffd_fault_loop(
            ctx, self.placer, self.stop_fd, self.layout.nr_pages, self.placer.zeropage_or_wake
        )

    def disarm(self) -> None:
        k = self.kernel
        if k is None:
            return
        self._release_uffd(k)
        if self.memory is not None:
            k.munmap(self.memory.address, self.memory.length)
            self.memory = None
