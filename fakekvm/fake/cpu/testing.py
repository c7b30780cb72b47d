"""Helpers for tests of the CPU engine and the vCPU (not used at run time).

* :func:`assemble`: GNU ``as`` + ``objcopy -O binary`` of a snippet.
* :class:`StubMemory`: a tiny second stage (RAM slots over anonymous host
  memory, everything else MMIO, optional read-only slots) with the
  ``translate(gpa, write, exec_)`` shape of ``FakeVm.translate``; it counts calls.
* :func:`long_mode_image`: page tables (4-level, 4 KiB pages identity-mapping
  the first 2 MiB), a GDT and the matching ``kvm_sregs`` field dict, so one guest
  can run on the live KVM and on the fake.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import tempfile
from typing import Any, NamedTuple

from fakekvm.fake.cpu.memory import KIND_FAULT, KIND_MMIO, KIND_RAM
from fakekvm.fake.cpu.state import reset_sregs


def assemble(src: str, bits: int = 64) -> bytes:
    """Assemble AT&T-syntax ``src`` as .code16/.code32/.code64 and return the raw bytes."""
    d = tempfile.mkdtemp(prefix="fakekvm-as-")
    try:
        with open(os.path.join(d, "a.s"), "w") as f:
            f.write(f".code{bits}\n{src}\n")
        subprocess.run(["as", "--64", "-o", f"{d}/a.o", f"{d}/a.s"], check=True, capture_output=True)
        subprocess.run(
            ["objcopy", "-O", "binary", "-j", ".text", f"{d}/a.o", f"{d}/a.bin"], check=True, capture_output=True
        )
        with open(f"{d}/a.bin", "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d, ignore_errors=True)


class StubTranslation(NamedTuple):
    kind: int
    gpa: int
    hva: int
    writable: bool
    slot_base_gpa: int
    slot_size: int
    slot_hva: int
    fault_flags: int


class StubSlot:
    def __init__(self, gpa: int, size: int, readonly: bool = False) -> None:
        self.gpa = gpa
        self.size = size
        self.readonly = readonly
        self.map = mmap.mmap(-1, size)
        self.hva = ctypes.addressof(ctypes.c_char.from_buffer(self.map))


class StubMemory:
    """A second stage for engine tests: RAM slots, MMIO elsewhere, FAULT for ``fault_pages``."""

    def __init__(self) -> None:
        self.slots: list[StubSlot] = []
        self.calls = 0
        self.log: list[tuple[int, bool, bool]] = []
        self.fault_pages: set[int] = set()
        self.record = False

    def add(self, gpa: int, size: int, readonly: bool = False) -> StubSlot:
        s = StubSlot(gpa, size, readonly)
        self.slots.append(s)
        return s

    def write(self, gpa: int, data: bytes) -> None:
        for s in self.slots:
            if s.gpa <= gpa < s.gpa + s.size:
                off = gpa - s.gpa
                s.map[off : off + len(data)] = data
                return
        raise ValueError(f"gpa {gpa:#x} not in a slot")

    def read(self, gpa: int, n: int) -> bytes:
        for s in self.slots:
            if s.gpa <= gpa < s.gpa + s.size:
                off = gpa - s.gpa
                return bytes(s.map[off : off + n])
        raise ValueError(f"gpa {gpa:#x} not in a slot")

    def translate(self, gpa: int, write: bool, exec_: bool) -> StubTranslation:
        self.calls += 1
        if self.record:
            self.log.append((gpa, write, exec_))
        page = gpa & ~0xFFF
        if page in self.fault_pages:
            return StubTranslation(KIND_FAULT, page, 0, False, 0, 0, 0, 0)
        for s in self.slots:
            if s.gpa <= gpa < s.gpa + s.size:
                if s.readonly and write:
                    return StubTranslation(KIND_MMIO, page, 0, False, s.gpa, s.size, s.hva, 0)
                return StubTranslation(
                    KIND_RAM, page, s.hva + (page - s.gpa), not s.readonly, s.gpa, s.size, s.hva, 0
                )
        return StubTranslation(KIND_MMIO, page, 0, False, 0, 0, 0, 0)


# --- a long-mode image usable on any kernel -------------------------------------------------
PML4 = 0x1000
PDPT = 0x2000
PD = 0x3000
PT = 0x4000
GDT = 0x800
TSS = 0x900
CODE = 0x10000
STACK_TOP = 0x80000

SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_UCODE = 0x18
SEL_UDATA = 0x20
SEL_TSS = 0x28


def long_mode_image(user: bool = False, pt_user: bool | None = None) -> tuple[dict[int, bytes], dict[str, Any]]:
    """Memory contents {gpa: bytes} and the kvm_sregs dict for 64-bit mode.

    The first 2 MiB are identity-mapped with 4 KiB pages (P|RW, plus U/S when
    ``pt_user``, default = ``user``). ``user`` starts the guest at CPL3.
    """
    if pt_user is None:
        pt_user = user
    us = 4 if pt_user else 0
    mem: dict[int, bytes] = {}
    mem[PML4] = (PDPT | 3 | us).to_bytes(8, "little")
    mem[PDPT] = (PD | 3 | us).to_bytes(8, "little")
    mem[PD] = (PT | 3 | us).to_bytes(8, "little")
    mem[PT] = b"".join(((i << 12) | 3 | us).to_bytes(8, "little") for i in range(512))
    gdt = [
        0,
        0x00AF9B000000FFFF,  # 0x08 kernel code, L=1
        0x00CF93000000FFFF,  # 0x10 kernel data
        0x00AFFB000000FFFF,  # 0x18 user code, DPL3, L=1
        0x00CFF3000000FFFF,  # 0x20 user data, DPL3
        0x0000890000000067 | ((TSS & 0xFFFFFF) << 16),  # 0x28 TSS (64-bit available)
        0,
    ]
    mem[GDT] = b"".join(d.to_bytes(8, "little") for d in gdt)
    tss = bytearray(0x68)
    tss[4:12] = STACK_TOP.to_bytes(8, "little")  # RSP0
    mem[TSS] = bytes(tss)
    s = reset_sregs()
    dpl = 3 if user else 0

    def seg(sel: int, type_: int, l_: int, db: int) -> dict[str, int]:
        return {"base": 0, "limit": 0xFFFFFFFF, "selector": sel | dpl, "type": type_, "present": 1,
                "dpl": dpl, "db": db, "s": 1, "l": l_, "g": 1, "avl": 0, "unusable": 0, "padding": 0}  # fmt: skip

    s["cs"] = seg(SEL_UCODE if user else SEL_CODE, 11, 1, 0)
    for n in ("ds", "es", "fs", "gs", "ss"):
        s[n] = seg(SEL_UDATA if user else SEL_DATA, 3, 0, 1)
    s["tr"] = {"base": TSS, "limit": 0x67, "selector": SEL_TSS, "type": 11, "present": 1, "dpl": 0,
               "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0, "padding": 0}  # fmt: skip
    s["gdt"] = {"base": GDT, "limit": len(gdt) * 8 - 1, "padding": [0, 0, 0]}
    s["idt"] = {"base": 0, "limit": 0, "padding": [0, 0, 0]}
    s["cr0"] = 0x80000011
    s["cr3"] = PML4
    s["cr4"] = 0x20
    s["efer"] = 0x500
    return mem, s


def real_mode_sregs() -> dict[str, Any]:
    """Reset state with CS base 0 (so ``rip`` is the linear address of the code)."""
    s = reset_sregs()
    s["cs"] = {**s["cs"], "base": 0, "selector": 0}
    return s


# --- one guest through any Kernel (RealKernel or FakeKernel) -------------------------------
class Guest:
    """A VM with one RAM slot at gpa 0 and one vCPU, built through the `Kernel` seam."""

    def __init__(self, k: Any, mem_size: int = 0x200000, readonly_slot: tuple[int, int] | None = None) -> None:
        from fakekvm.abi import kvm as K
        from fakekvm.abi import mman as M

        self.k = k
        self.K = K
        self.kvm = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = k.ioctl(self.kvm, K.KVM_CREATE_VM, 0)
        prot = M.PROT_READ | M.PROT_WRITE
        self.mem = k.mmap(-1, mem_size, prot, M.MAP_PRIVATE | M.MAP_ANONYMOUS | M.MAP_NORESERVE)
        self.mem_size = mem_size
        region = bytearray(K.kvm_userspace_memory_region_fmt.pack(0, 0, 0, mem_size, self.mem.address))
        k.ioctl(self.vm, K.KVM_SET_USER_MEMORY_REGION, region)
        self.ro = None
        if readonly_slot is not None:
            gpa, size = readonly_slot
            self.ro = k.mmap(-1, size, prot, M.MAP_PRIVATE | M.MAP_ANONYMOUS)
            region = bytearray(
                K.kvm_userspace_memory_region_fmt.pack(1, K.KVM_MEM_READONLY, gpa, size, self.ro.address)
            )
            k.ioctl(self.vm, K.KVM_SET_USER_MEMORY_REGION, region)
        self.vcpu = k.ioctl(self.vm, K.KVM_CREATE_VCPU, 0)
        self.run_map = k.mmap(self.vcpu, 12288, prot, M.MAP_SHARED)
        self.run = self.run_map.view()

    def write(self, gpa: int, data: bytes) -> None:
        memoryview(self.mem).cast("B")[gpa : gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(memoryview(self.mem).cast("B")[gpa : gpa + n])

    def get_regs(self) -> dict[str, int]:
        b = bytearray(144)
        self.k.ioctl(self.vcpu, self.K.KVM_GET_REGS, b)
        return dict(zip(self.K.KVM_REGS_FIELDS, self.K.kvm_regs_fmt.unpack(b), strict=True))

    def set_regs(self, r: dict[str, int]) -> None:
        b = bytearray(self.K.kvm_regs_fmt.pack(*[r[n] for n in self.K.KVM_REGS_FIELDS]))
        self.k.ioctl(self.vcpu, self.K.KVM_SET_REGS, b)

    def get_sregs_raw(self) -> bytes:
        b = bytearray(312)
        self.k.ioctl(self.vcpu, self.K.KVM_GET_SREGS, b)
        return bytes(b)

    def set_sregs(self, s: dict[str, Any]) -> None:
        self.k.ioctl(self.vcpu, self.K.KVM_SET_SREGS, bytearray(self.K.kvm_sregs.build(s)))

    def load(self, image: dict[int, bytes], sregs: dict[str, Any], rip: int, rsp: int = 0) -> None:
        for gpa, b in image.items():
            self.write(gpa, b)
        self.set_sregs(sregs)
        r = self.get_regs()
        r["rip"] = rip
        r["rsp"] = rsp
        self.set_regs(r)

    def kvm_run(self) -> tuple[int, int]:
        """KVM_RUN; returns (0 or -errno, exit_reason)."""
        try:
            self.k.ioctl(self.vcpu, self.K.KVM_RUN, 0)
            rc = 0
        except OSError as e:
            rc = -(e.errno or 0)
        return rc, int.from_bytes(self.run[8:12], "little")

    def close(self) -> None:
        for fd in (self.vcpu, self.vm, self.kvm):
            self.k.close(fd)
