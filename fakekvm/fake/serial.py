"""`SerializingKernel`: a scheduling point at the entry of every `Kernel` call.

A :class:`~fakekvm.kernel.seam.ForwardingKernel` over a
:class:`~fakekvm.fake.kernel.FakeKernel` driven by a
:class:`~fakekvm.fake.detsched.DeterministicScheduler`: before each call the
calling task reaches a scheduling point labelled with the call (and, for
``ioctl``, the request's name from :mod:`fakekvm.abi.names`), so the seeded RNG
decides the interleaving of kernel calls between threads. Blocking inside the
call (``KVM_RUN`` on a missing page, ``poll``, a blocking ``read``) goes
through `fakekvm.fake.waits` and so through the same scheduler.

What a ``read`` of a userfaultfd returns is added to the scheduler's event log
in a canonical form: the host-dependent fields of each ``uffd_msg``
(``include/uapi/linux/userfaultfd.h``) — addresses, which depend on where the
fake's arena landed, and ``feat.ptid``, a native tid — are rewritten as the
offset from the arena start and the task number, so the log is the same in
every process. Labels never carry fd numbers or addresses for the same reason.

:meth:`SerializingKernel.touch` is a host access through the fake's mm with a
scheduling point first ("every fault is a scheduling point").
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from fakekvm.abi import names, uffd
from fakekvm.fake.detsched import TID_BASE, DeterministicScheduler
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel

_MSG = uffd.UFFD_MSG_SIZE
_Q2 = struct.Struct("<QQ")
_Q3 = struct.Struct("<QQQ")
_PF = struct.Struct("<QQI")


def canonical_uffd_msgs(data: bytes, base: int, task_of: dict[int, int] | None = None) -> bytes:
    """``uffd_msg`` records with addresses relative to ``base`` and ptids as task numbers."""
    out = bytearray(data)
    mask = (1 << 64) - 1
    for off in range(0, len(data) - _MSG + 1, _MSG):
        ev = data[off]
        p = off + 8
        if ev == uffd.UFFD_EVENT_PAGEFAULT:
            flags, addr, ptid = _PF.unpack_from(data, p)
            task = (task_of or {}).get(ptid, -1)
            _PF.pack_into(out, p, flags, (addr - base) & mask, task & 0xFFFFFFFF)
        elif ev in (uffd.UFFD_EVENT_REMOVE, uffd.UFFD_EVENT_UNMAP):
            a, b = _Q2.unpack_from(data, p)
            _Q2.pack_into(out, p, (a - base) & mask, (b - base) & mask)
        elif ev == uffd.UFFD_EVENT_REMAP:
            a, b, n = _Q3.unpack_from(data, p)
            _Q3.pack_into(out, p, (a - base) & mask, (b - base) & mask, n)
        elif ev == uffd.UFFD_EVENT_FORK:
            out[p : p + 4] = bytes(4)  # an fd number
    return bytes(out)


class SerializingKernel(ForwardingKernel):
    """See the module docstring. ``inner`` is normally a FakeKernel built with
    ``scheduler=sched`` and ``clock=sched.clock``."""

    def __init__(self, inner: Kernel, sched: DeterministicScheduler) -> None:
        super().__init__(inner)
        self.sched = sched
        self._labels: dict[int, str] = {}
        mm = getattr(inner, "mm", None)
        self._mm = mm

    # -- helpers -----------------------------------------------------------------------------
    def _base(self) -> int:
        mm = self._mm
        return 0 if mm is None else int(mm.arena.start)

    def _is_uffd(self, fd: int) -> bool:
        files = getattr(self.inner, "_files", None)
        f = None if files is None else files.get(fd)
        return f is not None and getattr(f, "kind", "") == "userfaultfd"

    def _ioctl_label(self, request: int) -> str:
        lb = self._labels.get(request)
        if lb is None:
            lb = self._labels[request] = "ioctl " + names.ioctl_name(request)
        return lb

    def task_tid(self) -> int:
        """A per-task stand-in for a tid (``TID_BASE + task``); -1 off the scheduler."""
        t = self.sched.me()
        return -1 if t is None else TID_BASE + t.tid

    def touch(self, address: int, write: bool = False) -> int:
        """A host access at ``address`` through the fake's mm (a fault), after a point."""
        self.sched.point("touch")
        if self._mm is None:
            raise TypeError("touch() needs a fake kernel underneath")
        return int(self._mm.touch(address, write))

    # -- the seam ------------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self.sched.point("open " + path)
        return self.inner.open(path, flags, mode)

    def close(self, fd: int) -> None:
        self.sched.point("close")
        self.inner.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        self.sched.point(self._ioctl_label(request))
        return self.inner.ioctl(fd, request, arg)

    def read(self, fd: int, n: int) -> bytes:
        s = self.sched
        s.point("read")
        data = self.inner.read(fd, n)
        if data and self._is_uffd(fd):
            s.record("uffd_msg", canonical_uffd_msgs(data, self._base(), s._by_native))
        return data

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        self.sched.point("write")
        return self.inner.write(fd, data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        self.sched.point("pread")
        return self.inner.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self.sched.point("pwrite")
        return self.inner.pwrite(fd, data, offset)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        self.sched.point("lseek")
        return self.inner.lseek(fd, pos, how)

    def fstat(self, fd: int) -> os.stat_result:
        self.sched.point("fstat")
        return self.inner.fstat(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self.sched.point("ftruncate")
        self.inner.ftruncate(fd, length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self.sched.point("fallocate")
        self.inner.fallocate(fd, mode, offset, length)

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        self.sched.point("mmap")
        return self.inner.mmap(fd, length, prot, flags, offset, address)

    def munmap(self, address: int, length: int) -> None:
        self.sched.point("munmap")
        self.inner.munmap(address, length)

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        self.sched.point("mremap")
        return self.inner.mremap(old_address, old_length, new_length, flags, new_address)

    def madvise(self, address: int, length: int, advice: int) -> None:
        self.sched.point("madvise")
        self.inner.madvise(address, length, advice)

    def userfaultfd(self, flags: int) -> int:
        self.sched.point("userfaultfd")
        return self.inner.userfaultfd(flags)

    def eventfd(self, initval: int, flags: int = 0) -> int:
        self.sched.point("eventfd")
        return self.inner.eventfd(initval, flags)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        self.sched.point("memfd_create")
        return self.inner.memfd_create(name, flags)

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        self.sched.point("poll")
        is_fake = getattr(self.inner, "is_fake_fd", None)
        if timeout_ms != 0 and is_fake is not None:
            real = [fd for fd, _ in fds if fd >= 0 and not is_fake(fd)]
            if real:
                # a real poll would block this task with the baton held: refuse, never hang
                raise RuntimeError(
                    f"deterministic mode: poll would block on real fd(s) {real} outside the scheduler"
                )
        return self.inner.poll(fds, timeout_ms)

    def monotonic_ns(self) -> int:
        self.sched.point("monotonic_ns")
        return self.inner.monotonic_ns()

    def gettid(self) -> int:
        self.sched.point("gettid")
        return self.inner.gettid()


def serialized_fake(
    sched: DeterministicScheduler, profile: str = "6.18-pvm", **kw: Any
) -> SerializingKernel:
    """A `FakeKernel` wired to ``sched`` (its wait queues and its clock) behind a
    `SerializingKernel`; the fake itself is ``.inner`` (shut it down when done)."""
    from fakekvm.fake.kernel import FakeKernel

    return SerializingKernel(FakeKernel(profile, clock=sched.clock, scheduler=sched, **kw), sched)
