"""More mm paths: special-file mappings, shmem mremap/merge, populate, hugetlb memfd faults."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.files import VM_FAULT_OK, VM_FAULT_SIGBUS, FakeFile
from fakekvm.fake.mm import FaultResult, VmaKind, hostmem
from fakekvm.kernel.mapping import Mapping, make_mapping

P = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
H = 2 << 20


@pytest.fixture
def k() -> Iterator[FakeKernel]:
    kern = FakeKernel()
    yield kern
    kern.shutdown()


class RunPage(FakeFile):
    """Like a vCPU's kvm_run: one page of file memory; page 1 and beyond fault SIGBUS."""

    kind = "runpage"

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def mmap(self, length: int, prot: int, flags: int, offset: int, address: int) -> Mapping:
        hostmem.map_anon_fixed(address, length, prot, shared=True)
        hostmem.write_bytes(address, b"RUN!")
        return make_mapping(address, length, prot=prot, flags=flags, offset=offset, owner=self)

    def vm_fault(self, vma: Any, pgoff: int, write: bool) -> int:
        return VM_FAULT_OK if pgoff == 0 else VM_FAULT_SIGBUS

    def release(self) -> None:
        self.released.set()


def test_special_file_mapping_and_its_lifetime(k: FakeKernel) -> None:
    f = RunPage()
    fd = k.install_fd(f)
    m = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    assert bytes(m.view()[:4]) == b"RUN!"
    v = k.mm.find_vma(m.address)
    assert v is not None and v.kind == VmaKind.FILE and v in f.i_mmap
    assert k.mm.touch(m.address) == FaultResult.OK
    assert k.mm.touch(m.address + P) == FaultResult.SIGBUS
    k.close(fd)
    assert not f.released.is_set()  # the mapping holds the file
    k.munmap(m.address, 2 * P)
    assert f.released.is_set()
    assert f.i_mmap == []


def test_shmem_mappings_of_consecutive_offsets_merge(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, 4 * P)
    a = k.mmap(-1, 4 * P, mman.PROT_NONE, ANON)  # reserve room
    k.mmap(fd, 2 * P, RW, mman.MAP_SHARED | mman.MAP_FIXED, 0, a.address)
    k.mmap(fd, 2 * P, RW, mman.MAP_SHARED | mman.MAP_FIXED, 2 * P, a.address + 2 * P)
    vmas = k.mm.vmas(a.address, a.address + 4 * P)
    assert len(vmas) == 1 and vmas[0].pgoff == 0
    # ... but not when the offsets do not line up
    k.mmap(fd, P, RW, mman.MAP_SHARED | mman.MAP_FIXED, 0, a.address + 3 * P)
    assert len(k.mm.vmas(a.address, a.address + 4 * P)) == 2
    assert k.memfd(fd).i_mmap and all(v.file is k.file(fd) for v in k.memfd(fd).i_mmap)


def test_shmem_mremap_keeps_the_file_offset(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, 8 * P)
    k.pwrite(fd, b"page3", 3 * P)
    a = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED, 2 * P)
    new = k.mremap(a.address, 2 * P, 4 * P, mman.MREMAP_MAYMOVE)
    v = k.mm.find_vma(new)
    assert v is not None and v.pgoff == 2
    assert k.mm.read(new + P, 5) == b"page3"
    assert k.mm.read(new + 3 * P, 1) == b"\0"  # file page 5, grown into


def test_mremap_notifies_and_moves_page_state(k: FakeKernel) -> None:
    calls: list[tuple[int, int]] = []

    class N:
        def invalidate_range(self, s: int, e: int) -> None:
            calls.append((s, e))

    k.mm.register_notifier(N())
    m = k.mmap(-1, 2 * P, RW, ANON)
    k.mm.touch(m.address + P, True)
    new = k.mremap(m.address, 2 * P, 8 * P, mman.MREMAP_MAYMOVE)
    assert (m.address, m.address + 2 * P) in calls
    assert k.mm.is_present(new + P) and not k.mm.is_present(new)
    assert not k.mm.is_present(m.address + P)


