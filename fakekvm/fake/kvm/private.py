"""Memory attributes and the private/shared classification of a vCPU access.

Models, from Linux 6.18:

* ``KVM_SET_MEMORY_ATTRIBUTES`` (``virt/kvm/kvm_main.c``
  ``kvm_vm_ioctl_set_mem_attributes`` / ``kvm_vm_set_mem_attributes``,
  api.rst §4.141): ``flags`` must be 0, the attributes must be a subset of
  ``kvm_supported_mem_attributes`` (PRIVATE on a VM with private memory; the
  RFC KVM Userfault adds USERFAULT while enabled), ``size`` 0 or
  ``address + size`` wrapping is EINVAL, unaligned address/size EINVAL. A range
  already holding exactly the attributes is a no-op; otherwise the range is
  set and its translations are invalidated (``kvm_handle_gfn_range``).
* The attribute store (`MemoryAttributes`, the VM's range store): runs, not pages, per attribute
  bit, indexed by gfn, so a range update costs O(range / 8) bytes of slice
  assignment and a 64 GiB guest with per-page flips never makes one Python
  object per page. At VM creation every gfn has attributes 0 (shared).
* The classification of an access (``arch/x86/kvm/mmu/mmu.c``
  ``kvm_mmu_page_fault``, ``kvm_mmu_faultin_pfn``, ``__kvm_mmu_faultin_pfn``,
  ``kvm_mmu_faultin_pfn_gmem``, ``kvm_mmu_prepare_memory_fault_exit``):

  - VM without private memory: every access is shared;
  - ``KVM_X86_SW_PROTECTED_VM``: the gfn's PRIVATE attribute alone decides
    (``PFERR_PRIVATE_ACCESS`` is set from ``kvm_mem_is_private``), so a
    mismatch cannot happen;
  - ``KVM_X86_FAKE_CC_VM`` (NOT UPSTREAM, fakekvm's own): like TDX, the guest
    marks an access SHARED with a guest-physical "shared bit" and PRIVATE
    without it. TDX uses GPA bit 47 (GPAW 48) or 51 (GPAW 52); the fake uses
    bit 47 (`FAKE_CC_SHARED_BIT`), i.e. a guest with 4-level paging. The bit
    is stripped from the reported gpa (``kvm_gfn_direct_bits``).

  Then ``check_access``: private-ness != the gfn's PRIVATE attribute ->
  ``KVM_EXIT_MEMORY_FAULT`` (KVM_RUN returns -1/EFAULT) with flags
  ``KVM_MEMORY_EXIT_FLAG_PRIVATE`` iff the access was private, the page's gpa
  and size 4096; a private access to a slot without guest_memfd -> the same
  exit. Private accesses are served from guest_memfd; shared ones from
  ``userspace_addr``, except on a 6.18 "guest_memfd-only" slot (the gmem was
  created with ``GUEST_MEMFD_FLAG_MMAP``: ``KVM_MEMSLOT_GMEM_ONLY``) where every
  access is served from guest_memfd -- not on PVM, which measured the hva path.

The functions here are pure (no thread, no fd) except `set_memory_attributes`,
the ioctl handler ``(vm, request, arg) -> int`` for the VM's dispatch, and
`pre_translate`, the hook ``FakeVm.translate`` runs before its hva path:
`resolve` composes classify -> `check_access` -> the KVM Userfault check ->
`backing_for` in the kernel's order.
"""

from __future__ import annotations

import dataclasses
import errno
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from fakekvm.abi.fake_cc import FAKE_CC_SHARED_BIT, KVM_X86_FAKE_CC_VM
from fakekvm.abi.kvm import (
    GUEST_MEMFD_FLAG_MMAP,
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_RUN_EXIT_OFFSET,
    KVM_RUN_EXIT_REASON_OFFSET,
    KVM_X86_SW_PROTECTED_VM,
    kvm_memory_attributes_fmt,
    kvm_run_exit_reason_fmt,
    kvm_run_memory_fault_fmt,
)
from fakekvm.abi.kvm_userfault import KVM_MEMORY_ATTRIBUTE_USERFAULT
from fakekvm.abi.kvm_userfault import (
    KVM_MEMORY_EXIT_FLAG_USERFAULT as KVM_MEMORY_EXIT_FLAG_USERFAULT,  # re-exported
)
from fakekvm.fake.kvm.translate import Kind, Translation

