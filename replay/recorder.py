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
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import platform
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from fakekvm.abi import kvm, names, uffd
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel
from replay.events import Call, Contents, Event, Fault, Header, HostInfo
from replay.faults import FaultTracker
from replay.format import TraceWriter

__all__ = ["RecordingKernel", "close_all", "make_header", "maybe_record"]

KVM_RUN_BYTES = 0x120  # kvm_run header (32) + exit union (256)
_GUEST_DATA_KINDS = frozenset({"guest_memfd", "memfd"})
_POLLFD = struct.Struct("<iHH")
_STAT = struct.Struct("<10q")
_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # kvm_run.io @32: direction, size, port, count, data_offset
_COPY = struct.Struct("<QQQQq")
_CREATE_DEVICE = struct.Struct("<III")
_NO_FD = ("", -1)
_REGIONS = frozenset({kvm.KVM_SET_USER_MEMORY_REGION, kvm.KVM_SET_USER_MEMORY_REGION2})
_string_at = ctypes.string_at

_NEW_FD_KIND: dict[int, str] = {
    kvm.KVM_CREATE_VM: "kvm-vm",
    kvm.KVM_CREATE_GUEST_MEMFD: "guest_memfd",
    uffd.USERFAULTFD_IOC_NEW: "userfaultfd",
}


_FD_MAKERS = frozenset({*_NEW_FD_KIND, kvm.KVM_CREATE_VCPU, kvm.KVM_CREATE_DEVICE})
_KVM_RUN = kvm.KVM_RUN


class Sink(Protocol):
    def append(self, event: Event, /) -> None: ...


def _ival(x: int | None) -> int:
    return -1 if x is None else int(x)


