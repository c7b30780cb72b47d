"""Page-installing helpers for userfaultfd ioctls (the mm side of them).

Follows ``mm/userfaultfd.c`` (``mfill_atomic``: ``mfill_atomic_pte_copy``,
``_zeropage``, ``_continue``, ``_poison``; ``move_pages``;
``mwriteprotect_range``) and ``mm/shmem.c`` (``shmem_mfill_atomic_pte``).

These do the page-table work and nothing else: the userfaultfd module (brief G)
checks registration, modes and the ``ctx`` (ENOENT/EINVAL for ranges not
registered with it), handles EAGAIN for pending events and wakes waiters. Each
helper walks the range one page (``vma.page_size``) at a time and returns the
bytes done; on a per-page failure it raises `MFillError` carrying ``done``
(bytes completed before the failing page), so the caller can write ``copy``/
``mapped``/``move`` with the kernel's partial-progress semantics.

A MAP_PRIVATE mapping of a memfd gets private pages (``mfill_atomic_pte_copy``),
a shared one gets page-cache pages (``shmem_mfill_atomic_pte``).

Per-page errors (as the kernel): destination already present → EEXIST; ``src``
unreadable → EFAULT; shmem page beyond EOF → EFAULT; CONTINUE with the page not
in the page cache → EFAULT; MOVE source hole → ENOENT (unless allowed).
Alignment to the VMA's page size → EINVAL; range not inside one VMA → ENOENT.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from fakekvm.abi import mman
from fakekvm.fake.mm import hostmem
from fakekvm.fake.mm.vma import VMA, VmaKind

if TYPE_CHECKING:
    from fakekvm.fake.mm.core import MM

PAGE_SHIFT = mman.PAGE_SHIFT

Src = int | bytes | bytearray | memoryview


class MFillError(OSError):
    """A fill stopped at a page: ``errno`` as the kernel's, ``done`` bytes completed before it."""

    def __init__(self, err: int, msg: str, done: int) -> None:
        super().__init__(err, msg)
        self.done = done


def _range(mm: MM, dst: int, length: int) -> VMA:
    if dst & (mman.PAGE_SIZE - 1) or length & (mman.PAGE_SIZE - 1) or length <= 0:
        raise OSError(errno.EINVAL, f"range {dst:#x}+{length:#x} not page aligned")
    vma = mm.vma_for_range(dst, dst + length)
    ps = vma.page_size
    if dst & (ps - 1) or length & (ps - 1) or length <= 0:
        raise OSError(errno.EINVAL, f"range {dst:#x}+{length:#x} not aligned to {ps:#x}")
    return vma


def _still_mapped(mm: MM, vma: VMA, addr: int, ps: int, done: int) -> None:
    """With ``pt_lock`` held: the VMA is still there (munmap clears bits under that lock
    before it takes host memory away), else ENOENT like a layout change under the ioctl."""
    v = mm.find_vma(addr)
    if v is None or v.end < addr + ps or v.kind != vma.kind or v.file is not vma.file:
        raise MFillError(errno.ENOENT, f"mapping at {addr:#x} changed under the operation", done)


def _populated(mm: MM, vpn: int, span: int) -> bool:
    """Is any of the ``span`` pages at ``vpn`` present or poisoned? (pt_lock held)"""
    if span == 1:
        return mm.present.test(vpn) or bool(mm.poison._chunks and mm.poison.test(vpn))
    return mm.present.any(vpn, vpn + span) or mm.poison.any(vpn, vpn + span)


def _write_page(vma: VMA, addr: int, data: bytes | memoryview | None, ps: int) -> None:
    """Write a page into the host memory of ``vma`` (zeroes if ``data`` is None).

    UFFDIO_COPY fills read-only VMAs too; the host mapping is then made writable
    for the copy and put back (the caller holds ``pt_lock``).
    """
    ro = not vma.prot & mman.PROT_WRITE
    if ro:
        hostmem.host_mprotect(addr, ps, mman.PROT_READ | mman.PROT_WRITE)
    try:
        if data is None:
            hostmem.memset(addr, 0, ps)
        else:
            hostmem.write_bytes(addr, data)
    finally:
        if ro:
            hostmem.host_mprotect(addr, ps, vma.prot)


def _src_page(src: Src, off: int, n: int) -> bytes | memoryview:
    if isinstance(src, int):
        return hostmem.safe_copy_from(src + off, n)
    if off == 0 and isinstance(src, bytes) and len(src) == n:
        return src
    mv = memoryview(src).cast("B")
    if off + n > mv.nbytes:
        raise OSError(errno.EFAULT, "source buffer too short")
    return mv[off : off + n]


def _shmem_size_check(vma: VMA, addr: int, done: int) -> int:
    pgoff = vma.pgoff_of(addr)
    if pgoff << PAGE_SHIFT >= vma.file.size:
        raise MFillError(errno.EFAULT, f"{addr:#x} is beyond the end of the file", done)
    return pgoff