if TYPE_CHECKING:
    from fakekvm.fake.profiles import Profile
    from fakekvm.kernel.seam import IoctlArg

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
U64 = (1 << 64) - 1

_MEM_ATTR = kvm_memory_attributes_fmt
_RUN_EXIT_REASON = kvm_run_exit_reason_fmt
_RUN_MEMORY_FAULT = kvm_run_memory_fault_fmt


# ---------------------------------------------------------------------------------------------
# The attribute store
# ---------------------------------------------------------------------------------------------
from fakekvm.fake.kvm.attributes import RangeAttributes as MemoryAttributes  # noqa: E402


# ---------------------------------------------------------------------------------------------
# VM types
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VmTypeInfo:
    """What the access classification needs to know about a VM type on a profile."""

    vm_type: int
    #: kvm_arch_has_private_mem
    private_mem: bool
    #: GPA bit marking a SHARED access (TDX-like); 0: the PRIVATE attribute decides
    shared_bit: int = 0
    #: 6.18 KVM_MEMSLOT_GMEM_ONLY: a slot whose gmem has MMAP serves every access from gmem
    gmem_only_slots: bool = True


def vm_type_info(profile: Profile | None, vm_type: int) -> VmTypeInfo:
    """The `VmTypeInfo` of ``vm_type`` on ``profile`` (None: mainline defaults)."""
    private = False
    gmem_only = True
    if profile is not None:
        private = vm_type in profile.private_mem_vm_types
        # Profile.gmem_only_slots if the profile has it; PVM (bad_hva_exit "mmio") took the
        # hva path for an MMAP gmem slot when measured (uapi.md §6.4), mainline 6.18 does not.
        gmem_only = bool(getattr(profile, "gmem_only_slots", profile.bad_hva_exit != "mmio"))
    elif vm_type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_FAKE_CC_VM):
        private = True
    shared_bit = FAKE_CC_SHARED_BIT if vm_type == KVM_X86_FAKE_CC_VM and private else 0
    return VmTypeInfo(vm_type, private, shared_bit, gmem_only)


def with_fake_cc(profile: Profile) -> Profile:
    """``profile`` plus `KVM_X86_FAKE_CC_VM` (answers like a SW_PROTECTED VM of that profile).

    Private memory, ``KVM_CAP_MEMORY_ATTRIBUTES`` = PRIVATE, guest_memfd flags
    MMAP|INIT_SHARED (modelling the in-place conversion series: pages start shared
    and host-mappable, and keep their contents when converted; mainline 6.18 refuses
    INIT_SHARED on private-memory VMs — the fake type is not mainline), one address
    space, and bit 16 in ``KVM_CAP_VM_TYPES``.
    """
    from fakekvm.fake import profiles as P

    t = KVM_X86_FAKE_CC_VM
    base_vm = P.KVM_X86_SW_PROTECTED_VM if P.KVM_X86_SW_PROTECTED_VM in profile.vm_types else 0
    sys_caps = dict(profile.sys_caps_raw)
    sys_caps[P.KVM_CAP_VM_TYPES] = sys_caps.get(P.KVM_CAP_VM_TYPES, 1) | (1 << t)
    sys_caps[P.KVM_CAP_MEMORY_ATTRIBUTES] = KVM_MEMORY_ATTRIBUTE_PRIVATE
    over = {k: MappingProxyType(dict(v)) for k, v in profile.vm_cap_overrides.items()}
    cc = dict(profile.vm_cap_overrides.get(base_vm, {}))
    cc.update({
        P.KVM_CAP_MEMORY_ATTRIBUTES: KVM_MEMORY_ATTRIBUTE_PRIVATE,
        P.KVM_CAP_GUEST_MEMFD_FLAGS: P.GUEST_MEMFD_FLAG_MMAP | P.GUEST_MEMFD_FLAG_INIT_SHARED,
        P.KVM_CAP_MULTI_ADDRESS_SPACE: 1,
    })
    over[t] = MappingProxyType(cc)
    if 0 in over and P.KVM_CAP_MEMORY_ATTRIBUTES not in over[0]:
        d = dict(over[0])
        d[P.KVM_CAP_MEMORY_ATTRIBUTES] = 0
        over[0] = MappingProxyType(d)
    flags = dict(profile.memslot_flags)
    flags[t] = flags.get(base_vm, flags.get(0, 0)) | P.KVM_MEM_GUEST_MEMFD
    spaces = dict(profile.address_spaces)
    spaces[t] = 1
    return dataclasses.replace(
        profile,
        name=f"{profile.name}+fake-cc",
        sys_caps_raw=MappingProxyType(sys_caps),
        vm_cap_overrides=MappingProxyType(over),
        vm_types=profile.vm_types | {t},
        private_mem_vm_types=profile.private_mem_vm_types | {t},
        memslot_flags=MappingProxyType(flags),
        address_spaces=MappingProxyType(spaces),
        has_memory_attributes_ioctl=True,
        has_guest_memfd=True,
        has_region2=True,
    )


