"""Non-cooperative userfaultfd events raised by changes to the fake mm (REMOVE, UNMAP, REMAP).

Follows ``fs/userfaultfd.c``: ``userfaultfd_remove`` (MADV_DONTNEED/DONTNEED_LOCKED/FREE/REMOVE:
one REMOVE per registered VMA, clipped to it, raised *before* the pages go),
``userfaultfd_unmap_prep``/``_complete`` (munmap: one UNMAP per context with the munmap's own
start/end, raised after the unmap) and ``mremap_userfaultfd_prep``/``_complete`` (a moved
registered VMA: REMAP {from, to, len}; measured on 6.18: an UNMAP of the old range follows when
the context also has EVENT_UNMAP). The raising thread sleeps until the monitor has read the
event (`UserfaultfdFile.raise_event`), and resolution ioctls fail EAGAIN meanwhile.

E1's mm has no event hooks, so `install` wraps the mm's ``madvise``/``munmap``/``mremap`` on the
instance (the gap is named in brief G's report). Contexts are found through ``vma.uffd_ctx``.
"""

from __future__ import annotations

from typing import Any

from fakekvm.abi import mman
from fakekvm.fake.uffd import _uapi as U

_REMOVE_ADVICE = frozenset((mman.MADV_DONTNEED, 24, mman.MADV_FREE, mman.MADV_REMOVE))
PAGE_SIZE = mman.PAGE_SIZE


def _end(start: int, length: int) -> int:
    return start + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))


def install(mm: Any) -> None:
    """Wrap ``mm.madvise``, ``mm.munmap`` and ``mm.mremap`` so they raise userfaultfd events."""
    if getattr(mm, "_uffd_events", False):
        return
    orig_madvise, orig_munmap, orig_mremap = mm.madvise, mm.munmap, mm.mremap

    def madvise(start: int, length: int, advice: int) -> None:
        if advice in _REMOVE_ADVICE and not start & (PAGE_SIZE - 1):
            end = _end(start, length)
            for v in mm.vmas(start, end):
                ctx = v.uffd_ctx
                if ctx is not None and ctx.state.features & U.UFFD_FEATURE_EVENT_REMOVE:
                    ctx.event_remove(max(start, v.start), min(end, v.end))
        orig_madvise(start, length, advice)

    def munmap(address: int, length: int) -> None:
        ctxs: list[Any] = []
        if not address & (PAGE_SIZE - 1) and length:
            for v in mm.vmas(address, _end(address, length)):
                ctx = v.uffd_ctx
                if ctx is not None and ctx.state.features & U.UFFD_FEATURE_EVENT_UNMAP and ctx not in ctxs:
                    ctxs.append(ctx)
        orig_munmap(address, length)
        for ctx in ctxs:
            ctx.event_unmap(address, _end(address, length))

    def mremap(old: int, old_len: int, new_len: int, flags: int, new: int = 0) -> int:
        v = mm.find_vma(old)
        ctx = v.uffd_ctx if v is not None else None
        res: int = orig_mremap(old, old_len, new_len, flags, new)
        if ctx is not None and res != old:
            ctx.event_remap(old, res, old_len)
            if not flags & mman.MREMAP_DONTUNMAP:
                ctx.event_unmap(old, _end(old, old_len))
        return res

    mm.madvise, mm.munmap, mm.mremap = madvise, munmap, mremap
    mm._uffd_events = True
