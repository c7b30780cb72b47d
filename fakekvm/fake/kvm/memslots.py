"""Memslots: the gfn -> hva map of one VM, and the rules for changing it.

Follows ``virt/kvm/kvm_main.c`` of Linux 6.18 (``kvm_vm_ioctl`` cases
``KVM_SET_USER_MEMORY_REGION{,2}``, ``kvm_vm_ioctl_set_memory_region``,
``check_memory_region_flags``, ``kvm_set_memory_region``,
``kvm_check_memslot_overlap``, ``kvm_prepare_memory_region``) and x86's
``kvm_arch_prepare_memory_region`` (gfn limit ``kvm_mmu_max_gfn``), in the
same order, so that an input with several faults gets the kernel's errno.
Measured on the live 6.18 host (uapi.md §4): the user range must end at or
below ``TASK_SIZE_MAX`` (0x7ffffffff000).

Everything here is pure state: `plan_change` validates a request against the
current slots and returns the `Change` to apply; `AddressSpace.apply` installs
it. The VM object wraps both with its lock and tells vCPUs.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass
from typing import Any, Protocol

from fakekvm.fake.kvm.dirty import DirtyBitmap
from fakekvm.fake.profiles import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_USERFAULT,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: x86-64 TASK_SIZE_MAX with 4-level paging: the end of a user range must not pass it
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
#: KVM_MEM_MAX_NR_PAGES: dirty bitmaps are indexed with an unsigned int
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
#: flags KVM_SET_USER_MEMORY_REGION (v1) accepts
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

KVM_MR_CREATE = 0
KVM_MR_DELETE = 1
KVM_MR_MOVE = 2
KVM_MR_FLAGS_ONLY = 3


class GmemFile(Protocol):
    """What a guest_memfd file offers to memslot binding (G / issue 4 implement it).

    ``kind == "guest_memfd"``; ``vm`` is the VM that created it; ``size`` is its
    i_size; ``bind(slot, start_pgoff, end_pgoff)`` raises EINVAL if a page of the
    range is already bound, ``unbind(slot)`` drops the binding.
    """

    kind: str
    vm: Any
    size: int

    def bind(self, slot: Memslot, start: int, end: int) -> None: ...

    def unbind(self, slot: Memslot) -> None: ...


@dataclass(slots=True)
class Memslot:
    """One ``struct kvm_memory_slot``."""

    as_id: int
    id: int
    flags: int
    base_gfn: int
    npages: int
    userspace_addr: int
    guest_memfd: Any = None  # GmemFile or None; the slot holds a file reference
    guest_memfd_offset: int = 0
    userfault_bitmap: int = 0  # NOT UPSTREAM: KVM Userfault v3 user pointer
    dirty: DirtyBitmap | None = None

    @property
    def gpa(self) -> int:
        return self.base_gfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.npages << PAGE_SHIFT

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def hva_range(self) -> tuple[int, int]:
        return self.userspace_addr, self.userspace_addr + (self.npages << PAGE_SHIFT)


@dataclass(frozen=True, slots=True)
class RegionRequest:
    """The fields of ``kvm_userspace_memory_region2`` the kernel reads."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0
    userfault_bitmap: int = 0


@dataclass(slots=True)
class Change:
    kind: int  # KVM_MR_*
    old: Memslot | None
    new: Memslot | None


class AddressSpace:
    """The memslots of one address space, with a sorted index for gpa lookups."""

    __slots__ = ("_ends", "_last", "_starts", "_table", "by_id", "generation")

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        self._starts: list[int] = []  # base gfn, sorted
        self._ends: list[int] = []
        self._table: list[Memslot] = []
        self._last: Memslot | None = None
        self.generation = 0

    def _reindex(self) -> None:
        table = sorted(self.by_id.values(), key=lambda s: s.base_gfn)
        self._table = table
        self._starts = [s.base_gfn for s in table]
        self._ends = [s.end_gfn for s in table]
        self._last = None
        self.generation += 1

    def lookup(self, gfn: int) -> Memslot | None:
        """``gfn_to_memslot``: cached last hit, then bisect."""
        s = self._last
        if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
            return s
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i >= 0 and gfn < self._ends[i]:
            s = self._table[i]
            self._last = s
            return s
        return None

    def overlaps(self, skip_id: int, start: int, end: int) -> bool:
        """``kvm_check_memslot_overlap``: any other slot intersecting [start, end)."""
        i = bisect.bisect_right(self._starts, end - 1) - 1
        while i >= 0 and self._ends[i] > start:
            if self._table[i].id != skip_id:
                return True
            i -= 1
        return False

    def apply(self, change: Change) -> None:
        if change.old is not None:
            del self.by_id[change.old.id]
        if change.new is not None:
            self.by_id[change.new.id] = change.new
        self._reindex()

    def slots(self) -> list[Memslot]:
        return list(self._table)


