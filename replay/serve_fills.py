"""The registered ranges of a served migration trace, and the kernel's answer to each fill.

The part of `replay.serve_model.ServeModel` (its base class, `FillRules`) that keeps per-page
state: a bitmap of each registered range (recorded addresses) says present or not, and a
fill (``UFFDIO_COPY``/``ZEROPAGE``/``CONTINUE``/``POISON``, ``UFFDIO_WAKE``) is answered as the
kernel does (``fs/userfaultfd.c``, uapi.md §5): all done -> 0; stopped at a present page after
progress -> ``EAGAIN`` with the bytes done; at the first page -> ``EEXIST`` (-17); not
registered -> ``ENOENT`` (-2). A fill that places a page the recording never filled, or fills
with a kind the recording never filled with, is a `ModelDivergence`; at the end every page the
recording filled must be filled (coverage). A live ``madvise(MADV_DONTNEED/MADV_REMOVE)`` over
a registered range drops its pages (`FillRules.removed`); until the REMOVE event it raises is
read, every fill and wake answers ``EAGAIN`` with no progress (-11). Pure: no fds, no threads.
"""

from __future__ import annotations

import errno as E
import struct
from dataclasses import dataclass, field

from fakekvm.abi import uffd as U
from replay.events import Call

__all__ = [
    "FILLS",
    "MODEL_UFFD_IOCTLS",
    "REMOVE_ADVICE",
    "FillAnswer",
    "FillKind",
    "FillRules",
    "ModelDivergence",
]

#: madvise advice that drops pages and raises UFFD_EVENT_REMOVE on a registered range
REMOVE_ADVICE = frozenset({4, 9})  # MADV_DONTNEED, MADV_REMOVE
_REGISTER = U.uffdio_register_fmt
_RANGE = U.uffdio_range_fmt


@dataclass(frozen=True)
class FillKind:
    name: str
    fmt: struct.Struct
    len_i: int  #: index of the length field (the address is field 0)
    prog_i: int  #: index of the signed result field (bytes done or -errno)


FILLS: dict[int, FillKind] = {
    U.UFFDIO_COPY: FillKind("UFFDIO_COPY", U.uffdio_copy_fmt, 2, 4),
    U.UFFDIO_ZEROPAGE: FillKind("UFFDIO_ZEROPAGE", U.uffdio_zeropage_fmt, 1, 3),
    U.UFFDIO_CONTINUE: FillKind("UFFDIO_CONTINUE", U.uffdio_continue_fmt, 1, 3),
    U.UFFDIO_POISON: FillKind("UFFDIO_POISON", U.uffdio_poison_fmt, 1, 3),
}
#: ioctls on a userfaultfd answered by the model (UFFDIO_MOVE is not modelled: ordered)
MODEL_UFFD_IOCTLS = frozenset({*FILLS, U.UFFDIO_WAKE})


