"""The x86-64 KVM uAPI as data: structs, ioctl numbers and constants.

Follows ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``
(Linux v6.18 text as carried by QEMU's ``linux-headers``; exit numbers 40..43
and capabilities 245..249 from the v6.19/v7.x constant lists; see
``/work/shared/reference/uapi.md`` §1). Every name is the C name, verbatim.

Three views of each struct:

* a ``construct`` definition named exactly like the C struct (``kvm_regs``),
  for full parsing and building;
* for the hot, flat structs a precompiled :class:`struct.Struct` named
  ``<c_name>_fmt`` (``kvm_regs_fmt``) whose field order is the C order; a
  test proves it equal to the construct definition;
* the ioctl numbers, computed with ``_IO/_IOR/_IOW/_IOWR`` from (KVMIO, nr,
  struct); a struct the fake never parses is given by its ``sizeof`` only
  (marked "size only").

Anonymous C unions are named ``u`` here (``kvm_run.u.io.port`` is C's
``run->io.port``); :mod:`fakekvm.abi.layout` drops ``u`` when it prints C
paths. Implicit C padding is ``Padding(n)``: parsed away, built as zeros.

Build rule for unions (``kvm_run.u``, ``kvm_run.s``, ``kvm_dirty_log.u``...):
construct builds the *first* arm whose key is in the dict and pads the rest
with zeros. The raw arm (``padding``) is listed first, so a Container straight
from ``parse`` builds back to the same bytes. To build a chosen arm, pass a
dict holding only that arm (``{"io": {...}}``) — or, on the hot path, pack the
``*_fmt`` codec at :data:`KVM_RUN_EXIT_OFFSET`.
"""

from __future__ import annotations

import struct

from construct import (
    Array,
    Bytes,
    Construct,
    Container,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    Padded,
    Padding,
    Struct,
    Union,
)

from fakekvm.abi.ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

# ---------------------------------------------------------------------------------------------
# x86 register structs (arch/x86/include/uapi/asm/kvm.h)
# ---------------------------------------------------------------------------------------------

KVM_REGS_FIELDS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip

kvm_regs = Struct(*[name / Int64ul for name in KVM_REGS_FIELDS])
kvm_regs_fmt = struct.Struct("<18Q")

kvm_segment = Struct(
    "base" / Int64ul,
    "limit" / Int32ul,
    "selector" / Int16ul,
    "type" / Int8ul,
    "present" / Int8ul,
    "dpl" / Int8ul,
    "db" / Int8ul,
    "s" / Int8ul,
    "l" / Int8ul,
    "g" / Int8ul,
    "avl" / Int8ul,
    "unusable" / Int8ul,
    "padding" / Int8ul,
)
KVM_SEGMENT_FIELDS = tuple(sc.name for sc in kvm_segment.subcons)
kvm_segment_fmt = struct.Struct("<QIH10B")

kvm_dtable = Struct(
    "base" / Int64ul,
    "limit" / Int16ul,
    "padding" / Array(3, Int16ul),
)

kvm_dtable_fmt = struct.Struct("<QH3H")

KVM_NR_INTERRUPTS = 256
KVM_SREGS_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
KVM_SREGS_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")

