"""`FakeKernel`: the fake process behind the `Kernel` seam — fd table, mm, devices.

Models the per-process parts of the kernel a VMM talks to: the file table
(``fs/file.c``: fd numbers, ``fd_install``, ``close``), the address space
(``fakekvm.fake.mm``), device nodes (``/dev/kvm`` and ``/dev/userfaultfd``
are registered by their modules), eventfd, memfd and poll(2)
(``fs/select.c``).

Fd numbers. Every fake fd number is *reserved* by a real fd on
``/dev/null`` (O_RDONLY|O_CLOEXEC) held open while the fake fd exists, so a
fake fd number never collides with a real fd of the process and the host
kernel cannot hand the number out again. Calls on an fd that is not in the fake
table are forwarded to the host (``os``, ``fcntl.ioctl``, ``select.poll``, libc
``mmap``): real files, sockets and pipes work through the fake unchanged. (A
consequence: code that bypasses the seam and polls a fake fd number directly
sees ``/dev/null``, which is always ready.)

poll(2) over fake and real fds together: each fake file registers a callback
on its wait queues (``poll_wait``); with only fake fds the caller sleeps on a
private `WaitQueue`; with real fds as well, a private real eventfd is added to
a real ``select.poll`` and the callbacks write to it.

Waiting: every blocking point uses ``self.waits`` (a `WaitDomain`).
``shutdown()`` wakes every waiter with ``ESHUTDOWN``; ``watchdog_s`` (or the
environment variable ``FAKEKVM_WATCHDOG_S``) makes an untimed wait that lasts
longer raise ``ETIMEDOUT`` naming what it waited for (debug mode);
``self.waits.interrupt(tid)`` plays the part of a signal (EINTR for
interruptible waits, e.g. a vCPU kick).

Hot path: ``ioctl`` on a fake fd is one dict lookup and one method call; no
locks (the GIL suffices), no logging.

Device registry: ``FakeKernel.devices[path] = factory(kernel, flags) -> FakeFile``.
``__init__`` calls ``register(kernel)`` of ``fakekvm.fake.kvm.system`` and
``fakekvm.fake.uffd`` when those modules exist; ``userfaultfd(2)`` calls
``fakekvm.fake.uffd.create(kernel, flags)``.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fakekvm.abi import mman
from fakekvm.fake.eventfd import FakeEventfd
from fakekvm.fake.files import FakeFile
from fakekvm.fake.memfd import FakeMemfd
from fakekvm.fake.mm import MM
from fakekvm.fake.waits import DEFAULT_DOMAIN, PollTable, Scheduler, WaitDomain, WaitQueue
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import IoctlArg, Kernel

DeviceFactory = Callable[["FakeKernel", int], FakeFile]

#: modules whose ``register(kernel)`` fills the device registry (if they exist yet)
DEVICE_MODULES = ("fakekvm.fake.kvm.system", "fakekvm.fake.uffd")

_POLL_ALWAYS = mman.POLLERR | mman.POLLHUP | mman.POLLNVAL


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...


class RealClock:
    """The host's CLOCK_MONOTONIC."""

    wq: WaitQueue | None = None

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


class ManualClock:
    """A clock that moves only when told (like trio's MockClock).

    Timed waits in the fake (``poll`` timeouts) are measured on this clock:
    `advance` wakes them, so a test drives timeouts without sleeping.
    """

    def __init__(self, start_ns: int = 0) -> None:
        self._now = start_ns
        self.wq = WaitQueue(name="manual-clock")

    def monotonic_ns(self) -> int:
        return self._now

    def advance(self, ns: int) -> None:
        if ns < 0:
            raise ValueError("a monotonic clock cannot go back")
        with self.wq.lock:
            self._now += ns
            self.wq.wake_up_all_locked()

    def set(self, ns: int) -> None:
        self.advance(ns - self._now)


