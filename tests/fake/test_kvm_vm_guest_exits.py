"""Second-stage outcomes seen by a real-mode guest, on both kernels: a write to a
READONLY slot, and reads of a gpa with no slot or with an unmapped hva, all exit
KVM_EXIT_MMIO on 6.18-pvm (the fake's `translate` + B's vCPU vs the host's KVM)."""

from __future__ import annotations

import struct

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake.kvm.client import create_vm, open_kvm, set_region
from fakekvm.kernel.seam import Kernel

P = 4096
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS


def _run(k: Kernel, code: bytes, setup: object = None) -> tuple[int, int, int, int, int]:
    """Run ``code`` at 0x1000 in real mode; return (exit, mmio gpa, len, is_write, data[0])."""
    kvm = open_kvm(k)
    vm = create_vm(k, kvm)
    mem = k.mmap(-1, 16 * P, RW, ANON)
    ro = k.mmap(-1, P, RW, ANON)
    memoryview(mem).cast("B")[0x1000 : 0x1000 + len(code)] = code  # type: ignore[arg-type]
    try:
        assert set_region(k, vm, 0, 0, 0, 16 * P, mem.address) == 0
        assert set_region(k, vm, 1, K.KVM_MEM_READONLY, 0x20000, P, ro.address) == 0
        k.munmap(mem.address + 6 * P, P)  # gpa 0x6000: the hva is gone
        vcpu = k.ioctl(vm, K.KVM_CREATE_VCPU, 0)
        run = k.mmap(vcpu, 3 * P, RW, mman.MAP_SHARED)
        sregs = bytearray(312)
        k.ioctl(vcpu, K.KVM_GET_SREGS, sregs)
        for seg in (0, 24):
            struct.pack_into("<Q", sregs, seg, 0)
            struct.pack_into("<H", sregs, seg + 12, 0)
        k.ioctl(vcpu, K.KVM_SET_SREGS, sregs)
        regs = bytearray(144)
        struct.pack_into("<QQ", regs, 128, 0x1000, 2)
        k.ioctl(vcpu, K.KVM_SET_REGS, regs)
        k.ioctl(vcpu, K.KVM_RUN, 0)
        v = memoryview(run).cast("B")  # type: ignore[arg-type]
        reason = struct.unpack_from("<I", v, 8)[0]
        gpa, data, ln, is_write = struct.unpack_from("<Q8sIB", v, 32)
        out = (reason, gpa, ln, is_write, data[0])
        del v
        k.munmap(run.address, run.length)
        k.close(vcpu)
        return out
    finally:
        k.munmap(ro.address, ro.length)
        k.munmap(mem.address, 6 * P)
        k.munmap(mem.address + 7 * P, 9 * P)
        k.close(vm)
        k.close(kvm)


@pytest.mark.parametrize(
    ("code", "expect"),
    [
        # mov ax, 0x2000 ; mov ds, ax ; mov byte [0], 0x77 ; hlt -> write to the READONLY slot
        (bytes.fromhex("b800208ed8c606000077f4"), (K.KVM_EXIT_MMIO, 0x20000, 1, 1, 0x77)),
        # mov al, [0x6000] ; hlt -> the slot's hva for gpa 0x6000 is unmapped
        (bytes.fromhex("a00060f4"), (K.KVM_EXIT_MMIO, 0x6000, 1, 0, None)),
        # mov ax, 0x3000 ; mov ds, ax ; mov al, [0] ; hlt -> no memslot at 0x30000
        (bytes.fromhex("b800308ed8a00000f4"), (K.KVM_EXIT_MMIO, 0x30000, 1, 0, None)),
        # mov ax, 0x2000 ; mov ds, ax ; mov al, [0] ; hlt -> reading a READONLY slot is RAM
        (bytes.fromhex("b800208ed8a00000f4"), (K.KVM_EXIT_HLT, None, None, None, None)),
    ],
    ids=["readonly-write", "unmapped-hva", "no-slot", "readonly-read"],
)
def test_second_stage_exits(any_kernel: Kernel, code: bytes, expect: tuple[object, ...]) -> None:
    got = _run(any_kernel, code)
    assert tuple(g if e is not None else None for g, e in zip(got, expect, strict=True)) == expect
