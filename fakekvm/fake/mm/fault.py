"""The fault path of the fake mm: ``handle_mm_fault`` and host accesses built on it.

Follows ``mm/memory.c`` (``handle_mm_fault``, ``do_anonymous_page``,
``do_fault``, ``do_wp_page``), ``mm/shmem.c`` (``shmem_fault``) and
``fs/userfaultfd.c`` (``handle_userfault``) for *where* userfaultfd steps in.

Every access the fake emulates goes through `fault` (``MM.fault``):

* no VMA, or a protection the access lacks → ``SIGSEGV``;
* poisoned page, a file page beyond EOF → ``SIGBUS``;
* present page → ``OK``, unless it is a write to a uffd-write-protected page in
  a VMA registered with WP → userfaultfd (reason ``UFFD_PAGEFAULT_FLAG_WP``);
* missing anonymous page → userfaultfd if the VMA is registered MISSING, else
  demand-zero: the page becomes present (the host memory is already zero);
* shmem page: in the page cache → userfaultfd if registered MINOR, else it is
  mapped; not in the page cache → userfaultfd if registered MISSING, else a
  page is allocated (``MADV_POPULATE_READ`` on the host page) and mapped;
* another fake file's mapping → ``file.vm_fault(vma, pgoff, write)``.

The userfaultfd hook: when the VMA has ``uffd_ctx`` and the matching
``uffd_flags`` bit, the fault path calls, with no mm lock held::

    ctx.handle_fault(mm, vma, address, reason, who) -> FaultResult | None

``reason`` is the ``UFFD_PAGEFAULT_FLAG_*`` set (WRITE=1, WP=2, MINOR=4);
``who.user`` is False for kernel-mode accesses (``fault(..., user=False)``, e.g.
KVM's own), which a ``UFFD_USER_MODE_ONLY`` context must not handle.
``handle_fault`` may block the caller (through ``fakekvm.fake.waits``) until
the fault is resolved. Returning None means "retry the fault" (the kernel's
VM_FAULT_RETRY); returning a `FaultResult` ends the fault with it (e.g.
``SIGBUS`` when the userfaultfd is gone with UFFD_FEATURE_SIGBUS).
"""

from __future__ import annotations

import enum
import errno
import threading
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from fakekvm.abi import mman
from fakekvm.fake.mm import hostmem
from fakekvm.fake.mm.bitmap import _CMASK, CHUNK_SHIFT
from fakekvm.fake.mm.vma import VM_UFFD_MINOR, VM_UFFD_MISSING, VM_UFFD_WP, VmaKind

if TYPE_CHECKING:
    from fakekvm.fake.mm.core import MM

PAGE_SHIFT = mman.PAGE_SHIFT
PAGE_SIZE = mman.PAGE_SIZE

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

_PROT_READ_ANY = mman.PROT_READ | mman.PROT_WRITE | mman.PROT_EXEC


class FaultResult(enum.IntEnum):
    OK = 0
    SIGBUS = 1
    SIGSEGV = 2


OK = FaultResult.OK
SIGBUS = FaultResult.SIGBUS
SIGSEGV = FaultResult.SIGSEGV
PROT_WRITE = mman.PROT_WRITE
_ANON = VmaKind.ANON


@dataclass(frozen=True)
class Faulter:
    """Who faults: the thread (for uffd_msg ptid) and, for a guest access, the vCPU."""

    tid: int = field(default_factory=threading.get_native_id)
    vcpu: int | None = None
    #: "host" (a host access through the fake), "vcpu" (guest access), "kvm" (KVM's own access)
    kind: str = "host"
    #: FAULT_FLAG_USER: a user-mode access (False for KVM's own accesses; a uffd made with
    #: UFFD_USER_MODE_ONLY does not handle those). `fault` sets it from its ``user`` argument.
    user: bool = True


def _uffd(
    mm: MM, vma: object, address: int, reason: int, who: Faulter | None, user: bool
) -> FaultResult | None:
    ctx = vma.uffd_ctx  # type: ignore[attr-defined]
    if who is None:
        who = Faulter(user=user)
    elif who.user != user:
        who = replace(who, user=user)
    return ctx.handle_fault(mm, vma, address, reason, who)


def _install(mm: MM, snap: object, vpn: int, base: int, ps: int) -> bool:
    """Set the present bit(s) unless the VMA list changed since ``snap`` (then: retry).

    Checked under the page-table lock, which munmap also takes (after swapping the
    VMA list) to clear bits: a fault racing with munmap never leaves a stale bit.
    """
    with mm.pt_lock:
        if mm._map is not snap:
            return False
        if ps == PAGE_SIZE:
            mm.present.set(vpn)
        else:
            mm.present.set_range(base >> PAGE_SHIFT, (base + ps) >> PAGE_SHIFT)
    return True


