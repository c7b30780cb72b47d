"""guest_memfd: the file ``KVM_CREATE_GUEST_MEMFD`` returns (``anon_inode:[kvm-gmem]``).

Follows ``virt/kvm/guest_memfd.c`` of Linux 6.18 (``kvm_gmem_create``,
``kvm_gmem_fallocate``, ``kvm_gmem_punch_hole``, ``kvm_gmem_allocate``,
``kvm_gmem_mmap``, ``kvm_gmem_fault_user_mapping``, ``kvm_gmem_bind``,
``kvm_gmem_get_pfn``), ``fs/open.c`` ``vfs_fallocate`` for the checks made before
the file sees a fallocate, and ``Documentation/virt/kvm/api.rst`` §4.142. Every
errno was measured on the live 6.18 host (``/work/shared/reference/uapi.md`` §4
and ``tests/gmem/test_gmem_file.py``, which runs the same table on both kernels):

=====================================================  ===========================
unknown flag, size 0 / unaligned / negative (loff_t)   EINVAL (at create)
nonzero ``reserved[]``                                 accepted (not checked)
read(), write()                                        EINVAL (no read/write op)
pread(), pwrite(), lseek()                             ESPIPE (no FMODE_PREAD/LSEEK)
ftruncate()                                            EINVAL (kvm_gmem_setattr)
fstat()                                                st_size = size, mode 0100600,
                                                       st_blocks 0, st_blksize 4096
mmap without GUEST_MEMFD_FLAG_MMAP                     ENODEV
mmap MAP_PRIVATE                                       EINVAL
mmap with PROT_EXEC                                    EPERM (the gmem mount is noexec)
fallocate offset < 0 or len <= 0                       EINVAL (vfs)
fallocate unknown bits / bad mode combination          EOPNOTSUPP (vfs)
fallocate offset + len overflows                       EFBIG (vfs)
fallocate without KEEP_SIZE, or other modes            EOPNOTSUPP (gmem)
fallocate unaligned offset or len                      EINVAL (gmem)
fallocate KEEP_SIZE beyond / straddling EOF            EINVAL (kvm_gmem_allocate)
fallocate PUNCH_HOLE|KEEP_SIZE, even beyond EOF        OK
=====================================================  ===========================

Backing. The pages are REAL shared memory: a real memfd (``real_fd``) of the
file's size. A host ``mmap`` of the gmem maps the real memfd ``MAP_SHARED`` at
the address the fake mm chose, and every memslot binding gets its own internal
``MAP_SHARED`` window over the bound file range (`Binding.kaddr`, the fake's
"direct map" of the gmem folios) that the vCPU uses for accesses served from
guest_memfd. So a host mmap and the guest see the same bytes, PUNCH_HOLE
(a real punch on the memfd) zeroes every view, and a 64 GiB file costs only
the pages touched. ``allocated`` is a per-page `Bitmap` of the pages KVM itself
populated (fallocate, guest faults through `GuestMemfd.get_pfn`); pages written
through a host mmap are visible through `GuestMemfd.is_allocated`, which also
asks the real memfd (``SEEK_DATA``).

Private memory. Without ``GUEST_MEMFD_FLAG_INIT_SHARED`` the memory is private:
a host fault on it is ``SIGBUS`` (6.18 ``kvm_gmem_fault_user_mapping``). The
fake maps an empty real memfd there, so a real access really gets SIGBUS, and
``vm_fault`` answers ``VM_FAULT_SIGBUS`` to the fake mm's fault path.

Bindings. A file range may be bound to at most one memslot (``bind`` raises
EINVAL on overlap); the binding records slot <-> file range. PUNCH_HOLE
invalidates the guest mappings of every bound gfn in the range (the VM's
vCPUs drop their translations) and every host mapping (the fake mm's
``invalidate_file_range``, which runs the MMU notifiers).

Population for post-copy. ``pwrite`` is ESPIPE and ``write`` EINVAL on 6.18, so
the engine fills private pages through a host mmap of the gmem where the file
allows one (``MMAP|INIT_SHARED``), or through ``populate`` (kernel-side, for
tests). The AWS ``write()`` population series (Kalyazin, "KVM: guest_memfd: add
generic population via write", v5-v7, not merged) is a profile option OFF by
default (``Profile.gmem_write_population``): when on, ``pwrite``/``write`` of
page-aligned ranges inside the file populate shared pages.

Lifetime deviations: the real gmem holds a VM reference and a memslot does not
hold the file (``kvm_gmem_release`` unbinds). The fake's VM makes the slot hold
the file, so the gmem does NOT hold the VM (that would be a reference cycle);
closing the last gmem fd of a bound file keeps it alive until the slot goes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fakekvm.abi import mman
from fakekvm.fake.files import VM_FAULT_OK, VM_FAULT_SIGBUS, FakeFile
from fakekvm.fake.mm import hostmem
from fakekvm.fake.mm.bitmap import Bitmap
from fakekvm.kernel.mapping import make_mapping
from fakekvm.kernel.real import _libc

if TYPE_CHECKING:
    from fakekvm.kernel.mapping import Mapping
    from fakekvm.kernel.seam import IoctlArg

PAGE_SHIFT = mman.PAGE_SHIFT
PAGE_SIZE = mman.PAGE_SIZE

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

#: include/uapi/linux/falloc.h FALLOC_FL_MODE_MASK (6.17+: with WRITE_ZEROES 0x80)
FALLOC_FL_ALLOCATE_RANGE = 0x00
FALLOC_FL_WRITE_ZEROES = 0x80
FALLOC_FL_MODE_MASK = (
    mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_COLLAPSE_RANGE | mman.FALLOC_FL_ZERO_RANGE
    | mman.FALLOC_FL_INSERT_RANGE | mman.FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_WRITE_ZEROES
)
#: MAX_LFS_FILESIZE: s_maxbytes of the gmem pseudo filesystem
MAX_LFS_FILESIZE = (1 << 63) - 1
S_IFREG = 0o100000

_ino_lock = threading.Lock()
_next_ino = [0x40000000]


def _new_ino() -> int:
    with _ino_lock:
        _next_ino[0] += 1
        return _next_ino[0]


def _real_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"guest_memfd backing fallocate: {os.strerror(e)}")


_sigbus_fd: list[int] = []


def _sigbus_memfd() -> int:
    """An empty real memfd: mapping it MAP_SHARED makes every access SIGBUS (beyond EOF)."""
    if not _sigbus_fd:
        _sigbus_fd.append(os.memfd_create("fakekvm-gmem-private", mman.MFD_CLOEXEC))
    return _sigbus_fd[0]


@dataclass(slots=True)
class Binding:
    """One memslot bound to file pages [start, end) (``slot->gmem.pgoff`` + npages)."""

    slot: Any  # fakekvm.fake.kvm.memslots.Memslot
    start: int  # first file page
    end: int  # one past the last file page
    kaddr: int  # host address of file page ``start`` in the fake's internal window

    def hva_of_pgoff(self, pgoff: int) -> int:
        return self.kaddr + ((pgoff - self.start) << PAGE_SHIFT)


class GuestMemfd(FakeFile):
    """One guest_memfd file. ``vm`` is the VM that created it (``kvm_gmem->kvm``)."""

    kind = "guest_memfd"

    def __init__(self, vm: Any, size: int, flags: int, *, write_population: bool = False) -> None:
        super().__init__()
        self.vm = vm
        self.size = size
        self.gmem_flags = flags
        self.f_flags = mman.O_RDWR
        self.write_population = write_population
        self.real_fd = os.memfd_create("fakekvm-gmem", mman.MFD_CLOEXEC)
        try:
            os.ftruncate(self.real_fd, size)
        except OSError:
            os.close(self.real_fd)
            raise
        #: pages KVM populated (fallocate, guest faults); host-mmap writes: see is_allocated
        self.allocated = Bitmap()
        #: bound memslots, by first file page
        self.bindings: list[Binding] = []
        self.lock = threading.Lock()
        self.ino = _new_ino()
        self._ctime = time.time_ns()
        self._pos = 0
        self._released = False

    # -- properties of the file --------------------------------------------------------------------
    @property
    def mmap_allowed(self) -> bool:
        return bool(self.gmem_flags & GUEST_MEMFD_FLAG_MMAP)

    @property
    def init_shared(self) -> bool:
        """Host faults allowed (all memory shared at creation)."""
        return bool(self.gmem_flags & GUEST_MEMFD_FLAG_INIT_SHARED)

    @property
    def npages(self) -> int:
        return (self.size + PAGE_SIZE - 1) >> PAGE_SHIFT

    def __repr__(self) -> str:
        return f"<GuestMemfd size={self.size:#x} flags={self.gmem_flags:#x} bindings={len(self.bindings)}>"

    # -- lifetime ----------------------------------------------------------------------------------
    def release(self) -> None:
        with self.lock:
            self._released = True
            bindings, self.bindings = self.bindings, []
        for b in bindings:
            hostmem.host_munmap(b.kaddr, (b.end - b.start) << PAGE_SHIFT)
        os.close(self.real_fd)
        self.real_fd = -1

    # -- file operations ---------------------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        raise OSError(errno.ENOTTY, f"guest_memfd: inappropriate ioctl {request:#x}")

    def read(self, n: int) -> bytes:
        raise OSError(errno.EINVAL, "guest_memfd: read not supported")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if not self.write_population:
            raise OSError(errno.EINVAL, "guest_memfd: write not supported")
        n = self._populate_write(data, self._pos, "write")
        self._pos += n
        return n

    def pread(self, n: int, offset: int) -> bytes:
        raise OSError(errno.ESPIPE, "guest_memfd: pread not supported")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        if not self.write_population:
            raise OSError(errno.ESPIPE, "guest_memfd: pwrite not supported")
        return self._populate_write(data, offset, "pwrite")

    def lseek(self, pos: int, how: int) -> int:
        if not self.write_population:
            raise OSError(errno.ESPIPE, "guest_memfd: lseek not supported")
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}.get(how)
        if base is None or base + pos < 0:
            raise OSError(errno.EINVAL, "guest_memfd: lseek")
        self._pos = base + pos
        return self._pos

    def fstat(self) -> os.stat_result:
        t = self._ctime
        s = t // 1_000_000_000
        return os.stat_result(
            (S_IFREG | 0o600, self.ino, 0, 1, os.geteuid(), os.getegid(), self.size, s, s, s),
            {
                "st_atime": t / 1e9, "st_mtime": t / 1e9, "st_ctime": t / 1e9,
                "st_atime_ns": t, "st_mtime_ns": t, "st_ctime_ns": t,
                "st_blksize": PAGE_SIZE, "st_blocks": 0, "st_rdev": 0,
            },
        )

    def ftruncate(self, length: int) -> None:
        raise OSError(errno.EINVAL, "guest_memfd: ftruncate not supported (the size is fixed)")

    def poll(self) -> int:
        # DEFAULT_POLLMASK: the file has no ->poll
        return mman.POLLIN | mman.POLLOUT | mman.POLLRDNORM | mman.POLLWRNORM

    # -- fallocate ---------------------------------------------------------------------------------
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        check_fallocate(mode, offset, length)
        if mode & mman.FALLOC_FL_PUNCH_HOLE:
            self.punch_hole(offset, length)
        else:
            self.allocate(offset, length)

    def allocate(self, offset: int, length: int) -> None:
        """kvm_gmem_allocate: EINVAL beyond EOF; otherwise the pages exist afterwards."""
        if offset + length > self.size:
            raise OSError(errno.EINVAL, "fallocate: guest_memfd range beyond the end of the file")
        _real_fallocate(self.real_fd, mman.FALLOC_FL_KEEP_SIZE, offset, length)
        self.allocated.set_range(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT)

    def punch_hole(self, offset: int, length: int) -> None:
        """kvm_gmem_punch_hole: free the pages, zap guest and host mappings (OK beyond EOF)."""
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if offset < self.size:
            _real_fallocate(
                self.real_fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE,
                offset, min(length, self.size - offset),
            )
        end = min(end, self.npages)
        if start >= end:
            return
        self.allocated.clear_range(start, end)
        self._invalidate_guest(start, end)
        from fakekvm.fake.mm.core import invalidate_file_range

        invalidate_file_range(self, start, end)

    def _invalidate_guest(self, start: int, end: int) -> None:
        """kvm_gmem_invalidate_begin: drop the vCPU translations of bound gfns in [start, end)."""
        with self.lock:
            work = [(b.slot, max(b.start, start), min(b.end, end)) for b in self.bindings
                    if b.start < end and start < b.end]
        for slot, a, b in work:
            base = slot.base_gfn - (slot.guest_memfd_offset >> PAGE_SHIFT)
            invalidate_guest(self.vm, (base + a) << PAGE_SHIFT, (base + b) << PAGE_SHIFT)

    # -- mmap ----------------------------------------------------------------------------------------
    def mmap(self, length: int, prot: int, flags: int, offset: int, address: int) -> Mapping:
        """kvm_gmem_mmap (after the fake mm's generic checks); the memory goes at ``address``."""
        if prot & mman.PROT_EXEC:
            raise OSError(errno.EPERM, "mmap: guest_memfd lives on a noexec mount")
        if not self.mmap_allowed:
            raise OSError(errno.ENODEV, "mmap: guest_memfd created without GUEST_MEMFD_FLAG_MMAP")
        if flags & mman.MAP_TYPE == mman.MAP_PRIVATE:
            raise OSError(errno.EINVAL, "mmap: guest_memfd supports only MAP_SHARED")
        fd = self.real_fd if self.init_shared else _sigbus_memfd()
        hostmem.map_fd_fixed(address, length, prot, fd, offset, shared=True)
        return make_mapping(address, length, prot=prot, flags=flags, offset=offset, owner=self)

    def vm_fault(self, vma: Any, pgoff: int, write: bool) -> int:
        """kvm_gmem_fault_user_mapping: SIGBUS beyond EOF and for private (not INIT_SHARED) memory."""
        if pgoff >= self.npages or not self.init_shared:
            return VM_FAULT_SIGBUS
        self.allocated.set(pgoff)
        return VM_FAULT_OK

    # -- the KVM side: bindings and pfns ---------------------------------------------------------------
    def bind(self, slot: Any, start: int, end: int) -> None:
        """kvm_gmem_bind: EINVAL if any page of [start, end) is already bound or past EOF."""
        if end > self.npages or start >= end:
            raise OSError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2: guest_memfd range beyond EOF")
        with self.lock:
            for b in self.bindings:
                if b.start < end and start < b.end:
                    raise OSError(
                        errno.EINVAL,
                        "KVM_SET_USER_MEMORY_REGION2: guest_memfd range already bound to a memslot",
                    )
            n = (end - start) << PAGE_SHIFT
            kaddr = hostmem.host_mmap(
                0, n, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED | mman.MAP_NORESERVE,
                self.real_fd, start << PAGE_SHIFT,
            )
            self.bindings.append(Binding(slot, start, end, kaddr))
            self.bindings.sort(key=lambda x: x.start)

    def unbind(self, slot: Any) -> None:
        """kvm_gmem_unbind: forget the slot's binding (no-op if it has none)."""
        with self.lock:
            keep: list[Binding] = []
            gone: list[Binding] = []
            for b in self.bindings:
                (gone if b.slot is slot else keep).append(b)
            self.bindings = keep
        for b in gone:
            hostmem.host_munmap(b.kaddr, (b.end - b.start) << PAGE_SHIFT)

    def binding_of(self, slot: Any) -> Binding | None:
        for b in self.bindings:
            if b.slot is slot:
                return b
        return None

    def pgoff_of(self, slot: Any, gfn: int) -> int:
        """File page that backs ``gfn`` of ``slot`` (kvm_gmem_get_index)."""
        return (gfn - slot.base_gfn) + (slot.guest_memfd_offset >> PAGE_SHIFT)

    def get_pfn(self, slot: Any, gfn: int) -> int:
        """kvm_gmem_get_pfn: host address of the page backing ``gfn`` (allocating it).

        EFAULT if the slot is not bound to this file (``kvm_gmem_get_file`` fails
        after the gmem was released) -- the caller turns that into a memory fault.
        """
        b = self.binding_of(slot)
        if b is None or self._released:
            raise OSError(errno.EFAULT, "guest_memfd: slot not bound")
        pgoff = self.pgoff_of(slot, gfn)
        if not b.start <= pgoff < b.end:
            raise OSError(errno.EFAULT, f"guest_memfd: gfn {gfn:#x} outside the binding")
        self.allocated.set(pgoff)
        return b.hva_of_pgoff(pgoff)

    # -- page-cache state ----------------------------------------------------------------------------
    def is_allocated(self, pgoff: int) -> bool:
        """Is file page ``pgoff`` allocated (by KVM, fallocate, or a write through a host mmap)?"""
        if self.allocated.test(pgoff):
            return True
        off = pgoff << PAGE_SHIFT
        try:
            return os.lseek(self.real_fd, off, os.SEEK_DATA) == off
        except OSError as e:
            if e.errno == errno.ENXIO:
                return False
            raise

    def populate(self, pgoff: int, data: bytes | bytearray | memoryview) -> None:
        """Kernel-side fill of whole page(s) at ``pgoff`` (tests, and the AWS write() path)."""
        n = len(data)
        if pgoff << PAGE_SHIFT >= self.size or n & (PAGE_SIZE - 1):
            raise OSError(errno.EINVAL, "guest_memfd populate: bad range")
        os.pwrite(self.real_fd, data, pgoff << PAGE_SHIFT)
        self.allocated.set_range(pgoff, pgoff + (n >> PAGE_SHIFT))

    def _populate_write(self, data: bytes | bytearray | memoryview, offset: int, what: str) -> int:
        n = memoryview(data).nbytes
        if offset & (PAGE_SIZE - 1) or n & (PAGE_SIZE - 1):
            raise OSError(errno.EINVAL, f"guest_memfd {what}: offset and length must be page aligned")
        if not self.init_shared:
            raise OSError(errno.EINVAL, f"guest_memfd {what}: only shared memory can be written")
        if offset >= self.size:
            raise OSError(errno.ENOSPC, f"guest_memfd {what}: beyond the end of the file")
        n = min(n, self.size - offset)
        self.populate(offset >> PAGE_SHIFT, memoryview(data)[:n])
        return n


def check_fallocate(mode: int, offset: int, length: int) -> None:
    """vfs_fallocate's checks, then kvm_gmem_fallocate's, in the kernel's order."""
    if offset < 0 or length <= 0:
        raise OSError(errno.EINVAL, "fallocate: bad offset or length")
    if mode & ~(FALLOC_FL_MODE_MASK | mman.FALLOC_FL_KEEP_SIZE):
        raise OSError(errno.EOPNOTSUPP, f"fallocate: unknown mode bits {mode:#x}")
    m = mode & FALLOC_FL_MODE_MASK
    keep = mode & mman.FALLOC_FL_KEEP_SIZE
    if m in (FALLOC_FL_ALLOCATE_RANGE, mman.FALLOC_FL_UNSHARE_RANGE, mman.FALLOC_FL_ZERO_RANGE):
        pass
    elif m == mman.FALLOC_FL_PUNCH_HOLE:
        if not keep:
            raise OSError(errno.EOPNOTSUPP, "fallocate: PUNCH_HOLE needs KEEP_SIZE")
    elif m in (mman.FALLOC_FL_COLLAPSE_RANGE, mman.FALLOC_FL_INSERT_RANGE, FALLOC_FL_WRITE_ZEROES):
        if keep:
            raise OSError(errno.EOPNOTSUPP, f"fallocate: mode {mode:#x} with KEEP_SIZE")
    else:
        raise OSError(errno.EOPNOTSUPP, f"fallocate: modes are exclusive ({mode:#x})")
    if offset + length > MAX_LFS_FILESIZE:
        raise OSError(errno.EFBIG, "fallocate: offset + len overflows")
    # kvm_gmem_fallocate
    if not keep:
        raise OSError(errno.EOPNOTSUPP, "fallocate: guest_memfd needs FALLOC_FL_KEEP_SIZE")
    if mode & ~(mman.FALLOC_FL_KEEP_SIZE | mman.FALLOC_FL_PUNCH_HOLE):
        raise OSError(errno.EOPNOTSUPP, f"fallocate: mode {mode:#x} not supported by guest_memfd")
    if offset & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1):
        raise OSError(errno.EINVAL, "fallocate: guest_memfd offset and len must be page aligned")


