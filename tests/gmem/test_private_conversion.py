"""Private/shared classification, KVM_EXIT_MEMORY_FAULT fields, and where pages come from."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman
from fakekvm.fake import FakeKernel
from fakekvm.fake.kvm import private as P
from fakekvm.fake.profiles import get_profile
from fakekvm.testing import gmem_scenarios as S

PAGE = 4096
BIT = P.FAKE_CC_SHARED_BIT
PRIV_FLAG = K.KVM_MEMORY_EXIT_FLAG_PRIVATE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS


def _attrs(*private_gfns: int) -> P.MemoryAttributes:
    a = P.MemoryAttributes()
    for g in private_gfns:
        a.set(g, g + 1, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    return a


def test_private_classify_per_vm_type() -> None:
    default = P.VmTypeInfo(0, False)
    sw = P.VmTypeInfo(1, True)
    cc = P.VmTypeInfo(P.KVM_X86_FAKE_CC_VM, True, BIT)
    a = _attrs(5)
    assert P.classify(default, 0x5123, a) == (0x5123, False)  # no private memory: always shared
    assert P.classify(sw, 0x5123, a) == (0x5123, True)  # SW_PROTECTED: the attribute decides
    assert P.classify(sw, 0x6123, a) == (0x6123, False)
    assert P.classify(cc, 0x6123, a) == (0x6123, True)  # CC: no shared bit -> private
    assert P.classify(cc, BIT | 0x5123, a) == (0x5123, False)  # shared bit -> shared, stripped


def test_private_check_access_mismatch_fields() -> None:
    a = _attrs(5)
    gm_slot = SimpleNamespace(flags=K.KVM_MEM_GUEST_MEMFD, guest_memfd=object())
    plain = SimpleNamespace(flags=0, guest_memfd=None)
    # private access to a shared gfn: flags PRIVATE, the page's gpa, size 4096
    assert P.check_access(a, gm_slot, 0x6ABC, True) == P.MemoryFault(PRIV_FLAG, 0x6000, 4096)
    # shared access to a private gfn: flags 0
    assert P.check_access(a, gm_slot, 0x5FFF, False) == P.MemoryFault(0, 0x5000, 4096)
    assert P.check_access(a, gm_slot, 0x5000, True) is None
    assert P.check_access(a, gm_slot, 0x6000, False) is None
    # a private access to a slot without guest_memfd
    assert P.check_access(a, plain, 0x5010, True) == P.MemoryFault(PRIV_FLAG, 0x5000, 4096)
    # no slot (MMIO): only the mismatch check
    assert P.check_access(a, None, 0x6000, False) is None
    assert P.check_access(a, None, 0x6000, True) == P.MemoryFault(PRIV_FLAG, 0x6000, 4096)
    # a VM without attributes: every gfn shared
    assert P.check_access(None, plain, 0x5000, False) is None
    assert P.check_access(None, gm_slot, 0x5000, True) == P.MemoryFault(PRIV_FLAG, 0x5000, 4096)


def test_private_memory_fault_exit_bytes() -> None:
    run = bytearray(K.kvm_run.sizeof())
    run[32:56] = b"\xee" * 24
    f = P.MemoryFault(PRIV_FLAG, 0x7000)
    f.write_to(run)
    assert K.kvm_run_exit_reason_fmt.unpack_from(run, K.KVM_RUN_EXIT_REASON_OFFSET) == (K.KVM_EXIT_MEMORY_FAULT,)
    assert K.kvm_run_memory_fault_fmt.unpack_from(run, K.KVM_RUN_EXIT_OFFSET) == (PRIV_FLAG, 0x7000, 4096)
    parsed = K.kvm_run.parse(bytes(run))
    assert parsed.exit_reason == 39
    e = f.error()
    assert e.errno == errno.EFAULT and "KVM_EXIT_MEMORY_FAULT" in str(e)


@pytest.fixture
def cc() -> Iterator[tuple[FakeKernel, int]]:
    k = FakeKernel(profile=P.with_fake_cc(get_profile("6.18")))  # type: ignore[arg-type]
    with S.vm(k, P.KVM_X86_FAKE_CC_VM) as v:
        yield k, v
    k.shutdown()


def test_private_fake_cc_vm_type_is_advertised(cc: tuple[FakeKernel, int]) -> None:
    k, v = cc
    kfd = k.open("/dev/kvm", 2)
    assert k.ioctl(kfd, K.KVM_CHECK_EXTENSION, K.KVM_CAP_VM_TYPES) & (1 << P.KVM_X86_FAKE_CC_VM)
    k.close(kfd)
    assert k.ioctl(v, K.KVM_CHECK_EXTENSION, K.KVM_CAP_MEMORY_ATTRIBUTES) == P.KVM_MEMORY_ATTRIBUTE_PRIVATE
    # the fake type models in-place conversion: pages start shared (host-mappable)
    want = K.GUEST_MEMFD_FLAG_MMAP | K.GUEST_MEMFD_FLAG_INIT_SHARED
    assert k.ioctl(v, K.KVM_CHECK_EXTENSION, K.KVM_CAP_GUEST_MEMFD_FLAGS) == want
    assert S.gmem_res(k, v, 4 * PAGE, S.MMAP | S.INIT_SHARED) == "fd"
    assert S.gmem_res(k, v, 4 * PAGE, S.MMAP) == "fd"
    assert S.gmem_res(k, v, 4 * PAGE, 1 << 2) == "EINVAL"


def _setup(k: FakeKernel, v: int, gmem_flags: int = 0) -> tuple[int, int, object]:
    """Slot 0: gpa 0, 16 pages, anon shared memory + a 16-page guest_memfd. Slot 1: plain, gpa 1 MiB."""
    mem = k.mmap(-1, 32 * PAGE, RW, ANON)
    gfd = S.create_gmem(k, v, 16 * PAGE, gmem_flags)
    assert S.region2(k, v, 0, K.KVM_MEM_GUEST_MEMFD, 0, 16 * PAGE, mem.address, 0, gfd) == 0
    assert S.region2(k, v, 1, 0, 1 << 20, 16 * PAGE, mem.address + 16 * PAGE) == 0
    return mem.address, gfd, k.file(gfd)


def _set_attr(k: FakeKernel, v: int, gpa: int, size: int, value: int) -> None:
    buf = bytearray(K.kvm_memory_attributes_fmt.pack(gpa, size, value, 0))
    P.set_memory_attributes(k.file(v), K.KVM_SET_MEMORY_ATTRIBUTES, buf)


def test_private_conversion_on_the_fake_cc_vm(cc: tuple[FakeKernel, int]) -> None:
    k, v = cc
    hva, gfd, gm = _setup(k, v)
    cpu = S.ModelVcpu(k, v)
    ctypes.memmove(hva + 2 * PAGE, b"shared!!", 8)
    gm.populate(2, b"private!".ljust(PAGE, b"\0"))  # type: ignore[attr-defined]
    # gfn 2 is shared: a shared access reads userspace_addr, a private one exits
    assert cpu.read(BIT | 0x2000) == b"shared!!"
    assert cpu.read(0x2008) == P.MemoryFault(PRIV_FLAG, 0x2000, 4096)
    # convert to private: translations of the range are dropped, then served from guest_memfd
    _set_attr(k, v, 0x2000, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert (0x2000, 0x3000) in cpu.invalidations
    assert cpu.read(0x2000) == b"private!"
    assert cpu.read(BIT | 0x2000) == P.MemoryFault(0, 0x2000, 4096)  # gpa without the shared bit
    assert gm.is_allocated(2) and not gm.is_allocated(3)  # type: ignore[attr-defined]
    # a private access to a gmem-less slot, and to no slot at all
    _set_attr(k, v, 1 << 20, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert cpu.read((1 << 20) + 8) == P.MemoryFault(PRIV_FLAG, 1 << 20, 4096)
    assert cpu.read(BIT | (1 << 20)) == P.MemoryFault(0, 1 << 20, 4096)
    assert cpu.read(BIT | (8 << 20)) == "MMIO"
    assert cpu.read(8 << 20) == P.MemoryFault(PRIV_FLAG, 8 << 20, 4096)
    # PUNCH_HOLE frees the private page and drops the guest's translation
    cpu.invalidations.clear()
    k.fallocate(gfd, S.PUNCH, 2 * PAGE, PAGE)
    assert cpu.invalidations == [(0x2000, 0x3000)]
    assert cpu.read(0x2000) == bytes(8) and not gm.is_allocated(3)  # type: ignore[attr-defined]
    # back to shared: the bytes in userspace_addr were never touched
    _set_attr(k, v, 0x2000, PAGE, 0)
    assert cpu.read(BIT | 0x2000) == b"shared!!"


def test_private_sw_protected_attribute_decides() -> None:
    k = FakeKernel(profile="6.18")
    try:
        with S.vm(k, K.KVM_X86_SW_PROTECTED_VM) as v:
            hva, _gfd, gm = _setup(k, v)
            cpu = S.ModelVcpu(k, v)
            ctypes.memmove(hva + 3 * PAGE, b"shared..", 8)
            gm.populate(3, b"private.".ljust(PAGE, b"\0"))  # type: ignore[attr-defined]
            assert cpu.read(0x3000) == b"shared.."
            _set_attr(k, v, 0x3000, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            assert cpu.read(0x3000) == b"private."  # no mismatch possible: private iff attribute
            _set_attr(k, v, 1 << 20, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            assert cpu.read(1 << 20) == P.MemoryFault(PRIV_FLAG, 1 << 20, 4096)  # no guest_memfd there
    finally:
        k.shutdown()


@pytest.mark.parametrize("profile,from_gmem", [("6.18", True), ("6.18-pvm", False)])
def test_private_gmem_only_slot(profile: str, from_gmem: bool) -> None:
    """A slot whose gmem has MMAP: mainline serves every access from gmem; PVM took userspace_addr."""
    k = FakeKernel(profile=profile)
    try:
        with S.vm(k, 0) as v:
            hva, gfd, _gm = _setup(k, v, S.MMAP | S.INIT_SHARED)
            view = k.mmap(gfd, 16 * PAGE, RW, mman.MAP_SHARED)
            ctypes.memmove(view.address + PAGE, b"in gmem!", 8)
            ctypes.memmove(hva + PAGE, b"in anon!", 8)
            cpu = S.ModelVcpu(k, v)
            assert cpu.read(0x1000) == (b"in gmem!" if from_gmem else b"in anon!")
            assert cpu.read(1 << 20) == bytes(8)  # the plain slot
    finally:
        k.shutdown()


def test_private_backing_for_a_released_gmem_is_a_memory_fault(cc: tuple[FakeKernel, int]) -> None:
    k, v = cc
    _hva, _gfd, gm = _setup(k, v)
    _set_attr(k, v, 0, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm = k.file(v)
    slot = vm.spaces[0].lookup(0)  # type: ignore[attr-defined]
    gm.unbind(slot)  # type: ignore[attr-defined]  # (what kvm_gmem_release does to the slot)
    info = P.vm_type_info(vm.profile, vm.vm_type)  # type: ignore[attr-defined]
    a = P.resolve(info, vm.attributes, vm.spaces[0].lookup, 0x10)  # type: ignore[attr-defined]
    assert a.fault == P.MemoryFault(PRIV_FLAG, 0, 4096) and a.private and a.hva == 0


def test_private_pre_translate_hook(cc: tuple[FakeKernel, int]) -> None:
    """What FakeVm.translate gets from the hook: FAULT, gmem-backed RAM, or 'go on' with the gpa."""
    from fakekvm.fake.kvm.translate import Kind

    k, v = cc
    hva, _gfd, gm = _setup(k, v)
    vm = k.file(v)
    t, gpa = P.pre_translate(vm, 0x2123, False, False, None)
    assert t is not None and gpa == 0x2000
    assert (t.kind, t.gpa, t.fault_flags, t.slot_base_gpa, t.slot_size) == (Kind.FAULT, 0x2000, PRIV_FLAG, 0, 16 * PAGE)
    t, gpa = P.pre_translate(vm, BIT | 0x2123, True, False, None)
    assert t is None and gpa == 0x2000  # shared: the ordinary hva path, shared bit stripped
    _set_attr(k, v, 0x2000, PAGE, P.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    t, gpa = P.pre_translate(vm, 0x2000, True, False, None)
    assert t is not None and t.kind == Kind.RAM and t.writable and gpa == 0x2000
    assert t.hva == gm.get_pfn(vm.spaces[0].lookup(2), 2) == t.slot_hva + 2 * PAGE  # type: ignore[attr-defined]
    assert t.hva != hva + 2 * PAGE
    t, _ = P.pre_translate(vm, BIT | 0x2000, False, False, None)
    assert t is not None and (t.kind, t.fault_flags) == (Kind.FAULT, 0)
    t, _ = P.pre_translate(vm, 8 << 20, False, False, None)  # private access, no memslot
    assert t is not None and (t.kind, t.gpa, t.slot_size) == (Kind.FAULT, 8 << 20, 0)


def test_private_pre_translate_is_a_no_op_on_plain_vms() -> None:
    k = FakeKernel(profile="6.18-pvm")
    try:
        with S.vm(k, 0) as v:
            _setup(k, v, S.MMAP | S.INIT_SHARED)
            vm = k.file(v)
            assert P.pre_translate(vm, 0x3456, False, False, None) == (None, 0x3000)  # PVM: hva path
            assert P.pre_translate(vm, (1 << 20) + 5, False, False, None) == (None, 1 << 20)
    finally:
        k.shutdown()
