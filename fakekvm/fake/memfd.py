"""`FakeMemfd`: memfd_create(2) files — shmem, or hugetlbfs with MFD_HUGETLB.

Follows ``mm/memfd.c`` (flag checks), ``mm/shmem.c`` (read/write/fallocate/
llseek SEEK_DATA/SEEK_HOLE) and ``fs/hugetlbfs/inode.c`` (huge page size,
ftruncate alignment, no write(2), punch-hole rounding).

The pages are REAL shared memory: every fake memfd is backed by a real memfd
(``real_fd``, close-on-exec, never in the fake fd table), and the fake mm maps
that real fd with ``MAP_SHARED``, so two mappings see the same bytes and a page
written through any mapping is visible to the others and to ``pread``. The page
cache truth is the real memfd's: `page_present` uses ``lseek(SEEK_DATA)``,
which also sees pages written through mappings the fake cannot observe -- except
pages ``fallocate`` allocated and nobody wrote: shmem keeps them in the page cache
but not uptodate, and ``SEEK_DATA`` reports them as holes (measured here: after one
``fallocate`` a page is a hole to ``SEEK_DATA`` while ``UFFDIO_CONTINUE`` maps it),
so the fake remembers them in a bitmap (`_fallocated`) until a hole is punched or
the file shrinks.

hugetlb memfds are backed by normal pages; the fake keeps hugetlbfs's rules
(page size, ``st_blksize``, EINVAL for unaligned ftruncate and for write(2),
whole-huge-page punch holes, no SEEK_DATA/SEEK_HOLE: the file is all data). The
hugetlb pool is unlimited (the live kernel here has none: its fallocate fails
ENOSPC); that is a documented deviation.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from fakekvm.abi import mman
from fakekvm.fake.files import FakeFile
from fakekvm.fake.mm.bitmap import Bitmap
from fakekvm.kernel.real import _libc

PAGE_SHIFT = mman.PAGE_SHIFT
PAGE_SIZE = mman.PAGE_SIZE

MFD_ALL_FLAGS = (
    mman.MFD_CLOEXEC | mman.MFD_ALLOW_SEALING | mman.MFD_HUGETLB | mman.MFD_NOEXEC_SEAL | mman.MFD_EXEC
)
MFD_HUGE_MASK = 0x3F
MFD_NAME_MAX_LEN = 249  # NAME_MAX - strlen("memfd:")

FALLOC_SUPPORTED = mman.FALLOC_FL_KEEP_SIZE | mman.FALLOC_FL_PUNCH_HOLE


def _real_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate: {os.strerror(e)}")


class FakeMemfd(FakeFile):
    """A memfd. ``real_fd`` is the real backing memfd (the fake fd number is separate)."""

    kind = "memfd"

    def __init__(self, name: str, flags: int = 0, *, validate: bool = True) -> None:
        super().__init__()
        if validate:
            self._validate(name, flags)
        self.name = name
        self.hugetlb = bool(flags & mman.MFD_HUGETLB)
        self.page_shift = PAGE_SHIFT
        if self.hugetlb:
            log = (flags >> mman.MFD_HUGE_SHIFT) & MFD_HUGE_MASK
            self.page_shift = log or 21
        real_flags = mman.MFD_CLOEXEC
        if not self.hugetlb:
            real_flags |= flags & (mman.MFD_ALLOW_SEALING | mman.MFD_NOEXEC_SEAL | mman.MFD_EXEC)
        self.real_fd = os.memfd_create(name, real_flags)
        #: i_size, cached (every size change goes through this object)
        self._size = 0
        #: 4 KiB file pages allocated by fallocate (in the page cache, maybe never written)
        self._fallocated = Bitmap()
        self.f_flags = mman.O_RDWR
        if self.hugetlb:
            self.kind = "memfd-hugetlb"

    @staticmethod
    def _validate(name: str, flags: int) -> None:
        if not flags & mman.MFD_HUGETLB:
            if flags & ~MFD_ALL_FLAGS:
                raise OSError(errno.EINVAL, f"memfd_create: unknown flags {flags:#x}")
        elif flags & ~(MFD_ALL_FLAGS | (MFD_HUGE_MASK << mman.MFD_HUGE_SHIFT)):
            raise OSError(errno.EINVAL, f"memfd_create: unknown flags {flags:#x}")
        if flags & mman.MFD_EXEC and flags & mman.MFD_NOEXEC_SEAL:
            raise OSError(errno.EINVAL, "memfd_create: MFD_EXEC with MFD_NOEXEC_SEAL")
        if len(name.encode()) > MFD_NAME_MAX_LEN:
            raise OSError(errno.EINVAL, "memfd_create: name too long")
        if flags & mman.MFD_HUGETLB:
            log = (flags >> mman.MFD_HUGE_SHIFT) & MFD_HUGE_MASK
            if log not in (0, 21, 30):
                # hugetlb_file_setup finds no hstate for that size
                raise OSError(errno.ENODEV, f"memfd_create: no hugetlb page size 2^{log}")

    @classmethod
    def create_internal(cls, name: str, size: int, page_shift: int = PAGE_SHIFT) -> FakeMemfd:
        """The shmem file behind shared anonymous memory (shmem_zero_setup)."""
        flags = 0
        if page_shift != PAGE_SHIFT:
            flags = mman.MFD_HUGETLB | (page_shift << mman.MFD_HUGE_SHIFT)
        f = cls(name, flags, validate=False)
        os.ftruncate(f.real_fd, size)
        f._size = size
        return f

    # -- attributes ------------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def size(self) -> int:
        return self._size

    def resync_size(self) -> None:
        """Re-read i_size from the real memfd (call after writing ``real_fd`` directly past EOF)."""
        self._size = os.fstat(self.real_fd).st_size

    def release(self) -> None:
        os.close(self.real_fd)
        self.real_fd = -1

    def __repr__(self) -> str:
        return f"<FakeMemfd {self.name!r} real_fd={self.real_fd} ps={self.page_size:#x}>"

    # -- page cache --------------------------------------------------------------------------
    def page_present(self, pgoff: int) -> bool:
        """Is file page ``pgoff`` (4 KiB units) in the page cache?

        For hugetlb files: is any 4 KiB piece of its huge page there (a huge
        page is allocated as a whole by the fake).
        """
        if self.hugetlb:
            span = 1 << (self.page_shift - PAGE_SHIFT)
            pg = pgoff & ~(span - 1)
            return self._next_data(pg << PAGE_SHIFT) < (pg + span) << PAGE_SHIFT
        off = pgoff << PAGE_SHIFT
        return self._fallocated.test(pgoff) or self._next_data(off) == off

    def _next_data(self, off: int) -> int:
        try:
            return os.lseek(self.real_fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return 1 << 63
            raise

    def present_ranges(self, start_pg: int, end_pg: int) -> Iterator[tuple[int, int]]:
        """Runs [a, b) of file pages (4 KiB units) with data, as ``SEEK_DATA`` reports them
        (pages fallocated and never written are holes here, though `page_present`)."""
        off = start_pg << PAGE_SHIFT
        end = end_pg << PAGE_SHIFT
        while off < end:
            d = self._next_data(off)
            if d >= end:
                return
            try:
                h = os.lseek(self.real_fd, d, os.SEEK_HOLE)
            except OSError:
                h = end
            yield d >> PAGE_SHIFT, min(h, end) >> PAGE_SHIFT
            off = h

    def populate_page(self, pgoff: int, data: bytes | bytearray | memoryview | None = None) -> None:
        """Put file page(s) into the page cache with ``data`` (zeroes if None); EEXIST if there."""
        if self.page_present(pgoff):
            raise OSError(errno.EEXIST, f"memfd page {pgoff:#x} already in the page cache")
        ps = self.page_size
        off = (pgoff << PAGE_SHIFT) & ~(ps - 1)
        buf = data if data is not None else bytes(ps)
        n = os.pwrite(self.real_fd, buf, off)
        self.resync_size()
        if n != len(buf):
            raise OSError(errno.EIO, "memfd: short write populating a page")

    # -- file operations (forwarded to the real memfd) ---------------------------------------------
    def read(self, n: int) -> bytes:
        return os.read(self.real_fd, n)

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.real_fd, n, offset)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.hugetlb:
            raise OSError(errno.EINVAL, "hugetlbfs: write not supported")
        n = os.write(self.real_fd, data)
        self.resync_size()
        return n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self.hugetlb:
            raise OSError(errno.EINVAL, "hugetlbfs: pwrite not supported")
        n = os.pwrite(self.real_fd, data, offset)
        if offset + n > self._size:
            self.resync_size()
        return n

    def lseek(self, pos: int, how: int) -> int:
        if self.hugetlb and how in (os.SEEK_DATA, os.SEEK_HOLE):
            # generic_file_llseek: the whole file is data
            size = self.size
            if pos < 0 or pos >= size:
                raise OSError(errno.ENXIO, "lseek: beyond end of file")
            return os.lseek(self.real_fd, pos if how == os.SEEK_DATA else size, os.SEEK_SET)
        return os.lseek(self.real_fd, pos, how)

    def fstat(self) -> os.stat_result:
        st = os.fstat(self.real_fd)
        if not self.hugetlb:
            return st
        fields = list(st)
        extra = {
            "st_atime": st.st_atime, "st_mtime": st.st_mtime, "st_ctime": st.st_ctime,
            "st_atime_ns": st.st_atime_ns, "st_mtime_ns": st.st_mtime_ns,
            "st_ctime_ns": st.st_ctime_ns, "st_blksize": self.page_size,
            "st_blocks": st.st_blocks, "st_rdev": st.st_rdev,
        }
        return os.stat_result(fields[:10], extra)

    def ftruncate(self, length: int) -> None:
        if length < 0:
            raise OSError(errno.EINVAL, "ftruncate: negative length")
        if self.hugetlb and length & (self.page_size - 1):
            raise OSError(errno.EINVAL, "hugetlbfs: ftruncate to a size that is not a huge page multiple")
        old = self.size
        if length < old:
            from fakekvm.fake.mm.core import invalidate_file_range

            os.ftruncate(self.real_fd, length)
            self._size = length
            self._fallocated.clear_range((length + PAGE_SIZE - 1) >> PAGE_SHIFT, (old + PAGE_SIZE - 1) >> PAGE_SHIFT)
            invalidate_file_range(self, (length + PAGE_SIZE - 1) >> PAGE_SHIFT, (old + PAGE_SIZE - 1) >> PAGE_SHIFT)
        else:
            os.ftruncate(self.real_fd, length)
            self._size = length

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "fallocate: bad offset or length")
        if mode & ~FALLOC_SUPPORTED:
            raise OSError(errno.EOPNOTSUPP, f"fallocate: mode {mode:#x} not supported by shmem")
        if mode & mman.FALLOC_FL_PUNCH_HOLE:
            if not mode & mman.FALLOC_FL_KEEP_SIZE:
                raise OSError(errno.EOPNOTSUPP, "fallocate: PUNCH_HOLE needs KEEP_SIZE")
            self.punch_hole(offset, length)
            return
        if self.hugetlb:
            ps = self.page_size
            start = offset & ~(ps - 1)
            end = (offset + length + ps - 1) & ~(ps - 1)
            # hugetlbfs allocates whole huge pages (and i_size grows unless KEEP_SIZE)
            _real_fallocate(self.real_fd, mode, start, end - start)
            if not mode & mman.FALLOC_FL_KEEP_SIZE and self.size < offset + length:
                os.ftruncate(self.real_fd, offset + length)
            self.resync_size()
            return
        _real_fallocate(self.real_fd, mode, offset, length)
        self.resync_size()
        # shmem_fallocate allocates every page the range touches (within i_size)
        last = min(offset + length, self.size)
        if last > offset:
            self._fallocated.set_range(offset >> PAGE_SHIFT, (last + PAGE_SIZE - 1) >> PAGE_SHIFT)

    def punch_hole(self, offset: int, length: int) -> None:
        """Free [offset, offset+length): zeroes it for every mapping and invalidates them."""
        from fakekvm.fake.mm.core import invalidate_file_range

        end = offset + length
        if self.hugetlb:
            ps = self.page_size
            hs = (offset + ps - 1) & ~(ps - 1)
            he = end & ~(ps - 1)
            # partial huge pages are zeroed, not freed (hugetlb_zero_partial_page)
            size = self.size
            for a, b in ((offset, min(hs, end)), (max(he, offset), end)):
                if a < b and a < size:
                    b = min(b, size)
                    os.pwrite(self.real_fd, bytes(b - a), a)
            if hs < he:
                _real_fallocate(self.real_fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, hs, he - hs)
                invalidate_file_range(self, hs >> PAGE_SHIFT, he >> PAGE_SHIFT)
            return
        _real_fallocate(self.real_fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, offset, length)
        self._fallocated.clear_range((offset + PAGE_SIZE - 1) >> PAGE_SHIFT, end >> PAGE_SHIFT)
        # whole pages are dropped from every mapping; partial pages were zeroed in place
        invalidate_file_range(self, (offset + PAGE_SIZE - 1) >> PAGE_SHIFT, end >> PAGE_SHIFT)

    def poll(self) -> int:
        # DEFAULT_POLLMASK for a file without ->poll
        return mman.POLLIN | mman.POLLOUT | mman.POLLRDNORM | mman.POLLWRNORM
