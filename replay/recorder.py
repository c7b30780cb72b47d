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

Faults are derived from the calls by `replay.faults.FaultTracker` as they are recorded (the
engine does nothing for them); a `Fault` is appended when it is resolved, those still waiting
when the recorder is closed are appended then with ``resolved_ns`` 0.

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


class Sink(Protocol):
    def append(self, event: Event, /) -> None: ...


def _ival(x: int | None) -> int:
    return -1 if x is None else int(x)


class RecordingKernel(ForwardingKernel):
    """Forward every call to ``inner`` and append a `Call` for it to ``sink``.

    ``sink`` is a `TraceWriter` or any object with ``append(event)`` (a list in tests).
    ``stop_recording()`` appends the unresolved faults and closes the sink if it has ``close``
    (`shutdown` does it too).
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
        self.faults = FaultTracker(mechanism)
        self.fault_count = 0
        self.closed = False
        self._seq = 0
        # the hot inner methods, bound once
        self._gettid = inner.gettid
        self._now = inner.monotonic_ns
        self._put: Callable[[Any], None]
        if isinstance(sink, TraceWriter):
            # one lock for both: the writer's (its unlocked append is called under it)
            self._lock = sink._lock
            self._put = sink._append_locked
            self._chunk_events = sink.chunk_events
            self._put_flush = sink._flush_locked
            self._writer_buf = lambda: sink._buf
            self._rows = True  # Calls go in as tuples of their fields: no struct per call
            sink.before_flush = self._derive
        else:
            self._lock = threading.Lock()
            self._put = sink.append
            self._rows = False
        #: fd -> (fd_kind, vcpu)
        self._fds: dict[int, tuple[str, int]] = {}
        #: vCPU fd -> (address, length) of its kvm_run mapping
        self._runs: dict[int, tuple[int, int]] = {}
        #: vCPU fd -> (offset, length) in kvm_run of the data the VMM answers the last exit with
        self._answer: dict[int, tuple[int, int]] = {}
        self._names: dict[int, str] = {}

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
    ) -> int:
        """Append one `Call` (as a row of its fields when the sink is a `TraceWriter`) and the
        faults it resolves; returns its seq (-1 once stopped)."""
        with self._lock:
            if self.closed:
                return -1
            seq = self._seq
            self._seq = seq + 1
            # no list in the row when there are no args: a row of atoms is untracked by the GC
            row = (seq, tid, t_ns, dur_ns, op, fd, fd_kind, vcpu, request, name, iarg,
                   args or (), inp, out, ret, err)  # fmt: skip
            if self._rows:
                # TraceWriter._append_locked, inlined; faults are derived at flush (_derive)
                buf = self._writer_buf()
                buf.append(row)
                if len(buf) >= self._chunk_events:
                    self._put_flush()
                return seq
            self._put(Call(*row[:11], list(args), *row[12:]))
            if fd_kind == "userfaultfd" or vcpu >= 0 or request in _REGIONS:
                faults = self.faults.feed(Call(*row[:11], list(args), *row[12:]))
                if faults:
                    self.fault_count += len(faults)
                    for f in faults:
                        self._put(f)
            return seq

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

    @property
    def calls(self) -> int:
        """Calls recorded so far."""
        return self._seq

    def _emit_contents(self, seq: int, hva: int, data: bytes) -> None:
        with self._lock:
            if not self.closed:
                self._put(Contents(seq=seq, hva=hva, data=data))

    def stop_recording(self) -> None:
        """Append the faults still waiting, then close the sink (idempotent). The kernel stays
        usable; later calls are forwarded and no longer recorded."""
        with self._lock:
            if self.closed:
                return
            if self._rows:  # write the calls not yet flushed, with the faults they resolve
                self.sink._flush_locked()  # type: ignore[attr-defined]
            pending: list[Fault] = self.faults.finish()
            for f in pending:
                self._put(f)
            self.fault_count += len(pending)
            self.closed = True
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
        inner = self.inner
        kind, vcpu = self._fds.get(fd, _NO_FD) if fd >= 0 else _NO_FD
        tid = inner.gettid()
        t0 = inner.monotonic_ns()
        try:
            r = fn()
        except BaseException as e:
            t1 = inner.monotonic_ns()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(
                tid, t0, t1 - t0, op, fd, kind, vcpu, 0, "", iarg, args or [], inp, b"", -1, err
            )
            raise
        t1 = inner.monotonic_ns()
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
        kind, vcpu = self._fds.get(fd, _NO_FD)
        tid = self._gettid()
        iarg: int | None
        if isinstance(arg, int):
            inp = b""
            iarg = int(arg)
        else:
            inp = bytes(arg)  # type: ignore[arg-type]
            iarg = None
        run = None
        if vcpu >= 0 and request == kvm.KVM_RUN:
            run = self._runs.get(fd)
            ans = self._answer.pop(fd, None)
            if run is not None and ans is not None:
                inp = _string_at(run[0] + ans[0], ans[1])
            self.faults.vcpu_thread(tid, vcpu)
        now = self._now
        t0 = now()
        err = 0
        ret = -1
        try:
            ret = self.inner.ioctl(fd, request, arg)
        except OSError as e:
            err = e.errno or 0
            raise
        except BaseException:
            err = -1
            raise
        finally:
            t1 = now()
            if run is not None:
                out = self._run_bytes(fd, run)
            elif iarg is not None:
                out = b""
            else:
                out = bytes(arg)  # type: ignore[arg-type]
                if out == inp:
                    out = b""
            name = self._names.get(request) or self._name(request)
            seq = self._emit(
                tid, t0, t1 - t0, "ioctl", fd, kind, vcpu, request, name, iarg, (), inp, out,
                ret, err,
            )  # fmt: skip
            if err == 0 and request in _FD_MAKERS:
                self._new_fd(request, iarg, out, ret)
            if self.with_contents and err == 0 and request == uffd.UFFDIO_COPY and len(inp) >= 40:
                dst, src, length, _mode, _ = _COPY.unpack_from(inp)
                self._emit_contents(seq, dst, _string_at(src, length))
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
        return self._read("read", fd, n, None)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return self._read("pread", fd, n, offset)

    def _read(self, op: str, fd: int, n: int, offset: int | None) -> bytes:
        inner = self.inner
        kind, vcpu = self._fds.get(fd, _NO_FD)
        tid = self._gettid()
        args: Sequence[int] = () if offset is None else [offset]
        now = self._now
        t0 = now()
        try:
            data = inner.read(fd, n) if offset is None else inner.pread(fd, n, offset)
        except BaseException as e:
            t1 = now()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(tid, t0, t1 - t0, op, fd, kind, vcpu, 0, "", n, args, b"", b"", -1, err)
            raise
        t1 = now()
        out = data if (self.with_contents or kind not in _GUEST_DATA_KINDS) else b""
        self._emit(tid, t0, t1 - t0, op, fd, kind, vcpu, 0, "", n, args, b"", bytes(out), len(data))
        return data

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
        inner = self.inner
        tid = inner.gettid()
        inp = b"".join(_POLLFD.pack(fd, ev & 0xFFFF, 0) for fd, ev in fds)
        t0 = inner.monotonic_ns()
        try:
            r = inner.poll(fds, timeout_ms)
        except BaseException as e:
            t1 = inner.monotonic_ns()
            err = (e.errno or 0) if isinstance(e, OSError) else -1
            self._emit(
                tid,
                t0,
                t1 - t0,
                "poll",
                -1,
                "",
                -1,
                0,
                "",
                _ival(timeout_ms),
                [],
                inp,
                b"",
                -1,
                err,
            )
            raise
        t1 = inner.monotonic_ns()
        rev = dict(r)
        out = b"".join(_POLLFD.pack(fd, ev & 0xFFFF, rev.get(fd, 0) & 0xFFFF) for fd, ev in fds)
        self._emit(
            tid, t0, t1 - t0, "poll", -1, "", -1, 0, "", _ival(timeout_ms), [], inp, out, len(r)
        )
        return r

    # -- time and identity -----------------------------------------------------------------------

    def monotonic_ns(self) -> int:
        t = self._now()
        self._emit(self._gettid(), t, 0, "monotonic_ns", -1, "", -1, 0, "", None, (), b"", b"", t)
        return t

    def gettid(self) -> int:
        inner = self.inner
        tid = inner.gettid()
        self._emit(
            tid, inner.monotonic_ns(), 0, "gettid", -1, "", -1, 0, "", None, [], b"", b"", tid
        )
        return tid


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
