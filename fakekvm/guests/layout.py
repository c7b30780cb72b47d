"""Guest-physical layout of the long-mode guests, and the tables that go there.

Everything below ``DATA_BASE`` (2 MiB) is the "system area"; workloads use
``[DATA_BASE, mem_size)``.  Guest-virtual = guest-physical (identity map).

==========  ====================================================================
0x000000    not present in the page tables (a null access faults)
0x001000    GDT (7 slots: null, code64 DPL0, data DPL0, data DPL3, code64 DPL3,
            64-bit TSS (2 slots))
0x002000    parameter page (free for callers: the programs take registers)
0x003000    TSS (0x68 bytes) + I/O permission bitmap (8 KiB of zeros: every
            port allowed, + the 0xff terminator), up to 0x005069
0x006000    PML4 (one entry: PDPT)
0x007000    PDPT (one entry per GiB mapped)
0x008000    PT for [0, 2 MiB) in 4 KiB pages (entry 0 absent)
0x009000    PT for the last partial 2 MiB, if the mapped size is not 2 MiB aligned
0x00a000..  one PD per GiB mapped, 2 MiB pages (up to 246 GiB)
0x100000    code (up to 64 KiB)
0x110000..  stacks, 16 KiB a vCPU: vCPU n starts with RSP = 0x200000 - n * 0x4000
            (60 vCPUs at most)
0x200000    DATA_BASE: first byte the workloads use
==========  ====================================================================

Every entry has P, R/W and U/S set (the code runs at CPL3), plus A, and D on
leaves, preset so the guest's page walk writes nothing and the dirty log never
shows a page-table page (without them the walker sets the bits and dirties the
table pages, SDM vol. 3 §4.8; uapi.md §6.4 saw exactly that).  Measured here
on kvm-pvm: a run dirties the pages it stores to, the stack page if it uses
``call``, and the code page on its first execution.  Nothing is
executable-protected (EFER.NXE = 0).

The GDT is that of a 64-bit kernel (SDM vol. 3 §3.4.5, §5.2.1; Linux
``arch/x86/include/asm/segment.h`` has the same shapes); the vCPU starts
directly at CPL3 (CS = 0x23, SS = 0x1b) with IDT.limit = 0, so any exception
triple-faults to ``KVM_EXIT_SHUTDOWN``.
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

PAGE = 0x1000
LARGE = 0x200000  # 2 MiB
GIB = 0x40000000

GDT_ADDR = 0x1000
PARAM_ADDR = 0x2000
TSS_ADDR = 0x3000
PML4_ADDR = 0x6000
PDPT_ADDR = 0x7000
PT_LOW_ADDR = 0x8000
PT_TAIL_ADDR = 0x9000
PD_ADDR = 0xA000
CODE_ADDR = 0x100000
STACK_TOP = 0x200000
STACK_PER_VCPU = 0x4000
CODE_MAX = 0x10000
DATA_BASE = 0x200000

MAX_PDS = (CODE_ADDR - PD_ADDR) // PAGE
MAX_MAPPED = MAX_PDS * GIB

# page-table entry bits (SDM vol. 3 §4.5)
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
_TABLE = PTE_P | PTE_RW | PTE_US | PTE_A
_LEAF = _TABLE | PTE_D

# selectors
SEL_KERNEL_CS = 0x08
SEL_KERNEL_DS = 0x10
SEL_USER_DS = 0x18 | 3
SEL_USER_CS = 0x20 | 3
SEL_TSS = 0x28

# control-register bits
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_FIXED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

# 64-bit TSS (SDM vol. 3 §8.7): 0x68 bytes, I/O map base at offset 0x66
TSS_SIZE = 0x68
IO_BITMAP_BYTES = 0x10000 // 8
TSS_LIMIT = TSS_SIZE + IO_BITMAP_BYTES  # the last byte is the 0xff terminator


def page_tables(mapped_size: int) -> list[tuple[int, bytes]]:
    """Identity-map ``[PAGE, mapped_size)``: ``(gpa, bytes)`` chunks to load.

    ``mapped_size`` is rounded up to 4 KiB.  2 MiB pages wherever a whole
    aligned 2 MiB fits, 4 KiB pages in the first 2 MiB and the tail.
    """
    if mapped_size <= 0:
        raise ValueError("mapped_size must be positive")
    mapped_size = -(-mapped_size // PAGE) * PAGE
    if mapped_size > MAX_MAPPED:
        raise ValueError(f"mapped_size {mapped_size:#x} > {MAX_MAPPED:#x} (system area too small)")
    n_pds = -(-mapped_size // GIB)
    pml4 = array("Q", bytes(PAGE))
    pml4[0] = PDPT_ADDR | _TABLE
    pdpt = array("Q", bytes(PAGE))
    pds = array("Q", bytes(PAGE * n_pds))
    for g in range(n_pds):
        pdpt[g] = (PD_ADDR + g * PAGE) | _TABLE
    full_large = mapped_size // LARGE
    # 2 MiB leaves everywhere except slot 0 (the low PT) and the partial tail.
    for i in range(1, full_large):
        pds[i] = (i * LARGE) | _LEAF | PTE_PS
    pds[0] = PT_LOW_ADDR | _TABLE
    pt_low = array("Q", bytes(PAGE))
    for i in range(1, min(512, mapped_size // PAGE)):
        pt_low[i] = (i * PAGE) | _LEAF
    chunks = [
        (PML4_ADDR, pml4.tobytes()),
        (PDPT_ADDR, pdpt.tobytes()),
        (PT_LOW_ADDR, pt_low.tobytes()),
    ]
    tail = mapped_size % LARGE
    if tail and full_large >= 1:
        pt_tail = array("Q", bytes(PAGE))
        start = full_large * LARGE
        for i in range(tail // PAGE):
            pt_tail[i] = (start + i * PAGE) | _LEAF
        pds[full_large] = PT_TAIL_ADDR | _TABLE
        chunks.append((PT_TAIL_ADDR, pt_tail.tobytes()))
    chunks.append((PD_ADDR, pds.tobytes()))
    return chunks


def _descriptor(
    *, type_: int, s: int, dpl: int, long_: int, db: int, g: int, limit: int = 0xFFFFF
) -> int:
    """An 8-byte code/data segment descriptor (SDM vol. 3 §3.4.5), base 0."""
    access = type_ | s << 4 | dpl << 5 | 1 << 7  # P=1
    flags = long_ << 1 | db << 2 | g << 3
    return (limit & 0xFFFF) | (access << 40) | ((limit >> 16) & 0xF) << 48 | flags << 52


# (selector index) -> kvm_segment fields; the GDT bytes are derived from the same data
_CODE64 = {"type": 0xB, "s": 1, "l": 1, "db": 0, "g": 1}
_DATA = {"type": 0x3, "s": 1, "l": 0, "db": 1, "g": 1}


def gdt_bytes() -> bytes:
    """The GDT placed at ``GDT_ADDR`` (56 bytes)."""
    entries = [
        0,
        _descriptor(type_=_CODE64["type"], s=1, dpl=0, long_=1, db=0, g=1),
        _descriptor(type_=_DATA["type"], s=1, dpl=0, long_=0, db=1, g=1),
        _descriptor(type_=_DATA["type"], s=1, dpl=3, long_=0, db=1, g=1),
        _descriptor(type_=_CODE64["type"], s=1, dpl=3, long_=1, db=0, g=1),
    ]
    # 64-bit TSS descriptor (SDM vol. 3 §8.2.3): 16 bytes, type 0xB (busy), base TSS_ADDR.
    base = TSS_ADDR
    low = (
        (TSS_LIMIT & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (0xB | 1 << 7) << 40
        | ((TSS_LIMIT >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56
    )
    entries += [low, base >> 32]
    return struct.pack(f"<{len(entries)}Q", *entries)


def _seg(selector: int, dpl: int, fields: dict[str, int]) -> dict[str, int]:
    return {
        "base": 0,
        "limit": 0xFFFFFFFF,
        "selector": selector,
        "type": fields["type"],
        "present": 1,
        "dpl": dpl,
        "db": fields["db"],
        "s": fields["s"],
        "l": fields["l"],
        "g": fields["g"],
        "avl": 0,
        "unusable": 0,
    }


def long_mode_sregs() -> dict[str, Any]:
    """The ``kvm_sregs`` fields that start a vCPU at CPL3 in 64-bit mode."""
    data = _seg(SEL_USER_DS, 3, _DATA)
    gdt_len = len(gdt_bytes())
    return {
        "cs": _seg(SEL_USER_CS, 3, _CODE64),
        "ds": dict(data),
        "es": dict(data),
        "fs": dict(data),
        "gs": dict(data),
        "ss": dict(data),
        "tr": {
            "base": TSS_ADDR,
            "limit": TSS_LIMIT,
            "selector": SEL_TSS,
            "type": 0xB,
            "present": 1,
            "dpl": 0,
            "db": 0,
            "s": 0,
            "l": 0,
            "g": 0,
            "avl": 0,
            "unusable": 0,
        },
        "ldt": {
            "base": 0,
            "limit": 0xFFFF,
            "selector": 0,
            "type": 0x2,
            "present": 1,
            "dpl": 0,
            "db": 0,
            "s": 0,
            "l": 0,
            "g": 0,
            "avl": 0,
            "unusable": 0,
        },
        "gdt": {"base": GDT_ADDR, "limit": gdt_len - 1},
        "idt": {"base": 0, "limit": 0},
        "cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        "cr3": PML4_ADDR,
        "cr4": CR4_PAE,
        "efer": EFER_LME | EFER_LMA,
    }


def real_mode_sregs() -> dict[str, Any]:
    """The ``kvm_sregs`` fields for 16-bit real mode with every segment at base 0."""

    def seg(type_: int) -> dict[str, int]:
        return {
            "base": 0,
            "limit": 0xFFFF,
            "selector": 0,
            "type": type_,
            "present": 1,
            "dpl": 0,
            "db": 0,
            "s": 1,
            "l": 0,
            "g": 0,
            "avl": 0,
            "unusable": 0,
        }

    return {
        "cs": seg(0xB),
        "ds": seg(0x3),
        "es": seg(0x3),
        "fs": seg(0x3),
        "gs": seg(0x3),
        "ss": seg(0x3),
        "cr0": 0x60000010,  # the reset value (CD|NW|ET), measured on this host
        "cr4": 0,
        "efer": 0,
    }


def tss_bytes() -> bytes:
    """The TSS at ``TSS_ADDR`` with an I/O bitmap that allows every port.

    RFLAGS.IOPL = 3 already lets CPL3 use ``in``/``out``; the bitmap is what
    allows them when IOPL < CPL (SDM vol. 1 §19.5.2).  It matters on kvm-pvm,
    where RFLAGS.IOPL reads back as 0 after the first exit (measured here): the
    emulator then checks the bitmap, and without it an ``out`` to a port past
    the TSS limit raises #GP (a triple fault: ``KVM_EXIT_SHUTDOWN``).
    """
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 0x66, TSS_SIZE)  # I/O map base address
    tss[TSS_LIMIT] = 0xFF
    return bytes(tss)


def stack_top(vcpu: int) -> int:
    """Initial RSP of vCPU ``vcpu`` (stacks grow down from ``STACK_TOP``)."""
    top = STACK_TOP - vcpu * STACK_PER_VCPU
    if vcpu < 0 or top - STACK_PER_VCPU < CODE_ADDR + CODE_MAX:
        raise ValueError(f"no stack room for vCPU {vcpu}")
    return top
