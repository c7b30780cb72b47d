"""The unicorn CPU engine on its own, with a stub second stage (no KVM objects)."""

from __future__ import annotations

import struct
import threading

import pytest

from fakekvm.fake.cpu import (
    HltExit,
    InternalErrorExit,
    Interrupted,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
    X86Cpu,
)
from fakekvm.fake.cpu.testing import (
    CODE,
    PT,
    STACK_TOP,
    StubMemory,
    assemble,
    long_mode_image,
    real_mode_sregs,
)


def real_cpu(src: str, mem_size: int = 0x10000) -> tuple[StubMemory, X86Cpu]:
    mem = StubMemory()
    mem.add(0, mem_size)
    mem.write(0x1000, assemble(src, 16))
    cpu = X86Cpu(mem.translate)
    cpu.set_sregs(real_mode_sregs())
    r = cpu.get_regs()
    r["rip"] = 0x1000
    cpu.set_regs(r)
    return mem, cpu


def long_cpu(src: str, user: bool = False, **kw: object) -> tuple[StubMemory, X86Cpu]:
    mem = StubMemory()
    mem.add(0, 0x200000)
    img, s = long_mode_image(user=user, **kw)  # type: ignore[arg-type]
    for a, b in img.items():
        mem.write(a, b)
    mem.write(CODE, assemble(src, 64))
    cpu = X86Cpu(mem.translate)
    cpu.set_sregs(s)
    r = cpu.get_regs()
    r["rip"] = CODE
    r["rsp"] = STACK_TOP - 0x1000
    cpu.set_regs(r)
    return mem, cpu


def test_real_mode_hello_out_then_hlt() -> None:
    _mem, cpu = real_cpu(
        """
        mov $0x3f8, %dx
        mov $'H', %al
        out %al, %dx
        mov $'i', %al
        out %al, %dx
        hlt
        """
    )
    assert cpu.run() == IoExit(1, 1, 0x3F8, 1, b"H")
    assert cpu.run() == IoExit(1, 1, 0x3F8, 1, b"i")
    assert cpu.run() == HltExit()
    # rip is right after hlt, as KVM reports it
    assert cpu.get_regs()["rip"] == 0x1000 + 3 + 2 + 1 + 2 + 1 + 1


def test_out_stops_right_after_the_instruction() -> None:
    # the increments after `out` are in the same translation block: a lazy stop
    # would run them before the exit
    _mem, cpu = real_cpu("mov $0x10, %dx\nout %al, %dx\ninc %bx\ninc %bx\nhlt")
    assert isinstance(cpu.run(), IoExit)
    assert cpu.get_regs()["rbx"] == 0
    assert cpu.get_regs()["rip"] == 0x1004


@pytest.mark.parametrize(("size", "insn_in", "insn_out", "value"), [
    (1, "in %dx, %al", "out %al, %dx", 0xA5),
    (2, "in %dx, %ax", "out %ax, %dx", 0xBEEF),
    (4, "in %dx, %eax", "out %eax, %dx", 0xDEADBEEF),
])  # fmt: skip
def test_port_io_sizes(size: int, insn_in: str, insn_out: str, value: int) -> None:
    _mem, cpu = real_cpu(f"mov $0x1234, %dx\n{insn_in}\n{insn_out}\nhlt")
    ex = cpu.run()
    assert ex == IoExit(0, size, 0x1234, 1, bytes(size))
    start = cpu.get_regs()["rip"]
    assert start == 0x1003  # an IN exit leaves rip on the instruction (live)
    ex = cpu.run(value.to_bytes(size, "little"))
    assert ex == IoExit(1, size, 0x1234, 1, value.to_bytes(size, "little"))
    assert cpu.run() == HltExit()