def copy(mm: MM, dst: int, src: Src, length: int, *, wp: bool = False, zero: bool = False) -> int:
    """UFFDIO_COPY (``zero``: UFFDIO_ZEROPAGE): fill missing pages with ``src`` bytes / zeroes."""
    vma = _range(mm, dst, length)
    ps = vma.page_size
    span = ps >> PAGE_SHIFT
    done = 0
    while done < length:
        addr = dst + done
        vpn = addr >> PAGE_SHIFT
        try:
            data = None if zero else _src_page(src, done, ps)
        except OSError as e:
            raise MFillError(e.errno or errno.EFAULT, str(e), done)
        with mm.pt_lock:
            _still_mapped(mm, vma, addr, ps, done)
            if _populated(mm, vpn, span):
                raise MFillError(errno.EEXIST, f"{addr:#x} is already populated", done)
            if vma.kind == VmaKind.SHMEM and vma.shared:
                pgoff = _shmem_size_check(vma, addr, done)
                if vma.file.page_present(pgoff):
                    raise MFillError(errno.EEXIST, f"page cache already has {addr:#x}", done)
                buf = bytes(ps) if data is None else data
                os.pwrite(vma.file.real_fd, buf, pgoff << PAGE_SHIFT)
            elif vma.kind == VmaKind.ANON or vma.kind == VmaKind.SHMEM:
                # anonymous memory, or a private file mapping: the page is a private (COW) copy
                if vma.kind == VmaKind.SHMEM:
                    _shmem_size_check(vma, addr, done)
                _write_page(vma, addr, data, ps)
            else:
                raise MFillError(errno.EINVAL, f"cannot fill a {vma.kind.name} mapping", done)
            if span == 1:
                mm.present.set(vpn)
                if wp:
                    mm.wp.set(vpn)
            else:
                mm.present.set_range(vpn, vpn + span)
                if wp:
                    mm.wp.set_range(vpn, vpn + span)
        done += ps
    return done


def zeropage(mm: MM, dst: int, length: int) -> int:
    """UFFDIO_ZEROPAGE."""
    return copy(mm, dst, b"", length, zero=True)


def cont(mm: MM, dst: int, length: int, *, wp: bool = False) -> int:
    """UFFDIO_CONTINUE: map page-cache pages that are already there into a shmem VMA."""
    vma = _range(mm, dst, length)
    if vma.kind != VmaKind.SHMEM:
        raise OSError(errno.EINVAL, "UFFDIO_CONTINUE needs a shmem/hugetlb mapping")
    ps = vma.page_size
    span = ps >> PAGE_SHIFT
    done = 0
    while done < length:
        addr = dst + done
        vpn = addr >> PAGE_SHIFT
        with mm.pt_lock:
            pgoff = _shmem_size_check(vma, addr, done)
            if mm.present.any(vpn, vpn + span):
                raise MFillError(errno.EEXIST, f"{addr:#x} is already mapped", done)
            if not vma.file.page_present(pgoff):
                raise MFillError(errno.EFAULT, f"no page-cache page for {addr:#x}", done)
            mm.present.set_range(vpn, vpn + span)
            if wp:
                mm.wp.set_range(vpn, vpn + span)
        done += ps
    return done


def poison(mm: MM, dst: int, length: int) -> int:
    """UFFDIO_POISON: install poison markers (a later access gets SIGBUS)."""
    vma = _range(mm, dst, length)
    ps = vma.page_size
    span = ps >> PAGE_SHIFT
    done = 0
    while done < length:
        vpn = (dst + done) >> PAGE_SHIFT
        with mm.pt_lock:
            if _populated(mm, vpn, span):
                raise MFillError(errno.EEXIST, f"{dst + done:#x} is already populated", done)
            mm.poison.set_range(vpn, vpn + span)
        done += ps
    return done


def move(mm: MM, dst: int, src: int, length: int, *, allow_src_holes: bool = False) -> int:
    """UFFDIO_MOVE on anonymous memory: move pages from ``src`` to ``dst``."""
    dvma = _range(mm, dst, length)
    svma = mm.vma_for_range(src, src + length)
    if src & (mman.PAGE_SIZE - 1):
        raise OSError(errno.EINVAL, "UFFDIO_MOVE: src not page aligned")
    if dvma.kind != VmaKind.ANON or svma.kind != VmaKind.ANON or dvma.hugetlb or svma.hugetlb:
        raise OSError(errno.EINVAL, "UFFDIO_MOVE needs anonymous memory")
    ps = mman.PAGE_SIZE
    done = 0
    mm.notify_start(src, src + length)
    mm.notify_start(dst, dst + length)
    try:
        while done < length:
            d, s = dst + done, src + done
            dv, sv = d >> PAGE_SHIFT, s >> PAGE_SHIFT
            with mm.pt_lock:
                _still_mapped(mm, dvma, d, ps, done)
                _still_mapped(mm, svma, s, ps, done)
                if mm.present.test(dv):
                    raise MFillError(errno.EEXIST, f"{d:#x} is already populated", done)
                if not mm.present.test(sv):
                    if not allow_src_holes:
                        raise MFillError(errno.ENOENT, f"source {s:#x} is a hole", done)
                else:
                    _write_page(dvma, d, hostmem.read_bytes(s, ps), ps)
                    hostmem.host_madvise(s, ps, mman.MADV_DONTNEED)
                    mm.present.clear(sv)
                    mm.present.set(dv)
                    if mm.wp.test(sv):
                        mm.wp.clear(sv)
            done += ps
    finally:
        mm.notify_end(src, src + done)
        mm.notify_end(dst, dst + done)
    return done


def writeprotect(mm: MM, start: int, length: int, protect: bool, *, only_present: bool = False) -> None:
    """UFFDIO_WRITEPROTECT's page-table part: set or clear the uffd-wp bits of a range.

    ``only_present``: anonymous memory without UFFD_FEATURE_WP_UNPOPULATED
    protects only populated pages.
    """
    s, e = start >> PAGE_SHIFT, (start + length) >> PAGE_SHIFT
    if protect:
        mm.notify_start(start, start + length)
    with mm.pt_lock:
        if not protect:
            mm.wp.clear_range(s, e)
        elif only_present:
            for a, b in mm.present.runs(s, e):
                mm.wp.set_range(a, b)
        else:
            mm.wp.set_range(s, e)
    if protect:
        mm.notify_end(start, start + length)