# ---------------------------------------------------------------------------------------------
# Classification and the memory-fault exit
# ---------------------------------------------------------------------------------------------
class MemoryFault(NamedTuple):
    """``kvm_run.memory_fault`` of a ``KVM_EXIT_MEMORY_FAULT`` (KVM_RUN fails EFAULT)."""

    flags: int
    gpa: int
    size: int = PAGE_SIZE

    def error(self) -> OSError:
        """The error KVM_RUN raises with this exit."""
        return OSError(
            errno.EFAULT,
            f"KVM_RUN: KVM_EXIT_MEMORY_FAULT flags={self.flags:#x} gpa={self.gpa:#x} size={self.size:#x}",
        )

    def write_to(self, run: Any) -> None:
        """Fill ``exit_reason`` and ``memory_fault`` of a kvm_run buffer (bytearray/Mapping)."""
        mv = memoryview(run).cast("B")
        _RUN_EXIT_REASON.pack_into(mv, KVM_RUN_EXIT_REASON_OFFSET, KVM_EXIT_MEMORY_FAULT)
        _RUN_MEMORY_FAULT.pack_into(mv, KVM_RUN_EXIT_OFFSET, self.flags, self.gpa, self.size)


def classify(info: VmTypeInfo, gpa_from_guest: int, attrs: MemoryAttributes | Any = None) -> tuple[int, bool]:
    """(gpa, private) of a vCPU access to ``gpa_from_guest``.

    TDX-like types: the shared bit marks a shared access and is stripped.
    SW_PROTECTED: private iff the gfn's PRIVATE attribute is set (``attrs``).
    No private memory: always shared.
    """
    if not info.private_mem:
        return gpa_from_guest, False
    if info.shared_bit:
        if gpa_from_guest & info.shared_bit:
            return gpa_from_guest & ~info.shared_bit, False
        return gpa_from_guest, True
    if attrs is None:
        return gpa_from_guest, False
    return gpa_from_guest, _is_private(attrs, gpa_from_guest >> PAGE_SHIFT)


def _is_private(attrs: Any, gfn: int) -> bool:
    f = getattr(attrs, "is_private", None)
    if f is not None:
        return bool(f(gfn))
    return bool(attrs.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)


def check_access(attrs: MemoryAttributes | Any, slot: Any, gpa: int, private: bool) -> MemoryFault | None:
    """The mismatch and no-gmem checks of ``kvm_mmu_faultin_pfn``; None means go on.

    ``attrs`` None stands for a VM without memory attributes (all gfns shared).
    ``slot`` None is MMIO (no memslot): only the mismatch check applies.
    """
    page = gpa & PAGE_MASK
    flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
    is_priv = attrs is not None and _is_private(attrs, gpa >> PAGE_SHIFT)
    if private != is_priv:
        return MemoryFault(flags, page, PAGE_SIZE)
    if slot is None:
        return None
    if private and (slot.guest_memfd is None or not slot.flags & KVM_MEM_GUEST_MEMFD):
        return MemoryFault(flags, page, PAGE_SIZE)
    return None


def served_from_gmem(slot: Any, private: bool, *, gmem_only_slots: bool = True) -> bool:
    """Does this access take ``kvm_mmu_faultin_pfn_gmem`` (else the hva path)?"""
    if private:
        return True
    gm = slot.guest_memfd
    if gm is None or not gmem_only_slots:
        return False
    return bool(getattr(gm, "gmem_flags", 0) & GUEST_MEMFD_FLAG_MMAP)


def backing_for(slot: Any, gpa: int, private: bool, *, gmem_only_slots: bool = True) -> int:
    """Host address of the page backing ``gpa`` in ``slot`` for this access.

    guest_memfd (private, or a gmem-only slot): the page in the gmem's binding
    window (allocated on first use, ``kvm_gmem_get_pfn``); may raise EFAULT
    when the gmem is gone (the caller reports a memory fault). Otherwise the
    slot's ``userspace_addr`` + offset (the caller faults it in through the mm).
    """
    gfn = gpa >> PAGE_SHIFT
    if served_from_gmem(slot, private, gmem_only_slots=gmem_only_slots):
        return int(slot.guest_memfd.get_pfn(slot, gfn))
    return int(slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT))


