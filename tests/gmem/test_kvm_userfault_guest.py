"""A real guest program on the fake vCPU under KVM Userfault and private memory.

``FakeVm.translate`` runs `fakekvm.fake.kvm.private.pre_translate` first on VMs
that can have private memory or KVM Userfault. A post-copy style loop runs
the toucher guest: KVM_RUN fails EFAULT with KVM_EXIT_MEMORY_FAULT (flags
USERFAULT, the page's gpa, size 4096), the VMM fills the page and clears the
bitmap bit, and re-enters, until the guest finishes with the right checksum.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Iterator

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import kvm_userfault as KU
from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.kvm import private as P
from fakekvm.guests import layout
from fakekvm.guests.vm import GuestVM
from fakekvm.guests.workloads import Pattern, TouchParams, expected_touch_report, toucher_image

PAGE = 4096
NPAGES = 16
BASE = layout.DATA_BASE
RW = mman.PROT_READ | mman.PROT_WRITE


@pytest.fixture
def wired() -> None:
    """The hooks are part of FakeVm.translate; nothing to wire."""


@pytest.fixture
def guest(wired: None) -> Iterator[tuple[FakeKernel, GuestVM]]:
    k = FakeKernel(profile="6.18+kvm-userfault")
    try:
        g = GuestVM(k, BASE)
    except Exception as e:  # the fake's vCPU may not exist yet
        k.shutdown()
        pytest.skip(f"fake kernel cannot run a guest yet: {type(e).__name__}: {e}")
    yield k, g
    g.close()
    k.shutdown()


def _memory_fault(g: GuestVM) -> tuple[int, int, int, int]:
    run = g.runs[0].view()
    (reason,) = K.kvm_run_exit_reason_fmt.unpack_from(run, K.KVM_RUN_EXIT_REASON_OFFSET)
    return (reason, *K.kvm_run_memory_fault_fmt.unpack_from(run, K.KVM_RUN_EXIT_OFFSET))


def test_kvm_userfault_guest_postcopy_loop(guest: tuple[FakeKernel, GuestVM]) -> None:
    k, g = guest
    mem = k.mmap(-1, NPAGES * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    bitmap = k.mmap(-1, PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)  # VMM memory
    words = (ctypes.c_uint64 * 1).from_address(bitmap.address)
    words[0] = (1 << NPAGES) - 1  # every page still "on the source"
    buf = bytearray(KU.kvm_userspace_memory_region2_fmt.pack(
        1, KU.KVM_MEM_USERFAULT, BASE, NPAGES * PAGE, mem.address, 0, 0, 0, bitmap.address))
    k.ioctl(g.vm_fd, K.KVM_SET_USER_MEMORY_REGION2, buf)
    source = b"".join(struct.pack("<Q", 0xA000 + i).ljust(PAGE, b"\0") for i in range(NPAGES))
    p = TouchParams(BASE, NPAGES * PAGE, Pattern.RANDOM, seed=3)
    g.load(toucher_image(BASE, p, mapped_size=BASE + NPAGES * PAGE))
    faults: list[int] = []
    for _ in range(4 * NPAGES):
        try:
            r = g.run()
            break
        except OSError as e:
            assert e.errno == errno.EFAULT
            reason, flags, gpa, size = _memory_fault(g)
            assert (reason, flags, size) == (K.KVM_EXIT_MEMORY_FAULT, KU.KVM_MEMORY_EXIT_FLAG_USERFAULT, PAGE)
            i = (gpa - BASE) // PAGE
            assert 0 <= i < NPAGES and gpa % PAGE == 0 and words[0] >> i & 1
            faults.append(i)
            ctypes.memmove(mem.address + i * PAGE, source[i * PAGE:(i + 1) * PAGE], PAGE)  # fill ...
            words[0] &= ~(1 << i)  # ... then clear the bit, and re-enter
    else:
        pytest.fail("the guest never finished")
    assert sorted(faults) == list(range(NPAGES))  # each page faulted exactly once
    assert (r.reports[0], r.report64(1)) == expected_touch_report(p, source)


def test_private_guest_on_a_sw_protected_vm(wired: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Private pages come from guest_memfd, shared ones from userspace_addr, in one slot;
    a private page in a slot without guest_memfd exits PRIVATE until converted to shared."""
    k = FakeKernel(profile="6.18")
    try:
        with monkeypatch.context() as m:
            m.setattr(K, "KVM_X86_DEFAULT_VM", K.KVM_X86_SW_PROTECTED_VM)  # the VM type GuestVM makes
            try:
                g = GuestVM(k, BASE)
            except Exception as e:  # the fake's vCPU may not exist yet
                pytest.skip(f"fake kernel cannot run a guest yet: {type(e).__name__}: {e}")
        v = g.vm_fd
        shared = k.mmap(-1, 2 * NPAGES * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
        gfd = k.ioctl(v, K.KVM_CREATE_GUEST_MEMFD, bytearray(struct.pack("<QQ48x", NPAGES * PAGE, 0)))
        for slot, flags, gpa, hva, fd in [(1, K.KVM_MEM_GUEST_MEMFD, BASE, shared.address, gfd),
                                          (2, 0, BASE + NPAGES * PAGE, shared.address + NPAGES * PAGE, 0)]:
            k.ioctl(v, K.KVM_SET_USER_MEMORY_REGION2, bytearray(
                K.kvm_userspace_memory_region2_fmt.pack(slot, flags, gpa, NPAGES * PAGE, hva, 0, fd, 0)))
        gm = k.file(gfd)
        for i in range(2 * NPAGES):
            ctypes.memmove(shared.address + i * PAGE, struct.pack("<Q", 0x5000 + i), 8)
        for i in range(NPAGES):
            gm.populate(i, struct.pack("<Q", 0x9000 + i).ljust(PAGE, b"\0"))  # type: ignore[attr-defined]

        def attr(gpa: int, n: int, value: int) -> None:
            k.ioctl(v, K.KVM_SET_MEMORY_ATTRIBUTES, bytearray(K.kvm_memory_attributes_fmt.pack(gpa, n, value, 0)))

        attr(BASE, 4 * PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)  # pages 0..3 private (from gmem)
        attr(BASE + (NPAGES + 1) * PAGE, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)  # page 17: no gmem there
        p = TouchParams(BASE, 2 * NPAGES * PAGE, Pattern.SEQUENTIAL)
        g.load(toucher_image(BASE, p, mapped_size=BASE + 2 * NPAGES * PAGE))
        with pytest.raises(OSError) as ei:
            g.run()
        assert ei.value.errno == errno.EFAULT
        assert _memory_fault(g) == (K.KVM_EXIT_MEMORY_FAULT, K.KVM_MEMORY_EXIT_FLAG_PRIVATE,
                                    BASE + (NPAGES + 1) * PAGE, PAGE)
        attr(BASE + (NPAGES + 1) * PAGE, PAGE, 0)  # convert to shared and re-enter
        r = g.run()
        seen = [0x9000 + i if i < 4 else 0x5000 + i for i in range(2 * NPAGES)]
        assert (r.reports[0], r.report64(1)) == (2 * NPAGES, sum(seen))
        g.close()
    finally:
        k.shutdown()


def test_kvm_userfault_guest_unreadable_bitmap(guest: tuple[FakeKernel, GuestVM]) -> None:
    """The VMM unmaps the bitmap: KVM_RUN fails EFAULT (never hangs, never crashes)."""
    k, g = guest
    mem = k.mmap(-1, 4 * PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    bitmap = k.mmap(-1, PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    buf = bytearray(KU.kvm_userspace_memory_region2_fmt.pack(
        1, KU.KVM_MEM_USERFAULT, BASE, 4 * PAGE, mem.address, 0, 0, 0, bitmap.address))
    k.ioctl(g.vm_fd, K.KVM_SET_USER_MEMORY_REGION2, buf)
    k.munmap(bitmap.address, PAGE)
    p = TouchParams(BASE, 4 * PAGE, Pattern.SEQUENTIAL)
    g.load(toucher_image(BASE, p, mapped_size=BASE + 4 * PAGE))
    with pytest.raises(OSError) as ei:
        g.run()
    assert ei.value.errno == errno.EFAULT
    # (v3 leaves exit_reason stale here; the fake reports the generic error-pfn exit)
    assert _memory_fault(g) == (K.KVM_EXIT_MEMORY_FAULT, 0, BASE, PAGE)


def test_kvm_userfault_on_the_guests_page_tables_and_code(guest: tuple[FakeKernel, GuestVM]) -> None:
    """Everything under KVM Userfault, page tables and code included (a post-copy start).

    The vCPU's first access is the page walk's read of the PML4: that must exit
    KVM_EXIT_MEMORY_FAULT (USERFAULT) with the page-table page's gpa, like any
    other stage-2 fault, not fail as an emulation error. Regression: the walk's
    own reads reported KVM_EXIT_INTERNAL_ERROR when a table page was not there yet.
    """
    k, g = guest
    p = TouchParams(0x160000, 16 * PAGE, Pattern.SEQUENTIAL, write=True, seed=5)  # free system-area pages
    g.load(toucher_image(BASE, p))
    mem = g.memory
    assert mem is not None
    npages = BASE // PAGE
    source = bytes(mem[:BASE])  # what the "source" holds
    k.madvise(mem.address, BASE, mman.MADV_DONTNEED)  # the destination starts empty
    bitmap = k.mmap(-1, PAGE, RW, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)
    words = (ctypes.c_uint64 * (npages // 64)).from_address(bitmap.address)
    for w in range(npages // 64):
        words[w] = (1 << 64) - 1
    buf = bytearray(KU.kvm_userspace_memory_region2_fmt.pack(
        0, KU.KVM_MEM_USERFAULT, 0, BASE, mem.address, 0, 0, 0, bitmap.address))
    k.ioctl(g.vm_fd, K.KVM_SET_USER_MEMORY_REGION2, buf)
    faults: list[int] = []
    for _ in range(npages + 1):
        try:
            r = g.run()
            break
        except OSError as e:
            assert e.errno == errno.EFAULT, e
            reason, flags, gpa, size = _memory_fault(g)
            assert (reason, flags, size) == (K.KVM_EXIT_MEMORY_FAULT, KU.KVM_MEMORY_EXIT_FLAG_USERFAULT, PAGE)
            i = gpa // PAGE
            assert words[i // 64] >> (i % 64) & 1, f"fault on gpa {gpa:#x} whose bit is clear"
            faults.append(gpa)
            mem.view()[gpa : gpa + PAGE] = source[gpa : gpa + PAGE]
            words[i // 64] &= ~(1 << (i % 64))
    else:
        pytest.fail("the guest never finished")
    from fakekvm.guests import layout

    assert faults[0] == layout.PML4_ADDR  # the walk's first read
    assert layout.CODE_ADDR in faults and len(set(faults)) == len(faults)
    assert r.reports[0] == p.npages
