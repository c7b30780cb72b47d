"""The kernel seam: the one way fakekvm code reaches a kernel.

`Kernel` is the syscall surface that a VMM and a post-copy engine use, shaped
like the stdlib (``os``, ``fcntl.ioctl``, ``select.poll``) so that
:class:`~fakekvm.kernel.real.RealKernel` is a thin layer over it and a fake can
stand behind it without the caller noticing.

Rules every implementation keeps:

* failures raise :class:`OSError` with the kernel's errno (``OSError(errno.EINVAL, ...)``);
* ``ioctl(fd, request, arg)`` takes ``arg`` either as an ``int`` (passed by
  value) or as a writable buffer that is passed by pointer and read and written
  in place, like ``fcntl.ioctl(fd, req, buf, True)``; it returns the ioctl's
  non-negative return value;
* ``poll`` takes a list of ``(fd, events)`` and returns ``(fd, revents)`` for
  the fds with non-zero revents, like ``select.poll().poll()``;
* time comes from :meth:`Kernel.monotonic_ns`, so a fake can inject a virtual
  clock.

:class:`ForwardingKernel` wraps another kernel and forwards every call; a
recorder or a deterministic scheduler subclasses it and overrides what it
observes.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence

from fakekvm.kernel.mapping import Mapping

# An ioctl argument: a value, or a writable buffer passed by pointer.
IoctlArg = int | bytearray | memoryview | Mapping


class Kernel(abc.ABC):
    """The syscall surface. See the module docstring for the contract."""

    #: short name used in printouts and traces ("real", "fake", "replay", ...)
    name: str = "kernel"

    # -- files -----------------------------------------------------------------
    @abc.abstractmethod
    def open(self, path: str, flags: int, mode: int = 0o600) -> int: ...

    @abc.abstractmethod
    def close(self, fd: int) -> None: ...

    @abc.abstractmethod
    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int: ...

    @abc.abstractmethod
    def read(self, fd: int, n: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int: ...

    @abc.abstractmethod
    def pread(self, fd: int, n: int, offset: int) -> bytes: ...

    @abc.abstractmethod
    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int: ...

    @abc.abstractmethod
    def lseek(self, fd: int, pos: int, how: int) -> int: ...

    @abc.abstractmethod
    def fstat(self, fd: int) -> os.stat_result: ...

    @abc.abstractmethod
    def ftruncate(self, fd: int, length: int) -> None: ...

    @abc.abstractmethod
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None: ...

    # -- memory ----------------------------------------------------------------
    @abc.abstractmethod
    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        """Map ``length`` bytes; ``fd=-1`` with ``MAP_ANONYMOUS`` for anonymous memory.

        ``address`` is the hint (or, with ``MAP_FIXED``, the exact place).
        """

    @abc.abstractmethod
    def munmap(self, address: int, length: int) -> None: ...

    @abc.abstractmethod
    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int: ...

    @abc.abstractmethod
    def madvise(self, address: int, length: int, advice: int) -> None: ...

    # -- special files -----------------------------------------------------------
    @abc.abstractmethod
    def userfaultfd(self, flags: int) -> int:
        """The userfaultfd(2) system call (``__NR_userfaultfd`` = 323 on x86-64)."""

    @abc.abstractmethod
    def eventfd(self, initval: int, flags: int = 0) -> int: ...

    @abc.abstractmethod
    def memfd_create(self, name: str, flags: int = 0) -> int: ...

    @abc.abstractmethod
    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        """``timeout_ms`` None or negative blocks; 0 returns at once."""

    # -- time and identity -------------------------------------------------------
    @abc.abstractmethod
    def monotonic_ns(self) -> int: ...

    @abc.abstractmethod
    def gettid(self) -> int:
        """The calling thread's kernel thread id (what ``uffd_msg.pagefault.feat.ptid`` reports)."""

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Release what the kernel object holds (a fake frees its VMs; real: nothing)."""
        return None


class ForwardingKernel(Kernel):
    """A `Kernel` that forwards every call to ``inner``.

    Subclass it to observe or reshape calls (recording, scheduling, fault
    injection) while the code above keeps talking to a plain `Kernel`.
    """

    def __init__(self, inner: Kernel) -> None:
        self.inner = inner
        self.name = inner.name

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return self.inner.open(path, flags, mode)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        return self.inner.ioctl(fd, request, arg)

    def read(self, fd: int, n: int) -> bytes:
        return self.inner.read(fd, n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return self.inner.write(fd, data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return self.inner.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return self.inner.pwrite(fd, data, offset)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        return self.inner.lseek(fd, pos, how)

    def fstat(self, fd: int) -> os.stat_result:
        return self.inner.fstat(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self.inner.ftruncate(fd, length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self.inner.fallocate(fd, mode, offset, length)

    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        return self.inner.mmap(fd, length, prot, flags, offset, address)

    def munmap(self, address: int, length: int) -> None:
        self.inner.munmap(address, length)

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        return self.inner.mremap(old_address, old_length, new_length, flags, new_address)

    def madvise(self, address: int, length: int, advice: int) -> None:
        self.inner.madvise(address, length, advice)

    def userfaultfd(self, flags: int) -> int:
        return self.inner.userfaultfd(flags)

    def eventfd(self, initval: int, flags: int = 0) -> int:
        return self.inner.eventfd(initval, flags)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        return self.inner.memfd_create(name, flags)

    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        return self.inner.poll(fds, timeout_ms)

    def monotonic_ns(self) -> int:
        return self.inner.monotonic_ns()

    def gettid(self) -> int:
        return self.inner.gettid()

    def shutdown(self) -> None:
        self.inner.shutdown()
