"""VM fd ioctls on both kernels: the number scan (ENOTTY), wrong-fd-kind answers,
KVM_ENABLE_CAP, KVM_IRQFD, KVM_IOEVENTFD, TSS/identity-map, memory attributes,
KVM_CREATE_GUEST_MEMFD validation, and the VM file's other operations."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.abi.ioctl import _IOC
from fakekvm.fake.kvm.client import (
    create_guest_memfd,
    create_vm,
    enable_cap,
    open_kvm,
    outcome,
    set_memory_attributes,
)
from fakekvm.fake.kvm.vm import NOT_EMULATED_ON_LIVE
from fakekvm.kernel.seam import Kernel

SIZES = (4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 104, 112, 128, 144, 160, 312, 320, 392,
         416, 520, 592, 1024, 4096)  # fmt: skip
EMULATED = {
    K.KVM_CHECK_EXTENSION, K.KVM_CREATE_VCPU, K.KVM_GET_DIRTY_LOG, K.KVM_CLEAR_DIRTY_LOG,
    K.KVM_SET_USER_MEMORY_REGION, K.KVM_SET_USER_MEMORY_REGION2, K.KVM_ENABLE_CAP, K.KVM_IRQFD,
    K.KVM_IOEVENTFD, K.KVM_SET_TSS_ADDR, K.KVM_SET_IDENTITY_MAP_ADDR, K.KVM_CREATE_GUEST_MEMFD,
}  # fmt: skip


@pytest.fixture
def vm(any_kernel: Kernel) -> Iterator[tuple[Kernel, int, int]]:
    kvm = open_kvm(any_kernel)
    vmfd = create_vm(any_kernel, kvm)
    yield any_kernel, kvm, vmfd
    any_kernel.close(vmfd)
    any_kernel.close(kvm)


def test_unhandled_numbers_are_enotty(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    skip = EMULATED | set(NOT_EMULATED_ON_LIVE)
    other = {}
    n = 0
    for nr in range(256):
        reqs = [_IOC(0, K.KVMIO, nr, 0)] + [
            _IOC(d, K.KVMIO, nr, s) for d in (1, 2, 3) for s in SIZES
        ]
        for req in reqs:
            if req in skip:
                continue
            n += 1
            buf = bytearray(8192)
            r = outcome(lambda req=req, buf=buf: k.ioctl(fd, req, buf if req >> 30 else 0))  # type: ignore[misc]
            if r != "ENOTTY":
                other[hex(req)] = r
    assert n > 18000
    assert other == {}


def test_system_ioctls_on_vm_fd(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    for req in (K.KVM_GET_API_VERSION, K.KVM_CREATE_VM, K.KVM_GET_VCPU_MMAP_SIZE, K.KVM_RUN):
        assert outcome(lambda req=req: k.ioctl(fd, req, 0)) == "ENOTTY"  # type: ignore[misc]
    for req in (K.KVM_GET_SUPPORTED_CPUID, K.KVM_GET_MSR_INDEX_LIST, K.KVM_GET_REGS):
        assert outcome(lambda req=req: k.ioctl(fd, req, bytearray(4096))) == "ENOTTY"  # type: ignore[misc]
    # KVM_SET_MEMORY_ATTRIBUTES is not built on this kernel
    assert outcome(lambda: set_memory_attributes(k, fd, 0, 4096, 0)) == "ENOTTY"


def test_enable_cap(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    cap = K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert outcome(lambda: enable_cap(k, fd, 0)) == "EINVAL"
    assert outcome(lambda: enable_cap(k, fd, 12345)) == "EINVAL"
    assert outcome(lambda: enable_cap(k, fd, cap, 2)) == "EINVAL"  # INITIALLY_SET needs ENABLE
    assert outcome(lambda: enable_cap(k, fd, cap, 4)) == "EINVAL"
    assert outcome(lambda: enable_cap(k, fd, cap, 1, flags=1)) == "EINVAL"
    assert enable_cap(k, fd, cap, 3) == 0
    assert enable_cap(k, fd, cap, 0) == 0
    assert enable_cap(k, fd, cap, 1) == 0
    assert outcome(lambda: enable_cap(k, fd, K.KVM_CAP_HALT_POLL, 1 << 32)) == "EINVAL"
    assert enable_cap(k, fd, K.KVM_CAP_HALT_POLL, 200000) == 0
    assert outcome(lambda: k.ioctl(fd, K.KVM_ENABLE_CAP, 0)) == "EFAULT"  # NULL struct


def _irqfd(k: Kernel, fd: int, efd: int, flags: int) -> object:
    buf = bytearray(K.kvm_irqfd_fmt.pack(efd & 0xFFFFFFFF, 5, flags, 0))
    return outcome(lambda: k.ioctl(fd, K.KVM_IRQFD, buf))


def test_irqfd_without_irqchip(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    efd = k.eventfd(0)
    try:
        assert _irqfd(k, fd, efd, 0) == "EINVAL"  # no in-kernel irqchip
        assert _irqfd(k, fd, efd, 4) == "EINVAL"  # unknown flag
        assert _irqfd(k, fd, efd, K.KVM_IRQFD_FLAG_DEASSIGN) == 0  # nothing to remove: fine
        assert _irqfd(k, fd, -1, K.KVM_IRQFD_FLAG_DEASSIGN) == "EBADF"
        assert _irqfd(k, fd, fd, K.KVM_IRQFD_FLAG_DEASSIGN) == "EINVAL"  # not an eventfd
    finally:
        k.close(efd)


def _ioev(k: Kernel, fd: int, efd: int, addr: int, length: int, flags: int, dm: int = 0) -> object:
    buf = bytearray(K.kvm_ioeventfd_fmt.pack(dm, addr, length, efd, flags))
    return outcome(lambda: k.ioctl(fd, K.KVM_IOEVENTFD, buf))


def test_ioeventfd(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    DM, PIO, DEASSIGN = (K.KVM_IOEVENTFD_FLAG_DATAMATCH, K.KVM_IOEVENTFD_FLAG_PIO,
                         K.KVM_IOEVENTFD_FLAG_DEASSIGN)  # fmt: skip
    e1, e2 = k.eventfd(0), k.eventfd(0)
    try:
        assert _ioev(k, fd, e1, 0xD0000000, 4, 0) == 0
        assert _ioev(k, fd, e1, 0xD0000000, 4, 0) == "EEXIST"
        assert _ioev(k, fd, e2, 0xD0000000, 0, 0) == "EEXIST"  # len 0 matches any length
        assert _ioev(k, fd, e2, 0xD0000000, 4, PIO) == 0  # another bus
        assert _ioev(k, fd, e2, 0xD0001000, 3, 0) == "EINVAL"
        assert _ioev(k, fd, -1, 0xD0001000, 3, 0) == "EINVAL"  # len checked before the fd
        assert _ioev(k, fd, e2, 0xD0001000, 0, DM) == "EINVAL"
        assert _ioev(k, fd, e2, 0xD0001000, 4, 1 << 5) == "EINVAL"
        assert _ioev(k, fd, e2, (1 << 64) - 2, 4, 0) == "EINVAL"
        assert _ioev(k, fd, -1, 0xD0001000, 4, 0) == "EBADF"
        assert _ioev(k, fd, fd, 0xD0001000, 4, 0) == "EINVAL"
        assert _ioev(k, fd, e2, 0xD0002000, 4, DM, 7) == 0
        assert _ioev(k, fd, e1, 0xD0002000, 4, DM, 8) == 0  # other datamatch: no collision
        assert _ioev(k, fd, e1, 0xD0002000, 4, DM, 7) == "EEXIST"
        assert _ioev(k, fd, e1, 0xD0002000, 4, DM | DEASSIGN, 9) == "ENOENT"
        assert _ioev(k, fd, e1, 0xD0002000, 4, DM | DEASSIGN, 8) == 0
        assert _ioev(k, fd, e1, 0xD0000000, 4, DEASSIGN) == 0
        assert _ioev(k, fd, e1, 0xD0000000, 4, DEASSIGN) == "ENOENT"
        assert _ioev(k, fd, e2, 0xD0000000, 4, PIO | DEASSIGN) == 0
    finally:
        k.close(e1)
        k.close(e2)


def test_tss_and_identity_map(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    # (fcntl.ioctl passes an int arg as a C int: -0x2000 is 0xffffffffffffe000 to the kernel)
    assert k.ioctl(fd, K.KVM_SET_TSS_ADDR, 0x7FFFD000) == 0
    assert outcome(lambda: k.ioctl(fd, K.KVM_SET_TSS_ADDR, -0x2000)) == "EINVAL"
    buf = bytearray((0xFFFBC000).to_bytes(8, "little"))
    assert k.ioctl(fd, K.KVM_SET_IDENTITY_MAP_ADDR, buf) == 0
    assert outcome(lambda: k.ioctl(fd, K.KVM_SET_IDENTITY_MAP_ADDR, 0)) == "EFAULT"


@pytest.mark.parametrize(
    ("size", "flags", "expect"),
    [
        (0, 0, "EINVAL"),
        (2048, 0, "EINVAL"),
        (4097, 0, "EINVAL"),
        ((1 << 64) - 4096, 0, "EINVAL"),
        (4096, 1 << 2, "EINVAL"),
        (4096, 1 << 63, "EINVAL"),
        (0, 1 << 2, "EINVAL"),
        (8192, 0, "fd"),
        (8192, K.GUEST_MEMFD_FLAG_MMAP | K.GUEST_MEMFD_FLAG_INIT_SHARED, "fd"),
    ],
)
def test_create_guest_memfd(
    vm: tuple[Kernel, int, int], size: int, flags: int, expect: str
) -> None:
    k, _kvm, fd = vm
    r = outcome(lambda: create_guest_memfd(k, fd, size, flags))
    if expect == "fd":
        assert isinstance(r, int) and r >= 0
        assert k.fstat(r).st_size == size
        k.close(r)
    else:
        assert r == expect
    assert outcome(lambda: k.ioctl(fd, K.KVM_CREATE_GUEST_MEMFD, 0)) == "EFAULT"


def test_vm_file_operations(vm: tuple[Kernel, int, int]) -> None:
    k, _kvm, fd = vm
    assert outcome(lambda: k.read(fd, 8)) == "EINVAL"
    assert outcome(lambda: k.write(fd, b"x")) == "EINVAL"
    assert outcome(lambda: k.pread(fd, 8, 0)) == "ESPIPE"
    assert k.lseek(fd, 5, os.SEEK_SET) == 0
    assert outcome(lambda: k.ftruncate(fd, 0)) == "EINVAL"
    assert outcome(lambda: k.mmap(fd, 4096, mman.PROT_READ, mman.MAP_SHARED)) == "ENODEV"
    st = k.fstat(fd)
    assert stat.S_IFMT(st.st_mode) == 0 and st.st_mode & 0o777 == 0o600
    assert k.poll([(fd, mman.POLLIN | mman.POLLOUT)], 0) == [(fd, mman.POLLIN | mman.POLLOUT)]


def test_enable_x86_caps(vm: tuple[Kernel, int, int]) -> None:
    k, kvm, fd = vm

    def ec(cap: int, a0: int, vmfd: int = fd) -> object:
        return outcome(lambda: enable_cap(k, vmfd, cap, a0))

    assert ec(K.KVM_CAP_MAX_VCPU_ID, 4097) == "EINVAL"
    assert ec(K.KVM_CAP_MAX_VCPU_ID, 10) == 0
    assert ec(K.KVM_CAP_MAX_VCPU_ID, 10) == 0  # the same value again is fine
    assert ec(K.KVM_CAP_MAX_VCPU_ID, 11) == "EINVAL"
    assert ec(K.KVM_CAP_X86_APIC_BUS_CYCLES_NS, 0) == "EINVAL"
    assert ec(K.KVM_CAP_X86_APIC_BUS_CYCLES_NS, 1) == "ENXIO"  # no in-kernel APIC
    assert ec(K.KVM_CAP_DISABLE_QUIRKS2, 1535) == 0
    assert ec(K.KVM_CAP_DISABLE_QUIRKS2, 1536) == "EINVAL"
    assert ec(K.KVM_CAP_DISABLE_QUIRKS, 1 << 40) == 0  # masked, never refused
    assert ec(K.KVM_CAP_X2APIC_API, 11) == 0
    assert ec(K.KVM_CAP_X2APIC_API, 4) == "EINVAL"
    assert ec(K.KVM_CAP_X2APIC_API, 16) == "EINVAL"
    assert ec(K.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, 1) == "EINVAL"
    assert ec(K.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES, 0) == 0
    # bad arguments of the caps that change vCPU behaviour
    assert ec(K.KVM_CAP_X86_DISABLE_EXITS, 16) == "EINVAL"
    assert ec(K.KVM_CAP_X86_DISABLE_EXITS, 1) == "EINVAL"  # MWAIT is not offered here
    assert ec(K.KVM_CAP_X86_USER_SPACE_MSR, 8) == "EINVAL"
    assert ec(K.KVM_CAP_EXIT_HYPERCALL, 4097) == "EINVAL"
    assert ec(K.KVM_CAP_EXIT_ON_EMULATION_FAILURE, 2) == "EINVAL"
    for cap in (K.KVM_CAP_USER_MEMORY, K.KVM_CAP_NR_VCPUS, K.KVM_CAP_IRQFD, 300):
        assert ec(cap, 1) == "EINVAL"  # not enableable
    assert outcome(lambda: enable_cap(k, kvm, K.KVM_CAP_HALT_POLL, 1)) == "EINVAL"  # on /dev/kvm
