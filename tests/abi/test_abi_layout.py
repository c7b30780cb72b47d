"""Every fakekvm.abi struct against a layout table written by hand from uapi.md.

The table (``EXPECTED``) is transcribed from /work/shared/reference/uapi.md
§1.2-§1.6 and §2 (and, for the few arms uapi.md does not spell out, from the
C header text), NOT computed from our definitions. A member whose type is
another struct names it, and the test expands it, so nested offsets are sums
of table entries.

For each struct: sizeof, the set of members, each member's offset and size,
a byte round trip, and (for the hot structs) equality of the ``*_fmt``
``struct.Struct`` codec with the construct definition.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from construct import Construct, Container, ListContainer

from fakekvm.abi import kvm, kvm_userfault, layout, uffd

# (c member path, offset, size, nested struct name or None)
Row = tuple[str, int, int, "str | None"]

_segment_rows: list[Row] = [
    ("base", 0, 8, None),
    ("limit", 8, 4, None),
    ("selector", 12, 2, None),
    ("type", 14, 1, None),
    ("present", 15, 1, None),
    ("dpl", 16, 1, None),
    ("db", 17, 1, None),
    ("s", 18, 1, None),
    ("l", 19, 1, None),
    ("g", 20, 1, None),
    ("avl", 21, 1, None),
    ("unusable", 22, 1, None),
    ("padding", 23, 1, None),
]

_regs_names = (
    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]
)

_region_rows: list[Row] = [
    ("slot", 0, 4, None),
    ("flags", 4, 4, None),
    ("guest_phys_addr", 8, 8, None),
    ("memory_size", 16, 8, None),
    ("userspace_addr", 24, 8, None),
]

_range_rows: list[Row] = [("range", 0, 16, "uffdio_range")]

EXPECTED: dict[str, tuple[int, list[Row]]] = {
    # ---- uapi.md §1.2
    "kvm_userspace_memory_region": (32, _region_rows),
    "kvm_userspace_memory_region2": (
        160,
        [
            *_region_rows,
            ("guest_memfd_offset", 32, 8, None),
            ("guest_memfd", 40, 4, None),
            ("pad1", 44, 4, None),
            ("pad2", 48, 112, None),
        ],
    ),
    # ---- uapi.md §3 (NOT UPSTREAM variant)
    "kvm_userfault.kvm_userspace_memory_region2": (
        160,
        [
            *_region_rows,
            ("guest_memfd_offset", 32, 8, None),
            ("guest_memfd", 40, 4, None),
            ("pad1", 44, 4, None),
            ("userfault_bitmap", 48, 8, None),
            ("pad2", 56, 104, None),
        ],
    ),
    "kvm_userfault.kvm_fault": (8, [("address", 0, 8, None)]),
    # ---- uapi.md §1.3
    "kvm_create_guest_memfd": (
        64,
        [("size", 0, 8, None), ("flags", 8, 8, None), ("reserved", 16, 48, None)],
    ),
    "kvm_memory_attributes": (
        32,
        [
            ("address", 0, 8, None),
            ("size", 8, 8, None),
            ("attributes", 16, 8, None),
            ("flags", 24, 8, None),
        ],
    ),
    "kvm_pre_fault_memory": (
        64,
        [("gpa", 0, 8, None), ("size", 8, 8, None), ("flags", 16, 8, None), ("padding", 24, 40, None)],
    ),
    # ---- uapi.md §1.4
    "kvm_regs": (144, [(n, 8 * i, 8, None) for i, n in enumerate(_regs_names)]),
    "kvm_segment": (24, _segment_rows),
    "kvm_dtable": (16, [("base", 0, 8, None), ("limit", 8, 2, None), ("padding", 10, 6, None)]),
    "kvm_sregs": (
        312,
        [
            *[(n, 24 * i, 24, "kvm_segment") for i, n in enumerate(["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"])],
            ("gdt", 192, 16, "kvm_dtable"),
            ("idt", 208, 16, "kvm_dtable"),
            *[(n, 224 + 8 * i, 8, None) for i, n in enumerate(["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"])],
            ("interrupt_bitmap", 280, 32, None),
        ],
    ),
    # struct kvm_vcpu_events (asm/kvm.h text; 64 bytes per uapi.md §1.4)
    "kvm_vcpu_events": (
        64,
        [
            ("exception", 0, 8, None),
            ("exception.injected", 0, 1, None),
            ("exception.nr", 1, 1, None),
            ("exception.has_error_code", 2, 1, None),
            ("exception.pending", 3, 1, None),
            ("exception.error_code", 4, 4, None),
            ("interrupt", 8, 4, None),
            ("interrupt.injected", 8, 1, None),
            ("interrupt.nr", 9, 1, None),
            ("interrupt.soft", 10, 1, None),
            ("interrupt.shadow", 11, 1, None),
            ("nmi", 12, 4, None),
            ("nmi.injected", 12, 1, None),
            ("nmi.pending", 13, 1, None),
            ("nmi.masked", 14, 1, None),
            ("nmi.pad", 15, 1, None),
            ("sipi_vector", 16, 4, None),
            ("flags", 20, 4, None),
            ("smi", 24, 4, None),
            ("smi.smm", 24, 1, None),
            ("smi.pending", 25, 1, None),
            ("smi.smm_inside_nmi", 26, 1, None),
            ("smi.latched_init", 27, 1, None),
            ("triple_fault", 28, 1, None),
            ("triple_fault.pending", 28, 1, None),
            ("reserved", 29, 26, None),
            ("exception_has_payload", 55, 1, None),
            ("exception_payload", 56, 8, None),
        ],
    ),
    "kvm_sync_regs": (
        520,
        [
            ("regs", 0, 144, "kvm_regs"),
            ("sregs", 144, 312, "kvm_sregs"),
            ("events", 456, 64, "kvm_vcpu_events"),
        ],
    ),
    # ---- uapi.md §1.5
    "kvm_run": (
        2352,
        [
            ("request_interrupt_window", 0, 1, None),
            ("immediate_exit", 1, 1, None),
            ("padding1", 2, 6, None),
            ("exit_reason", 8, 4, None),
            ("ready_for_interrupt_injection", 12, 1, None),
            ("if_flag", 13, 1, None),
            ("flags", 14, 2, None),
            ("cr8", 16, 8, None),
            ("apic_base", 24, 8, None),
            ("padding", 32, 256, None),
            ("hw", 32, 8, None),
            ("hw.hardware_exit_reason", 32, 8, None),
            ("fail_entry", 32, 16, None),
            ("fail_entry.hardware_entry_failure_reason", 32, 8, None),
            ("fail_entry.cpu", 40, 4, None),
            ("ex", 32, 8, None),
            ("ex.exception", 32, 4, None),
            ("ex.error_code", 36, 4, None),
            ("io", 32, 16, None),
            ("io.direction", 32, 1, None),
            ("io.size", 33, 1, None),
            ("io.port", 34, 2, None),
            ("io.count", 36, 4, None),
            ("io.data_offset", 40, 8, None),
            # struct kvm_debug_exit_arch (asm/kvm.h): exception, pad, pc, dr6, dr7
            ("debug", 32, 32, None),
            ("debug.arch", 32, 32, None),
            ("debug.arch.exception", 32, 4, None),
            ("debug.arch.pad", 36, 4, None),
            ("debug.arch.pc", 40, 8, None),
            ("debug.arch.dr6", 48, 8, None),
            ("debug.arch.dr7", 56, 8, None),
            ("mmio", 32, 24, None),
            ("mmio.phys_addr", 32, 8, None),
            ("mmio.data", 40, 8, None),
            ("mmio.len", 48, 4, None),
            ("mmio.is_write", 52, 1, None),
            ("hypercall", 32, 72, None),
            ("hypercall.nr", 32, 8, None),
            ("hypercall.args", 40, 48, None),
            ("hypercall.ret", 88, 8, None),
            ("hypercall.flags", 96, 8, None),
            ("hypercall.longmode", 96, 4, None),
            ("tpr_access", 32, 16, None),
            ("tpr_access.rip", 32, 8, None),
            ("tpr_access.is_write", 40, 4, None),
            ("tpr_access.pad", 44, 4, None),
            ("internal", 32, 136, None),
            ("internal.suberror", 32, 4, None),
            ("internal.ndata", 36, 4, None),
            ("internal.data", 40, 128, None),
            ("emulation_failure", 32, 32, None),
            ("emulation_failure.suberror", 32, 4, None),
            ("emulation_failure.ndata", 36, 4, None),
            ("emulation_failure.flags", 40, 8, None),
            ("emulation_failure.insn_size", 48, 1, None),
            ("emulation_failure.insn_bytes", 49, 15, None),
            ("system_event", 32, 136, None),
            ("system_event.type", 32, 4, None),
            ("system_event.ndata", 36, 4, None),
            ("system_event.data", 40, 128, None),
            ("system_event.flags", 40, 8, None),
            ("eoi", 32, 1, None),
            ("eoi.vector", 32, 1, None),
            ("msr", 32, 24, None),
            ("msr.error", 32, 1, None),
            ("msr.pad", 33, 7, None),
            ("msr.reason", 40, 4, None),
            ("msr.index", 44, 4, None),
            ("msr.data", 48, 8, None),
            ("notify", 32, 4, None),
            ("notify.flags", 32, 4, None),
            ("memory_fault", 32, 24, None),
            ("memory_fault.flags", 32, 8, None),
            ("memory_fault.gpa", 40, 8, None),
            ("memory_fault.size", 48, 8, None),
            ("kvm_valid_regs", 288, 8, None),
            ("kvm_dirty_regs", 296, 8, None),
            ("s", 304, 2048, None),
            ("s.padding", 304, 2048, None),
            ("s.regs", 304, 520, "kvm_sync_regs"),
        ],
    ),
    # ---- uapi.md §1.6
    "kvm_dirty_log": (
        16,
        [("slot", 0, 4, None), ("padding1", 4, 4, None), ("dirty_bitmap", 8, 8, None), ("padding2", 8, 8, None)],
    ),
    "kvm_clear_dirty_log": (
        24,
        [
            ("slot", 0, 4, None),
            ("num_pages", 4, 4, None),
            ("first_page", 8, 8, None),
            ("dirty_bitmap", 16, 8, None),
            ("padding2", 16, 8, None),
        ],
    ),
    "kvm_irqfd": (
        32,
        [("fd", 0, 4, None), ("gsi", 4, 4, None), ("flags", 8, 4, None), ("resamplefd", 12, 4, None), ("pad", 16, 16, None)],
    ),
    "kvm_ioeventfd": (
        64,
        [
            ("datamatch", 0, 8, None),
            ("addr", 8, 8, None),
            ("len", 16, 4, None),
            ("fd", 20, 4, None),
            ("flags", 24, 4, None),
            ("pad", 28, 36, None),
        ],
    ),
    "kvm_enable_cap": (
        104,
        [("cap", 0, 4, None), ("flags", 4, 4, None), ("args", 8, 32, None), ("pad", 40, 64, None)],
    ),
    # ---- uapi.md §2
    "uffd_msg": (
        32,
        [
            ("event", 0, 1, None),
            ("reserved1", 1, 1, None),
            ("reserved2", 2, 2, None),
            ("reserved3", 4, 4, None),
            ("arg", 8, 24, None),
            ("arg.pagefault", 8, 24, None),
            ("arg.pagefault.flags", 8, 8, None),
            ("arg.pagefault.address", 16, 8, None),
            ("arg.pagefault.feat", 24, 4, None),
            ("arg.pagefault.feat.ptid", 24, 4, None),
            ("arg.fork", 8, 4, None),
            ("arg.fork.ufd", 8, 4, None),
            ("arg.remap", 8, 24, None),
            ("arg.remap.from", 8, 8, None),
            ("arg.remap.to", 16, 8, None),
            ("arg.remap.len", 24, 8, None),
            ("arg.remove", 8, 16, None),
            ("arg.remove.start", 8, 8, None),
            ("arg.remove.end", 16, 8, None),
            ("arg.reserved", 8, 24, None),
            ("arg.reserved.reserved1", 8, 8, None),
            ("arg.reserved.reserved2", 16, 8, None),
            ("arg.reserved.reserved3", 24, 8, None),
        ],
    ),
    "uffdio_api": (24, [("api", 0, 8, None), ("features", 8, 8, None), ("ioctls", 16, 8, None)]),
    "uffdio_range": (16, [("start", 0, 8, None), ("len", 8, 8, None)]),
    "uffdio_register": (32, [*_range_rows, ("mode", 16, 8, None), ("ioctls", 24, 8, None)]),
    "uffdio_copy": (
        40,
        [("dst", 0, 8, None), ("src", 8, 8, None), ("len", 16, 8, None), ("mode", 24, 8, None), ("copy", 32, 8, None)],
    ),
    "uffdio_zeropage": (32, [*_range_rows, ("mode", 16, 8, None), ("zeropage", 24, 8, None)]),
    "uffdio_writeprotect": (24, [*_range_rows, ("mode", 16, 8, None)]),
    "uffdio_continue": (32, [*_range_rows, ("mode", 16, 8, None), ("mapped", 24, 8, None)]),
    "uffdio_poison": (32, [*_range_rows, ("mode", 16, 8, None), ("updated", 24, 8, None)]),
    "uffdio_move": (
        40,
        [("dst", 0, 8, None), ("src", 8, 8, None), ("len", 16, 8, None), ("mode", 24, 8, None), ("move", 32, 8, None)],
    ),
}


def _struct(name: str) -> Construct:
    if name.startswith("kvm_userfault."):
        return getattr(kvm_userfault, name.split(".", 1)[1])
    if name in kvm.KVM_STRUCTS:
        return kvm.KVM_STRUCTS[name]
    return uffd.UFFD_STRUCTS[name]


def _expand(name: str, prefix: str = "", base: int = 0) -> dict[str, tuple[int, int]]:
    """The hand table of ``name`` with nested struct rows expanded: path -> (offset, size)."""
    out: dict[str, tuple[int, int]] = {}
    for path, off, size, sub in EXPECTED[name][1]:
        out[prefix + path] = (base + off, size)
        if sub is not None:
            assert EXPECTED[sub][0] == size, f"{name}.{path}: table says {size}, {sub} is {EXPECTED[sub][0]}"
            out.update(_expand(sub, prefix + path + ".", base + off))
    return out


ALL_STRUCTS = sorted(EXPECTED)


def test_every_abi_struct_has_a_table_row() -> None:
    ours = set(kvm.KVM_STRUCTS) | set(uffd.UFFD_STRUCTS)
    assert ours <= set(EXPECTED), ours - set(EXPECTED)
    # the brief's list, each present
    for n in ["kvm_userspace_memory_region", "kvm_userspace_memory_region2", "kvm_create_guest_memfd", "kvm_memory_attributes", "kvm_pre_fault_memory", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_vcpu_events", "kvm_sync_regs", "kvm_run", "kvm_dirty_log", "kvm_clear_dirty_log", "kvm_irqfd", "kvm_ioeventfd", "kvm_enable_cap", "uffd_msg", "uffdio_api", "uffdio_range", "uffdio_register", "uffdio_copy", "uffdio_zeropage", "uffdio_writeprotect", "uffdio_continue", "uffdio_poison", "uffdio_move"]:
        assert n in ours


@pytest.mark.parametrize("name", ALL_STRUCTS)
def test_size(name: str) -> None:
    assert _struct(name).sizeof() == EXPECTED[name][0]
    assert layout.sizeof(_struct(name)) == EXPECTED[name][0]


@pytest.mark.parametrize("name", ALL_STRUCTS)
def test_every_field_offset_and_size(name: str) -> None:
    expected = _expand(name)
    got = {f.path: (f.offset, f.size) for f in layout.c_fields(_struct(name))}
    assert set(got) == set(expected), (set(got) ^ set(expected))
    for path, (off, size) in expected.items():
        assert got[path] == (off, size), path
        assert layout.offsetof(_struct(name), path) == off


def _valid_random_bytes(s: Construct, rng: random.Random) -> bytes:
    """Random bytes, with the implicit C padding (no member covers it) zeroed."""
    n = s.sizeof()
    covered = bytearray(n)
    for f in layout.fields(s):
        covered[f.offset : f.offset + f.size] = b"\1" * f.size
    b = bytearray(rng.randbytes(n))
    for i in range(n):
        if not covered[i]:
            b[i] = 0
    return bytes(b)


@pytest.mark.parametrize("name", ALL_STRUCTS)
def test_byte_round_trip(name: str) -> None:
    s = _struct(name)
    rng = random.Random(name)
    for _ in range(5):
        b = _valid_random_bytes(s, rng)
        assert s.build(s.parse(b)) == b


def test_implicit_padding_is_only_where_c_has_it() -> None:
    # The only bytes of a whole struct that no member covers: none, in any struct we define.
    for name in ALL_STRUCTS:
        s = _struct(name)
        covered = bytearray(s.sizeof())
        for f in layout.fields(s):
            covered[f.offset : f.offset + f.size] = b"\1" * f.size
        assert all(covered), name


def test_kvm_run_arms_at_exit_offset() -> None:
    """Each standalone arm parses the same bytes as the arm inside kvm_run."""
    b = os.urandom(kvm.KVM_RUN_SIZE)
    run = kvm.kvm_run.parse(b)
    for arm_name, arm in kvm.KVM_RUN_EXIT_ARMS.items():
        off = kvm.KVM_RUN_EXIT_OFFSET
        alone = arm.parse(b[off : off + arm.sizeof()])
        assert _plain(alone) == _plain(run.u[arm_name]), arm_name
    assert run.s.regs.regs.rip == struct.unpack_from("<Q", b, kvm.KVM_RUN_S_OFFSET + 128)[0]


def _plain(x: Any) -> Any:
    if isinstance(x, Container):
        return {k: _plain(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, ListContainer | list):
        return [_plain(v) for v in x]
    return x


def test_kvm_run_build_one_arm() -> None:
    """The documented build rule: a dict with only the io arm builds that arm, zero-padded."""
    run = {
        "request_interrupt_window": 0,
        "immediate_exit": 0,
        "padding1": [0] * 6,
        "exit_reason": kvm.KVM_EXIT_IO,
        "ready_for_interrupt_injection": 0,
        "if_flag": 0,
        "flags": 0,
        "cr8": 0,
        "apic_base": 0,
        "u": {"io": {"direction": 1, "size": 1, "port": 0x3F8, "count": 1, "data_offset": 4096}},
        "kvm_valid_regs": 0,
        "kvm_dirty_regs": 0,
        "s": {"padding": bytes(2048)},
    }
    b = kvm.kvm_run.build(run)
    assert len(b) == 2352
    assert kvm.kvm_run_io_fmt.unpack_from(b, 32) == (1, 1, 0x3F8, 1, 4096)
    assert b[48:288] == bytes(240)
    assert kvm.kvm_run_exit_reason_fmt.unpack_from(b, kvm.KVM_RUN_EXIT_REASON_OFFSET) == (2,)


def test_exit_arm_helpers() -> None:
    run = bytearray(b"\xee" * kvm.KVM_RUN_SIZE)
    kvm.kvm_run_exit_build_into(run, "memory_fault", {"flags": 8, "gpa": 0x5000, "size": 4096})
    assert kvm.kvm_run_memory_fault_fmt.unpack_from(run, 32) == (8, 0x5000, 4096)
    assert run[56:] == b"\xee" * (kvm.KVM_RUN_SIZE - 56)  # only the arm's bytes changed
    assert run[:32] == b"\xee" * 32
    mf = kvm.kvm_run_exit_parse(run, "memory_fault")
    assert (mf.flags, mf.gpa, mf.size) == (8, 0x5000, 4096)
    assert kvm.kvm_run.parse(bytes(run)).u.memory_fault.gpa == 0x5000


# ---- struct.Struct codecs against the construct definitions ---------------------------------

def _flat_values(c: Any) -> list[Any]:
    out: list[Any] = []
    for k, v in c.items():
        if k.startswith("_"):
            continue
        if isinstance(v, Container):
            out.extend(_flat_values(v))
        else:
            out.append(v)
    return out


# (fmt, construct, offset within the construct's bytes, field paths the fmt carries)
FMT_CASES: list[tuple[str, struct.Struct, Construct, int, list[str]]] = [
    ("kvm_regs_fmt", kvm.kvm_regs_fmt, kvm.kvm_regs, 0, list(_regs_names)),
    ("kvm_segment_fmt", kvm.kvm_segment_fmt, kvm.kvm_segment, 0, [r[0] for r in _segment_rows]),
    ("kvm_dtable_fmt", kvm.kvm_dtable_fmt, kvm.kvm_dtable, 0, ["base", "limit", "padding"]),
    (
        "kvm_sregs_fmt",
        kvm.kvm_sregs_fmt,
        kvm.kvm_sregs,
        0,
        [
            *[f"{seg}.{r[0]}" for seg in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] for r in _segment_rows],
            *[f"{dt}.{f}" for dt in ["gdt", "idt"] for f in ["base", "limit", "padding"]],
            "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap",
        ],
    ),
    (
        "kvm_userspace_memory_region_fmt",
        kvm.kvm_userspace_memory_region_fmt,
        kvm.kvm_userspace_memory_region,
        0,
        ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"],
    ),
    (
        "kvm_userspace_memory_region2_fmt",
        kvm.kvm_userspace_memory_region2_fmt,
        kvm.kvm_userspace_memory_region2,
        0,
        ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd_offset", "guest_memfd", "pad1"],
    ),
    (
        "kvm_userfault.kvm_userspace_memory_region2_fmt",
        kvm_userfault.kvm_userspace_memory_region2_fmt,
        kvm_userfault.kvm_userspace_memory_region2,
        0,
        ["slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr", "guest_memfd_offset", "guest_memfd", "pad1", "userfault_bitmap"],
    ),
    ("kvm_create_guest_memfd_fmt", kvm.kvm_create_guest_memfd_fmt, kvm.kvm_create_guest_memfd, 0, ["size", "flags"]),
    ("kvm_memory_attributes_fmt", kvm.kvm_memory_attributes_fmt, kvm.kvm_memory_attributes, 0, ["address", "size", "attributes", "flags"]),
    ("kvm_pre_fault_memory_fmt", kvm.kvm_pre_fault_memory_fmt, kvm.kvm_pre_fault_memory, 0, ["gpa", "size", "flags"]),
    ("kvm_dirty_log_fmt", kvm.kvm_dirty_log_fmt, kvm.kvm_dirty_log, 0, ["slot", "padding1", "dirty_bitmap"]),
    ("kvm_clear_dirty_log_fmt", kvm.kvm_clear_dirty_log_fmt, kvm.kvm_clear_dirty_log, 0, ["slot", "num_pages", "first_page", "dirty_bitmap"]),
    ("kvm_irqfd_fmt", kvm.kvm_irqfd_fmt, kvm.kvm_irqfd, 0, ["fd", "gsi", "flags", "resamplefd"]),
    ("kvm_ioeventfd_fmt", kvm.kvm_ioeventfd_fmt, kvm.kvm_ioeventfd, 0, ["datamatch", "addr", "len", "fd", "flags"]),
    ("kvm_enable_cap_fmt", kvm.kvm_enable_cap_fmt, kvm.kvm_enable_cap, 0, ["cap", "flags", "args"]),
    (
        "kvm_run_header_fmt",
        kvm.kvm_run_header_fmt,
        kvm.kvm_run,
        0,
        ["request_interrupt_window", "immediate_exit", "exit_reason", "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base"],
    ),
    ("kvm_run_io_fmt", kvm.kvm_run_io_fmt, kvm.kvm_run, 32, ["io.direction", "io.size", "io.port", "io.count", "io.data_offset"]),
    ("kvm_run_mmio_fmt", kvm.kvm_run_mmio_fmt, kvm.kvm_run, 32, ["mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write"]),
    ("kvm_run_memory_fault_fmt", kvm.kvm_run_memory_fault_fmt, kvm.kvm_run, 32, ["memory_fault.flags", "memory_fault.gpa", "memory_fault.size"]),
    ("kvm_run_internal_fmt", kvm.kvm_run_internal_fmt, kvm.kvm_run, 32, ["internal.suberror", "internal.ndata"]),
    ("kvm_run_system_event_fmt", kvm.kvm_run_system_event_fmt, kvm.kvm_run, 32, ["system_event.type", "system_event.ndata", "system_event.flags"]),
    ("kvm_run_fail_entry_fmt", kvm.kvm_run_fail_entry_fmt, kvm.kvm_run, 32, ["fail_entry.hardware_entry_failure_reason", "fail_entry.cpu"]),
    ("kvm_run_hw_fmt", kvm.kvm_run_hw_fmt, kvm.kvm_run, 32, ["hw.hardware_exit_reason"]),
    ("uffd_msg_pagefault_fmt", uffd.uffd_msg_pagefault_fmt, uffd.uffd_msg, 0, ["event", "arg.pagefault.flags", "arg.pagefault.address", "arg.pagefault.feat.ptid"]),
    ("uffd_msg_fork_fmt", uffd.uffd_msg_fork_fmt, uffd.uffd_msg, 0, ["event", "arg.fork.ufd"]),
    ("uffd_msg_remap_fmt", uffd.uffd_msg_remap_fmt, uffd.uffd_msg, 0, ["event", "arg.remap.from", "arg.remap.to", "arg.remap.len"]),
    ("uffd_msg_remove_fmt", uffd.uffd_msg_remove_fmt, uffd.uffd_msg, 0, ["event", "arg.remove.start", "arg.remove.end"]),
    ("uffdio_api_fmt", uffd.uffdio_api_fmt, uffd.uffdio_api, 0, ["api", "features", "ioctls"]),
    ("uffdio_range_fmt", uffd.uffdio_range_fmt, uffd.uffdio_range, 0, ["start", "len"]),
    ("uffdio_register_fmt", uffd.uffdio_register_fmt, uffd.uffdio_register, 0, ["range.start", "range.len", "mode", "ioctls"]),
    ("uffdio_copy_fmt", uffd.uffdio_copy_fmt, uffd.uffdio_copy, 0, ["dst", "src", "len", "mode", "copy"]),
    ("uffdio_zeropage_fmt", uffd.uffdio_zeropage_fmt, uffd.uffdio_zeropage, 0, ["range.start", "range.len", "mode", "zeropage"]),
    ("uffdio_writeprotect_fmt", uffd.uffdio_writeprotect_fmt, uffd.uffdio_writeprotect, 0, ["range.start", "range.len", "mode"]),
    ("uffdio_continue_fmt", uffd.uffdio_continue_fmt, uffd.uffdio_continue, 0, ["range.start", "range.len", "mode", "mapped"]),
    ("uffdio_poison_fmt", uffd.uffdio_poison_fmt, uffd.uffdio_poison, 0, ["range.start", "range.len", "mode", "updated"]),
    ("uffdio_move_fmt", uffd.uffdio_move_fmt, uffd.uffdio_move, 0, ["dst", "src", "len", "mode", "move"]),
]


def _get(c: Any, path: str) -> Any:
    for p in path.split("."):
        c = c[p]
    return c


def _construct_path(s: Construct, c_path: str) -> str:
    """Map a C member path back to the construct path (re-inserting anonymous 'u')."""
    for f in layout.fields(s):
        if f.c_path == c_path and f.path.rsplit(".", 1)[-1] not in layout.ANONYMOUS:
            return f.path
    raise KeyError(c_path)


@pytest.mark.parametrize("case", FMT_CASES, ids=[c[0] for c in FMT_CASES])
def test_fmt_codec_equals_construct(case: tuple[str, struct.Struct, Construct, int, list[str]]) -> None:
    _, fmt, s, base, paths = case
    rng = random.Random(case[0])
    for _ in range(5):
        b = _valid_random_bytes(s, rng)
        parsed = s.parse(b)
        values = fmt.unpack_from(b, base)
        expected: list[Any] = []
        for p in paths:
            v = _get(parsed, _construct_path(s, p))
            if isinstance(v, ListContainer | list):
                expected.extend(v)
            else:
                expected.append(v)
        assert list(values) == expected
        # fields the fmt skips are packed as zeros; everything it carries lands in place
        packed = fmt.pack(*values)
        region = bytearray(b[base : base + fmt.size])
        for p in paths:
            f = layout.field(s, p)
            assert packed[f.offset - base : f.offset - base + f.size] == bytes(
                region[f.offset - base : f.offset - base + f.size]
            ), p


def test_fmt_sizes_match_structs() -> None:
    assert kvm.kvm_regs_fmt.size == 144
    assert kvm.kvm_userspace_memory_region_fmt.size == 32
    assert kvm.kvm_userspace_memory_region2_fmt.size == 160
    assert kvm_userfault.kvm_userspace_memory_region2_fmt.size == 160
    assert kvm.kvm_run_header_fmt.size == 32
    assert uffd.uffd_msg_pagefault_fmt.size == 32
    assert uffd.uffdio_copy_fmt.size == 40
    assert uffd.uffdio_register_fmt.size == 32
    assert uffd.uffdio_api_fmt.size == 24
