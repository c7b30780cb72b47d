"""The software page walk, pure: page tables in a dict, no unicorn."""

from __future__ import annotations

import pytest

from fakekvm.fake.cpu import paging as P

P_, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
LONG = dict(cr0=0x80010011, cr3=0x1000, cr4=0x20, efer=0xD00)  # PG|WP|PE, PAE, LME|LMA|NXE


class Tables:
    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.updates: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> int:
        return self.mem.get(gpa, 0)

    def set_bits(self, gpa: int, bits: int) -> None:
        self.updates.append((gpa, bits))
        self.mem[gpa] = self.mem.get(gpa, 0) | bits

    def walk(self, va: int, access: int = P.ACC_READ, user: bool = False, **kw: int) -> tuple[int, int]:
        regs = {**LONG, **kw}
        return P.walk(va, access, user, regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"], self.read, self.set_bits)


def four_level(leaf_flags: int = P_ | RW | US, upper: int = P_ | RW | US) -> Tables:
    t = Tables()
    t.mem[0x1000 + 8 * 0] = 0x2000 | upper  # PML4[0]
    t.mem[0x2000 + 8 * 0] = 0x3000 | upper  # PDPT[0]
    t.mem[0x3000 + 8 * 0] = 0x4000 | upper  # PD[0]
    t.mem[0x4000 + 8 * 5] = 0x99000 | leaf_flags  # PT[5]: va 0x5000 -> 0x99000
    return t


def test_4k_page_translation_and_accessed_bits() -> None:
    t = four_level()
    frame, prot = t.walk(0x5123)
    assert frame == 0x99000
    assert prot == P.PROT_R | P.PROT_X  # not dirty yet: no write permission in the TLB
    assert all(bits == A for _g, bits in t.updates)
    assert len(t.updates) == 4


def test_write_sets_dirty_on_leaf_only() -> None:
    t = four_level()
    _f, prot = t.walk(0x5000, P.ACC_WRITE)
    assert prot & P.PROT_W
    assert t.mem[0x4000 + 40] & D
    assert not t.mem[0x3000] & D


def test_not_present_error_code() -> None:
    t = four_level()
    with pytest.raises(P.PageFault) as e:
        t.walk(0x6000, P.ACC_WRITE, user=True)
    assert e.value.error_code == P.PFERR_WRITE | P.PFERR_USER
    assert e.value.address == 0x6000


def test_user_access_to_supervisor_page() -> None:
    t = four_level(leaf_flags=P_ | RW)
    with pytest.raises(P.PageFault) as e:
        t.walk(0x5000, P.ACC_READ, user=True)
    assert e.value.error_code == P.PFERR_PRESENT | P.PFERR_USER


def test_write_protect_respects_cr0_wp() -> None:
    t = four_level(leaf_flags=P_ | US)
    with pytest.raises(P.PageFault):
        t.walk(0x5000, P.ACC_WRITE)  # WP=1: supervisor write to R/O faults
    frame, prot = t.walk(0x5000, P.ACC_WRITE, cr0=0x80000011)  # WP=0: allowed
    assert frame == 0x99000 and prot & P.PROT_W


def test_nx_blocks_fetch() -> None:
    t = four_level(leaf_flags=P_ | RW | US | NX)
    _f, prot = t.walk(0x5000)
    assert not prot & P.PROT_X
    with pytest.raises(P.PageFault) as e:
        t.walk(0x5000, P.ACC_FETCH)
    assert e.value.error_code & P.PFERR_FETCH


def test_2m_and_1g_pages() -> None:
    t = Tables()
    t.mem[0x1000] = 0x2000 | P_ | RW
    t.mem[0x2000 + 8] = 0x40000000 | P_ | RW | PS  # PDPT[1]: 1 GiB page at 1 GiB
    t.mem[0x2000] = 0x3000 | P_ | RW
    t.mem[0x3000 + 8 * 3] = 0x800000 | P_ | RW | PS  # PD[3]: 2 MiB page
    assert t.walk(0x40000000 + 0x12345678)[0] == 0x40000000 + 0x12345000
    assert t.walk(0x600000 + 0x1F000)[0] == 0x800000 + 0x1F000


def test_pae_three_level() -> None:
    t = Tables()
    t.mem[0x1000 + 8 * 1] = 0x3000 | P_  # PDPTE[1] covers 1-2 GiB
    t.mem[0x3000] = 0x4000 | P_ | RW
    t.mem[0x4000 + 8 * 2] = 0x7000 | P_ | RW
    frame, _ = t.walk(0x40002000, cr0=0x80000011, cr4=0x20, efer=0)
    assert frame == 0x7000


def test_32bit_two_level_and_4m_pse() -> None:
    t = Tables()
    t.mem[0x1000] = 0x2000 | P_ | RW
    t.mem[0x2000 + 4 * 3] = 0x9000 | P_ | RW
    t.mem[0x1000 + 4 * 1] = 0x00C00000 | P_ | RW | PS  # 4 MiB page at 12 MiB
    assert t.walk(0x3000, cr0=0x80000011, cr4=0, efer=0)[0] == 0x9000
    assert t.walk(0x00412000, cr0=0x80000011, cr4=0x10, efer=0)[0] == 0x00C12000


class _View:
    def __init__(self, t: Tables, page: int) -> None:
        self.t = t
        self.page = page

    def __getitem__(self, i: int) -> int:
        return self.t.mem.get(self.page + 8 * i, 0)


@pytest.mark.parametrize("leaf", [P_ | RW | US, P_ | US, P_ | RW, P_ | RW | US | NX, P_ | RW | US | D | A, RW])
@pytest.mark.parametrize("access", [P.ACC_READ, P.ACC_WRITE, P.ACC_FETCH])
@pytest.mark.parametrize("user", [False, True])
@pytest.mark.parametrize("va", [0x5123, 0x6000, 0x40000000 + 0x12345678, 0x600000 + 0x1F000])
def test_walk64_agrees_with_walk(leaf: int, access: int, user: bool, va: int) -> None:
    def tables() -> Tables:
        t = four_level(leaf_flags=leaf)
        t.mem[0x2000 + 8] = 0x40000000 | P_ | RW | PS | US  # PDPT[1]: 1 GiB page
        t.mem[0x3000 + 8 * 3] = 0x800000 | P_ | PS | US  # PD[3]: read-only 2 MiB page
        return t

    a, b = tables(), tables()
    ra: object
    rb: object
    try:
        ra = a.walk(va, access, user)
    except P.PageFault as e:
        ra = ("pf", e.error_code)
    regs = LONG
    try:
        rb = P.walk64(
            va, access, user, regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"],
            lambda page: _View(b, page), b.set_bits,
        )  # fmt: skip
    except P.PageFault as e:
        rb = ("pf", e.error_code)
    assert ra == rb
    assert a.mem == b.mem  # same Accessed/Dirty updates
