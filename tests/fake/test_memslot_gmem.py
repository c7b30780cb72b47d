"""guest_memfd memslots on both kernels: binding, ranges, ownership, immutability."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.fake.kvm.client import (
    create_guest_memfd,
    create_vm,
    open_kvm,
    outcome,
    set_region,
    set_region2,
)
from fakekvm.kernel.seam import Kernel

H = 0x7F0000000000
P = 4096
GMEM, LOG = K.KVM_MEM_GUEST_MEMFD, K.KVM_MEM_LOG_DIRTY_PAGES


@pytest.fixture
def env(any_kernel: Kernel) -> Iterator[tuple[Kernel, int, int, int]]:
    k = any_kernel
    kvm = open_kvm(k)
    vm = create_vm(k, kvm)
    gm = create_guest_memfd(k, vm, 16 * P, K.GUEST_MEMFD_FLAG_MMAP | K.GUEST_MEMFD_FLAG_INIT_SHARED)
    yield k, kvm, vm, gm
    k.close(gm)
    k.close(vm)
    k.close(kvm)


def test_bind_ranges(env: tuple[Kernel, int, int, int]) -> None:
    k, _kvm, vm, gm = env

    def r2(slot: int, flags: int, gpa: int, size: int, off: int, fd: int) -> object:
        return outcome(lambda: set_region2(k, vm, slot, flags, gpa, size, H, off, fd))

    assert r2(0, GMEM, 0, 4 * P, 0, gm) == 0
    assert r2(1, GMEM, 1 << 30, 4 * P, 2 * P, gm) == "EINVAL"  # file range already bound
    assert r2(1, GMEM, 1 << 30, 4 * P, 4 * P, gm) == 0  # adjacent file range: fine
    assert r2(2, GMEM, 2 << 30, 9 * P, 8 * P, gm) == "EINVAL"  # past the end of the file
    assert r2(2, GMEM, 2 << 30, 8 * P, 8 * P, gm) == 0  # exactly to the end
    assert r2(3, GMEM, 3 << 30, P, 16 * P, gm) == "EINVAL"
    assert r2(3, GMEM, 0x2000, P, 0, gm) == "EEXIST"  # gpa overlap is checked before binding
    # delete frees the file range
    assert r2(1, 0, 0, 0, 0, 0) == 0
    assert r2(4, GMEM, 4 << 30, 4 * P, 4 * P, gm) == 0


def test_gmem_slot_is_immutable(env: tuple[Kernel, int, int, int]) -> None:
    k, _kvm, vm, gm = env

    def r2(flags: int, gpa: int, size: int = 4 * P, hva: int = H) -> object:
        return outcome(lambda: set_region2(k, vm, 0, flags, gpa, size, hva, 0, gm))

    assert r2(GMEM, 0) == 0
    assert r2(GMEM, 0) == "EINVAL"  # even re-issuing the same parameters
    assert r2(GMEM, 1 << 30) == "EINVAL"  # move
    assert r2(0, 0) == "EINVAL"  # dropping the flag
    assert r2(GMEM | LOG, 0) == "EINVAL"
    assert outcome(lambda: set_region(k, vm, 0, 0, 0, 4 * P, H)) == "EINVAL"
    assert outcome(lambda: set_region(k, vm, 0, 0, 0, 0, 0)) == 0  # delete works
    assert r2(GMEM, 1 << 30) == 0  # and the slot can be made again


def test_gmem_of_another_vm(env: tuple[Kernel, int, int, int]) -> None:
    k, kvm, vm, _gm = env
    vm2 = create_vm(k, kvm)
    gm2 = create_guest_memfd(k, vm2, 4 * P)
    try:
        assert outcome(lambda: set_region2(k, vm, 0, GMEM, 0, P, H, 0, gm2)) == "EINVAL"
        assert set_region2(k, vm2, 0, GMEM, 0, P, H, 0, gm2) == 0
        memfd = k.memfd_create("not-gmem", 0)
        k.ftruncate(memfd, P)
        assert outcome(lambda: set_region2(k, vm, 0, GMEM, 0, P, H, 0, memfd)) == "EINVAL"
        k.close(memfd)
    finally:
        k.close(gm2)
        k.close(vm2)


def test_slot_keeps_gmem_after_close(env: tuple[Kernel, int, int, int]) -> None:
    k, _kvm, vm, _gm = env
    gm3 = create_guest_memfd(k, vm, 4 * P)
    assert set_region2(k, vm, 5, GMEM, 0, 4 * P, H, 0, gm3) == 0
    k.close(gm3)  # the memslot holds its own reference
    assert outcome(lambda: set_region2(k, vm, 5, GMEM, 0, 4 * P, H, 0, gm3)) == "EINVAL"
    assert set_region(k, vm, 5, 0, 0, 0, 0) == 0
