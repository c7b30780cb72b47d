"""The x86 guest page walk (first stage), done in software for unicorn's virtual TLB.

Follows the Intel SDM vol. 3A ch. 4 ("Paging") and KVM's software walker
``arch/x86/kvm/mmu/paging_tmpl.h`` (``FNAME(walk_addr_generic)``): 32-bit
(2-level, 4 MiB pages with CR4.PSE), PAE (3-level) and 4-level paging with
2 MiB / 1 GiB leaves; U/S, R/W (with CR0.WP), NX (EFER.NXE), SMEP; Accessed
bits set on every level walked and the Dirty bit on the leaf for writes, as the
hardware does. The walk is pure: it reads and updates page-table entries
through two callables, so it can be tested with a dict of entries.

``walk()`` returns the 4 KiB guest-physical frame that backs the linear address
and the permissions the TLB entry may carry (write only when the leaf is already
dirty or this access dirties it, so a later first write walks again and sets D).
A failed walk raises :class:`PageFault` with the architectural error code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PROT_R = 1
PROT_W = 2
PROT_X = 4

ACC_READ = 0
ACC_WRITE = 1
ACC_FETCH = 2

# page-fault error code bits (SDM 4.7)
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4

_P = 1
_RW = 1 << 1
_US = 1 << 2
_A = 1 << 5
_D = 1 << 6
_PS = 1 << 7
_NX = 1 << 63

CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20
EFER_NXE = 1 << 11
EFER_LMA = 1 << 10

ADDR_MASK = 0x000F_FFFF_FFFF_F000


class PageFault(Exception):
    """A guest #PF: ``error_code`` as pushed by the CPU, ``address`` for CR2."""

    def __init__(self, address: int, error_code: int) -> None:
        super().__init__(f"#PF at {address:#x} error {error_code:#x}")
        self.address = address
        self.error_code = error_code


ReadPte = Callable[[int, int], int]  # (gpa, size 4|8) -> entry value
SetBits = Callable[[int, int], None]  # (gpa of entry, bits to OR into its low byte)


def walk(
    vaddr: int,
    access: int,
    user: bool,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    read_pte: ReadPte,
    set_bits: SetBits,
) -> tuple[int, int]:
    """Translate ``vaddr``; return (4 KiB gpa frame, PROT_* allowed now)."""
    write = access == ACC_WRITE
    fetch = access == ACC_FETCH
    if efer & EFER_LMA:
        levels, esize, nbits = 4, 8, 9
        table = cr3 & ADDR_MASK
    elif cr4 & CR4_PAE:
        # PDPTE: the 4 entries at CR3[31:5]; not A/D-updated, no R/W/U bits
        pdpte = read_pte((cr3 & 0xFFFF_FFE0) + ((vaddr >> 30) & 3) * 8, 8)
        if not pdpte & _P:
            raise PageFault(vaddr, _errcode(False, write, user, fetch, efer))
        levels, esize, nbits = 2, 8, 9
        table = pdpte & ADDR_MASK
    else:
        levels, esize, nbits = 2, 4, 10
        table = cr3 & 0xFFFF_F000
    nx_on = bool(efer & EFER_NXE) and esize == 8
    allow_w = allow_u = True
    allow_x = True
    shift = 12 + nbits * (levels - 1)
    mask = (1 << nbits) - 1
    walked: list[tuple[int, int]] = []
    for level in range(levels, 0, -1):
        entry_gpa = table + ((vaddr >> shift) & mask) * esize
        e = read_pte(entry_gpa, esize)
        if not e & _P:
            raise PageFault(vaddr, _errcode(False, write, user, fetch, efer))
        allow_w = allow_w and bool(e & _RW)
        allow_u = allow_u and bool(e & _US)
        if nx_on and e & _NX:
            allow_x = False
        walked.append((entry_gpa, e))
        large = level > 1 and e & _PS and (level == 2 or (level == 3 and esize == 8)) and (
            esize == 8 or cr4 & CR4_PSE
        )
        if level == 1 or large:
            if esize == 8:
                frame = (e & ADDR_MASK) & ~((1 << shift) - 1)
            else:
                frame = e & 0xFFFF_F000 if not large else (e & 0xFFC0_0000) | ((e & 0x1FE000) << 19)
            frame |= vaddr & ((1 << shift) - 1) & ~0xFFF
            break
        table = e & (ADDR_MASK if esize == 8 else 0xFFFF_F000)
        shift -= nbits
    # permission checks (SDM 4.6)
    if user and not allow_u:
        raise PageFault(vaddr, _errcode(True, write, user, fetch, efer))
    if write and not allow_w and (user or cr0 & CR0_WP):
        raise PageFault(vaddr, _errcode(True, write, user, fetch, efer))
    if fetch and (not allow_x or (not user and allow_u and cr4 & CR4_SMEP)):
        raise PageFault(vaddr, _errcode(True, write, user, fetch, efer))
    # Accessed on every level, Dirty on the leaf for a write
    for i, (gpa, e) in enumerate(walked):
        bits = 0
        if not e & _A:
            bits |= _A
        if write and i == len(walked) - 1 and not e & _D:
            bits |= _D
        if bits:
            set_bits(gpa, bits)
    leaf = walked[-1][1]
    prot = PROT_R
    if allow_x and not (not user and allow_u and cr4 & CR4_SMEP):
        prot |= PROT_X
    if (allow_w or (not user and not cr0 & CR0_WP)) and (write or leaf & _D):
        prot |= PROT_W
    return frame, prot


