"""Canonical streams of a recording: what must be equal when the same engine runs again.

Two runs of one migration never make byte-identical call sequences: thread interleavings move
calls around, ``mmap`` returns other addresses, fds get other numbers, and which pages a vCPU
faults on (rather than receiving them in the background) depends on timing. `split_streams` splits a
recording into parts that *are* determined by the engine and the guest, and normalises the
run-specific numbers away:

* **ordered streams**, compared call by call:
  - ``main``: the calls of the thread that made the first call (setup and teardown: VM and
    memslot creation, userfaultfd handshake and registration, ...);
  - ``kvm-vcpu:N``: every call on vCPU N's fd, whichever thread made it, with ``KVM_RUN`` reduced
    to the guest's own exits (``EINTR`` and ``KVM_EXIT_MEMORY_FAULT`` returns are the
    environment's: a kick, a page not there *yet*);
* **unordered parts**, compared as sets: the calls the other threads make (fault and receiver
  threads), minus fills; and the pages the fills covered, as canonical addresses. Which *kind*
  of fill placed a page is not compared: a zero page demanded by a vCPU gets ``UFFDIO_ZEROPAGE``
  where the same page pushed in the background gets a ``UFFDIO_COPY`` (timing); the mechanism
  itself is fixed by the registration mode, which the ``main`` stream compares;
* **left out**: ``monotonic_ns``/``gettid`` (clock reads), ``poll``, reads and writes on
  userfaultfds and eventfds (message delivery and kicks, timing-dependent by nature).

Normalisation: a host address inside an ``mmap``-ed area becomes ``"m<k>+<offset>"`` (k = the
area's order of creation in that recording); an fd becomes its kind and order (``"userfaultfd#0"``);
the ``src`` of a fill (a staging buffer) is dropped. Struct-aware for the ioctls that carry
addresses or fds; the bytes of every other call are compared as recorded, which is where the
fake's byte-exactness against a real-kernel recording is checked.
"""

from __future__ import annotations

import bisect
import errno as E
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fakekvm.abi import kvm as K
from fakekvm.abi import uffd as U
from fakekvm.fake.kvm.attributes import RangeAttributes
from replay.events import Call, Event

_SKIP_OPS = frozenset({"monotonic_ns", "gettid", "poll"})
_MSG_KINDS = frozenset({"userfaultfd", "eventfd", "dev-userfaultfd"})
_FILLS: dict[int, tuple[str, struct.Struct, int]] = {
    # request -> (name, struct, index of the length field); address is field 0
    U.UFFDIO_COPY: ("UFFDIO_COPY", struct.Struct("<QQQQq"), 2),
    U.UFFDIO_ZEROPAGE: ("UFFDIO_ZEROPAGE", struct.Struct("<QQQq"), 1),
    U.UFFDIO_CONTINUE: ("UFFDIO_CONTINUE", struct.Struct("<QQQq"), 1),
    U.UFFDIO_POISON: ("UFFDIO_POISON", struct.Struct("<QQQq"), 1),
    U.UFFDIO_WAKE: ("UFFDIO_WAKE", struct.Struct("<QQ"), 1),
}
_REGION = struct.Struct("<IIQQQ")
_REGION2 = struct.Struct("<IIQQQQI4x")  # + padding (+ not-upstream userfault_bitmap) kept raw
_RANGE = struct.Struct("<QQ")
_ATTRS = struct.Struct("<QQQQ")  # kvm_memory_attributes: address, size, attributes, flags
_REGISTER = struct.Struct("<QQQQ")  # range, mode, ioctls
_FD_RETURNING_OPS = frozenset({"open", "userfaultfd", "eventfd", "memfd_create"})
_FD_RETURNING_IOCTLS = frozenset(
    {K.KVM_CREATE_VM, K.KVM_CREATE_VCPU, K.KVM_CREATE_GUEST_MEMFD, U.USERFAULTFD_IOC_NEW}
)
PAGE = 4096
_EXIT_OFF = 32  # kvm_run: the exit union
_RUN_RECORDED = 0x120  # the recorder keeps kvm_run up to here, then appends the PIO data
#: exit_reason -> bytes of the union that exit defines (the others are stale)
_EXIT_ARM = {K.KVM_EXIT_IO: 16, K.KVM_EXIT_MMIO: 24, K.KVM_EXIT_HLT: 0, K.KVM_EXIT_SHUTDOWN: 0}


