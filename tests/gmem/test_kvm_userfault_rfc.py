"""KVM Userfault RFC (NOT UPSTREAM): enable cap, USERFAULT attribute, KVM_READ_USERFAULT, async path."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import kvm_userfault as KU
from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.kvm import private as P
from fakekvm.fake.kvm import userfault as U
from fakekvm.testing import gmem_scenarios as S

PAGE = 4096
UFA = P.KVM_MEMORY_ATTRIBUTE_USERFAULT
RW = mman.PROT_READ | mman.PROT_WRITE
CAP = KU.USERFAULT_CAP_BY_REVISION["rfc"]
GUARD_S = 20.0  # a guard against hangs, never a synchronisation


def _cap(cap: int, flags: int, a0: int, a1: int) -> bytearray:
    return bytearray(K.kvm_enable_cap_fmt.pack(cap, flags, a0, a1, 0, 0))


def _attr(gpa: int, size: int, value: int) -> bytearray:
    return bytearray(K.kvm_memory_attributes_fmt.pack(gpa, size, value, 0))


@pytest.fixture
def rfc() -> Iterator[tuple[FakeKernel, int, object]]:
    k = FakeKernel(profile="6.10-rfc-userfault")
    with S.vm(k, 0) as v:
        yield k, v, k.file(v)
    k.shutdown()


def _errno(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.errno or 0


def test_kvm_userfault_rfc_enable_cap_rules(rfc: tuple[FakeKernel, int, object]) -> None:
    k, v, vm = rfc
    assert k.ioctl(v, K.KVM_CHECK_EXTENSION, CAP) == 1
    ev = k.eventfd(0, os.O_NONBLOCK)
    memfd = k.memfd_create("x")
    req = K.KVM_ENABLE_CAP
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 1, U.KVM_USERFAULT_ENABLE, ev)) == errno.EINVAL
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 0, 0, ev)) == errno.EINVAL
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 0, 3, ev)) == errno.EINVAL
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 0, 4, ev)) == errno.EINVAL
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 0, 1, (1 << 64) - 1)) == errno.EBADF
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 0, 1, memfd)) == errno.EINVAL
    assert _errno(U.enable_cap, vm, req, _cap(KU.USERFAULT_CAP_BY_REVISION["v3"], 0, 1, ev)) == errno.EINVAL
    assert not U.rfc_enabled(vm)
    # the attribute is supported only while userfault is enabled
    assert _errno(P.set_memory_attributes, vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0, PAGE, UFA)) == errno.EINVAL
    assert U.enable_cap(vm, req, _cap(CAP, 0, U.KVM_USERFAULT_ENABLE, ev)) == 0
    assert U.rfc_enabled(vm) and P.supported_attributes(vm) == UFA
    assert _errno(U.enable_cap, vm, req, _cap(CAP, 0, U.KVM_USERFAULT_ENABLE, ev)) == errno.EEXIST
    assert P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0, PAGE, UFA)) == 0
    assert U.enable_cap(vm, req, _cap(CAP, 0, U.KVM_USERFAULT_DISABLE, 0)) == 0
    assert not U.rfc_enabled(vm) and P.supported_attributes(vm) == 0
    assert U.enable_cap(vm, req, _cap(CAP, 0, U.KVM_USERFAULT_DISABLE, 0)) == 0
    assert U.enable_cap(vm, req, _cap(CAP, 0, U.KVM_USERFAULT_ENABLE, ev)) == 0


def test_kvm_userfault_rfc_read_userfault_empty_and_other_profiles(rfc: tuple[FakeKernel, int, object]) -> None:
    _k, _v, vm = rfc
    buf = bytearray(8)
    assert _errno(U.read_userfault, vm, KU.KVM_READ_USERFAULT, buf) == errno.ENOENT
    assert KU.KVM_READ_USERFAULT == 0x8008AED5
    other = FakeKernel(profile="6.18")
    try:
        with S.vm(other) as ov:
            assert _errno(U.read_userfault, other.file(ov), KU.KVM_READ_USERFAULT, buf) == errno.ENOTTY
            assert U.access_check_for(other.file(ov)) is None
    finally:
        other.shutdown()


def test_kvm_userfault_rfc_vcpu_exit(rfc: tuple[FakeKernel, int, object]) -> None:
    k, v, vm = rfc
    ev = k.eventfd(0, os.O_NONBLOCK)
    mem = k.mmap(-1, 8 * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    ctypes.memmove(mem.address + 2 * PAGE, b"filled!!", 8)
    assert S.region2(k, v, 0, 0, 0, 8 * PAGE, mem.address) == 0
    U.enable_cap(vm, K.KVM_ENABLE_CAP, _cap(CAP, 0, U.KVM_USERFAULT_ENABLE, ev))
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0, 8 * PAGE, UFA))
    cpu = S.ModelVcpu(k, v)
    assert cpu.read(0x2abc) == P.MemoryFault(KU.KVM_MEMORY_EXIT_FLAG_USERFAULT, 0x2000, 4096)
    assert U.rfc_userfault_exit(vm, 0x2000, True) == P.MemoryFault(0x18, 0x2000, 4096)
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0x2000, PAGE, 0))
    assert cpu.read(0x2000) == b"filled!!"
    assert cpu.read(0x3000) == P.MemoryFault(KU.KVM_MEMORY_EXIT_FLAG_USERFAULT, 0x3000, 4096)
    assert _errno(k.read, ev, 8) == errno.EAGAIN  # vCPU exits do not signal the eventfd


def test_kvm_userfault_rfc_async_userfault(rfc: tuple[FakeKernel, int, object]) -> None:
    k, _v, vm = rfc
    ev = k.eventfd(0, os.O_NONBLOCK)
    U.enable_cap(vm, K.KVM_ENABLE_CAP, _cap(CAP, 0, U.KVM_USERFAULT_ENABLE, ev))
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0x5000, 2 * PAGE, UFA))
    assert U.async_userfault(vm, 0x10) is True  # not userfault-enabled: no wait at all
    done: list[bool] = []
    errs: list[BaseException] = []

    def emulator_access(gfn: int) -> None:
        try:
            done.append(U.async_userfault(vm, gfn, timeout=GUARD_S))
        except BaseException as e:
            errs.append(e)

    t = threading.Thread(target=emulator_access, args=(5,), daemon=True)
    t.start()
    # the eventfd becomes readable once the gfn is queued (a blocking poll, no sleep)
    assert k.poll([(ev, mman.POLLIN)], int(GUARD_S * 1000)) == [(ev, mman.POLLIN)]
    assert struct.unpack("<Q", k.read(ev, 8)) == (1,)
    buf = bytearray(8)
    assert U.read_userfault(vm, KU.KVM_READ_USERFAULT, buf) == 0
    assert struct.unpack("<Q", buf) == (5,)  # kvm_fault.address carries the gfn
    assert _errno(U.read_userfault, vm, KU.KVM_READ_USERFAULT, buf) == errno.ENOENT
    assert t.is_alive() and not done  # still waiting: its attribute is set
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0x6000, PAGE, 0))  # another gfn
    assert t.is_alive() and not done
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0x5000, PAGE, 0))
    t.join(GUARD_S)
    assert not t.is_alive() and done == [True] and not errs
    # READ_USERFAULT into user memory by pointer
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0x6000, PAGE, UFA))
    t2 = threading.Thread(target=emulator_access, args=(6,), daemon=True)
    t2.start()
    assert k.poll([(ev, mman.POLLIN)], int(GUARD_S * 1000)) == [(ev, mman.POLLIN)]
    out = k.mmap(-1, PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)  # user memory of the fake process
    assert U.read_userfault(vm, KU.KVM_READ_USERFAULT, out.address + 8) == 0
    assert struct.unpack("<QQ", k.mm.read(out.address, 16)) == (0, 6) and U.pending(vm) == []
    assert _errno(U.read_userfault, vm, KU.KVM_READ_USERFAULT, 8) == errno.ENOENT
    # disabling userfault releases the waiter too
    U.enable_cap(vm, K.KVM_ENABLE_CAP, _cap(CAP, 0, U.KVM_USERFAULT_DISABLE, 0))
    t2.join(GUARD_S)
    assert not t2.is_alive() and done == [True, True] and not errs


def test_kvm_userfault_rfc_waiter_woken_by_shutdown() -> None:
    k = FakeKernel(profile="6.10-rfc-userfault")
    kfd = k.open("/dev/kvm", os.O_RDWR)
    vm = k.file(k.ioctl(kfd, K.KVM_CREATE_VM, 0))
    ev = k.eventfd(0, os.O_NONBLOCK)
    U.enable_cap(vm, K.KVM_ENABLE_CAP, _cap(CAP, 0, U.KVM_USERFAULT_ENABLE, ev))
    P.set_memory_attributes(vm, K.KVM_SET_MEMORY_ATTRIBUTES, _attr(0, PAGE, UFA))
    errs: list[OSError] = []

    def run() -> None:
        try:
            U.async_userfault(vm, 0)
        except OSError as e:
            errs.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert k.poll([(ev, mman.POLLIN)], int(GUARD_S * 1000)) == [(ev, mman.POLLIN)]
    k.shutdown()  # the fake never leaves a thread hanging: the waiter fails ESHUTDOWN
    t.join(GUARD_S)
    assert not t.is_alive() and len(errs) == 1 and errs[0].errno == errno.ESHUTDOWN


def test_kvm_userfault_rfc_wiring_helpers(rfc: tuple[FakeKernel, int, object]) -> None:
    _k, _v, vm = rfc
    handlers = U.vm_ioctls(vm)
    assert set(handlers) == {KU.KVM_READ_USERFAULT, K.KVM_SET_MEMORY_ATTRIBUTES}
    with pytest.raises(OSError) as ei:
        handlers[KU.KVM_READ_USERFAULT](bytearray(8))
    assert ei.value.errno == errno.ENOENT
    assert U.handles_enable_cap(vm, CAP) and not U.handles_enable_cap(vm, 243)
    v3 = FakeKernel(profile="6.18+kvm-userfault")
    try:
        with S.vm(v3) as v:
            assert U.vm_ioctls(v3.file(v)) == {} and not U.handles_enable_cap(v3.file(v), 243)
    finally:
        v3.shutdown()
