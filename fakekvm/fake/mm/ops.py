"""mremap(2) and madvise(2) on the fake mm.

Follows ``mm/mremap.c`` (``SYSCALL_DEFINE5(mremap)``: flag checks, EFAULT for a
range not inside one VMA, shrink in place, grow in place, move with
MREMAP_MAYMOVE/FIXED/DONTUNMAP, hugetlb rules) and ``mm/madvise.c``
(``madvise_behavior_valid``, ENOMEM for unmapped holes, DONTNEED/FREE/REMOVE/
POPULATE/HWPOISON/GUARD). Valid advice numbers were checked on the live 6.18
kernel (5-7, 26-99 and >103 are EINVAL).

Page contents move with the real ``mremap`` of the host mapping; the per-page
bits move with `Bitmap.move`. A moved VMA keeps its userfaultfd registration only
if ``ctx.remap_keep(mm, old, new, length)`` says so (UFFD_EVENT_REMAP
semantics are brief G's); otherwise it is unregistered, as the kernel does for
contexts without UFFD_FEATURE_EVENT_REMAP.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakekvm.abi import mman
from fakekvm.fake.mm import hostmem
from fakekvm.fake.mm.vma import VMA, VmaKind

if TYPE_CHECKING:
    from fakekvm.fake.mm.core import MM

PAGE_SHIFT = mman.PAGE_SHIFT
PAGE_SIZE = mman.PAGE_SIZE

MADV_GUARD_INSTALL = 102
MADV_GUARD_REMOVE = 103
MADV_SOFT_OFFLINE = 101
MADV_DONTNEED_LOCKED = 24

VALID_ADVICE = frozenset([0, 1, 2, 3, 4, 8, 9, *range(10, 26), 100, 101, 102, 103])


def page_align(n: int, size: int = PAGE_SIZE) -> int:
    return (n + size - 1) & ~(size - 1)


def _einval(msg: str) -> OSError:
    return OSError(errno.EINVAL, msg)


# -- mremap ------------------------------------------------------------------------------------
def mremap(mm: MM, old: int, old_len: int, new_len: int, flags: int, new: int = 0) -> int:
    """mremap(2). Notifiers run outside the mm lock: start before, end after."""
    notes: list[tuple[int, int]] = []
    try:
        return _mremap(mm, old, old_len, new_len, flags, new, notes)
    finally:
        for a, b in notes:
            mm.notify_end(a, b)


def _mremap(
    mm: MM, old: int, old_len: int, new_len: int, flags: int, new: int, notes: list[tuple[int, int]]
) -> int:
    if flags & ~(mman.MREMAP_MAYMOVE | mman.MREMAP_FIXED | mman.MREMAP_DONTUNMAP):
        raise _einval(f"mremap: unknown flags {flags:#x}")
    if flags & (mman.MREMAP_FIXED | mman.MREMAP_DONTUNMAP) and not flags & mman.MREMAP_MAYMOVE:
        raise _einval("mremap: FIXED/DONTUNMAP need MAYMOVE")
    dontunmap = bool(flags & mman.MREMAP_DONTUNMAP)
    if dontunmap and old_len != new_len:
        raise _einval("mremap: DONTUNMAP needs old_len == new_len")
    if old & (PAGE_SIZE - 1):
        raise _einval("mremap: old address not page aligned")
    old_len = page_align(old_len)
    new_len = page_align(new_len)
    if new_len == 0:
        raise _einval("mremap: new length 0")
    fixed = bool(flags & mman.MREMAP_FIXED)
    if fixed:
        if new & (PAGE_SIZE - 1):
            raise _einval("mremap: new address not page aligned")
        if new < old + old_len and old < new + new_len:
            raise _einval("mremap: old and new ranges overlap")
    with mm.lock:
        vma = mm.find_vma(old)
        if vma is None:
            raise OSError(errno.EFAULT, f"mremap: {old:#x} not mapped")
        # a shrink or same-size remap that does not move is not checked against the VMA's
        # end (6.18 check_prep_vma): it only unmaps the tail
        moves = fixed or dontunmap
        if old_len == 0:
            if not vma.shared or not flags & mman.MREMAP_MAYMOVE:
                raise _einval("mremap: old_len 0 needs a shared mapping and MAYMOVE")
        elif old_len > vma.end - old and (moves or new_len > old_len):
            raise OSError(errno.EFAULT, "mremap: old range is not inside one VMA")
        if vma.hugetlb:
            hs = vma.page_size
            if old & (hs - 1):
                raise _einval("mremap: hugetlb address not huge-page aligned")
            old_len = page_align(old_len, hs)
            new_len = page_align(new_len, hs)
            if new_len > old_len:
                raise _einval("mremap: hugetlb mappings cannot grow")
            if fixed and new & (hs - 1):
                raise _einval("mremap: hugetlb new address not huge-page aligned")
        if old_len == 0:
            return _dup_shared(mm, vma, old, new_len, new if fixed else 0)
        if fixed:
            return _move(mm, vma, old, old_len, new_len, new, dontunmap, notes)
        if dontunmap:
            dest = mm.get_unmapped_area(new_len, vma.page_size)
            return _move(mm, vma, old, old_len, new_len, dest, dontunmap, notes)
        if new_len <= old_len:
            if new_len < old_len:
                mm._check_split(old + new_len)
                mm._check_split(old + old_len)
                if mm._unmap_locked(old + new_len, old + old_len):
                    notes.append((old + new_len, old + old_len))
            return old
        # grow: in place if the VMA ends there and the space after it is free
        if old + old_len == vma.end and vma.kind in (VmaKind.ANON, VmaKind.SHMEM, VmaKind.HOST) \
                and mm._free(vma.end, old + new_len):
            _grow_in_place(mm, vma, old + new_len)
            return old
        if vma.kind == VmaKind.FILE:
            raise OSError(errno.EFAULT, "mremap: cannot grow a special mapping")
        if not flags & mman.MREMAP_MAYMOVE:
            raise OSError(errno.ENOMEM, "mremap: cannot grow in place and MAYMOVE not given")
        dest = mm.get_unmapped_area(new_len, vma.page_size)
        return _move(mm, vma, old, old_len, new_len, dest, False, notes)


def _grow_in_place(mm: MM, vma: VMA, new_end: int) -> None:
    extra = new_end - vma.end
    if vma.kind == VmaKind.ANON:
        hostmem.map_anon_fixed(vma.end, extra, vma.prot)
    elif vma.kind == VmaKind.SHMEM:
        hostmem.map_fd_fixed(vma.end, extra, vma.prot, vma.file.real_fd,
                             vma.pgoff_of(vma.end) << PAGE_SHIFT, shared=vma.shared)
    else:
        hostmem.host_mremap(vma.start, vma.length, new_end - vma.start, 0)
    vmas = [v for v in mm._map[1] if v is not vma]
    g = vma.copy(vma.start, new_end)
    mm._take_vma_ref(g)
    mm._drop_vma_ref(vma)
    vmas.append(g)
    vmas.sort(key=lambda v: v.start)
    mm._set_vmas(mm._merge(vmas))


def _move(
    mm: MM, vma: VMA, old: int, old_len: int, new_len: int, new: int, dontunmap: bool,
    notes: list[tuple[int, int]],
) -> int:
    """Move [old, old+old_len) to ``new`` with length ``new_len`` (mm.lock held)."""
    if not mm._in_arena(new, new + new_len):
        raise OSError(errno.ENOMEM, f"mremap: {new:#x} outside the fake address space")
    if vma.kind == VmaKind.FILE and new_len > old_len:
        raise OSError(errno.EFAULT, "mremap: cannot grow a special mapping")
    mm._check_split(old)
    mm._check_split(old + old_len)
    notes.append((old, old + old_len))
    if mm.vmas(new, new + new_len):
        notes.append((new, new + new_len))
        mm._unmap_locked(new, new + new_len)
    vmas = mm._isolate(old, old + old_len)
    piece = next(v for v in vmas if v.start == old)
    moved = piece.copy(new, new + new_len)
    moved.pgoff = piece.pgoff
    ctx = piece.uffd_ctx
    if ctx is not None:
        keep = getattr(ctx, "remap_keep", None)
        if keep is None or not keep(mm, old, new, min(old_len, new_len)):
            moved.uffd_ctx = None
            moved.uffd_flags = 0
    mm._take_vma_ref(moved)
    # with DONTUNMAP the old range stays mapped (anonymous: empty)
    keep_vmas = [*vmas, moved] if dontunmap else [*(v for v in vmas if v is not piece), moved]
    keep_vmas.sort(key=lambda v: v.start)
    n = min(old_len, new_len) >> PAGE_SHIFT
    o, d = old >> PAGE_SHIFT, new >> PAGE_SHIFT
    hflags = mman.MREMAP_MAYMOVE | mman.MREMAP_FIXED | (mman.MREMAP_DONTUNMAP if dontunmap else 0)
    # the host move, the bits and the VMA list change together under the page-table lock,
    # so a fault or fill never sees a VMA whose host memory has gone
    with mm.pt_lock:
        hostmem.host_mremap(old, old_len, new_len, hflags, new)  # contents travel with it
        if not dontunmap:
            hostmem.reserve_fixed(old, old_len)
        for bm in (mm.present, mm.wp, mm.poison):
            bm.move(o, d, n)
        mm._set_vmas(keep_vmas)
    if not dontunmap:
        mm._drop_vma_ref(piece)
    mm._set_vmas(mm._merge(list(mm._map[1])))
    return new


def _dup_shared(mm: MM, vma: VMA, old: int, new_len: int, new: int) -> int:
    """mremap(old_len=0) of a shared mapping: a second mapping of the same pages."""
    pgoff = vma.pgoff_of(old)
    if vma.kind != VmaKind.SHMEM:
        raise _einval("mremap: old_len 0 on a mapping the fake cannot duplicate")
    f = vma.file
    flags = mman.MAP_SHARED | (mman.MAP_FIXED if new else 0)
    m = mm.mmap(f, new_len, vma.prot, flags, pgoff << PAGE_SHIFT, new)
    return m.address


# -- madvise -----------------------------------------------------------------------------------
def madvise(mm: MM, start: int, length: int, advice: int) -> None:
    if start & (PAGE_SIZE - 1):
        raise _einval("madvise: start not page aligned")
    if advice not in VALID_ADVICE:
        raise _einval(f"madvise: unknown advice {advice}")
    ln = page_align(length)
    if length and not ln:
        raise _einval("madvise: length overflows")
    end = start + ln
    if end < start:
        raise _einval("madvise: range wraps")
    if end == start:
        return
    vmas = mm.vmas(start, end)
    hole = not mm.is_mapped(start, end)
    # validate everything first, like the kernel does per VMA before acting
    for v in vmas:
        s, e = max(v.start, start), min(v.end, end)
        if (
            advice in (mman.MADV_DONTNEED, MADV_DONTNEED_LOCKED, mman.MADV_FREE, mman.MADV_REMOVE)
            and v.hugetlb
            and s & (v.page_size - 1)
        ):
            raise _einval("madvise: hugetlb range not huge-page aligned")
        if advice == mman.MADV_FREE and v.kind != VmaKind.ANON:
            raise _einval("madvise: MADV_FREE on a non-anonymous mapping")
        if advice == mman.MADV_REMOVE:
            if v.kind == VmaKind.ANON:
                raise _einval("madvise: MADV_REMOVE on anonymous memory")
            if not v.shared or not v.prot & mman.PROT_WRITE:
                raise OSError(errno.EACCES, "madvise: MADV_REMOVE needs a shared writable mapping")
        if advice in (mman.MADV_POPULATE_READ, mman.MADV_POPULATE_WRITE):
            need = mman.PROT_WRITE if advice == mman.MADV_POPULATE_WRITE else mman.PROT_READ
            if not v.prot & need:
                raise _einval("madvise: populate without the permission")
    for v in vmas:
        s, e = max(v.start, start), min(v.end, end)
        if v.hugetlb:
            e = e & ~(v.page_size - 1)
            if e <= s:
                continue
        _advise_one(mm, v, s, e, advice)
    if hole:
        raise OSError(errno.ENOMEM, "madvise: part of the range is not mapped")


def _advise_one(mm: MM, v: VMA, s: int, e: int, advice: int) -> None:
    ps, pe = s >> PAGE_SHIFT, e >> PAGE_SHIFT
    if advice in (mman.MADV_DONTNEED, MADV_DONTNEED_LOCKED, mman.MADV_FREE):
        mm.notify_start(s, e)
        if v.kind in (VmaKind.ANON, VmaKind.SHMEM, VmaKind.HOST):
            hostmem.host_madvise(s, e - s, mman.MADV_DONTNEED)
        with mm.pt_lock:
            mm.present.clear_range(ps, pe)
            mm.poison.clear_range(ps, pe)
            if v.kind == VmaKind.ANON:
                mm.wp.clear_range(ps, pe)
        mm.notify_end(s, e)
    elif advice == mman.MADV_REMOVE:
        pg = v.pgoff_of(s)
        v.file.punch_hole(pg << PAGE_SHIFT, e - s)  # invalidates every mapping, this one included
    elif advice in (mman.MADV_POPULATE_READ, mman.MADV_POPULATE_WRITE):
        from fakekvm.fake.mm.fault import populate

        populate(mm, s, e, advice == mman.MADV_POPULATE_WRITE)
    elif advice == mman.MADV_HWPOISON:
        mm.notify_start(s, e)
        with mm.pt_lock:
            mm.poison.set_range(ps, pe)
        mm.notify_end(s, e)
    elif advice == MADV_GUARD_INSTALL:
        mm.notify_start(s, e)
        hostmem.host_madvise(s, e - s, mman.MADV_DONTNEED)
        with mm.pt_lock:
            mm.present.clear_range(ps, pe)
            mm.guard.set_range(ps, pe)
        mm.notify_end(s, e)
    elif advice == MADV_GUARD_REMOVE:
        with mm.pt_lock:
            mm.guard.clear_range(ps, pe)
    # every other valid advice is a hint: accepted, nothing to emulate
