"""Exception and software-interrupt delivery through the guest's IDT/IVT.

Unicorn never delivers an exception to the guest (its ``cpu_handle_exception``
calls ``UC_HOOK_INTR`` hooks instead of ``do_interrupt``), so the engine does
what the CPU does, following the SDM vol. 3A ch. 6 ("Interrupt and Exception
Handling") and QEMU's ``target/i386/tcg/seg_helper.c`` (``do_interrupt_real``,
``do_interrupt64``, ``do_interrupt_protected``):

* real mode: IVT entry ``idt.base + 4*vector``; push FLAGS, CS, IP; clear IF/TF/AC.
  KVM on this host ignores the IDT limit in real mode (measured: ``int3`` with
  limit 0 vectors through the IVT), and so does this code.
* long mode: 16-byte gates, IST and privilege-change stack switch from the
  64-bit TSS, SS:RSP/RFLAGS/CS:RIP[/error] pushed on a 16-byte-aligned stack.
* 32-bit protected mode: 8-byte interrupt/trap gates at the same privilege
  level, and a privilege change through the 32-bit TSS (SS0:ESP0 ...).

Failures while delivering escalate as the SDM's Table 6-5 says: contributory
(#DE #TS #NP #SS #GP) or #PF followed by contributory or #PF → #DF; a failure
while delivering #DF is a triple fault → ``ShutdownExit`` (KVM_EXIT_SHUTDOWN).
With ``cpu.pvm_emulation`` (this host's KVM, PVM, emulates ring-0 code and its
emulator is the one reporting): a software interrupt (``int3``/``int n``) in
ring 0 of protected/long mode gives ``KVM_EXIT_INTERNAL_ERROR`` (emulation
failure with the instruction bytes) even with a valid IDT, and a ``#UD`` in ring
0 first leaves the emulation-failure data in kvm_run (``cpu.on_emulation_arm``)
before the exception is delivered (all measured live). Without it (mainline):
software interrupts are delivered and fail like any other exception.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn.x86_const import UC_X86_REG_RFLAGS, UC_X86_REG_RIP, UC_X86_REG_RSP

from fakekvm.fake.cpu import layout, paging
from fakekvm.fake.cpu.exits import Exit, InternalErrorExit, ShutdownExit

if TYPE_CHECKING:
    from fakekvm.fake.cpu.engine import X86Cpu

DE, DB, NMI, BP, OF, BR, UD, NM, DF = range(9)
TS, NP, SS, GP, PF = 10, 11, 12, 13, 14
AC = 17
_HAS_ERROR = {DF, TS, NP, SS, GP, PF, AC}
_CONTRIBUTORY = {DE, TS, NP, SS, GP}

_IF = 1 << 9
_TF = 1 << 8
_NT = 1 << 14
_RF = 1 << 16
_VM = 1 << 17
_AC = 1 << 18


class _Fault(Exception):
    def __init__(self, vector: int, error_code: int = 0) -> None:
        super().__init__(vector)
        self.vector = vector
        self.error_code = error_code


def deliver(cpu: X86Cpu, vector: int, hook_rip: int | None, error_code: int | None) -> Exit | None:
    """Deliver ``vector``; None means the guest continues at its handler."""
    rip = cpu.get_regs()["rip"] if hook_rip is None else hook_rip
    soft = False
    return_rip = rip
    if hook_rip is not None and (vector in (BP, OF) or vector >= 32):
        # unicorn reports software interrupts with rip already past the
        # instruction (its exception_next_eip): int3/into are 1 byte, int n 2
        soft = True
        try:
            before = cpu.read_linear(_code_linear(cpu, rip - 2), 2, fetch=True, peek=True)
        except Exception:
            before = b""
        length = 2 if before[:1] == b"\xcd" and before[1:2] == bytes([vector & 0xFF]) else 1
        rip = hook_rip - length
        return_rip = hook_rip
    cr0 = cpu.get_sregs()["cr0"]
    cpl0_emulated = bool(cr0 & 1) and cpu.get_sregs()["cs"]["selector"] & 3 == 0
    if cpu.pvm_emulation and cpl0_emulated:
        if soft:
            # PVM's emulator cannot do INT n / INT3 for ring-0 code: emulation
            # failure, whatever the IDT says (measured live)
            cpu.uc.reg_write(UC_X86_REG_RIP, rip)
            return InternalErrorExit(1, cpu.fetch_insn_bytes(15), ())
        if vector == UD and cpu.on_emulation_arm is not None:
            # it tried to emulate the instruction first and left the
            # emulation-failure data in kvm_run before injecting #UD
            cpu.on_emulation_arm(cpu.fetch_insn_bytes(15))
    cur, err = vector, error_code
    first = True
    while True:
        try:
            _deliver_once(cpu, cur, return_rip, err if cur in _HAS_ERROR else None, soft and first, not soft)
            return None
        except _Fault as f:
            if soft and first and cpu.pvm_emulation and cr0 & 1:
                cpu.uc.reg_write(UC_X86_REG_RIP, rip)
                return InternalErrorExit(1, cpu.fetch_insn_bytes(15), ())
            first = False
            soft = False
            if cur == DF:
                # triple fault: rip on the instruction, RFLAGS.RF set (measured)
                cpu.uc.reg_write(UC_X86_REG_RFLAGS, cpu.get_regs()["rflags"] | _RF)
                cpu.uc.reg_write(UC_X86_REG_RIP, rip)
                if vector == UD and cpu.pvm_emulation and cpl0_emulated:
                    return ShutdownExit(cpu.fetch_insn_bytes(15))
                return ShutdownExit()
            if (cur in _CONTRIBUTORY or cur == PF) and (f.vector in _CONTRIBUTORY or f.vector == PF):
                cur, err = DF, 0
            else:
                cur, err = f.vector, f.error_code


def _code_linear(cpu: X86Cpu, rip: int) -> int:
    return rip if cpu.code_size() == 8 else cpu.segment("cs")[1] + rip


def _read(cpu: X86Cpu, lin: int, n: int) -> bytes:
    try:
        return cpu.read_linear(lin, n)
    except paging.PageFault as pf:
        cpu.uc.reg_write(layout_cr2(), pf.address)
        raise _Fault(PF, pf.error_code) from None
    except Exception:
        raise _Fault(GP, 0) from None


def _write(cpu: X86Cpu, lin: int, data: bytes) -> None:
    try:
        cpu.write_linear(lin, data)
    except paging.PageFault as pf:
        cpu.uc.reg_write(layout_cr2(), pf.address)
        raise _Fault(PF, pf.error_code) from None
    except Exception:
        raise _Fault(GP, 0) from None


def layout_cr2() -> int:
    from unicorn.x86_const import UC_X86_REG_CR2

    return UC_X86_REG_CR2


def _descriptor(cpu: X86Cpu, selector: int) -> tuple[int, int, int]:
    """(base, limit, flags) of a GDT/LDT code or data descriptor (raises #GP/#NP)."""
    if selector & ~3 == 0:
        raise _Fault(GP, 0)
    if selector & 4:
        table_base, table_limit = cpu.segment("ldt")[1], cpu.segment("ldt")[2]
    else:
        table_base, table_limit = cpu.dtable("gdt")
    idx = selector & ~7
    if idx + 7 > table_limit:
        raise _Fault(GP, selector & ~3)
    lo, hi = struct.unpack("<II", _read(cpu, table_base + idx, 8))
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    if hi & layout.DESC_G_MASK:
        limit = (limit << 12) | 0xFFF
    flags = hi & 0x00F0FF00
    if not flags & layout.DESC_P_MASK:
        raise _Fault(NP, selector & ~3)
    return base, limit, flags


def _deliver_once(cpu: X86Cpu, vector: int, return_rip: int, error: int | None, soft: bool, fault: bool) -> None:
    sregs = cpu.get_sregs()
    regs = cpu.get_regs()
    rflags = regs["rflags"]
    saved_flags = rflags | _RF if fault else rflags  # SDM 17.3.1.1: faults save RF=1
    cr0 = sregs["cr0"]
    if not cr0 & 1:
        _real(cpu, vector, return_rip, regs, sregs)
        return
    idt_base, idt_limit = sregs["idt"]["base"], sregs["idt"]["limit"]
    long_mode = bool(sregs["efer"] & paging.EFER_LMA)
    ext = 0 if soft else 1
    gate_size = 16 if long_mode else 8
    if vector * gate_size + gate_size - 1 > idt_limit:
        raise _Fault(GP, vector * 8 + 2 + ext)
    gate = _read(cpu, idt_base + vector * gate_size, gate_size)
    lo, hi = struct.unpack_from("<II", gate)
    gtype = (hi >> 8) & 0x1F
    gdpl = (hi >> 13) & 3
    cpl = sregs["cs"]["selector"] & 3
    if gtype not in (0x0E, 0x0F):
        raise _Fault(GP, vector * 8 + 2 + ext)
    if soft and gdpl < cpl:
        raise _Fault(GP, vector * 8 + 2)
    if not hi & (1 << 15):
        raise _Fault(NP, vector * 8 + 2 + ext)
    sel = lo >> 16
    offset = (lo & 0xFFFF) | (hi & 0xFFFF0000)
    ist = 0
    if long_mode:
        upper = struct.unpack_from("<I", gate, 8)[0]
        offset |= upper << 32
        ist = hi & 7
    cs_base, cs_limit, cs_flags = _descriptor(cpu, sel)
    new_cpl = (cs_flags >> layout.DESC_DPL_SHIFT) & 3
    if cs_flags & (1 << 10):  # conforming code
        new_cpl = cpl
    rsp = regs["rsp"]
    ss_name_sel = sregs["ss"]["selector"]
    frame: list[int] = []
    if long_mode:
        tr_base = sregs["tr"]["base"]
        switch = new_cpl < cpl
        if ist:
            new_rsp = struct.unpack("<Q", _read(cpu, tr_base + 0x24 + 8 * (ist - 1), 8))[0]
        elif switch:
            new_rsp = struct.unpack("<Q", _read(cpu, tr_base + 4 + 8 * new_cpl, 8))[0]
        else:
            new_rsp = rsp
        new_rsp &= ~0xF
        frame = [ss_name_sel, rsp, saved_flags, sregs["cs"]["selector"], return_rip]
        if error is not None:
            frame.append(error)
        data = b"".join(struct.pack("<Q", v) for v in reversed(frame))
        new_rsp -= len(data)
        _write(cpu, new_rsp, data)
        if switch:  # SS becomes a NULL selector with RPL = new CPL (SDM 6.14.4)
            cpu.load_segment("ss", new_cpl, 0, 0, (new_cpl << layout.DESC_DPL_SHIFT))
        cpu.load_segment("cs", (sel & ~3) | new_cpl, cs_base, cs_limit, cs_flags | (1 << 8))
    else:
        if new_cpl < cpl:
            tr_base = sregs["tr"]["base"]
            esp0, ss0 = struct.unpack("<IH", _read(cpu, tr_base + 4 + 8 * new_cpl, 6))
            ss_base, ss_limit, ss_flags = _descriptor(cpu, ss0)
            frame = [ss_name_sel, rsp & 0xFFFF_FFFF, saved_flags & 0xFFFF_FFFF, sregs["cs"]["selector"], return_rip]
            if error is not None:
                frame.append(error)
            data = b"".join(struct.pack("<I", v) for v in reversed(frame))
            new_rsp = esp0 - len(data)
            _write(cpu, ss_base + new_rsp, data)
            cpu.load_segment("ss", ss0, ss_base, ss_limit, ss_flags)
        else:
            frame = [saved_flags & 0xFFFF_FFFF, sregs["cs"]["selector"], return_rip]
            if error is not None:
                frame.append(error)
            data = b"".join(struct.pack("<I", v) for v in reversed(frame))
            ss_base = sregs["ss"]["base"]
            new_rsp = (rsp - len(data)) & 0xFFFF_FFFF
            _write(cpu, ss_base + new_rsp, data)
        cpu.load_segment("cs", (sel & ~3) | new_cpl, cs_base, cs_limit, cs_flags | (1 << 8))
    new_flags = rflags & ~(_TF | _NT | _RF | _VM)
    if gtype == 0x0E:
        new_flags &= ~_IF
    uc = cpu.uc
    uc.reg_write(UC_X86_REG_RSP, new_rsp)
    uc.reg_write(UC_X86_REG_RFLAGS, new_flags)
    uc.reg_write(UC_X86_REG_RIP, offset)


def _real(cpu: X86Cpu, vector: int, return_rip: int, regs: dict[str, int], sregs: dict[str, object]) -> None:
    idt = sregs["idt"]
    assert isinstance(idt, dict)
    ip, seg = struct.unpack("<HH", _read(cpu, idt["base"] + vector * 4, 4))
    ss = sregs["ss"]
    cs = sregs["cs"]
    assert isinstance(ss, dict) and isinstance(cs, dict)
    sp = regs["rsp"] & 0xFFFF
    data = struct.pack("<HHH", return_rip & 0xFFFF, cs["selector"], regs["rflags"] & 0xFFFF)
    sp = (sp - 6) & 0xFFFF
    _write(cpu, ss["base"] + sp, data)
    _sel, _base, limit, flags = cpu.segment("cs")
    cpu.load_segment("cs", seg, seg << 4, limit, flags)
    uc = cpu.uc
    uc.reg_write(UC_X86_REG_RSP, (regs["rsp"] & ~0xFFFF) | sp)
    uc.reg_write(UC_X86_REG_RFLAGS, regs["rflags"] & ~(_IF | _TF | _AC))
    uc.reg_write(UC_X86_REG_RIP, ip)
