"""fakekvm.abi numbers against the literal values in uapi.md (§1.1, §1.5, §1.7, §1.8, §2, §3).

This is where hex literals belong: in the package every ioctl is computed with
``_IO/_IOR/_IOW/_IOWR`` (checked below on the source text), here each is the
value uapi.md records (computed there with the kernel's macros in C, and
cross-checked with strace's tables).
"""

from __future__ import annotations

import inspect
import re

import pytest

from fakekvm.abi import kvm, kvm_userfault, uffd
from fakekvm.abi.ioctl import _IOC_NR

# uapi.md §1.1
KVM_IOCTL_VALUES = {
    "KVM_GET_API_VERSION": 0x0000AE00,
    "KVM_CREATE_VM": 0x0000AE01,
    "KVM_CHECK_EXTENSION": 0x0000AE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0x0000AE04,
    "KVM_CREATE_VCPU": 0x0000AE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_RUN": 0x0000AE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
}

# uapi.md §2
UFFD_IOCTL_VALUES = {
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "USERFAULTFD_IOC_NEW": 0x0000AA00,
}


@pytest.mark.parametrize("name", sorted(KVM_IOCTL_VALUES))
def test_kvm_ioctl_value(name: str) -> None:
    assert kvm.KVM_IOCTLS[name] == KVM_IOCTL_VALUES[name]
    assert getattr(kvm, name) == KVM_IOCTL_VALUES[name]


@pytest.mark.parametrize("name", sorted(UFFD_IOCTL_VALUES))
def test_uffd_ioctl_value(name: str) -> None:
    assert uffd.UFFD_IOCTLS[name] == UFFD_IOCTL_VALUES[name]
    assert getattr(uffd, name) == UFFD_IOCTL_VALUES[name]


def test_kvm_read_userfault_rfc_number() -> None:
    # uapi.md §3.1: _IOR(KVMIO, 0xd5, struct kvm_fault) = 0x8008AED5
    assert kvm_userfault.KVM_READ_USERFAULT == 0x8008AED5
    assert _IOC_NR(kvm_userfault.KVM_READ_USERFAULT) == _IOC_NR(kvm.KVM_PRE_FAULT_MEMORY) == 0xD5
    assert kvm_userfault.KVM_READ_USERFAULT != kvm.KVM_PRE_FAULT_MEMORY
    assert "KVM_READ_USERFAULT" not in kvm.KVM_IOCTLS


def test_ioctls_are_computed_not_typed() -> None:
    for mod, table in ((kvm, kvm.KVM_IOCTLS), (uffd, uffd.UFFD_IOCTLS), (kvm_userfault, kvm_userfault.KVM_USERFAULT_IOCTLS)):
        src = inspect.getsource(mod)
        for name in table:
            m = re.search(rf"^{name} = (.*)$", src, re.M)
            assert m is not None, name
            assert re.match(r"_IO(R|W|WR)?\(", m.group(1)), f"{name} = {m.group(1)}"