kvm_sregs = Struct(
    *[name / kvm_segment for name in KVM_SREGS_SEGMENTS],
    "gdt" / kvm_dtable,
    "idt" / kvm_dtable,
    *[name / Int64ul for name in KVM_SREGS_CONTROL],
    "interrupt_bitmap" / Array((KVM_NR_INTERRUPTS + 63) // 64, Int64ul),
)

#: flat: 8 segments x (base, limit, selector, type, present, dpl, db, s, l, g, avl,
#: unusable, padding), gdt and idt x (base, limit, padding[3]), cr0, cr2, cr3, cr4,
#: cr8, efer, apic_base, interrupt_bitmap[4] -- 125 values
kvm_sregs_fmt = struct.Struct("<" + "QIH10B" * 8 + "QH3H" * 2 + "7Q" + "4Q")
KVM_SREGS_SEGMENT_OFFSETS = {name: 24 * i for i, name in enumerate(KVM_SREGS_SEGMENTS)}

kvm_vcpu_events = Struct(
    "exception" / Struct(
        "injected" / Int8ul,
        "nr" / Int8ul,
        "has_error_code" / Int8ul,
        "pending" / Int8ul,
        "error_code" / Int32ul,
    ),
    "interrupt" / Struct(
        "injected" / Int8ul,
        "nr" / Int8ul,
        "soft" / Int8ul,
        "shadow" / Int8ul,
    ),
    "nmi" / Struct(
        "injected" / Int8ul,
        "pending" / Int8ul,
        "masked" / Int8ul,
        "pad" / Int8ul,
    ),
    "sipi_vector" / Int32ul,
    "flags" / Int32ul,
    "smi" / Struct(
        "smm" / Int8ul,
        "pending" / Int8ul,
        "smm_inside_nmi" / Int8ul,
        "latched_init" / Int8ul,
    ),
    "triple_fault" / Struct("pending" / Int8ul),
    "reserved" / Array(26, Int8ul),
    "exception_has_payload" / Int8ul,
    "exception_payload" / Int64ul,
)

kvm_sync_regs = Struct(
    "regs" / kvm_regs,
    "sregs" / kvm_sregs,
    "events" / kvm_vcpu_events,
)

# kvm_sync_regs.kvm_valid_regs / kvm_dirty_regs bits
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS

# kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

# vcpu fd mmap page offsets (asm/kvm.h)
KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
KVM_DIRTY_LOG_PAGE_OFFSET = 64

# kvm_run.flags
KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1
KVM_RUN_X86_GUEST_MODE = 1 << 2

# ---------------------------------------------------------------------------------------------
# Memory slots, guest_memfd, memory attributes (include/uapi/linux/kvm.h)
# ---------------------------------------------------------------------------------------------

kvm_userspace_memory_region = Struct(
    "slot" / Int32ul,
    "flags" / Int32ul,
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
)
kvm_userspace_memory_region_fmt = struct.Struct("<IIQQQ")

kvm_userspace_memory_region2 = Struct(
    "slot" / Int32ul,
    "flags" / Int32ul,
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "guest_memfd_offset" / Int64ul,
    "guest_memfd" / Int32ul,
    "pad1" / Int32ul,
    "pad2" / Array(14, Int64ul),
)
#: slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
#: guest_memfd, pad1; pad2 is packed as zeros and skipped on unpack (the kernel
#: does not check it either).
kvm_userspace_memory_region2_fmt = struct.Struct("<IIQQQQII112x")

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

kvm_create_guest_memfd = Struct(
    "size" / Int64ul,
    "flags" / Int64ul,
    "reserved" / Array(6, Int64ul),
)
kvm_create_guest_memfd_fmt = struct.Struct("<QQ48x")

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

kvm_memory_attributes = Struct(
    "address" / Int64ul,
    "size" / Int64ul,
    "attributes" / Int64ul,
    "flags" / Int64ul,
)
kvm_memory_attributes_fmt = struct.Struct("<4Q")

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

kvm_pre_fault_memory = Struct(
    "gpa" / Int64ul,
    "size" / Int64ul,
    "flags" / Int64ul,
    "padding" / Array(5, Int64ul),
)
kvm_pre_fault_memory_fmt = struct.Struct("<QQQ40x")

# x86 VM types: the KVM_CREATE_VM argument, bit n of KVM_CAP_VM_TYPES.
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5

# ---------------------------------------------------------------------------------------------
# Dirty logging, irqfd, ioeventfd, enable_cap
# ---------------------------------------------------------------------------------------------

kvm_dirty_log = Struct(
    "slot" / Int32ul,
    "padding1" / Int32ul,
    "u" / Padded(8, Union(None, "dirty_bitmap" / Int64ul, "padding2" / Int64ul)),
)
kvm_dirty_log_fmt = struct.Struct("<IIQ")

kvm_clear_dirty_log = Struct(
    "slot" / Int32ul,
    "num_pages" / Int32ul,
    "first_page" / Int64ul,
    "u" / Padded(8, Union(None, "dirty_bitmap" / Int64ul, "padding2" / Int64ul)),
)
kvm_clear_dirty_log_fmt = struct.Struct("<IIQQ")

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_F_MASK = 0x3

kvm_irqfd = Struct(
    "fd" / Int32ul,
    "gsi" / Int32ul,
    "flags" / Int32ul,
    "resamplefd" / Int32ul,
    "pad" / Array(16, Int8ul),
)
kvm_irqfd_fmt = struct.Struct("<4I16x")

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

kvm_ioeventfd = Struct(
    "datamatch" / Int64ul,
    "addr" / Int64ul,
    "len" / Int32ul,
    "fd" / Int32sl,
    "flags" / Int32ul,
    "pad" / Array(36, Int8ul),
)
kvm_ioeventfd_fmt = struct.Struct("<QQIiI36x")

# enum kvm_ioeventfd_flag_nr_*
kvm_ioeventfd_flag_nr_datamatch = 0
kvm_ioeventfd_flag_nr_pio = 1
kvm_ioeventfd_flag_nr_deassign = 2
kvm_ioeventfd_flag_nr_virtio_ccw_notify = 3
kvm_ioeventfd_flag_nr_fast_mmio = 4
kvm_ioeventfd_flag_nr_max = 5
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << kvm_ioeventfd_flag_nr_datamatch
KVM_IOEVENTFD_FLAG_PIO = 1 << kvm_ioeventfd_flag_nr_pio
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << kvm_ioeventfd_flag_nr_deassign
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << kvm_ioeventfd_flag_nr_virtio_ccw_notify
KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << kvm_ioeventfd_flag_nr_max) - 1

