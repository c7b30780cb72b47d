"""`RealKernel`: the `Kernel` seam over the host's system calls.

A thin layer: ``os`` for files, ``fcntl.ioctl`` for ioctls (which releases the
GIL, so a vCPU thread blocked in ``KVM_RUN`` does not stop the others),
``select.poll``, and ``ctypes`` into libc for ``mmap``/``munmap``/``mremap``/
``madvise``/``fallocate`` and the ``userfaultfd`` system call (323).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import threading
import time
from collections.abc import Sequence

from fakekvm.abi import mman
from fakekvm.kernel.mapping import Mapping, make_mapping
from fakekvm.kernel.seam import IoctlArg, Kernel

_libc = ctypes.CDLL("libc.so.6", use_errno=True)

_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int

# a dunder name, which Python would mangle inside the class body
NR_userfaultfd = getattr(mman, "__NR_userfaultfd")


def _raise_errno(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


class RealKernel(Kernel):
    """The host kernel, reached through the stdlib and libc."""

    name = "real"

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        if isinstance(arg, int):
            if -(1 << 31) <= arg < 1 << 31:
                return fcntl.ioctl(fd, request, arg)
            # fcntl.ioctl takes a C int; the kernel's argument is an unsigned long
            # (a pointer or a large value such as KVM_SET_TSS_ADDR's): go through libc.
            r = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg & ((1 << 64) - 1)))
            if r < 0:
                _raise_errno(f"ioctl {request:#x}")
            return int(r)
        # A writable buffer is passed by pointer and updated in place.
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[arg-type]

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        return os.lseek(fd, pos, how)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            _raise_errno("fallocate")

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        addr = _libc.mmap(address or None, length, prot, flags, fd, offset)
        if addr is None or addr == mman.MAP_FAILED or addr == ctypes.c_void_p(-1).value:
            _raise_errno("mmap")
        return make_mapping(
            addr, length, fd=fd, prot=prot, flags=flags, offset=offset, owner=self
        )

    def munmap(self, address: int, length: int) -> None:
        if _libc.munmap(address, length) != 0:
            _raise_errno("munmap")

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        addr = _libc.mremap(old_address, old_length, new_length, flags, new_address or None)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            _raise_errno("mremap")
        return int(addr)

    def madvise(self, address: int, length: int, advice: int) -> None:
        if _libc.madvise(address, length, advice) != 0:
            _raise_errno("madvise")

    def userfaultfd(self, flags: int) -> int:
        fd = _libc.syscall(ctypes.c_long(NR_userfaultfd), ctypes.c_int(flags))
        if fd < 0:
            _raise_errno("userfaultfd")
        return int(fd)

    def eventfd(self, initval: int, flags: int = 0) -> int:
        return os.eventfd(initval, flags)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        return os.memfd_create(name, flags)

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        p = select.poll()
        for fd, events in fds:
            p.register(fd, events)
        if timeout_ms is not None and timeout_ms < 0:
            timeout_ms = None
        return p.poll(timeout_ms)

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def gettid(self) -> int:
        return threading.get_native_id()


def kvm_available(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Does ``path`` answer ``KVM_GET_API_VERSION``? Returns (ok, reason)."""
    from fakekvm.abi.ioctl import _IO

    KVMIO = 0xAE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open {path}: {e.strerror} ({errno.errorcode.get(e.errno or 0, e.errno)})"
    try:
        v = fcntl.ioctl(fd, _IO(KVMIO, 0x00))
    except OSError as e:
        return False, f"{path}: KVM_GET_API_VERSION failed: {e.strerror}"
    finally:
        os.close(fd)
    return True, f"{path}: KVM_GET_API_VERSION = {v}"
