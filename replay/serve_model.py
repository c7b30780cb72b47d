"""The timing-dependent part of ``replay --mode serve``: answers that no call-by-call match can give.

Pure (no fds, no threads, no waiting): `replay.serve.ReplayKernel` asks a :class:`ServeModel`
and does the blocking itself. Recorded calls split in two (at construction):

* the **ordered** calls — setup and teardown of the engine's main thread, every vCPU's calls
  (``KVM_RUN`` exits in recorded order) — go to `replay.match.Matcher`, byte for byte;
* the calls whose bytes or order are *timing* are answered here, by the rules
  `replay.streams` uses for ``verify`` (sets and coverage, never order):

  - **uffd messages** (``read`` on a userfaultfd): the recorded ``uffd_msg`` batches form a
    queue, handed out in recorded order to whichever thread reads; ``EAGAIN`` when none is
    *deliverable*. A ``UFFD_EVENT_PAGEFAULT`` raised by vCPU *i* during its *k*-th recorded
    ``KVM_RUN`` becomes deliverable once the live vCPU *i* has entered its *k*-th ``KVM_RUN``
    (causality: a vCPU faults inside ``KVM_RUN``); ``ptid`` is rewritten to the tid the live
    vCPU thread was given by ``gettid``.
  - **``KVM_RUN`` gates**: that *k*-th ``KVM_RUN`` returns only once the pages its faults asked
    for are filled in the live run (the real vCPU slept in ``handle_userfault`` till then).
  - **fills** (``UFFDIO_COPY``/``ZEROPAGE``/``CONTINUE``/``POISON``, ``UFFDIO_WAKE``): a per-page
    bitmap of each registered range says present or not and the answer follows the kernel
    (``fs/userfaultfd.c``, uapi.md §5): all done -> 0; stopped at a present page after
    progress -> ``EAGAIN`` with the bytes done; at the first page -> ``EEXIST`` (-17); not
    registered -> ``ENOENT`` (-2). A fill that places a page the recording never filled, or
    fills with a kind the recording never filled with, is a divergence; at the end every
    page the recording filled must be filled (coverage).
  - **eventfds**: a live counter (``write`` adds, ``read`` takes it or ``EAGAIN``).
  - **``poll``**: the fd set must be one the recording polled; a userfaultfd is ready when a
    message is deliverable, an eventfd when its counter is non-zero.
  - **``KVM_SET_MEMORY_ATTRIBUTES`` of worker threads** (conversions batched by timing): answered
    0, the attribute value must be one the recording set; the final attributes must equal the
    recording's.
  - **worker threads' anonymous ``mmap``** (buffers grown as batches need): any recorded one of
    the same length/prot/flags; one the recording does not have is served too (the kernel
    counts it in ``extra_maps``), and so is its ``munmap``.
  - ``gettid``: each live thread keeps the first recorded tid it is handed.
  - **REMOVE events** (a VMM's ``madvise(MADV_DONTNEED/MADV_REMOVE)`` over registered memory,
    e.g. a balloon): the live ``madvise`` drops the pages (present again only when filled
    again; ``UFFDIO_ZEROPAGE`` is then a right fill whatever the recording used) and raises
    the next recorded REMOVE message, which is deliverable only then; until it is read every
    fill and wake answers ``EAGAIN`` with no progress (-11), as the kernel does.

  Messages for a range unregistered meanwhile are dropped (``UFFDIO_UNREGISTER`` wakes the
  faulting threads and takes their messages away); a recorded fault never read is fine when
  the live run filled its page first (that fault would not have happened), not otherwise.

Addresses here are the *recorded* ones: the kernel translates live -> recorded before asking.
"""

from __future__ import annotations

import errno as E
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fakekvm.abi import uffd as U
from fakekvm.fake.kvm.attributes import RangeAttributes
from replay.events import Call

MSG = U.UFFD_MSG_SIZE
#: the gate key of REMOVE events (vCPU gates use the vCPU index)
REMOVES = -1
#: madvise advice that drops pages and raises UFFD_EVENT_REMOVE on a registered range
REMOVE_ADVICE = frozenset({4, 9})  # MADV_DONTNEED, MADV_REMOVE
_MSG = U.uffd_msg_pagefault_fmt  # event, flags, address, ptid
_PTID_OFF = 24
_ATTRS = struct.Struct("<QQQQ")  # kvm_memory_attributes: address, size, attributes, flags
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


@dataclass(eq=False)
class MessageBatch:
    """One recorded successful ``read`` of a userfaultfd, waiting to be handed out."""

    call: Call
    data: bytes
    #: vcpu -> KVM_RUNs it must have entered before the batch is deliverable
    gates: dict[int, int] = field(default_factory=dict)


def _bit(b: bytearray, i: int) -> bool:
    return bool(b[i >> 3] & (1 << (i & 7)))


