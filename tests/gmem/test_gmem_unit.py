"""guest_memfd internals: bindings, allocation state, the fallocate check order, write() population."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fakekvm.abi import mman
from fakekvm.fake import gmem as G

PAGE = 4096
KEEP = mman.FALLOC_FL_KEEP_SIZE
PUNCH = mman.FALLOC_FL_PUNCH_HOLE | KEEP


class _Vm:
    """The part of a VM a guest_memfd talks to: its flags and the invalidation hook."""

    def __init__(self, flags: int = 3, write_population: bool = False) -> None:
        self.gmem_flags = flags
        self.profile = SimpleNamespace(gmem_write_population=write_population)
        self.kernel = None
        self.invalidated: list[tuple[int, int]] = []

    def invalidate_gpa_range(self, a: int, b: int) -> None:
        self.invalidated.append((a, b))


@pytest.fixture
def gm() -> Iterator[G.GuestMemfd]:
    f = G.create_file(_Vm(), 64 * PAGE, G.GUEST_MEMFD_FLAG_MMAP | G.GUEST_MEMFD_FLAG_INIT_SHARED)
    yield f
    f.put()


def _slot(base_gfn: int, npages: int, gofs: int) -> SimpleNamespace:
    return SimpleNamespace(base_gfn=base_gfn, npages=npages, guest_memfd_offset=gofs)


def test_gmem_create_file_checks() -> None:
    vm = _Vm(flags=1)
    for size, flags, e in [(0, 0, errno.EINVAL), (PAGE + 1, 0, errno.EINVAL), (PAGE, 2, errno.EINVAL),
                           (1 << 63, 0, errno.EINVAL)]:
        with pytest.raises(OSError) as ei:
            G.create_file(vm, size, flags)
        assert ei.value.errno == e
    f = G.create_file(vm, (1 << 63) - PAGE, 1)  # the largest loff_t: accepted, costs nothing
    assert f.fstat().st_size == (1 << 63) - PAGE
    f.put()
    assert f.real_fd == -1  # released with the last reference


def test_gmem_bindings_are_exclusive_per_file_range(gm: G.GuestMemfd) -> None:
    a, b, c = _slot(0x100, 16, 0), _slot(0x800, 16, 16 * PAGE), _slot(0x900, 8, 8 * PAGE)
    gm.bind(a, 0, 16)
    gm.bind(b, 16, 32)
    with pytest.raises(OSError) as ei:
        gm.bind(c, 8, 16)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        gm.bind(c, 60, 68)  # past EOF
    assert [x.slot for x in gm.bindings] == [a, b]
    # get_pfn: the host page in the binding window, allocating it
    hva = gm.get_pfn(b, 0x803)
    assert gm.is_allocated(19) and not gm.is_allocated(18)
    os.pwrite(gm.real_fd, b"via the file", 19 * PAGE)
    assert ctypes.string_at(hva, 12) == b"via the file"
    gm.unbind(a)
    gm.bind(c, 8, 16)
    with pytest.raises(OSError) as ei:
        gm.get_pfn(a, 0x100)
    assert ei.value.errno == errno.EFAULT


def test_gmem_punch_invalidates_only_bound_gfns(gm: G.GuestMemfd) -> None:
    vm: _Vm = gm.vm
    gm.bind(_slot(0x100, 16, 4 * PAGE), 4, 20)
    gm.fallocate(KEEP, 0, 8 * PAGE)
    assert [gm.is_allocated(i) for i in (0, 7, 8)] == [True, True, False]
    gm.fallocate(PUNCH, 2 * PAGE, 4 * PAGE)  # file pages 2..5: 4, 5 are bound to gfns 0x100, 0x101
    assert vm.invalidated == [(0x100 << 12, 0x102 << 12)]
    assert [gm.is_allocated(i) for i in (1, 2, 5, 6)] == [True, False, False, True]
    gm.fallocate(PUNCH, 40 * PAGE, 1 << 30)  # beyond the binding and EOF: fine, nothing bound there
    assert len(vm.invalidated) == 1


def test_gmem_host_writes_count_as_allocated(gm: G.GuestMemfd) -> None:
    os.pwrite(gm.real_fd, b"x", 9 * PAGE)  # (what a store through a host mmap does)
    assert gm.is_allocated(9) and not gm.is_allocated(10)
    assert not gm.allocated.test(9)  # KVM did not populate it itself


@pytest.mark.parametrize(
    "mode,off,ln,want",
    [
        (KEEP, 0, PAGE, None), (PUNCH, 0, PAGE, None), (PUNCH, 1 << 50, PAGE, None),
        (0, 0, PAGE, errno.EOPNOTSUPP), (mman.FALLOC_FL_PUNCH_HOLE, 0, PAGE, errno.EOPNOTSUPP),
        (KEEP, 1, PAGE, errno.EINVAL), (0, 1, 1, errno.EOPNOTSUPP),  # mode before alignment
        (KEEP, 0, 0, errno.EINVAL), (0, -1, PAGE, errno.EINVAL),  # vfs: before the mode
        (0, (1 << 63) - PAGE, PAGE, errno.EFBIG), (mman.FALLOC_FL_NO_HIDE_STALE, (1 << 63) - PAGE, PAGE,
                                                   errno.EOPNOTSUPP),
        (mman.FALLOC_FL_ZERO_RANGE | mman.FALLOC_FL_PUNCH_HOLE, 0, PAGE, errno.EOPNOTSUPP),
        (mman.FALLOC_FL_COLLAPSE_RANGE | KEEP, 0, PAGE, errno.EOPNOTSUPP),
    ],
)
def test_gmem_check_fallocate_order(mode: int, off: int, ln: int, want: int | None) -> None:
    if want is None:
        G.check_fallocate(mode, off, ln)
    else:
        with pytest.raises(OSError) as ei:
            G.check_fallocate(mode, off, ln)
        assert ei.value.errno == want


def test_gmem_write_population_is_off_by_default(gm: G.GuestMemfd) -> None:
    for call, e in [(lambda: gm.write(bytes(PAGE)), errno.EINVAL), (lambda: gm.pwrite(bytes(PAGE), 0), errno.ESPIPE),
                    (lambda: gm.lseek(0, 0), errno.ESPIPE)]:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == e


def test_gmem_write_population_option() -> None:
    """The AWS write() series (not merged): page-aligned writes populate shared pages."""
    f = G.create_file(_Vm(write_population=True), 8 * PAGE, 3)
    try:
        assert f.pwrite(b"A" * PAGE, 2 * PAGE) == PAGE
        assert f.is_allocated(2) and os.pread(f.real_fd, 2, 2 * PAGE) == b"AA"
        assert f.lseek(5 * PAGE, os.SEEK_SET) == 5 * PAGE
        assert f.write(b"B" * 2 * PAGE) == 2 * PAGE and f.lseek(0, os.SEEK_CUR) == 7 * PAGE
        assert f.write(b"C" * 2 * PAGE) == PAGE  # short at EOF
        for call, e in [(lambda: f.pwrite(b"x", 0), errno.EINVAL), (lambda: f.pwrite(bytes(PAGE), 1), errno.EINVAL),
                        (lambda: f.pwrite(bytes(PAGE), 8 * PAGE), errno.ENOSPC)]:
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == e
    finally:
        f.put()
    priv = G.create_file(_Vm(flags=1, write_population=True), 8 * PAGE, 1)
    with pytest.raises(OSError) as ei:
        priv.pwrite(bytes(PAGE), 0)  # private memory cannot be written by the host
    assert ei.value.errno == errno.EINVAL
    priv.put()