def test_map_populate_and_madvise_populate(k: FakeKernel) -> None:
    m = k.mmap(-1, 4 * P, RW, ANON | mman.MAP_POPULATE)
    assert k.mm.present.count(m.address >> 12, m.end >> 12) == 4
    fd = k.memfd_create("m")
    k.ftruncate(fd, 2 * P)
    s = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    k.madvise(s.address, 2 * P, mman.MADV_POPULATE_WRITE)
    assert k.mm.present.count(s.address >> 12, s.end >> 12) == 2
    assert list(k.memfd(fd).present_ranges(0, 2)) == [(0, 2)]
    r = k.mmap(-1, P, mman.PROT_READ, ANON)
    with pytest.raises(OSError) as ei:
        k.madvise(r.address, P, mman.MADV_POPULATE_WRITE)
    assert ei.value.errno == errno.EINVAL


def test_hugetlb_memfd_fault_punch_and_presence(k: FakeKernel) -> None:
    fd = k.memfd_create("h", mman.MFD_HUGETLB | mman.MFD_HUGE_2MB)
    k.ftruncate(fd, 2 * H)
    a = k.mmap(fd, 2 * H, RW, mman.MAP_SHARED)
    mf = k.memfd(fd)
    assert not mf.page_present(0)
    assert k.mm.touch(a.address + 7 * P, True) == FaultResult.OK
    assert mf.page_present(0) and mf.page_present(511)  # the whole huge page
    assert k.mm.present.count(a.address >> 12, (a.address + H) >> 12) == H // P
    hostmem.write_bytes(a.address + 5, b"hp")
    # a punch hole of part of a huge page zeroes that part without freeing the page
    k.fallocate(fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, 0, P)
    assert mf.page_present(0)
    assert hostmem.read_bytes(a.address + 5, 2) == b"\0\0"
    k.fallocate(fd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, 0, H)
    assert not mf.page_present(0)
    assert not k.mm.is_present(a.address)
    with pytest.raises(OSError) as ei:
        k.madvise(a.address + P, H, mman.MADV_DONTNEED)
    assert ei.value.errno == errno.EINVAL


def test_ftruncate_shrink_zaps_mappings(k: FakeKernel) -> None:
    fd = k.memfd_create("m")
    k.ftruncate(fd, 2 * P)
    a = k.mmap(fd, 2 * P, RW, mman.MAP_SHARED)
    k.mm.touch(a.address + P, True)
    k.ftruncate(fd, P)
    assert not k.mm.is_present(a.address + P)
    assert k.mm.touch(a.address + P) == FaultResult.SIGBUS


def test_guard_pages(k: FakeKernel) -> None:
    m = k.mmap(-1, 2 * P, RW, ANON)
    k.madvise(m.address, P, 102)  # MADV_GUARD_INSTALL
    assert k.mm.touch(m.address) == FaultResult.SIGSEGV
    assert k.mm.touch(m.address + P) == FaultResult.OK
    k.madvise(m.address, P, 103)  # MADV_GUARD_REMOVE
    assert k.mm.touch(m.address) == FaultResult.OK


def test_concurrent_faults_and_unmaps_keep_state_consistent(k: FakeKernel) -> None:
    n = 256
    m = k.mmap(-1, n * P, RW, ANON)
    barrier = threading.Barrier(3)

    def faulter(offset: int) -> None:
        barrier.wait()
        for i in range(offset, n, 2):
            k.mm.touch(m.address + i * P, True)

    def unmapper() -> None:
        barrier.wait()
        for i in range(0, n, 16):
            k.munmap(m.address + i * P, P)

    ts = [threading.Thread(target=faulter, args=(o,)) for o in (0, 1)] + [threading.Thread(target=unmapper)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for i in range(0, n, 16):
        assert k.mm.find_vma(m.address + i * P) is None
        # a fault racing with the munmap never leaves a stale present bit behind
        assert not k.mm.is_present(m.address + i * P)
    for i in range(n):
        if i % 16:
            assert k.mm.is_present(m.address + i * P)
