"""`MM`: the fake process address space (``struct mm_struct`` + its VMA tree).

Follows ``mm/mmap.c``, ``mm/vma.c``, ``mm/mremap.c``, ``mm/madvise.c`` and
``mm/mprotect.c`` for argument checks, errnos, VMA splitting and merging, and
``include/linux/mmu_notifier.h`` for invalidation callbacks.

* Memory is real host memory inside a PROT_NONE arena (`hostmem.Arena`): a VMA
  is a real ``mmap(MAP_FIXED)`` there, so ``Mapping.address`` is a real address
  shared by the host code and the emulated CPU. Addresses outside the arena are
  not part of the fake process: ``MAP_FIXED`` there fails ``ENOMEM`` (the one
  deliberate deviation: the fake must not clobber the Python process).
* The VMA list is copy-on-write (``self._map = (starts, vmas)``) so lookups on
  the fault path take no lock; mutations hold ``self.lock`` (the mmap_lock).
* Per-page state is in three sparse bitmaps indexed by virtual page number:
  ``present`` (a PTE maps the page), ``wp`` (uffd write-protect) and ``poison``.
  They change under ``self.pt_lock`` (the page-table lock).
* MMU notifiers (``register_notifier``) get ``invalidate_range_start(start,
  end)`` (if they define it) before, and ``invalidate_range(start, end)`` after
  any change that removes or changes a page; both are called with no mm lock
  held. ``invalidate_seq`` counts invalidations (``mmu_invalidate_seq``).

The fault path lives in `fakekvm.fake.mm.fault`, the userfaultfd fill helpers
in `fakekvm.fake.mm.fill`.
"""

from __future__ import annotations

import bisect
import errno
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from fakekvm.abi import mman
from fakekvm.fake.mm import fault as _fault
from fakekvm.fake.mm import hostmem
from fakekvm.fake.mm import ops as _ops
from fakekvm.fake.mm.bitmap import Bitmap
from fakekvm.fake.mm.vma import VMA, VmaKind
from fakekvm.kernel.mapping import Mapping, make_mapping

if TYPE_CHECKING:
    from fakekvm.fake.files import FakeFile
    from fakekvm.fake.memfd import FakeMemfd

PAGE_SHIFT = mman.PAGE_SHIFT
PAGE_SIZE = mman.PAGE_SIZE
HPAGE_SHIFTS = (21, 30)  # the hstates of x86-64: 2 MiB and 1 GiB

#: default size of the fake address space (an unbacked PROT_NONE reservation)
DEFAULT_ARENA = 1 << 39  # 512 GiB

_MAP_KNOWN = (
    mman.MAP_TYPE | mman.MAP_FIXED | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE
    | mman.MAP_POPULATE | mman.MAP_HUGETLB | mman.MAP_FIXED_NOREPLACE
    | (mman.MAP_HUGE_MASK << mman.MAP_HUGE_SHIFT)
    | 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x10000 | 0x20000 | 0x40  # GROWSDOWN..STACK, 32BIT
)
# MAP_SHARED_VALIDATE accepts exactly these (LEGACY_MAP_MASK + SYNC + NOREPLACE ...)
_MAP_VALIDATE_OK = _MAP_KNOWN & ~0x80000  # MAP_SYNC (0x80000) needs DAX: EOPNOTSUPP


class MMUNotifier(Protocol):
    def invalidate_range(self, start: int, end: int) -> None: ...


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, what)


def page_align(n: int, size: int = PAGE_SIZE) -> int:
    return (n + size - 1) & ~(size - 1)


def hugetlb_shift_from_flags(flags: int, what: str) -> int:
    """Page shift named by MAP_HUGE_*/MFD_HUGE_* bits (0 = default 2 MiB); EINVAL if none."""
    log = (flags >> mman.MAP_HUGE_SHIFT) & mman.MAP_HUGE_MASK
    if log == 0:
        return 21
    if log not in HPAGE_SHIFTS:
        raise _einval(f"{what}: no hugetlb page size 2^{log}")
    return log


