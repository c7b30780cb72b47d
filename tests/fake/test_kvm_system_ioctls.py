"""/dev/kvm on both kernels: API version, CHECK_EXTENSION for every cap 0..300,
VM types, the errno of every ioctl number /dev/kvm does not handle, file ops."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.abi.ioctl import _IOC
from fakekvm.fake.kvm.client import check_extension, create_vm, open_kvm, outcome
from fakekvm.fake.kvm.system import NOT_EMULATED_ON_LIVE
from fakekvm.fake.profiles import get_profile
from fakekvm.kernel.seam import Kernel

PVM = get_profile("6.18-pvm")
#: every struct size the uAPI's ioctls use (6.1 headers + REGION2), for the number scan
SIZES = (4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 104, 112, 128, 144, 160, 312, 320, 392,
         416, 520, 592, 1024, 4096)  # fmt: skip


@pytest.fixture
def kvm(any_kernel: Kernel) -> Iterator[tuple[Kernel, int]]:
    fd = open_kvm(any_kernel)
    yield any_kernel, fd
    any_kernel.close(fd)


def test_api_version_and_mmap_size(kvm: tuple[Kernel, int]) -> None:
    k, fd = kvm
    assert k.ioctl(fd, K.KVM_GET_API_VERSION, 0) == 12
    assert k.ioctl(fd, K.KVM_GET_VCPU_MMAP_SIZE, 0) == 12288
    for req in (K.KVM_GET_API_VERSION, K.KVM_GET_VCPU_MMAP_SIZE):
        assert outcome(lambda req=req: k.ioctl(fd, req, 1)) == "EINVAL"  # type: ignore[misc]
        assert outcome(lambda req=req: k.ioctl(fd, req, -1)) == "EINVAL"  # type: ignore[misc]


def test_check_extension_every_cap_sys(kvm: tuple[Kernel, int]) -> None:
    k, fd = kvm
    got = {c: check_extension(k, fd, c) for c in range(301)}
    expect = {c: PVM.sys_caps.get(c, 0) for c in range(301)}
    assert got == expect
    assert got[K.KVM_CAP_NR_VCPUS] == min(os.cpu_count() or 1, 1024)
    for c in (-1, 1000, 1 << 31 - 1):
        assert check_extension(k, fd, c) == 0


def test_check_extension_every_cap_vm(kvm: tuple[Kernel, int]) -> None:
    k, fd = kvm
    vm = create_vm(k, fd)
    try:
        got = {c: check_extension(k, vm, c) for c in range(301)}
    finally:
        k.close(vm)
    assert got == {c: PVM.vm_caps(0).get(c, 0) for c in range(301)}
    assert got[K.KVM_CAP_X2APIC_API] == 11 and PVM.sys_caps[K.KVM_CAP_X2APIC_API] == 15


@pytest.mark.parametrize("vm_type", [0, 1, 2, 3, 4, 5, 6, 7, 9, 256, -1])
def test_create_vm_types(kvm: tuple[Kernel, int], vm_type: int) -> None:
    k, fd = kvm
    r = outcome(lambda: create_vm(k, fd, vm_type))
    if vm_type == 0:
        assert isinstance(r, int) and r >= 0
        assert check_extension(k, r, K.KVM_CAP_USER_MEMORY) == 1
        k.close(r)
    else:
        assert r == "EINVAL"


def _numbers() -> Iterator[int]:
    for nr in range(256):
        yield _IOC(0, K.KVMIO, nr, 0)
        for d in (1, 2, 3):
            for s in SIZES:
                yield _IOC(d, K.KVMIO, nr, s)


def test_unhandled_numbers_are_einval(kvm: tuple[Kernel, int]) -> None:
    """All 18 687 candidate numbers: EINVAL unless handled (measured live)."""
    k, fd = kvm
    handled = {K.KVM_GET_API_VERSION, K.KVM_CREATE_VM, K.KVM_CHECK_EXTENSION,
               K.KVM_GET_VCPU_MMAP_SIZE, *NOT_EMULATED_ON_LIVE}  # fmt: skip
    other: dict[int, object] = {}
    n = 0
    for req in _numbers():
        if req in handled:
            continue
        n += 1
        buf = bytearray(8192)
        r = outcome(lambda req=req, buf=buf: k.ioctl(fd, req, buf if req >> 30 else 0))  # type: ignore[misc]
        if r != "EINVAL":
            other[req] = r
    assert n > 18000
    assert other == {}


def test_vm_and_vcpu_ioctls_on_dev_kvm_are_einval(kvm: tuple[Kernel, int]) -> None:
    k, fd = kvm
    for req in (K.KVM_CREATE_VCPU, K.KVM_RUN, K.KVM_SET_TSS_ADDR, K.KVM_CREATE_IRQCHIP):
        assert outcome(lambda req=req: k.ioctl(fd, req, 0)) == "EINVAL"  # type: ignore[misc]
    for req in (K.KVM_SET_USER_MEMORY_REGION, K.KVM_GET_DIRTY_LOG, K.KVM_ENABLE_CAP,
                K.KVM_GET_REGS, K.KVM_CREATE_GUEST_MEMFD, K.KVM_SET_MEMORY_ATTRIBUTES):  # fmt: skip
        assert outcome(lambda req=req: k.ioctl(fd, req, bytearray(256))) == "EINVAL"  # type: ignore[misc]


def test_file_operations(kvm: tuple[Kernel, int]) -> None:
    k, fd = kvm
    assert outcome(lambda: k.read(fd, 8)) == "EINVAL"
    assert outcome(lambda: k.write(fd, b"x")) == "EINVAL"
    assert outcome(lambda: k.pread(fd, 8, 0)) == "EINVAL"
    assert k.lseek(fd, 5, os.SEEK_SET) == 0
    assert outcome(lambda: k.ftruncate(fd, 0)) == "EINVAL"
    assert outcome(lambda: k.mmap(fd, 4096, mman.PROT_READ, mman.MAP_SHARED)) == "ENODEV"
    st = k.fstat(fd)
    assert stat.S_ISCHR(st.st_mode) and st.st_mode & 0o777 == 0o600
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (10, 232)
    assert k.poll([(fd, mman.POLLIN | mman.POLLOUT)], 0) == [(fd, mman.POLLIN | mman.POLLOUT)]


def test_vm_outlives_dev_kvm_fd(any_kernel: Kernel) -> None:
    k = any_kernel
    kvm = open_kvm(k)
    vm = create_vm(k, kvm)
    k.close(kvm)
    assert check_extension(k, vm, K.KVM_CAP_NR_MEMSLOTS) == 32764
    k.close(vm)
    assert outcome(lambda: check_extension(k, vm, 0)) == errno.errorcode[errno.EBADF]
