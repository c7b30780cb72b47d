"""``gmem-private``: guest memory in guest_memfd, pulled in by shared->private conversion exits.

Models a confidential guest's post-copy on the fake's confidential VM type
(``KVM_X86_FAKE_CC_VM``, NOT UPSTREAM; :mod:`fakekvm.fake.kvm.private`, after
TDX: a guest access without the GPA shared bit is *private*). The slot has a
guest_memfd (``KVM_CREATE_GUEST_MEMFD`` with ``GUEST_MEMFD_FLAG_MMAP``,
``KVM_SET_USER_MEMORY_REGION2`` with ``KVM_MEM_GUEST_MEMFD``; api.rst §4.140,
§4.143) and every gfn starts *shared* (attributes 0). A vCPU's private access
to a shared gfn is a mismatch: ``KVM_RUN`` fails ``EFAULT`` with
``KVM_EXIT_MEMORY_FAULT``, flags ``KVM_MEMORY_EXIT_FLAG_PRIVATE`` (api.rst §5,
"KVM_EXIT_MEMORY_FAULT"), and the vCPU thread fetches the page. A placed page
is received into a staging buffer, written through the guest_memfd's own mapping
and its gfns flipped with ``KVM_SET_MEMORY_ATTRIBUTES`` PRIVATE (one call per run
of still-shared pages), all under one lock; a later access is served from
guest_memfd. A page that is already private is never written again (a duplicate
is dropped): the guest may have changed it since. The slot's ``userspace_addr`` (the
*shared* view) is anonymous memory registered with userfaultfd MISSING, so
every other access is resolved by the usual fault thread (``UFFDIO_COPY``
from the guest_memfd mapping).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from fakekvm.abi import kvm, mman
from fakekvm.abi.fake_cc import KVM_X86_FAKE_CC_VM
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel
from postcopy.mechanisms.base import FaultContext, MemoryLayout, uffd_fault_loop
from postcopy.mechanisms.uffd_missing import UffdMissing
from postcopy.pages import Bitmap, page_digests

if TYPE_CHECKING:
    from postcopy.guestrun import DestVM

_FAULT = kvm.kvm_run_memory_fault_fmt
_OFF = kvm.KVM_RUN_EXIT_OFFSET


class GmemPrivate(UffdMissing):
    name = "gmem-private"
    vm_type = KVM_X86_FAKE_CC_VM
    supports_dirty_log = False  # KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES is EINVAL
    places_before_bind = False  # pages land in the guest_memfd that bind() creates

    def __init__(self, *, staging_pages: int = 256) -> None:
        # place() is synchronous here (bitmap / attribute updates follow each COPY)
        super().__init__(staging_pages=staging_pages, bulk_slots=1)
        self.gmem_fd = -1
        self.gmem: Mapping | None = None
        self.gmem_view: memoryview | None = None
        self.private = Bitmap(0)
        self.vm: DestVM | None = None
        self._lock = threading.Lock()
        self.exits = 0

    def arm(self, kernel: Kernel, layout: MemoryLayout) -> None:
        super().arm(kernel, layout)  # the shared view: anonymous + uffd MISSING
        self.private = Bitmap(layout.nr_pages)
        self.placed_digests = bytearray(8 * layout.nr_pages)

    def bind(self, vm: DestVM) -> None:
        assert self.kernel is not None and self.memory is not None
        k, size = self.kernel, self.layout.mem_size
        self.vm = vm
        buf = bytearray(
            kvm.kvm_create_guest_memfd_fmt.pack(
                size, kvm.GUEST_MEMFD_FLAG_MMAP | kvm.GUEST_MEMFD_FLAG_INIT_SHARED
            )
        )
        self.gmem_fd = k.ioctl(vm.vm_fd, kvm.KVM_CREATE_GUEST_MEMFD, buf)
        self.gmem = k.mmap(self.gmem_fd, size, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED)
        self.gmem_view = self.gmem.view()
        vm.set_region2(
            kvm.kvm_userspace_memory_region2_fmt.pack(
                0,
                kvm.KVM_MEM_GUEST_MEMFD | self.slot_flags,
                0,
                size,
                self.memory.address,
                0,
                self.gmem_fd,
                0,
            )
        )

    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        # Always a staging buffer, never the guest_memfd mapping itself: between this call and
        # `place` the other receiver (demand vs background) may place and flip pages of this
        # range, and the guest may then write them; receiving over them would undo its writes
        # (found by the deterministic scheduler: a background batch overwrote the vCPU's
        # freshly converted page-table and stack pages -> triple fault).
        return super().buffer_for(start, count, demand)

    def place(self, start: int, count: int, demand: bool) -> None:
        assert self.vm is not None and self.kernel is not None and self.gmem_view is not None
        assert self.staging is not None and self.placed_digests is not None
        ps = self.layout.page_size
        _, src = self.staging.get(count, demand)
        # check, copy and flip under one lock: a page is written through the mapping only
        # while it is still shared, by one placer, before the guest can see it
        with self._lock:
            runs = list(self.private.runs(start, start + count, clear=True))
            for s, c in runs:
                o = (s - start) * ps
                self.gmem_view[s * ps : (s + c) * ps] = src[o : o + c * ps]
                # digest what arrived before the guest can see (and change) it
                self.placed_digests[8 * s : 8 * (s + c)] = page_digests(self.gmem_view, s, c, 1, ps)
                attrs = kvm.kvm_memory_attributes_fmt.pack(
                    s * ps, c * ps, kvm.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0
                )
                self.kernel.ioctl(self.vm.vm_fd, kvm.KVM_SET_MEMORY_ATTRIBUTES, bytearray(attrs))
                self.private.set_range(s, c)

    def _resolve_shared(self, page: int) -> None:
        """A fault on the shared view of a placed page: copy it from guest_memfd."""
        assert self.gmem is not None and self.placer is not None
        self.placer.copy(page, 1, self.gmem.address + page * self.layout.page_size)

    def run_fault_loop(self, ctx: FaultContext) -> None:
        assert self.placer is not None
        uffd_fault_loop(ctx, self.placer, self.stop_fd, self.layout.nr_pages, self._resolve_shared)

    def on_vcpu_exit(self, ctx: FaultContext, vcpu: int, run: memoryview) -> bool:
        t0 = ctx.kernel.monotonic_ns()
        flags, gpa, _size = _FAULT.unpack_from(run, _OFF)
        if not flags & kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE:
            return False
        page = gpa // self.layout.page_size
        if not 0 <= page < self.layout.nr_pages:
            return False
        self.exits += 1
        if ctx.fault_observed(page, vcpu, t0):
            ctx.fault_resolved_now(page, vcpu, t0)  # flipped already: re-enter
        else:
            ctx.fetch([page])  # the placement flips the gfn and ends the fault
        return True

    def guest_view(self) -> memoryview:
        assert self.gmem is not None
        return self.gmem.view()[: self.layout.mem_size]

    def disarm(self) -> None:
        k = self.kernel
        if self.gmem_view is not None:
            self.gmem_view.release()
            self.gmem_view = None
        if k is not None and self.gmem is not None:
            k.munmap(self.gmem.address, self.gmem.length)
            self.gmem = None
        if k is not None and self.gmem_fd >= 0:
            k.close(self.gmem_fd)
            self.gmem_fd = -1
        super().disarm()