def test_rep_outsb_is_one_exit_per_element_and_rep_insb_one_batch() -> None:
    mem, cpu = real_cpu(
        """
        mov $0x3f8, %dx
        mov $0x2000, %si
        mov $3, %cx
        rep outsb
        mov $0x3000, %di
        mov $5, %cx
        rep insb
        hlt
        """
    )
    mem.write(0x2000, b"abc")
    for i, ch in enumerate(b"abc"):
        assert cpu.run() == IoExit(1, 1, 0x3F8, 1, bytes([ch]))
        r = cpu.get_regs()
        assert (r["rsi"], r["rcx"]) == (0x2001 + i, 2 - i)
    ex = cpu.run()
    assert ex == IoExit(0, 1, 0x3F8, 5, bytes(5))
    r = cpu.get_regs()
    assert (r["rdi"], r["rcx"]) == (0x3000, 5)  # untouched until completion
    assert cpu.run(b"VWXYZ") == HltExit()
    assert mem.read(0x3000, 6) == b"VWXYZ\0"
    r = cpu.get_regs()
    assert (r["rdi"], r["rcx"]) == (0x3005, 0)


def test_rep_insw_batches_follow_kvm_page_rule() -> None:
    # pio_in_emulated: n = min(bytes left in page, 1024/size, rcx) -- bytes vs items quirk
    mem, cpu = real_cpu("mov $0x3ffe, %di\nmov $600, %cx\nrep insw\nhlt")
    ex = cpu.run()
    assert isinstance(ex, IoExit) and (ex.size, ex.count) == (2, 2)
    ex = cpu.run(b"\x01\x02\x03\x04")
    assert isinstance(ex, IoExit) and ex.count == 512
    ex = cpu.run(bytes(1024))
    assert isinstance(ex, IoExit) and ex.count == 600 - 514
    assert cpu.run(bytes(2 * 86)) == HltExit()
    assert mem.read(0x3FFE, 4) == b"\x01\x02\x03\x04"


def test_mmio_read_data_delivered_on_reentry_and_write_captured() -> None:
    _mem, cpu = real_cpu(
        """
        mov $0x2000, %bx
        mov %bx, %ds
        movl $0x11223344, %ds:0x10
        mov %ds:0x20, %ecx
        hlt
        """
    )
    assert cpu.run() == MmioExit(0x20010, 4, True, bytes.fromhex("44332211"))
    assert cpu.run() == MmioExit(0x20020, 4, False, b"")
    assert cpu.get_regs()["rcx"] == 0
    assert cpu.run(bytes.fromhex("a1a2a3a4")) == HltExit()
    assert cpu.get_regs()["rcx"] == 0xA4A3A2A1


def test_readonly_slot_write_is_mmio_write_read_is_ram() -> None:
    mem = StubMemory()
    mem.add(0, 0x10000)
    ro = mem.add(0x10000, 0x1000, readonly=True)
    ro.map[0:4] = b"\x78\x56\x34\x12"
    mem.write(0x1000, assemble("mov $0x1000, %bx\nmov %bx, %ds\nmov %ds:0, %eax\nmovl $7, %ds:4\nhlt", 16))
    cpu = X86Cpu(mem.translate)
    cpu.set_sregs(real_mode_sregs())
    r = cpu.get_regs()
    r["rip"] = 0x1000
    cpu.set_regs(r)
    assert cpu.run() == MmioExit(0x10004, 4, True, b"\x07\0\0\0")
    assert cpu.get_regs()["rax"] == 0x12345678
    assert cpu.run() == HltExit()
    assert ro.map[4:8] == b"\0\0\0\0"


def test_memory_fault_exit() -> None:
    mem, cpu = real_cpu("mov 0x5000, %ax\nhlt")
    mem.fault_pages.add(0x5000)
    ex = cpu.run()
    assert ex == MemoryFaultExit(0x5000, 0x1000, 0)
    assert cpu.get_regs()["rip"] == 0x1000  # the access is retried on re-entry
    mem.fault_pages.clear()
    assert cpu.run() == HltExit()


