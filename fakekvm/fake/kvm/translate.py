"""Second-stage translation: what a vCPU access to a gpa resolves to.

This is the fake's ``kvm_mmu_page_fault`` -> ``kvm_faultin_pfn`` ->
``__gfn_to_pfn_memslot`` path (``arch/x86/kvm/mmu/mmu.c``,
``virt/kvm/kvm_main.c``), reduced to what a vCPU needs from its unicorn
TLB-fill hook:

* no memslot (or an invalid one) -> ``MMIO`` (``KVM_EXIT_MMIO``);
* a write to a ``KVM_MEM_READONLY`` slot -> ``MMIO`` with the write
  (api.rst: "writes ... will be posted to userspace as KVM_EXIT_MMIO exits";
  live 6.18 confirms);
* otherwise the hva page is faulted in through the fake mm
  (``vm.kernel.mm.fault``, which may block on userfaultfd exactly like
  ``handle_mm_fault``/``hva_to_pfn``); a bad hva (PROT_NONE, unmapped, past EOF)
  becomes the profile's ``bad_hva_exit``: ``MMIO`` on 6.18-pvm (measured),
  ``FAULT`` on mainline (``kvm_handle_error_pfn`` -> ``-EFAULT`` with
  ``KVM_EXIT_MEMORY_FAULT``, flags 0, the page's gpa, size 4096);
* with ``KVM_MEM_LOG_DIRTY_PAGES`` a write marks the page dirty
  (``mark_page_dirty_in_slot``) and a read maps it read-only until it is dirty,
  so the first write comes back here (KVM's write-protection for dirty logging).

The result is a `Translation`; ``writable`` False means the vCPU must map the
page read-only and come back on a write.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from fakekvm.abi.mman import PROT_WRITE
from fakekvm.fake.mm.fault import Faulter
from fakekvm.fake.mm.vma import VM_UFFD_WP
from fakekvm.fake.profiles import KVM_MEM_READONLY

if TYPE_CHECKING:
    from fakekvm.fake.kvm.vm import FakeVm

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

#: mm.fault errors that mean "this hva has no usable page" (hva_to_pfn's error pfns)


class Kind(enum.IntEnum):
    RAM = 0
    MMIO = 1
    FAULT = 2


class Translation(NamedTuple):
    kind: Kind
    gpa: int  # page-aligned
    hva: int  # host address of the page (RAM only)
    writable: bool  # may the vCPU map it writable now
    slot_base_gpa: int
    slot_size: int
    slot_hva: int
    fault_flags: int  # FAULT only: kvm_run.memory_fault.flags


def _faulter(vcpu: object) -> Faulter | None:
    """The `Faulter` for the mm (uffd_msg ptid): the vCPU's own ``faulter`` if it has one.

    ``FakeVcpu`` sets ``faulter`` (its KVM_RUN thread) for the duration of KVM_RUN, so
    the TLB-fill path allocates nothing; outside KVM_RUN one is made for the caller.
    """
    f = getattr(vcpu, "faulter", None)
    if f.__class__ is Faulter:
        return f
    if vcpu is None or isinstance(vcpu, Faulter):
        return vcpu
    if isinstance(f, Faulter):
        return f
    return Faulter(vcpu=getattr(vcpu, "vcpu_id", None), kind="vcpu")


_RAM = Kind.RAM
_MMIO_K = Kind.MMIO
_FAULT = Kind.FAULT
_new = tuple.__new__  # skips NamedTuple.__new__'s argument handling on the hot path


def _mmio(gpa: int) -> Translation:
    return _new(Translation, (_MMIO_K, gpa, 0, False, 0, 0, 0, 0))


def translate(vm: FakeVm, gpa: int, write: bool, exec_: bool, vcpu: object) -> Translation:
    """Resolve a vCPU access (address space 0; SMM is not modelled)."""
    return _translate(vm, vcpu, gpa, write, exec_)


def for_vcpu(vm: FakeVm, vcpu: object) -> Callable[[int, bool, bool], Translation]:
    """``translate`` bound to one vCPU, as the engine calls it: ``(gpa, write, exec_)``.

    A positional ``partial`` (no Python frame of its own) on the TLB-fill hot path.
    """
    return partial(_translate, vm, vcpu)


def _translate(vm: FakeVm, vcpu: object, gpa: int, write: bool, exec_: bool) -> Translation:
    pre = vm.pre_translate
    if pre is not None:
        # private/shared attributes, gmem-only slots, KVM Userfault (fakekvm.fake.kvm.private)
        t, gpa = pre(vm, gpa, write, exec_, vcpu)
        if t is not None:
            return t
    gpa &= PAGE_MASK
    gfn = gpa >> PAGE_SHIFT
    slot = vm.spaces[0].lookup(gfn)
    if slot is None:
        return _mmio(gpa)
    flags = slot.flags
    if write and flags & KVM_MEM_READONLY:
        return _mmio(gpa)
    base_gpa = slot.base_gfn << PAGE_SHIFT
    slot_hva = slot.userspace_addr
    hva = slot_hva + (gpa - base_gpa)
    slot_size = slot.npages << PAGE_SHIFT
    mm = vm.kernel.mm
    who = getattr(vcpu, "faulter", None)
    if who.__class__ is not Faulter:
        who = _faulter(vcpu)
    res = mm.fault(hva, write, user=False, who=who)
    if res:  # FaultResult.SIGSEGV / SIGBUS: hva_to_pfn found no usable page
        if vm.bad_hva_mmio:
            return _mmio(gpa)
        return _new(Translation, (_FAULT, gpa, 0, False, base_gpa, slot_size, slot_hva, 0))
    writable = not flags & KVM_MEM_READONLY
    if writable and not write:
        # map writable only if a later write could not fault: a writable VMA and no
        # userfaultfd write-protection on the page
        vma = mm.find_vma(hva)
        writable = not (
            vma is None
            or not vma.prot & PROT_WRITE
            or (vma.uffd_flags & VM_UFFD_WP and mm.wp.test(hva >> PAGE_SHIFT))
        )
    dirty = slot.dirty
    if dirty is not None:
        rel = gfn - slot.base_gfn
        if write:
            with vm.mmu_lock:
                dirty.mark(rel)
        elif writable and not dirty.test(rel):
            writable = False
    return _new(Translation, (_RAM, gpa, hva, writable, base_gpa, slot_size, slot_hva, 0))
