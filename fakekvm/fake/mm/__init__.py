"""The fake process address space: VMAs over real host memory, per-page bitmaps.

Public API (see each module's docstring for the kernel code it follows):

* `MM` (core): ``mmap``/``munmap``/``mremap``/``madvise``/``mprotect``,
  ``find_vma``, ``vmas``, ``vma_for_range``, ``register_range``/
  ``unregister_range``/``unregister_ctx`` (userfaultfd registration),
  ``register_notifier`` (MMU notifiers), bitmaps ``present``/``wp``/``poison``/
  ``guard`` by virtual page number, and from `fault`: ``fault``, ``touch``,
  ``read``, ``write``, ``populate``;
* `fill`: the userfaultfd page helpers (copy, zeropage, cont, poison, move,
  writeprotect) and `MFillError`;
* `hostmem`: ``safe_copy_from``/``safe_copy_to`` and host mapping helpers for
  ``FakeFile.mmap`` implementations (``map_fd_fixed``, ``map_anon_fixed``);
* `invalidate_file_range`: zap the user mappings of a file range;
* `Bitmap`, `VMA`, `VmaKind`, `FaultResult`, `Faulter`.
"""

from __future__ import annotations

from fakekvm.fake.mm import fill
from fakekvm.fake.mm.bitmap import Bitmap
from fakekvm.fake.mm.core import MM, invalidate_file_range
from fakekvm.fake.mm.fault import (
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
    Faulter,
    FaultResult,
)
from fakekvm.fake.mm.fill import MFillError
from fakekvm.fake.mm.hostmem import safe_copy_from, safe_copy_to
from fakekvm.fake.mm.vma import VM_UFFD_MINOR, VM_UFFD_MISSING, VM_UFFD_WP, VMA, VmaKind

__all__ = [
    "MM",
    "UFFD_PAGEFAULT_FLAG_MINOR",
    "UFFD_PAGEFAULT_FLAG_WP",
    "UFFD_PAGEFAULT_FLAG_WRITE",
    "VMA",
    "VM_UFFD_MINOR",
    "VM_UFFD_MISSING",
    "VM_UFFD_WP",
    "Bitmap",
    "FaultResult",
    "Faulter",
    "MFillError",
    "VmaKind",
    "fill",
    "invalidate_file_range",
    "safe_copy_from",
    "safe_copy_to",
]