kvm_enable_cap = Struct(
    "cap" / Int32ul,
    "flags" / Int32ul,
    "args" / Array(4, Int64ul),
    "pad" / Array(64, Int8ul),
)
kvm_enable_cap_fmt = struct.Struct("<II4Q64x")

# ---------------------------------------------------------------------------------------------
# struct kvm_run (x86-64: 2352 bytes)
# ---------------------------------------------------------------------------------------------

KVM_RUN_EXIT_OFFSET = 32  # offset of the exit union
KVM_RUN_EXIT_SIZE = 256  # char padding[256] fixes the union's size
SYNC_REGS_SIZE_BYTES = 2048
KVM_RUN_SIZE = 2352

# Exit-union arms, each usable alone at KVM_RUN_EXIT_OFFSET.
kvm_run_hw = Struct("hardware_exit_reason" / Int64ul)
kvm_run_fail_entry = Struct(
    "hardware_entry_failure_reason" / Int64ul,
    "cpu" / Int32ul,
    Padding(4),
)
kvm_run_ex = Struct("exception" / Int32ul, "error_code" / Int32ul)
kvm_run_io = Struct(
    "direction" / Int8ul,
    "size" / Int8ul,
    "port" / Int16ul,
    "count" / Int32ul,
    "data_offset" / Int64ul,
)
kvm_run_debug = Struct(  # struct kvm_debug_exit_arch (x86)
    "arch" / Struct(
        "exception" / Int32ul,
        "pad" / Int32ul,
        "pc" / Int64ul,
        "dr6" / Int64ul,
        "dr7" / Int64ul,
    )
)
kvm_run_mmio = Struct(
    "phys_addr" / Int64ul,
    "data" / Bytes(8),
    "len" / Int32ul,
    "is_write" / Int8ul,
    Padding(3),
)
kvm_run_hypercall = Struct(
    "nr" / Int64ul,
    "args" / Array(6, Int64ul),
    "ret" / Int64ul,
    # 6.1: __u32 longmode; __u32 pad;  since 6.10: union { __u32 longmode; __u64 flags; }
    "u" / Padded(8, Union(None, "flags" / Int64ul, "longmode" / Int32ul)),
)
kvm_run_tpr_access = Struct("rip" / Int64ul, "is_write" / Int32ul, "pad" / Int32ul)
kvm_run_internal = Struct(
    "suberror" / Int32ul,
    "ndata" / Int32ul,
    "data" / Array(16, Int64ul),
)
#: overlay of ``internal`` for suberror KVM_INTERNAL_ERROR_EMULATION (C nests the
#: insn fields in two anonymous unions/structs; flattened here, same offsets)
kvm_run_emulation_failure = Struct(
    "suberror" / Int32ul,
    "ndata" / Int32ul,
    "flags" / Int64ul,
    "insn_size" / Int8ul,
    "insn_bytes" / Bytes(15),
)
kvm_run_system_event = Struct(
    "type" / Int32ul,
    "ndata" / Int32ul,
    "u" / Padded(128, Union(None, "data" / Array(16, Int64ul), "flags" / Int64ul)),
)
kvm_run_eoi = Struct("vector" / Int8ul)
kvm_run_msr = Struct(
    "error" / Int8ul,
    "pad" / Array(7, Int8ul),
    "reason" / Int32ul,
    "index" / Int32ul,
    "data" / Int64ul,
)
kvm_run_notify = Struct("flags" / Int32ul)
kvm_run_memory_fault = Struct(
    "flags" / Int64ul,
    "gpa" / Int64ul,
    "size" / Int64ul,
)

#: name -> arm struct, every arm parsed at KVM_RUN_EXIT_OFFSET
KVM_RUN_EXIT_ARMS: dict[str, Construct] = {
    "hw": kvm_run_hw,
    "fail_entry": kvm_run_fail_entry,
    "ex": kvm_run_ex,
    "io": kvm_run_io,
    "debug": kvm_run_debug,
    "mmio": kvm_run_mmio,
    "hypercall": kvm_run_hypercall,
    "tpr_access": kvm_run_tpr_access,
    "internal": kvm_run_internal,
    "emulation_failure": kvm_run_emulation_failure,
    "system_event": kvm_run_system_event,
    "eoi": kvm_run_eoi,
    "msr": kvm_run_msr,
    "notify": kvm_run_notify,
    "memory_fault": kvm_run_memory_fault,
}

kvm_run = Struct(
    "request_interrupt_window" / Int8ul,
    "immediate_exit" / Int8ul,
    "padding1" / Array(6, Int8ul),
    "exit_reason" / Int32ul,
    "ready_for_interrupt_injection" / Int8ul,
    "if_flag" / Int8ul,
    "flags" / Int16ul,
    "cr8" / Int64ul,
    "apic_base" / Int64ul,
    "u" / Padded(
        KVM_RUN_EXIT_SIZE,
        Union(
            None,
            "padding" / Bytes(KVM_RUN_EXIT_SIZE),
            *[name / arm for name, arm in KVM_RUN_EXIT_ARMS.items()],
        ),
    ),
    "kvm_valid_regs" / Int64ul,
    "kvm_dirty_regs" / Int64ul,
    "s" / Padded(
        SYNC_REGS_SIZE_BYTES,
        Union(None, "padding" / Bytes(SYNC_REGS_SIZE_BYTES), "regs" / kvm_sync_regs),
    ),
)