def test_long_mode_cpl0_paging_sets_accessed_and_dirty() -> None:
    mem, cpu = long_cpu("mov $0x5000, %rbx\nmovq $0x1234, (%rbx)\nmov 0x6000, %rcx\nhlt")
    assert cpu.run() == HltExit()
    pte = lambda i: struct.unpack("<Q", mem.read(PT + 8 * i, 8))[0]  # noqa: E731
    assert pte(5) & 0x60 == 0x60  # A and D
    assert pte(6) & 0x60 == 0x20  # read only: A
    assert pte(7) & 0x60 == 0  # untouched
    assert mem.read(0x5000, 8) == (0x1234).to_bytes(8, "little")
    s = cpu.get_sregs()
    assert s["efer"] == 0x500 and s["cs"]["l"] == 1


def test_long_mode_cpl3_out_exits() -> None:
    _mem, cpu = long_cpu("mov $0x3f8, %dx\nmov $0x55, %al\nout %al, %dx\njmp .", user=True)
    # IOPL 3 so that CPL3 may do port I/O
    r = cpu.get_regs()
    r["rflags"] = 0x3002
    cpu.set_regs(r)
    assert cpu.run() == IoExit(1, 1, 0x3F8, 1, b"\x55")
    assert cpu.get_sregs()["cs"]["selector"] & 3 == 3


def test_cpl3_access_to_supervisor_page_faults() -> None:
    # user code, but the page tables lack U/S: the first fetch faults; no IDT -> shutdown
    _mem, cpu = long_cpu("nop\nhlt", user=True, pt_user=False)
    assert cpu.run() == ShutdownExit()


def test_ud2_without_idt_is_triple_fault() -> None:
    _mem, cpu = long_cpu("ud2")
    ex = cpu.run()
    assert isinstance(ex, ShutdownExit)
    assert ex.emulation_insn[:2] == b"\x0f\x0b"


def test_int3_without_idt_is_internal_error_with_insn_bytes() -> None:
    _mem, cpu = long_cpu("int3\nhlt")
    ex = cpu.run()
    assert isinstance(ex, InternalErrorExit)
    assert ex.suberror == 1 and ex.insn_bytes[:2] == b"\xcc\xf4" and len(ex.insn_bytes) == 15
    assert cpu.get_regs()["rip"] == CODE


IDT = 0x7000


def _idt_gate(handler: int, sel: int = 8) -> bytes:
    lo = (handler & 0xFFFF) | (sel << 16)
    hi = (handler & 0xFFFF0000) | (0x8E << 8)
    return struct.pack("<IIII", lo, hi, handler >> 32, 0)


def test_guest_page_fault_delivered_through_idt() -> None:
    handler = CODE + 0x800
    mem, cpu = long_cpu(
        """
        mov $0x10, %al
        mov 0x300123, %rax   # above the 2 MiB identity map: #PF
        hlt
        """
    )
    mem.write(handler, assemble("mov %cr2, %rbx\npop %rcx\nmov $0x3f8, %dx\nout %al, %dx\nhlt", 64))
    mem.write(IDT + 14 * 16, _idt_gate(handler))
    s = cpu.get_sregs()
    s["idt"] = {"base": IDT, "limit": 256 * 16 - 1, "padding": [0, 0, 0]}
    cpu.set_sregs(s)
    ex = cpu.run()
    assert isinstance(ex, IoExit)
    r = cpu.get_regs()
    assert r["rbx"] == 0x300123  # exact CR2
    assert r["rcx"] == 0  # error code: not present, read, supervisor
    # the frame: return rip = the faulting instruction
    frame = struct.unpack("<4Q", mem.read(r["rsp"], 32))
    assert frame[0] == CODE + 2 and frame[1] == 8


def test_int_n_delivered_through_idt_returns_after_instruction() -> None:
    """Mainline semantics (pvm_emulation off): INT n goes through its gate."""
    handler = CODE + 0x800
    mem, cpu = long_cpu("int $0x40\nmov $0x3f8, %dx\nout %al, %dx\nhlt")
    cpu.pvm_emulation = False
    mem.write(handler, assemble("mov $0x99, %al\niretq", 64))
    mem.write(IDT + 0x40 * 16, _idt_gate(handler))
    s = cpu.get_sregs()
    s["idt"] = {"base": IDT, "limit": 256 * 16 - 1, "padding": [0, 0, 0]}
    cpu.set_sregs(s)
    assert cpu.run() == IoExit(1, 1, 0x3F8, 1, b"\x99")


