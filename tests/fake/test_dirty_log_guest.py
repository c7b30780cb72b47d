"""A real-mode guest stores to two pages; the dirty log is compared byte for byte on
both kernels (KVM_RUN on the host, B's unicorn vCPU on the fake)."""

from __future__ import annotations

import struct

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake.kvm.client import create_vm, enable_cap, get_dirty_log, open_kvm, set_region
from fakekvm.kernel.seam import Kernel

P = 4096
NPAGES = 16
# mov byte [0x5000], 1 ; mov byte [0x7000], 2 ; mov al, [0x9000] ; hlt   (16-bit, ds = 0)
CODE = bytes.fromhex("c606005001c606007002a00090f4")


def _run_guest(k: Kernel, vm: int) -> int:
    vcpu = k.ioctl(vm, K.KVM_CREATE_VCPU, 0)
    run = k.mmap(vcpu, 3 * P, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED)
    sregs = bytearray(312)
    k.ioctl(vcpu, K.KVM_GET_SREGS, sregs)
    for seg in (0, 24):  # cs, ds: base 0, selector 0
        struct.pack_into("<Q", sregs, seg, 0)
        struct.pack_into("<H", sregs, seg + 12, 0)
    k.ioctl(vcpu, K.KVM_SET_SREGS, sregs)
    regs = bytearray(144)
    struct.pack_into("<QQ", regs, 128, 0x1000, 2)  # rip, rflags
    k.ioctl(vcpu, K.KVM_SET_REGS, regs)
    k.ioctl(vcpu, K.KVM_RUN, 0)
    reason = struct.unpack_from("<I", memoryview(run).cast("B"), 8)[0]  # type: ignore[arg-type]
    k.munmap(run.address, run.length)
    k.close(vcpu)
    return int(reason)


def test_guest_writes_are_logged(any_kernel: Kernel) -> None:
    k = any_kernel
    kvm = open_kvm(k)
    vm = create_vm(k, kvm)
    mem = k.mmap(
        -1, NPAGES * P, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
    )
    memoryview(mem).cast("B")[0x1000 : 0x1000 + len(CODE)] = CODE  # type: ignore[arg-type]
    try:
        assert set_region(k, vm, 0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, NPAGES * P, mem.address) == 0
        assert _run_guest(k, vm) == K.KVM_EXIT_HLT
        view = memoryview(mem).cast("B")  # type: ignore[arg-type]
        assert (view[0x5000], view[0x7000]) == (1, 2)
        del view
        # pages 5 and 7 were written; page 9 was only read, page 1 (code) only fetched
        assert get_dirty_log(k, vm, 0, 8) == bytes([0xA0, 0x00]) + bytes(6)
        assert get_dirty_log(k, vm, 0, 8) == bytes(8)  # GET cleared it
    finally:
        k.munmap(mem.address, mem.length)
        k.close(vm)
        k.close(kvm)


def test_guest_writes_with_manual_protect(any_kernel: Kernel) -> None:
    k = any_kernel
    kvm = open_kvm(k)
    vm = create_vm(k, kvm)
    cap = K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert enable_cap(k, vm, cap, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0
    mem = k.mmap(
        -1, NPAGES * P, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
    )
    memoryview(mem).cast("B")[0x1000 : 0x1000 + len(CODE)] = CODE  # type: ignore[arg-type]
    try:
        assert set_region(k, vm, 0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, NPAGES * P, mem.address) == 0
        assert _run_guest(k, vm) == K.KVM_EXIT_HLT
        assert get_dirty_log(k, vm, 0, 8) == bytes([0xA0]) + bytes(7)
        assert get_dirty_log(k, vm, 0, 8) == bytes([0xA0]) + bytes(7)  # not cleared by GET
    finally:
        k.munmap(mem.address, mem.length)
        k.close(vm)
        k.close(kvm)
