"""The vCPU's cached `Faulter`: a guest fault reports the thread running KVM_RUN (uffd_msg ptid).

The TLB-fill path reuses one `Faulter` per vCPU and thread instead of building one
per fill; a KVM_RUN from another thread must still report that other thread, as
the live kernel does (``handle_userfault`` fills ``ptid`` from ``current``).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman as M
from fakekvm.abi import uffd as U
from fakekvm.fake import FakeKernel
from fakekvm.fake.cpu.testing import Guest, assemble, real_mode_sregs
from fakekvm.kernel.real import RealKernel

PAGE = 0x8000


def _two_threads_fault(k: Any) -> list[tuple[int, int, int]]:
    """Two KVM_RUNs from two threads, each reading a missing uffd page: [(exit, ptid == runner, data)]."""
    g = Guest(k, 0x10000)
    g.load(
        {0x1000: assemble("1: mov 0x8000, %eax\nmov $0x10, %dx\nout %eax, %dx\njmp 1b", 16)},
        real_mode_sregs(),
        0x1000,
    )
    uffd = k.userfaultfd(os.O_CLOEXEC)
    k.ioctl(uffd, U.UFFDIO_API, bytearray(U.uffdio_api_fmt.pack(U.UFFD_API, U.UFFD_FEATURE_THREAD_ID, 0)))
    page = g.mem.address + PAGE
    k.madvise(page, 4096, M.MADV_DONTNEED)
    reg = bytearray(U.uffdio_register_fmt.pack(page, 4096, U.UFFDIO_REGISTER_MODE_MISSING, 0))
    k.ioctl(uffd, U.UFFDIO_REGISTER, reg)
    src = k.mmap(-1, 4096, M.PROT_READ | M.PROT_WRITE, M.MAP_PRIVATE | M.MAP_ANONYMOUS)
    out: list[tuple[int, int, int]] = []
    try:
        for value in (0x11, 0x22):
            src.view()[0:4] = bytes([value]) * 4
            runner: list[int] = []
            result: list[tuple[int, int]] = []

            def vcpu(runner: list[int], result: list[tuple[int, int]]) -> None:
                runner.append(threading.get_native_id())
                result.append(g.kvm_run())

            t = threading.Thread(target=vcpu, args=(runner, result))
            t.start()
            msg = k.read(uffd, 32)  # blocks until the guest faults
            _event, _flags, address, ptid = U.uffd_msg_pagefault_fmt.unpack(msg)
            copy = bytearray(U.uffdio_copy_fmt.pack(address & ~0xFFF, src.address, 4096, 0, 0))
            k.ioctl(uffd, U.UFFDIO_COPY, copy)
            t.join(timeout=60)
            assert not t.is_alive()
            data = int.from_bytes(bytes(g.run[0x1000:0x1004]), "little")
            out.append((result[0][1], int(ptid == runner[0]), data))
            k.madvise(page, 4096, M.MADV_DONTNEED)  # missing again for the next thread
    finally:
        k.close(uffd)
        g.close()
    return out


EXPECTED = [(K.KVM_EXIT_IO, 1, 0x11111111), (K.KVM_EXIT_IO, 1, 0x22222222)]


def test_fake_reports_each_kvm_run_thread_as_ptid() -> None:
    k = FakeKernel(profile="6.18-pvm")
    try:
        assert _two_threads_fault(k) == EXPECTED
    finally:
        k.shutdown()


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_live_kernel_reports_each_kvm_run_thread_as_ptid() -> None:
    k = RealKernel()
    try:
        assert _two_threads_fault(k) == EXPECTED
    finally:
        k.shutdown()
