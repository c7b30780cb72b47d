"""Matching a live run's kernel calls against a recorded trace (pure: no I/O, no threads).

`ReplayKernel` (:mod:`replay.serve`) asks a :class:`Matcher` for the recorded `Call` that
answers each call the engine makes now; the matcher never touches a kernel, so it is driven
directly by tests.

Rules:

* **Streams, not tids.** Thread ids differ between runs, so recorded calls are split into
  streams by what they act on: the ``fd_kind`` of their fd (``kvm-vcpu:0``, ``userfaultfd``,
  ``kvm-vm``, ...) or, for calls without an fd, a stream per family (``mm`` for
  mmap/munmap/mremap/madvise, ``files`` for open/userfaultfd/eventfd/memfd_create, ``poll``).
  Each stream is consumed in recorded order.
* **Threads may interleave differently.** A live call may match a later pending call of its
  stream (up to ``window`` calls ahead) as long as no earlier pending call of the stream was
  made by the same *recorded* thread: each recorded thread's order is kept, different
  threads' calls on one stream may swap.
* **What must be equal:** op, name (ioctl number), fd_kind, the integer arguments and the
  input bytes — after addresses are translated (live → recorded) with an :class:`AddressMap`
  built from the matched mmaps, since the live run's mappings are elsewhere. Times and tids
  never count. (The live call is described as the recorder would record it, so guest data
  written without ``--with-contents`` is a length on both sides.)
* ``close`` and ``munmap`` match any pending recorded call of their stream (a multiset: teardown
  order is timing) and never hold back a later call of their recorded thread.
* Calls whose bytes or order are timing (fills, uffd messages, polls, eventfd kicks, ...) never
  reach the matcher: `replay.serve_model` answers them.
* A call that matches nothing raises :class:`Divergence` carrying the expected call (the first
  pending call of the stream), the live call, and the last calls matched before it.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from replay.events import Call

_Q = struct.Struct("<Q")
_MM_OPS = frozenset({"mmap", "munmap", "mremap", "madvise"})
_FILE_OPS = frozenset({"open", "userfaultfd", "eventfd", "memfd_create"})
#: teardown calls, matched as a multiset: the engine releases partly from garbage collection
#: and other threads, so their order is timing (as in `replay.streams`)
UNORDERED_OPS = frozenset({"close", "munmap"})
#: ioctls whose return value is a new fd
FD_IOCTLS = frozenset(
    {
        "KVM_CREATE_VM",
        "KVM_CREATE_VCPU",
        "KVM_CREATE_GUEST_MEMFD",
        "USERFAULTFD_IOC_NEW",
        "KVM_GET_STATS_FD",
    }
)


def creates_fd(op: str, name: str) -> bool:
    """Does a successful call of this kind return a new fd?"""
    return op in _FILE_OPS or (op == "ioctl" and name in FD_IOCTLS)


def stream_of(op: str, fd_kind: str) -> str:
    """The stream a call belongs to (see the module docstring)."""
    if fd_kind:
        return fd_kind
    if op in _MM_OPS:
        return "mm"
    if op in _FILE_OPS:
        return "files"
    return op


class AddressMap:
    """Translation between two address spaces for the ranges both sides mapped.

    ``add(a, b, length)`` says ``[a, a+length)`` on side A is ``[b, b+length)`` on side B.
    ``word_a_to_b`` / ``word_b_to_a`` translate one address (the end address of a range
    counts as inside); ``bytes_*`` translate every aligned little-endian 64-bit word of a
    buffer that falls in a mapped range — how struct fields holding addresses (``dst``,
    ``userspace_addr``, ``uffd_msg.address``) are found without knowing each struct.
    """

    def __init__(self) -> None:
        self._a: list[tuple[int, int, int]] = []  # sorted (start_a, end_a, start_b)
        self._b: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return len(self._a)

    def add(self, a: int, b: int, length: int) -> None:
        self.remove_a(a, length)
        bisect.insort(self._a, (a, a + length, b))
        bisect.insort(self._b, (b, b + length, a))

    def remove_a(self, a: int, length: int) -> None:
        """Forget the ranges of side A that start inside ``[a, a+length)``."""
        keep = [r for r in self._a if not a <= r[0] < a + length]
        if len(keep) != len(self._a):
            gone = {(r[2], r[0]) for r in self._a if a <= r[0] < a + length}
            self._a = keep
            self._b = [r for r in self._b if (r[0], r[2]) not in gone]

    def remove_b(self, b: int, length: int) -> None:
        for start_b, _end, start_a in list(self._b):
            if b <= start_b < b + length:
                self.remove_a(start_a, 1)

    @staticmethod
    def _lookup(table: list[tuple[int, int, int]], w: int) -> int | None:
        i = bisect.bisect_right(table, (w, 1 << 65, 0)) - 1
        if i >= 0:
            s, e, other = table[i]
            if s <= w <= e:
                return other + (w - s)
        return None

    def word_a_to_b(self, w: int) -> int:
        r = self._lookup(self._a, w) if self._a else None
        return w if r is None else r

    def word_b_to_a(self, w: int) -> int:
        r = self._lookup(self._b, w) if self._b else None
        return w if r is None else r

    def _bytes(self, data: bytes, table: list[tuple[int, int, int]]) -> bytes:
        if not table or len(data) < 8:
            return data
        lo, hi = table[0][0], max(r[1] for r in table)
        buf: bytearray | None = None
        for off in range(0, len(data) - 7, 8):
            (w,) = _Q.unpack_from(data, off)
            if lo <= w <= hi:
                t = self._lookup(table, w)
                if t is not None and t != w:
                    if buf is None:
                        buf = bytearray(data)
                    _Q.pack_into(buf, off, t & 0xFFFF_FFFF_FFFF_FFFF)
        return data if buf is None else bytes(buf)

    def bytes_a_to_b(self, data: bytes) -> bytes:
        return self._bytes(data, self._a)

    def bytes_b_to_a(self, data: bytes) -> bytes:
        return self._bytes(data, self._b)


@dataclass(frozen=True)
class LiveCall:
    """A call the live engine makes, described as a recorder would record it."""

    op: str
    fd: int = -1
    fd_kind: str = ""
    request: int = 0
    name: str = ""
    iarg: int | None = None
    args: tuple[int, ...] = ()
    inp: bytes = b""
    tid: int = 0

    def as_call(self, seq: int = -1) -> Call:
        """The live call as a `Call` (for printing it next to the recorded one)."""
        return Call(
            seq=seq, tid=self.tid, t_ns=0, dur_ns=0, op=self.op, fd=self.fd,
            fd_kind=self.fd_kind, request=self.request, name=self.name, iarg=self.iarg,
            args=list(self.args), inp=self.inp,
        )  # fmt: skip


class Divergence(Exception):
    """The live call matches no recorded call; ``report()`` says how."""

    def __init__(
        self, reason: str, got: LiveCall, expected: Call | None, context: Sequence[Call]
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.got = got
        self.expected = expected
        self.context = list(context)

    def report(self) -> str:
        from replay.show import format_call  # lazy: show imports the abi codecs

        lines = [f"replay divergence: {self.reason}"]
        if self.context:
            lines.append("  last calls matched:")
            lines += [f"    #{c.seq} [{c.tid}] {format_call(c)}" for c in self.context]
        if self.expected is not None:
            e = self.expected
            # the input is what is compared: show it alone, then what the kernel answered
            asked = msgspec.structs.replace(e, out=b"") if e.out and e.inp else e
            lines.append(f"  expected #{e.seq} [{e.tid}] {format_call(asked)}")
            if asked is not e:
                lines.append(f"    (recorded answer: {format_call(e)})")
        else:
            lines.append("  expected: nothing more on this stream")
        lines.append(f"  got          [{self.got.tid}] {format_call(self.got.as_call())}")
        return "\n".join(lines)


@dataclass
class Matcher:
    """Recorded calls, consumed stream by stream as live calls match them."""

    calls: Sequence[Call]
    window: int = 64
    context_n: int = 5
    addresses: AddressMap = field(default_factory=AddressMap)  #: recorded (A) <-> live (B)
    streams: dict[str, deque[int]] = field(default_factory=dict)
    matched: int = 0
    _recent: deque[Call] = field(default_factory=deque)

    def __post_init__(self) -> None:
        for i, c in enumerate(self.calls):
            self.streams.setdefault(stream_of(c.op, c.fd_kind), deque()).append(i)

    # -- matching ---------------------------------------------------------------------
    def _same(self, rec: Call, live: LiveCall) -> bool:
        if rec.op != live.op or rec.name != live.name or rec.fd_kind != live.fd_kind:
            return False
        if rec.request and live.request and rec.request != live.request:
            return False
        am = self.addresses
        if rec.iarg != (None if live.iarg is None else am.word_b_to_a(live.iarg)):
            return False
        if len(rec.args) != len(live.args) or any(
            r != am.word_b_to_a(x) for r, x in zip(rec.args, live.args, strict=True)
        ):
            return False
        return rec.inp == am.bytes_b_to_a(live.inp)

    def match(self, live: LiveCall) -> Call:
        """The recorded call that answers ``live``; consumes it. Raises :class:`Divergence`."""
        key = stream_of(live.op, live.fd_kind)
        q = self.streams.get(key)
        if not q:
            raise Divergence(
                f"the trace has no (more) calls on stream {key!r}", live, None, self._recent
            )
        unordered = live.op in UNORDERED_OPS
        seen_tids: set[int] = set()
        ahead = 0  # ordered calls passed over (pending teardown calls take no room)
        for pos, idx in enumerate(q):
            if ahead >= self.window and not unordered:
                break
            rec = self.calls[idx]
            if rec.tid in seen_tids and not unordered:
                continue
            if self._same(rec, live):
                del q[pos]
                self._note(rec)
                return rec
            if rec.op not in UNORDERED_OPS:
                seen_tids.add(rec.tid)
                ahead += 1
        expected = self.calls[q[0]]
        raise Divergence(
            f"call does not match the trace on stream {key!r} (at recorded #{expected.seq})",
            live,
            expected,
            self._recent,
        )

    def _note(self, rec: Call) -> None:
        self.matched += 1
        if rec.op == "monotonic_ns":
            return  # clock reads say nothing in a report
        self._recent.append(rec)
        if len(self._recent) > self.context_n:
            self._recent.popleft()

    # -- what is left -------------------------------------------------------------------
    def pending(self) -> list[Call]:
        """Recorded calls not matched yet, in seq order."""
        idx = sorted(i for q in self.streams.values() for i in q)
        return [self.calls[i] for i in idx]

    def finished(self, ignore_ops: Iterable[str] = ("close", "munmap")) -> bool:
        """Every recorded call matched (teardown calls in ``ignore_ops`` may stay)."""
        skip = set(ignore_ops)
        return all(c.op in skip for c in self.pending())