def _errcode(present: bool, write: bool, user: bool, fetch: bool, efer: int) -> int:
    code = PFERR_PRESENT if present else 0
    if write:
        code |= PFERR_WRITE
    if user:
        code |= PFERR_USER
    if fetch and efer & EFER_NXE:
        code |= PFERR_FETCH
    return code


def walk64(
    vaddr: int,
    access: int,
    user: bool,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    table_view: Callable[[int], Any],
    set_bits: SetBits,
) -> tuple[int, int]:
    """:func:`walk` for 4-level paging only, unrolled for the TLB-fill hot path.

    ``table_view(gpa_of_table)`` returns an indexable of the table's 512 u64 entries.
    Same results and A/D updates as :func:`walk` (the tests run both).
    """
    write = access == ACC_WRITE
    fetch = access == ACC_FETCH
    nxe = efer & EFER_NXE
    table = cr3 & ADDR_MASK
    allow_w = allow_u = allow_x = True
    e4 = table_view(table)[(vaddr >> 39) & 511]
    if not e4 & _P:
        raise PageFault(vaddr, _errcode(False, write, user, fetch, efer))
    t3 = e4 & ADDR_MASK
    e3 = table_view(t3)[(vaddr >> 30) & 511]
    if not e3 & _P:
        raise PageFault(vaddr, _errcode(False, write, user, fetch, efer))
    walked = [(table + ((vaddr >> 39) & 511) * 8, e4), (t3 + ((vaddr >> 30) & 511) * 8, e3)]
    if e3 & _PS:
        frame = (e3 & ADDR_MASK & ~0x3FFF_FFFF) | (vaddr & 0x3FFF_F000)
    else:
        t2 = e3 & ADDR_MASK
        e2 = table_view(t2)[(vaddr >> 21) & 511]
        if not e2 & _P:
            raise PageFault(vaddr, _errcode(False, write, user, fetch, efer))
        walked.append((t2 + ((vaddr >> 21) & 511) * 8, e2))
        if e2 & _PS:
            frame = (e2 & ADDR_MASK & ~0x1F_FFFF) | (vaddr & 0x1F_F000)
        else:
            t1 = e2 & ADDR_MASK
            e1 = table_view(t1)[(vaddr >> 12) & 511]
            if not e1 & _P:
                raise PageFault(vaddr, _errcode(False, write, user, fetch, efer))
            walked.append((t1 + ((vaddr >> 12) & 511) * 8, e1))
            frame = e1 & ADDR_MASK
    for _g, e in walked:
        if not e & _RW:
            allow_w = False
        if not e & _US:
            allow_u = False
        if nxe and e & _NX:
            allow_x = False
    smep_blocks = not user and allow_u and cr4 & CR4_SMEP
    if user and not allow_u:
        raise PageFault(vaddr, _errcode(True, write, user, fetch, efer))
    if write and not allow_w and (user or cr0 & CR0_WP):
        raise PageFault(vaddr, _errcode(True, write, user, fetch, efer))
    if fetch and (not allow_x or smep_blocks):
        raise PageFault(vaddr, _errcode(True, write, user, fetch, efer))
    last = len(walked) - 1
    for i, (gpa, e) in enumerate(walked):
        bits = 0 if e & _A else _A
        if write and i == last and not e & _D:
            bits |= _D
        if bits:
            set_bits(gpa, bits)
    leaf = walked[last][1]
    prot = PROT_R
    if allow_x and not smep_blocks:
        prot |= PROT_X
    if (allow_w or (not user and not cr0 & CR0_WP)) and (write or leaf & _D):
        prot |= PROT_W
    return frame, prot


# bits of WalkCache's accumulated permissions
_AW = 1  # every level allows writes
_AU = 2  # every level allows user access
_AX = 4  # no level has NX (with EFER.NXE)
_PA = _P | _A
_LARGE = 0x1F_F000  # the 4 KiB frame inside a 2 MiB chunk


def _allow(e: int, nxe: int) -> int:
    a = 0
    if e & _RW:
        a |= _AW
    if e & _US:
        a |= _AU
    if not (nxe and e & _NX):
        a |= _AX
    return a