#: request_interrupt_window, immediate_exit, exit_reason,
#: ready_for_interrupt_injection, if_flag, flags, cr8, apic_base (padding1 skipped)
kvm_run_header_fmt = struct.Struct("<BB6xIBBHQQ")
kvm_run_exit_reason_fmt = struct.Struct("<I")  # at KVM_RUN_EXIT_REASON_OFFSET
KVM_RUN_EXIT_REASON_OFFSET = 8
KVM_RUN_IMMEDIATE_EXIT_OFFSET = 1
KVM_RUN_KVM_VALID_REGS_OFFSET = 288
KVM_RUN_KVM_DIRTY_REGS_OFFSET = 296
KVM_RUN_S_OFFSET = 304
#: direction, size, port, count, data_offset
kvm_run_io_fmt = struct.Struct("<BBHIQ")
#: phys_addr, data (8 bytes), len, is_write
kvm_run_mmio_fmt = struct.Struct("<Q8sIB")
#: flags, gpa, size
kvm_run_memory_fault_fmt = struct.Struct("<QQQ")
#: suberror, ndata (data[] follows at +8)
kvm_run_internal_fmt = struct.Struct("<II")
#: type, ndata, data[0] (== flags)
kvm_run_system_event_fmt = struct.Struct("<IIQ")
#: hardware_entry_failure_reason, cpu
kvm_run_fail_entry_fmt = struct.Struct("<QI")
#: hardware_exit_reason
kvm_run_hw_fmt = struct.Struct("<Q")



def kvm_run_exit_parse(run: bytes | bytearray | memoryview, arm: str) -> Container:
    """Parse exit-union arm ``arm`` ("io", "mmio", ...) of a kvm_run buffer."""
    sc = KVM_RUN_EXIT_ARMS[arm]
    off = KVM_RUN_EXIT_OFFSET
    return sc.parse(bytes(run[off : off + sc.sizeof()]))


def kvm_run_exit_build_into(run: bytearray | memoryview, arm: str, values: dict[str, object]) -> None:
    """Write arm ``arm`` built from ``values`` at the exit union of a kvm_run buffer.

    Only the arm's own bytes change; the rest of the 256-byte union is left as is.
    """
    b = KVM_RUN_EXIT_ARMS[arm].build(values)
    off = KVM_RUN_EXIT_OFFSET
    run[off : off + len(b)] = b


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6
KVM_SYSTEM_EVENT_TDX_FATAL = 7

# msr.reason
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

KVM_NOTIFY_CONTEXT_INVALID = 1 << 0

# struct kvm_hyperv_exit.type / struct kvm_xen_exit.type (not exit reasons)
KVM_EXIT_HYPERV_SYNIC = 1
KVM_EXIT_HYPERV_HCALL = 2
KVM_EXIT_HYPERV_SYNDBG = 3
KVM_EXIT_XEN_HCALL = 1

# memory_fault.flags (the only upstream flag; USERFAULT is in kvm_userfault.py)
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# mp_state
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10

# guest debug control
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000

# ---------------------------------------------------------------------------------------------
# KVM_EXIT_* (kvm_run.exit_reason)
# ---------------------------------------------------------------------------------------------

_BEFORE_EXITS = set(globals())

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15  # deprecated
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37
KVM_EXIT_LOONGARCH_IOCSR = 38
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_TDX = 40  # 6.16
KVM_EXIT_ARM_SEA = 41  # 6.19
KVM_EXIT_ARM_LDST64B = 42  # 7.0
KVM_EXIT_SNP_REQ_CERTS = 43  # 7.0

#: every KVM_EXIT_* name -> number, in number order
KVM_EXITS: dict[str, int] = {
    k: v for k, v in globals().items() if k.startswith("KVM_EXIT_") and k not in _BEFORE_EXITS
}

# ---------------------------------------------------------------------------------------------
# KVM_CAP_* (the full upstream list, 0..249; gaps are numbers upstream retired)
# ---------------------------------------------------------------------------------------------

