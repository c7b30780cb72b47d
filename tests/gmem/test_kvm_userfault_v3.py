"""KVM Userfault v3 (NOT UPSTREAM): memslot bitmap semantics and the exit fields."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import kvm_userfault as KU
from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.kvm import private as P
from fakekvm.fake.kvm import userfault as U
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import Kernel
from fakekvm.testing import gmem_scenarios as S

PAGE = 4096
UF_FLAG = KU.KVM_MEMORY_EXIT_FLAG_USERFAULT
PRIV_FLAG = K.KVM_MEMORY_EXIT_FLAG_PRIVATE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS


def test_kvm_userfault_constants_agree_with_the_abi() -> None:
    assert U.KVM_MEM_USERFAULT == KU.KVM_MEM_USERFAULT == 1 << 3
    assert P.KVM_MEMORY_EXIT_FLAG_USERFAULT == UF_FLAG == 1 << 4
    assert KU.USERFAULT_BITMAP_OFFSET == 48
    assert [U.bitmap_bytes(n) for n in (1, 64, 65, 128, 129)] == [8, 8, 16, 16, 24]


def test_kvm_userfault_check_region() -> None:
    words = (ctypes.c_uint64 * 2)()
    addr = ctypes.addressof(words)
    U.check_region(0, 1 << 30, 0)  # flag off: the pointer is not looked at
    U.check_region(U.KVM_MEM_USERFAULT, 128 * PAGE, addr)  # 16 readable bytes: fine
    U.check_region(U.KVM_MEM_USERFAULT, 0, 0)  # delete: nothing to check
    real = RealKernel()
    m = real.mmap(-1, 2 * PAGE, RW, ANON)
    real.munmap(m.address + PAGE, PAGE)  # the bitmap's last readable byte is m.address + PAGE - 1
    edge = m.address + PAGE - 16
    try:
        U.check_region(U.KVM_MEM_USERFAULT, 128 * PAGE, edge)  # exactly 16 bytes: fine
        # access_ok() only: an unmapped (or NULL) bitmap is a valid *range* at set time
        U.check_region(U.KVM_MEM_USERFAULT, 129 * PAGE, edge)
        U.check_region(U.KVM_MEM_USERFAULT, PAGE, 0)
        for ptr, npages in [(U.TASK_SIZE_MAX - 8, 128), (1 << 63, 1), (0x0100_0000_0000_1000, 1)]:
            with pytest.raises(OSError) as ei:
                U.check_region(U.KVM_MEM_USERFAULT, npages * PAGE, ptr)
            assert ei.value.errno == errno.EINVAL and "userfault_bitmap" in str(ei.value)
    finally:
        real.munmap(m.address, PAGE)


def test_kvm_userfault_check_reads_the_user_word_live() -> None:
    words = (ctypes.c_uint64 * 2)()
    slot = SimpleNamespace(base_gfn=0x100, flags=U.KVM_MEM_USERFAULT, userfault_bitmap=ctypes.addressof(words))
    words[0] = 1 << 63
    words[1] = 0b101
    assert [U.check(slot, 0x100 + i) for i in (0, 62, 63, 64, 65, 66)] == [False, False, True, True, False, True]
    words[1] = 0  # the VMM clears the bit with a store: no cache in between
    assert not U.check(slot, 0x140)
    # exit fields: USERFAULT, the page's gpa, 4096; | PRIVATE for a private access
    words[0] = 1 << 5
    assert U.userfault_exit(slot, (0x105 << 12) | 0x123, False) == P.MemoryFault(UF_FLAG, 0x105000, 4096)
    assert U.userfault_exit(slot, 0x105000, True) == P.MemoryFault(UF_FLAG | PRIV_FLAG, 0x105000, 4096)
    assert U.userfault_exit(slot, 0x106000, True) is None
    assert U.userfault_exit(SimpleNamespace(flags=0), 0x105000, False) is None
    bad = SimpleNamespace(base_gfn=0, flags=U.KVM_MEM_USERFAULT, userfault_bitmap=8)
    with pytest.raises(OSError) as ei:  # unreadable word: KVM_RUN fails EFAULT, no exit
        U.check(bad, 0)
    assert ei.value.errno == errno.EFAULT
    run = bytearray(K.kvm_run.sizeof())
    P.MemoryFault(UF_FLAG | PRIV_FLAG, 0x105000).write_to(run)
    assert K.kvm_run_memory_fault_fmt.unpack_from(run, 32) == (0x18, 0x105000, 4096)


def _region2_uf(k: Kernel, v: int, slot: int, flags: int, gpa: int, size: int, hva: int, bitmap: int,
                gofs: int = 0, gfd: int = 0) -> object:
    buf = bytearray(KU.kvm_userspace_memory_region2_fmt.pack(slot, flags, gpa, size, hva, gofs, gfd, 0, bitmap))
    return S.res(lambda: k.ioctl(v, K.KVM_SET_USER_MEMORY_REGION2, buf))


@pytest.mark.parametrize("kind", [pytest.param("real", marks=pytest.mark.real_kernel), "fake"])
def test_kvm_userfault_flag_is_einval_on_this_host(kind: str) -> None:
    """Not upstream: the live 6.18 kernel (and the fake's 6.18-pvm profile) reject bit 3."""
    k: Kernel = RealKernel() if kind == "real" else FakeKernel(profile="6.18-pvm")
    words = (ctypes.c_uint64 * 1)()
    try:
        with S.vm(k) as v:
            mem = k.mmap(-1, 4 * PAGE, RW, ANON)
            r = _region2_uf(k, v, 0, U.KVM_MEM_USERFAULT, 0, 4 * PAGE, mem.address, ctypes.addressof(words))
            assert r == "EINVAL"
            k.munmap(mem.address, 4 * PAGE)
    finally:
        k.shutdown()


@pytest.fixture
def ufk() -> Iterator[tuple[FakeKernel, int]]:
    k = FakeKernel(profile="6.18+kvm-userfault")
    with S.vm(k, 0) as v:
        yield k, v
    k.shutdown()


def test_kvm_userfault_bitmap_semantics(ufk: tuple[FakeKernel, int]) -> None:
    k, v = ufk
    mem = k.mmap(-1, 128 * PAGE, RW, ANON)
    words = (ctypes.c_uint64 * 2)()
    bm = ctypes.addressof(words)
    ctypes.memmove(mem.address + 3 * PAGE, b"page3...", 8)
    ctypes.memmove(mem.address + 70 * PAGE, b"page70..", 8)
    words[0] = 1 << 3
    words[1] = 1 << 6  # gfn 70
    U.check_region(U.KVM_MEM_USERFAULT, 128 * PAGE, bm)
    assert _region2_uf(k, v, 0, U.KVM_MEM_USERFAULT, 0, 128 * PAGE, mem.address, bm) == 0
    cpu = S.ModelVcpu(k, v)
    # bit set -> exit; the fake's own (non-vCPU) accesses are not intercepted
    assert cpu.read(0x3010) == P.MemoryFault(UF_FLAG, 0x3000, 4096)
    assert cpu.read(70 * PAGE) == P.MemoryFault(UF_FLAG, 70 * PAGE, 4096)
    assert bytes(k.mm.read(mem.address + 3 * PAGE, 8)) == b"page3..."
    # the VMM fills the page and clears the bit; re-entering proceeds
    words[0] = 0
    assert cpu.read(0x3000) == b"page3..."
    # setting the bit again has no effect on the mapped page ...
    words[0] = 1 << 3
    assert cpu.read(0x3000) == b"page3..."
    assert cpu.read(0x4000) == bytes(8)  # (gfn 4: bit clear)
    # ... until the flag is toggled off and on, which drops the slot's translations
    assert _region2_uf(k, v, 0, 0, 0, 128 * PAGE, mem.address, 0) == 0
    assert cpu.read(0x3000) == b"page3..."  # flag off: bits are ignored
    cpu.invalidations.clear()
    assert _region2_uf(k, v, 0, U.KVM_MEM_USERFAULT, 0, 128 * PAGE, mem.address, bm) == 0
    assert (0, 128 * PAGE) in cpu.invalidations
    assert cpu.read(0x3000) == P.MemoryFault(UF_FLAG, 0x3000, 4096)
    slot = k.file(v).spaces[0].lookup(0)  # type: ignore[attr-defined]
    assert U.enabling(0, slot.flags) and not U.enabling(slot.flags, slot.flags)


def test_kvm_userfault_private_access_flags() -> None:
    """On a SW_PROTECTED VM a userfault on a private gfn reports USERFAULT | PRIVATE."""
    k = FakeKernel(profile="6.18+kvm-userfault")
    try:
        with S.vm(k, K.KVM_X86_SW_PROTECTED_VM) as v:
            mem = k.mmap(-1, 8 * PAGE, RW, ANON)
            gfd = S.create_gmem(k, v, 8 * PAGE, 0)
            words = (ctypes.c_uint64 * 1)(0b110)
            flags = U.KVM_MEM_USERFAULT | K.KVM_MEM_GUEST_MEMFD
            assert _region2_uf(k, v, 0, flags, 0, 8 * PAGE, mem.address, ctypes.addressof(words), 0, gfd) == 0
            buf = bytearray(K.kvm_memory_attributes_fmt.pack(PAGE, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0))
            P.set_memory_attributes(k.file(v), K.KVM_SET_MEMORY_ATTRIBUTES, buf)
            cpu = S.ModelVcpu(k, v)
            assert cpu.read(0x1000) == P.MemoryFault(UF_FLAG | PRIV_FLAG, 0x1000, 4096)
            assert cpu.read(0x2000) == P.MemoryFault(UF_FLAG, 0x2000, 4096)
            words[0] = 0
            k.file(gfd).populate(1, b"gmem".ljust(PAGE, b"\0"))  # type: ignore[attr-defined]
            assert cpu.read(0x1000, 4) == b"gmem"
    finally:
        k.shutdown()
