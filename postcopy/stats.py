"""Post-copy statistics: fault latency, vCPU blocked time, counters, summaries.

Follows QEMU's ``postcopy-blocktime`` accounting (``migration/postcopy-ram.c``,
QEMU 10.1: ``PostcopyBlocktimeContext``, ``blocktime_latency_account``):

* the remote-fault latency histogram has ``BLOCKTIME_LATENCY_BUCKET_N`` = 24
  power-of-two microsecond buckets; a fault of ``us`` microseconds (integer,
  ``ns // 1000``) goes to bucket ``63 - clz64(us)`` (that is
  ``us.bit_length() - 1``), 0 µs goes to bucket 0, anything past the last
  bucket is clamped into bucket 23 (``[2^23, 2^24) us`` and up);
* per-vCPU blocked time and fault count, and the *total* blocktime: time during
  which every vCPU was blocked at once (``smp_cpus_down == smp_cpus``);
* the text form mimics HMP ``info migrate`` (``migration/migration-hmp-cmds.c``:
  ``Postcopy Latency Distribution:`` with ``[ %5s - %5s ]: %10lu`` rows) and the
  kernel selftest ``demand_paging_test`` ("Overall demand paging rate:").

Times are integers in nanoseconds from the clock of the ``Kernel`` in use
(``kernel.monotonic_ns``): the caller passes timestamps, nothing here reads a
clock, so a virtual clock gives exact, reproducible numbers. Exact samples are
kept in an ``array('Q')`` (8 bytes a fault), never a list of objects.
"""

from __future__ import annotations

import json
from array import array
from typing import Any

BLOCKTIME_LATENCY_BUCKET_N = 24


def latency_bucket(latency_ns: int) -> int:
    """QEMU's bucket index for a fault latency (``blocktime_latency_account``)."""
    us = latency_ns // 1000 if latency_ns > 0 else 0
    index = us.bit_length() - 1 if us else 0
    return index if index < BLOCKTIME_LATENCY_BUCKET_N else BLOCKTIME_LATENCY_BUCKET_N - 1


def time_us_to_str(us: int) -> str:
    """QEMU's HMP unit formatting: divide by 1000 while > 1000 (us, ms, sec)."""
    units = ("us", "ms", "sec")
    i = 0
    while us > 1000 and i + 1 < len(units):
        us //= 1000
        i += 1
    return f"{us} {units[i]}"


def percentile_exact(sorted_samples: array[int] | list[int], p: float) -> int:
    """Nearest-rank percentile (``p`` in 0..100) of sorted samples; 0 when empty."""
    n = len(sorted_samples)
    if n == 0:
        return 0
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    k = min(n, max(1, _ceil_div_pct(p, n)))  # ceil(p/100 * n), at least 1
    return int(sorted_samples[k - 1])


def _ceil_div_pct(p: float, n: int) -> int:
    x = p * n / 100.0
    k = int(x)
    return k if k == x else k + 1