_BEFORE_CAPS = set(globals())

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_MMU_SHADOW_CACHE_CONTROL = 2
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_VAPIC = 6
KVM_CAP_EXT_CPUID = 7
KVM_CAP_CLOCKSOURCE = 8
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_PV_MMU = 13
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_IOMMU = 18
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_REINJECT_CONTROL = 24
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_ASSIGN_DEV_IRQ = 29
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_XEN_HVM = 38
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_S390_PSW = 42
KVM_CAP_PPC_SEGSTATE = 43
KVM_CAP_HYPERV = 44
KVM_CAP_HYPERV_VAPIC = 45
KVM_CAP_HYPERV_SPIN = 46
KVM_CAP_PCI_SEGMENT = 47
KVM_CAP_PPC_PAIRED_SINGLES = 48
KVM_CAP_INTR_SHADOW = 49
KVM_CAP_DEBUGREGS = 50
KVM_CAP_X86_ROBUST_SINGLESTEP = 51
KVM_CAP_PPC_OSI = 52
KVM_CAP_PPC_UNSET_IRQ = 53
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_PPC_GET_PVINFO = 57
KVM_CAP_PPC_IRQ_LEVEL = 58
KVM_CAP_ASYNC_PF = 59
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_PPC_BOOKE_SREGS = 62
KVM_CAP_SPAPR_TCE = 63
KVM_CAP_PPC_SMT = 64
KVM_CAP_PPC_RMA = 65
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_PPC_HIOR = 67
KVM_CAP_PPC_PAPR = 68
KVM_CAP_SW_TLB = 69
KVM_CAP_ONE_REG = 70
KVM_CAP_S390_GMAP = 71
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_S390_UCONTROL = 73
KVM_CAP_SYNC_REGS = 74
KVM_CAP_PCI_2_3 = 75
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_PPC_GET_SMMU_INFO = 78
KVM_CAP_S390_COW = 79
KVM_CAP_PPC_ALLOC_HTAB = 80
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_PPC_BOOKE_WATCHDOG = 83
KVM_CAP_PPC_HTAB_FD = 84
KVM_CAP_S390_CSS_SUPPORT = 85
KVM_CAP_PPC_EPR = 86
KVM_CAP_ARM_PSCI = 87
KVM_CAP_ARM_SET_DEVICE_ADDR = 88
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_IRQ_MPIC = 90
KVM_CAP_PPC_RTAS = 91
KVM_CAP_IRQ_XICS = 92
KVM_CAP_ARM_EL1_32BIT = 93
KVM_CAP_SPAPR_MULTITCE = 94
KVM_CAP_EXT_EMUL_CPUID = 95
KVM_CAP_HYPERV_TIME = 96
KVM_CAP_IOAPIC_POLARITY_IGNORED = 97
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_S390_IRQCHIP = 99
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_VM_ATTRIBUTES = 101
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_PPC_FIXUP_HCALL = 103
KVM_CAP_PPC_ENABLE_HCALL = 104
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_S390_USER_SIGP = 106
KVM_CAP_S390_VECTOR_REGISTERS = 107
KVM_CAP_S390_MEM_OP = 108
KVM_CAP_S390_USER_STSI = 109
KVM_CAP_S390_SKEYS = 110
KVM_CAP_MIPS_FPU = 111
KVM_CAP_MIPS_MSA = 112
KVM_CAP_S390_INJECT_IRQ = 113
KVM_CAP_S390_IRQ_STATE = 114
KVM_CAP_PPC_HWRNG = 115
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_X86_SMM = 117
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_HYPERV_SYNIC = 123
KVM_CAP_S390_RI = 124
KVM_CAP_SPAPR_TCE_64 = 125
KVM_CAP_ARM_PMU_V3 = 126
KVM_CAP_VCPU_ATTRIBUTES = 127
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_S390_USER_INSTR0 = 130
KVM_CAP_MSI_DEVID = 131
KVM_CAP_PPC_HTM = 132
KVM_CAP_SPAPR_RESIZE_HPT = 133
KVM_CAP_PPC_MMU_RADIX = 134
KVM_CAP_PPC_MMU_HASH_V3 = 135
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MIPS_VZ = 137
KVM_CAP_MIPS_TE = 138
KVM_CAP_MIPS_64BIT = 139
KVM_CAP_S390_GS = 140
KVM_CAP_S390_AIS = 141
KVM_CAP_SPAPR_TCE_VFIO = 142
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_ARM_USER_IRQ = 144
KVM_CAP_S390_CMMA_MIGRATION = 145
KVM_CAP_PPC_FWNMI = 146
KVM_CAP_PPC_SMT_POSSIBLE = 147
KVM_CAP_HYPERV_SYNIC2 = 148
KVM_CAP_HYPERV_VP_INDEX = 149
KVM_CAP_S390_AIS_MIGRATION = 150
KVM_CAP_PPC_GET_CPU_CHAR = 151
KVM_CAP_S390_BPB = 152
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_HYPERV_EVENTFD = 154
KVM_CAP_HYPERV_TLBFLUSH = 155
KVM_CAP_S390_HPAGE_1M = 156
KVM_CAP_NESTED_STATE = 157
KVM_CAP_ARM_INJECT_SERROR_ESR = 158
KVM_CAP_MSR_PLATFORM_INFO = 159
KVM_CAP_PPC_NESTED_HV = 160
KVM_CAP_HYPERV_SEND_IPI = 161
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_HYPERV_ENLIGHTENED_VMCS = 163
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT = 166
KVM_CAP_HYPERV_CPUID = 167
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_PPC_IRQ_XIVE = 169
KVM_CAP_ARM_SVE = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS = 171
KVM_CAP_ARM_PTRAUTH_GENERIC = 172
KVM_CAP_PMU_EVENT_FILTER = 173
KVM_CAP_ARM_IRQ_LINE_LAYOUT_2 = 174
KVM_CAP_HYPERV_DIRECT_TLBFLUSH = 175
KVM_CAP_PPC_GUEST_DEBUG_SSTEP = 176
KVM_CAP_ARM_NISV_TO_USER = 177
KVM_CAP_ARM_INJECT_EXT_DABT = 178
KVM_CAP_S390_VCPU_RESETS = 179
KVM_CAP_S390_PROTECTED = 180
KVM_CAP_PPC_SECURE_GUEST = 181
KVM_CAP_HALT_POLL = 182
KVM_CAP_ASYNC_PF_INT = 183
KVM_CAP_LAST_CPU = 184
KVM_CAP_SMALLER_MAXPHYADDR = 185
KVM_CAP_S390_DIAG318 = 186
KVM_CAP_STEAL_TIME = 187
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_ENFORCE_PV_FEATURE_CPUID = 190
KVM_CAP_SYS_HYPERV_CPUID = 191
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_X86_BUS_LOCK_EXIT = 193
KVM_CAP_PPC_DAWR1 = 194
KVM_CAP_SET_GUEST_DEBUG2 = 195
KVM_CAP_SGX_ATTRIBUTE = 196
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
KVM_CAP_PTP_KVM = 198
KVM_CAP_HYPERV_ENFORCE_CPUID = 199
KVM_CAP_SREGS2 = 200
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_PPC_RPT_INVALIDATE = 202
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_ARM_MTE = 205
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206
KVM_CAP_VM_GPA_BITS = 207
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYS_ATTRIBUTES = 209
KVM_CAP_PPC_AIL_MODE_3 = 210
KVM_CAP_S390_MEM_OP_EXTENSION = 211
KVM_CAP_PMU_CAPABILITY = 212
KVM_CAP_DISABLE_QUIRKS2 = 213
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_ARM_SYSTEM_SUSPEND = 216
KVM_CAP_S390_PROTECTED_DUMP = 217
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
KVM_CAP_X86_NOTIFY_VMEXIT = 219
KVM_CAP_VM_DISABLE_NX_HUGE_PAGES = 220
KVM_CAP_S390_ZPCI_OP = 221
KVM_CAP_S390_CPU_TOPOLOGY = 222
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_S390_PROTECTED_ASYNC_DISABLE = 224
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_PMU_EVENT_MASKED_EVENTS = 226
KVM_CAP_COUNTER_OFFSET = 227
KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE = 228
KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES = 229
KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES = 230
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_X86_APIC_BUS_CYCLES_NS = 237
KVM_CAP_X86_GUEST_MODE = 238
KVM_CAP_ARM_WRITABLE_IMP_ID_REGS = 239
KVM_CAP_ARM_EL2 = 240
KVM_CAP_ARM_EL2_E2H0 = 241
KVM_CAP_RISCV_MP_STATE_RESET = 242
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_CAP_ARM_SEA_TO_USER = 245
KVM_CAP_S390_USER_OPEREXEC = 246
KVM_CAP_S390_KEYOP = 247
KVM_CAP_S390_VSIE_ESAMODE = 248
KVM_CAP_S390_HPAGE_2G = 249

