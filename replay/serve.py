"""`ReplayKernel`: a `Kernel` that answers from a recorded trace alone (``replay --mode serve``).

No KVM and no fake behind it: each call the engine makes is matched (:mod:`replay.match`) to
the next recorded call of its stream, and the recorded answer is given back —

* the recorded return value, or ``OSError(recorded errno)`` (``KVM_RUN`` → ``EINTR`` is
  re-raised as recorded, so a VMM's retry loop runs as it did);
* the recorded output bytes written into the caller's ioctl buffer (an ``_IOR``/``_IOWR``
  struct), addresses translated to the live mappings;
* ``KVM_RUN``: the recorded ``kvm_run`` bytes written into the live mapping of that vCPU's
  ``kvm_run`` (the ``mmap`` of the vCPU fd), so the VMM decodes the same exit;
* ``read``: the recorded data (``uffd_msg`` addresses translated to the live mappings);
* ``mmap``: real anonymous memory (``RealKernel``) of the recorded length; the recorded and the
  live address ranges are remembered in an :class:`~replay.match.AddressMap`;
* fds: the live run is handed the recorded fd numbers, so the recorded↔live fd translation
  is the identity and fds inside structs (``KVM_IRQFD``, ``guest_memfd``) match as recorded.

Timing-dependent answers (uffd messages, fills, polls, eventfd kicks, workers' conversions and
buffers, ``gettid``) come from :class:`replay.serve_model.ServeModel` instead, which keeps the
causality the recording had: a ``KVM_RUN`` returns only once the pages its faults waited for are
filled, a vCPU's fault message is read only after that vCPU entered the ``KVM_RUN`` it faulted
in, a poll blocks until something is ready. Blocking is bounded (``patience`` seconds, then a
divergence: never a silent hang). Fills have their memory effect (``UFFDIO_COPY`` copies
``src`` to ``dst`` in the live mappings; memfd/guest_memfd mappings are real memfds, so a
second mapping aliases the first), so the engine's own memory check still means something.

A call that matches nothing raises `ReplayDivergence` (an ``OSError``, errno ``EPROTO``)
whose message is the decoded report (expected vs got and the calls before); the first one is
also kept in ``ReplayKernel.divergence`` in case the engine swallows the exception. After a
divergence, ``close`` and ``munmap`` calls that match nothing succeed, so the engine can tear
down.

The live call is described exactly as `replay.recorder.RecordingKernel` records one (see its
docstring: ``mmap`` ``iarg`` = length, ``args`` = [prot, flags, offset, hint]; ``munmap``
``args`` = [address, length]; ``KVM_RUN`` ``inp`` = the data the VMM put in ``kvm_run`` for
the previous IO IN / MMIO read exit; guest data written to a memfd/guest_memfd reduced to its
length unless the trace has contents; ...), so matching is plain equality after address
translation. ``monotonic_ns`` and ``gettid`` answer the recorded values while the trace has
them, then the recorded clock / the live tid (running out of them is not a divergence).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fakekvm.abi import kvm, mman, uffd
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import IoctlArg, Kernel
from replay.events import Call, Event, Header
from replay.match import AddressMap, Divergence, LiveCall, Matcher, creates_fd
from replay.serve_model import FILLS, MODEL_UFFD_IOCTLS, ModelDivergence, ServeModel
from replay.show import KVM_RUN_RECORDED, kvm_run_io_data

_TEARDOWN = frozenset({"close", "munmap"})
#: recorded calls a live run need not make: teardown, and clock reads (answered while there)
_NOT_OWED = _TEARDOWN | {"monotonic_ns"}
_GUEST_DATA_KINDS = ("guest_memfd", "memfd")
#: struct pollfd {int fd; short events; short revents;}, as the recorder packs it
POLLFD = struct.Struct("<iHH")
#: fstat as recorded: mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime
STAT = struct.Struct("<10q")


class ReplayDivergence(OSError):
    """The engine made a call the trace does not have; ``str()`` is the decoded report."""

    def __init__(self, divergence: Divergence) -> None:
        super().__init__(errno.EPROTO, divergence.report())
        self.divergence = divergence

    def __str__(self) -> str:
        return str(self.strerror)


def _infer_kind(c: Call) -> str:
    """The fd_kind of the fd a call creates, when the trace never uses that fd."""
    if c.op == "open":
        path = c.inp.decode("utf-8", "replace")
        return {"/dev/kvm": "kvm", "/dev/userfaultfd": "dev-userfaultfd"}.get(path, "file")
    if c.op in ("userfaultfd", "eventfd"):
        return c.op
    if c.op == "memfd_create":
        return "memfd"
    return {
        "KVM_CREATE_VM": "kvm-vm",
        "KVM_CREATE_GUEST_MEMFD": "guest_memfd",
        "USERFAULTFD_IOC_NEW": "userfaultfd",
        "KVM_CREATE_VCPU": f"kvm-vcpu:{c.iarg}",
    }.get(c.name, "")


def created_kinds(calls: Sequence[Call]) -> dict[int, str]:
    """index of each fd-creating call -> the fd_kind the trace gives that fd later."""
    out: dict[int, str] = {}
    open_: dict[int, int] = {}  # fd -> index of the call that created it, kind unknown yet
    for i, c in enumerate(calls):
        if c.fd >= 0 and c.fd in open_ and c.fd_kind:
            out[open_.pop(c.fd)] = c.fd_kind
        if c.op == "close" and c.fd in open_:
            open_.pop(c.fd)
        if not c.errno and c.ret >= 0 and creates_fd(c.op, c.name):
            if c.ret in open_:
                out[open_[c.ret]] = _infer_kind(calls[open_[c.ret]])
            open_[c.ret] = i
    for fd_idx in open_.values():
        out[fd_idx] = _infer_kind(calls[fd_idx])
    return out


class ReplayKernel(Kernel):
    """Answers every `Kernel` call from ``events`` (see the module docstring).

    ``patience``: the longest a call waits for the live run to catch up with the recording
    (a fault's page to be filled, a message to become deliverable, a poll to become ready)
    before it is reported as a divergence.
    """

    name = "replay"

    def __init__(
        self, header: Header, events: Iterable[Event], *, window: int = 64, patience: float = 30.0
    ) -> None:
        self.header = header
        calls = [e for e in events if isinstance(e, Call)]
        self.model = ServeModel(calls, page_size=header.host.page_size or 4096)
        self.matcher = Matcher(self.model.ordered, window=window)
        self.patience = patience
        self._kind_of_created = created_kinds(calls)
        self._index = {id(c): i for i, c in enumerate(calls)}
        self.kinds: dict[int, str] = {}  #: live fd -> fd_kind
        self._runs: dict[int, Mapping] = {}  #: vCPU fd -> its kvm_run mapping
        #: vCPU fd -> (offset, length) in kvm_run of the data the VMM answers the last exit with
        self._answer: dict[int, tuple[int, int]] = {}
        self._maps: dict[int, int] = {}  #: live address -> length (what we mapped)
        self._memfds: dict[int, int] = {}  #: recorded memfd/guest_memfd -> a real memfd
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._real = RealKernel()
        self._now = calls[0].t_ns if calls else 0
        self.divergence: ReplayDivergence | None = None
        self._closed = False
        self._main_thread = -1  #: native id of the live thread that made the first call
        self._extra: set[int] = set()  #: live addresses of workers' unrecorded buffers
        #: set at the first divergence (for a watcher: the engine may swallow the error)
        self.diverged = threading.Event()

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> ReplayKernel:
        from replay.format import open_trace

        with open_trace(path) as reader:  # the calls are all read in (serve is not streamed)
            return cls(reader.header, reader, **kw)

    @property
    def addresses(self) -> AddressMap:
        return self.matcher.addresses

    # -- the one path every ordered call takes ------------------------------------------------
    def _live(self, op: str, fd: int = -1, **kw: Any) -> LiveCall:
        kind = self.kinds.get(fd, "") if fd >= 0 else ""
        me = threading.get_native_id()
        if self._main_thread < 0:
            self._main_thread = me  # the thread of the first call: setup and teardown
        return LiveCall(op=op, fd=fd, fd_kind=kind, tid=me, **kw)

    def _diverge(self, d: Divergence) -> ReplayDivergence:
        """The error to raise for ``d`` (the first one is kept); call with the lock held."""
        err = ReplayDivergence(d)
        if self.divergence is None:
            self.divergence = err
            self.diverged.set()
            self._cond.notify_all()
        return err

    def _model_divergence(self, e: ModelDivergence, live: LiveCall) -> ReplayDivergence:
        return self._diverge(Divergence(e.reason, live, e.expected, self.matcher._recent))

    def _match(self, op: str, fd: int = -1, *, lenient: bool = False, **kw: Any) -> Call | None:
        live = self._live(op, fd, **kw)
        with self._lock:
            try:
                rec = self.matcher.match(live)
            except Divergence as d:
                if lenient:
                    return None
                if self.divergence is not None and op in _TEARDOWN:
                    # after a divergence, let the engine release what it holds
                    return Call(seq=-1, tid=live.tid, t_ns=self._now, dur_ns=0, op=op, fd=fd)
                raise self._diverge(d) from None
            self._matched(rec)
        return rec

    def _matched(self, rec: Call) -> None:
        """Bookkeeping after ``rec`` answered a live call (lock held)."""
        self._now = max(self._now, rec.t_ns + rec.dur_ns)
        if not rec.errno and rec.ret >= 0 and creates_fd(rec.op, rec.name):
            idx = self._index[id(rec)]
            self.kinds[rec.ret] = self._kind_of_created.get(idx, "")
            if rec.op == "eventfd":
                self.model.eventfd_created(rec.ret, rec.iarg or 0)
        elif rec.name == "KVM_CREATE_DEVICE" and not rec.errno and len(rec.out) >= 8:
            self.kinds[struct.unpack_from("<I", rec.out, 4)[0]] = "kvm-device"
        elif rec.name in ("UFFDIO_REGISTER", "UFFDIO_UNREGISTER") and not rec.errno:
            start, length = struct.unpack_from("<QQ", rec.inp)
            if rec.name == "UFFDIO_REGISTER":
                self.model.registered(rec.fd, start, length)
            else:
                self.model.unregistered(rec.fd, start, length)
        self._cond.notify_all()

    @staticmethod
    def _raise(rec: Call) -> None:
        if rec.errno:
            raise OSError(rec.errno, f"{rec.name or rec.op}: {os.strerror(rec.errno)} (replayed)")

    def _call(self, op: str, fd: int = -1, **kw: Any) -> Call:
        rec = self._match(op, fd, **kw)
        assert rec is not None
        self._raise(rec)
        return rec

    def _out(self, rec: Call) -> bytes:
        return self.addresses.bytes_a_to_b(rec.out) if rec.out else b""

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait (lock held) until ``ready()``; False on timeout. Raises after a divergence."""
        t = self.patience if timeout is None else timeout
        ok = self._cond.wait_for(lambda: self.divergence is not None or self._closed or ready(), t)
        if self.divergence is not None:
            raise OSError(errno.EPROTO, "replay stopped: the run diverged from the trace")
        if self._closed:
            raise OSError(errno.EBADF, "replay stopped: the ReplayKernel was shut down")
        return ok

    def _stuck(self, live: LiveCall, why: str, expected: Call | None = None) -> ReplayDivergence:
        return self._diverge(
            Divergence(
                f"stuck for {self.patience:g} s: {why}", live, expected, self.matcher._recent
            )
        )

    # -- files ----------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        inp = path.encode("utf-8", "surrogateescape")
        return self._call("open", inp=inp, iarg=flags, args=(mode,)).ret

    def close(self, fd: int) -> None:
        self._call("close", fd)
        self.kinds.pop(fd, None)
        self._runs.pop(fd, None)
        self._answer.pop(fd, None)
        real = self._memfds.pop(fd, None)
        if real is not None:
            os.close(real)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        from fakekvm.abi import names

        name = names.ioctl_name(request)
        if isinstance(arg, int):
            inp = b""
            run = self._runs.get(fd) if request == kvm.KVM_RUN else None
            if run is not None:
                ans = self._answer.pop(fd, None)
                if ans is not None:
                    inp = bytes(run.view()[ans[0] : ans[0] + ans[1]])
            rec = self._match("ioctl", fd, request=request, name=name, iarg=arg, inp=inp)
            assert rec is not None
            if request == kvm.KVM_RUN:
                self._run_gate(fd, rec)
            if run is not None and rec.out:
                self._write_run(fd, run, rec.out)
            self._raise(rec)
            return rec.ret
        buf = memoryview(arg).cast("B")  # type: ignore[arg-type]
        kind = self.kinds.get(fd, "")
        if kind == "userfaultfd" and request in MODEL_UFFD_IOCTLS:
            return self._fill(fd, request, name, buf)
        if request == kvm.KVM_SET_MEMORY_ATTRIBUTES:
            rec = self._match("ioctl", fd, lenient=True, request=request, name=name, inp=bytes(buf))
            if rec is None:
                return self._set_attributes(fd, request, name, buf)
        else:
            rec = self._match("ioctl", fd, request=request, name=name, inp=bytes(buf))
        assert rec is not None
        out = self._out(rec)
        if out:
            n = min(len(out), len(buf))
            buf[:n] = out[:n]
        self._raise(rec)
        return rec.ret

    # -- KVM_RUN ------------------------------------------------------------------------------
    def _run_gate(self, fd: int, rec: Call) -> None:
        """Hold a KVM_RUN until the pages its recorded faults waited for are filled."""
        kind = self.kinds.get(fd, "")
        if not kind.startswith("kvm-vcpu:"):
            return
        vcpu = int(kind.split(":", 1)[1])
        model = self.model
        with self._lock:
            index = model.run_entered(vcpu, threading.get_native_id())
            self._cond.notify_all()
            if not model.run_gates.get((vcpu, index)):
                return
            if not self._wait(lambda: not model.run_waits_for(vcpu, index)):
                left = model.run_waits_for(vcpu, index)
                raise self._stuck(
                    self._live("ioctl", fd, request=kvm.KVM_RUN, name="KVM_RUN", iarg=0),
                    f"vCPU {vcpu}'s KVM_RUN #{rec.seq} returned in the recording once page(s) "
                    f"{', '.join(hex(self.addresses.word_a_to_b(a)) for a in left[:3])} were "
                    "filled; the live run never filled them",
                    rec,
                )

    def _write_run(self, fd: int, m: Mapping, out: bytes) -> None:
        """Put the recorded kvm_run bytes (head, then IO data if any) in the live page."""
        view = m.view()
        if len(out) < kvm.KVM_RUN_EXIT_OFFSET:
            view[: len(out)] = out
            return
        reason = kvm.kvm_run_exit_reason_fmt.unpack_from(out, kvm.KVM_RUN_EXIT_REASON_OFFSET)[0]
        data = kvm_run_io_data(out) if reason == kvm.KVM_EXIT_IO else None
        head = out[: KVM_RUN_RECORDED if data is not None else len(out)][: len(view)]
        view[: len(head)] = head
        if reason == kvm.KVM_EXIT_IO:
            direction, size, _port, count, off = kvm.kvm_run_io_fmt.unpack_from(
                out, kvm.KVM_RUN_EXIT_OFFSET
            )
            n = size * count
            if data is not None and off + len(data) <= len(view):
                view[off : off + len(data)] = data
            if direction == kvm.KVM_EXIT_IO_IN and n and off + n <= len(view):
                self._answer[fd] = (off, n)
        elif reason == kvm.KVM_EXIT_MMIO and len(out) > 52 and out[52] == 0:
            self._answer[fd] = (kvm.KVM_RUN_EXIT_OFFSET + 8, 8)  # mmio.data of a read

    # -- the model's ioctls ------------------------------------------------------------------
    def _fill(self, fd: int, request: int, name: str, buf: memoryview) -> int:
        """A fill or wake on a userfaultfd, answered by the model (with its memory effect)."""
        live_inp = bytes(buf)
        live = self._live("ioctl", fd, request=request, name=name, inp=live_inp)
        am = self.addresses
        with self._lock:
            if self.divergence is not None:
                raise OSError(errno.EPROTO, "replay stopped: the run diverged from the trace")
            if request == uffd.UFFDIO_WAKE:
                err = self.model.wake(fd, am.bytes_b_to_a(live_inp))
                if err:
                    raise OSError(err, f"{name}: {os.strerror(err)} (served)")
                return 0
            kind = FILLS[request]
            vals = list(kind.fmt.unpack_from(live_inp))
            dst, length = vals[0], vals[kind.len_i]
            src = vals[1] if request == uffd.UFFDIO_COPY else 0
            if request == uffd.UFFDIO_COPY and not self._ours(src, length):
                vals[kind.prog_i] = -errno.EFAULT
                kind.fmt.pack_into(buf, 0, *vals)
                raise OSError(errno.EFAULT, f"{name}: src {src:#x} is not mapped (served)")
            rec_inp = bytearray(live_inp)
            struct.pack_into("<Q", rec_inp, 0, am.word_b_to_a(dst))
            try:
                ans = self.model.fill(fd, request, bytes(rec_inp))
            except ModelDivergence as e:
                raise self._model_divergence(e, live) from None
            if ans.done and self._ours(dst, ans.done):
                if request == uffd.UFFDIO_COPY:
                    ctypes.memmove(dst, src, ans.done)
                elif request == uffd.UFFDIO_ZEROPAGE:
                    ctypes.memset(dst, 0, ans.done)
            self._cond.notify_all()
        vals[kind.prog_i] = ans.result
        kind.fmt.pack_into(buf, 0, *vals)
        if ans.errno:
            raise OSError(ans.errno, f"{name}: {os.strerror(ans.errno)} (served)")
        return 0

    def _ours(self, address: int, length: int) -> bool:
        """Is ``[address, address+length)`` inside one mapping this kernel made?"""
        return any(a <= address and address + length <= a + n for a, n in self._maps.items())

    def _set_attributes(self, fd: int, request: int, name: str, buf: memoryview) -> int:
        live = self._live("ioctl", fd, request=request, name=name, inp=bytes(buf))
        with self._lock:
            try:
                err = self.model.set_attributes(bytes(buf))
            except ModelDivergence as e:
                raise self._model_divergence(e, live) from None
        if err:
            raise OSError(err, f"{name}: {os.strerror(err)} (served)")
        return 0

    def _guest_data(self, fd: int) -> bool:
        return not self.header.with_contents and self.kinds.get(fd, "") in _GUEST_DATA_KINDS

    def read(self, fd: int, n: int) -> bytes:
        kind = self.kinds.get(fd, "")
        if kind == "userfaultfd":
            with self._lock:
                if self.divergence is not None:
                    raise OSError(errno.EPROTO, "replay stopped: the run diverged from the trace")
                data = self.model.read_messages(fd, n)
                self._cond.notify_all()
            if data is None:
                raise OSError(errno.EAGAIN, "read: no uffd message deliverable (served)")
            return self.addresses.bytes_a_to_b(data)
        if kind == "eventfd":
            with self._lock:
                got = self.model.eventfd_read(fd, n)
            if isinstance(got, int):
                raise OSError(-got, f"read: {os.strerror(-got)} (served eventfd)")
            return got
        rec = self._call("read", fd, iarg=n)
        return self._out(rec) if rec.out or not self._guest_data(fd) else bytes(rec.ret)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        rec = self._call("pread", fd, iarg=n, args=(offset,))
        return self._out(rec) if rec.out or not self._guest_data(fd) else bytes(rec.ret)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        if self.kinds.get(fd, "") == "eventfd":
            with self._lock:
                got = self.model.eventfd_write(fd, bytes(data))
                self._cond.notify_all()
            if got < 0:
                raise OSError(-got, f"write: {os.strerror(-got)} (served eventfd)")
            return got
        if self._guest_data(fd):
            return self._call("write", fd, args=(len(memoryview(data).cast("B")),)).ret
        return self._call("write", fd, inp=bytes(data)).ret

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self._guest_data(fd):
            n = len(memoryview(data).cast("B"))
            return self._call("pwrite", fd, args=(offset, n)).ret
        return self._call("pwrite", fd, inp=bytes(data), args=(offset,)).ret

    def lseek(self, fd: int, pos: int, how: int) -> int:
        return self._call("lseek", fd, args=(pos, how)).ret

    def fstat(self, fd: int) -> os.stat_result:
        rec = self._call("fstat", fd)
        if len(rec.out) >= STAT.size:
            return os.stat_result(STAT.unpack_from(rec.out))
        return os.stat_result((0,) * 10)

    def ftruncate(self, fd: int, length: int) -> None:
        self._call("ftruncate", fd, iarg=length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        if threading.get_native_id() != self._main_thread and fd in self._memfds:
            # a worker refilling a punched page (see ServeModel.refill_calls): done on the
            # live memfd, as timing asks, not matched against the recorded order
            self._real.fallocate(self._memfds[fd], mode, offset, length)
            with self._lock:
                self.model.counters["refills"] += 1
            return
        self._call("fallocate", fd, args=(mode, offset, length))

    # -- memory ---------------------------------------------------------------------------
    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        args = (prot, flags, offset, address)
        if fd < 0:
            rec = self._match("mmap", fd, lenient=True, iarg=length, args=args)
            if rec is None:
                with self._lock:
                    rec = self.model.take_pooled_mmap(length, args)
                if rec is None and threading.get_native_id() != self._main_thread:
                    # a worker's own buffer, allocated as timing needs it (a staging buffer
                    # grown for a bigger batch): served, with no recorded counterpart
                    return self._extra_mmap(length, prot, flags)
                if rec is None:  # neither: report it against the ordered stream
                    rec = self._match("mmap", fd, iarg=length, args=args)
                    assert rec is not None
        else:
            rec = self._match("mmap", fd, iarg=length, args=args)
            assert rec is not None
        self._raise(rec)
        kind = self.kinds.get(fd, "") if fd >= 0 else ""
        if kind in _GUEST_DATA_KINDS:  # shared file memory: every mapping of it aliases
            real = self._memfds.get(fd)
            if real is None:
                real = self._memfds[fd] = os.memfd_create(f"fakekvm-replay-{kind}", os.MFD_CLOEXEC)
            if os.fstat(real).st_size < offset + length:
                os.ftruncate(real, offset + length)
            live = self._real.mmap(
                real, length, mman.PROT_READ | mman.PROT_WRITE, mman.MAP_SHARED, offset
            )
        else:
            live = self._real.mmap(
                -1,
                length,
                mman.PROT_READ | mman.PROT_WRITE,
                mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE,
            )
        with self._lock:
            self._maps[live.address] = length
            self.addresses.add(rec.ret, live.address, length)
        m = make_mapping(
            live.address, length, fd=fd, prot=prot, flags=flags, offset=offset, owner=self
        )
        if fd >= 0 and kind.startswith("kvm-vcpu"):
            self._runs[fd] = m
        return m

    def _extra_mmap(self, length: int, prot: int, flags: int) -> Mapping:
        live = self._real.mmap(
            -1,
            length,
            mman.PROT_READ | mman.PROT_WRITE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE,
        )
        with self._lock:
            self._maps[live.address] = length
            self._extra.add(live.address)
            self.model.counters["extra_maps"] += 1
        return make_mapping(live.address, length, prot=prot, flags=flags, owner=self)

    def munmap(self, address: int, length: int) -> None:
        with self._lock:
            extra = address in self._extra
            if extra:
                self._extra.discard(address)
                self._maps.pop(address, None)
        if extra:  # one of the workers' own buffers the recording does not have
            self._real.munmap(address, length)
            return
        self._call("munmap", args=(address, length))
        with self._lock:
            if self._maps.pop(address, None) is not None:
                self.addresses.remove_b(address, length)
                self._runs = {k: v for k, v in self._runs.items() if v.address != address}
            else:
                return
        self._real.munmap(address, length)

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        rec = self._call("mremap", args=(old_address, old_length, new_length, flags,
                                          new_address))  # fmt: skip
        live = self._real.mremap(old_address, old_length, new_length, flags, new_address)
        with self._lock:
            self._maps.pop(old_address, None)
            self._maps[live] = new_length
            self.addresses.remove_b(old_address, old_length)
            self.addresses.add(rec.ret, live, new_length)
        return live

    def madvise(self, address: int, length: int, advice: int) -> None:
        """As recorded; over registered memory, DONTNEED/REMOVE also drops the live pages and
        raises the next REMOVE event, and (as in the kernel) returns once it was read."""
        self._call("madvise", args=(address, length, advice))
        model = self.model
        with self._lock:
            raised = model.removed(self.addresses.word_b_to_a(address), length, advice)
            ours = self._ours(address, length)
            self._cond.notify_all()
        if not raised:
            return
        if ours:
            self._real.madvise(address, length, advice)
        with self._lock:
            if not self._wait(lambda: model.removes_read >= raised):
                live = self._live("madvise", args=(address, length, advice))
                raise self._stuck(live, "the REMOVE event of this madvise was never read")

    # -- special files --------------------------------------------------------------------
    def userfaultfd(self, flags: int) -> int:
        return self._call("userfaultfd", iarg=flags).ret

    def eventfd(self, initval: int, flags: int = 0) -> int:
        return self._call("eventfd", iarg=initval, args=(flags,)).ret

    def memfd_create(self, name: str, flags: int = 0) -> int:
        inp = name.encode("utf-8", "surrogateescape")
        return self._call("memfd_create", inp=inp, iarg=flags).ret

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        inp = b"".join(POLLFD.pack(fd, ev & 0xFFFF, 0) for fd, ev in fds)
        t = -1 if timeout_ms is None else timeout_ms
        live = self._live("poll", iarg=t, inp=inp)
        model = self.model
        with self._lock:
            if not model.check_pollset(inp):
                raise self._diverge(
                    Divergence(
                        "poll on a set of fds the recording never polled", live, None,
                        self.matcher._recent,
                    )
                )  # fmt: skip
            model.counters["polls"] += 1
            ready = model.poll_ready(fds, self.kinds)
            if ready or t == 0:
                return ready
            limit = None if t < 0 else t / 1000.0
            ok = self._wait(lambda: bool(model.poll_ready(fds, self.kinds)), limit)
            if not ok and t < 0:
                raise self._stuck(live, "poll with no timeout: nothing recorded is left to deliver")
            return model.poll_ready(fds, self.kinds)

    # -- time and identity ----------------------------------------------------------------
    def monotonic_ns(self) -> int:
        """The recorded clock values in recorded order (never going back), then the end of
        the last call answered."""
        rec = self._match("monotonic_ns", lenient=True)
        with self._lock:
            if rec is not None:
                self._now = max(self._now, rec.ret)
            return self._now

    def gettid(self) -> int:
        """A recorded tid (each live thread keeps the first one it gets; the vCPU threads'
        stand in ``uffd_msg.ptid``), then the live one."""
        me = threading.get_native_id()
        with self._lock:
            t = self.model.gettid(me)
        return me if t is None else t

    def pending(self) -> list[Call]:
        """Recorded ordered calls the live run has not made (yet)."""
        with self._lock:
            return self.matcher.pending()

    def unfinished(self) -> list[str]:
        """What the live run left undone: ordered calls not made (teardown aside), the
        model's coverage, undelivered messages, final attributes (empty: nothing)."""
        with self._lock:
            left = [c for c in self.matcher.pending() if c.op not in _NOT_OWED]
            out = self.model.finish()
        if left:
            from replay.show import format_call

            out.insert(
                0,
                f"{len(left)} recorded call(s) not made; the first: #{left[0].seq} "
                f"[{left[0].tid}] {format_call(left[0])}",
            )
        return out

    def shutdown(self) -> None:
        """Release the live memory; a call still waiting for the trace fails (EBADF)."""
        with self._lock:
            self._closed = True
            maps, self._maps = self._maps, {}
            self._runs.clear()
            memfds, self._memfds = self._memfds, {}
            self._cond.notify_all()
        for address, length in maps.items():
            self._real.munmap(address, length)
        for real in memfds.values():
            os.close(real)
