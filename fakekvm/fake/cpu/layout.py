"""Where unicorn keeps the x86 state we cannot reach through its register API.

Unicorn 2.1's ``uc_reg_write`` in ``UC_MODE_64`` sets only the *selector* of
CS/DS/ES/SS (``qemu/target/i386/unicorn.c``: ``env->segs[R_CS].selector = v``)
and has no way to load the hidden part of a segment register (base, limit,
attributes), which ``KVM_SET_SREGS`` must set (``arch/x86/kvm/x86.c:
__set_sregs`` → ``kvm_set_segment``). So the engine edits QEMU's
``CPUX86State`` inside a saved unicorn context and restores it:

* ``uc_context`` = a header, then ``CPUX86State`` up to ``end_reset_fields``;
* ``CPUX86State`` (``qemu/target/i386/cpu.h``): ``regs[16]`` @0, ``eip`` @128,
  ``eflags`` @136, ``cc_*``, ``hflags`` @176, ``hflags2`` @180, ``segs[6]`` @184
  (``SegmentCache {u32 selector; u64 base; u32 limit; u32 flags}``, 24 bytes,
  order ES CS SS DS FS GS), ``ldt`` @328, ``tr`` @352, ``gdt`` @376, ``idt`` @400,
  ``cr[5]`` @424; ``v_tpr`` (CR8 without an APIC) further on, located by
  running ``mov %rax, %cr8``.

The offsets are *measured* at import (distinctive values written through the
API and searched for in the context bytes) and checked against this table, so
a different unicorn build fails loudly instead of corrupting state.

``hflags`` bits we recompute after loading segments follow QEMU's
``cpu_x86_load_seg_cache`` (CPL from SS.DPL, CS32/SS32 from the B bits, CS64 from
CS.L under LMA, ADDSEG).
"""

from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_REG_CR3,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GDTR,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_IDTR,
    UC_X86_REG_RAX,
)

# segment indexes in env->segs[]
R_ES, R_CS, R_SS, R_DS, R_FS, R_GS = range(6)

OFF_HFLAGS = 176
OFF_SEGS = 184
SEG_SIZE = 24
OFF_LDT = OFF_SEGS + 6 * SEG_SIZE
OFF_TR = OFF_LDT + SEG_SIZE
OFF_GDT = OFF_TR + SEG_SIZE
OFF_IDT = OFF_GDT + SEG_SIZE
OFF_CR = OFF_IDT + SEG_SIZE

SEG = struct.Struct("<IxxxxQII")  # selector, base, limit, flags

# QEMU DESC_* bits in SegmentCache.flags (the descriptor's high dword layout)
DESC_TYPE_SHIFT = 8
DESC_S_MASK = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P_MASK = 1 << 15
DESC_AVL_MASK = 1 << 20
DESC_L_MASK = 1 << 21
DESC_B_MASK = 1 << 22
DESC_G_MASK = 1 << 23

# QEMU HF_* bits in env->hflags
HF_CPL_MASK = 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_PE_MASK = 1 << 7
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15


