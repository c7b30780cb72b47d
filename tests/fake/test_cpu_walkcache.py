"""The first-touch fast path: the validated paging-structure cache, the live env view, the kick race.

* `WalkCache.walk` must give exactly what `walk64` gives (frame, permissions, #PF
  error code, Accessed/Dirty updates) whatever happens to the tables between
  walks: checked on random tables and random edits (hypothesis).
* `envview.env_view` must read what `uc_reg_read`/`uc_msr_read` read.
* A guest that edits its own page tables (PDE change + INVLPG, CR3 switch) sees
  the new mapping through the engine's cache.
"""

from __future__ import annotations

import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as X

from fakekvm.fake.cpu import HltExit, Interrupted, IoExit, X86Cpu, envview
from fakekvm.fake.cpu import paging as P
from fakekvm.fake.cpu.testing import (
    CODE,
    PD,
    STACK_TOP,
    StubMemory,
    assemble,
    long_mode_image,
    real_mode_sregs,
)

_P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63

# fixed table structure (addresses); the flags of every entry are drawn
PML4, PDPT0, PDPT1, PD0, PD1, PT0, PT1 = 0x1000, 0x2000, 0x7000, 0x3000, 0x8000, 0x4000, 0x5000
STRUCTURE = {
    PML4 + 0: PDPT0,
    PML4 + 8: PDPT1,
    PDPT0 + 0: PD0,
    PDPT0 + 8: 0x4000_0000,  # 1 GiB leaf (with PS)
    PDPT1 + 0: PD1,
    PD0 + 0: PT0,
    PD0 + 8: 0x60_0000,  # 2 MiB leaf (with PS)
    PD0 + 16: PT1,
    PD1 + 0: 0xA0_0000,  # 2 MiB leaf
    **{PT0 + 8 * i: 0x10_0000 + i * 0x1000 for i in range(4)},
    **{PT1 + 8 * i: 0x20_0000 + i * 0x1000 for i in range(4)},
}
LEAF_PS = {PDPT0 + 8, PD0 + 8, PD1 + 0}
ENTRIES = sorted(STRUCTURE)
VAS = [
    (l4 << 39) | (l3 << 30) | (l2 << 21) | (l1 << 12) | 0x123
    for l4, l3, l2, l1 in [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 3), (0, 0, 1, 0), (0, 0, 1, 7), (0, 0, 2, 2),
        (0, 1, 0, 0), (0, 1, 5, 9), (1, 0, 0, 0), (1, 0, 0, 300), (0, 0, 3, 0), (2, 0, 0, 0),
    ]
]  # fmt: skip
FLAG_BITS = [_P, RW, US, A, D, NX]
MODES = [
    (0x8001_0011, 0x20, 0xD00),  # PG|WP|PE, PAE, LME|LMA|NXE
    (0x8000_0011, 0x20, 0xD00),  # WP clear
    (0x8001_0011, 0x20 | (1 << 20), 0xD00),  # SMEP
    (0x8001_0011, 0x20, 0x500),  # NXE clear
]


class Mem:
    def __init__(self) -> None:
        self.q: dict[int, int] = {}

    def view(self, page: int) -> _View:
        return _View(self, page)

    def set_bits(self, gpa: int, bits: int) -> None:
        self.q[gpa] = self.q.get(gpa, 0) | bits


class _View:
    def __init__(self, m: Mem, page: int) -> None:
        self.m = m
        self.page = page

    def __getitem__(self, i: int) -> int:
        return self.m.q.get(self.page + 8 * i, 0)


def _entry(addr: int, flags: int, ps: bool) -> int:
    return STRUCTURE[addr] | flags | (PS if ps else 0)


flags_st = st.lists(st.sampled_from(FLAG_BITS), max_size=6).map(lambda bs: sum(set(bs)) | _P)
_walk_st = st.tuples(st.just("walk"), st.sampled_from(VAS), st.sampled_from([0, 1, 2]), st.booleans())
_edit_st = st.tuples(st.just("edit"), st.sampled_from(ENTRIES), st.integers(0, 127), st.booleans())
# walks and edits dominate: mode/CR3 changes and clears empty the cache
op_st = st.one_of(
    _walk_st, _walk_st, _walk_st, _walk_st, _edit_st, _edit_st,
    st.tuples(st.just("mode"), st.integers(0, len(MODES) - 1), st.just(0), st.just(False)),
    st.tuples(st.just("cr3"), st.sampled_from([PML4, PDPT0]), st.just(0), st.just(False)),
    st.tuples(st.just("clear"), st.just(0), st.just(0), st.just(False)),
)  # fmt: skip


