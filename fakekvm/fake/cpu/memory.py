"""Guest memory as the engine sees it: memslot host memory mapped into unicorn, page walks, linear access.

The second stage is the ``translate(gpa, write, exec_)`` callable (e.g.
``FakeVm.translate``, ``arch/x86/kvm/mmu/mmu.c``'s fault-in path); each
memslot's host memory is mapped once into unicorn with ``mem_map_ptr``
(zero copy) the first time ``translate`` names it. The engine's own accesses
(page-table walks with A/D updates, exception frames, instruction bytes) go
through the guest's paging (:mod:`fakekvm.fake.cpu.paging`) and ``translate``,
so dirty logging and userfaultfd see them as KVM's own accesses would be seen.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, Protocol

from unicorn.unicorn_const import UC_PROT_ALL

from fakekvm.fake.cpu import envview, layout, paging
from fakekvm.fake.cpu.uc_raw import BatchReader

_PAGE = 0x1000

# kinds returned by the second stage (same numbers as fakekvm.fake.kvm.translate.Kind)
KIND_RAM = 0
KIND_MMIO = 1
KIND_FAULT = 2

class TranslationLike(Protocol):
    """What ``translate`` returns (``fakekvm.fake.kvm.translate.Translation`` fits)."""

    @property
    def kind(self) -> int: ...
    @property
    def gpa(self) -> int: ...
    @property
    def hva(self) -> int: ...
    @property
    def writable(self) -> bool: ...
    @property
    def slot_base_gpa(self) -> int: ...
    @property
    def slot_size(self) -> int: ...
    @property
    def slot_hva(self) -> int: ...
    @property
    def fault_flags(self) -> int: ...


Translate = Callable[[int, bool, bool], TranslationLike]



class GuestMemory:
    """Mixin of `X86Cpu`: RAM mappings and the engine's own guest accesses."""

    uc: Any
    translate: Translate
    _mode_r: BatchReader
    _env: memoryview  # live CPUX86State (fakekvm.fake.cpu.envview)
    _rip_r: BatchReader
    _efer_cache: tuple[int, int, int]
    _mapped: dict[int, tuple[int, int]]
    _slots_sorted: list[tuple[int, int, int]]
    _views: dict[int, tuple[memoryview, memoryview, memoryview]]
    _walker: paging.WalkCache
    _pt_ok: set[int]
    _pt_w_ok: set[int]
    _unmapping: bool

    def segment(self, name: str) -> tuple[int, int, int, int]:  # provided by CpuState
        raise NotImplementedError

    def _flush_tlb(self) -> None:  # provided by CpuState
        raise NotImplementedError

    def _mode(self) -> tuple[int, int, int, int, int]:
        """(cr0, cr3, cr4, efer, cpl) right now."""
        env = self._env
        cr0 = env[envview.I_CR0]
        cpl = env[envview.I_CS] & 3 if cr0 & 1 else 0
        return cr0, env[envview.I_CR3], env[envview.I_CR4], env[envview.I_EFER], cpl

    def _slot_of(self, gpa: int) -> tuple[int, int, int] | None:
        for base, size, hva in self._slots_sorted:
            if base <= gpa < base + size:
                return base, size, hva
        return None

    def _ensure_mapped(self, t: TranslationLike) -> None:
        base = t.slot_base_gpa
        cur = self._mapped.get(base)
        if cur == (t.slot_size, t.slot_hva):
            return
        end = base + t.slot_size
        for b, (sz, _hva) in list(self._mapped.items()):
            if b < end and base < b + sz:
                self._mem_unmap(b, sz)
                del self._mapped[b]
                self._views.clear()
                self._walker.clear()
        self.uc.mem_map_ptr(base, t.slot_size, UC_PROT_ALL, t.slot_hva)
        self._mapped[base] = (t.slot_size, t.slot_hva)
        self._slots_sorted = sorted((b, sz, hv) for b, (sz, hv) in self._mapped.items())

    def _mem_unmap(self, base: int, size: int) -> None:
        self._unmapping = True
        try:
            self.uc.mem_unmap(base, size)
        finally:
            self._unmapping = False

    def _unmap_all(self) -> None:
        for b, (sz, _hva) in self._mapped.items():
            self._mem_unmap(b, sz)
        self._mapped.clear()
        self._slots_sorted = []
        self._views.clear()
        self._walker.clear()
        self._pt_ok.clear()
        self._pt_w_ok.clear()

    def _ram_hva(self, gpa: int, write: bool) -> int:
        """Host address of guest-physical ``gpa`` for the engine's own accesses (walks, pushes)."""
        page = gpa & ~0xFFF
        ok = self._pt_w_ok if write else self._pt_ok
        if page not in ok:
            t = self.translate(page, write, False)
            if t.kind != KIND_RAM or (write and not t.writable):
                raise _PhysError(gpa, t)
            self._ensure_mapped(t)
            ok.add(page)
            if write:
                self._pt_ok.add(page)
        slot = self._slot_of(gpa)
        if slot is None:  # pragma: no cover - translate said RAM
            raise _PhysError(gpa, None)
        return slot[2] + (gpa - slot[0])

    def _pt_views(self, page: int) -> tuple[memoryview, memoryview, memoryview]:
        # page-table pages are few: keep u64/u32/u8 views of each one walked
        views = self._views.get(page)
        if views is None:
            hva = self._ram_hva(page, False)
            raw = memoryview((ctypes.c_char * _PAGE).from_address(hva)).cast("B")
            views = (raw.cast("Q"), raw.cast("I"), raw)
            self._views[page] = views
        return views

    def _table64(self, page: int) -> memoryview:
        views = self._views.get(page)
        if views is None:
            views = self._pt_views(page)
        return views[0]

    def _read_pte(self, gpa: int, size: int) -> int:
        views = self._views.get(gpa & ~0xFFF) or self._pt_views(gpa & ~0xFFF)
        if size == 8:
            return views[0][(gpa & 0xFFF) >> 3]
        return views[1][(gpa & 0xFFF) >> 2]

    def _set_pte_bits(self, gpa: int, bits: int) -> None:
        page = gpa & ~0xFFF
        if page not in self._pt_w_ok:
            self._ram_hva(page, True)  # dirty-logs the page-table page, once
        views = self._views.get(page) or self._pt_views(page)
        views[2][gpa & 0xFFF] |= bits

    def linear_to_phys(self, vaddr: int, access: int, user: bool | None = None, *, peek: bool = False) -> int:
        """Walk the guest page tables for the engine's own accesses (raises PageFault).

        ``peek``: look only, without setting Accessed/Dirty bits (the hardware
        would not have walked there).
        """
        cr0, cr3, cr4, efer, cpl = self._mode()
        if not cr0 & paging.CR0_PG:
            return vaddr & 0xFFFF_FFFF if not efer & paging.EFER_LMA else vaddr
        u = cpl == 3 if user is None else user
        set_bits = _no_bits if peek else self._set_pte_bits
        frame, _prot = paging.walk(vaddr, access, u, cr0, cr3, cr4, efer, self._read_pte, set_bits)
        return frame | (vaddr & 0xFFF)

    def read_linear(
        self, vaddr: int, n: int, *, user: bool = False, fetch: bool = False, peek: bool = False
    ) -> bytes:
        out = bytearray()
        while n > 0:
            chunk = min(n, _PAGE - (vaddr & 0xFFF))
            gpa = self.linear_to_phys(vaddr, paging.ACC_FETCH if fetch else paging.ACC_READ, user, peek=peek)
            out += ctypes.string_at(self._ram_hva(gpa, False), chunk)
            vaddr += chunk
            n -= chunk
        return bytes(out)

    def write_linear(self, vaddr: int, data: bytes, *, user: bool = False) -> None:
        off = 0
        while off < len(data):
            chunk = min(len(data) - off, _PAGE - (vaddr & 0xFFF))
            gpa = self.linear_to_phys(vaddr, paging.ACC_WRITE, user)
            ctypes.memmove(self._ram_hva(gpa, True), data[off : off + chunk], chunk)
            vaddr += chunk
            off += chunk

    def code_size(self) -> int:
        """2, 4 or 8: the default operand size of the current code segment."""
        _sel, _base, _limit, flags = self.segment("cs")
        cr0 = self._env[envview.I_CR0]
        efer = self._env[envview.I_EFER]
        if efer & paging.EFER_LMA and flags & layout.DESC_L_MASK:
            return 8
        if cr0 & 1 and flags & layout.DESC_B_MASK:
            return 4
        return 2

    def fetch_insn_bytes(self, n: int = 15) -> bytes:
        rip = self._rip_r.read()[0]
        size = self.code_size()
        lin = rip if size == 8 else self.segment("cs")[1] + rip
        out = b""
        for i in range(n):
            try:
                out += self.read_linear(lin + i, 1, fetch=True)
            except (paging.PageFault, _PhysError):
                break
        return out


def _no_bits(_gpa: int, _bits: int) -> None:
    pass


class _PhysError(Exception):
    """The engine's own access hit a gpa that is not RAM (a page table in MMIO, say)."""

    def __init__(self, gpa: int, t: Any) -> None:
        super().__init__(f"gpa {gpa:#x} is not RAM")
        self.gpa = gpa
        self.translation = t


PhysError = _PhysError