class WalkCache:
    """:func:`walk64` with a paging-structure cache (SDM vol. 3A §4.10.3), validated on every hit.

    One entry per 2 MiB of linear space: the PML4E, PDPTE and PDE that the walk
    read (where they are and their values), the page table they lead to (or the
    large leaf's frame) and the permissions accumulated above the PTE. A hit
    re-reads those entries and uses the entry only if all are unchanged, present,
    and already Accessed (and the leaf Dirty for a write), i.e. exactly when
    :func:`walk64` would read the same values and write nothing; anything else
    takes the full :func:`walk64`. So the result never differs from a fresh walk
    (a real CPU may even use stale entries until INVLPG/CR3 writes: this does not).
    The cache is keyed by (CR0, CR3, CR4, EFER) and must be cleared whenever the
    ``table_view`` views may become invalid (page-table pages remapped).
    """

    __slots__ = ("_map", "_tag", "max_entries", "set_bits", "table_view")

    def __init__(self, table_view: Callable[[int], Any], set_bits: SetBits, max_entries: int = 8192) -> None:
        self.table_view = table_view
        self.set_bits = set_bits
        #: entries kept before the cache starts over (bounds memory on huge guests)
        self.max_entries = max_entries
        self._map: dict[int, tuple[Any, ...]] = {}
        self._tag: tuple[int, int, int, int] = (-1, -1, -1, -1)

    def clear(self) -> None:
        self._map.clear()

    def __len__(self) -> int:
        return len(self._map)

    def walk(
        self, vaddr: int, access: int, user: bool, cr0: int, cr3: int, cr4: int, efer: int
    ) -> tuple[int, int]:
        """Same contract as :func:`walk64` (raises :class:`PageFault`)."""
        if cr3 != self._tag[1] or (cr0, cr3, cr4, efer) != self._tag:
            self._map.clear()
            self._tag = (cr0, cr3, cr4, efer)
        key = vaddr >> 21
        ent = self._map.get(key)
        if ent is not None:
            v4, i4, e4, v3, i3, e3, v2, i2, e2, pt, base, acc, protab = ent
            if v4[i4] == e4 and v3[i3] == e3 and v2[i2] == e2:
                if pt is None:
                    # large leaf: the permissions of each (access, user) are precomputed
                    prot = protab[access + 3 if user else access]
                    if prot >= 0:
                        return base | (vaddr & _LARGE), prot
                else:
                    leaf = pt[(vaddr >> 12) & 511]
                    if leaf & _PA == _PA and (access != ACC_WRITE or leaf & _D):
                        prot = _finish(acc & _allow(leaf, efer & EFER_NXE), leaf, access, user, cr0, cr4)
                        if prot >= 0:
                            return leaf & ADDR_MASK, prot
        frame, prot = walk64(vaddr, access, user, cr0, cr3, cr4, efer, self.table_view, self.set_bits)
        self._fill(key, vaddr, cr0, cr3, cr4, efer)
        return frame, prot

    def _fill(self, key: int, vaddr: int, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        """Remember the upper levels of the walk just done (values after its A/D updates)."""
        tv = self.table_view
        nxe = efer & EFER_NXE
        v4 = tv(cr3 & ADDR_MASK)
        i4 = (vaddr >> 39) & 511
        e4 = v4[i4]
        v3 = tv(e4 & ADDR_MASK)
        i3 = (vaddr >> 30) & 511
        e3 = v3[i3]
        acc = _allow(e4, nxe) & _allow(e3, nxe)
        if e3 & _PS:
            # 1 GiB leaf: the PDE slot repeats the PDPTE check
            v2, i2, e2, pt, base = v3, i3, e3, None, (e3 & ADDR_MASK & ~0x3FFF_FFFF) | (vaddr & 0x3FE0_0000)
        else:
            v2 = tv(e3 & ADDR_MASK)
            i2 = (vaddr >> 21) & 511
            e2 = v2[i2]
            acc &= _allow(e2, nxe)
            if e2 & _PS:
                pt, base = None, e2 & ADDR_MASK & ~0x1F_FFFF
            else:
                pt, base = tv(e2 & ADDR_MASK), 0
        if not (e4 & _A and e3 & _A and e2 & _A):
            return  # cannot happen after a successful walk; never cache a walk that must write
        protab: tuple[int, ...] = ()
        if pt is None:
            # index access + 3 * user; -1: the full walk (a fault, or D to set)
            protab = tuple(
                -1 if a == ACC_WRITE and not e2 & _D else _finish(acc, e2, a, u, cr0, cr4)
                for u in (False, True)
                for a in (ACC_READ, ACC_WRITE, ACC_FETCH)
            )
        m = self._map
        if len(m) >= self.max_entries:
            m.clear()
        m[key] = (v4, i4, e4, v3, i3, e3, v2, i2, e2, pt, base, acc, protab)


def _finish(acc: int, leaf: int, access: int, user: bool, cr0: int, cr4: int) -> int:
    """walk64's permission checks and TLB permissions from the accumulated ones; -1: would fault."""
    allow_u = acc & _AU
    smep_blocks = not user and allow_u and cr4 & CR4_SMEP
    if user and not allow_u:
        return -1
    if access == ACC_WRITE:
        if not acc & _AW and (user or cr0 & CR0_WP):
            return -1
    elif access == ACC_FETCH and (not acc & _AX or smep_blocks):
        return -1
    prot = PROT_R
    if acc & _AX and not smep_blocks:
        prot |= PROT_X
    if (acc & _AW or (not user and not cr0 & CR0_WP)) and (access == ACC_WRITE or leaf & _D):
        prot |= PROT_W
    return prot
