"""Register state of the unicorn CPU: kvm_regs / kvm_sregs as dicts, hidden segment parts included.

Field names are those of ``struct kvm_regs`` / ``struct kvm_sregs`` /
``struct kvm_segment`` / ``struct kvm_dtable`` (``arch/x86/include/uapi/asm/kvm.h``),
so the vCPU converts bytes <-> dict with the abi and no renaming. The reset
values are what this host's KVM reports after KVM_CREATE_VCPU (measured, see
uapi.md 1.4; ``arch/x86/kvm/x86.c: kvm_vcpu_reset``). Segment registers are
loaded through a saved unicorn context (:mod:`fakekvm.fake.cpu.layout`), because
``uc_reg_write`` cannot set their hidden parts.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_R11,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

from fakekvm.fake.cpu import layout
from fakekvm.fake.cpu.uc_raw import BatchReader, BatchWriter

MSR_EFER = 0xC0000080

REG_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
_REG_IDS = (
    UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RSI,
    UC_X86_REG_RDI, UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_R8, UC_X86_REG_R9,
    UC_X86_REG_R10, UC_X86_REG_R11, UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14,
    UC_X86_REG_R15, UC_X86_REG_RIP, UC_X86_REG_RFLAGS,
)  # fmt: skip
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss")
_SEG_INDEX = {"es": layout.R_ES, "cs": layout.R_CS, "ss": layout.R_SS, "ds": layout.R_DS,
              "fs": layout.R_FS, "gs": layout.R_GS}  # fmt: skip



def reset_regs() -> dict[str, int]:
    """x86 reset values as this host's KVM reports them (uapi.md §1.4, measured live)."""
    r = dict.fromkeys(REG_NAMES, 0)
    r["rdx"] = 0x600
    r["rip"] = 0xFFF0
    r["rflags"] = 2
    return r


def _seg(base: int, limit: int, sel: int, type_: int, s: int, present: int = 1) -> dict[str, int]:
    return {"base": base, "limit": limit, "selector": sel, "type": type_, "present": present,
            "dpl": 0, "db": 0, "s": s, "l": 0, "g": 0, "avl": 0, "unusable": 0, "padding": 0}  # fmt: skip


def reset_sregs(apic_base: int = 0xFEE00900) -> dict[str, Any]:
    """KVM_GET_SREGS right after KVM_CREATE_VCPU on this host (measured live, PVM 6.18)."""
    d: dict[str, Any] = {"cs": _seg(0xFFFF0000, 0xFFFF, 0xF000, 11, 1)}
    for n in ("ds", "es", "fs", "gs", "ss"):
        d[n] = _seg(0, 0xFFFF, 0, 3, 1)
    d["tr"] = _seg(0, 0xFFFF, 0, 11, 0)
    d["ldt"] = _seg(0, 0xFFFF, 0, 2, 0)
    d["gdt"] = {"base": 0, "limit": 0xFFFF, "padding": [0, 0, 0]}
    d["idt"] = {"base": 0, "limit": 0xFFFF, "padding": [0, 0, 0]}
    d.update(cr0=0x60000010, cr2=0, cr3=0, cr4=0, cr8=0, efer=0, apic_base=apic_base)
    d["interrupt_bitmap"] = [0, 0, 0, 0]
    return d