def plan_change(
    req: RegionRequest,
    *,
    v1: bool,
    valid_flags: int,
    nr_address_spaces: int,
    nr_memslots: int,
    max_gfn: int,
    spaces: list[AddressSpace],
    gmem_immutable: bool,
    resolve_gmem: Any = None,
) -> Change:
    """Validate ``req`` like ``kvm_set_memory_region`` and return the change to make.

    ``resolve_gmem(fd)`` returns the guest_memfd `GmemFile` for ``fd`` or raises the
    binding errno (EBADF for no such fd, EINVAL for another kind of file or VM).
    """
    what = "KVM_SET_USER_MEMORY_REGION" if v1 else "KVM_SET_USER_MEMORY_REGION2"

    def bad(why: str, e: int = errno.EINVAL) -> OSError:
        return OSError(e, f"{what}: {why}")

    flags = req.flags
    if v1 and flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
        raise bad(f"flags {flags:#x} not allowed on the v1 ioctl")
    slot_id = req.slot & 0xFFFF
    as_id = req.slot >> 16
    if slot_id >= nr_memslots:
        raise bad(f"slot id {slot_id} >= KVM_USER_MEM_SLOTS ({nr_memslots})")
    # check_memory_region_flags
    valid = valid_flags
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)
    if flags & ~valid:
        raise bad(f"flags {flags:#x} not supported (valid {valid:#x})")
    size = req.memory_size
    gpa = req.guest_phys_addr
    hva = req.userspace_addr
    if size & (PAGE_SIZE - 1):
        raise bad("memory_size not page aligned")
    if gpa & (PAGE_SIZE - 1):
        raise bad("guest_phys_addr not page aligned")
    if hva & (PAGE_SIZE - 1) or hva + size > TASK_SIZE_MAX:
        raise bad("userspace_addr not page aligned or not a user range")
    gofs = req.guest_memfd_offset
    if flags & KVM_MEM_GUEST_MEMFD and (gofs & (PAGE_SIZE - 1) or gofs + size >= 1 << 64):
        raise bad("guest_memfd_offset not page aligned or overflows")
    if as_id >= nr_address_spaces:
        raise bad(f"address space {as_id} >= {nr_address_spaces}")
    if gpa + size >= 1 << 64:
        raise bad("guest_phys_addr + memory_size overflows")
    npages = size >> PAGE_SHIFT
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise bad("memory_size above KVM_MEM_MAX_NR_PAGES")
    space = spaces[as_id]
    old = space.by_id.get(slot_id)
    if not size:
        if old is None:
            raise bad(f"delete of empty slot {slot_id}")
        return Change(KVM_MR_DELETE, old, None)
    base_gfn = gpa >> PAGE_SHIFT
    if old is None:
        kind = KVM_MR_CREATE
    else:
        if flags & KVM_MEM_GUEST_MEMFD and gmem_immutable:
            raise bad("a guest_memfd memslot can only be deleted")
        if (
            hva != old.userspace_addr
            or npages != old.npages
            or (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)
        ):
            raise bad("only the gpa and the LOG_DIRTY_PAGES flag of a slot may change")
        if base_gfn != old.base_gfn:
            if old.flags & KVM_MEM_GUEST_MEMFD:
                raise bad("a guest_memfd memslot cannot move")
            kind = KVM_MR_MOVE
        elif flags != old.flags:
            kind = KVM_MR_FLAGS_ONLY
        else:
            return Change(KVM_MR_FLAGS_ONLY, old, old)  # nothing to change
    if kind in (KVM_MR_CREATE, KVM_MR_MOVE) and space.overlaps(
        slot_id, base_gfn, base_gfn + npages
    ):
        raise bad("range overlaps another memslot", errno.EEXIST)
    new = Memslot(
        as_id=as_id,
        id=slot_id,
        flags=flags,
        base_gfn=base_gfn,
        npages=npages,
        userspace_addr=hva,
        guest_memfd_offset=gofs if flags & KVM_MEM_GUEST_MEMFD else 0,
        userfault_bitmap=req.userfault_bitmap if flags & KVM_MEM_USERFAULT else 0,
    )
    if kind == KVM_MR_CREATE and flags & KVM_MEM_GUEST_MEMFD:
        if resolve_gmem is None:
            raise bad("guest_memfd not available", errno.EINVAL)
        gmem = resolve_gmem(req.guest_memfd)
        if gofs + size > gmem.size:
            raise bad("guest_memfd_offset + memory_size beyond the guest_memfd")
        new.guest_memfd = gmem
    elif old is not None:
        new.guest_memfd = old.guest_memfd
        new.guest_memfd_offset = old.guest_memfd_offset
    # kvm_arch_prepare_memory_region (x86): the last gfn must fit the MMU
    if kind in (KVM_MR_CREATE, KVM_MR_MOVE) and base_gfn + npages - 1 > max_gfn:
        raise bad("range beyond the MMU's maximum gfn")
    return Change(kind, old, new)
