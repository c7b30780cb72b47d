"""Issue-4 acceptance: a vCPU runs the toucher over userfaultfd-registered guest memory.

The same code runs on the host kernel and on FakeKernel(profile="6.18-pvm"): the
data region of guest memory is registered with a userfaultfd, a handler thread
resolves every fault the vCPU takes inside KVM_RUN — by UFFDIO_COPY of the
page's "source" content (MISSING, anonymous memory), or by UFFDIO_CONTINUE after
the content was written through a second mapping of the same memfd (MINOR) —
and the guest finishes with the report the source content predicts. The two
kernels must give the same reports, fault addresses and final memory.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import pytest

from fakekvm.abi import mman, uffd
from fakekvm.guests import GuestVM, Pattern, TouchParams, layout, toucher_image
from fakekvm.guests.workloads import expected_touch_report
from fakekvm.kernel import Kernel, RealKernel

PAGE = 4096
NPAGES = 256  # 1 MiB of data under userfaultfd
BASE = layout.DATA_BASE
MEM = BASE + NPAGES * PAGE
RW = mman.PROT_READ | mman.PROT_WRITE


def _source() -> bytes:
    return b"".join((0x1000_0000 + i).to_bytes(8, "little") * (PAGE // 8) for i in range(NPAGES))


def _api(k: Kernel, fd: int) -> None:
    k.ioctl(fd, uffd.UFFDIO_API, bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, 0, 0)))


def _register(k: Kernel, fd: int, start: int, length: int, mode: int) -> None:
    k.ioctl(fd, uffd.UFFDIO_REGISTER, bytearray(uffd.uffdio_register_fmt.pack(start, length, mode, 0)))


def _handler(
    k: Kernel, fd: int, stop: int, resolve: Any, faults: list[tuple[int, int]], errors: list[BaseException]
) -> None:
    """The usual handler: poll uffd + a stop eventfd, read one message, resolve it.

    If it fails it closes the userfaultfd, which unregisters the range and wakes
    the vCPU (a dead handler must not leave KVM_RUN blocked forever).
    """
    try:
        while True:
            ready = dict(k.poll([(fd, mman.POLLIN), (stop, mman.POLLIN)], -1))
            if ready.get(stop):
                return
            event, flags, address, _ptid = uffd.uffd_msg_pagefault_fmt.unpack(k.read(fd, 32))
            assert event == uffd.UFFD_EVENT_PAGEFAULT, event
            faults.append((address, flags))
            resolve(address & ~(PAGE - 1))
    except BaseException as e:
        errors.append(e)
        k.close(fd)


def _run(k: Kernel, mode: str) -> dict[str, Any]:
    src = _source()
    p = TouchParams(BASE, NPAGES * PAGE, Pattern.RANDOM, write=False, seed=9)  # reads: the report sums what it saw
    mfd = -1
    if mode == "missing":
        mem = k.mmap(-1, MEM, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
        alias = None
    else:
        mfd = k.memfd_create("guest", mman.MFD_CLOEXEC)
        k.ftruncate(mfd, MEM)
        mem = k.mmap(mfd, MEM, RW, mman.MAP_SHARED)
        alias = k.mmap(mfd, MEM, RW, mman.MAP_SHARED)  # the VMM's second view of the page cache
    fd = k.userfaultfd(mman.O_CLOEXEC | mman.O_NONBLOCK)
    stop = k.eventfd(0, mman.EFD_CLOEXEC)
    staging = k.mmap(-1, PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    faults: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    try:
        vm = GuestVM(k, MEM, memory=mem)
        vm.load(toucher_image(MEM, p))  # code, tables, stack: the system area, below BASE
        _api(k, fd)
        if mode == "missing":
            _register(k, fd, mem.address + BASE, NPAGES * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

            def resolve(addr: int) -> None:
                i = (addr - mem.address - BASE) // PAGE
                staging.view()[:] = src[i * PAGE : (i + 1) * PAGE]
                k.ioctl(fd, uffd.UFFDIO_COPY, bytearray(uffd.uffdio_copy_fmt.pack(addr, staging.address, PAGE, 0, 0)))
        else:
            assert alias is not None
            alias.view()[BASE:MEM] = src  # the page cache has every page; the guest's view maps none
            k.madvise(mem.address + BASE, NPAGES * PAGE, mman.MADV_DONTNEED)
            _register(k, fd, mem.address + BASE, NPAGES * PAGE, uffd.UFFDIO_REGISTER_MODE_MINOR)

            def resolve(addr: int) -> None:
                k.ioctl(fd, uffd.UFFDIO_CONTINUE, bytearray(uffd.uffdio_continue_fmt.pack(addr, PAGE, 0, 0)))

        h = threading.Thread(target=_handler, args=(k, fd, stop, resolve, faults, errors), daemon=True)
        h.start()
        try:
            r = vm.run()
        finally:
            k.write(stop, (1).to_bytes(8, "little"))
            h.join(timeout=60)
        assert not h.is_alive()
        if errors:
            fd = -1  # the handler closed it
            raise errors[0]
        final = bytes(vm.mem()[BASE:MEM])
        vm.close()
        return {
            "reports": [r.reports[0], r.report64(1)],
            "expected": list(expected_touch_report(p, src)),
            "faults": sorted((a - mem.address - BASE, f) for a, f in faults),
            "final": hashlib.sha256(final).hexdigest(),
            "exits": [e.reason for e in r.exits[-2:]],
        }
    finally:
        for m in (mem, alias, staging):
            if m is not None:
                k.munmap(m.address, m.length)
        for f in (fd, stop, mfd):
            if f >= 0:
                k.close(f)


@pytest.mark.real_kernel
@pytest.mark.real_uffd
@pytest.mark.parametrize("mode", ["missing", "minor"])
def test_toucher_over_userfaultfd_same_on_both_kernels(mode: str) -> None:
    from fakekvm.fake import FakeKernel

    real = _run(RealKernel(), mode)
    fk = FakeKernel(profile="6.18-pvm")
    try:
        fake = _run(fk, mode)
    finally:
        fk.shutdown()
    # the guest saw the source's content: its report is what that content predicts
    assert real["reports"][:2] == real["expected"]
    # every data page faulted exactly once, at its page address, as a read fault
    # (MINOR faults carry the MINOR flag)
    want_flag = uffd.UFFD_PAGEFAULT_FLAG_MINOR if mode == "minor" else 0
    assert [a for a, _ in real["faults"]] == [i * PAGE for i in range(NPAGES)]
    assert all(f == want_flag for _, f in real["faults"])
    # and the fake agrees with the real kernel on all of it
    assert fake == real
