"""``kvm-userfault``: ``KVM_MEM_USERFAULT`` + a bitmap; the vCPU thread fetches its own page.

*** KVM Userfault is NOT UPSTREAM *** (James Houghton, "[PATCH v3 00/15] KVM:
Introduce KVM Userfault", 2025-06-18; uapi.md §3.4; :mod:`fakekvm.abi.kvm_userfault`).
It runs on the fake profile ``6.18+kvm-userfault`` and on a lab kernel with
the patches; the live 6.18 kernel rejects the flag with ``EINVAL``.

The memslot is installed with ``KVM_SET_USER_MEMORY_REGION2``, flags
``KVM_MEM_USERFAULT`` and ``userfault_bitmap`` (offset 48) pointing at one bit
per page, all set. A vCPU access to a gfn whose bit is set fails ``KVM_RUN``
with ``EFAULT`` and ``KVM_EXIT_MEMORY_FAULT`` (``memory_fault.flags`` has
``KVM_MEMORY_EXIT_FLAG_USERFAULT``): the vCPU thread itself asks for the page,
waits for it (it is placed by whichever thread receives it), and re-enters --
no fault thread on the vCPU path, no cross-CPU wake-up. Placing a page is a
``UFFDIO_COPY`` into the (anonymous) memory, *then* clearing its bit (a plain
store: the series reads the bitmap with ``test_bit``). The memory is also
registered with userfaultfd MISSING, as the proposal intends: accesses that
are not a vCPU's (KVM's own, the VMM's) still fault there and the usual fault
thread resolves them. At the end the slot is re-set without
``KVM_MEM_USERFAULT`` (the series allows toggling the flag).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fakekvm.abi import kvm, mman
from fakekvm.abi import kvm_userfault as kuf
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel
from postcopy.mechanisms.base import FaultContext, MemoryLayout
from postcopy.mechanisms.uffd_missing import UffdMissing
from postcopy.pages import Bitmap

if TYPE_CHECKING:
    from postcopy.guestrun import DestVM

_FAULT = kvm.kvm_run_memory_fault_fmt
_OFF = kvm.KVM_RUN_EXIT_OFFSET


class KvmUserfault(UffdMissing):
    name = "kvm-userfault"

    def __init__(self, *, staging_pages: int = 256) -> None:
        # place() is synchronous here (bitmap / attribute updates follow each COPY)
        super().__init__(staging_pages=staging_pages, bulk_slots=1)
        self.bitmap = Bitmap(0)
        self._bitmap_map: Mapping | None = None
        self.vm: DestVM | None = None
        self.exits = 0
        #: re-set the slot without KVM_MEM_USERFAULT at the end (every bit is clear
        #: then, so leaving the flag on changes nothing the guest can see)
        self.disable_at_end = True

    def arm(self, kernel: Kernel, layout: MemoryLayout) -> None:
        super().arm(kernel, layout)
        # one bit a page, rounded to whole u64s (the kernel reads unsigned longs), in
        # memory mapped through the kernel so that a fake's address space has it too
        nbits = -(-layout.nr_pages // 64) * 64
        length = -(-(nbits // 8) // mman.PAGE_SIZE) * mman.PAGE_SIZE
        self._bitmap_map = kernel.mmap(
            -1,
            length,
            mman.PROT_READ | mman.PROT_WRITE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS,
        )
        self.bitmap = Bitmap(nbits)
        self.bitmap.buf = self._bitmap_map.view()[: nbits // 8]  # type: ignore[assignment]
        self.bitmap.set_range(0, layout.nr_pages)

    @property
    def bitmap_address(self) -> int:
        assert self._bitmap_map is not None
        return self._bitmap_map.address

    def _region2(self, flags: int) -> bytes:
        assert self.memory is not None
        return kuf.kvm_userspace_memory_region2_fmt.pack(
            0, flags, 0, self.layout.mem_size, self.memory.address, 0, 0, 0, self.bitmap_address
        )

    def bind(self, vm: DestVM) -> None:
        self.vm = vm
        vm.set_region2(self._region2(kuf.KVM_MEM_USERFAULT | self.slot_flags))

    def place(self, start: int, count: int, demand: bool) -> None:
        super().place(start, count, demand)  # UFFDIO_COPY first ...
        self.bitmap.clear_range(start, count)  # ... then let the vCPUs in

    def on_vcpu_exit(self, ctx: FaultContext, vcpu: int, run: memoryview) -> bool:
        t0 = ctx.kernel.monotonic_ns()
        flags, gpa, _size = _FAULT.unpack_from(run, _OFF)
        if not flags & kuf.KVM_MEMORY_EXIT_FLAG_USERFAULT:
            return False
        page = gpa // self.layout.page_size
        if not 0 <= page < self.layout.nr_pages:
            return False
        self.exits += 1
        if ctx.fault_observed(page, vcpu, t0):
            self.bitmap.clear(page)  # placed: the bit is (about to be) clear
            ctx.fault_resolved_now(page, vcpu, t0)
        else:
            ctx.fetch([page])  # the placement clears the bit and ends the fault
        return True

    def complete(self) -> None:
        if self.vm is not None and self.disable_at_end:
            self.vm.set_region2(self._region2(self.slot_flags))
        super().complete()

    def disarm(self) -> None:
        super().disarm()
        if self._bitmap_map is not None and self.kernel is not None:
            buf = self.bitmap.buf
            if isinstance(buf, memoryview):
                buf.release()
            self.bitmap = Bitmap(0)
            self.kernel.munmap(self._bitmap_map.address, self._bitmap_map.length)
            self._bitmap_map = None