# ---------------------------------------------------------------------------------------------
# KVM_SET_MEMORY_ATTRIBUTES
# ---------------------------------------------------------------------------------------------
def validate_attributes(address: int, size: int, attributes: int, flags: int, supported: int) -> tuple[int, int]:
    """kvm_vm_ioctl_set_mem_attributes's checks, in order; returns (start_gfn, end_gfn)."""
    what = "KVM_SET_MEMORY_ATTRIBUTES"
    if flags:
        raise OSError(errno.EINVAL, f"{what}: flags must be 0")
    if attributes & ~supported:
        raise OSError(errno.EINVAL, f"{what}: attributes {attributes:#x} not supported ({supported:#x})")
    if size == 0 or address + size > U64:
        raise OSError(errno.EINVAL, f"{what}: size 0 or address + size overflows")
    if address & (PAGE_SIZE - 1) or size & (PAGE_SIZE - 1):
        raise OSError(errno.EINVAL, f"{what}: address and size must be page aligned")
    return address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT


def supported_attributes(vm: Any) -> int:
    """kvm_supported_mem_attributes(vm), plus USERFAULT while the RFC userfault is enabled."""
    s = int(getattr(vm, "supported_attributes", 0))
    from fakekvm.fake.kvm import userfault

    if userfault.rfc_enabled(vm):
        s |= KVM_MEMORY_ATTRIBUTE_USERFAULT
    return s


def set_memory_attributes(vm: Any, request: int, arg: IoctlArg) -> int:
    """The VM's ``KVM_SET_MEMORY_ATTRIBUTES`` handler (``vm.attributes`` is the store)."""
    from fakekvm.fake.kvm.vm import read_arg

    what = "KVM_SET_MEMORY_ATTRIBUTES"
    address, size, attributes, flags = _MEM_ATTR.unpack(read_arg(vm.kernel, arg, _MEM_ATTR.size, what))
    start, end = validate_attributes(address, size, attributes, flags, supported_attributes(vm))
    store = vm.attributes
    with vm.slots_lock:
        if store.uniform(start, end, attributes):
            return 0
        with vm.mmu_lock:
            store.set(start, end, attributes)
    from fakekvm.fake.gmem import invalidate_guest

    invalidate_guest(vm, start << PAGE_SHIFT, end << PAGE_SHIFT)
    from fakekvm.fake.kvm import userfault

    userfault.attributes_changed(vm)
    return 0


# ---------------------------------------------------------------------------------------------
# The composed check, in the kernel's order (what the translate path runs on a miss)
# ---------------------------------------------------------------------------------------------
class Access(NamedTuple):
    """The outcome of `resolve`: ``fault`` set -> KVM_RUN fails EFAULT with that exit."""

    gpa: int  # page-aligned, shared bit stripped
    private: bool
    fault: MemoryFault | None
    slot: Any  # None: no memslot (MMIO)
    hva: int  # host address of the backing page (0 with a fault or without a slot)
    from_gmem: bool


ExtraCheck = Callable[[Any, int, bool], "MemoryFault | None"]