def _measure() -> int:
    """Return the context header size; assert the CPUX86State offsets above."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.reg_write(UC_X86_REG_RAX, 0x1122334455667788)
    uc.reg_write(UC_X86_REG_FS_BASE, 0xA1A2A3A4A5A6A7A8)
    uc.reg_write(UC_X86_REG_GS_BASE, 0xB1B2B3B4B5B6B7B8)
    uc.reg_write(UC_X86_REG_GDTR, (0, 0xC1C2C3C4C5C6C7C8, 0x1234, 0))
    uc.reg_write(UC_X86_REG_IDTR, (0, 0xD1D2D3D4D5D6D7D8, 0x4321, 0))
    uc.reg_write(UC_X86_REG_CR3, 0x5000)
    b = bytes(uc.context_save())
    hdr = b.find(struct.pack("<Q", 0x1122334455667788))

    def at(v: int) -> int:
        return b.find(struct.pack("<Q", v)) - hdr

    expect = {
        0xA1A2A3A4A5A6A7A8: OFF_SEGS + R_FS * SEG_SIZE + 8,
        0xB1B2B3B4B5B6B7B8: OFF_SEGS + R_GS * SEG_SIZE + 8,
        0xC1C2C3C4C5C6C7C8: OFF_GDT + 8,
        0xD1D2D3D4D5D6D7D8: OFF_IDT + 8,
        0x5000: OFF_CR + 3 * 8,
    }
    for v, off in expect.items():
        if at(v) != off:
            raise RuntimeError(
                f"unicorn CPUX86State layout differs from fakekvm's table: {v:#x} at {at(v)}, expected {off}"
            )
    hflags = struct.unpack_from("<I", b, hdr + OFF_HFLAGS)[0]
    if not hflags & HF_LMA_MASK or not hflags & HF_CS64_MASK:
        raise RuntimeError(f"unicorn hflags not where expected (read {hflags:#x})")
    return hdr


CTX_HEADER = _measure()


def _measure_v_tpr() -> int:
    """Offset of ``env->v_tpr``, where QEMU keeps CR8 without an APIC (``helper_write_crN``).

    ``uc_reg_read(UC_X86_REG_CR8)`` does not see it; found by running
    ``mov %rax, %cr8`` twice and diffing the contexts.
    """
    from unicorn import UcError

    found: set[int] | None = None
    for value in (0x0A, 0x05):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, 0x10000)
        # mov $value, %rax; mov %rax, %cr8; hlt
        code = bytes([0x48, 0xC7, 0xC0, value, 0, 0, 0, 0x44, 0x0F, 0x22, 0xC0, 0xF4])
        uc.mem_write(0x1000, code)
        before = bytes(uc.context_save())
        try:
            uc.emu_start(0x1000, 0x1000 + len(code) - 1)
        except UcError:
            pass
        after = bytes(uc.context_save())
        offs = {
            i - CTX_HEADER
            for i in range(CTX_HEADER + OFF_CR + 40, len(after))
            if after[i] == value and before[i] != value
        }
        found = offs if found is None else found & offs
    if not found or len(found) != 1:
        raise RuntimeError(f"cannot locate env->v_tpr in unicorn's context (candidates {found})")
    return found.pop()


OFF_V_TPR = _measure_v_tpr()


def kvm_seg_to_flags(s: dict[str, int]) -> int:
    """kvm_segment attribute fields -> QEMU SegmentCache.flags."""
    return (
        (s["type"] & 15) << DESC_TYPE_SHIFT
        | (s["s"] & 1) << 12
        | (s["dpl"] & 3) << DESC_DPL_SHIFT
        | (s["present"] & 1) << 15
        | (s["avl"] & 1) << 20
        | (s["l"] & 1) << 21
        | (s["db"] & 1) << 22
        | (s["g"] & 1) << 23
    )


def flags_to_kvm_seg(selector: int, base: int, limit: int, flags: int) -> dict[str, int]:
    """QEMU SegmentCache -> kvm_segment field dict (``unusable`` from !present, as QEMU's kvm.c does)."""
    present = (flags >> 15) & 1
    return {
        "base": base,
        "limit": limit,
        "selector": selector,
        "type": (flags >> DESC_TYPE_SHIFT) & 15,
        "present": present,
        "dpl": (flags >> DESC_DPL_SHIFT) & 3,
        "db": (flags >> 22) & 1,
        "s": (flags >> 12) & 1,
        "l": (flags >> 21) & 1,
        "g": (flags >> 23) & 1,
        "avl": (flags >> 20) & 1,
        "unusable": 0,
        "padding": 0,
    }


def compute_hflags(hflags: int, cr0: int, eflags: int, segs: list[tuple[int, int, int, int]]) -> int:
    """Recompute the segment-derived hflags bits like QEMU's cpu_x86_load_seg_cache."""
    cs_flags = segs[R_CS][3]
    ss_flags = segs[R_SS][3]
    h = hflags & ~(HF_CPL_MASK | HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK | HF_ADDSEG_MASK)
    if hflags & HF_LMA_MASK and cs_flags & DESC_L_MASK:
        h |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK
    else:
        if cs_flags & DESC_B_MASK:
            h |= HF_CS32_MASK
        if ss_flags & DESC_B_MASK:
            h |= HF_SS32_MASK
    # CPL: real mode 0; vm86 3; else SS.DPL (QEMU keeps CPL in hflags from SS)
    if not cr0 & 1:
        cpl = 0
    elif eflags & (1 << 17):
        cpl = 3
    else:
        cpl = (ss_flags >> DESC_DPL_SHIFT) & 3
    h |= cpl
    if (not h & HF_CS64_MASK and (not cr0 & 1 or eflags & (1 << 17) or not h & HF_CS32_MASK)) or (not h & HF_CS64_MASK and (segs[R_DS][1] | segs[R_ES][1] | segs[R_SS][1]) != 0):
        h |= HF_ADDSEG_MASK
    return h