def _result(f: Any, *args: Any) -> object:
    try:
        return f(*args)
    except P.PageFault as e:
        return ("pf", e.error_code)


@settings(max_examples=250, deadline=None)
@given(st.lists(flags_st, min_size=len(ENTRIES), max_size=len(ENTRIES)), st.lists(op_st, min_size=15, max_size=60))
def test_walk_cache_equals_walk64_under_random_edits(init: list[int], ops: list[tuple[Any, ...]]) -> None:
    ref, got = Mem(), Mem()
    for addr, flags in zip(ENTRIES, init, strict=True):
        ref.q[addr] = got.q[addr] = _entry(addr, flags, addr in LEAF_PS)
    cache = P.WalkCache(got.view, got.set_bits)
    cr0, cr4, efer = MODES[0]
    cr3 = PML4
    for kind, a, b, c in ops:
        if kind == "walk":
            mode = (a, b, c, cr0, cr3, cr4, efer)
            r1 = _result(P.walk64, *mode, ref.view, ref.set_bits)
            r2 = _result(cache.walk, *mode)
            assert r2 == r1
            assert got.q == ref.q  # same Accessed/Dirty updates
        elif kind == "edit":
            # any flags (present or not, PS toggled): the cache must notice
            flags = sum(bit for i, bit in enumerate([_P, RW, US, A, D, NX, PS]) if b >> i & 1)
            ref.q[a] = got.q[a] = STRUCTURE[a] | flags
        elif kind == "mode":
            cr0, cr4, efer = MODES[a]
        elif kind == "cr3":
            cr3 = a
        else:
            cache.clear()
            assert len(cache) == 0


def test_walk_cache_hits_large_and_4k_pages() -> None:
    m = Mem()
    for addr in ENTRIES:
        m.q[addr] = _entry(addr, _P | RW | US | A | D, addr in LEAF_PS)
    cache = P.WalkCache(m.view, m.set_bits)
    calls: list[int] = []

    def view(page: int) -> _View:
        calls.append(page)
        return m.view(page)

    cache.table_view = view
    cr0, cr4, efer = MODES[0]
    for va in (0x20_0000, 0x20_1000, 0x3F_F000):  # one 2 MiB page (-> frame 6 MiB)
        got = cache.walk(va, P.ACC_WRITE, True, cr0, PML4, cr4, efer)
        assert got == (va + 0x40_0000, P.PROT_R | P.PROT_W | P.PROT_X)
    for va in (0x0, 0x1000, 0x3000):  # one page table
        frame, _prot = cache.walk(va | 0x10, P.ACC_READ, False, cr0, PML4, cr4, efer)
        assert frame == 0x10_0000 + va
    n = len(calls)
    cache.walk(0x30_0000, P.ACC_READ, True, cr0, PML4, cr4, efer)
    cache.walk(0x2000, P.ACC_READ, True, cr0, PML4, cr4, efer)
    assert len(calls) == n  # hits: no table looked up again
    # a write to a clean 2 MiB leaf is a full walk, which sets D
    m.q[PD0 + 8] &= ~D
    cache.walk(0x20_0000, P.ACC_READ, True, cr0, PML4, cr4, efer)
    _frame, prot = cache.walk(0x20_0000, P.ACC_READ, True, cr0, PML4, cr4, efer)
    assert not prot & P.PROT_W
    cache.walk(0x20_0000, P.ACC_WRITE, True, cr0, PML4, cr4, efer)
    assert m.q[PD0 + 8] & D


def test_walk_cache_is_bounded() -> None:
    m = Mem()
    for addr in ENTRIES:
        m.q[addr] = _entry(addr, _P | RW | US | A | D, addr in LEAF_PS)
    cache = P.WalkCache(m.view, m.set_bits, max_entries=2)
    cr0, cr4, efer = MODES[0]
    for va in (0x0, 0x20_0000, 0x40_0000, 0x80_0000_0000):
        _result(cache.walk, va, P.ACC_READ, False, cr0, PML4, cr4, efer)
        assert len(cache) <= 2


def test_env_view_reads_what_the_api_reads() -> None:
    uc: Any = Uc(UC_ARCH_X86, UC_MODE_64)
    v = envview.env_view(uc)
    uc.reg_write(X.UC_X86_REG_CR3, 0x12_3000)
    uc.reg_write(X.UC_X86_REG_CR4, 0x20 | (1 << 20))
    uc.msr_write(envview.MSR_EFER, uc.msr_read(envview.MSR_EFER) | (1 << 11))
    uc.reg_write(X.UC_X86_REG_CS, 0x23)
    assert v[envview.I_CR3] == uc.reg_read(X.UC_X86_REG_CR3) == 0x12_3000
    assert v[envview.I_CR4] == uc.reg_read(X.UC_X86_REG_CR4)
    assert v[envview.I_CR0] == uc.reg_read(X.UC_X86_REG_CR0)
    assert v[envview.I_EFER] == uc.msr_read(envview.MSR_EFER) and v[envview.I_EFER] & (1 << 11)
    assert v[envview.I_CS] & 0xFFFF == uc.reg_read(X.UC_X86_REG_CS) == 0x23


