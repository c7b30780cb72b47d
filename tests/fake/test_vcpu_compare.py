"""The same guests on the live KVM and on FakeKernel: exits, kvm_run bytes, registers, memory.

Each test drives one small guest through the `Kernel` seam with
:class:`fakekvm.fake.cpu.testing.Guest` on both kernels and compares, exit by
exit, the KVM_RUN result, the kvm_run header + exit arm (bytes 0..96), the PIO
data bytes, KVM_GET_REGS, and at the end KVM_GET_SREGS and guest memory.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest

from fakekvm.abi import kvm as K
from fakekvm.abi import mman as M
from fakekvm.fake import FakeKernel
from fakekvm.fake.cpu.testing import (
    CODE,
    STACK_TOP,
    Guest,
    assemble,
    long_mode_image,
    real_mode_sregs,
)
from fakekvm.kernel.real import RealKernel

pytestmark = pytest.mark.real_kernel

Respond = Callable[[Guest, int], None]


def _respond(g: Guest, step: int) -> None:
    """Userspace answers: IN data at data_offset, MMIO read data in mmio.data."""
    reason = int.from_bytes(g.run[8:12], "little")
    if reason == K.KVM_EXIT_IO and g.run[32] == K.KVM_EXIT_IO_IN:
        size, count = g.run[33], int.from_bytes(g.run[36:40], "little")
        g.run[4096 : 4096 + size * count] = bytes((0x40 + step + i) & 0xFF for i in range(size * count))
    if reason == K.KVM_EXIT_MMIO and not g.run[52]:
        g.run[40:48] = bytes((0xA0 + step + i) & 0xFF for i in range(8))


def trace(
    k: Any, setup: Callable[[Guest], None], steps: int = 40, mem_size: int = 0x200000, **kw: Any
) -> list[Any]:
    g = Guest(k, mem_size, **kw)
    try:
        setup(g)
        out: list[Any] = []
        for step in range(steps):
            rc, reason = g.kvm_run()
            arm = bytes(g.run[0:96])
            pio = b""
            if reason == K.KVM_EXIT_IO:
                size, count = g.run[33], int.from_bytes(g.run[36:40], "little")
                pio = bytes(g.run[4096 : 4096 + size * count])
            out.append((step, rc, reason, arm.hex(), pio.hex(), g.get_regs()))
            if rc or reason not in (K.KVM_EXIT_IO, K.KVM_EXIT_MMIO):
                break
            _respond(g, step)
        out.append(("sregs", g.get_sregs_raw().hex()))
        out.append(("mem", g.read(0, 0x20000).hex()))
        return out
    finally:
        g.close()


def compare(setup: Callable[[Guest], None], **kw: Any) -> list[Any]:
    real = trace(RealKernel(), setup, **kw)
    fk = FakeKernel(profile="6.18-pvm")
    try:
        fake = trace(fk, setup, **kw)
    finally:
        fk.shutdown()
    for r, f in zip(real, fake, strict=False):
        assert f == r, f"first difference:\n real {r}\n fake {f}"
    assert len(fake) == len(real)
    return real


def real_mode(src: str) -> Callable[[Guest], None]:
    code = assemble(src, 16)

    def setup(g: Guest) -> None:
        g.load({0x1000: code, 0x2000: b"hello, world"}, real_mode_sregs(), 0x1000)

    return setup


def long_mode(src: str, user: bool = False, idt: dict[str, Any] | None = None) -> Callable[[Guest], None]:
    code = assemble(src, 64)

    def setup(g: Guest) -> None:
        img, s = long_mode_image(user=user)
        img[CODE] = code
        if idt is not None:
            s["idt"] = idt
        g.load(img, s, CODE, STACK_TOP - 0x1000)

    return setup


def test_real_mode_port_io_all_sizes_and_hlt() -> None:
    t = compare(real_mode(
        """
        mov $0x3f8, %dx
        mov $0x41, %al
        out %al, %dx
        mov $0x1234, %ax
        out %ax, %dx
        mov $0x12345678, %eax
        out %eax, %dx
        in %dx, %al
        in %dx, %ax
        in %dx, %eax
        mov %eax, 0x3000
        hlt
        """
    ))  # fmt: skip
    assert [s[2] for s in t[:-2]] == [K.KVM_EXIT_IO] * 6 + [K.KVM_EXIT_HLT]


def test_real_mode_string_io() -> None:
    t = compare(real_mode(
        """
        mov $0x3f8, %dx
        mov $0x2000, %si
        mov $5, %cx
        cld
        rep outsb
        mov $0x3000, %di
        mov $5, %cx
        rep insb
        mov $0x2ffe, %si
        mov $3, %cx
        rep outsw
        mov $0x3ffe, %di
        mov $600, %cx
        rep insw
        hlt
        """
    ))  # fmt: skip
    assert t[-3][2] == K.KVM_EXIT_HLT


def test_real_mode_mmio_read_write() -> None:
    compare(real_mode(
        """
        mov $0x1234, %ax
        mov %ax, %ds:0xf000
        mov $0x2000, %bx
        mov %bx, %ds
        movl $0x11223344, %ds:0x10
        mov %ds:0x20, %ebx
        add %ds:0x30, %ecx
        movw $0x5566, %ds:0x41
        movb %ds:0x52, %dl
        xor %ax, %ax
        mov %ax, %ds
        mov %ebx, 0x3000
        hlt
        """
    ), mem_size=0x10000)  # fmt: skip


def test_long_mode_cpl0_io_mmio_hlt() -> None:
    t = compare(long_mode(
        """
        mov $0x3f8, %dx
        mov $0x42, %al
        out %al, %dx
        movq $0x1234, 0x5000
        mov 0x5000, %rcx
        in %dx, %eax
        mov %eax, 0x5008
        hlt
        """
    ))  # fmt: skip
    assert t[-3][2] == K.KVM_EXIT_HLT


def test_long_mode_mmio_outside_slot() -> None:
    # 4 KiB page 0x1ff of the 2 MiB identity map, outside a 1 MiB slot: MMIO
    compare(long_mode(
        """
        movq $0x55aa, 0x1ff008
        mov 0x1ff010, %rax
        mov %rax, 0x5000
        hlt
        """
    ), mem_size=0x100000)  # fmt: skip


def test_long_mode_cpl3_mmio_then_privileged_insn_shutdown() -> None:
    # CPL3 code runs natively on this host: a store outside RAM is an MMIO exit,
    # `out` with IOPL 0 (PVM drops IOPL 3 from KVM_SET_REGS) and `hlt` are #GP,
    # and with no IDT that is a triple fault
    t = compare(long_mode("movq $0x77, 0x1ff000\nmov 0x5000, %rax\nhlt", user=True), mem_size=0x100000)
    assert [s[2] for s in t[:-2]] == [K.KVM_EXIT_MMIO, K.KVM_EXIT_SHUTDOWN]


def test_ud2_without_idt_shutdown() -> None:
    t = compare(long_mode("ud2\nhlt"))
    assert t[0][2] == K.KVM_EXIT_SHUTDOWN


def test_page_fault_without_idt_shutdown() -> None:
    t = compare(long_mode("mov 0x300000, %rax\nhlt"))
    assert t[0][2] == K.KVM_EXIT_SHUTDOWN


def test_int3_without_idt_internal_error() -> None:
    t = compare(long_mode("int3\nhlt"))
    assert t[0][2] == K.KVM_EXIT_INTERNAL_ERROR


def test_readonly_slot_write_is_mmio() -> None:
    t = compare(
        long_mode("mov 0x100000, %rax\nmovl $7, 0x100008\nmov %rax, 0x5000\nhlt"),
        mem_size=0x100000,
        readonly_slot=(0x100000, 0x1000),
    )
    assert t[0][2] == K.KVM_EXIT_MMIO


def _both() -> list[Any]:
    return [RealKernel(), FakeKernel(profile="6.18-pvm")]


def test_reset_state_bytes_and_vcpu_ioctls() -> None:
    results = []
    for k in _both():
        g = Guest(k, 0x10000)
        regs = bytearray(144)
        k.ioctl(g.vcpu, K.KVM_GET_REGS, regs)
        sregs = g.get_sregs_raw()
        mp = bytearray(4)
        k.ioctl(g.vcpu, K.KVM_GET_MP_STATE, mp)
        ev = bytearray(64)
        k.ioctl(g.vcpu, K.KVM_GET_VCPU_EVENTS, ev)
        errs = []
        for req in (0xAE7F, K.KVM_CREATE_VM, K.KVM_CHECK_EXTENSION, K.KVM_SET_USER_MEMORY_REGION):
            try:
                k.ioctl(g.vcpu, req, bytearray(64))
                errs.append(0)
            except OSError as e:
                errs.append(e.errno or 0)
        maps = []
        for ln, off in ((12288, 0), (16384, 0), (4096, 8192)):
            try:
                m = k.mmap(g.vcpu, ln, M.PROT_READ | M.PROT_WRITE, M.MAP_SHARED, off)
                k.munmap(m.address, ln)
                maps.append(0)
            except OSError as e:
                maps.append(e.errno or 0)
        hdr = bytes(g.run[0:32])
        results.append((bytes(regs), sregs, bytes(mp), bytes(ev), errs, maps, hdr))
        g.close()
        k.shutdown()
    assert results[1] == results[0]
    assert results[0][4] == [errno.EINVAL] * 4


def test_immediate_exit_leaves_exit_reason_stale() -> None:
    results = []
    for k in _both():
        g = Guest(k, 0x10000)
        g.load({0x1000: assemble("mov $0x10, %dx\nout %al, %dx\nhlt", 16)}, real_mode_sregs(), 0x1000)
        first = g.kvm_run()
        g.run[1] = 1
        second = g.kvm_run()
        g.run[1] = 0
        third = g.kvm_run()
        results.append((first, second, third, bytes(g.run[0:64])))
        g.close()
        k.shutdown()
    assert results[1] == results[0]
    assert results[0][1] == (-errno.EINTR, K.KVM_EXIT_IO)


def _mode_switch_setup(g: Guest) -> None:
    """Real mode -> (lgdt, CR0.PE, far jump) 32-bit protected mode, then CR4/CR3 writes.

    (Going on to long mode from the guest is not compared: this host's PVM
    answers the guest's ``wrmsr`` of EFER.LME with #GP, a triple fault here.)
    """
    img, _s = long_mode_image()  # page tables at 0x1000..0x4fff identity-map 2 MiB
    gdt = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF]  # 0x08 code64, 0x10 data, 0x18 code32
    img[0x800] = b"".join(d.to_bytes(8, "little") for d in gdt)
    img[0x7F0] = (len(gdt) * 8 - 1).to_bytes(2, "little") + (0x800).to_bytes(4, "little")
    img[0x10000] = assemble(
        """
        cli
        lgdtl 0x7f0
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x18, $0x10100
        """,
        16,
    )
    img[0x10100] = assemble(
        """
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x3f8, %dx
        mov $0x32, %al
        out %al, %dx
        mov %cr4, %eax
        or $0x20, %eax
        mov %eax, %cr4
        mov $0x1000, %eax
        mov %eax, %cr3
        movl $0xcafe, 0x3000
        mov $0x6000, %esp
        push %eax
        hlt
        """,
        32,
    )
    s = real_mode_sregs()
    s["cs"] = {**s["cs"], "base": 0x10000, "selector": 0x1000}
    g.load(img, s, 0)


def test_guest_switches_real_to_protected_to_long_mode() -> None:
    t = compare(_mode_switch_setup)
    assert [s[2] for s in t[:-2]] == [K.KVM_EXIT_IO, K.KVM_EXIT_HLT]


IDT = 0x7000


def _gate64(handler: int, sel: int = 8, type_: int = 0x8E) -> bytes:
    lo = (handler & 0xFFFF) | (sel << 16)
    hi = (handler & 0xFFFF0000) | (type_ << 8)
    return (lo | hi << 32).to_bytes(8, "little") + (handler >> 32).to_bytes(8, "little")


def _idt_guest(src: str, handlers: dict[int, str]) -> Callable[[Guest], None]:
    code = assemble(src, 64)

    def setup(g: Guest) -> None:
        img, s = long_mode_image()
        img[CODE] = code
        idt = bytearray(256 * 16)
        for i, (vector, hsrc) in enumerate(handlers.items()):
            h = CODE + 0x1000 * (i + 1)
            img[h] = assemble(hsrc, 64)
            idt[vector * 16 : vector * 16 + 16] = _gate64(h)
        img[IDT] = bytes(idt)
        s["idt"] = {"base": IDT, "limit": len(idt) - 1, "padding": [0, 0, 0]}
        g.load(img, s, CODE, STACK_TOP - 0x1000)

    return setup


def test_page_fault_delivered_through_idt() -> None:
    handler = "mov %cr2, %rbx\nmov (%rsp), %rcx\nmov $0x3f8, %dx\nout %al, %dx\nhlt"
    t = compare(_idt_guest("mov $0x21, %al\nmov 0x300123, %rax\nhlt", {14: handler}))
    assert t[0][2] == K.KVM_EXIT_IO
    assert t[0][5]["rbx"] == 0x300123


def test_ud_delivered_through_idt_int_n_is_emulation_failure() -> None:
    # ring-0 code is emulated on this host: #UD is injected (after the emulator
    # left its failure data in kvm_run) but INT n is an emulation failure even
    # with a valid IDT gate
    ud = "mov $0x3f8, %dx\nmov $0x06, %al\nout %al, %dx\naddq $2, (%rsp)\niretq"
    soft = "mov $0x3f8, %dx\nmov $0x40, %al\nout %al, %dx\niretq"
    t = compare(_idt_guest("ud2\nint $0x40\nhlt", {6: ud, 0x40: soft}))
    assert [s[2] for s in t[:-2]] == [K.KVM_EXIT_IO, K.KVM_EXIT_INTERNAL_ERROR]
    assert t[0][4] == "06"


def test_dirty_log_after_guest_store() -> None:
    """A store dirties its page and the page-table pages the walk updated (live: bitmap 0x2e)."""
    results = []
    for k in _both():
        g = Guest(k, 0x100000)
        flags_region = K.kvm_userspace_memory_region_fmt.pack(
            0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, 0x100000, g.mem.address
        )
        k.ioctl(g.vm, K.KVM_SET_USER_MEMORY_REGION, bytearray(flags_region))
        long_mode("movq $1, 0x5008\nhlt")(g)
        buf = k.mmap(-1, 4096, M.PROT_READ | M.PROT_WRITE, M.MAP_PRIVATE | M.MAP_ANONYMOUS)
        log = bytearray(K.kvm_dirty_log_fmt.pack(0, 0, buf.address))
        k.ioctl(g.vm, K.KVM_GET_DIRTY_LOG, log)  # start from a clean log
        rc = g.kvm_run()
        k.ioctl(g.vm, K.KVM_GET_DIRTY_LOG, log)
        results.append((rc, bytes(buf.view()[:32])))
        g.close()
        k.shutdown()
    assert results[1] == results[0]
    assert results[0][0] == (0, K.KVM_EXIT_HLT)


def test_real_mode_int_through_ivt() -> None:
    def setup(g: Guest) -> None:
        handler = assemble("mov $0x3f8, %dx\nmov $0x10, %al\nout %al, %dx\niret", 16)
        main = assemble("mov $0x800, %sp\nint $0x10\nmov $0x3f8, %dx\nmov $0x99, %al\nout %al, %dx\nhlt", 16)
        ivt = bytearray(0x400)
        ivt[0x40:0x44] = (0x2000).to_bytes(2, "little") + (0).to_bytes(2, "little")
        g.load({0: bytes(ivt), 0x1000: main, 0x2000: handler}, real_mode_sregs(), 0x1000)

    t = compare(setup, mem_size=0x10000)
    assert [s[4] for s in t[:2]] == ["10", "99"]


def test_user_page_fault_switches_to_ring0_stack() -> None:
    """CPL3 #PF through a DPL0 interrupt gate: stack from TSS.RSP0, SS:RSP/RFLAGS/CS:RIP/error pushed."""
    handler = "mov %cr2, %rbx\nmov %rsp, %rsi\nmov $0x3f8, %dx\nmov $0x0e, %al\nout %al, %dx\nhlt"
    code = assemble("mov 0x300040, %rax\nhlt", 64)

    def setup(g: Guest) -> None:
        img, s = long_mode_image(user=True)
        img[CODE] = code
        img[CODE + 0x1000] = assemble(handler, 64)
        idt = bytearray(256 * 16)
        idt[14 * 16 : 15 * 16] = _gate64(CODE + 0x1000)
        img[IDT] = bytes(idt)
        s["idt"] = {"base": IDT, "limit": len(idt) - 1, "padding": [0, 0, 0]}
        g.load(img, s, CODE, STACK_TOP - 0x1000)

    t = compare(setup)
    regs = t[0][5]
    assert t[0][2] == K.KVM_EXIT_IO and regs["rbx"] == 0x300040
    assert regs["rsi"] == STACK_TOP - 6 * 8  # error code + 5-word frame on the RSP0 stack


def test_guest_cr8_write_shows_in_kvm_run() -> None:
    t = compare(long_mode("mov $5, %rax\nmov %rax, %cr8\nmov $0x3f8, %dx\nout %al, %dx\nhlt"))
    assert t[0][3][32:48] == (5).to_bytes(8, "little").hex()  # kvm_run.cr8 (offset 16)