class CpuState:
    """Mixin of `X86Cpu`: registers in and out."""

    uc: Any
    _regs_r: BatchReader
    _regs_w: BatchWriter
    _hdr_r: BatchReader  # RFLAGS, CR8
    apic_base: int
    _sregs_shadow: dict[str, dict[str, int]]
    _efer_cache: tuple[int, int, int]

    def get_regs(self) -> dict[str, int]:
        return dict(zip(REG_NAMES, self._regs_r.read(), strict=True))

    def set_regs(self, regs: dict[str, int]) -> None:
        vals = [regs[n] for n in REG_NAMES]
        vals[17] |= 2  # RFLAGS bit 1 reads as 1
        self._regs_w.write(vals)

    def get_sregs(self) -> dict[str, Any]:
        uc = self.uc
        b = bytes(uc.context_save())
        h = layout.CTX_HEADER
        out: dict[str, Any] = {}
        for name in SEG_NAMES:
            sel, base, limit, flags = layout.SEG.unpack_from(b, h + layout.OFF_SEGS + _SEG_INDEX[name] * 24)
            out[name] = self._seg_out(name, sel, base, limit, flags)
        for name, off in (("tr", layout.OFF_TR), ("ldt", layout.OFF_LDT)):
            sel, base, limit, flags = layout.SEG.unpack_from(b, h + off)
            out[name] = self._seg_out(name, sel, base, limit, flags)
        for name, off in (("gdt", layout.OFF_GDT), ("idt", layout.OFF_IDT)):
            _sel, base, limit, _flags = layout.SEG.unpack_from(b, h + off)
            out[name] = {"base": base, "limit": limit & 0xFFFF, "padding": [0, 0, 0]}
        cr = struct.unpack_from("<5Q", b, h + layout.OFF_CR)
        cr8 = b[h + layout.OFF_V_TPR] & 0xF
        out.update(cr0=cr[0], cr2=cr[2], cr3=cr[3], cr4=cr[4], cr8=cr8)
        out["efer"] = uc.msr_read(MSR_EFER)
        out["apic_base"] = self.apic_base
        out["interrupt_bitmap"] = [0, 0, 0, 0]
        return out

    def _seg_out(self, name: str, sel: int, base: int, limit: int, flags: int) -> dict[str, int]:
        shadow = self._sregs_shadow.get(name)
        if shadow is not None and shadow["_core"] == (sel, base, limit, flags):
            return {k: v for k, v in shadow.items() if k != "_core"}
        return layout.flags_to_kvm_seg(sel, base, limit, flags)

    def set_sregs(self, s: dict[str, Any]) -> None:
        """Load the whole of kvm_sregs, hidden segment parts included."""
        uc = self.uc
        efer = s["efer"]
        # Get out of long mode first, so that the CR0 write below recomputes LMA
        # from LME/PAE/PG: wrmsr cannot clear EFER.LMA, only a CR0.PG 1->0
        # transition does (QEMU cpu_x86_update_cr0).
        uc.msr_write(MSR_EFER, 1 << 8)
        uc.reg_write(UC_X86_REG_CR4, 1 << 5)
        uc.reg_write(UC_X86_REG_CR0, 1)
        uc.reg_write(UC_X86_REG_CR0, 0x8000_0001)
        uc.reg_write(UC_X86_REG_CR0, 1)
        uc.reg_write(UC_X86_REG_CR0, s["cr0"] & ~(1 << 31) & 0xFFFF_FFFF)
        uc.msr_write(MSR_EFER, efer & ~(1 << 10))
        uc.reg_write(UC_X86_REG_CR4, s["cr4"])
        uc.reg_write(UC_X86_REG_CR3, s["cr3"])
        uc.reg_write(UC_X86_REG_CR0, s["cr0"])
        uc.reg_write(UC_X86_REG_CR2, s["cr2"])
        self.apic_base = s["apic_base"]
        ctx = uc.context_save()
        base_addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        assert base_addr is not None
        h = base_addr + layout.CTX_HEADER
        raw = (ctypes.c_char * ctx.size).from_address(base_addr)
        mv = memoryview(raw).cast("B")
        segs: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * 6
        self._sregs_shadow = {}
        for name in (*SEG_NAMES, "tr", "ldt"):
            d = s[name]
            flags = layout.kvm_seg_to_flags(d)
            core = (d["selector"] & 0xFFFF, d["base"], d["limit"] & 0xFFFF_FFFF, flags)
            if name == "tr":
                off = layout.OFF_TR
            elif name == "ldt":
                off = layout.OFF_LDT
            else:
                off = layout.OFF_SEGS + _SEG_INDEX[name] * 24
                segs[_SEG_INDEX[name]] = core
            layout.SEG.pack_into(mv, layout.CTX_HEADER + off, *core)
            self._sregs_shadow[name] = {**{k: d[k] for k in layout.flags_to_kvm_seg(0, 0, 0, 0)}, "_core": core}  # type: ignore[dict-item]
        for name, off in (("gdt", layout.OFF_GDT), ("idt", layout.OFF_IDT)):
            layout.SEG.pack_into(mv, layout.CTX_HEADER + off, 0, s[name]["base"], s[name]["limit"] & 0xFFFF, 0)
        hflags = struct.unpack_from("<I", mv, layout.CTX_HEADER + layout.OFF_HFLAGS)[0]
        rflags = self._regs_r.read()[17]
        hflags = layout.compute_hflags(hflags, s["cr0"], rflags, segs)
        struct.pack_into("<I", mv, layout.CTX_HEADER + layout.OFF_HFLAGS, hflags)
        mv[layout.CTX_HEADER + layout.OFF_V_TPR] = s["cr8"] & 0xF  # CR8 lives in env->v_tpr
        del mv, raw
        _ = h
        uc.context_restore(ctx)
        self._flush_tlb()
        self._efer_cache = (-1, -1, 0)

    def load_segment(self, name: str, selector: int, base: int, limit: int, flags: int) -> None:
        """Set one segment register's visible and hidden parts (used by exception delivery)."""
        uc = self.uc
        ctx = uc.context_save()
        base_addr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        raw = (ctypes.c_char * ctx.size).from_address(base_addr)
        mv = memoryview(raw).cast("B")
        h = layout.CTX_HEADER
        idx = _SEG_INDEX[name]
        layout.SEG.pack_into(mv, h + layout.OFF_SEGS + idx * 24, selector, base, limit, flags)
        segs = [layout.SEG.unpack_from(mv, h + layout.OFF_SEGS + i * 24) for i in range(6)]
        hflags = struct.unpack_from("<I", mv, h + layout.OFF_HFLAGS)[0]
        cr0 = struct.unpack_from("<Q", mv, h + layout.OFF_CR)[0]
        rflags = self._regs_r.read()[17]
        struct.pack_into("<I", mv, h + layout.OFF_HFLAGS, layout.compute_hflags(hflags, cr0, rflags, segs))
        del mv, raw
        uc.context_restore(ctx)
        self._sregs_shadow.pop(name, None)

    def segment(self, name: str) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of a segment register, from unicorn's state."""
        b = bytes(self.uc.context_save())
        off = {"tr": layout.OFF_TR, "ldt": layout.OFF_LDT}.get(name)
        if off is None:
            off = layout.OFF_SEGS + _SEG_INDEX[name] * 24
        return layout.SEG.unpack_from(b, layout.CTX_HEADER + off)

    def dtable(self, name: str) -> tuple[int, int]:
        b = bytes(self.uc.context_save())
        off = layout.OFF_GDT if name == "gdt" else layout.OFF_IDT
        _s, base, limit, _f = layout.SEG.unpack_from(b, layout.CTX_HEADER + off)
        return base, limit

    def _flush_tlb(self) -> None:
        # uc_ctl_flush_tlb (UC_CTL_TLB_FLUSH, write, no args); the binding lacks a wrapper
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _tpr_ctx(self) -> tuple[Any, int]:
        """A reusable context (saved now) and the address of its env->v_tpr byte."""
        ctx = getattr(self, "_ctx_tpr", None)
        if ctx is None:
            ctx = self._ctx_tpr = self.uc.context_save()
        else:
            self.uc.context_update(ctx)
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value or 0
        return ctx, base + layout.CTX_HEADER + layout.OFF_V_TPR

    @property
    def cr8(self) -> int:
        """CR8 (TPR) now: QEMU keeps it in env->v_tpr, which uc_reg_read cannot see."""
        _ctx, addr = self._tpr_ctx()
        return ctypes.c_uint8.from_address(addr).value & 0xF

    @cr8.setter
    def cr8(self, v: int) -> None:
        ctx, addr = self._tpr_ctx()
        b = ctypes.c_uint8.from_address(addr)
        if b.value != v & 0xF:
            b.value = v & 0xF
            self.uc.context_restore(ctx)

    def rflags(self) -> int:
        return self._hdr_r.read()[0]

    def rflags_cr8(self) -> tuple[int, int]:
        """(RFLAGS, CR8): what the kvm_run header needs."""
        return self._hdr_r.read()[0], self.cr8