def _long_cpu(src: str) -> tuple[StubMemory, X86Cpu]:
    mem = StubMemory()
    mem.add(0, 0x800000)
    img, s = long_mode_image()
    pd = bytearray(img[PD])
    for i in range(1, 4):  # 2 MiB pages at 2, 4, 6 MiB
        pd[i * 8 : i * 8 + 8] = ((i << 21) | 0xE7).to_bytes(8, "little")
    img[PD] = bytes(pd)
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


def test_guest_remapping_a_2m_page_with_invlpg_sees_the_new_frame() -> None:
    # read 2 MiB page 1 (-> frame 2 MiB), point PDE[1] at frame 4 MiB, invlpg, read again
    mem, cpu = _long_cpu(
        f"""
        mov 0x200008, %rax
        mov %rax, %rbx
        movq $0x4000e7, {PD + 8}
        invlpg 0x200000
        mov 0x200008, %rax
        mov $0x10, %dx
        out %al, %dx
        hlt
        """
    )
    mem.write(0x200008, b"\x11" * 8)
    mem.write(0x400008, b"\x22" * 8)
    assert isinstance(cpu.run(), IoExit)
    r = cpu.get_regs()
    assert r["rbx"] == 0x1111_1111_1111_1111
    assert r["rax"] == 0x2222_2222_2222_2222
    assert cpu.run() == HltExit()


def test_guest_switching_cr3_walks_the_new_tables() -> None:
    mem, cpu = _long_cpu(
        """
        mov 0x200010, %rax
        mov %rax, %rbx
        mov %cr3, %rcx
        mov $0x9000, %rdx
        mov %rdx, %cr3
        mov 0x200010, %rax
        mov %rcx, %cr3
        mov $0x10, %dx
        out %al, %dx
        hlt
        """
    )
    # a second hierarchy at 0x9000 (PML4) -> 0xA000 (PDPT) -> 0xB000 (PD): same code
    # mapping (PD[0] shared), 2 MiB page 1 -> frame 6 MiB
    base = cpu.get_sregs()["cr3"]
    pml4 = int.from_bytes(mem.read(base, 8), "little")
    pdpt = int.from_bytes(mem.read(pml4 & ~0xFFF, 8), "little")
    pde0 = int.from_bytes(mem.read(pdpt & ~0xFFF, 8), "little")
    mem.write(0x9000, (0xA000 | 0x27).to_bytes(8, "little"))
    mem.write(0xA000, (0xB000 | 0x27).to_bytes(8, "little"))
    mem.write(0xB000, pde0.to_bytes(8, "little") + (0x600000 | 0xE7).to_bytes(8, "little"))
    mem.write(0x200010, b"\x33" * 8)
    mem.write(0x600010, b"\x44" * 8)
    assert isinstance(cpu.run(), IoExit)
    r = cpu.get_regs()
    assert r["rbx"] == 0x3333_3333_3333_3333
    assert r["rax"] == 0x4444_4444_4444_4444


def test_kick_lands_even_when_the_vcpu_is_slow_to_start_emulating() -> None:
    # the window the retry loop covers: kick() sees _in_emu while emu_start has not
    # started emulating yet (emu_stop there is lost); here it lasts as long as we like
    from fakekvm.fake.cpu.testing import StubMemory as _SM

    mem = _SM()
    mem.add(0, 0x10000)
    mem.write(0x1000, assemble("1: jmp 1b", 16))
    cpu = X86Cpu(mem.translate)
    cpu.set_sregs(real_mode_sregs())
    r = cpu.get_regs()
    r["rip"] = 0x1000
    cpu.set_regs(r)
    entered = threading.Event()
    release = threading.Event()
    orig = cpu.uc.emu_start

    def slow_start(*a: Any) -> Any:
        entered.set()
        release.wait()
        return orig(*a)

    cpu.uc.emu_start = slow_start
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(cpu.run()))
    t.start()
    entered.wait()
    k = threading.Thread(target=cpu.kick)
    k.start()
    # the kicker keeps trying while the vCPU is not emulating yet
    k.join(timeout=0.2)
    assert k.is_alive()
    release.set()
    k.join(timeout=60)
    t.join(timeout=60)
    assert not t.is_alive() and not k.is_alive()
    assert out == [Interrupted()]