def fault(mm: MM, address: int, write: bool, *, user: bool = True, who: Faulter | None = None) -> FaultResult:
    """handle_mm_fault for one access at ``address``. See the module docstring."""
    # The fast path (a present page) is inlined: one bisect, two dict lookups, no calls.
    present_chunks = mm.present._chunks
    poison_chunks = mm.poison._chunks
    guard_chunks = mm.guard._chunks
    vpn = address >> PAGE_SHIFT
    ci = vpn >> CHUNK_SHIFT
    byte = (vpn & _CMASK) >> 3
    bit = 1 << (vpn & 7)
    while True:
        snap = mm._map
        starts, vmas = snap
        i = bisect_right(starts, address) - 1
        if i < 0:
            return SIGSEGV
        vma = vmas[i]
        if address >= vma.end:
            return SIGSEGV
        prot = vma.prot
        if write:
            if not prot & PROT_WRITE:
                return SIGSEGV
        elif not prot & _PROT_READ_ANY:
            return SIGSEGV
        if poison_chunks and mm.poison.test(vpn):
            return SIGBUS
        if guard_chunks and mm.guard.test(vpn):
            return SIGSEGV
        c = present_chunks.get(ci)
        if c is not None and c[byte] & bit:
            if write and vma.uffd_flags & VM_UFFD_WP and mm.wp.test(vpn):
                r = _uffd(mm, vma, address, UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE, who, user)
                if r is not None:
                    return r
                continue
            return OK
        kind = vma.kind
        if kind == _ANON and vma.page_shift == PAGE_SHIFT and not vma.uffd_flags & VM_UFFD_MISSING:
            # demand-zero one 4 KiB page (every guest first touch): `_install`, inlined
            with mm.pt_lock:
                if mm._map is snap:
                    c = present_chunks.get(ci)
                    if c is None:
                        mm.present.set(vpn)
                    else:
                        c[byte] |= bit
                    return OK
            continue
        wflag = UFFD_PAGEFAULT_FLAG_WRITE if write else 0
        ps = vma.page_size
        base = address & ~(ps - 1)
        if kind == VmaKind.ANON:
            if vma.uffd_flags & VM_UFFD_MISSING:
                r = _uffd(mm, vma, address, wflag, who, user)
                if r is not None:
                    return r
                continue
            if not _install(mm, snap, vpn, base, ps):
                continue
            return OK
        if kind == VmaKind.SHMEM:
            f = vma.file
            pgoff = vma.pgoff_of(address)
            if pgoff << PAGE_SHIFT >= f.size:
                return FaultResult.SIGBUS
            uf = vma.uffd_flags & (VM_UFFD_MINOR | VM_UFFD_MISSING)
            if uf:
                if f.page_present(pgoff):
                    if uf & VM_UFFD_MINOR:
                        r = _uffd(mm, vma, address, wflag | UFFD_PAGEFAULT_FLAG_MINOR, who, user)
                        if r is not None:
                            return r
                        continue
                elif uf & VM_UFFD_MISSING:
                    r = _uffd(mm, vma, address, wflag, who, user)
                    if r is not None:
                        return r
                    continue
            if vma.shared:
                # allocate the page(s) in the page cache (or map the cached ones) without
                # touching the data: a no-op for pages that are already there
                try:
                    hostmem.host_madvise(base, ps, mman.MADV_POPULATE_READ)
                except OSError:
                    return FaultResult.SIGBUS
            if not _install(mm, snap, vpn, base, ps):
                continue
            return FaultResult.OK
        if kind == VmaKind.FILE:
            r0 = vma.file.vm_fault(vma, vma.pgoff_of(address), write)
            if r0 == FaultResult.OK and not _install(mm, snap, vpn, base, ps):
                continue
            return FaultResult(r0)
        # HOST: a real fd; the host kernel does the rest
        if not _install(mm, snap, vpn, base, ps):
            continue
        return FaultResult.OK


def touch(mm: MM, address: int, write: bool = False) -> FaultResult:
    """A host-side (non-vCPU) access through the fake at ``address``."""
    return fault(mm, address, write, user=True, who=Faulter())


def _check(mm: MM, address: int, n: int, write: bool, who: Faulter | None) -> None:
    if n <= 0:
        return
    page = address & ~(PAGE_SIZE - 1)
    end = address + n
    while page < end:
        r = fault(mm, page if page >= address else address, write, user=True, who=who)
        if r != FaultResult.OK:
            raise OSError(
                errno.EFAULT,
                f"{'write' if write else 'read'} at {max(page, address):#x}: {r.name}",
            )
        page += PAGE_SIZE


def read(mm: MM, address: int, n: int, who: Faulter | None = None) -> bytes:
    """Read ``n`` bytes through the fault path (EFAULT on SIGSEGV/SIGBUS)."""
    _check(mm, address, n, False, who)
    return hostmem.safe_copy_from(address, n)  # EFAULT, not a crash, if unmapped meanwhile


def write(mm: MM, address: int, data: bytes | bytearray | memoryview, who: Faulter | None = None) -> None:
    """Write ``data`` through the fault path (EFAULT on SIGSEGV/SIGBUS)."""
    n = memoryview(data).nbytes
    _check(mm, address, n, True, who)
    hostmem.safe_copy_to(address, data)  # EFAULT, not a crash, if unmapped meanwhile


def populate(mm: MM, start: int, end: int, write: bool) -> None:
    """MAP_POPULATE / MADV_POPULATE_*: fault every page of [start, end)."""
    addr = start
    while addr < end:
        v = mm.find_vma(addr)
        if v is None:
            raise OSError(errno.ENOMEM, f"populate: {addr:#x} not mapped")
        step = v.page_size
        if v.kind == VmaKind.ANON and not v.uffd_flags:
            # fast path: demand-zero the whole VMA piece at once
            top = min(end, v.end)
            mm.set_present(addr & ~(step - 1), top)
            addr = top
            continue
        r = fault(mm, addr, write, user=True)
        if r == FaultResult.SIGBUS:
            raise OSError(errno.EFAULT, f"populate: SIGBUS at {addr:#x}")
        if r == FaultResult.SIGSEGV:
            raise OSError(errno.ENOMEM if mm.find_vma(addr) is None else errno.EFAULT, f"populate: SIGSEGV at {addr:#x}")
        addr = (addr & ~(step - 1)) + step
