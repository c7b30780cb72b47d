"""KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG on both kernels: errnos, the bytes written
to the user buffer (and only those), manual protect with INITIALLY_SET, CLEAR rules,
bitmaps kept across moves and dropped on delete. No guest runs, so every dirty bit
here comes from INITIALLY_SET; guest-made dirtiness is compared in the lead's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake.kvm.client import (
    clear_dirty_log,
    create_vm,
    enable_cap,
    open_kvm,
    outcome,
    set_region,
)
from fakekvm.kernel.seam import Kernel

H = 0x7F0000000000
LOG = K.KVM_MEM_LOG_DIRTY_PAGES
MANUAL = K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | K.KVM_DIRTY_LOG_INITIALLY_SET
NPAGES = 100  # not a multiple of 64: the bitmap has 2 words, the last one partial


@pytest.fixture
def vm(any_kernel: Kernel) -> Iterator[tuple[Kernel, int]]:
    kvm = open_kvm(any_kernel)
    vmfd = create_vm(any_kernel, kvm)
    yield any_kernel, vmfd
    any_kernel.close(vmfd)
    any_kernel.close(kvm)


def get_log(k: Kernel, vmfd: int, slot: int, *, fill: int = 0xAA, size: int = 64) -> object:
    """GET_DIRTY_LOG into a buffer pre-filled with ``fill``; the whole buffer comes back."""
    m = k.mmap(-1, 4096, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    try:
        mv = memoryview(m).cast("B")  # type: ignore[arg-type]
        mv[:size] = bytes([fill]) * size
        buf = bytearray(K.kvm_dirty_log_fmt.pack(slot, 0, m.address))
        r = outcome(lambda: k.ioctl(vmfd, K.KVM_GET_DIRTY_LOG, buf))
        out = bytes(mv[:size])
        del mv
        return out if r == 0 else r
    finally:
        k.munmap(m.address, 4096)


INITIAL = b"\xff" * 12 + b"\x0f" + b"\x00" * 3  # 100 bits set in 16 bytes


def test_errors(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    assert set_region(k, fd, 0, 0, 0, NPAGES * 4096, H) == 0
    assert get_log(k, fd, 0) == "ENOENT"  # no LOG_DIRTY_PAGES
    assert get_log(k, fd, 7) == "ENOENT"  # no slot
    assert get_log(k, fd, 32764) == "EINVAL"
    assert get_log(k, fd, 1 << 16) == "EINVAL"
    assert set_region(k, fd, 1, LOG, 1 << 30, NPAGES * 4096, H) == 0
    buf = bytearray(K.kvm_dirty_log_fmt.pack(1, 0, 0))
    assert outcome(lambda: k.ioctl(fd, K.KVM_GET_DIRTY_LOG, buf)) == "EFAULT"
    assert outcome(lambda: k.ioctl(fd, K.KVM_GET_DIRTY_LOG, 0)) == "EFAULT"
    assert outcome(lambda: k.ioctl(fd, K.KVM_CLEAR_DIRTY_LOG, 0)) == "EFAULT"
    assert outcome(lambda: clear_dirty_log(k, fd, 0, 0, 64, b"\0" * 8)) == "ENOENT"
    assert outcome(lambda: clear_dirty_log(k, fd, 32764, 0, 64, b"\0" * 8)) == "EINVAL"


def test_fresh_log_is_clean_and_exactly_sized(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    assert set_region(k, fd, 0, LOG, 0, NPAGES * 4096, H) == 0
    assert get_log(k, fd, 0) == b"\x00" * 16 + b"\xaa" * 48  # ALIGN(100, 64) / 8 bytes written
    assert set_region(k, fd, 1, LOG, 1 << 30, 4096, H) == 0
    assert get_log(k, fd, 1) == b"\x00" * 8 + b"\xaa" * 56


def test_initially_set(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    assert enable_cap(k, fd, K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL) == 0
    assert set_region(k, fd, 0, LOG, 0, NPAGES * 4096, H) == 0
    assert get_log(k, fd, 0, size=16) == INITIAL
    assert get_log(k, fd, 0, size=16) == INITIAL  # manual protect: GET does not clear


def test_clear_rules(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    assert enable_cap(k, fd, K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL) == 0
    assert set_region(k, fd, 0, LOG, 0, NPAGES * 4096, H) == 0

    def clr(first: int, num: int, bm: bytes | None) -> object:
        return outcome(lambda: clear_dirty_log(k, fd, 0, first, num, bm))

    assert clr(1, 63, b"\xff" * 8) == "EINVAL"  # first_page not 64-aligned
    assert clr(128, 0, b"") == "EINVAL"  # first_page > npages
    assert clr(0, 101, b"\xff" * 16) == "EINVAL"  # beyond the slot
    assert clr(0, 65, b"\xff" * 16) == "EINVAL"  # not a multiple of 64 and not to the end
    assert clr(0, 64, None) == "EFAULT"
    assert clr(0, 0, b"") == 0
    assert get_log(k, fd, 0, size=16) == INITIAL
    # clear pages 0, 2 and 9..15, then 64..99 (reaches the end: any num_pages is fine)
    assert clr(0, 64, bytes([0x05, 0xFE]) + b"\0" * 6) == 0
    assert get_log(k, fd, 0, size=16) == bytes([0xFA, 0x01]) + INITIAL[2:]
    assert clr(64, 36, b"\xff" * 8) == 0  # bits past the slot end are ignored
    assert get_log(k, fd, 0, size=16) == bytes([0xFA, 0x01]) + b"\xff" * 6 + b"\0" * 8
    assert clr(0, 100, b"\xff" * 16) == 0
    assert get_log(k, fd, 0, size=16) == b"\0" * 16


def test_log_follows_flag_changes_moves_and_deletes(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    assert set_region(k, fd, 0, 0, 0, NPAGES * 4096, H) == 0
    assert enable_cap(k, fd, K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL) == 0
    assert set_region(k, fd, 0, LOG, 0, NPAGES * 4096, H) == 0  # enabling the log: all set
    assert get_log(k, fd, 0, size=16) == INITIAL
    assert outcome(lambda: clear_dirty_log(k, fd, 0, 0, 64, b"\xff" * 8)) == 0
    assert set_region(k, fd, 0, LOG, 1 << 30, NPAGES * 4096, H) == 0  # move keeps the bitmap
    assert get_log(k, fd, 0, size=16) == b"\0" * 8 + INITIAL[8:]
    assert set_region(k, fd, 0, 0, 1 << 30, NPAGES * 4096, H) == 0  # log off
    assert get_log(k, fd, 0) == "ENOENT"
    assert set_region(k, fd, 0, LOG, 1 << 30, NPAGES * 4096, H) == 0  # on again: new bitmap
    assert get_log(k, fd, 0, size=16) == INITIAL
    assert set_region(k, fd, 0, 0, 0, 0, 0) == 0
    assert get_log(k, fd, 0) == "ENOENT"


def test_manual_protect_without_initially_set(vm: tuple[Kernel, int]) -> None:
    k, fd = vm
    cap = K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert enable_cap(k, fd, cap, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0
    assert set_region(k, fd, 0, LOG, 0, NPAGES * 4096, H) == 0
    assert get_log(k, fd, 0, size=16) == b"\0" * 16
    assert outcome(lambda: clear_dirty_log(k, fd, 0, 0, 100, b"\xff" * 16)) == 0


def test_client_helper_reads_the_log(vm: tuple[Kernel, int]) -> None:
    from fakekvm.fake.kvm.client import get_dirty_log

    k, fd = vm
    assert enable_cap(k, fd, K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, MANUAL) == 0
    assert set_region(k, fd, 2, LOG, 0, NPAGES * 4096, H) == 0
    assert get_dirty_log(k, fd, 2, 16) == INITIAL
