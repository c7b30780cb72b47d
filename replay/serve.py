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

import errno
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from fakekvm.abi import kvm, mman
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import IoctlArg, Kernel
from replay.events import Call, Event, Header
from replay.match import AddressMap, Divergence, LiveCall, Matcher, creates_fd
from replay.show import KVM_RUN_RECORDED, kvm_run_io_data

_TEARDOWN = frozenset({"close", "munmap"})
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
    """Answers every `Kernel` call from ``events`` (see the module docstring)."""

    name = "replay"

    def __init__(self, header: Header, events: Iterable[Event], *, window: int = 64) -> None:
        self.header = header
        calls = [e for e in events if isinstance(e, Call)]
        self.matcher = Matcher(calls, window=window)
        self._kind_of_created = created_kinds(calls)
        self._index = {id(c): i for i, c in enumerate(calls)}
        self.kinds: dict[int, str] = {}  #: live fd -> fd_kind
        self._runs: dict[int, Mapping] = {}  #: vCPU fd -> its kvm_run mapping
        #: vCPU fd -> (offset, length) in kvm_run of the data the VMM answers the last exit with
        self._answer: dict[int, tuple[int, int]] = {}
        self._maps: dict[int, int] = {}  #: live address -> length (what we mapped)
        self._lock = threading.Lock()
        self._real = RealKernel()
        self._now = calls[0].t_ns if calls else 0
        self.divergence: ReplayDivergence | None = None

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> ReplayKernel:
        from replay.format import open_trace

        with open_trace(path) as reader:  # the calls are all read in (serve is not streamed)
            return cls(reader.header, reader, **kw)

    @property
    def addresses(self) -> AddressMap:
        return self.matcher.addresses

    # -- the one path every call takes ----------------------------------------------------
    def _match(self, op: str, fd: int = -1, *, lenient: bool = False, **kw: Any) -> Call | None:
        kind = self.kinds.get(fd, "") if fd >= 0 else ""
        live = LiveCall(op=op, fd=fd, fd_kind=kind, tid=threading.get_native_id(), **kw)
        with self._lock:
            try:
                rec = self.matcher.match(live)
            except Divergence as d:
                if lenient:
                    return None
                if self.divergence is not None and op in _TEARDOWN:
                    # after a divergence, let the engine release what it holds
                    return Call(seq=-1, tid=live.tid, t_ns=self._now, dur_ns=0, op=op, fd=fd)
                err = ReplayDivergence(d)
                if self.divergence is None:
                    self.divergence = err
                raise err from None
            self._now = max(self._now, rec.t_ns + rec.dur_ns)
            if not rec.errno and rec.ret >= 0 and creates_fd(rec.op, rec.name):
                idx = self._index[id(rec)]
                self.kinds[rec.ret] = self._kind_of_created.get(idx, "")
            elif rec.name == "KVM_CREATE_DEVICE" and not rec.errno and len(rec.out) >= 8:
                self.kinds[struct.unpack_from("<I", rec.out, 4)[0]] = "kvm-device"
        if rec.errno:
            raise OSError(rec.errno, f"{rec.name or op}: {os.strerror(rec.errno)} (replayed)")
        return rec

    def _call(self, op: str, fd: int = -1, **kw: Any) -> Call:
        rec = self._match(op, fd, **kw)
        assert rec is not None
        return rec

    def _out(self, rec: Call) -> bytes:
        return self.addresses.bytes_a_to_b(rec.out) if rec.out else b""

    # -- files ----------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        inp = path.encode("utf-8", "surrogateescape")
        return self._call("open", inp=inp, iarg=flags, args=(mode,)).ret

    def close(self, fd: int) -> None:
        self._call("close", fd)
        self.kinds.pop(fd, None)
        self._runs.pop(fd, None)
        self._answer.pop(fd, None)

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
            rec = self._call("ioctl", fd, request=request, name=name, iarg=arg, inp=inp)
            if run is not None and rec.out:
                self._write_run(fd, run, rec.out)
            return rec.ret
        buf = memoryview(arg).cast("B")  # type: ignore[arg-type]
        rec = self._call("ioctl", fd, request=request, name=name, inp=bytes(buf))
        out = self._out(rec)
        if out:
            n = min(len(out), len(buf))
            buf[:n] = out[:n]
        return rec.ret

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

    def _guest_data(self, fd: int) -> bool:
        return not self.header.with_contents and self.kinds.get(fd, "") in _GUEST_DATA_KINDS

    def read(self, fd: int, n: int) -> bytes:
        rec = self._call("read", fd, iarg=n)
        return self._out(rec) if rec.out or not self._guest_data(fd) else bytes(rec.ret)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        rec = self._call("pread", fd, iarg=n, args=(offset,))
        return self._out(rec) if rec.out or not self._guest_data(fd) else bytes(rec.ret)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
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
        self._call("fallocate", fd, args=(mode, offset, length))

    # -- memory ---------------------------------------------------------------------------
    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        rec = self._call("mmap", fd, iarg=length, args=(prot, flags, offset, address))
        anon = self._real.mmap(
            -1,
            length,
            mman.PROT_READ | mman.PROT_WRITE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE,
        )
        with self._lock:
            self._maps[anon.address] = length
            self.addresses.add(rec.ret, anon.address, length)
        m = make_mapping(
            anon.address, length, fd=fd, prot=prot, flags=flags, offset=offset, owner=self
        )
        if fd >= 0 and self.kinds.get(fd, "").startswith("kvm-vcpu"):
            self._runs[fd] = m
        return m

    def munmap(self, address: int, length: int) -> None:
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
        self._call("madvise", args=(address, length, advice))

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
        rec = self._call("poll", iarg=t, inp=inp)
        data = rec.out or b""
        res = []
        for off in range(0, len(data) - len(data) % POLLFD.size, POLLFD.size):
            fd, _ev, rev = POLLFD.unpack_from(data, off)
            if rev:
                res.append((fd, rev))
        return res

    # -- time and identity ----------------------------------------------------------------
    def monotonic_ns(self) -> int:
        """The recorded clock value, then the end of the last call answered."""
        rec = self._match("monotonic_ns", lenient=True)
        return rec.ret if rec is not None else self._now

    def gettid(self) -> int:
        """The recorded tid (consistent with recorded ``uffd_msg.ptid``), then the live one."""
        rec = self._match("gettid", lenient=True)
        return rec.ret if rec is not None else threading.get_native_id()

    def pending(self) -> list[Call]:
        """Recorded calls the live run has not made (yet)."""
        with self._lock:
            return self.matcher.pending()

    def shutdown(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
            self._runs.clear()
        for address, length in maps.items():
            self._real.munmap(address, length)
