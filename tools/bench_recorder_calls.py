"""``fakekvm bench --recorder``, parts 1 and 2: what recording adds to one call.

* `NullKernel`: a kernel whose calls cost nothing, so what a recorder wrapped around it costs
  is the recorder's own work;
* the recorders measured: `default_recorder` (a `replay.recorder.RecordingKernel` writing a
  real trace file, as ``fakekvm capture`` does) and `hot_path_recorder` (chunks too big to
  ever fill: the call path alone);
* `call_costs`: the same call, in interleaved blocks, through the plain kernel and through a
  recorder, for the calls a fault makes (`OPS`); added = median over blocks of (recorded -
  plain) per call;
* `wrapper_costs`: the same wrapper over a `NullKernel` (this one includes ``KVM_RUN``).

Nothing here asserts a time. The whole benchmark, and what these figures feed:
`tools.bench_recorder`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fakekvm.abi import kvm, mman, uffd
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.seam import IoctlArg, Kernel

__all__ = [
    "OPS",
    "PAGE",
    "CallCost",
    "NullKernel",
    "RecorderFactory",
    "call_costs",
    "default_recorder",
    "hot_path_recorder",
    "wrapper_costs",
]

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


def hot_path_recorder(inner: Kernel, path: str) -> Kernel:
    """The default recorder with chunks too big to ever fill during a measurement: what a call
    costs its caller when no chunk is converted and written (the call path alone)."""
    from replay.format import TraceWriter
    from replay.recorder import RecordingKernel, make_header

    w = TraceWriter(path, make_header(inner, doctor=False, role="bench"), chunk_events=1 << 30)
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