#: "KVM_CAP_<NAME>" -> number, in number order (source: strace src/xlat/kvm_cap.in
#: through v7.2-rc1, cross-checked with the v6.18 kvm.h; see uapi.md §1.7)
KVM_CAPS: dict[str, int] = {
    k: v for k, v in globals().items() if k.startswith("KVM_CAP_") and k not in _BEFORE_CAPS
}

# ---------------------------------------------------------------------------------------------
# ioctls. Structs fakekvm does not parse are given by sizeof ("size only").
# ---------------------------------------------------------------------------------------------

_BEFORE_IOCTLS = set(globals())

# Sizes of structs fakekvm names but does not parse (x86-64; proven by the header test).
SIZEOF_kvm_msr_list = 4  # size only: nmsrs + flexible indices[]
SIZEOF_kvm_cpuid2 = 8  # size only: nent, padding + flexible entries[]
SIZEOF_kvm_cpuid = 8  # size only
SIZEOF_kvm_irq_level = 8  # size only
SIZEOF_kvm_irqchip = 520  # size only
SIZEOF_kvm_pit_state = 72  # size only
SIZEOF_kvm_pit_state2 = 112  # size only
SIZEOF_kvm_pit_config = 64  # size only
SIZEOF_kvm_coalesced_mmio_zone = 16  # size only
SIZEOF_kvm_irq_routing = 8  # size only: nr, flags + flexible entries[]
SIZEOF_kvm_xen_hvm_config = 56  # size only
SIZEOF_kvm_clock_data = 48  # size only
SIZEOF_kvm_msi = 32  # size only
SIZEOF_kvm_pmu_event_filter = 32  # size only
SIZEOF_kvm_create_device = 12  # size only
SIZEOF_kvm_device_attr = 24  # size only
SIZEOF_kvm_translation = 24  # size only
SIZEOF_kvm_interrupt = 4  # size only
SIZEOF_kvm_msrs = 8  # size only: nmsrs, pad + flexible entries[]
SIZEOF_kvm_signal_mask = 4  # size only: len + flexible sigset[]
SIZEOF_kvm_fpu = 416  # size only
SIZEOF_kvm_lapic_state = 1024  # size only
SIZEOF_kvm_tpr_access_ctl = 40  # size only
SIZEOF_kvm_vapic_addr = 8  # size only
SIZEOF_kvm_mp_state = 4  # size only
SIZEOF_kvm_guest_debug = 72  # size only
SIZEOF_kvm_x86_mce = 64  # size only
SIZEOF_kvm_debugregs = 128  # size only
SIZEOF_kvm_xsave = 4096  # size only (KVM_GET_XSAVE2 may use more; the number keeps 4096)
SIZEOF_kvm_xcrs = 392  # size only
SIZEOF_kvm_one_reg = 16  # size only
SIZEOF_kvm_reg_list = 8  # size only
SIZEOF_kvm_enc_region = 16  # size only
SIZEOF_kvm_hyperv_eventfd = 24  # size only
SIZEOF_kvm_nested_state = 128  # size only: header + flexible data
SIZEOF_kvm_msr_filter = 392  # size only
SIZEOF_kvm_xen_hvm_attr = 72  # size only
SIZEOF_kvm_xen_vcpu_attr = 72  # size only
SIZEOF_kvm_sregs2 = 320  # size only
SIZEOF_kvm_irq_routing_xen_evtchn = 12  # size only
SIZEOF_kvm_memory_region = 24  # size only (the removed KVM_SET_MEMORY_REGION)
SIZEOF_u64 = 8  # __u64

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, SIZEOF_kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, SIZEOF_kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _IOWR(KVMIO, 0x09, SIZEOF_kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, SIZEOF_kvm_msr_list)

