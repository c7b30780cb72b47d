"""`RecordingKernel`: a `Kernel` that records every call it forwards; `maybe_record`.

The recorder sits under the engine at the `Kernel` seam (``fakekvm/kernel/seam.py``) and
forwards each call unchanged to the kernel it wraps; the engine cannot tell it is there
(unknown attributes, such as a fake's ``mm``, are forwarded too). For each call it appends one
`replay.events.Call` to a sink (a `replay.format.TraceWriter`, or any object with ``append``,
such as a list):

* ``seq`` (trace order = completion order), ``tid`` (``inner.gettid()``), ``t_ns`` and
  ``dur_ns`` (``inner.monotonic_ns()`` around the call), ``op`` (the method name);
* ``fd`` and ``fd_kind``/``vcpu``, from the fds the recorder saw created: ``/dev/kvm`` ->
  "kvm", ``KVM_CREATE_VM`` -> "kvm-vm", ``KVM_CREATE_VCPU`` -> "kvm-vcpu:N" (``vcpu`` N),
  ``KVM_CREATE_GUEST_MEMFD`` -> "guest_memfd", ``KVM_CREATE_DEVICE`` -> "kvm-device",
  ``userfaultfd()`` and ``USERFAULTFD_IOC_NEW`` -> "userfaultfd", ``/dev/userfaultfd`` ->
  "dev-userfaultfd", ``memfd_create`` -> "memfd", ``eventfd`` -> "eventfd", other opens ->
  "file";
* ioctls: ``request``, ``name`` (`fakekvm.abi.names.ioctl_name`), ``iarg`` for an integer
  argument, else ``inp`` = the buffer before the call and ``out`` = the buffer after it, only
  when it changed; ``ret``; ``errno`` (the inner kernel's `OSError` is recorded, then re-raised
  unchanged; any other exception is recorded with ``errno`` -1);
* ``KVM_RUN``: ``out`` = the first 0x120 bytes of the vCPU's ``kvm_run`` page after the call
  (header and exit union), followed for ``KVM_EXIT_IO`` by the ``size * count`` data bytes at
  ``io.data_offset``; ``inp`` = the data the VMM placed for the previous ``KVM_EXIT_IO`` IN
  (at ``data_offset``) or ``KVM_EXIT_MMIO`` read (``mmio.data``) on that vCPU, else empty.
  The page is known from the ``mmap`` of the vCPU fd;
* ``read``/``pread`` -> ``iarg`` = n, ``out`` = the data, ``ret`` = its length;
  ``write``/``pwrite`` -> ``inp`` = the data, ``ret``; offsets in ``args``. On a
  ``guest_memfd`` or ``memfd`` these bytes are guest memory: only the length is recorded
  unless ``with_contents``;
* ``mmap`` -> ``iarg`` = length, ``args`` = [prot, flags, offset, address hint], ``ret`` = the
  address (never the memory); ``munmap``/``mremap``/``madvise``/``fallocate``/``lseek``/
  ``ftruncate`` -> their integers; ``open``/``memfd_create`` -> ``inp`` = the path/name
  (UTF-8), ``iarg`` = flags; ``poll`` -> ``inp``/``out`` = the ``struct pollfd`` array
  (``<iHH``: fd, events, revents) before/after, ``iarg`` = timeout (-1 for None);
  ``fstat`` -> ``out`` = ``<10q`` (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime);
  ``monotonic_ns``/``gettid`` -> ``ret``.

With ``with_contents`` a successful ``UFFDIO_COPY`` also appends a `Contents` (the ``dst``
address and the bytes copied from ``src``).

Faults are derived from the calls by `replay.faults.FaultTracker` when their chunk is written
(the engine does nothing for them); a `Fault` goes into the chunk of the call that resolves it
(after that chunk's calls; with a list sink, right after that call), those still waiting when
the recorder is closed are appended then with ``resolved_ns`` 0.

Cost (issue 6: at most 5 % of a migration's per-fault latency on the real kernel; measured by
``fakekvm bench --recorder``, `tools.bench_recorder`): a call on a fault's path (``read``,
``poll``, ``UFFDIO_COPY``/``UFFDIO_WAKE``, ``monotonic_ns``, ``KVM_RUN``) reads the clock twice,
copies the bytes it must (the ioctl struct before and after, the ``kvm_run`` page) and appends
one tuple of the `Call` 's fields but ``seq`` to a shared list: no lock (``list.append`` is
atomic), no struct, no fault logic; names are cached per request, fd kinds per fd, the thread
id per thread. ``seq`` (the position in that list: trace order = the order the calls were
appended in, which is their completion order), the pollfd arrays and the faults are worked out
when a chunk's worth of rows is written, by the thread that fills it (one at a time, and
never on a row still being appended), so every chunk of a trace holds exactly
``chunk_events`` rows whatever the threads did.

`maybe_record` wraps a kernel when ``FAKEKVM_TRACE`` is set (see `replay.capture`).

The parts: this module holds `RecordingKernel` with its fault path (``ioctl``, ``KVM_RUN``,
``read``, ``poll``, ``monotonic_ns``, ``gettid``); `replay.recorder_rows` turns the rows into
events for the sink; `replay.recorder_ops` records the other calls; `replay.recorder_setup`
records a process from its environment (`maybe_record`, `make_header`, `close_all`). Every
name that moved is importable from here too.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fakekvm.abi import kvm, uffd
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel
from replay.faults import FaultTracker
from replay.format import TraceWriter

# (the names marked "moved" live in the other recorder modules and stay importable from here,
# as the same objects: ``_ACTIVE`` is the one registry of the recorders `maybe_record` opened)
from replay.recorder_ops import (  # noqa: F401
    _CREATE_DEVICE,  # moved
    _GUEST_DATA_KINDS,
    _IO,  # moved
    _NEW_FD_KIND,
    _STAT,  # moved
    _U32,  # moved
    KVM_RUN_BYTES,  # moved
    RecorderOps,
    _string_at,
)
from replay.recorder_rows import (  # noqa: F401
    _NO_FD,
    _POLLFD,  # moved
    _REGIONS,  # moved
    Sink,
    _Discard,  # moved
    _PendingContents,
    _pollfds,  # moved
)
from replay.recorder_setup import (  # noqa: F401
    _ACTIVE,  # moved
    _cpu_model,  # moved
    close_all,
    doctor_facts,  # moved
    make_header,
    maybe_record,
    trace_path,  # moved
)

__all__ = ["RecordingKernel", "close_all", "make_header", "maybe_record"]

_COPY = struct.Struct("<QQQQq")
_FD_MAKERS = frozenset({*_NEW_FD_KIND, kvm.KVM_CREATE_VCPU, kvm.KVM_CREATE_DEVICE})
_KVM_RUN = kvm.KVM_RUN


def _ival(x: int | None) -> int:
    return -1 if x is None else int(x)


class RecordingKernel(RecorderOps, ForwardingKernel):
    """Forward every call to ``inner`` and append a `Call` for it to ``sink``.

    ``sink`` is a `TraceWriter` or any object with ``append(event)`` (a list in tests).
    ``stop_recording()`` appends the unresolved faults and closes the sink if it has ``close``
    (`shutdown` does it too).

    The call path only appends a row (a tuple of the call's fields but ``seq``) to a shared
    list, without a lock; rows get their ``seq``, and feed the `FaultTracker`, when ``chunk``
    of them have gathered (a `TraceWriter`'s ``chunk_events``; 1 for any other sink, so a
    list sees each call at once).
    """

    def __init__(
        self,
        inner: Kernel,
        sink: Sink,
        *,
        with_contents: bool = False,
        mechanism: str = "",
    ) -> None:
        super().__init__(inner)
        self.sink = sink
        self.with_contents = with_contents
        self._secret = not with_contents
        self.faults = FaultTracker(mechanism)
        self.fault_count = 0
        self.closed = False
        self._seq = 0  # calls converted so far
        # the hot inner methods, bound once (the real kernel's clock and tid: the C functions)
        real = _real_kernel_type()
        t = type(inner)
        native = real is not None and t.gettid is real.gettid
        self._gettid: Callable[[], int] = _native_tid if native else inner.gettid
        #: ``.tid``: the real kernel's thread id, cached per thread (read inline on the call
        #: path), or the inner kernel's ``gettid()``
        self._tls: Any = _TLS if native else _AskInner(inner.gettid)
        self._now: Callable[[], int] = (
            time.monotonic_ns if real is not None and t.monotonic_ns is real.monotonic_ns
            else inner.monotonic_ns
        )  # fmt: skip
        self._ioctl = inner.ioctl
        self._read_fn = inner.read
        self._poll = inner.poll
        #: raw rows waiting to be converted (appended without a lock)
        self._rows: list[Any] = []
        self._flush_lock = threading.Lock()
        #: with contents: id(call row) -> its seq, for the Contents that follow their call
        self._seq_of: dict[int, int] | None = {} if with_contents else None
        self._writer: TraceWriter | None = sink if isinstance(sink, TraceWriter) else None
        self._chunk = self._writer.chunk_events if self._writer is not None else 1
        if self._writer is not None:
            self._writer.before_flush = self._derive
            self._hook_writer(self._writer)
        #: fd -> (fd_kind, vcpu)
        self._fds: dict[int, tuple[str, int]] = {}
        #: vCPU fd -> (address, length) of its kvm_run mapping
        self._runs: dict[int, tuple[int, int]] = {}
        #: vCPU fd -> (offset, length) in kvm_run of the data the VMM answers the last exit with
        self._answer: dict[int, tuple[int, int]] = {}
        self._names: dict[int, str] = {}
        #: (pollfds, result) -> the recorded ``struct pollfd`` arrays before/after
        self._polls: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        #: thread -> vCPU, told at KVM_RUN entry (shared with the tracker: faults taken inside
        #: a KVM_RUN name the vCPU even though that call completes after them)
        self._tid_vcpu = self.faults.tid_vcpu

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the recorder does not have (a fake's ``mm``, knobs, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- the fault path (the other calls: `replay.recorder_ops`; the rows: `replay.recorder_rows`)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        # the fault path: two clock reads, the call, one tuple appended (no lock); the name
        # (None here), the dropping of an unchanged ``out`` and the faults are done when the
        # chunk is written
        fk = self._fds.get(fd, _NO_FD)
        if isinstance(arg, int):
            if request == _KVM_RUN and fk[1] >= 0:
                return self._kvm_run(fd, fk, arg)
            now = self._now
            t0 = now()
            try:
                ret = self._ioctl(fd, request, arg)
            except BaseException as e:
                self._failed(fd, fk, request, arg, b"", b"", t0, e)
                raise
            t1 = now()
            try:
                tid = self._tls.tid
            except AttributeError:  # (this thread's first call)
                tid = self._gettid()
            rows = self._rows
            rows.append((tid, t0, t1 - t0, "ioctl", fd, fk[0], fk[1], request, None, int(arg),
                         (), b"", b"", ret, 0))  # fmt: skip
            if len(rows) >= self._chunk:
                self._convert_ready()
            if request in _FD_MAKERS:
                self._new_fd(request, int(arg), b"", ret)
            return ret
        inp = bytes(arg)  # type: ignore[arg-type]
        now = self._now
        t0 = now()
        try:
            ret = self._ioctl(fd, request, arg)
        except BaseException as e:
            self._failed(fd, fk, request, None, inp, bytes(arg), t0, e)  # type: ignore[arg-type]
            raise
        t1 = now()
        out = bytes(arg)  # type: ignore[arg-type]
        try:
            tid = self._tls.tid
        except AttributeError:  # (this thread's first call)
            tid = self._gettid()
        row = (tid, t0, t1 - t0, "ioctl", fd, fk[0], fk[1], request, None, None, (), inp, out,
               ret, 0)  # fmt: skip
        rows = self._rows
        rows.append(row)
        if self._seq_of is not None and request == uffd.UFFDIO_COPY and len(inp) >= 40:
            dst, src, length, _mode, _ = _COPY.unpack_from(inp)
            rows.append(_PendingContents(row, dst, _string_at(src, length)))
        if len(rows) >= self._chunk:
            self._convert_ready()
        if request in _FD_MAKERS:
            self._new_fd(request, None, out, ret)
        return ret

    def _failed(
        self,
        fd: int,
        fk: tuple[str, int],
        request: int,
        iarg: int | None,
        inp: bytes,
        out: bytes,
        t0: int,
        e: BaseException,
    ) -> None:
        """Record an ioctl that raised (the inner kernel's exception is re-raised unchanged)."""
        t1 = self._now()
        err = (e.errno or 0) if isinstance(e, OSError) else -1
        self._emit(self._gettid(), t0, t1 - t0, "ioctl", fd, fk[0], fk[1], request,
                   self._name(request), None if iarg is None else int(iarg), (), inp,
                   b"" if out == inp else out, -1, err)  # fmt: skip

    def _kvm_run(self, fd: int, fk: tuple[str, int], arg: int) -> int:
        """``KVM_RUN``: the VMM's answer to the last exit in, the ``kvm_run`` bytes out."""
        tid = self._gettid()
        run = self._runs.get(fd)
        ans = self._answer.pop(fd, None)
        inp = _string_at(run[0] + ans[0], ans[1]) if run is not None and ans is not None else b""
        self._tid_vcpu[tid] = fk[1]
        now = self._now
        t0 = now()
        err = 0
        ret = -1
        try:
            ret = self._ioctl(fd, _KVM_RUN, arg)
        except OSError as e:
            err = e.errno or 0
            raise
        except BaseException:
            err = -1
            raise
        finally:
            t1 = now()
            out = self._run_bytes(fd, run) if run is not None else b""
            self._emit(tid, t0, t1 - t0, "ioctl", fd, fk[0], fk[1], _KVM_RUN, "KVM_RUN",
                       int(arg), (), inp, out, ret, err)  # fmt: skip
        return ret

    def read(self, fd: int, n: int) -> bytes:
        fk = self._fds.get(fd, _NO_FD)
        now = self._now
        t0 = now()
        try:
            data = self._read_fn(fd, n)
        except BaseException as e:
            self._read_failed("read", fd, fk, n, (), t0, e)
            raise
        t1 = now()
        # guest memory (a memfd's, a guest_memfd's) is recorded as its length only
        out = b"" if self._secret and fk[0] in _GUEST_DATA_KINDS else bytes(data)
        try:
            tid = self._tls.tid
        except AttributeError:  # (this thread's first call)
            tid = self._gettid()
        rows = self._rows
        rows.append((tid, t0, t1 - t0, "read", fd, fk[0], fk[1], 0, "", n, (), b"",
                     out, len(data), 0))  # fmt: skip
        if len(rows) >= self._chunk:
            self._convert_ready()
        return data

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        # the pollfd arrays are packed when the chunk is written (`_finish_rows`): until then
        # the row holds the pairs (a list the caller may change is copied) and the result
        now = self._now
        t0 = now()
        try:
            r = self._poll(fds, timeout_ms)
        except BaseException as e:
            t1 = now()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(self._gettid(), t0, t1 - t0, "poll", -1, "", -1, 0, "",
                       _ival(timeout_ms), (), tuple(fds), (), -1, err)  # type: ignore[arg-type]  # fmt: skip
            raise
        t1 = now()
        try:
            tid = self._tls.tid
        except AttributeError:  # (this thread's first call)
            tid = self._gettid()
        rows = self._rows
        rows.append((tid, t0, t1 - t0, "poll", -1, "", -1, 0, "",
                     -1 if timeout_ms is None else timeout_ms, (),
                     fds if type(fds) is tuple else tuple(fds), r, len(r), 0))  # fmt: skip
        if len(rows) >= self._chunk:
            self._convert_ready()
        return r

    # -- time and identity -----------------------------------------------------------------------

    def monotonic_ns(self) -> int:
        t = self._now()
        try:
            tid = self._tls.tid
        except AttributeError:  # (this thread's first call)
            tid = self._gettid()
        rows = self._rows
        rows.append((tid, t, 0, "monotonic_ns", -1, "", -1, 0, "", None, (), b"", b"",
                     t, 0))  # fmt: skip
        if len(rows) >= self._chunk:
            self._convert_ready()
        return t

    def gettid(self) -> int:
        tid = self._gettid()
        self._emit(tid, self._now(), 0, "gettid", -1, "", -1, 0, "", None, (), b"", b"", tid)
        return tid


class _AskInner:
    """``.tid`` = the inner kernel's ``gettid()`` (for kernels whose tid is not the host's)."""

    __slots__ = ("gettid",)

    def __init__(self, gettid: Callable[[], int]) -> None:
        self.gettid = gettid

    @property
    def tid(self) -> int:
        return self.gettid()


_TLS = threading.local()
os.register_at_fork(after_in_child=lambda: _TLS.__dict__.pop("tid", None))


def _native_tid() -> int:
    """``gettid()``, once per thread (``threading.get_native_id`` is a system call each time)."""
    try:
        return _TLS.tid
    except AttributeError:
        tid = _TLS.tid = threading.get_native_id()
        return tid


def _real_kernel_type() -> Any:
    try:
        from fakekvm.kernel.real import RealKernel
    except ImportError:  # pragma: no cover
        return None
    return RealKernel
