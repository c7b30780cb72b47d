"""vCPU reset state that differs per vCPU: only vCPU 0 is the bootstrap processor.

Found by comparing a real-kernel migration recording with the fake's (``replay.streams``):
vCPU 1's ``KVM_GET_SREGS`` read apic_base 0xfee00800 on this host, 0xfee00900 on the fake.
"""

from __future__ import annotations

import os

from fakekvm.abi import kvm as K
from fakekvm.kernel.seam import Kernel

APIC_BASE_OFFSET = 272  # struct kvm_sregs: 8 segments, 2 dtables, cr0..cr8, efer, apic_base


def test_only_vcpu0_has_the_bsp_bit(any_kernel: Kernel) -> None:
    k = any_kernel
    kvm_fd = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = k.ioctl(kvm_fd, K.KVM_CREATE_VM, 0)
    bases = []
    fds = []
    for i in range(3):
        v = k.ioctl(vm, K.KVM_CREATE_VCPU, i)
        fds.append(v)
        buf = bytearray(K.kvm_sregs.sizeof())
        k.ioctl(v, K.KVM_GET_SREGS, buf)
        bases.append(int.from_bytes(buf[APIC_BASE_OFFSET : APIC_BASE_OFFSET + 8], "little"))
    assert bases == [0xFEE00900, 0xFEE00800, 0xFEE00800]
    for fd in (*fds, vm, kvm_fd):
        k.close(fd)
