"""`RecorderOps`: the `replay.recorder.RecordingKernel` calls off the fault path.

A mixin of `RecordingKernel`: ``open``/``close``, ``pread``/``write``/``pwrite``, ``lseek``,
``fstat``, ``ftruncate``, ``fallocate``, ``mmap``/``munmap``/``mremap``/``madvise``,
``userfaultfd``, ``eventfd``, ``memfd_create`` (most through `_simple`), and what the fault
path (``ioctl``, ``KVM_RUN``, ``read``, in `replay.recorder`) asks of this side: the kinds
of the fds an ioctl creates (`_new_fd`), the ``kvm_run`` bytes a ``KVM_RUN`` records
(`_run_bytes`), a failed read (`_read_failed`). What each call records is documented in
`replay.recorder`; the fd kinds and the vCPU ``kvm_run`` mappings kept here follow the
kernel's fd-creating calls (Documentation/virt/kvm/api.rst, Documentation/admin-guide/mm/
userfaultfd.rst).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from fakekvm.abi import kvm, uffd
from fakekvm.kernel.mapping import Mapping
from replay.recorder_rows import _NO_FD, RecorderRows

KVM_RUN_BYTES = 0x120  # kvm_run header (32) + exit union (256)
_GUEST_DATA_KINDS = frozenset({"guest_memfd", "memfd"})
_STAT = struct.Struct("<10q")
_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # kvm_run.io @32: direction, size, port, count, data_offset
_CREATE_DEVICE = struct.Struct("<III")
_string_at = ctypes.string_at

_NEW_FD_KIND: dict[int, str] = {
    kvm.KVM_CREATE_VM: "kvm-vm",
    kvm.KVM_CREATE_GUEST_MEMFD: "guest_memfd",
    uffd.USERFAULTFD_IOC_NEW: "userfaultfd",
}


class RecorderOps(RecorderRows):
    """The seam calls of a `RecordingKernel` that are not on a fault's path."""

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
