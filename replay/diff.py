"""``fakekvm trace diff A B``: where two runs' kernel-call sequences part, and how their fault
latencies compare.

Event sequence: the `Call`s of both traces are walked in lockstep (streamed; only the last
few calls are kept) and compared on what a run controls — op, ioctl name, fd_kind, integer
arguments, input bytes, return value and errno — never on tids or times (the recorded
``monotonic_ns``/``gettid`` calls are skipped). Host addresses differ
between runs, so each trace gets its own translation: an address inside the *k*-th range a
trace mapped (``mmap`` return values) becomes "range *k* + offset" before comparison; fd
numbers returned by fd-creating calls become "the *k*-th fd". The first difference is
reported with both sides decoded (:mod:`replay.show`) and the calls that led there, like rr's
divergence report.

Latencies: p50/p99 of each side, their ratio, and the two-sample Kolmogorov-Smirnov statistic
``D = sup |F_A(x) - F_B(x)|`` (computed exactly in pure Python over the merged sorted samples).
"""

from __future__ import annotations

import functools
import struct
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from postcopy.stats import percentile_exact
from replay.events import Call, Event, Fault
from replay.match import creates_fd
from replay.show import CLOCK_OPS, format_call

_Q = struct.Struct("<Q")
#: a canonical address: bit 63 set, range index in bits 40..62, offset below
_CANON = 1 << 63


@functools.lru_cache(maxsize=64)
def _words(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}Q")