def _reserve_fd() -> int:
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def _close_fds(fds: set[int]) -> None:
    for fd in list(fds):
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class FakeKernel(Kernel):
    """The fake kernel. See the module docstring for the fd rules."""

    name = "fake"

    def __init__(
        self,
        profile: str = "6.18-pvm",
        *,
        clock: Clock | None = None,
        gettid: Callable[[], int] | None = None,
        scheduler: Scheduler | None = None,
        watchdog_s: float | None = None,
        arena_size: int | None = None,
        vcpu_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.profile = profile
        #: ``(vm, vcpu, translate) -> cpu`` builds each vCPU's CPU instead of the unicorn
        #: `X86Cpu` (``fakekvm.fake.kvm.scripted.scripted_factory``: a trace-driven vCPU)
        self.vcpu_factory = vcpu_factory
        self.clock: Clock = clock if clock is not None else RealClock()
        self._gettid = gettid or threading.get_native_id
        if watchdog_s is None and os.environ.get("FAKEKVM_WATCHDOG_S"):
            watchdog_s = float(os.environ["FAKEKVM_WATCHDOG_S"])
        #: every wait queue of this kernel's objects should use this domain
        self.waits = WaitDomain(f"fake:{profile}", scheduler=scheduler, watchdog_s=watchdog_s)
        self.mm = MM(self) if arena_size is None else MM(self, arena_size=arena_size)
        self._files: dict[int, FakeFile] = {}
        # the reservation fds, as plain ints, so that a kernel dropped without shutdown()
        # still gives its fd numbers back when it is garbage-collected
        self._reserved: set[int] = set()
        self._finalizer = weakref.finalize(self, _close_fds, self._reserved)
        self._cloexec: set[int] = set()
        self._fd_lock = threading.Lock()
        self._real = RealKernel()
        self.devices: dict[str, DeviceFactory] = {}
        #: free-form per-subsystem state (e.g. "kvm" for E2's module-wide data)
        self.subsystems: dict[str, Any] = {}
        self.dead = False
        for modname in DEVICE_MODULES:
            self._load_device_module(modname)

    def _load_device_module(self, modname: str) -> None:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            # only tolerate the module itself (or its package) not existing yet
            if e.name is not None and modname.startswith(e.name):
                return
            raise
        reg = getattr(mod, "register", None)
        if reg is not None:
            reg(self)

    # -- fd table ---------------------------------------------------------------------------------
    def install_fd(self, file: FakeFile, flags: int = 0) -> int:
        """fd_install: take over the caller's reference to ``file``; return its fd number.

        ``flags`` may hold O_CLOEXEC (an fd flag) and O_NONBLOCK (copied into
        ``file.f_flags``).
        """
        if self.dead:
            raise OSError(errno.EBADF, "fake kernel is shut down")
        fd = _reserve_fd()
        if file.kernel is None:
            file.kernel = self
        if file.wq.domain is DEFAULT_DOMAIN:
            file.wq.domain = self.waits
        if flags & mman.O_NONBLOCK:
            file.f_flags |= mman.O_NONBLOCK
        with self._fd_lock:
            self._files[fd] = file
            self._reserved.add(fd)
            if flags & mman.O_CLOEXEC:
                self._cloexec.add(fd)
        return fd

    def file(self, fd: int) -> FakeFile:
        """The file behind fake fd ``fd`` (fget without a reference); EBADF otherwise."""
        f = self._files.get(fd)
        if f is None:
            raise OSError(errno.EBADF, f"fd {fd} is not a fake fd")
        return f

    def fget(self, fd: int) -> FakeFile:
        """The file behind ``fd`` with a new reference (the caller must ``put()`` it)."""
        return self.file(fd).get()

    def is_fake_fd(self, fd: int) -> bool:
        return fd in self._files

    def fds(self) -> dict[int, FakeFile]:
        """A snapshot of the fd table."""
        return dict(self._files)

    def memfd(self, fd: int) -> FakeMemfd:
        """The fake memfd behind ``fd`` (for page-cache queries); EBADF/EINVAL otherwise."""
        f = self.file(fd)
        if not isinstance(f, FakeMemfd):
            raise OSError(errno.EINVAL, f"fd {fd} is a {f.kind}, not a memfd")
        return f

    def eventfd_ctx(self, fd: int) -> FakeEventfd:
        """eventfd_ctx_fdget: EBADF for a bad fd, EINVAL if it is not an eventfd."""
        f = self._files.get(fd)
        if f is None:
            try:
                os.fstat(fd)
            except OSError:
                raise OSError(errno.EBADF, f"fd {fd} is not open")
            raise OSError(errno.EINVAL, f"fd {fd} is a real fd, not a fake eventfd")
        if not isinstance(f, FakeEventfd):
            raise OSError(errno.EINVAL, f"fd {fd} is a {f.kind}, not an eventfd")
        return f

    # -- files ----------------------------------------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        factory = self.devices.get(path)
        if factory is None:
            return os.open(path, flags, mode)
        f = factory(self, flags)
        f.f_flags |= flags & ~(mman.O_CLOEXEC | mman.O_CREAT | mman.O_EXCL | mman.O_NOCTTY | mman.O_TRUNC)
        return self.install_fd(f, flags & mman.O_CLOEXEC)

    def close(self, fd: int) -> None:
        with self._fd_lock:
            f = self._files.pop(fd, None)
            self._cloexec.discard(fd)
            self._reserved.discard(fd)
        if f is None:
            os.close(fd)
            return
        os.close(fd)  # the reservation
        f.put()

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        f = self._files.get(fd)
        if f is not None:
            return f.ioctl(request, arg)
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[arg-type]

    def read(self, fd: int, n: int) -> bytes:
        f = self._files.get(fd)
        return os.read(fd, n) if f is None else f.read(n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        f = self._files.get(fd)
        return os.write(fd, data) if f is None else f.write(data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        f = self._files.get(fd)
        if f is None:
            return os.pread(fd, n, offset)
        if offset < 0:
            raise OSError(errno.EINVAL, "pread: negative offset")
        return f.pread(n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        f = self._files.get(fd)
        if f is None:
            return os.pwrite(fd, data, offset)
        if offset < 0:
            raise OSError(errno.EINVAL, "pwrite: negative offset")
        return f.pwrite(data, offset)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        f = self._files.get(fd)
        return os.lseek(fd, pos, how) if f is None else f.lseek(pos, how)

    def fstat(self, fd: int) -> os.stat_result:
        f = self._files.get(fd)
        return os.fstat(fd) if f is None else f.fstat()

    def ftruncate(self, fd: int, length: int) -> None:
        f = self._files.get(fd)
        if f is None:
            os.ftruncate(fd, length)
        else:
            f.ftruncate(length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        f = self._files.get(fd)
        if f is None:
            self._real.fallocate(fd, mode, offset, length)
        else:
            f.fallocate(mode, offset, length)

    # -- memory -------------------------------------------------------------------------------------
    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        if flags & mman.MAP_ANONYMOUS:
            return self.mm.mmap(None, length, prot, flags, offset, address, fd=fd)
        f = self._files.get(fd)
        if f is None:
            if fd < 0:
                raise OSError(errno.EBADF, f"mmap: bad fd {fd}")
            os.fstat(fd)  # EBADF for a closed real fd
            return self.mm.mmap(None, length, prot, flags, offset, address, host_fd=fd, fd=fd)
        return self.mm.mmap(f, length, prot, flags, offset, address, fd=fd)

    def munmap(self, address: int, length: int) -> None:
        self.mm.munmap(address, length)

    def mremap(
        self, old_address: int, old_length: int, new_length: int, flags: int, new_address: int = 0
    ) -> int:
        return self.mm.mremap(old_address, old_length, new_length, flags, new_address)

    def madvise(self, address: int, length: int, advice: int) -> None:
        self.mm.madvise(address, length, advice)

    def mprotect(self, address: int, length: int, prot: int) -> None:
        """Not in the seam; here for tests and VMM code that asks the fake directly."""
        self.mm.mprotect(address, length, prot)

    # -- special files -------------------------------------------------------------------------------
    def userfaultfd(self, flags: int) -> int:
        try:
            mod = importlib.import_module("fakekvm.fake.uffd")
        except ModuleNotFoundError as e:
            if e.name is not None and "fakekvm.fake.uffd".startswith(e.name):
                raise OSError(errno.ENOSYS, "userfaultfd: not implemented in this fake yet")
            raise
        create = getattr(mod, "create", None)
        if create is None:
            raise OSError(errno.ENOSYS, "userfaultfd: not implemented in this fake yet")
        return int(create(self, flags))

    def eventfd(self, initval: int, flags: int = 0) -> int:
        f = FakeEventfd(initval, flags, self.waits)
        return self.install_fd(f, flags & mman.O_CLOEXEC)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        f = FakeMemfd(name, flags)
        return self.install_fd(f, flags & mman.MFD_CLOEXEC and mman.O_CLOEXEC)

    # -- poll -------------------------------------------------------------------------------------------
    def poll(self, fds: Sequence[tuple[int, int]], timeout_ms: int | None) -> list[tuple[int, int]]:
        if timeout_ms is not None and timeout_ms < 0:
            timeout_ms = None
        want: dict[int, int] = {}
        for fd, ev in fds:
            want[fd] = ev & 0xFFFF  # poll(2) events are a short
        fake = {fd: (self._files[fd], ev) for fd, ev in want.items() if fd in self._files}
        real = {fd: ev for fd, ev in want.items() if fd not in fake and fd >= 0}
        if not fake:
            return self._real.poll(list(real.items()), timeout_ms)

        clock = self.clock
        clock_wq = getattr(clock, "wq", None)
        deadline = None if timeout_ms is None else clock.monotonic_ns() + timeout_ms * 1_000_000
        table = PollTable(self.waits)
        # the real eventfd that wakes a real select.poll; guarded so that a late callback
        # never writes to the number after it is closed (and maybe reused)
        box = [-1]
        box_lock = threading.Lock()

        def kick() -> None:
            with box_lock:
                if box[0] >= 0:
                    os.eventfd_write(box[0], 1)

        try:
            for f, _ev in fake.values():
                f.poll_wait(table)
            if clock_wq is not None and deadline is not None:
                table.add(clock_wq)
            while True:
                with table.wq.lock:
                    table.triggered = False
                out = self._poll_once(want, fake, real)
                if out or timeout_ms == 0:
                    return out
                if deadline is not None and clock.monotonic_ns() >= deadline:
                    return out
                if not real:
                    self._poll_block_fake(table, clock_wq, deadline)
                    continue
                if box[0] < 0:
                    # made only now: every real fd polled fine, so none of them is closed and
                    # the waker cannot take the number of an fd the caller passed
                    box[0] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                    table.extra = kick
                    self.waits.add_shutdown_hook(kick)
                if table.triggered:
                    continue
                self._poll_block_real(real, box[0], clock_wq, deadline)
        finally:
            table.remove_all()
            if box[0] >= 0:
                self.waits.remove_shutdown_hook(kick)
                with box_lock:
                    os.close(box[0])
                    box[0] = -1

    def _poll_once(
        self, want: dict[int, int], fake: dict[int, tuple[FakeFile, int]], real: dict[int, int]
    ) -> list[tuple[int, int]]:
        rres = dict(self._real.poll(list(real.items()), 0)) if real else {}
        out = []
        for fd, ev in want.items():
            if fd < 0:
                continue
            if fd in fake:
                f, _ = fake[fd]
                rev = f.poll() & (ev | _POLL_ALWAYS)
            else:
                rev = rres.get(fd, 0)
            if rev:
                out.append((fd, rev))
        return out

    def _poll_block_fake(self, table: PollTable, clock_wq: WaitQueue | None, deadline: int | None) -> None:
        clock = self.clock
        if deadline is None:
            table.wq.wait_event(lambda: table.triggered, what="poll")
        elif clock_wq is not None:  # a manual clock: wait for a wake-up or for time to move
            table.wq.wait_event(lambda: table.triggered or clock.monotonic_ns() >= deadline, what="poll")
        else:
            remaining = (deadline - clock.monotonic_ns()) / 1e9
            if remaining > 0:
                table.wq.wait_event(lambda: table.triggered, remaining, what="poll")

    def _poll_block_real(
        self, real: dict[int, int], waker: int, clock_wq: WaitQueue | None, deadline: int | None
    ) -> None:
        self.waits.check("poll")
        p = select.poll()
        for fd, ev in real.items():
            p.register(fd, ev)
        p.register(waker, select.POLLIN)
        timeout = None
        if deadline is not None and clock_wq is None:
            timeout = max(0, (deadline - self.clock.monotonic_ns() + 999_999) // 1_000_000)
        p.poll(timeout)
        try:
            os.eventfd_read(waker)
        except BlockingIOError:
            pass
        self.waits.check("poll")

    # -- time and identity --------------------------------------------------------------------------------
    def monotonic_ns(self) -> int:
        return self.clock.monotonic_ns()

    def gettid(self) -> int:
        return self._gettid()

    # -- lifetime ---------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Close every fd, wake every waiter with an error, release the address space."""
        if self.dead:
            return
        self.dead = True
        self.waits.shutdown()
        with self._fd_lock:
            files = list(self._files.items())
            self._files.clear()
            self._cloexec.clear()
            self._reserved.clear()
        for fd, f in files:
            try:
                os.close(fd)
            except OSError:
                pass
            try:
                f.put()
            except Exception:  # shutdown must go on
                pass
        self.mm.close()

    def __repr__(self) -> str:
        return f"<FakeKernel {self.profile} fds={sorted(self._files)}>"