class RecordingKernel(ForwardingKernel):
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

    # -- recording -------------------------------------------------------------------------------

    def _emit(
        self,
        tid: int,
        t_ns: int,
        dur_ns: int,
        op: str,
        fd: int,
        fd_kind: str,
        vcpu: int,
        request: int,
        name: str,
        iarg: int | None,
        args: Sequence[int],
        inp: bytes,
        out: bytes,
        ret: int,
        err: int = 0,
    ) -> None:
        """Append a call given by all its fields but ``seq``."""
        rows = self._rows
        # no list in the row when there are no args: a row of atoms is untracked by the GC
        rows.append((tid, t_ns, dur_ns, op, fd, fd_kind, vcpu, request, name, iarg, args or (),
                     inp, out, ret, err))  # fmt: skip
        if len(rows) >= self._chunk:
            self._convert_ready()

    def _convert_ready(self) -> None:
        """Hand every whole chunk of rows gathered to the sink (the thread that finds the flush
        lock taken leaves its row to the thread holding it, which looks again before leaving)."""
        rows = self._rows
        chunk = self._chunk
        lock = self._flush_lock
        while len(rows) >= chunk:
            if not lock.acquire(False):
                return
            try:
                while len(rows) >= chunk and not self.closed:
                    batch = rows[:chunk]
                    del rows[:chunk]  # (appends meanwhile land after: untouched)
                    self._deliver(batch)
            finally:
                lock.release()
            if self.closed:
                return

    def _deliver(self, batch: list[Any]) -> None:
        """Finish the rows (pollfd arrays) and hand them to the sink."""
        events = self._finish_rows(batch)
        w = self._writer
        if w is not None:
            with w._lock:  # the writer derives the faults of the chunk in ``before_flush``
                if not w.closed:
                    w._buf.extend(events)
                    w._flush_locked()
            return
        put = self.sink.append
        feed = self.faults.feed
        for e in events:
            if type(e) is tuple:
                call = Call(*e[:11], list(e[11]), *e[12:])  # type: ignore[call-arg]
                put(call)
                if e[6] == "userfaultfd" or e[7] >= 0 or e[8] in _REGIONS:
                    faults = feed(call)
                    if faults:
                        self.fault_count += len(faults)
                        for f in faults:
                            put(f)
            else:
                put(e)

    def _finish_rows(self, batch: list[Any]) -> list[Any]:
        """Rows -> `Call` field tuples: ``seq`` (the position: trace order = the order the
        rows were appended in) goes in front; a ``poll`` row's ``inp`` holds the ``(fd,
        events)`` pairs and its ``out`` the result until here, where they become ``struct
        pollfd`` arrays (cached: a fault thread polls the same fds again and again); a
        `_PendingContents` gets the seq of its call."""
        polls = self._polls
        seq = self._seq
        seq_of = self._seq_of
        out: list[Any] = []
        add = out.append
        names = self._names
        name_of = self._name
        for r in batch:
            if type(r) is tuple:
                if seq_of is not None:
                    seq_of[id(r)] = seq
                if r[8] is None:  # an ioctl from the call path: its name; out only if changed
                    req = r[7]
                    o = r[12]
                    r = (*r[:8], names.get(req) or name_of(req), r[9], r[10], r[11],
                         b"" if o == r[11] else o, r[13], r[14])  # fmt: skip
                elif r[3] == "poll":
                    fds, res = r[11], r[12]
                    try:
                        io = polls.get((fds, *res))
                    except TypeError:  # (lists inside: not hashable)
                        io = _pollfds(fds, res)
                    if io is None:
                        io = _pollfds(fds, res)
                        if len(polls) >= 256:
                            polls.clear()
                        polls[(fds, *res)] = io
                    r = (*r[:11], io[0], b"" if r[14] else io[1], r[13], r[14])
                add((seq, *r))
                seq += 1
            elif type(r) is _PendingContents:
                assert seq_of is not None
                add(Contents(seq=seq_of.pop(id(r.call), -1), hva=r.hva, data=r.data))
            else:  # pragma: no cover - every row kind is above
                raise AssertionError(f"recorder: unknown row {r!r}")
        self._seq = seq
        if seq_of is not None and len(seq_of) > 4 * self._chunk + 64:
            seq_of.clear()  # (the calls of Contents still to come are the last few only)
        return out

    def _derive(self, events: list[Any]) -> list[Event]:
        """The faults resolved by a chunk's calls (the writer calls this before writing it)."""
        feed = self.faults.feed
        out: list[Event] = []
        for e in events:
            if type(e) is tuple and (e[6] == "userfaultfd" or e[7] >= 0 or e[8] in _REGIONS):
                faults = feed(Call(*e))  # (args may be a tuple here: the tracker ignores it)
                if faults:
                    out.extend(faults)
        self.fault_count += len(out)
        return out

    def _drain(self) -> None:
        """Convert and deliver every row gathered (the last chunk may be short)."""
        with self._flush_lock:
            rows = self._rows
            if self.closed or not rows:
                return
            batch = rows[:]
            del rows[: len(batch)]
            for i in range(0, len(batch), self._chunk):
                self._deliver(batch[i : i + self._chunk])

    def _hook_writer(self, w: TraceWriter) -> None:
        """The writer's own ``flush``/``close`` (a `TraceWriter` used as a context manager around
        the recorder) write the rows not yet converted first."""
        w_flush, w_close = w.flush, w.close

        def flush() -> None:
            self._drain()
            w_flush()

        def close() -> None:
            self._drain()
            w_close()

        w.flush = flush  # type: ignore[method-assign]
        w.close = close  # type: ignore[method-assign]

    @property
    def calls(self) -> int:
        """Calls recorded so far (with ``with_contents``: and their `Contents`)."""
        return self._seq + len(self._rows)

    def stop_recording(self) -> None:
        """Write the calls not yet written, append the faults still waiting, then close the sink
        (idempotent). The kernel stays usable; later calls are forwarded and no longer
        recorded."""
        with self._flush_lock:
            if self.closed:
                return
            rows = self._rows
            if rows:
                batch = rows[:]
                del rows[: len(batch)]
                for i in range(0, len(batch), self._chunk):
                    self._deliver(batch[i : i + self._chunk])
            self.closed = True
            self._rows = _Discard()
            self._chunk = 1 << 62
            w = self._writer
            if w is not None:
                with w._lock:
                    if not w.closed:
                        w._flush_locked()
                        pending: list[Fault] = self.faults.finish()
                        w._buf.extend(pending)
                        self.fault_count += len(pending)
            else:
                pending = self.faults.finish()
                for f in pending:
                    self.sink.append(f)
                self.fault_count += len(pending)
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()
        _ACTIVE.discard(self)

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        finally:
            self.stop_recording()

    def _kind(self, fd: int) -> tuple[str, int]:
        return self._fds.get(fd, _NO_FD)

    def _name(self, request: int) -> str:
        n = self._names.get(request)
        if n is None:
            n = self._names[request] = names.ioctl_name(request)
        return n

    def _simple(
        self,
        op: str,
        fn: Callable[[], Any],
        *,
        fd: int = -1,
        iarg: int | None = None,
        args: list[int] | None = None,
        inp: bytes = b"",
    ) -> Any:
        """Run ``fn`` and record it; returns its result (``ret`` = an int result, else 0)."""
        kind, vcpu = self._fds.get(fd, _NO_FD) if fd >= 0 else _NO_FD
        tid = self._gettid()
        now = self._now
        t0 = now()
        try:
            r = fn()
        except BaseException as e:
            t1 = now()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(
                tid, t0, t1 - t0, op, fd, kind, vcpu, 0, "", iarg, args or [], inp, b"", -1, err
            )
            raise
        t1 = now()
        ret = r if type(r) is int else 0
        self._emit(tid, t0, t1 - t0, op, fd, kind, vcpu, 0, "", iarg, args or [], inp, b"", ret)
        return r

    # -- files -----------------------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        fd: int = self._simple(
            "open",
            lambda: self.inner.open(path, flags, mode),
            iarg=flags,
            args=[mode],
            inp=path.encode("utf-8", "surrogateescape"),
        )
        kind = (
            "kvm"
            if path == "/dev/kvm"
            else "dev-userfaultfd"
            if path == "/dev/userfaultfd"
            else "file"
        )
        self._fds[fd] = (kind, -1)
        return fd

    def close(self, fd: int) -> None:
        self._simple("close", lambda: self.inner.close(fd), fd=fd)
        self._fds.pop(fd, None)
        self._runs.pop(fd, None)
        self._answer.pop(fd, None)

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

    def _new_fd(self, request: int, iarg: int | None, out: bytes, ret: int) -> None:
        kind = _NEW_FD_KIND.get(request)
        if kind is not None:
            self._fds[ret] = (kind, -1)
        elif request == kvm.KVM_CREATE_VCPU and iarg is not None:
            self._fds[ret] = (f"kvm-vcpu:{iarg}", iarg)
        elif request == kvm.KVM_CREATE_DEVICE and len(out) >= 12:
            self._fds[_CREATE_DEVICE.unpack_from(out)[1]] = ("kvm-device", -1)

    def _run_bytes(self, fd: int, run: tuple[int, int]) -> bytes:
        addr, length = run
        head = _string_at(addr, min(KVM_RUN_BYTES, length))
        if len(head) < 56:
            return head
        reason = _U32.unpack_from(head, 8)[0]
        if reason == kvm.KVM_EXIT_IO:
            direction, size, _port, count, data_offset = _IO.unpack_from(head, 32)
            n = size * count
            if n > 0 and data_offset + n <= length:
                if direction == kvm.KVM_EXIT_IO_IN:
                    self._answer[fd] = (data_offset, n)
                return head + _string_at(addr + data_offset, n)
        elif reason == kvm.KVM_EXIT_MMIO and head[52] == 0:  # a read: the VMM fills data
            self._answer[fd] = (40, 8)
        return head

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

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        fk = self._fds.get(fd, _NO_FD)
        now = self._now
        t0 = now()
        try:
            data = self.inner.pread(fd, n, offset)
        except BaseException as e:
            self._read_failed("pread", fd, fk, n, [offset], t0, e)
            raise
        t1 = now()
        out = b"" if self._secret and fk[0] in _GUEST_DATA_KINDS else bytes(data)
        self._emit(self._gettid(), t0, t1 - t0, "pread", fd, fk[0], fk[1], 0, "", n, [offset],
                   b"", out, len(data))  # fmt: skip
        return data

    def _read_failed(
        self,
        op: str,
        fd: int,
        fk: tuple[str, int],
        n: int,
        args: Sequence[int],
        t0: int,
        e: BaseException,
    ) -> None:
        t1 = self._now()
        err = (e.errno or 0) if isinstance(e, OSError) else -1
        self._emit(self._gettid(), t0, t1 - t0, op, fd, fk[0], fk[1], 0, "", n, args, b"", b"",
                   -1, err)  # fmt: skip

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return self._write("write", fd, data, None)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return self._write("pwrite", fd, data, offset)

    def _write(
        self, op: str, fd: int, data: bytes | bytearray | memoryview, offset: int | None
    ) -> int:
        kind = self._fds.get(fd, _NO_FD)[0]
        secret = not self.with_contents and kind in _GUEST_DATA_KINDS
        inp = b"" if secret else bytes(data)
        args = [len(memoryview(data).cast("B"))] if secret else []
        if offset is None:
            return self._simple(op, lambda: self.inner.write(fd, data), fd=fd, args=args, inp=inp)
        args.insert(0, offset)
        return self._simple(
            op, lambda: self.inner.pwrite(fd, data, offset), fd=fd, args=args, inp=inp
        )

    def lseek(self, fd: int, pos: int, how: int) -> int:
        return self._simple("lseek", lambda: self.inner.lseek(fd, pos, how), fd=fd, args=[pos, how])

    def fstat(self, fd: int) -> os.stat_result:
        inner = self.inner
        kind, vcpu = self._fds.get(fd, _NO_FD)
        tid = inner.gettid()
        t0 = inner.monotonic_ns()
        try:
            st = inner.fstat(fd)
        except BaseException as e:
            t1 = inner.monotonic_ns()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(
                tid, t0, t1 - t0, "fstat", fd, kind, vcpu, 0, "", None, [], b"", b"", -1, err
            )
            raise
        t1 = inner.monotonic_ns()
        out = _STAT.pack(*(int(st[i]) for i in range(10)))
        self._emit(tid, t0, t1 - t0, "fstat", fd, kind, vcpu, 0, "", None, [], b"", out, 0)
        return st

    def ftruncate(self, fd: int, length: int) -> None:
        self._simple("ftruncate", lambda: self.inner.ftruncate(fd, length), fd=fd, iarg=length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._simple(
            "fallocate",
            lambda: self.inner.fallocate(fd, mode, offset, length),
            fd=fd,
            args=[mode, offset, length],
        )

    # -- memory ----------------------------------------------------------------------------------

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        inner = self.inner
        kind, vcpu = self._fds.get(fd, _NO_FD) if fd >= 0 else _NO_FD
        tid = inner.gettid()
        args = [prot, flags, offset, address]
        t0 = inner.monotonic_ns()
        try:
            m = inner.mmap(fd, length, prot, flags, offset, address)
        except BaseException as e:
            t1 = inner.monotonic_ns()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(
                tid, t0, t1 - t0, "mmap", fd, kind, vcpu, 0, "", length, args, b"", b"", -1, err
            )
            raise
        t1 = inner.monotonic_ns()
        self._emit(
            tid, t0, t1 - t0, "mmap", fd, kind, vcpu, 0, "", length, args, b"", b"", m.address
        )
        if vcpu >= 0 and offset == 0:
            self._runs[fd] = (m.address, length)
        return m

    def munmap(self, address: int, length: int) -> None:
        self._simple("munmap", lambda: self.inner.munmap(address, length), args=[address, length])
        for fd, (a, n) in list(self._runs.items()):
            if address <= a < address + length or a <= address < a + n:
                self._runs.pop(fd, None)

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        return self._simple(
            "mremap",
            lambda: self.inner.mremap(old_address, old_length, new_length, flags, new_address),
            args=[old_address, old_length, new_length, flags, new_address],
        )

    def madvise(self, address: int, length: int, advice: int) -> None:
        self._simple(
            "madvise",
            lambda: self.inner.madvise(address, length, advice),
            args=[address, length, advice],
        )

    # -- special files ---------------------------------------------------------------------------

    def userfaultfd(self, flags: int) -> int:
        fd: int = self._simple("userfaultfd", lambda: self.inner.userfaultfd(flags), iarg=flags)
        self._fds[fd] = ("userfaultfd", -1)
        return fd

    def eventfd(self, initval: int, flags: int = 0) -> int:
        fd: int = self._simple(
            "eventfd", lambda: self.inner.eventfd(initval, flags), iarg=initval, args=[flags]
        )
        self._fds[fd] = ("eventfd", -1)
        return fd

    def memfd_create(self, name: str, flags: int = 0) -> int:
        fd: int = self._simple(
            "memfd_create",
            lambda: self.inner.memfd_create(name, flags),
            iarg=flags,
            inp=name.encode("utf-8", "surrogateescape"),
        )
        self._fds[fd] = ("memfd", -1)
        return fd

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


class _PendingContents:
    """A `Contents` whose call has no seq yet (it gets it when the chunk is written)."""

    __slots__ = ("call", "data", "hva")

    def __init__(self, call: tuple[Any, ...], hva: int, data: bytes) -> None:
        self.call, self.hva, self.data = call, hva, data


class _Discard(list[Any]):
    """Where rows go once recording stopped: nowhere."""

    def append(self, _row: Any, /) -> None:
        return None


def _pollfds(fds: Sequence[tuple[int, int]], res: Sequence[tuple[int, int]]) -> tuple[bytes, bytes]:
    """The ``struct pollfd`` arrays (``<iHH``) before and after a ``poll``."""
    rev = dict(res)
    inp = b"".join([_POLLFD.pack(fd, ev & 0xFFFF, 0) for fd, ev in fds])
    out = b"".join([_POLLFD.pack(fd, ev & 0xFFFF, rev.get(fd, 0) & 0xFFFF) for fd, ev in fds])
    return inp, out


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


# ---------------------------------------------------------------------------------------------
# The header, and recording from the environment
# ---------------------------------------------------------------------------------------------

_ACTIVE: set[RecordingKernel] = set()
_ATEXIT = False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def doctor_facts() -> dict[str, object]:
    """A few ``fakekvm doctor`` facts about this host (probed on a fresh `RealKernel`)."""
    from fakekvm.kernel.real import RealKernel
    from tools import doctor

    facts: dict[str, object] = {}
    k = RealKernel()
    try:
        kf = doctor.probe_kvm(k)
        facts["kvm"] = {
            "present": kf.present,
            "api_version": kf.api_version,
            "error": kf.error,
            "vcpu_mmap_size": kf.vcpu_mmap_size,
            "vm_types": kf.vm_types,
            "guest_memfd_flags": kf.guest_memfd_flag_names,
            "caps": {c.name: c.system for c in kf.caps if c.system},
        }
    except Exception as e:  # a probe must never stop a recording
        facts["kvm"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        uf = doctor.probe_uffd(k)
        facts["uffd"] = {
            "syscall": uf.syscall,
            "dev_usable": uf.dev_usable,
            "unprivileged_userfaultfd": uf.unprivileged_userfaultfd,
            "features": uf.feature_names,
            "register_modes": [
                f"{r.memory}:{r.mode}={'ok' if r.ok else r.error}" for r in uf.register_modes
            ],
        }
    except Exception as e:
        facts["uffd"] = {"error": f"{type(e).__name__}: {e}"}
    facts["running_as_root"] = os.geteuid() == 0
    return facts


def make_header(
    kernel: Kernel,
    *,
    role: str = "",
    argv: Sequence[str] | None = None,
    mechanism: str | None = None,
    guest: str | None = None,
    seed: int | None = None,
    profile: str | None = None,
    with_contents: bool = False,
    doctor: bool | None = None,
) -> Header:
    """A `Header` describing this host and run; ``doctor`` probes the real host (default: when
    ``kernel`` is the real one; a fake is described by its profile)."""
    u = os.uname()
    if doctor is None:
        doctor = kernel.name == "real"
    return Header(
        uuid=str(uuid.uuid4()),
        created=datetime.now(UTC).isoformat(timespec="microseconds"),
        host=HostInfo(
            kernel_release=u.release,
            machine=u.machine,
            cpu_model=_cpu_model(),
            page_size=os.sysconf("SC_PAGE_SIZE"),
            doctor=doctor_facts() if doctor else {},
        ),
        kernel=kernel.name,
        profile=profile,
        mechanism=mechanism,
        guest=guest,
        seed=seed,
        argv=list(argv) if argv is not None else list(sys.argv),
        role=role,
        with_contents=with_contents,
    )


def close_all() -> None:
    """Close every recorder `maybe_record` opened (capture calls it; also run at exit)."""
    for r in list(_ACTIVE):
        try:
            r.stop_recording()
        except Exception as e:  # at exit: say it, never crash
            print(f"fakekvm: closing trace: {e}", file=sys.stderr)


def trace_path(base: str, role: str) -> str:
    """Where role ``role`` writes when ``FAKEKVM_TRACE`` is ``base``."""
    return base + ".source" if role == "source" else base


def maybe_record(
    kernel: Kernel,
    *,
    role: str = "",
    argv: Sequence[str] | None = None,
    mechanism: str | None = None,
    guest: str | None = None,
    seed: int | None = None,
    profile: str | None = None,
) -> Kernel:
    """``kernel`` wrapped in a `RecordingKernel` writing ``$FAKEKVM_TRACE`` (the source role
    writes ``$FAKEKVM_TRACE.source``) when that variable is set, else ``kernel`` itself.

    ``FAKEKVM_TRACE_CONTENTS=1`` records guest memory bytes; ``FAKEKVM_TRACE_ARGV`` (JSON list)
    names the command line captured (default ``sys.argv``); ``FAKEKVM_TRACE_DOCTOR=0`` skips
    the ``fakekvm doctor`` probe of the real host for the header.
    """
    global _ATEXIT
    base = os.environ.get("FAKEKVM_TRACE")
    if not base:
        return kernel
    with_contents = os.environ.get("FAKEKVM_TRACE_CONTENTS", "") not in ("", "0")
    if argv is None and os.environ.get("FAKEKVM_TRACE_ARGV"):
        argv = json.loads(os.environ["FAKEKVM_TRACE_ARGV"])
    doctor = False if os.environ.get("FAKEKVM_TRACE_DOCTOR", "") == "0" else None
    header = make_header(
        kernel,
        doctor=doctor,
        role=role,
        argv=argv,
        mechanism=mechanism,
        guest=guest,
        seed=seed,
        profile=profile,
        with_contents=with_contents,
    )
    writer = TraceWriter(trace_path(base, role), header)
    rec = RecordingKernel(kernel, writer, with_contents=with_contents, mechanism=mechanism or "")
    _ACTIVE.add(rec)
    if not _ATEXIT:
        atexit.register(close_all)
        _ATEXIT = True
    return rec