def invalidate_guest(vm: Any, gpa_start: int, gpa_end: int) -> None:
    """Make every vCPU of ``vm`` drop its translations of [gpa_start, gpa_end)."""
    inv = getattr(vm, "invalidate_gpa_range", None) or getattr(vm, "_invalidate", None)
    if inv is not None:
        inv(gpa_start, gpa_end)
        return
    for v in list(getattr(vm, "vcpus", {}).values()):
        v.invalidate(gpa_start, gpa_end)


def supported_flags(vm: Any) -> int:
    """KVM_CAP_GUEST_MEMFD_FLAGS of the VM (kvm_gmem_get_supported_flags)."""
    f = getattr(vm, "gmem_flags", None)
    if f is not None:
        return int(f)
    return int(vm.profile.gmem_flags(vm.vm_type))


def create_file(vm: Any, size: int, flags: int) -> GuestMemfd:
    """kvm_gmem_create: validate and build the file (the caller installs the fd)."""
    if flags & ~supported_flags(vm):
        raise OSError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: flags {flags:#x} not supported")
    if size <= 0 or size > MAX_LFS_FILESIZE or size & (PAGE_SIZE - 1):
        raise OSError(errno.EINVAL, f"KVM_CREATE_GUEST_MEMFD: size {size:#x}")
    profile = getattr(vm, "profile", None)
    wp = bool(getattr(profile, "gmem_write_population", False))
    f = GuestMemfd(vm, size, flags, write_population=wp)
    kernel = getattr(vm, "kernel", None)
    if kernel is not None:
        waits = getattr(kernel, "waits", None)
        if waits is not None:
            f.wq.domain = waits
    return f


def create(vm: Any, size: int, flags: int) -> int:
    """The KVM_CREATE_GUEST_MEMFD hook of the fake VM: returns the new fd (O_RDWR, like the kernel).

    ``__kvm_gmem_create`` installs the fd itself (``fd_install``); the fd is not close-on-exec.
    """
    f = create_file(vm, size, flags)
    try:
        return int(vm.kernel.install_fd(f, 0))
    except BaseException:
        f.put()
        raise