@dataclass
class Streams:
    """The canonical parts of one recording (see the module docstring)."""

    streams: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    #: the event (seq) each ordered entry came from, for reports
    origin: dict[str, list[Call]] = field(default_factory=dict)
    #: calls whose order is timing: other threads' calls, and every munmap and close (the
    #: engine's teardown runs partly from garbage collection); compared as multisets
    others: Counter[tuple[Any, ...]] = field(default_factory=Counter)
    fill_kinds: set[str] = field(default_factory=set)
    #: the final memory attributes the workers' KVM_SET_MEMORY_ATTRIBUTES left, per gfn range
    attributes: RangeAttributes = field(default_factory=RangeAttributes)
    filled: set[str] = field(default_factory=set)


class _Norm:
    """Per-recording numbering of mappings and fds."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.maps: list[tuple[int, int, str]] = []  # (start, end, name), sorted by start
        self.nmaps = 0
        self.sig_count: dict[str, int] = {}
        self.fds: dict[int, str] = {}
        self.kind_count: dict[str, int] = {}

    def mapped(self, start: int, length: int, sig: str = "") -> str:
        """Name a new mapping: in the main thread by its order there; elsewhere (threads
        whose interleaving is timing) by its signature and order among its equals."""
        self.nmaps += 1
        n = self.sig_count.get(sig, 0)
        self.sig_count[sig] = n + 1
        name = f"{sig}#{n}"
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.maps.insert(i, (start, start + length, name))
        return name

    def unmapped(self, start: int, length: int) -> None:
        end = start + length
        keep = [(s, e, k) for s, e, k in self.maps if e <= start or s >= end]
        self.maps = keep
        self.starts = [s for s, _e, _k in keep]

    def addr(self, a: int) -> str:
        i = bisect.bisect_right(self.starts, a) - 1
        if i >= 0:
            s, e, name = self.maps[i]
            if a < e:
                return f"{name}+{a - s:#x}"
        return f"?{a:#x}"

    def new_fd(self, fd: int, kind: str) -> str:
        n = self.kind_count.get(kind, 0)
        self.kind_count[kind] = n + 1
        name = f"{kind}#{n}"
        self.fds[fd] = name
        return name

    def fd(self, fd: int) -> str:
        return self.fds.get(fd, f"fd?{fd}")


def _ioctl_key(c: Call, n: _Norm) -> tuple[Any, ...]:
    req = c.request
    inp, out = c.inp, c.out
    if req == K.KVM_SET_USER_MEMORY_REGION and len(inp) >= _REGION.size:
        slot, flags, gpa, size, hva = _REGION.unpack_from(inp)
        return (c.name, slot, flags, gpa, size, n.addr(hva) if size else 0, c.errno)
    if req == K.KVM_SET_USER_MEMORY_REGION2 and len(inp) >= _REGION2.size:
        slot, flags, gpa, size, hva, gofs, gfd = _REGION2.unpack_from(inp)
        gname = n.fd(gfd) if flags & K.KVM_MEM_GUEST_MEMFD else gfd
        return (c.name, slot, flags, gpa, size, n.addr(hva) if size else 0, gofs, gname, c.errno)
    if req in (U.UFFDIO_REGISTER,) and len(inp) >= _REGISTER.size:
        start, length, mode, _ = _REGISTER.unpack_from(inp)
        ioctls = _REGISTER.unpack_from(out)[3] if len(out) >= _REGISTER.size else None
        return (c.name, n.addr(start), length, mode, ioctls, c.errno)
    if req in (K.KVM_GET_DIRTY_LOG, K.KVM_CLEAR_DIRTY_LOG) and len(inp) >= 8:
        # slot (and first_page/num_pages for CLEAR); the bitmap pointer is the caller's buffer
        keep = 16 if req == K.KVM_CLEAR_DIRTY_LOG else 4
        return (c.name, inp[:keep], c.errno)
    if req == U.UFFDIO_UNREGISTER and len(inp) >= _RANGE.size:
        start, length = _RANGE.unpack_from(inp)
        return (c.name, n.addr(start), length, c.errno)
    ret: Any = c.ret
    if req in _FD_RETURNING_IOCTLS and c.errno == 0:
        ret = n.fds.get(c.ret, "fd")
    arg = c.iarg if c.iarg is not None else inp
    return (c.name or f"{req:#x}", arg, out, ret, c.errno)


def _run_key(c: Call) -> tuple[Any, ...] | None:
    """A KVM_RUN reduced to the guest's exit; None for the environment's returns."""
    if c.errno == E.EINTR:
        return None
    out = c.out
    reason = int.from_bytes(out[8:12], "little") if len(out) >= 12 else -1
    if c.errno == E.EFAULT and reason == K.KVM_EXIT_MEMORY_FAULT:
        return None
    if c.errno == 0 and reason == K.KVM_EXIT_INTR:
        return None
    # the header, the exit's own struct in the union and, for port I/O, the data. The rest of
    # the union keeps whatever an earlier exit left there (KVM does not clear it): after a
    # timing-dependent MEMORY_FAULT exit, an IO exit carries that exit's stale ``size``
    head = out[:_EXIT_OFF]
    arm = _EXIT_ARM.get(reason)
    body = out[_EXIT_OFF : _EXIT_OFF + arm] if arm is not None else out[_EXIT_OFF:_RUN_RECORDED]
    return ("KVM_RUN", c.inp, head, body, out[_RUN_RECORDED:], c.errno)


def split_streams(events: Iterable[Event]) -> Streams:
    """Split a recording into its canonical parts (see the module docstring)."""
    cn = Streams()
    n = _Norm()
    main_tid: int | None = None
    for ev in events:
        if type(ev) is not Call:
            continue
        c: Call = ev
        op = c.op
        if main_tid is None:
            main_tid = c.tid
        # keep the numbering in step with every call, whatever part it lands in
        where = n.addr(c.args[0]) if op in ("munmap", "madvise") and c.args else ""
        role = (
            "main" if c.tid == main_tid else ("vcpu" if c.fd_kind.startswith("kvm-vcpu:") else "w")
        )
        if op == "mmap" and c.errno == 0 and c.iarg:
            sig = (
                "m"
                if role == "main"
                else f"{role}:{n.fd(c.fd) if c.fd >= 0 else 'anon'}:{c.iarg:#x}"
            )
            where = n.mapped(c.ret, c.iarg, sig)
        elif op == "munmap" and c.errno == 0 and len(c.args) >= 2:
            n.unmapped(c.args[0], c.args[1])
        elif op == "mremap" and c.errno == 0 and len(c.args) >= 3:
            n.unmapped(c.args[0], c.args[1])
            where = n.mapped(c.ret, c.args[2], f"{role}:remap:{c.args[2]:#x}")
        new_fd = None
        if c.errno == 0 and (
            op in _FD_RETURNING_OPS or (op == "ioctl" and c.request in _FD_RETURNING_IOCTLS)
        ):
            new_fd = n.new_fd(c.ret, _created_kind(c))
        if op in _SKIP_OPS:
            continue
        if op in ("read", "write") and c.fd_kind in _MSG_KINDS:
            continue
        if op == "ioctl" and c.request in _FILLS:
            _fill(cn, n, c)
            continue
        if op == "fallocate" and role == "w":
            # a worker refilling a page a REMOVE punched out of the page cache before it can
            # CONTINUE it: how many depends on which CONTINUEs met a punched page (timing)
            cn.fill_kinds.add("fallocate")
            continue
        if op == "ioctl" and c.request == K.KVM_SET_MEMORY_ATTRIBUTES and role == "w":
            # conversions at fault time, batched by timing: only the final state counts
            if c.errno == 0 and len(c.inp) >= _ATTRS.size:
                address, size, attributes, _flags = _ATTRS.unpack_from(c.inp)
                cn.attributes.set(address >> 12, (address + size) >> 12, attributes)
            continue
        worker_anon = (op == "mmap" and role == "w" and c.fd < 0) or (
            op == "munmap" and where.startswith("w:anon:")
        )
        if worker_anon:
            continue  # a worker's own anonymous buffers: allocated as timing needs them
        key = _key(c, n, new_fd, where)
        if key is None:
            continue
        if op in ("munmap", "close"):
            cn.others[key] += 1
            continue
        if c.fd_kind.startswith("kvm-vcpu:"):
            stream = c.fd_kind
        elif c.tid == main_tid:
            stream = "main"
        else:
            cn.others[key] += 1
            continue
        cn.streams.setdefault(stream, []).append(key)
        cn.origin.setdefault(stream, []).append(c)
    return cn


def _created_kind(c: Call) -> str:
    if c.op != "ioctl":
        if c.op == "open":
            return c.inp.decode("utf-8", "replace")
        return {"memfd_create": "memfd"}.get(c.op, c.op)
    if c.request == K.KVM_CREATE_VM:
        return "kvm-vm"
    if c.request == K.KVM_CREATE_VCPU:
        return f"kvm-vcpu:{c.iarg}"
    if c.request == K.KVM_CREATE_GUEST_MEMFD:
        return "guest_memfd"
    return "userfaultfd"


def _key(c: Call, n: _Norm, new_fd: str | None, where: str) -> tuple[Any, ...] | None:
    op = c.op
    if op == "ioctl":
        if c.request == K.KVM_RUN:
            return _run_key(c)
        return (n.fd(c.fd), *_ioctl_key(c, n))
    if op == "mmap":
        return ("mmap", n.fd(c.fd) if c.fd >= 0 else -1, c.iarg, *c.args[:3], where or c.errno)
    if op in ("munmap", "madvise", "mremap"):
        # args: address first, then lengths/advice/flags (`where`: named before the change)
        return (op, where, *c.args[1:4], c.errno)
    if op == "close":
        return ("close", n.fd(c.fd), c.errno)
    if new_fd is not None:
        return (op, c.inp, c.iarg, new_fd)
    fd = n.fd(c.fd) if c.fd >= 0 else -1
    return (op, fd, c.iarg, tuple(c.args), c.inp, c.out, c.ret, c.errno)


def _fill(cn: Streams, n: _Norm, c: Call) -> None:
    name, fmt, len_i = _FILLS[c.request]
    cn.fill_kinds.add(name)
    if name == "UFFDIO_WAKE" or len(c.inp) < fmt.size:
        return
    vals = fmt.unpack_from(c.out if len(c.out) >= fmt.size else c.inp)
    start, length = vals[0], vals[len_i]
    done = vals[-1]  # copy/zeropage/mapped: bytes done (negative: -errno)
    if c.errno == 0:
        done = length
    if done <= 0:
        return
    for a in range(start & ~(PAGE - 1), start + done, PAGE):
        cn.filled.add(n.addr(a))


@dataclass
class Divergence:
    """The first difference between two canonical recordings."""

    part: str  #: "main", "kvm-vcpu:0", "others", "fills", "coverage"
    index: int  #: position in the ordered stream (-1 for set parts)
    expected: Any
    got: Any
    before: list[Any] = field(default_factory=list)  #: the entries that led there (expected side)
    expected_call: Call | None = None
    got_call: Call | None = None

    def report(self) -> str:
        lines = [
            f"divergence in {self.part}" + (f" at entry {self.index}" if self.index >= 0 else "")
        ]
        if self.expected_call is not None:
            lines.append(f"  recorded: seq {self.expected_call.seq}: {_brief(self.expected_call)}")
        if self.got_call is not None:
            lines.append(f"  replayed: seq {self.got_call.seq}: {_brief(self.got_call)}")
        lines.append(f"  expected: {_short(self.expected)}")
        lines.append(f"  got:      {_short(self.got)}")
        if self.before:
            lines.append("  after:")
            lines += [f"    {_short(b)}" for b in self.before]
        return "\n".join(lines)


def _brief(c: Call) -> str:
    err = f" = -1 {E.errorcode.get(c.errno, c.errno)}" if c.errno else f" = {c.ret}"
    return f"{c.op}({c.fd}<{c.fd_kind}>, {c.name or c.iarg}){err}"


def _short(v: Any, limit: int = 200) -> str:
    def one(x: Any) -> str:
        if isinstance(x, (bytes, bytearray)):
            return x[:48].hex() + ("…" if len(x) > 48 else "")
        return repr(x)

    text = "(" + ", ".join(one(x) for x in v) + ")" if isinstance(v, tuple) else one(v)
    return text if len(text) <= limit else text[:limit] + "…"


def compare_streams(expected: Streams, got: Streams, context: int = 5) -> Divergence | None:
    """The first divergence of ``got`` from ``expected``, or None when they agree."""
    for name in sorted(set(expected.streams) | set(got.streams), key=lambda s: (s != "main", s)):
        a = expected.streams.get(name, [])
        b = got.streams.get(name, [])
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            if x != y:
                return Divergence(
                    name,
                    i,
                    x,
                    y,
                    a[max(0, i - context) : i],
                    expected.origin.get(name, [])[i] if i < len(a) else None,
                    got.origin.get(name, [])[i] if i < len(b) else None,
                )
    if expected.others != got.others:
        missing = sorted((expected.others - got.others).elements(), key=repr)[:3]
        extra = sorted((got.others - expected.others).elements(), key=repr)[:3]
        return Divergence("others", -1, missing, extra)
    ra, rb = expected.attributes.runs(0, 1 << 52), got.attributes.runs(0, 1 << 52)
    if ra != rb:
        i = next(
            (j for j, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y),
            min(len(ra), len(rb)),
        )
        return Divergence("attributes", i, ra[i : i + 1], rb[i : i + 1])
    if expected.filled != got.filled:
        lost = sorted(expected.filled - got.filled)[:5]
        more = sorted(got.filled - expected.filled)[:5]
        return Divergence("coverage", -1, lost, more)
    return None
