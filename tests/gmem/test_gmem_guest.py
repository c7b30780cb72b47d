"""A guest touching a guest_memfd slot (MMAP|INIT_SHARED) through KVM_RUN.

uapi.md §6.4 [live]: guest reads and writes hit the gmem page and are visible through
the host mapping; after PUNCH_HOLE the guest reads 0. Runs on the host kernel, and on
FakeKernel once its vCPUs run guests (skipped with the reason until then).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.guests import layout
from fakekvm.guests.vm import GuestVM
from fakekvm.guests.workloads import Pattern, TouchParams, expected_touch_report, toucher_image
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import Kernel
from fakekvm.testing import gmem_scenarios as S

PAGE = 4096
NPAGES = 8
BASE = layout.DATA_BASE  # the gmem slot sits right after the anonymous slot 0
RW = mman.PROT_READ | mman.PROT_WRITE


@pytest.fixture(params=[pytest.param("real", marks=pytest.mark.real_kernel), "fake"], ids=["real", "fake"])
def guest(request: pytest.FixtureRequest) -> Iterator[tuple[Kernel, GuestVM]]:
    k: Kernel = RealKernel() if request.param == "real" else FakeKernel(profile="6.18-pvm")
    try:
        g = GuestVM(k, BASE)
    except Exception as e:  # the fake's vCPU may not exist yet
        k.shutdown()
        if request.param == "real":
            raise
        pytest.skip(f"fake kernel cannot run a guest yet: {type(e).__name__}: {e}")
    yield k, g
    g.close()
    k.shutdown()


def _run(g: GuestVM, p: TouchParams) -> tuple[int, int]:
    g.load(toucher_image(BASE, p, mapped_size=BASE + NPAGES * PAGE))
    r = g.run()
    return r.reports[0], r.report64(1)


def test_gmem_guest_reads_and_writes_the_gmem_pages(guest: tuple[Kernel, GuestVM]) -> None:
    k, g = guest
    gfd = S.create_gmem(k, g.vm_fd, NPAGES * PAGE, S.MMAP | S.INIT_SHARED)
    view = k.mmap(gfd, NPAGES * PAGE, RW, mman.MAP_SHARED)
    assert S.region2(k, g.vm_fd, 1, K.KVM_MEM_GUEST_MEMFD, BASE, NPAGES * PAGE, view.address, 0, gfd) == 0
    for i in range(NPAGES):
        S.poke(k, view.address + i * PAGE, struct.pack("<Q", 0x1111 * (i + 1)))
    before = ctypes.string_at(view.address, NPAGES * PAGE)
    read = TouchParams(BASE, NPAGES * PAGE, Pattern.SEQUENTIAL)
    assert _run(g, read) == expected_touch_report(read, before)
    write = TouchParams(BASE, NPAGES * PAGE, Pattern.SEQUENTIAL, write=True, seed=7)
    assert _run(g, write) == expected_touch_report(write)
    words = [struct.unpack_from("<Q", S.peek(k, view.address + i * PAGE, 8))[0] for i in range(NPAGES)]
    assert words == [(7 << 32) | i for i in range(NPAGES)]  # the guest's stores, seen by the host
    k.fallocate(gfd, S.PUNCH, 0, 2 * PAGE)
    after = ctypes.string_at(view.address, NPAGES * PAGE)
    assert after[:2 * PAGE] == bytes(2 * PAGE)
    assert _run(g, read) == expected_touch_report(read, after)  # the guest reads 0 there
    k.munmap(view.address, NPAGES * PAGE)
