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
    (``fs/userfaultfd.c``, uapi.md §5); a fill that places a page the recording never filled,
    or fills with a kind the recording never filled with, is a divergence; at the end every
    page the recording filled must be filled (coverage). These rules, and the ranges' pages,
    live in `replay.serve_fills` (`FillRules`, the base class of `ServeModel`).
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
The fill-side public names (`FILLS`, `MODEL_UFFD_IOCTLS`, `ModelDivergence`, ...) are
re-exported here.
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
from replay.serve_fills import (
    FILLS,
    MODEL_UFFD_IOCTLS,
    REMOVE_ADVICE,
    FillAnswer,
    FillKind,
    FillRules,
    ModelDivergence,
)

__all__ = [
    "FILLS",
    "MODEL_UFFD_IOCTLS",
    "MSG",
    "REMOVES",
    "REMOVE_ADVICE",
    "FillAnswer",
    "FillKind",
    "MessageBatch",
    "ModelDivergence",
    "ServeModel",
]

MSG = U.UFFD_MSG_SIZE
#: the gate key of REMOVE events (vCPU gates use the vCPU index)
REMOVES = -1
_MSG = U.uffd_msg_pagefault_fmt  # event, flags, address, ptid
_PTID_OFF = 24
_ATTRS = struct.Struct("<QQQQ")  # kvm_memory_attributes: address, size, attributes, flags


@dataclass(eq=False)
class MessageBatch:
    """One recorded successful ``read`` of a userfaultfd, waiting to be handed out."""

    call: Call
    data: bytes
    #: vcpu -> KVM_RUNs it must have entered before the batch is deliverable
    gates: dict[int, int] = field(default_factory=dict)


class ServeModel(FillRules):
    """See the module docstring. ``calls``: the whole recording, in trace order."""

    def __init__(self, calls: Sequence[Call], *, page_size: int = 4096) -> None:
        super().__init__(page_size)
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
        self.attr_values: set[int] = set()
        self.rec_attrs = RangeAttributes()
        self.live_attrs = RangeAttributes()
        self.attr_calls: list[Call] = []
        self.pool: list[Call] = []  #: worker threads' anonymous mmaps
        #: (vcpu, index of its KVM_RUN) -> recorded host addresses it waited for
        self.run_gates: dict[tuple[int, int], list[int]] = {}
        self.runs_entered: dict[int, int] = {}
        self._rec_removes = 0
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