# VM ioctls
KVM_SET_MEMORY_REGION = _IOW(KVMIO, 0x40, SIZEOF_kvm_memory_region)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = _IO(KVMIO, 0x44)
KVM_GET_NR_MMU_PAGES = _IO(KVMIO, 0x45)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, SIZEOF_u64)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, SIZEOF_kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, SIZEOF_kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, SIZEOF_kvm_irqchip)
KVM_CREATE_PIT = _IO(KVMIO, 0x64)
KVM_GET_PIT = _IOWR(KVMIO, 0x65, SIZEOF_kvm_pit_state)
KVM_SET_PIT = _IOR(KVMIO, 0x66, SIZEOF_kvm_pit_state)
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, SIZEOF_kvm_irq_level)
KVM_REGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x67, SIZEOF_kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = _IOW(KVMIO, 0x68, SIZEOF_kvm_coalesced_mmio_zone)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, SIZEOF_kvm_irq_routing)
KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, SIZEOF_kvm_pit_config)
KVM_SET_BOOT_CPU_ID = _IO(KVMIO, 0x78)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_XEN_HVM_CONFIG = _IOW(KVMIO, 0x7A, SIZEOF_kvm_xen_hvm_config)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, SIZEOF_kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, SIZEOF_kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, SIZEOF_kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, SIZEOF_kvm_pit_state2)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, SIZEOF_kvm_msi)
KVM_SET_PMU_EVENT_FILTER = _IOW(KVMIO, 0xB2, SIZEOF_kvm_pmu_event_filter)
KVM_MEMORY_ENCRYPT_OP = _IOWR(KVMIO, 0xBA, SIZEOF_u64)  # unsigned long
KVM_MEMORY_ENCRYPT_REG_REGION = _IOR(KVMIO, 0xBB, SIZEOF_kvm_enc_region)
KVM_MEMORY_ENCRYPT_UNREG_REGION = _IOR(KVMIO, 0xBC, SIZEOF_kvm_enc_region)
KVM_HYPERV_EVENTFD = _IOW(KVMIO, 0xBD, SIZEOF_kvm_hyperv_eventfd)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xC6, SIZEOF_kvm_msr_filter)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
KVM_XEN_HVM_GET_ATTR = _IOWR(KVMIO, 0xC8, SIZEOF_kvm_xen_hvm_attr)
KVM_XEN_HVM_SET_ATTR = _IOW(KVMIO, 0xC9, SIZEOF_kvm_xen_hvm_attr)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)
KVM_CREATE_DEVICE = _IOWR(KVMIO, 0xE0, SIZEOF_kvm_create_device)
KVM_SET_DEVICE_ATTR = _IOW(KVMIO, 0xE1, SIZEOF_kvm_device_attr)
KVM_GET_DEVICE_ATTR = _IOW(KVMIO, 0xE2, SIZEOF_kvm_device_attr)
KVM_HAS_DEVICE_ATTR = _IOW(KVMIO, 0xE3, SIZEOF_kvm_device_attr)

# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, SIZEOF_kvm_translation)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, SIZEOF_kvm_interrupt)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, SIZEOF_kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, SIZEOF_kvm_msrs)
KVM_SET_CPUID = _IOW(KVMIO, 0x8A, SIZEOF_kvm_cpuid)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, SIZEOF_kvm_signal_mask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, SIZEOF_kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, SIZEOF_kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, SIZEOF_kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, SIZEOF_kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, SIZEOF_kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, SIZEOF_kvm_cpuid2)
KVM_TPR_ACCESS_REPORTING = _IOWR(KVMIO, 0x92, SIZEOF_kvm_tpr_access_ctl)
KVM_SET_VAPIC_ADDR = _IOW(KVMIO, 0x93, SIZEOF_kvm_vapic_addr)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, SIZEOF_kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, SIZEOF_kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, SIZEOF_kvm_guest_debug)
KVM_X86_SETUP_MCE = _IOW(KVMIO, 0x9C, SIZEOF_u64)
KVM_X86_GET_MCE_CAP_SUPPORTED = _IOR(KVMIO, 0x9D, SIZEOF_u64)
KVM_X86_SET_MCE = _IOW(KVMIO, 0x9E, SIZEOF_kvm_x86_mce)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, SIZEOF_kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, SIZEOF_kvm_debugregs)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, SIZEOF_kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, SIZEOF_kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, SIZEOF_kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, SIZEOF_kvm_xcrs)
KVM_GET_ONE_REG = _IOW(KVMIO, 0xAB, SIZEOF_kvm_one_reg)
KVM_SET_ONE_REG = _IOW(KVMIO, 0xAC, SIZEOF_kvm_one_reg)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)
KVM_GET_REG_LIST = _IOWR(KVMIO, 0xB0, SIZEOF_kvm_reg_list)
KVM_SMI = _IO(KVMIO, 0xB7)
KVM_GET_NESTED_STATE = _IOWR(KVMIO, 0xBE, SIZEOF_kvm_nested_state)
KVM_SET_NESTED_STATE = _IOW(KVMIO, 0xBF, SIZEOF_kvm_nested_state)
KVM_GET_SUPPORTED_HV_CPUID = _IOWR(KVMIO, 0xC1, SIZEOF_kvm_cpuid2)
KVM_XEN_VCPU_GET_ATTR = _IOWR(KVMIO, 0xCA, SIZEOF_kvm_xen_vcpu_attr)
KVM_XEN_VCPU_SET_ATTR = _IOW(KVMIO, 0xCB, SIZEOF_kvm_xen_vcpu_attr)
KVM_GET_SREGS2 = _IOR(KVMIO, 0xCC, SIZEOF_kvm_sregs2)
KVM_SET_SREGS2 = _IOW(KVMIO, 0xCD, SIZEOF_kvm_sregs2)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, SIZEOF_kvm_xsave)
KVM_XEN_HVM_EVTCHN_SEND = _IOW(KVMIO, 0xD0, SIZEOF_kvm_irq_routing_xen_evtchn)
KVM_PRE_FAULT_MEMORY = _IOWR(KVMIO, 0xD5, kvm_pre_fault_memory)

#: every KVM ioctl above: "KVM_..." -> request number, in definition order
KVM_IOCTLS: dict[str, int] = {
    k: v for k, v in globals().items() if k.startswith("KVM_") and k not in _BEFORE_IOCTLS
}

#: every construct struct of this module, by C name (kvm_run arms as kvm_run_<arm>)
KVM_STRUCTS: dict[str, Construct] = {
    "kvm_userspace_memory_region": kvm_userspace_memory_region,
    "kvm_userspace_memory_region2": kvm_userspace_memory_region2,
    "kvm_create_guest_memfd": kvm_create_guest_memfd,
    "kvm_memory_attributes": kvm_memory_attributes,
    "kvm_pre_fault_memory": kvm_pre_fault_memory,
    "kvm_regs": kvm_regs,
    "kvm_segment": kvm_segment,
    "kvm_dtable": kvm_dtable,
    "kvm_sregs": kvm_sregs,
    "kvm_vcpu_events": kvm_vcpu_events,
    "kvm_sync_regs": kvm_sync_regs,
    "kvm_run": kvm_run,
    "kvm_dirty_log": kvm_dirty_log,
    "kvm_clear_dirty_log": kvm_clear_dirty_log,
    "kvm_irqfd": kvm_irqfd,
    "kvm_ioeventfd": kvm_ioeventfd,
    "kvm_enable_cap": kvm_enable_cap,
}