def resolve(
    info: VmTypeInfo,
    attrs: MemoryAttributes | Any,
    lookup: Callable[[int], Any],
    gpa_from_guest: int,
    *,
    userfault: ExtraCheck | None = None,
) -> Access:
    """classify -> mismatch / no-gmem check -> (KVM Userfault check) -> backing page.

    ``lookup(gfn)`` is the memslot lookup; ``userfault(slot, gpa, private)`` is
    v3's `fakekvm.fake.kvm.userfault.userfault_exit` or the RFC's check, run
    after the mismatch check and only when a memslot was found. A guest_memfd
    that is gone (EFAULT from ``get_pfn``) becomes a memory fault, as
    ``kvm_mmu_faultin_pfn_gmem`` reports it.
    """
    gpa, private = classify(info, gpa_from_guest, attrs if info.private_mem else None)
    gpa &= PAGE_MASK
    slot = lookup(gpa >> PAGE_SHIFT)
    fault = check_access(attrs if info.private_mem else None, slot, gpa, private)
    if fault is not None or slot is None:
        return Access(gpa, private, fault, slot, 0, False)
    if userfault is not None:
        try:
            fault = userfault(slot, gpa, private)
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            # An unreadable userfault bitmap: v3 fails KVM_RUN with a bare EFAULT. The fake
            # reports it as the generic error-pfn exit (flags PRIVATE iff private, gpa,
            # 4096) so that the vCPU's TLB-fill hook never has to raise.
            fault = MemoryFault(KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0, gpa, PAGE_SIZE)
        if fault is not None:
            return Access(gpa, private, fault, slot, 0, False)
    gm = served_from_gmem(slot, private, gmem_only_slots=info.gmem_only_slots)
    try:
        if gm:
            hva = slot.guest_memfd.get_pfn(slot, gpa >> PAGE_SHIFT)  # (backing_for, inlined)
        else:
            hva = slot.userspace_addr + (gpa - (slot.base_gfn << PAGE_SHIFT))
    except OSError as e:
        if e.errno != errno.EFAULT:
            raise
        flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
        return Access(gpa, private, MemoryFault(flags, gpa, PAGE_SIZE), slot, 0, gm)
    return Access(gpa, private, None, slot, hva, gm)


# ---------------------------------------------------------------------------------------------
# The hook for FakeVm.translate (the lead wires it at the "HOOK (issue 4)" points)
# ---------------------------------------------------------------------------------------------
class _Plan:
    """Per-VM facts the hook needs, computed once (and per memslot generation)."""

    __slots__ = ("any_gmem_only", "check", "gen", "info", "trivial")

    def __init__(self, vm: Any) -> None:
        from fakekvm.fake.kvm import userfault

        self.info = vm_type_info(getattr(vm, "profile", None), getattr(vm, "vm_type", 0))
        self.check = userfault.access_check_for(vm)
        #: no private memory and no KVM Userfault: only gmem-only slots can matter
        self.trivial = not self.info.private_mem and self.check is None
        self.gen = -1
        self.any_gmem_only = True


_plans: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()


def pre_translate(vm: Any, gpa: int, write: bool, exec_: bool, vcpu: object) -> tuple[Any, int]:
    """Run this VM's private/shared, guest_memfd and KVM Userfault rules for a vCPU access.

    Returns ``(translation, gpa)``: ``translation`` is a finished
    ``fakekvm.fake.kvm.translate.Translation`` (``FAULT`` with the memory-fault
    flags, or ``RAM`` backed by a guest_memfd page) or None, meaning "go on with
    the ordinary hva path for ``gpa``" (page-aligned, any shared bit stripped).
    It never raises for a guest-caused condition (an exception in unicorn's
    TLB-fill hook would be lost): an unreadable userfault bitmap becomes a
    memory-fault exit with flags 0 (v3 gives a bare EFAULT). For gmem-backed pages ``slot_hva`` is the base of the
    slot's guest_memfd window (contiguous over the slot), not ``userspace_addr``.
    """
    plan = _plans.get(vm)
    if plan is None:
        plan = _plans[vm] = _Plan(vm)
    space = vm.spaces[0]
    if plan.trivial:
        if plan.gen != space.generation:
            plan.gen = space.generation
            plan.any_gmem_only = plan.info.gmem_only_slots and any(
                served_from_gmem(s, False) for s in space.slots()
            )
        if not plan.any_gmem_only:
            return None, gpa & PAGE_MASK  # the common case: nothing to do here
    a = resolve(plan.info, vm.attributes, space.lookup, gpa, userfault=plan.check)
    slot = a.slot
    if a.fault is not None:
        if slot is None:
            return Translation(Kind.FAULT, a.gpa, 0, False, 0, 0, 0, a.fault.flags), a.gpa
        return Translation(Kind.FAULT, a.gpa, 0, False, slot.base_gfn << PAGE_SHIFT, slot.npages << PAGE_SHIFT,
                           slot.userspace_addr, a.fault.flags), a.gpa
    if slot is None or not a.from_gmem:
        return None, a.gpa
    binding = slot.guest_memfd.binding_of(slot)
    window = binding.hva_of_pgoff(slot.guest_memfd_offset >> PAGE_SHIFT)
    return Translation(Kind.RAM, a.gpa, a.hva, True, slot.base_gfn << PAGE_SHIFT, slot.npages << PAGE_SHIFT,
                       window, 0), a.gpa
