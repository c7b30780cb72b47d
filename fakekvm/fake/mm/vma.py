"""`VMA`: one virtual memory area of the fake process (``struct vm_area_struct``).

Follows ``include/linux/mm_types.h``: a VMA covers [start, end) with one
protection, one backing (anonymous, shmem/memfd, another fake file, or a real
host fd) and a file page offset (``vm_pgoff``, in 4 KiB pages). ``page_shift``
is 12, or 21/30 for hugetlb VMAs (``vma_kernel_pagesize``). ``uffd_ctx`` and
``uffd_flags`` are ``vm_userfaultfd_ctx`` and the ``VM_UFFD_MISSING``/``WP``/
``MINOR`` bits, which use the ``UFFDIO_REGISTER_MODE_*`` values here.

Per-page state is NOT here: it lives in the mm's bitmaps indexed by virtual page
number (like PTE bits), so splitting a VMA copies no per-page data.
"""

from __future__ import annotations

import enum
from typing import Any

from fakekvm.abi import mman

#: vma.uffd_flags bits (same values as UFFDIO_REGISTER_MODE_MISSING/WP/MINOR)
VM_UFFD_MISSING = 1 << 0
VM_UFFD_WP = 1 << 1
VM_UFFD_MINOR = 1 << 2


class VmaKind(enum.IntEnum):
    ANON = 0  # private anonymous memory (anon_vma)
    SHMEM = 1  # a fake memfd, or shared anonymous memory (an internal memfd)
    FILE = 2  # another FakeFile's own mmap (kvm_run, guest_memfd, ...)
    HOST = 3  # a real host fd mapped through the fake (forwarded)


class VMA:
    __slots__ = (
        "end",
        "file",
        "flags",
        "kind",
        "mm",
        "page_shift",
        "pgoff",
        "prot",
        "shared",
        "start",
        "uffd_ctx",
        "uffd_flags",
    )

    def __init__(
        self,
        start: int,
        end: int,
        prot: int,
        flags: int,
        kind: VmaKind,
        *,
        file: Any = None,
        pgoff: int = 0,
        page_shift: int = mman.PAGE_SHIFT,
        shared: bool = False,
    ) -> None:
        self.start = start
        self.end = end
        self.prot = prot
        #: the mmap flags it was created with (MAP_SHARED/PRIVATE/ANONYMOUS/HUGETLB/...)
        self.flags = flags
        self.kind = kind
        #: FakeFile backing it (FakeMemfd for SHMEM), holding one reference; None for ANON/HOST
        self.file = file
        #: file offset of ``start`` in 4 KiB pages (vm_pgoff)
        self.pgoff = pgoff
        self.page_shift = page_shift
        #: MAP_SHARED semantics (writes reach the file / other mappings)
        self.shared = shared
        #: userfaultfd context registered on this range, or None (brief G fills its behaviour)
        self.uffd_ctx: Any = None
        self.uffd_flags = 0
        #: the MM this VMA belongs to (set when inserted)
        self.mm: Any = None

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def hugetlb(self) -> bool:
        return self.page_shift > mman.PAGE_SHIFT

    @property
    def length(self) -> int:
        return self.end - self.start

    def pgoff_of(self, address: int) -> int:
        """File page (4 KiB units) that ``address`` maps."""
        return self.pgoff + ((address - self.start) >> mman.PAGE_SHIFT)

    def copy(self, start: int, end: int) -> VMA:
        """A VMA with the same attributes over [start, end) (pgoff adjusted)."""
        v = VMA(
            start, end, self.prot, self.flags, self.kind,
            file=self.file, pgoff=self.pgoff_of(start), page_shift=self.page_shift,
            shared=self.shared,
        )
        v.uffd_ctx = self.uffd_ctx
        v.uffd_flags = self.uffd_flags
        v.mm = self.mm
        return v

    def mergeable_with(self, nxt: VMA) -> bool:
        """Can ``nxt`` (starting at self.end) be merged into self? (vma_merge's test)."""
        return (
            self.end == nxt.start
            and self.kind == nxt.kind
            and self.kind in (VmaKind.ANON, VmaKind.SHMEM)
            and self.prot == nxt.prot
            and self.shared == nxt.shared
            and self.page_shift == nxt.page_shift
            and self.file is nxt.file
            and self.pgoff_of(self.end) == nxt.pgoff
            and self.uffd_ctx is nxt.uffd_ctx
            and self.uffd_flags == nxt.uffd_flags
            and (self.flags & mman.MAP_HUGETLB) == (nxt.flags & mman.MAP_HUGETLB)
        )

    def __repr__(self) -> str:
        f = f" file={self.file!r}" if self.file is not None else ""
        u = f" uffd={self.uffd_flags}" if self.uffd_ctx is not None else ""
        return (
            f"<VMA {self.start:#x}-{self.end:#x} {self.kind.name} prot={self.prot} "
            f"pgoff={self.pgoff:#x} ps={self.page_size:#x}{f}{u}>"
        )
