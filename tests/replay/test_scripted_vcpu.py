"""The trace-driven vCPU: recorded touches fault through the fake's real paths, recorded exits
come back in order, and the engine-facing ioctls (regs, KVM_RUN results) behave like a vCPU's."""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import kvm_userfault as KU
from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.cpu import HltExit, IoExit
from fakekvm.fake.kvm.scripted import ScriptedCpu, Touch, scripted_factory
from fakekvm.fake.uffd import _uapi as UU
from fakekvm.testing import gmem_scenarios as GS
from fakekvm.testing import uffd_scenarios as US

PAGE = 4096
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
REPORT = IoExit(K.KVM_EXIT_IO_OUT, 4, 0xE9, 1, (1234).to_bytes(4, "little"))


def _vcpu(k: FakeKernel, v: int) -> tuple[int, memoryview]:
    vfd = k.ioctl(v, K.KVM_CREATE_VCPU, 0)
    size = k.ioctl(k.open("/dev/kvm", os.O_RDWR), K.KVM_GET_VCPU_MMAP_SIZE)
    run = k.mmap(vfd, size, RW, mman.MAP_SHARED)
    return vfd, memoryview(run.view())  # type: ignore[attr-defined]


def _slot(k: FakeKernel, v: int, hva: int, size: int) -> None:
    buf = bytearray(K.kvm_userspace_memory_region_fmt.pack(0, 0, 0, size, hva))
    k.ioctl(v, K.KVM_SET_USER_MEMORY_REGION, buf)


def test_touches_block_on_userfaultfd_and_exits_come_back_in_order() -> None:
    script = [Touch(0x3000, write=True), REPORT, Touch(0x5010), Touch(0x3000), HltExit()]
    k = FakeKernel("6.18-pvm", vcpu_factory=scripted_factory({0: script}, think=False))
    try:
        with GS.vm(k, 0) as v:
            mem = k.mmap(-1, 16 * PAGE, RW, ANON)
            src = US.src_page(k, 0x5A)
            fd = k.userfaultfd(os.O_CLOEXEC)
            US.api(k, fd, UU.UFFD_FEATURE_THREAD_ID)
            US.register(k, fd, mem.address, 16 * PAGE, UU.UFFDIO_REGISTER_MODE_MISSING)
            _slot(k, v, mem.address, 16 * PAGE)
            vfd, run = _vcpu(k, v)
            seen: list[tuple[int, int, int]] = []

            def handler() -> None:
                for _ in range(2):
                    _ev, flags, addr, ptid = UU.uffd_msg_pagefault_fmt.unpack(k.read(fd, 32))  # type: ignore[attr-defined]
                    seen.append((flags, addr, ptid))
                    buf = bytearray(
                        UU.uffdio_copy_fmt.pack(addr & ~(PAGE - 1), src.address, PAGE, 0, 0)
                    )
                    k.ioctl(fd, UU.UFFDIO_COPY, buf)

            h = threading.Thread(target=handler, daemon=True)
            h.start()
            reasons = []
            for _ in range(2):
                k.ioctl(vfd, K.KVM_RUN, 0)
                reasons.append(int.from_bytes(run[8:12], "little"))
            h.join(10)
            assert not h.is_alive()
            assert reasons == [K.KVM_EXIT_IO, K.KVM_EXIT_HLT]
            # the vCPU thread faulted twice, at the slot's host pages, the first a write
            me = threading.get_native_id()
            assert seen == [
                (UU.UFFD_PAGEFAULT_FLAG_WRITE, mem.address + 0x3000, me),
                (0, mem.address + 0x5000, me),
            ]
            cpu = k.file(vfd).cpu  # type: ignore[attr-defined]
            assert isinstance(cpu, ScriptedCpu)
            assert (cpu.stats.touches, cpu.stats.exits) == (3, 2)
            # the report exit's bytes are the recorded ones
            k.ioctl(vfd, K.KVM_RUN, 0)
            assert int.from_bytes(run[8:12], "little") == K.KVM_EXIT_SHUTDOWN  # past the end
    finally:
        k.shutdown()


def test_kvm_userfault_touch_exits_and_is_retried_after_the_bit_clears() -> None:
    script = [Touch(0x2000), REPORT]
    k = FakeKernel("6.18+kvm-userfault", vcpu_factory=scripted_factory({0: script}))
    try:
        with GS.vm(k, 0) as v:
            mem = k.mmap(-1, 8 * PAGE, RW, ANON)
            words = (ctypes.c_uint64 * 1)(0b100)
            buf = bytearray(
                KU.kvm_userspace_memory_region2_fmt.pack(
                    0,
                    KU.KVM_MEM_USERFAULT,
                    0,
                    8 * PAGE,
                    mem.address,
                    0,
                    0,
                    0,
                    ctypes.addressof(words),
                )
            )
            k.ioctl(v, K.KVM_SET_USER_MEMORY_REGION2, buf)
            vfd, run = _vcpu(k, v)
            with pytest.raises(OSError) as ei:
                k.ioctl(vfd, K.KVM_RUN, 0)
            assert ei.value.errno == errno.EFAULT
            assert int.from_bytes(run[8:12], "little") == K.KVM_EXIT_MEMORY_FAULT
            flags, gpa, size = K.kvm_run_memory_fault_fmt.unpack_from(run, 32)
            assert (flags, gpa, size) == (KU.KVM_MEMORY_EXIT_FLAG_USERFAULT, 0x2000, PAGE)
            words[0] = 0
            k.ioctl(vfd, K.KVM_RUN, 0)
            assert int.from_bytes(run[8:12], "little") == K.KVM_EXIT_IO
            direction, size, port, count, data_offset = K.kvm_run_io_fmt.unpack_from(run, 32)
            assert (direction, size, port, count) == (K.KVM_EXIT_IO_OUT, 4, 0xE9, 1)
            assert bytes(run[data_offset : data_offset + 4]) == (1234).to_bytes(4, "little")
    finally:
        k.shutdown()


def test_regs_round_trip_and_kick_interrupts_think_time() -> None:
    script = [Touch(0x1000, think_ns=3_600 * 10**9)]  # an hour of think time: only a kick ends it
    k = FakeKernel("6.18-pvm", vcpu_factory=scripted_factory({0: script}))
    try:
        with GS.vm(k, 0) as v:
            mem = k.mmap(-1, 4 * PAGE, RW, ANON)
            _slot(k, v, mem.address, 4 * PAGE)
            vfd, _run = _vcpu(k, v)
            regs = bytearray(K.kvm_regs_fmt.size)
            k.ioctl(vfd, K.KVM_GET_REGS, regs)
            vals = list(K.kvm_regs_fmt.unpack(regs))
            vals[16] = 0x1234  # rip
            k.ioctl(vfd, K.KVM_SET_REGS, bytearray(K.kvm_regs_fmt.pack(*vals)))
            out = bytearray(K.kvm_regs_fmt.size)
            k.ioctl(vfd, K.KVM_GET_REGS, out)
            assert K.kvm_regs_fmt.unpack(out)[16] == 0x1234
            cpu = k.file(vfd).cpu  # type: ignore[attr-defined]
            errs: list[int] = []

            def runner() -> None:
                try:
                    k.ioctl(vfd, K.KVM_RUN, 0)
                except OSError as e:
                    errs.append(e.errno or 0)

            t = threading.Thread(target=runner, daemon=True)
            t.start()
            assert cpu.thinking.wait(10)  # the vCPU is in its think time: kick it
            cpu.kick()
            t.join(10)
            assert errs == [errno.EINTR]
            assert cpu.stats.touches == 0
    finally:
        k.shutdown()
