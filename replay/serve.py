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

`ReplayKernel` is built in layers: `replay.serve_core.ServeCore` (the state, the matching
path every call takes, waiting, divergence reports, the end of a run),
`replay.serve_ioctls.ServeIoctls` (``ioctl``: ``KVM_RUN`` gates and the ``kvm_run`` page,
fills and conversions answered by the model), and this module (files, memory, special
files, ``poll``, time and identity).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

from fakekvm.abi import mman
from fakekvm.kernel.mapping import Mapping, make_mapping
from replay.match import Divergence
from replay.serve_core import ReplayDivergence, created_kinds
from replay.serve_ioctls import ServeIoctls

__all__ = ["POLLFD", "STAT", "ReplayDivergence", "ReplayKernel", "created_kinds"]

_GUEST_DATA_KINDS = ("guest_memfd", "memfd")
#: struct pollfd {int fd; short events; short revents;}, as the recorder packs it
POLLFD = struct.Struct("<iHH")
#: fstat as recorded: mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime
STAT = struct.Struct("<10q")


class ReplayKernel(ServeIoctls):
    """Answers every `Kernel` call from ``events`` (see the module docstring).

    ``patience``: the longest a call waits for the live run to catch up with the recording
    (a fault's page to be filled, a message to become deliverable, a poll to become ready)
    before it is reported as a divergence.
    """

    name = "replay"

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> ReplayKernel:
        from replay.format import open_trace

        with open_trace(path) as reader:  # the calls are all read in (serve is not streamed)
            return cls(reader.header, reader, **kw)

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
