"""``KVM_ENABLE_CAP`` on a VM fd (``kvm_vm_ioctl_enable_cap_generic`` in
``virt/kvm/kvm_main.c``, then x86's ``kvm_vm_ioctl_enable_cap`` in ``arch/x86/kvm/x86.c``).

Every rule here was measured on the live 6.18 host by enabling each cap it
reports with args[0] = 0, 1, ~0 and flags = 1 (``tests/fake/test_kvm_vm_ioctls.py``
and ``test_kvm_vm_vcpus.py`` run them on both kernels):

* ``MANUAL_DIRTY_LOG_PROTECT2``: args[0] within ENABLE|INITIALLY_SET (INITIALLY_SET
  only together with ENABLE); ``HALT_POLL``: args[0] fits 32 bits;
* x86: ``flags`` must be 0; ``MAX_VCPU_ID`` may be set once (again with the same
  value is fine; 0 leaves it unset; the first vCPU fixes it at KVM_MAX_VCPU_IDS);
  ``X86_APIC_BUS_CYCLES_NS`` is EINVAL for 0 and ENXIO otherwise (no in-kernel
  APIC); the caps of `_X86_ENABLE_RULES` check args[0] against a mask and some
  are refused once vCPUs exist;
* anything else, including ``SPLIT_IRQCHIP`` and the dirty ring (not emulated), EINVAL.

Caps that only record VM state are accepted into ``vm.enabled_caps``; caps that
change how a vCPU runs are accepted only if ``FakeVcpu.ENABLEABLE_VM_CAPS`` lists
them, so the fake never reports success for behaviour it does not have.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakekvm.abi import kvm as K
from fakekvm.fake.kvm.uaccess import read_arg

if TYPE_CHECKING:
    from fakekvm.fake.kvm.vm import FakeVm
    from fakekvm.kernel.seam import IoctlArg

_ENABLE_CAP = K.kvm_enable_cap_fmt
_MASK_FROM_CAP = -1
#: x86 VM caps KVM_ENABLE_CAP accepts (live 6.18): cap -> (valid args[0] bits: None = any,
#: _MASK_FROM_CAP = the VM's KVM_CHECK_EXTENSION answer; refused once vCPUs exist;
#: changes how a vCPU runs, so accepted only if FakeVcpu.ENABLEABLE_VM_CAPS lists it)
_X86_ENABLE_RULES: dict[int, tuple[int | None, bool, bool]] = {
    K.KVM_CAP_DISABLE_QUIRKS: (None, False, False),
    K.KVM_CAP_DISABLE_QUIRKS2: (_MASK_FROM_CAP, False, False),
    K.KVM_CAP_X2APIC_API: (_MASK_FROM_CAP, False, False),  # no in-kernel APIC: state only
    K.KVM_CAP_VM_DISABLE_NX_HUGE_PAGES: (0, True, False),
    K.KVM_CAP_X86_DISABLE_EXITS: (_MASK_FROM_CAP, True, True),
    K.KVM_CAP_MSR_PLATFORM_INFO: (None, False, True),
    K.KVM_CAP_EXCEPTION_PAYLOAD: (None, False, True),
    K.KVM_CAP_X86_USER_SPACE_MSR: (0x7, False, True),  # KVM_MSR_EXIT_REASON_VALID_MASK
    K.KVM_CAP_EXIT_HYPERCALL: (_MASK_FROM_CAP, False, True),
    K.KVM_CAP_EXIT_ON_EMULATION_FAILURE: (1, False, True),
    K.KVM_CAP_X86_TRIPLE_FAULT_EVENT: (None, False, True),
}


def enable_cap(vm: FakeVm, arg: IoctlArg) -> int:
    """kvm_vm_ioctl_enable_cap_generic, then x86's kvm_vm_ioctl_enable_cap.

    Rules and errnos measured on the live 6.18 host for every cap it lets a VM
    enable. Caps that only set VM state are accepted and kept in `enabled_caps`;
    caps that change how a vCPU runs are accepted only if the vCPU class lists
    them in ``FakeVcpu.ENABLEABLE_VM_CAPS``; caps that need an in-kernel device
    or the dirty ring are not emulated (EINVAL).
    """
    what = "KVM_ENABLE_CAP"
    cap, flags, a0, _a1, _a2, _a3 = _ENABLE_CAP.unpack(
        read_arg(vm.kernel, arg, _ENABLE_CAP.size, what)
    )
    if cap == K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and vm.caps.get(cap):
        allowed = K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if a0 & K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            allowed = vm.profile.manual_dirty_log_caps
        if flags or a0 & ~allowed:
            raise OSError(errno.EINVAL, f"{what}: MANUAL_DIRTY_LOG_PROTECT2 args {a0:#x}")
        vm.manual_dirty_log_protect = a0
        return 0
    if cap == K.KVM_CAP_HALT_POLL and vm.caps.get(cap):
        if flags or a0 != a0 & 0xFFFFFFFF:
            raise OSError(errno.EINVAL, f"{what}: HALT_POLL args")
        vm.max_halt_poll_ns = a0
        return 0
    # x86 kvm_vm_ioctl_enable_cap
    if flags:
        raise OSError(errno.EINVAL, f"{what}: flags must be 0")
    with vm.slots_lock:
        return _enable_x86_cap(vm, cap, a0, what)


def _enable_x86_cap(vm: FakeVm, cap: int, a0: int, what: str) -> int:
    def einval(why: str) -> OSError:
        return OSError(errno.EINVAL, f"{what}: cap {cap}: {why}")

    if cap == K.KVM_CAP_MAX_VCPU_ID:
        if a0 > vm.profile.max_vcpu_id:
            raise einval("above KVM_MAX_VCPU_IDS")
        if vm.max_vcpu_ids == a0 or not vm.max_vcpu_ids:
            vm.max_vcpu_ids = a0
            return 0
        raise einval("max vCPU id already set")
    if cap == K.KVM_CAP_X86_APIC_BUS_CYCLES_NS:
        if not a0:
            raise einval("bus cycle 0")
        raise OSError(errno.ENXIO, f"{what}: no in-kernel local APIC")
    rule = _X86_ENABLE_RULES.get(cap)
    if rule is None:
        raise einval("not enableable (or not emulated: in-kernel irqchip, dirty ring)")
    mask, before_vcpus, vcpu_behaviour = rule
    if mask == _MASK_FROM_CAP:
        mask = vm.caps.get(cap, 0)
    if mask is not None and a0 & ~mask:
        raise einval(f"args[0] {a0:#x} outside {mask:#x}")
    if before_vcpus and vm.created_vcpus:
        raise einval("vCPUs already created")
    if vcpu_behaviour and cap not in _vcpu_caps():
        raise einval("the fake vCPU does not implement it")
    if cap in (K.KVM_CAP_DISABLE_QUIRKS, K.KVM_CAP_DISABLE_QUIRKS2):
        quirks = vm.profile.sys_caps.get(K.KVM_CAP_DISABLE_QUIRKS2, 0)
        vm.disabled_quirks |= a0 & quirks
        a0 = vm.disabled_quirks
    vm.enabled_caps[cap] = a0
    return 0


def _vcpu_caps() -> frozenset[int]:
    try:
        from fakekvm.fake.kvm.vcpu import FakeVcpu
    except ImportError:
        return frozenset()
    return frozenset(getattr(FakeVcpu, "ENABLEABLE_VM_CAPS", ()))
