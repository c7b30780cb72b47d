"""The same mmap/munmap/mremap/madvise scenarios on the host kernel and on FakeKernel."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable, Iterator

import pytest

from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.kernel import Kernel, RealKernel

P = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS


@pytest.fixture(params=["real", "fake"])
def kern(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    k: Kernel = RealKernel() if request.param == "real" else FakeKernel()
    yield k
    k.shutdown()


def err(f: Callable[[], object]) -> int:
    try:
        f()
    except OSError as e:
        return e.errno or 0
    return 0


def peek(addr: int, n: int) -> bytes:
    return ctypes.string_at(addr, n)


def poke(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, data, len(data))


def test_mmap_munmap_errnos(kern: Kernel) -> None:
    m = kern.mmap(-1, 4 * P, RW, ANON)
    a = m.address
    assert err(lambda: kern.mmap(-1, 0, RW, ANON)) == errno.EINVAL
    assert err(lambda: kern.mmap(-1, P, RW, mman.MAP_ANONYMOUS)) == errno.EINVAL
    assert err(lambda: kern.mmap(-1, P, RW, ANON, 1)) == errno.EINVAL
    assert err(lambda: kern.mmap(-1, P, RW, mman.MAP_PRIVATE)) == errno.EBADF
    assert err(lambda: kern.mmap(-1, P, RW, ANON | mman.MAP_FIXED, 0, a + 1)) == errno.EINVAL
    assert err(lambda: kern.mmap(-1, P, RW, ANON | mman.MAP_FIXED_NOREPLACE, 0, a)) == errno.EEXIST
    assert err(lambda: kern.munmap(a + 1, P)) == errno.EINVAL
    assert err(lambda: kern.munmap(a, 0)) == errno.EINVAL
    kern.munmap(a + P, P)
    kern.munmap(a + P, P)  # a hole: fine
    kern.munmap(a, 4 * P)


def test_map_fixed_replaces_with_zero_pages(kern: Kernel) -> None:
    m = kern.mmap(-1, 2 * P, RW, ANON)
    poke(m.address + P, b"old")
    n = kern.mmap(-1, P, RW, ANON | mman.MAP_FIXED, 0, m.address + P)
    assert n.address == m.address + P
    assert peek(n.address, 3) == b"\0\0\0"
    kern.munmap(m.address, 2 * P)


def test_mremap_errnos(kern: Kernel) -> None:
    m = kern.mmap(-1, 3 * P, RW, ANON)
    a = m.address
    kern.munmap(a + 2 * P, P)  # a hole after the two-page VMA
    MAY, FIX, DU = mman.MREMAP_MAYMOVE, mman.MREMAP_FIXED, mman.MREMAP_DONTUNMAP
    assert err(lambda: kern.mremap(a, P, P, 8)) == errno.EINVAL
    assert err(lambda: kern.mremap(a, P, P, FIX)) == errno.EINVAL
    assert err(lambda: kern.mremap(a, P, 2 * P, MAY | DU)) == errno.EINVAL
    assert err(lambda: kern.mremap(a + 1, P, P, 0)) == errno.EINVAL
    assert err(lambda: kern.mremap(a, P, 0, 0)) == errno.EINVAL
    assert err(lambda: kern.mremap(a, 3 * P, 4 * P, 0)) == errno.EFAULT  # grow past the VMA
    assert err(lambda: kern.mremap(a + 2 * P, P, P, 0)) == errno.EFAULT  # no VMA at all
    assert kern.mremap(a, 3 * P, 3 * P, 0) == a  # same size, no move: not checked
    assert err(lambda: kern.mremap(a, 2 * P, 2 * P, MAY | FIX, a + P)) == errno.EINVAL
    kern.munmap(a, 2 * P)


def test_mremap_moves_contents(kern: Kernel) -> None:
    m = kern.mmap(-1, 2 * P, RW, ANON)
    dst = kern.mmap(-1, 4 * P, RW, ANON)
    poke(m.address, b"contents")
    new = kern.mremap(m.address, 2 * P, 4 * P, mman.MREMAP_MAYMOVE | mman.MREMAP_FIXED, dst.address)
    assert new == dst.address
    assert peek(new, 8) == b"contents"
    assert peek(new + 3 * P, 4) == b"\0" * 4
    # shrinking in place returns the same address
    assert kern.mremap(new, 4 * P, P, 0) == new
    kern.munmap(new, P)


def test_madvise_errnos_and_dontneed(kern: Kernel) -> None:
    m = kern.mmap(-1, 2 * P, RW, ANON)
    a = m.address
    assert err(lambda: kern.madvise(a, P, 5)) == errno.EINVAL
    assert err(lambda: kern.madvise(a, P, 26)) == errno.EINVAL
    assert err(lambda: kern.madvise(a + 1, P, mman.MADV_DONTNEED)) == errno.EINVAL
    assert err(lambda: kern.madvise(a, P, mman.MADV_REMOVE)) == errno.EINVAL
    assert err(lambda: kern.madvise(a, 0, 77)) == errno.EINVAL
    kern.madvise(a, 0, mman.MADV_DONTNEED)
    for adv in (0, 1, 2, 3, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21):
        kern.madvise(a, 2 * P, adv)
    poke(a, b"zz")
    kern.madvise(a, P, mman.MADV_DONTNEED)
    assert peek(a, 2) == b"\0\0"
    kern.munmap(a, 2 * P)


def test_shmem_madvise_rules(kern: Kernel) -> None:
    fd = kern.memfd_create("m")
    try:
        kern.ftruncate(fd, 2 * P)
        s = kern.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
        assert err(lambda: kern.madvise(s.address, P, mman.MADV_FREE)) == errno.EINVAL
        poke(s.address, b"k")
        kern.madvise(s.address, P, mman.MADV_DONTNEED)
        assert peek(s.address, 1) == b"k"  # shmem keeps its data
        kern.madvise(s.address, P, mman.MADV_REMOVE)
        assert kern.pread(fd, 1, 0) == b"\0"
        p = kern.mmap(fd, P, RW, mman.MAP_PRIVATE)
        assert err(lambda: kern.madvise(p.address, P, mman.MADV_REMOVE)) == errno.EACCES
        kern.munmap(s.address, 2 * P)
        kern.munmap(p.address, P)
    finally:
        kern.close(fd)


def test_two_shared_mappings_of_a_memfd(kern: Kernel) -> None:
    fd = kern.memfd_create("m")
    try:
        kern.ftruncate(fd, P)
        a = kern.mmap(fd, P, RW, mman.MAP_SHARED)
        b = kern.mmap(fd, P, RW, mman.MAP_SHARED)
        poke(a.address, b"shared")
        assert peek(b.address, 6) == b"shared"
        kern.fallocate(fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, 0, P)
        assert peek(b.address, 6) == bytes(6)
        kern.munmap(a.address, P)
        kern.munmap(b.address, P)
    finally:
        kern.close(fd)
