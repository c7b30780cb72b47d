"""KVM_SET_USER_MEMORY_REGION{,2} validation: every errno row of uapi.md §4 and of
the live probe, run on the host kernel and on FakeKernel(6.18-pvm); both must agree."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.fake.kvm.client import create_vm, open_kvm, outcome, set_region, set_region2
from fakekvm.kernel.seam import Kernel

H = 0x7F0000000000  # a page-aligned user address; memslots need not be mapped to be set
G = 0x100000
LOG, RO, GMEM = K.KVM_MEM_LOG_DIRTY_PAGES, K.KVM_MEM_READONLY, K.KVM_MEM_GUEST_MEMFD
TASK_SIZE_MAX = (1 << 47) - 4096


@pytest.fixture
def vm(any_kernel: Kernel) -> Iterator[tuple[Kernel, int]]:
    kvm = open_kvm(any_kernel)
    vmfd = create_vm(any_kernel, kvm)
    yield any_kernel, vmfd
    any_kernel.close(vmfd)
    any_kernel.close(kvm)


def r1(v: tuple[Kernel, int], slot: int, flags: int, gpa: int, size: int, hva: int) -> object:
    k, fd = v
    return outcome(lambda: set_region(k, fd, slot, flags, gpa, size, hva))


def r2(v: tuple[Kernel, int], slot: int, flags: int, gpa: int, size: int, hva: int,
       off: int = 0, gfd: int = 0, pad1: int = 0) -> object:  # fmt: skip
    k, fd = v
    return outcome(lambda: set_region2(k, fd, slot, flags, gpa, size, hva, off, gfd, pad1))


@pytest.mark.parametrize(
    ("hva", "size", "expect"),
    [
        (TASK_SIZE_MAX - 4096, 4096, 0),  # ends exactly at TASK_SIZE_MAX
        (TASK_SIZE_MAX, 4096, "EINVAL"),
        (1 << 47, 4096, "EINVAL"),
        ((1 << 64) - 4096, 4096, "EINVAL"),
        (0, 4096, 0),  # address 0 is fine for a slot
        (H + 1, 4096, "EINVAL"),
        (H, 4097, "EINVAL"),
    ],
)
def test_user_range_limits(vm: tuple[Kernel, int], hva: int, size: int, expect: object) -> None:
    assert r1(vm, 5, 0, 1 << 32, size, hva) == expect


def test_alignment_and_overflow(vm: tuple[Kernel, int]) -> None:
    assert r1(vm, 0, 0, G + 1, 4096, H) == "EINVAL"
    assert r1(vm, 0, 0, G, 2048, H) == "EINVAL"
    assert r1(vm, 0, 0, (1 << 64) - 4096, 8192, H) == "EINVAL"  # gpa + size wraps
    assert r1(vm, 0, 0, 1 << 60, 4096, H) == "EINVAL"  # beyond kvm_mmu_max_gfn (52 bits)
    assert r1(vm, 0, 0, (1 << 52) - 4096, 4096, H) == 0  # the last gfn is fine
    assert r1(vm, 1, 0, 0, (1 << 31) * 4096, H) == "EINVAL"  # > KVM_MEM_MAX_NR_PAGES
    # (the largest legal slot, 2^31-1 pages, costs the live kernel ~18 s of rmap setup:
    # not run here)


def test_slot_ids_and_address_spaces(vm: tuple[Kernel, int]) -> None:
    assert r1(vm, 32763, 0, 1 << 33, 4096, H) == 0
    assert r1(vm, 32763, 0, 0, 0, 0) == 0  # delete
    assert r1(vm, 32764, 0, 1 << 33, 4096, H) == "EINVAL"
    assert r1(vm, 32767, 0, 0, 0, 0) == "EINVAL"
    assert r1(vm, 1 << 16, 0, 0, 4096, H) == "EINVAL"  # one address space on this VM
    assert r1(vm, 1 << 16, 0, 0, 0, 0) == "EINVAL"
    assert r1(vm, 40000, 8, 0, 4096, H) == "EINVAL"


def test_flags(vm: tuple[Kernel, int]) -> None:
    assert r1(vm, 0, 1 << 3, G, 4096, H) == "EINVAL"  # KVM_MEM_USERFAULT is not upstream
    assert r1(vm, 0, GMEM, G, 4096, H) == "EINVAL"  # v1 ioctl cannot take GUEST_MEMFD
    assert r2(vm, 0, 1 << 15, G, 4096, H) == "EINVAL"
    assert r2(vm, 0, 1 << 3, G, 4096, H) == "EINVAL"
    assert r1(vm, 0, LOG | RO, G, 4096, H) == 0


def test_delete(vm: tuple[Kernel, int]) -> None:
    assert r1(vm, 6, 0, 0, 0, 0) == "EINVAL"  # delete of an empty slot
    assert r1(vm, 0, 0, G, 0x10000, H) == 0
    assert r1(vm, 0, RO, 0x12345, 0, H + 1) == "EINVAL"  # alignment is checked before delete
    assert r1(vm, 0, RO, 0x5000, 0, H + 0x1000) == 0  # other fields are ignored on delete
    assert r1(vm, 0, 0, 0, 0, 0) == "EINVAL"  # already gone


def test_modify_rules(vm: tuple[Kernel, int]) -> None:
    assert r1(vm, 0, 0, 0, 0x10000, H) == 0
    assert r1(vm, 0, 0, 0, 0x10000, H) == 0  # identical: no change
    assert r1(vm, 0, 0, G, 0x10000, H) == 0  # move
    assert r1(vm, 0, 0, G, 0x20000, H) == "EINVAL"  # resize
    assert r1(vm, 0, 0, G, 0x10000, H + 0x10000) == "EINVAL"  # new hva
    assert r1(vm, 0, RO, G, 0x10000, H) == "EINVAL"  # READONLY cannot toggle
    assert r1(vm, 0, LOG, G, 0x10000, H) == 0  # LOG_DIRTY_PAGES can
    assert r1(vm, 0, 0, 0x200000, 0x10000, H) == 0  # move + flag change together


def test_overlap(vm: tuple[Kernel, int]) -> None:
    assert r1(vm, 0, 0, G, 0x10000, H) == 0
    assert r1(vm, 1, 0, G + 0x8000, 0x10000, H) == "EEXIST"
    assert r1(vm, 1, 0, G - 0x8000, 0x10000, H) == "EEXIST"
    assert r1(vm, 1, 0, G - 0x1000, 0x20000, H) == "EEXIST"  # covers slot 0
    assert r1(vm, 1, 0, G + 0x10000, 0x10000, H) == 0  # adjacent
    assert r1(vm, 2, 0, G - 0x1000, 0x1000, H) == 0  # adjacent below
    assert r1(vm, 0, LOG, G + 0x10000, 0x10000, H) == "EEXIST"  # move onto slot 1
    assert r1(vm, 1, 0, 0, 0, 0) == 0
    assert r1(vm, 0, LOG, G + 0x10000, 0x10000, H) == 0  # now free
    assert r1(vm, 3, 0, G, 0x10000, H) == 0  # hva ranges may overlap; only gpa matters


def test_guest_memfd_binding_errors(vm: tuple[Kernel, int]) -> None:
    _k, fd = vm
    assert r2(vm, 2, GMEM, 0x300000, 4096, H, 0, -1) == "EBADF"
    assert r2(vm, 2, GMEM, 0x300000, 4096, H, 0, fd) == "EINVAL"  # a VM fd is not a gmem
    assert r2(vm, 2, GMEM, 0x300000, 4096, H, 1, -1) == "EINVAL"  # unaligned offset first
    assert r2(vm, 2, GMEM | RO, 0x300000, 4096, H, 0, -1) == "EINVAL"
    assert r2(vm, 2, GMEM | LOG, 0x300000, 4096, H, 0, -1) == "EINVAL"
    assert r2(vm, 2, GMEM, 0x300000, 8192, H, (1 << 64) - 4096, -1) == "EINVAL"
    # without the flag, guest_memfd and its offset are ignored; pads are not checked
    assert r2(vm, 2, 0, 0x300000, 4096, H, 1, -1, pad1=7) == 0


def test_region2_and_region1_share_slots(vm: tuple[Kernel, int]) -> None:
    assert r2(vm, 4, 0, 0x400000, 0x2000, H) == 0
    assert r1(vm, 4, 0, 0x400000, 0x2000, H) == 0  # the same slot, unchanged
    assert r1(vm, 5, 0, 0x401000, 0x1000, H) == "EEXIST"
    assert r1(vm, 4, 0, 0, 0, 0) == 0