class ModelDivergence(Exception):
    """The live call breaks a rule of the model; ``expected``: the recorded call nearest to it."""

    def __init__(self, reason: str, expected: Call | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expected = expected


@dataclass
class FillAnswer:
    """The kernel's answer to one fill: ``errno`` 0 or the error, ``done`` bytes placed from
    the start of the range, ``result`` the signed value the kernel writes back."""

    errno: int
    done: int
    result: int


@dataclass
class _Reg:
    """One registered range (recorded addresses) and which of its pages are present."""

    fd: int
    start: int
    length: int
    mode: int
    present: bytearray
    covered: bytearray  #: pages some recorded fill placed
    registered: bool = True
    #: pages a live madvise(DONTNEED/REMOVE) dropped since they were last filled
    removed: bytearray = field(default_factory=bytearray)
    #: pages some live fill placed (ever: a REMOVE does not take that back)
    filled: bytearray = field(default_factory=bytearray)


def _bit(b: bytearray, i: int) -> bool:
    return bool(b[i >> 3] & (1 << (i & 7)))


def _set(b: bytearray, i: int) -> None:
    b[i >> 3] |= 1 << (i & 7)


class FillRules:
    """Registered ranges, their pages, and the fills: the base of `ServeModel`, which builds
    them from the recording (`_rec_register`, `_rec_fill`) and sets up ``counters``."""

    #: the model's counters (set up by `ServeModel`); this part counts fills, pages, eexist,
    #: eagain, wakes and removes
    counters: dict[str, int]

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.fill_kinds: set[str] = set()  #: kinds that placed pages in the recording
        self.fill_calls: list[Call] = []
        self._regs: list[_Reg] = []
        self._rec_fills: list[Call] = []
        self.removes_raised = 0  #: live madvise calls that raised a REMOVE
        self.removes_read = 0  #: REMOVE messages handed out

    # -- building (from the recording) --------------------------------------------------------
    def _rec_register(self, c: Call) -> None:
        if len(c.inp) < _REGISTER.size:
            return
        start, length, mode, _ = _REGISTER.unpack_from(c.inp)
        n = -(-length // self.page_size)
        nb = (n + 7) // 8
        reg = _Reg(c.fd, start, length, mode, bytearray(nb), bytearray(nb), registered=False,
                   removed=bytearray(nb), filled=bytearray(nb))  # fmt: skip
        self._regs.append(reg)

    def _rec_fill(self, c: Call) -> None:
        kind = FILLS.get(c.request)
        if kind is None or len(c.inp) < kind.fmt.size:
            return
        vals = kind.fmt.unpack_from(c.out if len(c.out) >= kind.fmt.size else c.inp)
        start, length = vals[0], vals[kind.len_i]
        done = length if c.errno == 0 else vals[kind.prog_i]
        if done <= 0:
            return
        self.fill_kinds.add(kind.name)
        ps = self.page_size
        for a in range(start & ~(ps - 1), start + done, ps):
            reg = self._reg_of(c.fd, a, any_state=True)
            if reg is not None:
                _set(reg.covered, (a - reg.start) // ps)

    def _reg_of(self, fd: int, address: int, *, any_state: bool = False) -> _Reg | None:
        for reg in reversed(self._regs):
            inside = reg.fd == fd and reg.start <= address < reg.start + reg.length
            if inside and (any_state or reg.registered):
                return reg
        return None

    # -- registration (told by the kernel when the ordered call matched) -----------------------
    def registered(self, fd: int, start: int, length: int) -> None:
        for reg in self._regs:
            if reg.fd == fd and reg.start == start and reg.length == length:
                reg.registered = True
                return

    def unregistered(self, fd: int, start: int, length: int) -> None:
        for reg in self._regs:
            if reg.fd == fd and start <= reg.start and reg.start + reg.length <= start + length:
                reg.registered = False

    # -- fills -------------------------------------------------------------------------------
    def fill(self, fd: int, request: int, inp: bytes) -> FillAnswer:
        """Answer a fill ioctl (``inp``: the live struct, addresses already recorded ones)."""
        kind = FILLS[request]
        vals = kind.fmt.unpack_from(inp)
        start, length = vals[0], vals[kind.len_i]
        ps = self.page_size
        if length == 0 or start % ps or length % ps:
            return FillAnswer(E.EINVAL, 0, vals[kind.prog_i])
        reg = self._reg_of(fd, start)
        if reg is None or start + length > reg.start + reg.length:
            return FillAnswer(E.ENOENT, 0, -E.ENOENT)
        if self.removes_raised > self.removes_read:  # a REMOVE is unread: no progress
            self.counters["eagain"] += 1
            return FillAnswer(E.EAGAIN, 0, -E.EAGAIN)
        first = (start - reg.start) // ps
        n = length // ps
        i = 0
        while i < n and not _bit(reg.present, first + i):
            i += 1
        if i:
            refill = kind.name == "UFFDIO_ZEROPAGE" and all(
                _bit(reg.removed, j) for j in range(first, first + i)
            )  # zeros are the content of a page the guest gave up: any recorded kind will do
            for j in range(first, first + i):
                if not _bit(reg.covered, j):
                    raise ModelDivergence(
                        f"{kind.name} places page {start + (j - first) * ps:#x} "
                        f"(page {j} of the registered range), which the recording never filled",
                        self._nearest_fill(fd, start + (j - first) * ps),
                    )
            if kind.name not in self.fill_kinds and not refill:
                raise ModelDivergence(
                    f"{kind.name} places pages but the recording filled only with "
                    f"{', '.join(sorted(self.fill_kinds)) or 'nothing'}",
                    self._nearest_fill(fd, start),
                )
            for j in range(first, first + i):
                _set(reg.present, j)
                _set(reg.filled, j)
                reg.removed[j >> 3] &= ~(1 << (j & 7))
            self.counters["fills"] += 1
            self.counters["pages"] += i
        if i == n:
            return FillAnswer(0, length, length)
        if i:
            self.counters["eagain"] += 1
            return FillAnswer(E.EAGAIN, i * ps, i * ps)  # partial progress, then a present page
        self.counters["eexist"] += 1
        return FillAnswer(E.EEXIST, 0, -E.EEXIST)

    def wake(self, fd: int, inp: bytes) -> int:
        """``UFFDIO_WAKE``: 0, EINVAL for an unaligned or empty range, EAGAIN while a REMOVE
        is unread."""
        start, length = _RANGE.unpack_from(inp)
        if length == 0 or start % self.page_size or length % self.page_size:
            return E.EINVAL
        if self.removes_raised > self.removes_read:
            self.counters["eagain"] += 1
            return E.EAGAIN
        self.counters["wakes"] += 1
        return 0

    def removed(self, address: int, length: int, advice: int) -> int:
        """A live ``madvise`` matched (recorded addresses): on a registered range,
        DONTNEED/REMOVE drops its pages and raises one REMOVE event; returns the number of
        REMOVE events raised so far (0: none raised by this call)."""
        if advice not in REMOVE_ADVICE:
            return 0
        ps = self.page_size
        hit = False
        for reg in self._regs:
            if not reg.registered:
                continue
            lo, hi = max(address, reg.start), min(address + length, reg.start + reg.length)
            if lo >= hi:
                continue
            hit = True
            for j in range((lo - reg.start) // ps, -(-(hi - reg.start) // ps)):
                reg.present[j >> 3] &= ~(1 << (j & 7))
                _set(reg.removed, j)
        if not hit:
            return 0
        self.removes_raised += 1
        self.counters["removes"] += 1
        return self.removes_raised

    def present(self, fd: int, address: int) -> bool:
        """Is the page at recorded ``address`` of a range of ``fd`` filled? (True if not ours.)"""
        reg = self._reg_of(fd, address, any_state=True)
        if reg is None:
            return True
        return _bit(reg.present, (address - reg.start) // self.page_size)

    def page_filled(self, address: int) -> bool:
        """Is the page at recorded ``address`` filled, in whichever registration holds it?"""
        for reg in self._regs:
            if reg.start <= address < reg.start + reg.length:
                return _bit(reg.present, (address - reg.start) // self.page_size)
        return True

    def _nearest_fill(self, fd: int, address: int) -> Call | None:
        best: tuple[int, Call] | None = None
        for c in self._rec_fills:
            if c.fd != fd or len(c.inp) < 8:
                continue
            d = abs(int.from_bytes(c.inp[:8], "little") - address)
            if best is None or d < best[0]:
                best = (d, c)
        return best[1] if best else None

    def covered_pages(self) -> int:
        return sum(int.from_bytes(r.covered, "little").bit_count() for r in self._regs)