class MM:
    """The fake address space. See the module docstring."""

    def __init__(self, kernel: Any = None, *, arena_size: int = DEFAULT_ARENA) -> None:
        self.kernel = kernel
        self.arena_size = arena_size
        self._arena: hostmem.Arena | None = None
        self._finalizer: weakref.finalize | None = None
        self.lock = threading.RLock()
        self.pt_lock = threading.Lock()
        self._map: tuple[list[int], list[VMA]] = ([], [])
        self.present = Bitmap()
        self.wp = Bitmap()
        self.poison = Bitmap()
        #: MADV_GUARD_INSTALL markers (access: SIGSEGV)
        self.guard = Bitmap()
        self._notifiers: list[Any] = []
        self.invalidate_seq = 0
        self.closed = False

    # -- arena ------------------------------------------------------------------------
    @property
    def arena(self) -> hostmem.Arena:
        a = self._arena
        if a is None:
            with self.lock:
                if self._arena is None:
                    self._arena = hostmem.Arena(self.arena_size)
                    self._finalizer = weakref.finalize(self, self._arena.close)
                a = self._arena
        return a

    def close(self) -> None:
        """Unmap everything and release the arena (process exit)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            _starts, vmas = self._map
            self._map = ([], [])
            for v in vmas:
                self._drop_vma_ref(v)
            self.present.clear_all()
            self.wp.clear_all()
            self.poison.clear_all()
            if self._finalizer is not None:
                self._finalizer()

    # -- lookup (lock-free) ----------------------------------------------------------------
    def find_vma(self, address: int) -> VMA | None:
        """The VMA containing ``address``, or None."""
        starts, vmas = self._map
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0:
            v = vmas[i]
            if address < v.end:
                return v
        return None

    def vmas(self, start: int = 0, end: int = 1 << 64) -> list[VMA]:
        """VMAs intersecting [start, end), in address order."""
        starts, vmas = self._map
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        out = []
        for v in vmas[i:]:
            if v.start >= end:
                break
            if v.end > start:
                out.append(v)
        return out

    def __iter__(self) -> Iterator[VMA]:
        return iter(self._map[1])

    def vma_for_range(self, start: int, end: int) -> VMA:
        """The single VMA covering all of [start, end); ENOENT otherwise (uffd ioctls' rule)."""
        v = self.find_vma(start)
        if v is None or end > v.end:
            raise OSError(errno.ENOENT, f"range {start:#x}-{end:#x} not inside one VMA")
        return v

    def is_mapped(self, start: int, end: int) -> bool:
        """Is every byte of [start, end) covered by some VMA?"""
        pos = start
        for v in self.vmas(start, end):
            if v.start > pos:
                return False
            pos = v.end
        return pos >= end

    # -- notifiers ---------------------------------------------------------------------------
    def register_notifier(self, obj: Any) -> None:
        """Register an MMU notifier (``invalidate_range`` and optional ``invalidate_range_start``)."""
        with self.lock:
            self._notifiers = [*self._notifiers, obj]

    def unregister_notifier(self, obj: Any) -> None:
        with self.lock:
            self._notifiers = [n for n in self._notifiers if n is not obj]

    def notify_start(self, start: int, end: int) -> None:
        self.invalidate_seq += 1
        for n in self._notifiers:
            f = getattr(n, "invalidate_range_start", None)
            if f is not None:
                f(start, end)

    def notify_end(self, start: int, end: int) -> None:
        self.invalidate_seq += 1
        for n in self._notifiers:
            n.invalidate_range(start, end)

    def invalidated(self, ranges: list[tuple[int, int]]) -> None:
        for s, e in ranges:
            self.notify_end(s, e)

    # -- VMA list mutation (self.lock held) ---------------------------------------------------
    def _set_vmas(self, vmas: list[VMA]) -> None:
        vmas.sort(key=lambda v: v.start)
        self._map = ([v.start for v in vmas], vmas)

    def _take_vma_ref(self, v: VMA) -> None:
        v.mm = self
        if v.file is not None:
            v.file.get()
            v.file.i_mmap.append(v)

    def _drop_vma_ref(self, v: VMA) -> None:
        if v.file is not None:
            try:
                v.file.i_mmap.remove(v)
            except ValueError:
                pass
            v.file.put()

    def _split_at(self, vmas: list[VMA], address: int) -> list[VMA]:
        """Return a VMA list with a boundary at ``address`` (hugetlb: EINVAL if unaligned)."""
        for i, v in enumerate(vmas):
            if v.start < address < v.end:
                if address & (v.page_size - 1):
                    raise _einval(f"split of a hugetlb VMA at unaligned {address:#x}")
                a = v.copy(v.start, address)
                b = v.copy(address, v.end)
                self._take_vma_ref(a)
                self._take_vma_ref(b)
                self._drop_vma_ref(v)
                return [*vmas[:i], a, b, *vmas[i + 1 :]]
        return vmas

    def _check_split(self, address: int) -> None:
        v = self.find_vma(address)
        if v is not None and v.start < address and address & (v.page_size - 1):
            raise _einval(f"split of a hugetlb VMA at unaligned {address:#x}")

    def _isolate(self, start: int, end: int) -> list[VMA]:
        """Split so that [start, end) is made of whole VMAs; return the new full list."""
        self._check_split(start)
        self._check_split(end)
        vmas = list(self._map[1])
        vmas = self._split_at(vmas, start)
        vmas = self._split_at(vmas, end)
        return vmas

    def _merge(self, vmas: list[VMA]) -> list[VMA]:
        """Merge adjacent compatible VMAs (vma_merge)."""
        out: list[VMA] = []
        for v in vmas:
            if out and out[-1].mergeable_with(v):
                prev = out[-1]
                m = prev.copy(prev.start, v.end)
                self._take_vma_ref(m)
                self._drop_vma_ref(prev)
                self._drop_vma_ref(v)
                out[-1] = m
            else:
                out.append(v)
        return out

    def _clear_pages(self, start: int, end: int) -> None:
        s, e = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        with self.pt_lock:
            self.present.clear_range(s, e)
            self.wp.clear_range(s, e)
            self.poison.clear_range(s, e)
            self.guard.clear_range(s, e)

    def _unmap_locked(self, start: int, end: int) -> bool:
        """Remove every VMA piece in [start, end); re-reserve the host range. True if anything went.

        Order matters for lock-free readers: swap the VMA list, clear the page bits
        under ``pt_lock`` (a fault or fill holding it finishes first), and only then
        take the host memory away.
        """
        if not self.vmas(start, end):
            return False
        vmas = self._isolate(start, end)
        keep = []
        gone = []
        for v in vmas:
            if start <= v.start and v.end <= end:
                gone.append(v)
            else:
                keep.append(v)
        self._set_vmas(keep)
        self._clear_pages(start, end)
        for v in gone:
            hostmem.reserve_fixed(v.start, v.length)
            self._drop_vma_ref(v)
        return True

    # -- address allocation -------------------------------------------------------------------
    def _in_arena(self, start: int, end: int) -> bool:
        a = self.arena
        return a.start <= start and end <= a.end and start < end

    def _free(self, start: int, end: int) -> bool:
        return self._in_arena(start, end) and not self.vmas(start, end)

    def get_unmapped_area(self, length: int, align: int = PAGE_SIZE, hint: int = 0) -> int:
        """A free, ``align``-aligned range of ``length`` bytes (top-down, like the kernel)."""
        if hint and not hint & (align - 1) and self._free(hint, hint + length):
            return hint
        a = self.arena
        top = a.end
        for v in reversed(self._map[1]):
            cand = (top - length) & ~(align - 1)
            if cand >= v.end and cand >= a.start:
                return cand
            top = min(top, v.start)
        cand = (top - length) & ~(align - 1)
        if cand >= a.start:
            return cand
        raise OSError(errno.ENOMEM, f"no room for {length:#x} bytes in the fake address space")

    # -- mmap ----------------------------------------------------------------------------------
    def mmap(
        self,
        file: FakeFile | None,
        length: int,
        prot: int,
        flags: int,
        offset: int = 0,
        address: int = 0,
        *,
        host_fd: int = -1,
        fd: int = -1,
    ) -> Mapping:
        """do_mmap: ``file`` None and ``host_fd`` -1 means anonymous (or MAP_ANONYMOUS set)."""
        from fakekvm.fake.memfd import FakeMemfd

        maptype = flags & mman.MAP_TYPE
        if maptype not in (mman.MAP_SHARED, mman.MAP_PRIVATE, mman.MAP_SHARED_VALIDATE):
            raise _einval(f"mmap: bad map type {maptype:#x}")
        if maptype == mman.MAP_SHARED_VALIDATE and flags & ~_MAP_VALIDATE_OK:
            raise OSError(errno.EOPNOTSUPP, f"mmap: MAP_SHARED_VALIDATE with unknown flags {flags:#x}")
        if offset & (PAGE_SIZE - 1) or offset < 0:
            raise _einval(f"mmap: offset {offset:#x} not page aligned")
        if length == 0:
            raise _einval("mmap: length 0")
        shared = maptype != mman.MAP_PRIVATE
        anon = bool(flags & mman.MAP_ANONYMOUS)
        page_shift = PAGE_SHIFT
        if anon:
            file = None
            host_fd = -1
            if flags & mman.MAP_HUGETLB:
                page_shift = hugetlb_shift_from_flags(flags, "mmap")
        else:
            if file is None and host_fd < 0:
                raise OSError(errno.EBADF, "mmap: bad file descriptor")
            if isinstance(file, FakeMemfd) and file.hugetlb:
                page_shift = file.page_shift
            elif flags & mman.MAP_HUGETLB:
                raise _einval("mmap: MAP_HUGETLB on a file that is not hugetlbfs")
        psize = 1 << page_shift
        if page_shift != PAGE_SHIFT and offset & (psize - 1):
            raise _einval(f"mmap: offset {offset:#x} not aligned to the huge page size")
        length = page_align(length, psize)
        if length > self.arena_size:
            raise OSError(errno.ENOMEM, f"mmap: length {length:#x} larger than the fake address space")

        end = address + length
        fixed = bool(flags & (mman.MAP_FIXED | mman.MAP_FIXED_NOREPLACE))
        replace = bool(flags & mman.MAP_FIXED)
        replaced = False
        if fixed:
            if address & (psize - 1):
                raise _einval(f"mmap: MAP_FIXED address {address:#x} not aligned to {psize:#x}")
            if not self._in_arena(address, end):
                raise OSError(
                    errno.ENOMEM,
                    f"mmap: MAP_FIXED {address:#x} is outside the fake address space "
                    f"{self.arena.start:#x}-{self.arena.end:#x}",
                )
            if replace and self.vmas(address, end):
                self.notify_start(address, end)  # outside the lock; the range is the argument
        with self.lock:
            if fixed:
                if self.vmas(address, end):
                    if not replace:
                        raise OSError(errno.EEXIST, f"mmap: MAP_FIXED_NOREPLACE over {address:#x}")
                    self._check_split(address)  # hugetlb neighbours: EINVAL before any change
                    self._check_split(end)
                    replaced = self._unmap_locked(address, end)
            else:
                address = self.get_unmapped_area(length, psize, address & ~(psize - 1))
            vma = self._map_new(file, host_fd, address, length, prot, flags, offset, page_shift, shared, fd)
            vmas = [*self._map[1], vma]
            self._take_vma_ref(vma)
            if anon and shared:
                vma.file.put()  # the internal memfd: the VMA's reference is the only one
            vmas.sort(key=lambda v: v.start)
            self._set_vmas(self._merge(vmas))
        if replaced:
            self.notify_end(address, address + length)
        if flags & mman.MAP_POPULATE:
            self.populate(address, address + length, write=bool(prot & mman.PROT_WRITE))
        return make_mapping(address, length, fd=fd, prot=prot, flags=flags, offset=offset, owner=self.kernel)

    def _map_new(
        self, file: Any, host_fd: int, address: int, length: int, prot: int, flags: int,
        offset: int, page_shift: int, shared: bool, fd: int,
    ) -> VMA:
        """Create the host mapping for a new VMA at ``address`` (a reserved hole)."""
        from fakekvm.fake.memfd import FakeMemfd

        if file is None and host_fd < 0:
            if shared:  # shared anonymous memory is shmem (shmem_zero_setup)
                memfd = FakeMemfd.create_internal("dev/zero", length, page_shift)
                hostmem.map_fd_fixed(address, length, prot, memfd.real_fd, 0, shared=True)
                return VMA(address, address + length, prot, flags, VmaKind.SHMEM,
                           file=memfd, pgoff=0, page_shift=page_shift, shared=True)
            hostmem.map_anon_fixed(address, length, prot)
            return VMA(address, address + length, prot, flags, VmaKind.ANON,
                       pgoff=address >> PAGE_SHIFT, page_shift=page_shift)
        if isinstance(file, FakeMemfd):
            hostmem.map_fd_fixed(address, length, prot, file.real_fd, offset, shared=shared)
            return VMA(address, address + length, prot, flags, VmaKind.SHMEM,
                       file=file, pgoff=offset >> PAGE_SHIFT, page_shift=page_shift, shared=shared)
        if file is not None:
            m = file.mmap(length, prot, flags, offset, address)
            if m.address != address:
                raise OSError(errno.EINVAL, f"{file.kind}: mmap did not map at {address:#x}")
            return VMA(address, address + length, prot, flags, VmaKind.FILE,
                       file=file, pgoff=offset >> PAGE_SHIFT, shared=shared)
        hostmem.map_fd_fixed(address, length, prot, host_fd, offset, shared=shared)
        return VMA(address, address + length, prot, flags, VmaKind.HOST,
                   pgoff=offset >> PAGE_SHIFT, shared=shared)

    # -- munmap -------------------------------------------------------------------------------
    def munmap(self, address: int, length: int) -> None:
        if address & (PAGE_SIZE - 1):
            raise _einval(f"munmap: address {address:#x} not page aligned")
        end = address + page_align(length)
        if end == address:
            raise _einval("munmap: length 0")
        with self.lock:
            if not self.vmas(address, end):
                return
            self._check_split(address)
            self._check_split(end)
        self.notify_start(address, end)
        with self.lock:
            self._unmap_locked(address, end)
        self.notify_end(address, end)

    # -- mprotect -------------------------------------------------------------------------------
    def mprotect(self, address: int, length: int, prot: int) -> None:
        """mprotect(2): ENOMEM if part of the range is unmapped."""
        if address & (PAGE_SIZE - 1):
            raise _einval("mprotect: address not page aligned")
        if prot & ~(mman.PROT_READ | mman.PROT_WRITE | mman.PROT_EXEC | 0x01000000 | 0x02000000):
            raise _einval(f"mprotect: bad prot {prot:#x}")
        end = address + page_align(length)
        if end == address:
            return
        with self.lock:
            if not self.is_mapped(address, end):
                raise OSError(errno.ENOMEM, "mprotect: range not fully mapped")
            vmas = self._isolate(address, end)
            for v in vmas:
                if address <= v.start and v.end <= end:
                    hostmem.host_mprotect(v.start, v.length, prot)
                    v.prot = prot
            self._set_vmas(self._merge(vmas))

    # -- userfaultfd registration (brief G decides the rules; this does the splitting) ----------
    def register_range(self, start: int, end: int, ctx: Any, mode: int) -> None:
        """Set ``uffd_ctx``/``uffd_flags`` on [start, end), splitting and merging VMAs."""
        with self.lock:
            vmas = self._isolate(start, end)
            for v in vmas:
                if start <= v.start and v.end <= end:
                    v.uffd_ctx = ctx
                    v.uffd_flags = mode
            self._set_vmas(self._merge(vmas))

    def unregister_range(self, start: int, end: int) -> None:
        """Clear the userfaultfd registration of [start, end) (and its wp bits), merging VMAs."""
        with self.lock:
            vmas = self._isolate(start, end)
            for v in vmas:
                if start <= v.start and v.end <= end:
                    v.uffd_ctx = None
                    v.uffd_flags = 0
            self._set_vmas(self._merge(vmas))
            with self.pt_lock:
                self.wp.clear_range(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def unregister_ctx(self, ctx: Any) -> None:
        """Drop every registration of ``ctx`` (the userfaultfd is released)."""
        with self.lock:
            vmas = list(self._map[1])
            for v in vmas:
                if v.uffd_ctx is ctx:
                    v.uffd_ctx = None
                    v.uffd_flags = 0
                    with self.pt_lock:
                        self.wp.clear_range(v.start >> PAGE_SHIFT, v.end >> PAGE_SHIFT)
            self._set_vmas(self._merge(vmas))

    # -- per-page state helpers -----------------------------------------------------------------
    def set_present(self, start: int, end: int) -> None:
        with self.pt_lock:
            self.present.set_range(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def is_present(self, address: int) -> bool:
        return self.present.test(address >> PAGE_SHIFT)

    def metadata_bytes(self) -> int:
        """Memory used by per-page state and VMA bookkeeping (a measure, not exact)."""
        import sys

        n = self.present.nbytes() + self.wp.nbytes() + self.poison.nbytes()
        n += sum(sys.getsizeof(v) for v in self._map[1]) + sys.getsizeof(self._map[0]) * 2
        return n

    # -- the fault path (fault.py) and mremap/madvise (ops.py), as methods -----------------------
    fault = _fault.fault
    touch = _fault.touch
    read = _fault.read
    write = _fault.write
    populate = _fault.populate
    mremap = _ops.mremap
    madvise = _ops.madvise


def invalidate_file_range(file: FakeFile | FakeMemfd, pgoff_start: int, pgoff_end: int) -> None:
    """Zap every user mapping of file pages [pgoff_start, pgoff_end) (unmap_mapping_range).

    Clears the ``present`` bits of the mapped pages in every mm mapping the file
    and calls those mms' notifiers. The caller changes the file's pages.
    """
    work: list[tuple[MM, int, int]] = []
    for v in list(file.i_mmap):
        vs, ve = v.pgoff, v.pgoff + (v.length >> PAGE_SHIFT)
        s, e = max(vs, pgoff_start), min(ve, pgoff_end)
        if s < e:
            work.append((v.mm, v.start + ((s - vs) << PAGE_SHIFT), v.start + ((e - vs) << PAGE_SHIFT)))
    for mm, a, b in work:
        mm.notify_start(a, b)
        with mm.pt_lock:
            mm.present.clear_range(a >> PAGE_SHIFT, b >> PAGE_SHIFT)
        mm.notify_end(a, b)


NotifierCallback = Callable[[int, int], None]