class Canon:
    """One trace's translation of addresses and fds into run-independent values."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, index), unsorted: few
        self._n = 0
        self._nfd = 0  # fds created so far
        self._lo, self._hi = 1 << 64, -1  # the hull of the ranges

    def note(self, c: Call) -> None:
        if c.errno:
            return
        if c.op in ("mmap", "mremap") and c.ret > 0:
            length = c.iarg if c.op == "mmap" else (c.args[1] if len(c.args) > 1 else 0)
            if length:
                self._ranges.append((c.ret, c.ret + int(length), self._n))
                self._n += 1
                self._lo = min(self._lo, c.ret)
                self._hi = max(self._hi, c.ret + int(length))
        elif creates_fd(c.op, c.name) and c.ret >= 0:
            self._nfd += 1

    def word(self, w: int) -> int:
        if not self._lo <= w <= self._hi:
            return w
        for s, e, i in self._ranges:
            if s <= w <= e:
                return _CANON | (i << 40) | (w - s)
        return w

    def data(self, b: bytes) -> bytes:
        n = len(b) >> 3
        if not self._ranges or not n:
            return b
        lo, hi = self._lo, self._hi
        words = _words(n).unpack_from(b)
        if not any(lo <= w <= hi for w in words):
            return b
        buf = bytearray(b)
        for k, w in enumerate(words):
            cw = self.word(w)
            if cw != w:
                _Q.pack_into(buf, 8 * k, cw)
        return bytes(buf)

    def key(self, c: Call, compare_out: bool = False) -> tuple[Any, ...]:
        """What must be equal for two calls to count as the same (``compare_out``: also the
        bytes the kernel wrote back)."""
        ret = c.ret
        if not c.errno:  # (``key`` comes before ``note``: a new range/fd is the next index)
            if c.op in ("mmap", "mremap") and c.ret > 0:
                ret = _CANON | (self._n << 40)  # "the k-th range"
            elif creates_fd(c.op, c.name) and c.ret >= 0:
                ret = -2 - self._nfd  # "the k-th fd"
        return (
            c.op,
            c.name,
            c.fd_kind,
            None if c.iarg is None else self.word(c.iarg),
            tuple(self.word(a) for a in c.args),
            self.data(c.inp),
            ret,
            c.errno,
            self.data(c.out) if compare_out else b"",
        )


_FIELDS = ("op", "name", "fd_kind", "int argument", "further arguments", "input bytes",
           "return value", "errno", "output bytes")  # fmt: skip


@dataclass
class LatencyComparison:
    n_a: int
    n_b: int
    p50_a: int
    p50_b: int
    p99_a: int
    p99_b: int
    ks_d: float

    @property
    def p50_ratio(self) -> float:
        return self.p50_b / self.p50_a if self.p50_a else 0.0

    @property
    def p99_ratio(self) -> float:
        return self.p99_b / self.p99_a if self.p99_a else 0.0

    def lines(self) -> list[str]:
        return [
            f"faults: A {self.n_a}, B {self.n_b}",
            f"latency p50: A {self.p50_a / 1000:.1f} µs, B {self.p50_b / 1000:.1f} µs "
            f"(B/A {self.p50_ratio:.2f})",
            f"latency p99: A {self.p99_a / 1000:.1f} µs, B {self.p99_b / 1000:.1f} µs "
            f"(B/A {self.p99_ratio:.2f})",
            f"KS statistic D = {self.ks_d:.4f}",
        ]


@dataclass
class DiffResult:
    same: bool
    calls_a: int = 0
    calls_b: int = 0
    #: index (0-based, among calls) of the first difference; -1 if none
    at: int = -1
    a: Call | None = None
    b: Call | None = None
    fields: list[str] = field(default_factory=list)
    context: list[tuple[Call, Call]] = field(default_factory=list)
    latency: LatencyComparison | None = None

    def report(self) -> str:
        lines = []
        if self.same:
            lines.append(f"event sequences: same ({self.calls_a} calls)")
        else:
            seqs = ", ".join(
                f"{side} #{c.seq}" for side, c in (("A", self.a), ("B", self.b)) if c is not None
            )
            what = f"; {', '.join(self.fields)} differ" if self.fields else ""
            lines.append(f"event sequences differ at call {self.at} ({seqs}{what})")
            if self.context:
                lines.append(f"  the {len(self.context)} calls before:")
                for ca, cb in self.context:
                    lines.append(f"    A #{ca.seq} / B #{cb.seq}  {format_call(ca)}")
            lines.append(f"  A #{self.a.seq}: {format_call(self.a)}" if self.a is not None
                         else f"  A: ends after {self.calls_a} calls")  # fmt: skip
            lines.append(f"  B #{self.b.seq}: {format_call(self.b)}" if self.b is not None
                         else f"  B: ends after {self.calls_b} calls")  # fmt: skip
        if self.latency is not None:
            lines += self.latency.lines()
        return "\n".join(lines)


def ks_statistic(a: Iterable[int], b: Iterable[int]) -> float:
    """Two-sample Kolmogorov-Smirnov ``D``: the largest gap between the empirical CDFs."""
    xa, xb = sorted(a), sorted(b)
    na, nb = len(xa), len(xb)
    if not na or not nb:
        return 0.0 if na == nb else 1.0
    i = j = 0
    d = 0.0
    while i < na and j < nb:
        x = min(xa[i], xb[j])
        while i < na and xa[i] == x:
            i += 1
        while j < nb and xb[j] == x:
            j += 1
        d = max(d, abs(i / na - j / nb))
    return d


def compare_latencies(a: array[int], b: array[int]) -> LatencyComparison:
    sa, sb = sorted(a), sorted(b)
    return LatencyComparison(
        n_a=len(sa), n_b=len(sb),
        p50_a=percentile_exact(sa, 50), p50_b=percentile_exact(sb, 50),
        p99_a=percentile_exact(sa, 99), p99_b=percentile_exact(sb, 99),
        ks_d=ks_statistic(sa, sb),
    )  # fmt: skip


class _Split:
    """Splits one event stream into its calls (iterated) and fault latencies (collected)."""

    def __init__(self, events: Iterable[Event]) -> None:
        self.events = events
        self.latencies: array[int] = array("Q")
        self.calls = 0

    def __iter__(self) -> Iterator[Call]:
        for ev in self.events:
            if isinstance(ev, Call):
                if ev.op in CLOCK_OPS:
                    continue  # times and tids never count
                self.calls += 1
                yield ev
            elif isinstance(ev, Fault) and ev.resolved_ns >= ev.observed_ns and ev.resolved_ns:
                self.latencies.append(ev.resolved_ns - ev.observed_ns)

    def drain(self, it: Iterator[Call]) -> None:
        for _ in it:
            pass


def diff_traces(
    events_a: Iterable[Event],
    events_b: Iterable[Event],
    *,
    context: int = 5,
    compare_out: bool = False,
) -> DiffResult:
    """Compare two traces (see the module docstring); ``compare_out`` also compares the
    bytes the kernel wrote back (``KVM_RUN`` exits, ioctl results, data read)."""
    sa, sb = _Split(events_a), _Split(events_b)
    ca, cb = Canon(), Canon()
    recent: deque[tuple[Call, Call]] = deque(maxlen=context)
    ia, ib = iter(sa), iter(sb)
    res = DiffResult(same=True)
    for i, (a, b) in enumerate(zip_longest(ia, ib)):
        if a is None or b is None:
            res = DiffResult(same=False, at=i, a=a, b=b, context=list(recent))
            break
        ka, kb = ca.key(a, compare_out), cb.key(b, compare_out)
        if ka != kb:
            diffs = [f for f, x, y in zip(_FIELDS, ka, kb, strict=True) if x != y]
            res = DiffResult(same=False, at=i, a=a, b=b, fields=diffs, context=list(recent))
            break
        ca.note(a)
        cb.note(b)
        recent.append((a, b))
    sa.drain(ia)
    sb.drain(ib)
    res.calls_a, res.calls_b = sa.calls, sb.calls
    res.latency = compare_latencies(sa.latencies, sb.latencies)
    return res
