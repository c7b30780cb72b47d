"""``fakekvm trace stats``: fault counts, the latency histogram, per-vCPU blocked time, calls.

Latency buckets and percentiles are QEMU's ``postcopy-latency-dist`` ones, reused from
:mod:`postcopy.stats` (``LatencyHistogram``, ``percentile_exact``; QEMU
``migration/postcopy-ram.c``). A fault's latency is ``resolved_ns - observed_ns``; faults still
open when the trace ends (``resolved_ns == 0``) are counted apart and have no latency.

Per-vCPU blocked time is the measure of the union of that vCPU's fault intervals: two
overlapping faults on one vCPU count once (QEMU's ``vcpu_faults_current`` accounting).
Samples are kept in ``array('Q')`` (8 bytes a fault), intervals as two arrays per vCPU.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from postcopy.stats import BLOCKTIME_LATENCY_BUCKET_N, LatencyHistogram, percentile_exact
from replay.codec import ChunkColumns
from replay.columns import to_list
from replay.events import Call, Event, Fault, Header

BUCKETS = BLOCKTIME_LATENCY_BUCKET_N


@dataclass
class CallStat:
    count: int = 0
    total_ns: int = 0
    errors: int = 0

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


@dataclass
class TraceStats:
    """What ``trace stats`` reports; build it with :func:`compute_stats`."""

    calls: int = 0
    faults: int = 0
    unresolved: int = 0
    contents: int = 0
    first_ns: int = 0
    last_ns: int = 0
    by_vcpu: Counter[int] = field(default_factory=Counter)
    by_access: Counter[str] = field(default_factory=Counter)
    by_how: Counter[str] = field(default_factory=Counter)
    by_mechanism: Counter[str] = field(default_factory=Counter)
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    samples: array[int] = field(default_factory=lambda: array("Q"))
    #: vCPU -> blocked ns (union of its fault intervals)
    blocked_ns: dict[int, int] = field(default_factory=dict)
    by_name: dict[str, CallStat] = field(default_factory=dict)

    def percentile_ns(self, p: float) -> int:
        return percentile_exact(sorted(self.samples), p)

    def as_dict(self) -> dict[str, Any]:
        s = sorted(self.samples)
        return {
            "calls": self.calls,
            "faults": self.faults,
            "unresolved-faults": self.unresolved,
            "contents": self.contents,
            "duration-ns": self.last_ns - self.first_ns if self.calls else 0,
            "faults-per-vcpu": {str(k): v for k, v in sorted(self.by_vcpu.items())},
            "faults-per-access": dict(sorted(self.by_access.items())),
            "faults-per-how": dict(sorted(self.by_how.items())),
            "faults-per-mechanism": dict(sorted(self.by_mechanism.items())),
            "latency-dist": list(self.hist.buckets),
            "latency-p50-ns": percentile_exact(s, 50),
            "latency-p90-ns": percentile_exact(s, 90),
            "latency-p99-ns": percentile_exact(s, 99),
            "latency-max-ns": s[-1] if s else 0,
            "latency-mean-ns": sum(s) // len(s) if s else 0,
            "vcpu-blocked-ns": {str(k): v for k, v in sorted(self.blocked_ns.items())},
            "calls-per-name": {
                k: {
                    "count": v.count,
                    "total-ns": v.total_ns,
                    "mean-ns": round(v.mean_ns),
                    "errors": v.errors,
                }
                for k, v in sorted(self.by_name.items())
            },
        }


def union_ns(starts: array[int], ends: array[int]) -> int:
    """The measure of the union of intervals ``[starts[i], ends[i])``."""
    order = sorted(range(len(starts)), key=starts.__getitem__)
    total = 0
    cur_s = cur_e = -1
    for i in order:
        s, e = starts[i], ends[i]
        if s > cur_e:
            if cur_e > cur_s:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e > cur_s:
        total += cur_e - cur_s
    return total


def compute_stats(header: Header, events: Iterable[Event]) -> TraceStats:
    """One streaming pass over ``events``."""
    st = TraceStats()
    iv: dict[int, tuple[array[int], array[int]]] = {}
    for ev in events:
        if isinstance(ev, Call):
            if st.calls == 0:
                st.first_ns = ev.t_ns
            st.calls += 1
            st.last_ns = max(st.last_ns, ev.t_ns + ev.dur_ns)
            key = ev.name or ev.op
            cs = st.by_name.get(key)
            if cs is None:
                cs = st.by_name[key] = CallStat()
            cs.count += 1
            cs.total_ns += ev.dur_ns
            if ev.errno:
                cs.errors += 1
        elif isinstance(ev, Fault):
            st.faults += 1
            st.by_vcpu[ev.vcpu] += 1
            st.by_access[ev.access or "?"] += 1
            st.by_how[ev.how or "?"] += 1
            st.by_mechanism[ev.mechanism or header.mechanism or "?"] += 1
            if not ev.resolved_ns or ev.resolved_ns < ev.observed_ns:
                st.unresolved += 1
                continue
            lat = ev.resolved_ns - ev.observed_ns
            st.hist.add(lat)
            st.samples.append(lat)
            if ev.vcpu >= 0:
                pair = iv.get(ev.vcpu)
                if pair is None:
                    pair = iv[ev.vcpu] = (array("Q"), array("Q"))
                pair[0].append(ev.observed_ns)
                pair[1].append(ev.resolved_ns)
        else:
            st.contents += 1
    st.blocked_ns = {v: union_ns(s, e) for v, (s, e) in sorted(iv.items())}
    return st


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f} µs"


def format_stats(st: TraceStats, header: Header | None = None) -> str:
    """The text form of ``trace stats``."""
    lines = []
    if header is not None:
        lines.append(
            f"trace {header.uuid or '?'}: kernel {header.kernel or '?'}, "
            f"mechanism {header.mechanism}, guest {header.guest}"
        )
    dur = st.last_ns - st.first_ns if st.calls else 0
    lines.append(f"calls: {st.calls}  faults: {st.faults} (unresolved {st.unresolved})  "
                 f"duration: {dur / 1e6:.3f} ms")  # fmt: skip
    if st.faults:
        lines.append(
            "faults per vCPU:   "
            + ", ".join(f"{'non-vcpu' if v < 0 else v}: {n}" for v, n in sorted(st.by_vcpu.items()))
        )
        lines.append(
            "faults per access: " + ", ".join(f"{k}: {n}" for k, n in sorted(st.by_access.items()))
        )
        lines.append("faults per how:    " + ", ".join(
            f"{k}: {n}" for k, n in sorted(st.by_how.items())))  # fmt: skip
    if st.samples:
        s = sorted(st.samples)
        lines.append(
            f"latency: p50 {_us(percentile_exact(s, 50))}  p90 {_us(percentile_exact(s, 90))}  "
            f"p99 {_us(percentile_exact(s, 99))}  max {_us(s[-1])}  "
            f"mean {_us(sum(s) / len(s))}"
        )
        lines.append("Postcopy Latency Distribution:")
        rows = st.hist.rows()
        last = max(i for i in range(BLOCKTIME_LATENCY_BUCKET_N) if st.hist.buckets[i] or i == 0)
        lines += rows[: last + 1]
    if st.blocked_ns:
        lines.append("vCPU blocked time:")
        for v, ns in st.blocked_ns.items():
            lines.append(f"  vcpu {v}: {ns / 1e6:.3f} ms ({st.by_vcpu[v]} faults)")
    if st.by_name:
        lines.append(f"{'calls':<32} {'count':>9} {'total ms':>10} {'mean µs':>9} {'errors':>7}")
        for k, cs in sorted(st.by_name.items(), key=lambda kv: -kv[1].total_ns):
            lines.append(f"  {k:<30} {cs.count:>9} {cs.total_ns / 1e6:>10.3f} "
                         f"{cs.mean_ns / 1000:>9.1f} {cs.errors:>7}")  # fmt: skip
    return "\n".join(lines)


def compute_stats_columns(header: Header, chunks: Iterable[ChunkColumns]) -> TraceStats:
    """`compute_stats` from column-wise decoded chunks (`TraceReader.columns`): the same
    figures, a column at a time (no Python object per event; ``fakekvm trace stats``)."""
    st = TraceStats()
    names: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    iv: dict[int, tuple[array[int], array[int]]] = {}
    for ch in chunks:
        calls, faults = ch.calls, ch.faults
        st.contents += ch.kinds.count(2)
        if len(calls["seq"]):
            t = np.asarray(calls["t_ns"], dtype=np.int64)
            d = np.asarray(calls["dur_ns"], dtype=np.int64)
            if st.calls == 0:
                st.first_ns = int(t[0])
            st.calls += len(t)
            st.last_ns = max(st.last_ns, int((t + d).max()))
            keys = [
                n or o for n, o in zip(to_list(calls["name"]), to_list(calls["op"]), strict=True)
            ]
            table, inv = np.unique(np.array(keys, dtype=object), return_inverse=True)
            count = np.bincount(inv, minlength=len(table))
            dur = np.bincount(inv, weights=d, minlength=len(table))
            err = np.bincount(inv, weights=np.asarray(calls["errno"]) != 0, minlength=len(table))
            for k, key in enumerate(table.tolist()):
                names[key] += int(count[k])
                totals[key] += int(dur[k])
                errors[key] += int(err[k])
        if not len(faults["seq"]):
            continue
        vcpu = np.asarray(faults["vcpu"], dtype=np.int64)
        st.faults += len(vcpu)
        st.by_vcpu.update(dict(zip(*np.unique(vcpu, return_counts=True), strict=True)))
        mech = [m or header.mechanism or "?" for m in to_list(faults["mechanism"])]
        for counter, vals in ((st.by_access, to_list(faults["access"])),
                              (st.by_how, to_list(faults["how"])), (st.by_mechanism, mech)):  # fmt: skip
            counter.update(v or "?" for v in vals)
        obs = np.asarray(faults["observed_ns"], dtype=np.int64)
        res = np.asarray(faults["resolved_ns"], dtype=np.int64)
        ok = (res != 0) & (res >= obs)
        st.unresolved += int((~ok).sum())
        lat = (res - obs)[ok]
        us = np.maximum(lat // 1000, 1)  # (a latency under 1 µs is bucket 0, as 1 µs is)
        bucket = np.minimum(np.log2(us.astype(np.float64)).astype(np.int64), BUCKETS - 1)
        for b, c in zip(*np.unique(bucket, return_counts=True), strict=True):
            st.hist.buckets[int(b)] += int(c)
        st.samples.extend(lat.tolist())
        for v in np.unique(vcpu[ok & (vcpu >= 0)]).tolist():
            pair = iv.setdefault(v, (array("Q"), array("Q")))
            sel = ok & (vcpu == v)
            pair[0].extend(obs[sel].tolist())
            pair[1].extend(res[sel].tolist())
    st.by_vcpu = Counter({int(k): int(v) for k, v in st.by_vcpu.items()})
    st.by_name = {k: CallStat(names[k], totals[k], errors[k]) for k in names}
    st.blocked_ns = {v: union_ns(s, e) for v, (s, e) in sorted(iv.items())}
    return st
