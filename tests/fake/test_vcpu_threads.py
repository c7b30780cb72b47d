"""FakeVcpu from several threads: kick, the vcpu mutex, memslot changes while the guest runs."""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman as M
from fakekvm.fake import FakeKernel
from fakekvm.fake.cpu.testing import Guest, assemble, real_mode_sregs

SPIN = """
1:  mov 0x5000, %ax
    cmp $0, %ax
    je 1b
    mov $0x10, %dx
    out %al, %dx
    hlt
"""


def _guest(k: FakeKernel, src: str = SPIN) -> Guest:
    g = Guest(k, 0x10000)
    g.load({0x1000: assemble(src, 16)}, real_mode_sregs(), 0x1000)
    return g


def _run_in_thread(g: Guest) -> tuple[threading.Thread, list[tuple[int, int]], threading.Event]:
    out: list[tuple[int, int]] = []
    started = threading.Event()

    def body() -> None:
        started.set()
        out.append(g.kvm_run())

    t = threading.Thread(target=body)
    t.start()
    started.wait()
    return t, out, started


def _vcpu(k: FakeKernel, g: Guest) -> object:
    return k.file(g.vcpu)


def test_kick_makes_running_kvm_run_return_eintr_with_exit_intr() -> None:
    k = FakeKernel(profile="6.18-pvm")
    try:
        g = _guest(k)
        t, out, _ = _run_in_thread(g)
        _vcpu(k, g).kick()  # type: ignore[attr-defined]
        t.join(timeout=60)
        assert not t.is_alive()
        assert out == [(-errno.EINTR, K.KVM_EXIT_INTR)]
        # the guest resumes where it was; a store from the host ends the spin
        g.write(0x5000, b"\x01\x00")
        assert g.kvm_run() == (0, K.KVM_EXIT_IO)
    finally:
        k.shutdown()


def _region(slot: int, flags: int, gpa: int, size: int, hva: int) -> bytearray:
    return bytearray(K.kvm_userspace_memory_region_fmt.pack(slot, flags, gpa, size, hva))


def test_memslot_flag_change_while_guest_runs() -> None:
    """memslots_changed()/invalidate() from another thread while the guest spins (no gap in RAM)."""
    k = FakeKernel(profile="6.18-pvm")
    try:
        g = _guest(k)
        t, out, _ = _run_in_thread(g)
        for flags in (K.KVM_MEM_LOG_DIRTY_PAGES, 0, K.KVM_MEM_LOG_DIRTY_PAGES):
            k.ioctl(g.vm, K.KVM_SET_USER_MEMORY_REGION, _region(0, flags, 0, 0x10000, g.mem.address))
        g.write(0x5000, b"\x05\x00")
        t.join(timeout=60)
        assert not t.is_alive()
        assert out == [(0, K.KVM_EXIT_IO)]
        assert g.run[0x1000] == 5
    finally:
        k.shutdown()


def test_slot_replaced_between_runs_uses_the_new_memory() -> None:
    k = FakeKernel(profile="6.18-pvm")
    try:
        g = _guest(k, "1: mov 0x5000, %al\nmov $0x10, %dx\nout %al, %dx\njmp 1b")
        g.write(0x5000, b"\x01")
        assert g.kvm_run() == (0, K.KVM_EXIT_IO) and g.run[0x1000] == 1
        new = k.mmap(-1, 0x10000, M.PROT_READ | M.PROT_WRITE, M.MAP_PRIVATE | M.MAP_ANONYMOUS)
        new.view()[:] = g.mem.view()[:0x10000]
        new.view()[0x5000] = 7
        k.ioctl(g.vm, K.KVM_SET_USER_MEMORY_REGION, _region(0, 0, 0, 0, 0))
        k.ioctl(g.vm, K.KVM_SET_USER_MEMORY_REGION, _region(0, 0, 0, 0x10000, new.address))
        assert g.kvm_run() == (0, K.KVM_EXIT_IO) and g.run[0x1000] == 7
    finally:
        k.shutdown()


def test_second_kvm_run_waits_for_the_first() -> None:
    k = FakeKernel(profile="6.18-pvm")
    try:
        g = _guest(k)
        t1, out1, _ = _run_in_thread(g)
        # the second caller blocks on the vcpu mutex (no EBUSY)
        t2, out2, _ = _run_in_thread(g)
        assert out2 == []
        _vcpu(k, g).kick()  # type: ignore[attr-defined]
        t1.join(timeout=60)
        # t2 now runs; end its spin with a host store
        g.write(0x5000, b"\x02\x00")
        t2.join(timeout=60)
        assert not t1.is_alive() and not t2.is_alive()
        results = sorted(out1 + out2)
        assert results == sorted([(-errno.EINTR, K.KVM_EXIT_INTR), (0, K.KVM_EXIT_IO)])
    finally:
        k.shutdown()


def _uffd_guest_fault(k: object) -> tuple[tuple[int, int], bytes, int]:
    """A guest read of a missing page in a userfaultfd-registered slot, served by UFFDIO_COPY."""
    import os

    from fakekvm.abi import uffd as U

    kk: Any = k
    g = Guest(kk, 0x10000)
    g.load({0x1000: assemble("mov 0x8000, %eax\nmov $0x10, %dx\nout %eax, %dx\nhlt", 16)}, real_mode_sregs(), 0x1000)
    try:
        uffd = kk.userfaultfd(os.O_CLOEXEC)
    except OSError as e:  # pragma: no cover - the host lacks userfaultfd
        pytest.skip(f"userfaultfd: {e}")
    kk.ioctl(uffd, U.UFFDIO_API, bytearray(U.uffdio_api_fmt.pack(U.UFFD_API, 0, 0)))
    page = g.mem.address + 0x8000
    kk.madvise(page, 4096, M.MADV_DONTNEED)
    kk.ioctl(uffd, U.UFFDIO_REGISTER, bytearray(U.uffdio_register_fmt.pack(page, 4096, U.UFFDIO_REGISTER_MODE_MISSING, 0)))
    src = kk.mmap(-1, 4096, M.PROT_READ | M.PROT_WRITE, M.MAP_PRIVATE | M.MAP_ANONYMOUS)
    src.view()[0:4] = b"\x11\x22\x33\x44"
    faults: list[int] = []

    def handler() -> None:
        msg = kk.read(uffd, 32)
        event, _flags, address, _ptid = U.uffd_msg_pagefault_fmt.unpack(msg)
        assert event == U.UFFD_EVENT_PAGEFAULT
        faults.append(address)
        kk.ioctl(uffd, U.UFFDIO_COPY, bytearray(U.uffdio_copy_fmt.pack(address & ~0xFFF, src.address, 4096, 0, 0)))

    t = threading.Thread(target=handler)
    t.start()
    rc = g.kvm_run()
    t.join(timeout=60)
    data = bytes(g.run[0x1000:0x1004])
    kk.close(uffd)
    g.close()
    return rc, data, faults[0] - g.mem.address if faults else -1


@pytest.mark.real_kernel
@pytest.mark.real_uffd
def test_userfaultfd_missing_fault_from_guest_matches_live() -> None:
    from fakekvm.kernel.real import RealKernel

    results = []
    for k in (RealKernel(), FakeKernel(profile="6.18-pvm")):
        results.append(_uffd_guest_fault(k))
        k.shutdown()
    assert results[1] == results[0]
    assert results[0] == ((0, K.KVM_EXIT_IO), b"\x11\x22\x33\x44", 0x8000)