def test_ioctl_numbers_unique() -> None:
    allv = {**kvm.KVM_IOCTLS, **uffd.UFFD_IOCTLS, **kvm_userfault.KVM_USERFAULT_IOCTLS}
    assert len(set(allv.values())) == len(allv)
    assert len(kvm.KVM_IOCTLS) >= 100
    for n in ["KVM_GET_MSR_INDEX_LIST", "KVM_GET_SUPPORTED_CPUID", "KVM_SET_CPUID2", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_INTERRUPT", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_SET_GSI_ROUTING", "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_SIGNAL_MSI", "KVM_TRANSLATE", "KVM_SET_SIGNAL_MASK", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_SET_GUEST_DEBUG", "KVM_RESET_DIRTY_RINGS", "KVM_CHECK_EXTENSION"]:
        assert n in kvm.KVM_IOCTLS, n


def test_kvm_api_version_and_kvmio() -> None:
    assert kvm.KVMIO == 0xAE
    assert kvm.KVM_API_VERSION == 12
    assert uffd.UFFDIO == 0xAA
    assert uffd.USERFAULTFD_IOC == 0xAA


# uapi.md §1.5 exit table
EXITS = ["UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN", "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "S390_SIEIC", "S390_RESET", "DCR", "NMI", "INTERNAL_ERROR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG", "S390_TSCH", "EPR", "SYSTEM_EVENT", "S390_STSI", "IOAPIC_EOI", "HYPERV", "ARM_NISV", "X86_RDMSR", "X86_WRMSR", "DIRTY_RING_FULL", "AP_RESET_HOLD", "X86_BUS_LOCK", "XEN", "RISCV_SBI", "RISCV_CSR", "NOTIFY", "LOONGARCH_IOCSR", "MEMORY_FAULT", "TDX", "ARM_SEA", "ARM_LDST64B", "SNP_REQ_CERTS"]


def test_exit_numbers() -> None:
    assert {f"KVM_EXIT_{n}": i for i, n in enumerate(EXITS)} == kvm.KVM_EXITS
    assert len(kvm.KVM_EXITS) == 44


# uapi.md §1.7 (requested caps + neighbours)
CAPS = {
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_IRQFD": 32,
    "KVM_CAP_IOEVENTFD": 36,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_SYNC_REGS": 74,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_CHECK_EXTENSION_VM": 105,
    "KVM_CAP_MAX_VCPU_ID": 128,
    "KVM_CAP_X2APIC_API": 129,
    "KVM_CAP_IMMEDIATE_EXIT": 136,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_FAULT_INFO": 232,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_CAP_X86_APIC_BUS_CYCLES_NS": 237,
    "KVM_CAP_X86_GUEST_MODE": 238,
    "KVM_CAP_ARM_WRITABLE_IMP_ID_REGS": 239,
    "KVM_CAP_ARM_EL2": 240,
    "KVM_CAP_ARM_EL2_E2H0": 241,
    "KVM_CAP_RISCV_MP_STATE_RESET": 242,
    "KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED": 243,
    "KVM_CAP_GUEST_MEMFD_FLAGS": 244,
    "KVM_CAP_ARM_SEA_TO_USER": 245,
    "KVM_CAP_S390_USER_OPEREXEC": 246,
    "KVM_CAP_S390_KEYOP": 247,
    "KVM_CAP_S390_VSIE_ESAMODE": 248,
    "KVM_CAP_S390_HPAGE_2G": 249,
}


@pytest.mark.parametrize("name", sorted(CAPS))
def test_cap_number(name: str) -> None:
    assert kvm.KVM_CAPS[name] == CAPS[name]
    assert getattr(kvm, name) == CAPS[name]


def test_cap_table_shape() -> None:
    values = list(kvm.KVM_CAPS.values())
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    assert values[0] == 0 and values[-1] == 249
    # the explicit re-declarations agree with the table
    for n, v in vars(kvm).items():
        if n.startswith("KVM_CAP_"):
            assert kvm.KVM_CAPS[n] == v, n


def test_kvm_constants_from_uapi_md() -> None:
    assert (kvm.KVM_MEM_LOG_DIRTY_PAGES, kvm.KVM_MEM_READONLY, kvm.KVM_MEM_GUEST_MEMFD) == (1, 2, 4)
    assert (kvm.GUEST_MEMFD_FLAG_MMAP, kvm.GUEST_MEMFD_FLAG_INIT_SHARED) == (1, 2)
    assert kvm.KVM_MEMORY_ATTRIBUTE_PRIVATE == 8
    assert kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE == 8
    assert (kvm.KVM_EXIT_IO_IN, kvm.KVM_EXIT_IO_OUT) == (0, 1)
    assert [
        kvm.KVM_X86_DEFAULT_VM,
        kvm.KVM_X86_SW_PROTECTED_VM,
        kvm.KVM_X86_SEV_VM,
        kvm.KVM_X86_SEV_ES_VM,
        kvm.KVM_X86_SNP_VM,
        kvm.KVM_X86_TDX_VM,
    ] == [0, 1, 2, 3, 4, 5]
    assert [
        kvm.KVM_INTERNAL_ERROR_EMULATION,
        kvm.KVM_INTERNAL_ERROR_SIMUL_EX,
        kvm.KVM_INTERNAL_ERROR_DELIVERY_EV,
        kvm.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
    ] == [1, 2, 3, 4]
    assert kvm.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES == 1
    assert [
        kvm.KVM_SYSTEM_EVENT_SHUTDOWN,
        kvm.KVM_SYSTEM_EVENT_RESET,
        kvm.KVM_SYSTEM_EVENT_CRASH,
        kvm.KVM_SYSTEM_EVENT_WAKEUP,
        kvm.KVM_SYSTEM_EVENT_SUSPEND,
        kvm.KVM_SYSTEM_EVENT_SEV_TERM,
        kvm.KVM_SYSTEM_EVENT_TDX_FATAL,
    ] == [1, 2, 3, 4, 5, 6, 7]
    assert (kvm.KVM_SYNC_X86_REGS, kvm.KVM_SYNC_X86_SREGS, kvm.KVM_SYNC_X86_EVENTS) == (1, 2, 4)
    assert (kvm.KVM_PIO_PAGE_OFFSET, kvm.KVM_COALESCED_MMIO_PAGE_OFFSET, kvm.KVM_DIRTY_LOG_PAGE_OFFSET) == (1, 2, 64)
    assert (kvm.KVM_RUN_X86_SMM, kvm.KVM_RUN_X86_BUS_LOCK, kvm.KVM_RUN_X86_GUEST_MODE) == (1, 2, 4)
    assert (kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, kvm.KVM_DIRTY_LOG_INITIALLY_SET) == (1, 2)
    assert (kvm.KVM_IRQFD_FLAG_DEASSIGN, kvm.KVM_IRQFD_FLAG_RESAMPLE) == (1, 2)
    assert (
        kvm.KVM_IOEVENTFD_FLAG_DATAMATCH,
        kvm.KVM_IOEVENTFD_FLAG_PIO,
        kvm.KVM_IOEVENTFD_FLAG_DEASSIGN,
        kvm.KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY,
    ) == (1, 2, 4, 8)
    assert kvm.KVM_NR_INTERRUPTS == 256
    assert kvm.SYNC_REGS_SIZE_BYTES == 2048


def test_uffd_constants_from_uapi_md() -> None:
    assert uffd.UFFD_API == 0xAA
    assert uffd.UFFD_USER_MODE_ONLY == 1
    assert uffd.UFFD_API_FEATURES == 0x1FFFF
    feats = [n for n in vars(uffd) if n.startswith("UFFD_FEATURE_")]
    assert len(feats) == 17
    assert uffd.UFFD_API_IOCTLS == 0x8000000000000003
    # WAKE COPY ZEROPAGE MOVE WRITEPROTECT CONTINUE POISON = bits 2..8
    assert uffd.UFFD_API_RANGE_IOCTLS == 0x1FC
    # WAKE COPY WRITEPROTECT CONTINUE POISON
    assert uffd.UFFD_API_RANGE_IOCTLS_BASIC == 0x1CC
    assert uffd.UFFD_API_REGISTER_MODES == 7
    assert [
        uffd.UFFD_EVENT_PAGEFAULT,
        uffd.UFFD_EVENT_FORK,
        uffd.UFFD_EVENT_REMAP,
        uffd.UFFD_EVENT_REMOVE,
        uffd.UFFD_EVENT_UNMAP,
    ] == [0x12, 0x13, 0x14, 0x15, 0x16]
    assert (uffd.UFFD_PAGEFAULT_FLAG_WRITE, uffd.UFFD_PAGEFAULT_FLAG_WP, uffd.UFFD_PAGEFAULT_FLAG_MINOR) == (1, 2, 4)
    assert [
        uffd._UFFDIO_REGISTER,
        uffd._UFFDIO_UNREGISTER,
        uffd._UFFDIO_WAKE,
        uffd._UFFDIO_COPY,
        uffd._UFFDIO_ZEROPAGE,
        uffd._UFFDIO_MOVE,
        uffd._UFFDIO_WRITEPROTECT,
        uffd._UFFDIO_CONTINUE,
        uffd._UFFDIO_POISON,
        uffd._UFFDIO_API,
    ] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x3F]
    assert (uffd.UFFDIO_COPY_MODE_DONTWAKE, uffd.UFFDIO_COPY_MODE_WP) == (1, 2)
    assert (uffd.UFFDIO_WRITEPROTECT_MODE_WP, uffd.UFFDIO_WRITEPROTECT_MODE_DONTWAKE) == (1, 2)
    assert (uffd.UFFDIO_CONTINUE_MODE_DONTWAKE, uffd.UFFDIO_CONTINUE_MODE_WP) == (1, 2)
    assert uffd.UFFDIO_POISON_MODE_DONTWAKE == 1
    assert (uffd.UFFDIO_MOVE_MODE_DONTWAKE, uffd.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == (1, 2)
    # live register masks from uapi.md §5 decode to the right commands
    anon_missing = 0x13C
    assert anon_missing == (
        1 << uffd._UFFDIO_WAKE
        | 1 << uffd._UFFDIO_COPY
        | 1 << uffd._UFFDIO_ZEROPAGE
        | 1 << uffd._UFFDIO_MOVE
        | 1 << uffd._UFFDIO_POISON
    )


def test_kvm_userfault_proposal() -> None:
    assert kvm_userfault.KVM_MEM_USERFAULT == 1 << 3
    assert kvm_userfault.KVM_MEMORY_EXIT_FLAG_USERFAULT == 1 << 4
    assert kvm_userfault.KVM_MEMORY_ATTRIBUTE_USERFAULT == 1 << 4
    assert (kvm_userfault.KVM_USERFAULT_ENABLE, kvm_userfault.KVM_USERFAULT_DISABLE) == (1, 2)
    assert kvm_userfault.USERFAULT_CAP_BY_REVISION == {
        "rfc": 236,
        "v1": 239,
        "v2": 239,
        "sean-rework": 240,
        "v3": 243,
    }
    # every revision's number is an upstream cap today (the collision the docstring warns about)
    upstream = set(kvm.KVM_CAPS.values())
    assert set(kvm_userfault.USERFAULT_CAP_BY_REVISION.values()) <= upstream
    assert not hasattr(kvm, "KVM_CAP_USERFAULT")
    assert not hasattr(kvm_userfault, "KVM_CAP_USERFAULT")
    # no upstream memslot flag uses bit 3
    assert kvm_userfault.KVM_MEM_USERFAULT & (
        kvm.KVM_MEM_LOG_DIRTY_PAGES | kvm.KVM_MEM_READONLY | kvm.KVM_MEM_GUEST_MEMFD
    ) == 0
    assert kvm_userfault.USERFAULT_BITMAP_OFFSET == 48
    assert "NOT UPSTREAM" in (kvm_userfault.__doc__ or "")
