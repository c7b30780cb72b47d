"""``fakekvm bench --recorder``, parts 3 to 5: recorded migrations and the per-fault figure.

* `analyse_trace`: calls per fault and the median fault latency of one recorded migration:
  the calls on the faults' path (those that end while a fault is open, from the read that
  reveals it to the call that resolves it, and the poll that woke the fault thread before
  that read) and every call of the run, by kind (`op_of`), per fault;
* `per_fault_figure`: Σ (calls of a kind per fault x added µs of that kind, from
  `tools.bench_recorder_calls`) / median fault latency;
* `migrate_once` and `ab_migrations`: whole ``fakekvm migrate --json`` runs in fresh
  processes, plain and recorded (``FAKEKVM_TRACE``), in interleaved pairs (the cross-check).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tools.bench_recorder_calls import CallCost

__all__ = [
    "Figure",
    "Pair",
    "RecordedRun",
    "ab_migrations",
    "analyse_trace",
    "migrate_once",
    "op_of",
    "per_fault_figure",
]

# ---------------------------------------------------------------------------------------------
# Calls per fault, from a recorded migration
# ---------------------------------------------------------------------------------------------


#: how a recorded call maps to a measured op (anything else: "other", charged at the
#: most expensive measured op)
def op_of(c: Any) -> str:
    if c.op == "ioctl":
        if c.name == "UFFDIO_COPY":
            return "uffdio_copy"
        if c.name == "UFFDIO_WAKE":
            return "uffdio_wake"
        if c.name == "KVM_RUN":
            return "kvm_run"
        return "check_extension" if c.iarg is not None else "uffdio_copy"
    if c.op in ("read", "poll", "monotonic_ns"):
        return c.op
    if c.op == "gettid":
        return "monotonic_ns"
    return "other"


@dataclass
class RecordedRun:
    faults: int
    p50_us: float
    #: op -> calls in the whole trace
    calls: Counter[str] = field(default_factory=Counter)
    #: op -> calls made while a fault was open (observed..resolved of any fault), and the poll
    #: before each read that revealed faults: the calls on the faults' path
    calls_in_faults: Counter[str] = field(default_factory=Counter)


def analyse_trace(path: str) -> RecordedRun:
    """Count calls by op, over the whole trace and inside fault windows, and the p50 latency of
    the trace's faults."""
    from replay.events import Call, Fault
    from replay.format import open_trace

    cs: list[tuple[int, str]] = []  # (end ns, op)
    windows: list[tuple[int, int]] = []
    lat: list[int] = []
    seen_by: set[int] = set()  # the seqs of the calls that revealed faults
    with open_trace(path) as r:
        for e in r:
            if type(e) is Call:
                cs.append((e.t_ns + e.dur_ns, op_of(e)))
            elif type(e) is Fault and e.resolved_ns:
                windows.append((e.observed_ns, e.resolved_ns))
                lat.append(e.resolved_ns - e.observed_ns)
                seen_by.add(e.seq)
    run = RecordedRun(len(lat), statistics.median(lat) / 1000 if lat else 0.0)
    run.calls.update(op for _, op in cs)
    # the poll that woke the fault thread ends before the fault is "observed" (at the read's
    # end) but delays it all the same: one per revealing read, when the run polls at all
    run.calls_in_faults["poll"] = min(len(seen_by), run.calls["poll"])
    # merge the windows, then count the calls ending inside one
    windows.sort()
    merged: list[list[int]] = []
    for a, b in windows:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    cs.sort()
    i = 0
    for a, b in merged:
        while i < len(cs) and cs[i][0] < a:
            i += 1
        while i < len(cs) and cs[i][0] <= b:
            run.calls_in_faults[cs[i][1]] += 1
            i += 1
    return run


# ---------------------------------------------------------------------------------------------
# Whole migrations
# ---------------------------------------------------------------------------------------------


def migrate_once(
    kernel: str, mem: str, workload: str, seed: int, trace: str | None, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """One ``fakekvm migrate --json`` in a fresh process (recorded when ``trace``)."""
    env = dict(os.environ)
    env.pop("FAKEKVM_TRACE", None)
    if trace:
        env["FAKEKVM_TRACE"] = trace
        env["FAKEKVM_TRACE_DOCTOR"] = "0"
    cmd = [sys.executable, "-m", "tools.cli", "migrate", "--kernel", kernel, "--mem", mem,
           "--workload", workload, "--seed", str(seed), "--json", *extra]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"migrate failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    d: dict[str, Any] = json.loads(p.stdout)
    return d


@dataclass
class Pair:
    plain_p50_us: float
    recorded_p50_us: float
    plain_faults: int
    recorded_faults: int


def ab_migrations(
    kernel: str, pairs: int, mem: str = "64M", workload: str = "random", tmp: str | None = None
) -> Iterator[Pair]:
    """Interleaved pairs (order alternating) of plain and recorded migrations."""
    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-rec-", dir=tmp) as d:
        for i in range(pairs):
            trace = os.path.join(d, f"ab{i}.trc")
            order = (None, trace) if i % 2 == 0 else (trace, None)
            res = {t: migrate_once(kernel, mem, workload, i + 1, t) for t in order}
            plain, rec = res[None], res[trace]
            yield Pair(plain["latency-p50-ns"] / 1000, rec["latency-p50-ns"] / 1000,
                       plain["faults"], rec["faults"])  # fmt: skip
            for p in (trace, trace + ".source"):
                with contextlib.suppress(OSError):
                    os.unlink(p)


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------


@dataclass
class Figure:
    kernel: str
    faults: int
    p50_us: float
    #: op -> (calls per fault, added µs per call)
    parts: dict[str, tuple[float, float]]

    @property
    def added_us(self) -> float:
        return sum(n * us for n, us in self.parts.values())

    @property
    def pct(self) -> float:
        return 100.0 * self.added_us / self.p50_us if self.p50_us else float("nan")


def per_fault_figure(
    kernel: str, run: RecordedRun, p50_us: float, costs: Sequence[CallCost], *, window: bool
) -> Figure:
    """Σ (calls of an op per fault x added µs of that op) against the run's median latency.
    ``window``: only the calls made while a fault was open; else every call of the run.
    Calls of ops not measured are charged at the dearest measured op."""
    added = {c.op: max(0.0, c.added_us) for c in costs}
    dearest = max(added.values()) if added else 0.0
    counts = run.calls_in_faults if window else run.calls
    parts: dict[str, tuple[float, float]] = {}
    f = max(1, run.faults)
    for op, n in sorted(counts.items()):
        parts[op] = (n / f, added.get(op, dearest))
    return Figure(kernel, run.faults, p50_us, parts)
