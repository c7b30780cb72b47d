"""``fakekvm bench --recorder``: what recording costs a post-copy fault (issue 6, item 2).

Target: recording on the real kernel adds at most 5 % to the per-fault latency of a migration.
A whole-migration A/B drowns a few percent in run-to-run noise (single runs spread 259-522 µs
at p50 on this host), so the figure is built from parts that do not:

1. **added µs per call** (`call_costs`): the same call, in interleaved blocks, through the
   plain kernel and through a `replay.recorder.RecordingKernel` writing a real trace file
   (its chunk flushes included), for the calls a fault makes: the fault thread's ``poll`` and
   ``read``, the engine's ``monotonic_ns``, the demand ``UFFDIO_COPY`` (4 KiB, nobody
   waiting), ``UFFDIO_WAKE``, and ``KVM_CHECK_EXTENSION`` as the cheapest ioctl there is.
   Added = median over blocks of (recorded - plain) per call;
2. **the recorder's own work per call** (`wrapper_costs`): the same wrapper over a
   `NullKernel` whose calls cost nothing, so what remains is the recorder alone, without
   kernel noise; this one includes ``KVM_RUN`` (the ``kvm_run`` page copy);
3. **calls per fault** and the **median fault latency** of one recorded migration
   (`analyse_trace`): the calls on the faults' path (those that end while a fault is open,
   from the read that reveals it to the call that resolves it, and the poll that woke the
   fault thread before that read) and every call of the run, by kind, per fault;
4. the figure (headline): Σ (fault-path calls of a kind per fault x whole added µs of that
   kind) / median fault latency; also shown: the same calls at their call-path cost, and the
   upper bound that charges every call of the run (setup, background push) to its faults;
5. the cross-check (`ab_migrations`): interleaved pairs of whole migrations, plain and
   recorded (``FAKEKVM_TRACE``), medians and spread of their p50 fault latency.

Nothing here asserts a time: it prints the figures, the 5 % target and PASS/FAIL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fakekvm.abi import kvm, mman, uffd
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel

TARGET_PCT = 5.0
PAGE = mman.PAGE_SIZE
_EFD_ONE = (1).to_bytes(8, "little")

RecorderFactory = Callable[[Kernel, Any], Kernel]


# ---------------------------------------------------------------------------------------------
# A kernel whose calls cost nothing (the recorder's own work is all that is left)
# ---------------------------------------------------------------------------------------------


class NullKernel(Kernel):
    """Every call succeeds at once: fds are counted, ``read`` returns ``n`` zero bytes (or a
    fixed message), ``mmap`` lays a `Mapping` over a private buffer (a ``kvm_run`` page whose
    exit is ``KVM_EXIT_IO`` out, like a guest's port write)."""

    name = "null"

    def __init__(self) -> None:
        self._next_fd = 100
        self._bufs: list[Any] = []
        self.read_data = bytes(32)

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self._next_fd += 1
        return self._next_fd

    def close(self, fd: int) -> None:
        return None

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        if request in (kvm.KVM_CREATE_VM, kvm.KVM_CREATE_VCPU):
            self._next_fd += 1
            return self._next_fd
        return 0

    def read(self, fd: int, n: int) -> bytes:
        return self.read_data

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return len(data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return bytes(n)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return len(data)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        return pos

    def fstat(self, fd: int) -> os.stat_result:
        return os.stat_result((0,) * 10)

    def ftruncate(self, fd: int, length: int) -> None:
        return None

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        return None

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        buf = (ctypes.c_ubyte * length)()
        self._bufs.append(buf)
        addr = ctypes.addressof(buf)
        # a KVM_EXIT_IO out of 1 byte at data_offset 0x200 (what a guest's `out` leaves)
        ctypes.memmove(addr + 8, kvm.KVM_EXIT_IO.to_bytes(4, "little"), 4)
        ctypes.memmove(addr + 32, bytes([kvm.KVM_EXIT_IO_OUT, 1, 0xF1, 0, 1, 0, 0, 0]), 8)
        ctypes.memmove(addr + 40, (0x200).to_bytes(8, "little"), 8)
        return make_mapping(addr, length, fd=fd, prot=prot, flags=flags, offset=offset, owner=self)

    def munmap(self, address: int, length: int) -> None:
        return None

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        return old_address

    def madvise(self, address: int, length: int, advice: int) -> None:
        return None

    def userfaultfd(self, flags: int) -> int:
        self._next_fd += 1
        return self._next_fd

    def eventfd(self, initval: int, flags: int = 0) -> int:
        self._next_fd += 1
        return self._next_fd

    def memfd_create(self, name: str, flags: int = 0) -> int:
        self._next_fd += 1
        return self._next_fd

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        return [(fds[0][0], select.POLLIN)]

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def gettid(self) -> int:
        return threading.get_native_id()


# ---------------------------------------------------------------------------------------------
# Recorders
# ---------------------------------------------------------------------------------------------


def default_recorder(inner: Kernel, path: str) -> Kernel:
    """A `RecordingKernel` writing a `TraceWriter` at ``path`` (as ``fakekvm capture`` does)."""
    from replay.format import TraceWriter
    from replay.recorder import RecordingKernel, make_header

    w = TraceWriter(path, make_header(inner, doctor=False, role="bench"))
    return RecordingKernel(inner, w, mechanism="uffd-missing")


def _stop(rec: Kernel) -> None:
    stop = getattr(rec, "stop_recording", None)
    if stop is not None:
        stop()


# ---------------------------------------------------------------------------------------------
# Per-call cost
# ---------------------------------------------------------------------------------------------

#: the calls a fault makes, in the order `call_costs` measures them ("other": ``fstat``, standing
#: for the calls off the fault path: mmap, close, ...)
OPS = ("check_extension", "uffdio_copy", "uffdio_wake", "read", "poll", "monotonic_ns", "other")


@dataclass
class CallCost:
    op: str
    plain_us: float
    recorded_us: float
    #: median over blocks of (recorded - plain), µs per call
    added_us: float
    spread_us: tuple[float, float] = (0.0, 0.0)


class _Fixture:
    """Resources made through the recorder (so it knows the fd kinds) and driven either
    through it or directly through its inner kernel."""

    def __init__(self, rec: Kernel, inner: Kernel, pages: int) -> None:
        self.rec, self.inner, self.pages = rec, inner, pages
        self.real_kvm = inner.name == "real"
        self.kvm_fd = rec.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.uffd = rec.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
        api = bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, 0, 0))
        rec.ioctl(self.uffd, uffd.UFFDIO_API, api)
        self.area = rec.mmap(-1, pages * PAGE, mman.PROT_READ | mman.PROT_WRITE,
                             mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)  # fmt: skip
        reg = bytearray(uffd.uffdio_register_fmt.pack(
            self.area.address, pages * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING, 0))  # fmt: skip
        rec.ioctl(self.uffd, uffd.UFFDIO_REGISTER, reg)
        self.src = rec.mmap(-1, PAGE, mman.PROT_READ | mman.PROT_WRITE,
                            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS)  # fmt: skip
        self.src.view()[:8] = b"recorder"
        self.efd = rec.eventfd(0, os.O_CLOEXEC | os.O_NONBLOCK)
        self.inner.write(self.efd, _EFD_ONE)  # readable from now on: poll answers at once

    def zap(self) -> None:
        """Make the area's pages missing again (no REMOVE event: the feature is off)."""
        self.inner.madvise(self.area.address, self.pages * PAGE, mman.MADV_DONTNEED)

    def loop(self, k: Kernel, op: str, n: int) -> int:
        """ns for ``n`` calls of ``op`` through ``k``."""
        if op == "check_extension":
            ioctl, fd, req, cap = (
                k.ioctl,
                self.kvm_fd,
                kvm.KVM_CHECK_EXTENSION,
                kvm.KVM_CAP_USER_MEMORY,
            )
            t0 = time.perf_counter_ns()
            for _ in range(n):
                ioctl(fd, req, cap)
            return time.perf_counter_ns() - t0
        if op == "uffdio_copy":
            n = min(n, self.pages)
            ioctl, fd, req = k.ioctl, self.uffd, uffd.UFFDIO_COPY
            pack, base, src = uffd.uffdio_copy_fmt.pack, self.area.address, self.src.address
            t0 = time.perf_counter_ns()
            for i in range(n):
                ioctl(fd, req, bytearray(pack(base + i * PAGE, src, PAGE, 0, 0)))
            dt = time.perf_counter_ns() - t0
            self.zap()
            return dt
        if op == "uffdio_wake":
            ioctl, fd, req = k.ioctl, self.uffd, uffd.UFFDIO_WAKE
            rng = uffd.uffdio_range_fmt.pack(self.area.address, PAGE)
            t0 = time.perf_counter_ns()
            for _ in range(n):
                ioctl(fd, req, bytearray(rng))
            return time.perf_counter_ns() - t0
        if op == "read":  # an eventfd read: the same wrapper path as the uffd's
            read, fd, write = k.read, self.efd, self.inner.write
            t = 0
            for _ in range(n):
                t0 = time.perf_counter_ns()
                read(fd, 8)
                t += time.perf_counter_ns() - t0
                write(fd, _EFD_ONE)
            return t
        if op == "poll":
            poll, fds = k.poll, [(self.uffd, select.POLLIN), (self.efd, select.POLLIN)]
            t0 = time.perf_counter_ns()
            for _ in range(n):
                poll(fds, -1)
            return time.perf_counter_ns() - t0
        if op == "other":  # the calls off the fault path (fstat: a generic row, like mmap's)
            fstat, fd = k.fstat, self.efd
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fstat(fd)
            return time.perf_counter_ns() - t0
        if op == "monotonic_ns":
            now = k.monotonic_ns
            t0 = time.perf_counter_ns()
            for _ in range(n):
                now()
            return time.perf_counter_ns() - t0
        raise ValueError(op)

    def close(self) -> None:
        for fd in (self.efd, self.uffd, self.kvm_fd):
            with contextlib.suppress(OSError):
                self.inner.close(fd)
        for m in (self.area, self.src):
            with contextlib.suppress(OSError):
                self.inner.munmap(m.address, m.length)


