"""Page tables, GDT, TSS and images, checked as data (no kernel)."""

from __future__ import annotations

import itertools
import struct

import pytest

from fakekvm.guests import layout
from fakekvm.guests.image import GuestImage, long_mode_image, real_mode_image
from fakekvm.guests.workloads import hello_image

MiB = 1 << 20
GiB = 1 << 30


def _memory(image: GuestImage, size: int) -> dict[int, bytes]:
    """Sparse memory: page number -> page bytes, from the image's chunks."""
    pages: dict[int, bytearray] = {}
    for c in image.chunks:
        for off in range(0, len(c.data), layout.PAGE):
            addr = c.gpa + off
            page = pages.setdefault(addr // layout.PAGE, bytearray(layout.PAGE))
            piece = c.data[off : off + layout.PAGE - addr % layout.PAGE]
            page[addr % layout.PAGE : addr % layout.PAGE + len(piece)] = piece
    return {k: bytes(v) for k, v in pages.items()}


def _entry(mem: dict[int, bytes], table: int, index: int) -> int:
    page = mem.get(table // layout.PAGE, bytes(layout.PAGE))
    return int(struct.unpack_from("<Q", page, index * 8)[0])


def walk(mem: dict[int, bytes], cr3: int, va: int) -> tuple[int, int] | None:
    """4-level walk (SDM vol. 3 §4.5): (physical address, AND of U/S|RW bits) or None."""
    table = cr3
    perms = layout.PTE_US | layout.PTE_RW
    for level, shift in enumerate((39, 30, 21, 12)):
        e = _entry(mem, table, (va >> shift) & 511)
        if not e & layout.PTE_P:
            return None
        perms &= e
        addr = e & 0x000FFFFFFFFFF000
        if shift in (30, 21) and e & layout.PTE_PS:
            assert shift == 21, "no 1 GiB pages are built"
            return (addr & ~((1 << shift) - 1)) | (va & ((1 << shift) - 1)), perms
        if level == 3:
            return addr | (va & 0xFFF), perms
        table = addr
    return None  # pragma: no cover


@pytest.mark.parametrize("mem_size", [2 * MiB, 3 * MiB + 4096, 64 * MiB, GiB + 6 * MiB + 8192])
def test_identity_map_covers_exactly_the_mapped_size(mem_size: int) -> None:
    image = long_mode_image("t", b"\x90", mem_size)
    mem = _memory(image, mem_size)
    cr3 = image.sregs["cr3"]
    probes = {0x1000, 0x1FF000, 0x200000, 0x200008, mem_size - 8, mem_size // 2 & ~7}
    probes |= {a for a in range(2 * MiB, mem_size, 2 * MiB)}
    for va in sorted(a for a in probes if a < mem_size):
        got = walk(mem, cr3, va)
        assert got is not None, hex(va)
        assert got[0] == va, hex(va)
        assert got[1] == layout.PTE_US | layout.PTE_RW, "U/S and R/W set at every level"
    assert walk(mem, cr3, 0) is None, "page 0 is a null guard"
    assert walk(mem, cr3, 0x10) is None
    assert walk(mem, cr3, mem_size) is None, "nothing past the mapped size"
    assert walk(mem, cr3, -(-mem_size // GiB) * GiB + 5 * GiB) is None


def test_mapped_size_beyond_memory_maps_an_mmio_window() -> None:
    image = long_mode_image("t", b"\x90", 4 * MiB, mapped_size=4 * MiB + 8192)
    mem = _memory(image, 4 * MiB)
    assert walk(mem, image.sregs["cr3"], 4 * MiB + 4096) == (4 * MiB + 4096, 6)
    assert walk(mem, image.sregs["cr3"], 4 * MiB + 8192) is None


def test_accessed_and_dirty_are_preset_so_the_walk_writes_nothing() -> None:
    image = long_mode_image("t", b"\x90", 8 * MiB)
    mem = _memory(image, 8 * MiB)
    pde = _entry(mem, layout.PD_ADDR, 2)  # the 2 MiB page at 4 MiB
    assert pde & layout.PTE_PS and pde & layout.PTE_A and pde & layout.PTE_D
    pte = _entry(mem, layout.PT_LOW_ADDR, 1)
    assert pte & layout.PTE_A and pte & layout.PTE_D
    assert _entry(mem, layout.PML4_ADDR, 0) & layout.PTE_A


def test_64_gib_guest_tables_fit_in_the_system_area() -> None:
    chunks = layout.page_tables(64 * GiB)
    end = max(gpa + len(data) for gpa, data in chunks)
    assert end <= layout.CODE_ADDR
    assert sum(len(d) for _, d in chunks) == (3 + 64) * layout.PAGE
    with pytest.raises(ValueError):
        layout.page_tables(layout.MAX_MAPPED + GiB)


def test_chunks_do_not_overlap_and_stay_below_the_data_base() -> None:
    image = long_mode_image("t", b"\x90" * 100, 16 * MiB)
    spans = sorted((c.gpa, c.end, c.what) for c in image.chunks)
    for (_, end, what), (start, _, nxt) in itertools.pairwise(spans):
        assert end <= start, f"{what} overlaps {nxt}"
    assert spans[-1][1] <= layout.DATA_BASE
    assert image.entry == layout.CODE_ADDR


def _decode(desc: int) -> dict[str, int]:
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    return {
        "type": access & 0xF, "s": access >> 4 & 1, "dpl": access >> 5 & 3, "present": access >> 7,
        "l": flags >> 1 & 1, "db": flags >> 2 & 1, "g": flags >> 3 & 1,
        "limit": (desc & 0xFFFF) | ((desc >> 48) & 0xF) << 16,
        "base": (desc >> 16) & 0xFFFFFF | ((desc >> 56) & 0xFF) << 24,
    }  # fmt: skip


def test_gdt_descriptors_agree_with_the_sregs() -> None:
    gdt = layout.gdt_bytes()
    sregs = layout.long_mode_sregs()
    assert sregs["gdt"] == {"base": layout.GDT_ADDR, "limit": len(gdt) - 1}
    words = struct.unpack(f"<{len(gdt) // 8}Q", gdt)
    for name in ("cs", "ss", "ds"):
        seg = sregs[name]
        d = _decode(words[seg["selector"] >> 3])
        for key in ("type", "s", "dpl", "present", "l", "db", "g"):
            assert d[key] == seg[key], (name, key)
        assert seg["selector"] & 3 == seg["dpl"] == 3, "starts at CPL3"
    tr = sregs["tr"]
    d = _decode(words[tr["selector"] >> 3])
    assert (d["type"], d["s"], d["base"], d["limit"]) == (0xB, 0, tr["base"], tr["limit"])
    assert words[(tr["selector"] >> 3) + 1] == tr["base"] >> 32


def test_tss_io_bitmap_allows_every_port() -> None:
    tss = layout.tss_bytes()
    assert len(tss) == layout.TSS_LIMIT + 1
    (iomap,) = struct.unpack_from("<H", tss, 0x66)
    assert iomap == layout.TSS_SIZE
    bitmap = tss[iomap : iomap + 0x10000 // 8]
    assert bitmap == bytes(len(bitmap)), "every port allowed"
    assert tss[-1] == 0xFF


def test_long_mode_control_registers() -> None:
    s = layout.long_mode_sregs()
    assert s["cr0"] & layout.CR0_PE and s["cr0"] & layout.CR0_PG
    assert s["cr4"] & layout.CR4_PAE
    assert s["efer"] == layout.EFER_LME | layout.EFER_LMA
    assert s["cr3"] == layout.PML4_ADDR
    assert s["idt"]["limit"] == 0, "any exception triple-faults"
    image = long_mode_image("t", b"\x90", 4 * MiB)
    assert image.regs["rflags"] & layout.RFLAGS_IOPL3 == layout.RFLAGS_IOPL3


def test_each_vcpu_gets_its_own_stack() -> None:
    image = long_mode_image("t", b"\x90", 4 * MiB, regs={"rdi": 5})
    r0, r1 = image.regs_for(0), image.regs_for(1)
    assert image.regs_for(59)["rsp"] - layout.STACK_PER_VCPU >= layout.CODE_ADDR + layout.CODE_MAX
    with pytest.raises(ValueError):
        image.regs_for(60)
    assert image.code == b"\x90" and image.load_address == layout.CODE_ADDR
    assert r0["rsp"] == layout.STACK_TOP and r1["rsp"] == layout.STACK_TOP - layout.STACK_PER_VCPU
    assert r0["rdi"] == r1["rdi"] == 5
    assert image.with_regs(rdi=9).regs["rdi"] == 9 and image.regs["rdi"] == 5


def test_real_mode_image() -> None:
    image = hello_image()
    assert image.mode == "real" and image.entry == 0x7C00
    assert image.sregs["cs"]["base"] == 0 and image.sregs["cs"]["selector"] == 0
    assert image.sregs["cr0"] & layout.CR0_PE == 0
    assert image.min_mem_size >= 0x7C00 + len(image.chunks[0].data)
    assert image.regs_for(3)["rsp"] == image.regs["rsp"], "no per-vCPU stacks in real mode"
    with pytest.raises(ValueError):
        real_mode_image("big", b"\0" * 16, load_addr=0xFFFF8)
    with pytest.raises(ValueError):
        long_mode_image("small", b"\x90", 1 * MiB)
    with pytest.raises(ValueError):
        long_mode_image("big", bytes(layout.CODE_MAX + 1), 4 * MiB)
    assert image.code.startswith(b"\xfc") and image.load_address == 0x7C00
