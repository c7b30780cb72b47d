"""The fake address space: mmap/munmap/mprotect/mremap/madvise, VMA splits, faults, notifiers."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.mm import FaultResult, VmaKind

P = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
MiB = 1 << 20


@pytest.fixture
def k() -> Iterator[FakeKernel]:
    kern = FakeKernel()
    yield kern
    kern.shutdown()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.starts: list[tuple[int, int]] = []

    def invalidate_range_start(self, start: int, end: int) -> None:
        self.starts.append((start, end))

    def invalidate_range(self, start: int, end: int) -> None:
        self.calls.append((start, end))


def test_anon_mapping_is_real_memory_and_demand_zero(k: FakeKernel) -> None:
    m = k.mmap(-1, 4 * P, RW, ANON)
    assert m.length == 4 * P and m.address % P == 0
    assert not k.mm.is_present(m.address)
    assert k.mm.fault(m.address + 5, write=False, user=True) == FaultResult.OK
    assert k.mm.is_present(m.address) and not k.mm.is_present(m.address + P)
    k.mm.write(m.address + P, b"hello")
    assert bytes(m.view()[P : P + 5]) == b"hello"  # the Mapping sees the same bytes
    assert k.mm.read(m.address + P, 5) == b"hello"


def test_unmapped_and_protection_faults(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, mman.PROT_READ, ANON)
    assert k.mm.fault(m.address, write=True, user=True) == FaultResult.SIGSEGV
    assert k.mm.fault(m.address, write=False, user=True) == FaultResult.OK
    k.munmap(m.address, 2 * P)
    assert k.mm.fault(m.address, write=False, user=True) == FaultResult.SIGSEGV
    with pytest.raises(OSError) as ei:
        k.mm.read(m.address, 1)
    assert ei.value.errno == errno.EFAULT


def test_partial_munmap_splits_vma(k: FakeKernel) -> None:
    m = k.mmap(-1, 4 * P, RW, ANON)
    k.mm.populate(m.address, m.end, True)
    k.munmap(m.address + P, P)
    vmas = k.mm.vmas(m.address, m.end)
    assert [(v.start - m.address, v.end - m.address) for v in vmas] == [(0, P), (2 * P, 4 * P)]
    assert not k.mm.is_present(m.address + P)
    assert k.mm.is_present(m.address + 2 * P)
    # unmapping a hole succeeds, like the kernel
    k.munmap(m.address + P, P)


def test_munmap_argument_errors(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    for addr, ln in ((m.address + 1, P), (m.address, 0)):
        with pytest.raises(OSError) as ei:
            k.munmap(addr, ln)
        assert ei.value.errno == errno.EINVAL


def test_mmap_argument_errors(k: FakeKernel) -> None:
    cases = [
        (0, RW, ANON, 0),  # length 0
        (P, RW, mman.MAP_ANONYMOUS, 0),  # no map type
        (P, RW, ANON, 123),  # unaligned offset
    ]
    for length, prot, flags, off in cases:
        with pytest.raises(OSError) as ei:
            k.mmap(-1, length, prot, flags, off)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        k.mmap(-1, P, RW, mman.MAP_PRIVATE)  # file mapping of fd -1
    assert ei.value.errno == errno.EBADF


def test_map_fixed_replaces_and_noreplace_refuses(k: FakeKernel) -> None:
    rec = Recorder()
    k.mm.register_notifier(rec)
    m = k.mmap(-1, 4 * P, RW, ANON)
    k.mm.write(m.address + P, b"old")
    n = k.mmap(-1, P, RW, ANON | mman.MAP_FIXED, 0, m.address + P)
    assert n.address == m.address + P
    assert bytes(n.view()[:3]) == b"\0\0\0"  # fresh zero page
    assert (m.address + P, m.address + 2 * P) in rec.calls
    assert (m.address + P, m.address + 2 * P) in rec.starts
    with pytest.raises(OSError) as ei:
        k.mmap(-1, P, RW, ANON | mman.MAP_FIXED_NOREPLACE, 0, m.address)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(OSError) as ei:
        k.mmap(-1, P, RW, ANON | mman.MAP_FIXED, 0, m.address + 1)
    assert ei.value.errno == errno.EINVAL


def test_adjacent_compatible_vmas_merge(k: FakeKernel) -> None:
    m = k.mmap(-1, 4 * P, RW, ANON)
    k.mprotect(m.address + P, P, mman.PROT_READ)
    assert len(k.mm.vmas(m.address, m.end)) == 3
    k.mprotect(m.address + P, P, RW)
    assert len(k.mm.vmas(m.address, m.end)) == 1


def test_mprotect_changes_real_and_fake_protection(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    k.mprotect(m.address, P, mman.PROT_READ)
    assert k.mm.fault(m.address, True, user=True) == FaultResult.SIGSEGV
    assert k.mm.fault(m.address + P, True, user=True) == FaultResult.OK
    from fakekvm.fake.mm.hostmem import safe_copy_to

    with pytest.raises(OSError) as ei:
        safe_copy_to(m.address, b"x")  # the host mapping is read-only too
    assert ei.value.errno == errno.EFAULT


def test_madvise_dontneed_zeroes_anon_and_clears_presence(k: FakeKernel) -> None:
    rec = Recorder()
    k.mm.register_notifier(rec)
    m = k.mmap(-1, 2 * P, RW, ANON)
    k.mm.write(m.address, b"data")
    k.mm.write(m.address + P, b"keep")
    k.madvise(m.address, P, mman.MADV_DONTNEED)
    assert bytes(m.view()[:4]) == b"\0\0\0\0"
    assert not k.mm.is_present(m.address)
    assert bytes(m.view()[P : P + 4]) == b"keep"
    assert rec.calls == [(m.address, m.address + P)]


def test_madvise_errors(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    for addr, adv, err in (
        (m.address, 5, errno.EINVAL),  # unknown advice
        (m.address + 1, mman.MADV_DONTNEED, errno.EINVAL),
        (m.address, mman.MADV_REMOVE, errno.EINVAL),  # anonymous memory
    ):
        with pytest.raises(OSError) as ei:
            k.madvise(addr, P, adv)
        assert ei.value.errno == err
    k.munmap(m.address + P, P)
    with pytest.raises(OSError) as ei:
        k.madvise(m.address, 2 * P, mman.MADV_WILLNEED)
    assert ei.value.errno == errno.ENOMEM
    k.madvise(m.address, 0, mman.MADV_DONTNEED)  # length 0 is a no-op


def test_madvise_hwpoison_gives_sigbus(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    k.madvise(m.address, P, mman.MADV_HWPOISON)
    assert k.mm.fault(m.address, False, user=True) == FaultResult.SIGBUS
    assert k.mm.fault(m.address + P, False, user=True) == FaultResult.OK


def test_memfd_shared_between_two_mappings(k: FakeKernel) -> None:
    fd = k.memfd_create("guest", mman.MFD_CLOEXEC)
    k.ftruncate(fd, 4 * P)
    a = k.mmap(fd, 4 * P, RW, mman.MAP_SHARED)
    b = k.mmap(fd, 4 * P, RW, mman.MAP_SHARED)
    assert a.address != b.address
    a.view()[P : P + 4] = b"ABCD"
    assert bytes(b.view()[P : P + 4]) == b"ABCD"
    assert k.pread(fd, 4, P) == b"ABCD"
    memfd = k.memfd(fd)
    assert memfd.page_present(1)  # written through a mapping the fake did not see
    assert not memfd.page_present(2)
    assert b.address in {v.start for v in memfd.i_mmap}
    v = k.mm.find_vma(a.address)
    assert v is not None and v.kind == VmaKind.SHMEM


def test_memfd_fault_beyond_eof_is_sigbus(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, P)
    a = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    assert k.mm.fault(a.address, True, user=True) == FaultResult.OK
    assert k.mm.fault(a.address + P, False, user=True) == FaultResult.SIGBUS
    # a read fault allocates the page in the page cache (shmem_fault)
    k.ftruncate(fd, 2 * P)
    assert not k.memfd(fd).page_present(1)
    assert k.mm.fault(a.address + P, False, user=True) == FaultResult.OK
    assert k.memfd(fd).page_present(1)


def test_punch_hole_zeroes_and_invalidates_every_mapping(k: FakeKernel) -> None:
    rec = Recorder()
    k.mm.register_notifier(rec)
    fd = k.memfd_create("m")
    k.ftruncate(fd, 4 * P)
    a = k.mmap(fd, 4 * P, RW, mman.MAP_SHARED)
    b = k.mmap(fd, 4 * P, RW, mman.MAP_SHARED, 0)
    k.mm.write(a.address + 2 * P, b"xyz")
    k.mm.touch(b.address + 2 * P)
    assert k.mm.is_present(b.address + 2 * P)
    k.fallocate(fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, 2 * P, P)
    assert not k.memfd(fd).page_present(2)
    assert not k.mm.is_present(a.address + 2 * P) and not k.mm.is_present(b.address + 2 * P)
    # (reading through a shared mapping allocates the page again, as on the real kernel)
    assert bytes(a.view()[2 * P : 2 * P + 3]) == b"\0\0\0"
    assert bytes(b.view()[2 * P : 2 * P + 3]) == b"\0\0\0"
    assert (a.address + 2 * P, a.address + 3 * P) in rec.calls
    assert (b.address + 2 * P, b.address + 3 * P) in rec.calls


def test_madvise_remove_punches_shmem(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, 2 * P)
    a = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    k.mm.write(a.address, b"q")
    k.madvise(a.address, P, mman.MADV_REMOVE)
    assert not k.memfd(fd).page_present(0)
    assert k.pread(fd, 1, 0) == b"\0"
    # DONTNEED on shmem keeps the data (only the PTE goes)
    k.mm.write(a.address + P, b"r")
    k.madvise(a.address + P, P, mman.MADV_DONTNEED)
    assert bytes(a.view()[P : P + 1]) == b"r"
    assert not k.mm.is_present(a.address + P)
    p = k.mmap(fd, P, RW, mman.MAP_PRIVATE)
    with pytest.raises(OSError) as ei:
        k.madvise(p.address, P, mman.MADV_REMOVE)
    assert ei.value.errno == errno.EACCES


def test_shared_anonymous_is_shmem(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    v = k.mm.find_vma(m.address)
    assert v is not None and v.kind == VmaKind.SHMEM and v.shared
    k.mm.write(m.address, b"s")
    assert v.file.page_present(0)


def test_hugetlb_anonymous_alignment_rules(k: FakeKernel) -> None:
    H = 2 * MiB
    m = k.mmap(-1, H + P, RW, ANON | mman.MAP_HUGETLB | mman.MAP_HUGE_2MB)
    assert m.length == 2 * H and m.address % H == 0  # length rounded up to huge pages
    v = k.mm.find_vma(m.address)
    assert v is not None and v.page_size == H
    with pytest.raises(OSError) as ei:
        k.munmap(m.address + P, P)  # would split inside a huge page
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        k.mmap(-1, H, RW, ANON | mman.MAP_HUGETLB | mman.MAP_FIXED, 0, m.address + P)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        k.mmap(-1, H, RW, ANON | mman.MAP_HUGETLB | (22 << mman.MAP_HUGE_SHIFT))
    assert ei.value.errno == errno.EINVAL
    # a fault populates the whole huge page
    assert k.mm.fault(m.address + 5 * P, True, user=True) == FaultResult.OK
    assert k.mm.present.count(m.address >> 12, (m.address + H) >> 12) == H // P
    k.munmap(m.address + H, H)
    assert len(k.mm.vmas(m.address, m.address + 2 * H)) == 1


def test_hugetlb_memfd_rules(k: FakeKernel) -> None:
    H = 2 * MiB
    fd = k.memfd_create("h", mman.MFD_HUGETLB | mman.MFD_HUGE_2MB)
    assert k.fstat(fd).st_blksize == H
    with pytest.raises(OSError) as ei:
        k.ftruncate(fd, P)
    assert ei.value.errno == errno.EINVAL
    k.ftruncate(fd, 2 * H)
    with pytest.raises(OSError) as ei:
        k.mmap(fd, H, RW, mman.MAP_SHARED, P)
    assert ei.value.errno == errno.EINVAL
    a = k.mmap(fd, H, RW, mman.MAP_SHARED, H)
    v = k.mm.find_vma(a.address)
    assert v is not None and v.page_size == H and a.address % H == 0
    with pytest.raises(OSError) as ei:
        k.pwrite(fd, b"x", 0)
    assert ei.value.errno == errno.EINVAL


def test_mremap_grow_in_place_move_and_shrink(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    k.mm.write(m.address, b"first")
    # shrink
    assert k.mremap(m.address, 2 * P, P, 0) == m.address
    assert k.mm.find_vma(m.address + P) is None
    # grow: in place if free, else move with MAYMOVE
    k.mmap(-1, P, RW, ANON | mman.MAP_FIXED, 0, m.address + P)  # block the space after
    with pytest.raises(OSError) as ei:
        k.mremap(m.address, P, 3 * P, 0)
    assert ei.value.errno == errno.ENOMEM
    new = k.mremap(m.address, P, 3 * P, mman.MREMAP_MAYMOVE)
    assert new != m.address
    assert k.mm.read(new, 5) == b"first"
    assert k.mm.is_present(new) and not k.mm.is_present(m.address)
    assert k.mm.find_vma(m.address) is None
    assert k.mm.find_vma(new + 2 * P) is not None


def test_mremap_fixed_and_dontunmap(k: FakeKernel) -> None:
    rec = Recorder()
    k.mm.register_notifier(rec)
    m = k.mmap(-1, 2 * P, RW, ANON)
    dst = k.mmap(-1, 2 * P, RW, ANON)
    k.mm.write(m.address, b"moved")
    r = k.mremap(m.address, 2 * P, 2 * P, mman.MREMAP_MAYMOVE | mman.MREMAP_FIXED | mman.MREMAP_DONTUNMAP, dst.address)
    assert r == dst.address
    assert k.mm.read(dst.address, 5) == b"moved"
    # DONTUNMAP: the old range is still mapped, and empty
    assert k.mm.find_vma(m.address) is not None
    assert not k.mm.is_present(m.address)
    assert bytes(m.view()[:5]) == b"\0" * 5
    assert (m.address, m.address + 2 * P) in rec.calls


def test_mremap_errors(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    cases = [
        ((m.address, P, P, 8), errno.EINVAL),  # unknown flag
        ((m.address, P, P, mman.MREMAP_FIXED), errno.EINVAL),  # FIXED without MAYMOVE
        ((m.address, P, 2 * P, mman.MREMAP_MAYMOVE | mman.MREMAP_DONTUNMAP), errno.EINVAL),
        ((m.address + 1, P, P, 0), errno.EINVAL),
        ((m.address, P, 0, 0), errno.EINVAL),
        ((m.address, 3 * P, 4 * P, 0), errno.EFAULT),  # grows beyond the VMA
        ((m.address - 16 * P, P, P, 0), errno.EFAULT),  # not mapped
        ((m.address, 2 * P, 2 * P, mman.MREMAP_MAYMOVE | mman.MREMAP_FIXED, m.address + P), errno.EINVAL),
    ]
    for args, err in cases:
        with pytest.raises(OSError) as ei:
            k.mremap(*args)
        assert ei.value.errno == err, args


def test_map_fixed_outside_fake_space_is_refused(k: FakeKernel) -> None:
    k.mmap(-1, P, RW, ANON)
    outside = k.mm.arena.start - (1 << 30)
    with pytest.raises(OSError) as ei:
        k.mmap(-1, P, RW, ANON | mman.MAP_FIXED, 0, outside)
    assert ei.value.errno == errno.ENOMEM


def test_real_file_mapping_is_forwarded(k: FakeKernel, tmp_path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"real file contents" + bytes(P))
    fd = k.open(str(p), mman.O_RDWR)
    assert not k.is_fake_fd(fd)
    m = k.mmap(fd, P, RW, mman.MAP_SHARED)
    assert bytes(m.view()[:4]) == b"real"
    v = k.mm.find_vma(m.address)
    assert v is not None and v.kind == VmaKind.HOST
    k.close(fd)


def test_64gib_noreserve_mapping_metadata() -> None:
    k = FakeKernel()
    try:
        size = 64 << 30
        m = k.mmap(-1, size, RW, ANON | mman.MAP_NORESERVE)
        k.mm.write(m.address, b"start")
        k.mm.write(m.end - 5, b"end!!")
        assert k.mm.read(m.address, 5) == b"start"
        assert k.mm.read(m.end - 5, 5) == b"end!!"
        meta = k.mm.metadata_bytes()
        print(f"64 GiB mapping, ends touched: metadata {meta} bytes")
        assert meta < 2.5 * MiB
        assert k.mm.present.count(m.address >> 12, m.end >> 12) == 2
    finally:
        k.shutdown()


def _rss_pages() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])


def test_rss_grows_with_pages_touched() -> None:
    k = FakeKernel()
    try:
        size = 1 << 30
        m = k.mmap(-1, size, RW, ANON | mman.MAP_NORESERVE)
        before = _rss_pages()
        touched = 16384  # 64 MiB of the 1 GiB
        view = m.view()
        for i in range(touched):
            addr = m.address + i * P
            k.mm.touch(addr, True)
            view[i * P] = 1
        grown = _rss_pages() - before
        print(f"RSS grew by {grown} pages for {touched} touched")
        assert touched * 0.8 <= grown <= touched * 1.5
        assert k.mm.metadata_bytes() < 256 * 1024
    finally:
        k.shutdown()
