"""``fakekvm bench --recorder``, in situ: the recorder timing its own work in a real migration.

`insitu` runs one real-kernel migration, recorded, with the recorder timing its own work:
for each call, (time in the recorder's method) - (time in the inner kernel's method), by op:
the cost with the caches as a migration leaves them (a micro-benchmark loop runs hot). Its
control (`_Forwarder`: a wrapper that only forwards) measures what the timing itself costs in
situ, to subtract; `_probe_cost` the timing's cost on a call that does nothing.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel

__all__ = ["InSitu", "insitu"]


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