def test_invalidate_makes_the_next_touch_translate_again() -> None:
    mem, cpu = real_cpu("mov 0x5000, %ax\nmov $0x10, %dx\nout %al, %dx\nmov 0x5000, %ax\nhlt")
    mem.record = True
    assert isinstance(cpu.run(), IoExit)
    assert any(g == 0x5000 for g, _w, _x in mem.log)
    mem.log.clear()
    cpu.invalidate(0x5000, 0x6000)
    assert cpu.run() == HltExit()
    assert any(g == 0x5000 for g, _w, _x in mem.log)


def test_memslots_changed_remaps_before_next_instruction() -> None:
    mem, cpu = real_cpu("mov 0x5000, %ax\nmov $0x10, %dx\nout %al, %dx\nmov 0x5000, %ax\nhlt")
    mem.write(0x5000, b"\x11\x22")
    assert isinstance(cpu.run(), IoExit)
    assert cpu.get_regs()["rax"] & 0xFFFF == 0x2211
    # replace the slot with new memory holding other bytes (and the same code)
    old = mem.slots[0]
    mem.slots = []
    new = mem.add(0, 0x10000)
    new.map[:] = old.map[:]
    new.map[0x5000:0x5002] = b"\x33\x44"
    cpu.memslots_changed()
    assert cpu.run() == HltExit()
    assert cpu.get_regs()["rax"] & 0xFFFF == 0x4433


def test_kick_from_another_thread_interrupts_a_spinning_guest() -> None:
    _mem, cpu = real_cpu("1: jmp 1b")
    started = threading.Event()
    result: list[object] = []

    def vcpu() -> None:
        started.set()
        result.append(cpu.run())

    t = threading.Thread(target=vcpu)
    t.start()
    started.wait()
    cpu.kick()
    t.join(timeout=30)
    assert not t.is_alive()
    assert result == [Interrupted()]


def test_kick_before_run_is_pending_like_a_blocked_signal() -> None:
    _mem, cpu = real_cpu("hlt")
    cpu.kick()
    assert cpu.run() == Interrupted()
    assert cpu.run() == HltExit()


def test_sregs_round_trip_keeps_hidden_segment_state() -> None:
    _mem, cpu = real_cpu("hlt")
    s = real_mode_sregs()
    s["ds"] = {**s["ds"], "base": 0x12340, "selector": 0x1234, "limit": 0xFFFF}
    s["fs"] = {**s["fs"], "base": 0xABC00000, "selector": 0, "unusable": 0}
    cpu.set_sregs(s)
    got = cpu.get_sregs()
    assert got["ds"] == s["ds"]
    assert got["fs"] == s["fs"]
    assert got["cr0"] == s["cr0"]


def test_int_n_in_ring0_is_emulation_failure_on_pvm() -> None:
    handler = CODE + 0x800
    mem, cpu = long_cpu("int $0x40\nhlt")
    mem.write(handler, assemble("hlt", 64))
    mem.write(IDT + 0x40 * 16, _idt_gate(handler))
    s = cpu.get_sregs()
    s["idt"] = {"base": IDT, "limit": 256 * 16 - 1, "padding": [0, 0, 0]}
    cpu.set_sregs(s)
    ex = cpu.run()
    assert isinstance(ex, InternalErrorExit) and ex.insn_bytes[:3] == b"\xcd\x40\xf4"
    assert cpu.get_regs()["rip"] == CODE


def test_host_rewrite_of_guest_code_between_runs_is_seen() -> None:
    # the loop body's immediate is patched by the host after the first exit
    mem, cpu = real_cpu("1: mov $0x11, %al\nmov $0x10, %dx\nout %al, %dx\njmp 1b")
    assert cpu.run() == IoExit(1, 1, 0x10, 1, b"\x11")
    mem.write(0x1001, b"\x22")  # mov $0x22, %al
    assert cpu.run() == IoExit(1, 1, 0x10, 1, b"\x22")