def _median_diff(
    op: str, plain: Callable[[int], int], rec: Callable[[int], int], n: int, blocks: int
) -> CallCost:
    p: list[float] = []
    r: list[float] = []
    d: list[float] = []
    for i in range(blocks):  # interleaved, and alternating which goes first
        if i % 2:
            tr = rec(n) / n / 1000
            tp = plain(n) / n / 1000
        else:
            tp = plain(n) / n / 1000
            tr = rec(n) / n / 1000
        p.append(tp)
        r.append(tr)
        d.append(tr - tp)
    d.sort()
    q = max(0, len(d) // 4)
    return CallCost(op, statistics.median(p), statistics.median(r), statistics.median(d),
                    (d[q], d[-1 - q]))  # fmt: skip


def call_costs(
    inner: Kernel,
    recorder: RecorderFactory = default_recorder,
    *,
    n: int = 4096,
    blocks: int = 15,
    ops: Sequence[str] = OPS,
) -> list[CallCost]:
    """Added µs per call of each op, recorded (into a trace file) vs plain, same process.

    ``n`` calls a block: with the default (a `TraceWriter`'s 4096-event chunk) every recorded
    block converts, encodes and writes exactly one chunk, so the median block carries its
    share of that work (with smaller blocks the median would pick blocks without a chunk)."""
    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-rec-") as d:
        rec = recorder(inner, os.path.join(d, "calls.trc"))
        fx = _Fixture(rec, inner, n)
        try:
            out = []
            for op in ops:
                if op == "check_extension" and not fx.real_kvm and inner.name == "real":
                    continue
                fx.loop(inner, op, n // 4)  # warm both paths
                fx.loop(rec, op, n // 4)
                out.append(_median_diff(op, lambda m, o=op: fx.loop(inner, o, m),  # type: ignore[misc]
                                        lambda m, o=op: fx.loop(rec, o, m), n, blocks))  # type: ignore[misc]  # fmt: skip
            return out
        finally:
            fx.close()
            _stop(rec)


def wrapper_costs(
    recorder: RecorderFactory = default_recorder, *, n: int = 20000, blocks: int = 9
) -> list[CallCost]:
    """The recorder's own work per call: the wrapper over a `NullKernel`."""
    null = NullKernel()
    out: list[CallCost] = []
    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-rec-") as d:
        rec = recorder(null, os.path.join(d, "wrapper.trc"))
        try:
            kvm_fd = rec.open("/dev/kvm", os.O_RDWR)
            vm = rec.ioctl(kvm_fd, kvm.KVM_CREATE_VM, 0)
            vcpu = rec.ioctl(vm, kvm.KVM_CREATE_VCPU, 0)
            rec.mmap(vcpu, 0x3000, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED)
            ufd = rec.userfaultfd(os.O_CLOEXEC)
            efd = rec.eventfd(0)
            copy = uffd.uffdio_copy_fmt.pack(0x10000, 0x20000, PAGE, 0, 0)
            rng = uffd.uffdio_range_fmt.pack(0x10000, PAGE)
            fds = [(ufd, select.POLLIN), (efd, select.POLLIN)]

            def loops(k: Kernel) -> dict[str, Callable[[int], int]]:
                ioctl = k.ioctl

                def timed(f: Callable[[], object]) -> Callable[[int], int]:
                    def run(m: int) -> int:
                        t0 = time.perf_counter_ns()
                        for _ in range(m):
                            f()
                        return time.perf_counter_ns() - t0

                    return run

                return {
                    "check_extension": timed(lambda: ioctl(kvm_fd, kvm.KVM_CHECK_EXTENSION, 3)),
                    "uffdio_copy": timed(lambda: ioctl(ufd, uffd.UFFDIO_COPY, bytearray(copy))),
                    "uffdio_wake": timed(lambda: ioctl(ufd, uffd.UFFDIO_WAKE, bytearray(rng))),
                    "read": timed(lambda: k.read(ufd, 2048)),
                    "poll": timed(lambda: k.poll(fds, -1)),
                    "monotonic_ns": timed(k.monotonic_ns),
                    "other": timed(lambda: k.fstat(efd)),
                    "kvm_run": timed(lambda: ioctl(vcpu, kvm.KVM_RUN, 0)),
                }

            lp, lr = loops(null), loops(rec)
            for op in lp:
                lp[op](n // 10)
                lr[op](n // 10)
                out.append(_median_diff(op, lp[op], lr[op], n, blocks))
        finally:
            _stop(rec)
    return out


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


def hot_path_recorder(inner: Kernel, path: str) -> Kernel:
    """The default recorder with chunks too big to ever fill during a measurement: what a call
    costs its caller when no chunk is converted and written (the call path alone)."""
    from replay.format import TraceWriter
    from replay.recorder import RecordingKernel, make_header

    w = TraceWriter(path, make_header(inner, doctor=False, role="bench"), chunk_events=1 << 30)
    return RecordingKernel(inner, w, mechanism="uffd-missing")


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


# ---------------------------------------------------------------------------------------------
# ``fakekvm bench --recorder``
# ---------------------------------------------------------------------------------------------


@dataclass
class RecorderBench:
    kernel: str
    costs: list[CallCost]
    hot: list[CallCost]
    wrapper: list[CallCost]
    run: RecordedRun | None
    run_p50_us: float
    #: the headline: the calls on the faults' path (made while a fault was open, and the poll
    #: before each revealing read) at their whole cost (chunks converted, encoded and written,
    #: amortised)
    figure: Figure | None
    #: the same calls at their call-path cost (what the faulting thread pays between chunks)
    window_figure: Figure | None
    #: the upper bound: every call of the run (setup, background push) charged to its faults,
    #: at the whole cost
    upper_figure: Figure | None = None
    pairs: list[Pair] = field(default_factory=list)
    note: str = ""
    #: the recorder timing its own work inside a real migration (real kernel only), and the
    #: same timing around a wrapper that only forwards (the timing's own cost in situ)
    in_situ: InSitu | None = None
    in_situ_control: InSitu | None = None

    def in_situ_net(self) -> tuple[float, dict[str, float]] | None:
        """µs per fault the recorder adds in situ, net of the timing (per op: the recorder's
        median minus the control's for the same kind of call), and the per-call nets."""
        rec, ctl = self.in_situ, self.in_situ_control
        if rec is None or ctl is None or not rec.faults:
            return None
        net: dict[str, float] = {}
        total = 0.0
        for op, (n, _) in rec.ops.items():
            base = ctl.median_us.get(op, ctl.median_us.get("ioctl", 0.0))
            net[op] = max(0.0, rec.median_us.get(op, 0.0) - base)
            total += n / rec.faults * net[op]
        return total, net

    @property
    def verdict(self) -> str:
        if self.figure is None or self.figure.faults == 0:
            return "n/a"
        return "PASS" if self.figure.pct <= TARGET_PCT else "FAIL"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_bench(
    kernel: str = "auto",
    *,
    pairs: int = 10,
    mem: str = "64M",
    workload: str = "random",
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RecorderBench:
    """Everything ``fakekvm bench --recorder`` prints (see the module doc)."""
    from fakekvm.kernel.real import RealKernel, kvm_available

    say = progress or (lambda _m: None)
    if kernel == "auto":
        kernel = "real" if kvm_available()[0] else "fake"
    inner: Kernel
    if kernel == "real":
        inner = RealKernel()
    else:
        from fakekvm.fake import FakeKernel

        inner = FakeKernel(profile="6.18-pvm")
    n, blocks = (300, 5) if quick else (4096, 11)
    try:
        say("per-call cost, recorded vs plain (trace file written) ...")
        costs = call_costs(inner, n=n, blocks=blocks)
        say("per-call cost, call path only ...")
        hot = call_costs(inner, hot_path_recorder, n=n, blocks=blocks)
    finally:
        inner.shutdown()
    say("the recorder's own work (over a kernel that costs nothing) ...")
    wrapper = wrapper_costs(n=2000 if quick else 20000, blocks=5 if quick else 9)
    kvm_run = [c for c in wrapper if c.op == "kvm_run"]
    res = RecorderBench(kernel, costs, hot, wrapper, None, 0.0, None, None)
    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-rec-") as d:
        say(f"one recorded migration ({kernel}, {mem}, {workload}) ...")
        trace = os.path.join(d, "run.trc")
        try:
            rep = migrate_once(kernel, mem, workload, 1, trace)
        except RuntimeError as e:
            res.note = str(e)
            return res
        res.run = analyse_trace(trace)
        res.run_p50_us = rep["latency-p50-ns"] / 1000
        if res.run.faults:
            p50, run = res.run_p50_us, res.run
            res.figure = per_fault_figure(kernel, run, p50, costs + kvm_run, window=True)
            res.window_figure = per_fault_figure(kernel, run, p50, hot + kvm_run, window=True)
            res.upper_figure = per_fault_figure(kernel, run, p50, costs + kvm_run, window=False)
        if kernel == "real":
            say("the recorder timing itself inside a real migration ...")
            try:
                res.in_situ_control = insitu(mem, workload, seed=2, control=True)
                res.in_situ = insitu(mem, workload, seed=2)
            except (RuntimeError, OSError) as e:
                res.note = f"in situ: {e}"
        for i, pair in enumerate(ab_migrations(kernel, pairs, mem, workload, tmp=d)):
            say(f"A/B pair {i + 1}/{pairs}: plain p50 {pair.plain_p50_us:.0f} µs, "
                f"recorded p50 {pair.recorded_p50_us:.0f} µs")  # fmt: skip
            res.pairs.append(pair)
    return res


def _spread(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):8.1f}  [{min(xs):.0f} .. {max(xs):.0f}]"


def format_bench(b: RecorderBench) -> str:
    lines = [f"fakekvm bench --recorder: kernel {b.kernel}, target: recording adds <= "
             f"{TARGET_PCT:g}% to the per-fault latency (load {_load()})", "",
             "1. added µs per call (median of interleaved blocks; [quartiles])",
             f"   {'call':<16} {'plain':>8} {'recorded':>9} {'added':>8}   {'call path only':>14}"
             f"   {'recorder alone':>14}"]  # fmt: skip
    hot = {c.op: c for c in b.hot}
    alone = {c.op: c for c in b.wrapper}
    for c in b.costs:
        h, a = hot.get(c.op), alone.get(c.op)
        lines.append(
            f"   {c.op:<16} {c.plain_us:8.2f} {c.recorded_us:9.2f} {c.added_us:8.2f}   "
            f"{(h.added_us if h else float('nan')):14.2f}   {(a.added_us if a else float('nan')):14.2f}"
            f"   [{c.spread_us[0]:.2f} .. {c.spread_us[1]:.2f}]"
        )
    if "kvm_run" in alone:
        lines.append(f"   {'kvm_run':<16} {'':>8} {'':>9} {'':>8}   {'':>14}   "
                     f"{alone['kvm_run'].added_us:14.2f}   (no exit loop here: the recorder alone)")  # fmt: skip
    lines += ["   added = whole cost with a trace file written (chunks converted, encoded and "
              "written, amortised);", "   call path only = what the calling thread pays between "
              "two chunks; recorder alone = over a kernel that costs nothing", ""]  # fmt: skip
    if b.run is None:
        lines.append(f"2. recorded migration: failed: {b.note}")
        return "\n".join(lines)
    r = b.run
    lines.append(f"2. one recorded migration: {r.faults} faults, p50 fault latency "
                 f"{b.run_p50_us:.1f} µs (stats), {sum(r.calls.values())} calls")  # fmt: skip
    for title, fig in (
        ("the faults' path (calls while a fault is open + the waking poll), whole cost "
         "[headline]", b.figure),
        ("the same calls, call-path cost only", b.window_figure),
        ("upper bound: every call of the run charged to its faults, whole cost", b.upper_figure),
    ):  # fmt: skip
        if fig is None:
            lines.append(f"   {title}: n/a (no faults in this run)")
            continue
        detail = ", ".join(f"{op} {n:.2f}x{us:.2f}" for op, (n, us) in fig.parts.items())
        lines.append(f"   {title}:")
        lines.append(f"     {fig.added_us:.1f} µs/fault / {fig.p50_us:.1f} µs = {fig.pct:.2f}%"
                     f"   ({detail})")  # fmt: skip
    lines.append("")
    if b.in_situ is not None:
        st = b.in_situ
        lines.append(f"3. in situ: the recorder timing its own work in a real migration ({st.faults} "
                     f"faults, p50 {st.p50_us:.1f} µs; hot timing cost {st.probe_us:.2f} µs/call "
                     "subtracted)")  # fmt: skip
        for op, (n, us) in sorted(st.ops.items()):
            lines.append(f"   {op:<16} {n / max(1, st.faults):5.2f}/fault  median "
                         f"{st.median_us.get(op, 0.0):6.2f}  mean {us / max(1, n):6.2f} µs/call")  # fmt: skip
        lines.append(f"   per fault: {st.per_fault_median_us:.1f} µs (medians) = "
                     f"{100 * st.per_fault_median_us / st.p50_us:.2f}%; {st.per_fault_us:.1f} µs "
                     f"(means) = {st.pct:.2f}% of p50")  # fmt: skip
        ctl = b.in_situ_control
        net = b.in_situ_net()
        if ctl is not None and net is not None:
            cm = ", ".join(f"{op} {us:.2f}" for op, us in sorted(ctl.median_us.items()))
            lines.append(f"   control (the same timing around a wrapper that only forwards), "
                         f"medians µs/call: {cm}")  # fmt: skip
            nets = ", ".join(f"{op} {us:.2f}" for op, us in sorted(net[1].items()))
            lines.append(f"   net of the timing: {net[0]:.1f} µs/fault = "
                         f"{100 * net[0] / st.p50_us:.2f}% of p50   ({nets} µs/call)")  # fmt: skip
        lines.append("")
    if b.pairs:
        p = [x.plain_p50_us for x in b.pairs]
        q = [x.recorded_p50_us for x in b.pairs]
        d = [x.recorded_p50_us - x.plain_p50_us for x in b.pairs]
        lines.append(f"4. A/B of whole migrations, {len(b.pairs)} interleaved pairs, p50 fault "
                     f"latency µs: median [min .. max]")  # fmt: skip
        lines.append(f"   plain     {_spread(p)}")
        lines.append(f"   recorded  {_spread(q)}")
        mp = statistics.median(p)
        rel = f"   ({100 * statistics.median(d) / mp:+.1f}% of the plain median)" if mp else ""
        lines.append(f"   recorded - plain, per pair: {_spread(d)}{rel}")
        lines.append(f"   medians: recorded / plain = "
                     f"{statistics.median(q) / mp if mp else float('nan'):.3f}")  # fmt: skip
        lines.append("   (the cross-check: single runs spread more than the target; see 2.)")
        lines.append("")
    net = b.in_situ_net()
    if net is not None and b.in_situ is not None and b.in_situ.p50_us:
        x = 100 * net[0] / b.in_situ.p50_us
        ok = "PASS" if x <= TARGET_PCT else "FAIL"
        lines.append(
            f"in situ (net of the timing, medians): {x:.2f}% (target <= {TARGET_PCT:g}%): {ok}"
        )
    if b.pairs:
        mp = statistics.median(x.plain_p50_us for x in b.pairs)
        if mp:
            ab = 100 * (statistics.median(x.recorded_p50_us for x in b.pairs) / mp - 1)
            ok = "PASS" if ab <= TARGET_PCT else "FAIL"
            lines.append(
                f"A/B (ratio of medians, noisy): {ab:+.2f}% (target <= {TARGET_PCT:g}%): {ok}"
            )
    w = b.window_figure
    if w is not None and w.faults:
        ok = "PASS" if w.pct <= TARGET_PCT else "FAIL"
        lines.append(f"what a fault waits for (call path of the fault-path calls): {w.pct:.2f}% "
                     f"(target <= {TARGET_PCT:g}%): {ok}")  # fmt: skip
    f = b.figure
    pct = "n/a" if f is None or not f.faults else f"{f.pct:.2f}%"
    lines.append(f"recorder overhead per fault: {pct} (target <= {TARGET_PCT:g}%): {b.verdict}")
    return "\n".join(lines)


def run_cli(kernel: str, pairs: int, quick: bool, as_json: bool) -> int:
    """``fakekvm bench --recorder[=KERNEL] [--recorder-pairs N] [--quick] [--json]``."""
    mem = "16M" if quick else "64M"
    b = run_bench(kernel, pairs=pairs, mem=mem, quick=quick,
                  progress=None if as_json else (lambda m: print(f"  {m}", file=sys.stderr)))  # fmt: skip
    if as_json:
        print_json(b)
    else:
        print(format_bench(b))
    return 0


def print_json(b: RecorderBench) -> None:
    import msgspec

    data = msgspec.to_builtins(b)  # (dataclasses.asdict would rebuild each Counter from pairs)
    data["verdict"] = b.verdict
    data["pct"] = None if b.figure is None else b.figure.pct
    data["window_pct"] = None if b.window_figure is None else b.window_figure.pct
    data["upper_pct"] = None if b.upper_figure is None else b.upper_figure.pct
    data["load"] = _load()
    print(json.dumps(data, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# In situ: the recorder's own time inside a real migration
# ---------------------------------------------------------------------------------------------


class _Forwarder(ForwardingKernel):
    """Forwards (the control of `insitu`), shaped like a recorder for `maybe_record`."""

    def __init__(self, inner: Kernel, sink: Any, **_kw: Any) -> None:
        super().__init__(inner)
        self.sink = sink
        self._names: dict[int, str] = {}
        self._ioctl = inner.ioctl
        self._read_fn = inner.read
        self._poll = inner.poll

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        return self._ioctl(fd, request, arg)

    def read(self, fd: int, n: int) -> bytes:
        return self._read_fn(fd, n)

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        return self._poll(fds, timeout_ms)

    def stop_recording(self) -> None:
        from replay import recorder as R

        self.sink.close()
        R._ACTIVE.discard(self)


@dataclass
class InSitu:
    faults: int
    p50_us: float
    #: op -> (calls, µs of recorder work in all of them)
    ops: dict[str, tuple[int, float]]
    #: the timing's own cost per call, subtracted
    probe_us: float
    #: op -> median µs of recorder work a call (the mean, in ``ops``, carries the rare long
    #: ones: a garbage collection, a preemption, a chunk written)
    median_us: dict[str, float] = field(default_factory=dict)

    @property
    def per_fault_median_us(self) -> float:
        f = max(1, self.faults)
        return sum(n / f * self.median_us.get(op, 0.0) for op, (n, _) in self.ops.items())

    @property
    def per_fault_us(self) -> float:
        return sum(us for _, us in self.ops.values()) / max(1, self.faults)

    @property
    def pct(self) -> float:
        return 100.0 * self.per_fault_us / self.p50_us if self.p50_us else float("nan")


def _probe_cost() -> float:
    """µs the timing adds per call (two clock reads around a call, a shim around the inner
    call), measured on a call that does nothing."""
    pc = time.perf_counter_ns
    acc = [0]

    def nothing() -> None:
        return None

    def shim() -> None:
        t = pc()
        nothing()
        acc[0] += pc() - t

    def timed() -> None:
        t = pc()
        shim()
        acc[0] += pc() - t

    best = float("inf")
    for _ in range(5):
        t0 = pc()
        for _ in range(20000):
            nothing()
        base = pc() - t0
        t0 = pc()
        for _ in range(20000):
            timed()
        best = min(best, (pc() - t0 - base) / 20000 / 1000)
    return best


def insitu(
    mem: str = "64M", workload: str = "random", seed: int = 1, *, control: bool = False
) -> InSitu:
    """One real-kernel migration, recorded, with the recorder timing its own work: for each
    call, (time in the recorder's method) - (time in the inner kernel's method), by op. This is
    the cost with the caches as a migration leaves them (a micro-benchmark loop runs hot).

    ``control``: the same timing around a wrapper that only forwards (`_Forwarder`): what the
    timing itself costs in situ, to subtract."""
    from postcopy.migrate import MigrateOptions, migrate
    from replay import recorder as R

    pc = time.perf_counter_ns
    acc: dict[str, list[int]] = {}  # op -> ns of recorder work, one a call
    tls = threading.local()  # each thread's time inside the inner kernel so far

    def inner_now() -> int:
        try:
            return tls.ns
        except AttributeError:
            tls.ns = 0
            return 0

    def shim(f: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            t = pc()
            try:
                return f(*a)
            finally:
                tls.ns = inner_now() + pc() - t

        return run

    def account(op: str, t0: int, inner0: int) -> None:
        t1 = pc()
        with lock:
            a = acc.get(op)
            if a is None:
                a = acc[op] = []
            a.append(t1 - t0 - (inner_now() - inner0))

    lock = threading.Lock()

    base: Any = _Forwarder if control else R.RecordingKernel

    class Timed(base):
        def __init__(self, inner: Kernel, sink: Any, **kw: Any) -> None:
            super().__init__(inner, sink, **kw)
            self._ioctl = shim(inner.ioctl)
            self._read_fn = shim(inner.read)
            self._poll = shim(inner.poll)

        def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
            t0, i0 = pc(), inner_now()
            try:
                return super().ioctl(fd, request, arg)
            finally:
                name = self._names.get(request, "")
                account({"UFFDIO_COPY": "uffdio_copy", "UFFDIO_WAKE": "uffdio_wake",
                         "KVM_RUN": "kvm_run"}.get(name, "ioctl"), t0, i0)  # fmt: skip

        def read(self, fd: int, n: int) -> bytes:
            t0, i0 = pc(), inner_now()
            try:
                return super().read(fd, n)
            finally:
                account("read", t0, i0)

        def poll(
            self, fds: Sequence[tuple[int, int]], timeout_ms: int | None
        ) -> list[tuple[int, int]]:
            t0, i0 = pc(), inner_now()
            try:
                return super().poll(fds, timeout_ms)
            finally:
                account("poll", t0, i0)

        def monotonic_ns(self) -> int:
            t0, i0 = pc(), inner_now()
            try:
                return super().monotonic_ns()
            finally:
                account("monotonic_ns", t0, i0)

    probe = _probe_cost()
    saved = {k: os.environ.get(k) for k in ("FAKEKVM_TRACE", "FAKEKVM_TRACE_DOCTOR")}
    real_cls = R.RecordingKernel
    with tempfile.TemporaryDirectory(prefix="fakekvm-bench-rec-") as d:
        os.environ["FAKEKVM_TRACE"] = os.path.join(d, "insitu.trc")
        os.environ["FAKEKVM_TRACE_DOCTOR"] = "0"
        R.RecordingKernel = Timed  # type: ignore[misc]
        try:
            size = int(mem.rstrip("MmGg")) << (30 if mem[-1] in "Gg" else 20)
            report = migrate(MigrateOptions(kernel="real", mem_size=size, workload=workload,
                                            seed=seed))  # fmt: skip
        finally:
            R.RecordingKernel = real_cls  # type: ignore[misc]
            R.close_all()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    st = report.result.stats
    ops = {op: (len(v), max(0.0, sum(v) / 1000 - len(v) * probe)) for op, v in acc.items()}
    medians = {op: max(0.0, statistics.median(v) / 1000 - probe) for op, v in acc.items()}
    return InSitu(st.faults, st.as_dict()["latency-p50-ns"] / 1000, ops, probe, medians)