def _set(b: bytearray, i: int) -> None:
    b[i >> 3] |= 1 << (i & 7)


class ServeModel:
    """See the module docstring. ``calls``: the whole recording, in trace order."""

    def __init__(self, calls: Sequence[Call], *, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.main_tid = calls[0].tid if calls else -1
        self.ordered: list[Call] = []
        #: workers' fallocate calls (refills of punched page-cache pages): answered, not matched
        self.refill_calls: list[Call] = []
        #: recorded tid -> vCPU index (the threads that called KVM_RUN)
        self.tid_vcpu: dict[int, int] = {}
        runs: dict[int, list[Call]] = {}
        for c in calls:
            if c.op == "ioctl" and c.name == "KVM_RUN" and c.fd_kind.startswith("kvm-vcpu:"):
                v = int(c.fd_kind.split(":", 1)[1])
                self.tid_vcpu.setdefault(c.tid, v)
                runs.setdefault(v, []).append(c)
        for rs in runs.values():
            rs.sort(key=lambda c: c.t_ns)
        self.messages: dict[int, deque[MessageBatch]] = {}
        self.pollsets: set[bytes] = set()
        self.eventfds: dict[int, int] = {}
        self.fill_kinds: set[str] = set()  #: kinds that placed pages in the recording
        self.attr_values: set[int] = set()
        self.rec_attrs = RangeAttributes()
        self.live_attrs = RangeAttributes()
        self.attr_calls: list[Call] = []
        self.pool: list[Call] = []  #: worker threads' anonymous mmaps
        #: (vcpu, index of its KVM_RUN) -> recorded host addresses it waited for
        self.run_gates: dict[tuple[int, int], list[int]] = {}
        self.runs_entered: dict[int, int] = {}
        self.fill_calls: list[Call] = []
        self._regs: list[_Reg] = []
        self._rec_fills: list[Call] = []
        self._rec_removes = 0
        self.removes_raised = 0  #: live madvise calls that raised a REMOVE
        self.removes_read = 0  #: REMOVE messages handed out
        self._gettid_values: list[int] = []
        self._gettid_of: dict[int, int] = {}  #: live thread -> the recorded tid it was given
        self._vcpu_tid: dict[int, int] = {}  #: vCPU -> tid its live thread was given
        self.counters = {"messages": 0, "fills": 0, "pages": 0, "eexist": 0, "eagain": 0,
                         "wakes": 0, "polls": 0, "attributes": 0, "dropped": 0,
                         "removes": 0, "extra_maps": 0, "refills": 0}  # fmt: skip
        self._split(calls, runs)

    # -- building ----------------------------------------------------------------------------
    def _split(self, calls: Sequence[Call], runs: dict[int, list[Call]]) -> None:
        pooled: set[int] = set()
        for c in calls:
            op, kind = c.op, c.fd_kind
            if op == "poll":
                self.pollsets.add(c.inp)
            elif op == "gettid":
                if c.ret not in self._gettid_values:
                    self._gettid_values.append(c.ret)
            elif op in ("read", "write") and kind == "eventfd":
                pass
            elif op == "read" and kind == "userfaultfd":
                if not c.errno and c.out:
                    self.messages.setdefault(c.fd, deque()).append(self._batch(c, runs))
            elif op == "ioctl" and kind == "userfaultfd" and c.request in MODEL_UFFD_IOCTLS:
                self.fill_calls.append(c)
                self._rec_fills.append(c)
            elif op == "ioctl" and c.name == "KVM_SET_MEMORY_ATTRIBUTES" and c.tid != self.main_tid:
                if not c.errno and len(c.inp) >= _ATTRS.size:
                    address, size, value, _flags = _ATTRS.unpack_from(c.inp)
                    self.attr_values.add(value)
                    self.rec_attrs.set(address >> 12, (address + size) >> 12, value)
                self.attr_calls.append(c)
            elif op == "fallocate" and c.tid != self.main_tid:
                # a worker refilling a page a REMOVE punched out of the page cache before its
                # CONTINUE (uffd-minor): how many depends on timing, like the fills
                self.refill_calls.append(c)
            elif op == "mmap" and c.fd < 0 and c.tid != self.main_tid and not c.errno:
                self.pool.append(c)
                pooled.add(c.ret)
            else:
                if op == "ioctl" and c.name == "UFFDIO_REGISTER" and not c.errno:
                    self._rec_register(c)
                self.ordered.append(c)
        for c in self._rec_fills:
            self._rec_fill(c)

    def _batch(self, c: Call, runs: dict[int, list[Call]]) -> MessageBatch:
        b = MessageBatch(c, c.out)
        end = c.t_ns + c.dur_ns
        for off in range(0, len(c.out) - MSG + 1, MSG):
            if c.out[off] == U.UFFD_EVENT_REMOVE:
                # raised by a madvise: deliverable once the live run made as many
                self._rec_removes += 1
                b.gates[REMOVES] = self._rec_removes
                continue
            if c.out[off] != U.UFFD_EVENT_PAGEFAULT:
                continue
            _ev, _flags, address, ptid = _MSG.unpack_from(c.out, off)
            v = self.tid_vcpu.get(ptid)
            if v is None:
                continue
            entered = [r for r in runs.get(v, []) if r.t_ns <= end]
            if not entered:
                continue
            k = len(entered) - 1
            b.gates[v] = max(b.gates.get(v, 0), k + 1)
            r = entered[-1]
            if r.t_ns + r.dur_ns >= end:  # the run was still in progress: it waited for it
                self.run_gates.setdefault((v, k), []).append(address & ~(self.page_size - 1))
        return b

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

    # -- messages ----------------------------------------------------------------------------
    def _deliverable(self, b: MessageBatch) -> bool:
        return all(
            (self.removes_raised if v == REMOVES else self.runs_entered.get(v, 0)) >= k
            for v, k in b.gates.items()
        )

    def readable(self, fd: int) -> bool:
        return any(self._deliverable(b) for b in self.messages.get(fd, ()))

    def read_messages(self, fd: int, n: int) -> bytes | None:
        """The next deliverable recorded batch (at most ``n`` bytes of it, whole messages), or
        None (the caller answers EAGAIN). ``ptid``s are rewritten to the live vCPU tids."""
        q = self.messages.get(fd)
        if not q:
            return None
        for b in list(q):
            if not self._deliverable(b):
                continue
            b.data = self._still_raised(fd, b.data)
            if not b.data:
                q.remove(b)
                continue
            take = max(MSG, n // MSG * MSG)
            data, rest = b.data[:take], b.data[take:]
            if rest:
                b.data = rest
            else:
                q.remove(b)
            self.counters["messages"] += len(data) // MSG
            self.removes_read += sum(
                1 for off in range(0, len(data), MSG) if data[off] == U.UFFD_EVENT_REMOVE
            )
            return self._live_ptids(data)
        return None

    def _still_raised(self, fd: int, data: bytes) -> bytes:
        """``data`` without the page faults on ranges no longer registered: unregistering
        wakes their threads and takes their messages off the queue (``fs/userfaultfd.c``)."""
        keep = []
        for off in range(0, len(data) - MSG + 1, MSG):
            m = data[off : off + MSG]
            if m[0] == U.UFFD_EVENT_PAGEFAULT:
                address = _MSG.unpack(m)[2]
                if self._reg_of(fd, address, any_state=True) is not None and (
                    self._reg_of(fd, address) is None
                ):
                    self.counters["dropped"] += 1
                    continue
            keep.append(m)
        return b"".join(keep)

    def _live_ptids(self, data: bytes) -> bytes:
        buf: bytearray | None = None
        for off in range(0, len(data) - MSG + 1, MSG):
            if data[off] != U.UFFD_EVENT_PAGEFAULT:
                continue
            ptid = int.from_bytes(data[off + _PTID_OFF : off + _PTID_OFF + 4], "little")
            v = self.tid_vcpu.get(ptid)
            live = self._vcpu_tid.get(v, ptid) if v is not None else ptid
            if live != ptid:
                if buf is None:
                    buf = bytearray(data)
                buf[off + _PTID_OFF : off + _PTID_OFF + 4] = (live & 0xFFFFFFFF).to_bytes(
                    4, "little"
                )
        return data if buf is None else bytes(buf)

    def undelivered(self) -> list[MessageBatch]:
        return [b for q in self.messages.values() for b in q]

    # -- vCPUs -------------------------------------------------------------------------------
    def run_entered(self, vcpu: int, live_thread: int) -> int:
        """A live ``KVM_RUN`` on ``vcpu`` matched; returns its index (0, 1, ...)."""
        k = self.runs_entered.get(vcpu, 0)
        self.runs_entered[vcpu] = k + 1
        if vcpu not in self._vcpu_tid and live_thread in self._gettid_of:
            self._vcpu_tid[vcpu] = self._gettid_of[live_thread]
        return k

    def run_waits_for(self, vcpu: int, index: int) -> list[int]:
        """Recorded addresses of the pages the ``index``-th KVM_RUN of ``vcpu`` still waits for."""
        return [a for a in self.run_gates.get((vcpu, index), ()) if not self.page_filled(a)]

    def gettid(self, live_thread: int) -> int | None:
        """The recorded tid this live thread stands for (None: none left, use the live one)."""
        got = self._gettid_of.get(live_thread)
        if got is not None:
            return got
        given = set(self._gettid_of.values())
        for t in self._gettid_values:
            if t not in given:
                self._gettid_of[live_thread] = t
                return t
        return None

    # -- eventfds and poll -------------------------------------------------------------------
    def eventfd_created(self, fd: int, initval: int) -> None:
        self.eventfds[fd] = initval

    def eventfd_write(self, fd: int, data: bytes) -> int:
        if len(data) < 8:
            return -E.EINVAL
        value = int.from_bytes(data[:8], "little")
        if value == 0xFFFF_FFFF_FFFF_FFFF:
            return -E.EINVAL
        self.eventfds[fd] = self.eventfds.get(fd, 0) + value
        return 8

    def eventfd_read(self, fd: int, n: int) -> bytes | int:
        """The counter (reset to 0), or -errno (EINVAL: n < 8; EAGAIN: zero, non-blocking)."""
        if n < 8:
            return -E.EINVAL
        v = self.eventfds.get(fd, 0)
        if not v:
            return -E.EAGAIN
        self.eventfds[fd] = 0
        return v.to_bytes(8, "little")

    def check_pollset(self, inp: bytes) -> bool:
        return inp in self.pollsets

    def poll_ready(
        self, fds: Iterable[tuple[int, int]], kinds: dict[int, str]
    ) -> list[tuple[int, int]]:
        """(fd, revents) of the ready fds (POLLIN only: what the engine polls for)."""
        out = []
        for fd, events in fds:
            kind = kinds.get(fd, "")
            if not events & 1:
                continue
            if (kind == "userfaultfd" and self.readable(fd)) or (
                kind == "eventfd" and self.eventfds.get(fd, 0)
            ):
                out.append((fd, 1))
        return out

    # -- attributes and pooled mmaps ---------------------------------------------------------
    def set_attributes(self, inp: bytes) -> int:
        """A worker's ``KVM_SET_MEMORY_ATTRIBUTES`` (0, or raises `ModelDivergence`)."""
        if len(inp) < _ATTRS.size:
            return E.EINVAL
        address, size, value, flags = _ATTRS.unpack_from(inp)
        if flags or address % 4096 or size % 4096 or not size:
            return E.EINVAL
        if value not in self.attr_values:
            raise ModelDivergence(
                f"KVM_SET_MEMORY_ATTRIBUTES sets {value:#x}; the recording's workers set only "
                f"{', '.join(hex(v) for v in sorted(self.attr_values)) or 'nothing'}",
                self.attr_calls[0] if self.attr_calls else None,
            )
        self.live_attrs.set(address >> 12, (address + size) >> 12, value)
        self.counters["attributes"] += 1
        return 0

    def take_pooled_mmap(self, length: int, args: tuple[int, ...]) -> Call | None:
        for i, c in enumerate(self.pool):
            if c.iarg == length and tuple(c.args[:3]) == tuple(args[:3]):
                return self.pool.pop(i)
        return None

    # -- the end -----------------------------------------------------------------------------
    def finish(self) -> list[str]:
        """What the live run left undone that the recording did (empty: nothing)."""
        problems: list[str] = []
        ps = self.page_size
        for reg in self._regs:
            lost = int.from_bytes(reg.covered, "little") & ~int.from_bytes(reg.filled, "little")
            if lost:
                first = (lost & -lost).bit_length() - 1
                problems.append(
                    f"coverage: {lost.bit_count()} page(s) the recording filled were never filled "
                    f"(userfaultfd {reg.fd}, the first at {reg.start + first * ps:#x})"
                )
        # a recorded fault whose page the live run filled first would not have been raised
        # (timing); one whose page is still missing is a fault the engine never served
        left = [
            (b, off)
            for b in self.undelivered()
            for off in range(0, len(b.data) - MSG + 1, MSG)
            if b.data[off] == U.UFFD_EVENT_PAGEFAULT
            and self._reg_of(b.call.fd, _MSG.unpack_from(b.data, off)[2]) is not None
            and not self.page_filled(_MSG.unpack_from(b.data, off)[2])
        ]  # (a fault on a range unregistered since was woken and taken off the queue)
        if left:
            b, off = left[0]
            problems.append(
                f"{len(left)} recorded page fault(s) never read and never filled (the first: "
                f"read #{b.call.seq}, address {_MSG.unpack_from(b.data, off)[2]:#x})"
            )
        ra, rb = self.rec_attrs.runs(0, 1 << 52), self.live_attrs.runs(0, 1 << 52)
        if ra != rb:
            i = next(
                (j for j, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y),
                min(len(ra), len(rb)),
            )
            problems.append(
                f"attributes: the recording ends with gfn runs {ra[i : i + 1]}, the live run "
                f"with {rb[i : i + 1]}"
            )
        return problems

    def covered_pages(self) -> int:
        return sum(int.from_bytes(r.covered, "little").bit_count() for r in self._regs)