class LatencyHistogram:
    """24 power-of-two microsecond buckets, as in QEMU's ``postcopy-latency-dist``."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets = array("Q", bytes(8 * BLOCKTIME_LATENCY_BUCKET_N))

    def add(self, latency_ns: int) -> None:
        self.buckets[latency_bucket(latency_ns)] += 1

    @property
    def total(self) -> int:
        return sum(self.buckets)

    def percentile_us(self, p: float) -> int:
        """Upper bound (µs, exclusive) of the bucket holding the nearest-rank ``p``-th fault."""
        n = self.total
        if n == 0:
            return 0
        k = max(1, _ceil_div_pct(p, n))
        acc = 0
        for i, c in enumerate(self.buckets):
            acc += c
            if acc >= k:
                return 1 << (i + 1)
        return 1 << BLOCKTIME_LATENCY_BUCKET_N  # pragma: no cover

    def rows(self) -> list[str]:
        """HMP rows: ``  [     1 us -     2 us ]:          0`` (bucket 0 is [0, 2) us in
        the counts; QEMU labels it from 1 us)."""
        out = []
        for i, c in enumerate(self.buckets):
            lo, hi = time_us_to_str(1 << i), time_us_to_str(1 << (i + 1))
            out.append(f"  [ {lo:>6} - {hi:>6} ]: {c:10d}")
        return out


class MigrationStats:
    """Everything the destination measures, fed with timestamps from ``kernel.monotonic_ns``.

    Fault accounting is event-driven, in time order, under the caller's lock:
    :meth:`fault_begin` when a fault is observed (``uffd_msg`` read, or KVM exit
    seen), :meth:`fault_end` when the vCPU can continue (the page is placed and
    the waiter woken). A vCPU may have more than one fault open (QEMU's
    ``vcpu_faults_current``); it counts as blocked while any is open.
    """

    def __init__(self, nr_vcpus: int, *, page_size: int = 4096, guest_size: int = 0) -> None:
        self.nr_vcpus = nr_vcpus
        self.page_size = page_size
        self.guest_size = guest_size
        self.hist = LatencyHistogram()
        self.samples = array("Q")  # every fault's latency, ns
        self.vcpu_blocked_ns = array("Q", bytes(8 * nr_vcpus))
        self.vcpu_faults = array("Q", bytes(8 * nr_vcpus))
        self._vcpu_open = array("I", bytes(4 * nr_vcpus))
        self._vcpu_since = array("Q", bytes(8 * nr_vcpus))
        self._down = 0  # vCPUs blocked right now
        self._all_since = 0
        self.total_blocktime_ns = 0  # all vCPUs blocked at once
        self.non_vcpu_faults = 0
        self.non_vcpu_blocktime_ns = 0
        # counters
        self.pages_demand = 0
        self.pages_background = 0
        self.pages_duplicate = 0
        self.requests = 0
        self.bytes = 0
        # phases (ns, kernel clock); 0 = not reached
        self.start_ns = 0  # source paused
        self.resume_ns = 0  # destination vCPUs running
        self.end_ns = 0  # every page placed

    # -- faults ------------------------------------------------------------------
    def fault_begin(self, vcpu: int, t_ns: int) -> None:
        """A fault on ``vcpu`` (``-1`` for a non-vCPU thread) was observed at ``t_ns``."""
        if vcpu < 0:
            return
        if self._vcpu_open[vcpu] == 0:
            self._vcpu_since[vcpu] = t_ns
            self._down += 1
            if self._down == self.nr_vcpus:
                self._all_since = t_ns
        self._vcpu_open[vcpu] += 1

    def fault_end(self, vcpu: int, t_begin_ns: int, t_ns: int) -> None:
        """The fault observed at ``t_begin_ns`` is resolved at ``t_ns``."""
        lat = t_ns - t_begin_ns
        if lat < 0:
            raise ValueError(f"fault resolved before it was observed ({lat} ns)")
        self.hist.add(lat)
        self.samples.append(lat)
        if vcpu < 0:
            self.non_vcpu_faults += 1
            self.non_vcpu_blocktime_ns += lat
            return
        self.vcpu_faults[vcpu] += 1
        if self._vcpu_open[vcpu] == 0:
            raise ValueError(f"fault_end on vCPU {vcpu} with no open fault")
        self._vcpu_open[vcpu] -= 1
        if self._vcpu_open[vcpu] == 0:
            if self._down == self.nr_vcpus:
                self.total_blocktime_ns += t_ns - self._all_since
            self._down -= 1
            self.vcpu_blocked_ns[vcpu] += t_ns - self._vcpu_since[vcpu]

    def record_fault(self, vcpu: int, t_begin_ns: int, t_end_ns: int) -> None:
        """One isolated fault (begin and end at once); for callers that time faults
        themselves. Overlap with other vCPUs is not seen by the all-blocked total."""
        self.fault_begin(vcpu, t_begin_ns)
        self.fault_end(vcpu, t_begin_ns, t_end_ns)

    @property
    def faults(self) -> int:
        return len(self.samples)

    # -- derived -----------------------------------------------------------------
    def percentile_ns(self, p: float) -> int:
        return percentile_exact(sorted(self.samples), p)

    @property
    def total_ns(self) -> int:
        return self.end_ns - self.start_ns if self.end_ns else 0

    @property
    def downtime_ns(self) -> int:
        return self.resume_ns - self.start_ns if self.resume_ns else 0

    @property
    def postcopy_ns(self) -> int:
        return self.end_ns - self.resume_ns if self.end_ns and self.resume_ns else 0

    @property
    def demand_rate_pps(self) -> float:
        """Demand pages per second of the post-copy phase."""
        t = self.postcopy_ns
        return self.pages_demand * 1e9 / t if t else 0.0

    @property
    def background_rate_pps(self) -> float:
        t = self.postcopy_ns
        return self.pages_background * 1e9 / t if t else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form; QMP's names where QMP has the figure."""
        faults = self.faults
        lat_total = sum(self.samples)
        s = sorted(self.samples)
        return {
            "status": "completed" if self.end_ns else "postcopy-active",
            "total-time": self.total_ns // 1_000_000,
            "total-time-ns": self.total_ns,
            "downtime": self.downtime_ns // 1_000_000,
            "downtime-ns": self.downtime_ns,
            "page-size": self.page_size,
            "guest-size": self.guest_size,
            "pages-demand": self.pages_demand,
            "pages-background": self.pages_background,
            "pages-duplicate": self.pages_duplicate,
            "requests": self.requests,
            "transferred": self.bytes,
            "demand-rate-pps": self.demand_rate_pps,
            "background-rate-pps": self.background_rate_pps,
            "postcopy-blocktime": self.total_blocktime_ns // 1_000_000,
            "postcopy-vcpu-blocktime": [v // 1_000_000 for v in self.vcpu_blocked_ns],
            "postcopy-vcpu-blocktime-ns": list(self.vcpu_blocked_ns),
            "postcopy-latency": lat_total // faults if faults else 0,
            "postcopy-vcpu-latency": [
                (self.vcpu_blocked_ns[i] // self.vcpu_faults[i]) if self.vcpu_faults[i] else 0
                for i in range(self.nr_vcpus)
            ],
            "postcopy-non-vcpu-latency": (
                self.non_vcpu_blocktime_ns // self.non_vcpu_faults if self.non_vcpu_faults else 0
            ),
            "postcopy-latency-dist": list(self.hist.buckets),
            "faults": faults,
            "latency-p50-ns": percentile_exact(s, 50),
            "latency-p99-ns": percentile_exact(s, 99),
            "latency-max-ns": s[-1] if s else 0,
            "latency-p50-us-hist": self.hist.percentile_us(50),
            "latency-p99-us-hist": self.hist.percentile_us(99),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        d = self.as_dict()
        mib = self.guest_size / (1 << 20)
        total_s = self.total_ns / 1e9
        mbps = self.bytes * 8 / 1e6 / total_s if total_s else 0.0
        lines = [
            f"Status: \t\t{d['status']}",
            f"Time (ms): \t\ttotal={d['total-time']}, down={d['downtime']}",
            "RAM info:",
            f"  Throughput (Mbps): \t{mbps:.2f}",
            f"  Sizes: \t\tpagesize={self.page_size // 1024} KiB, total={mib:g} MiB",
            f"  Transfers: \t\ttransferred={self.bytes}, postcopy-requests={self.requests}",
            f"  Pages: \t\tdemand={self.pages_demand}, background={self.pages_background}, "
            f"duplicate={self.pages_duplicate}",
            f"Postcopy Blocktime (ms): {d['postcopy-blocktime']}",
            f"Postcopy vCPU Blocktime (ms):\n  {d['postcopy-vcpu-blocktime']}",
            f"Postcopy Latency (ns): {d['postcopy-latency']}",
            f"Postcopy vCPU Latency (ns):\n  {d['postcopy-vcpu-latency']}",
            f"Postcopy Latency p50/p99 (us): {d['latency-p50-ns'] / 1000:.1f} / "
            f"{d['latency-p99-ns'] / 1000:.1f}",
            "Postcopy Latency Distribution:",
            *self.hist.rows(),
            f"Total guest execution time:\t{self.postcopy_ns // 10**9}."
            f"{self.postcopy_ns % 10**9:09d}s",
            f"Overall demand paging rate:\t{self.demand_rate_pps:f} pgs/sec",
        ]
        return "\n".join(lines)
