"""`FakeEventfd`: eventfd2(2) objects, following ``fs/eventfd.c``.

A 64-bit counter. ``read`` needs at least 8 bytes (EINVAL otherwise), blocks
while the counter is 0 (EAGAIN with EFD_NONBLOCK), then returns the counter and
resets it, or with EFD_SEMAPHORE returns 1 and decrements. ``write`` adds
exactly 8 bytes (any other length is EINVAL on 6.18), a native-endian value (0xffffffffffffffff is EINVAL) and blocks while the
sum would exceed 0xfffffffffffffffe. ``poll``: POLLIN when the counter > 0,
POLLOUT while another 1 fits, POLLERR at ULLONG_MAX (only reachable through
`signal`, i.e. eventfd_signal overflow). ``lseek`` is noop_llseek (returns 0),
pread/pwrite are ESPIPE, ``fstat`` shows an anon inode (mode 0600, no type).

Kernel-side users (irqfd, ioeventfd, userfaultfd's async notifications) call
`signal` (eventfd_signal) and `wait_readable`; nothing busy-waits.
"""

from __future__ import annotations

import errno
import struct
import time

from fakekvm.abi import mman
from fakekvm.fake.files import FakeFile
from fakekvm.fake.waits import WaitDomain, WaitQueue

ULLONG_MAX = (1 << 64) - 1
EFD_FLAGS_SET = mman.EFD_SEMAPHORE | mman.EFD_CLOEXEC | mman.EFD_NONBLOCK

_U64 = struct.Struct("=Q")

class FakeEventfd(FakeFile):
    kind = "eventfd"

    def __init__(self, initval: int = 0, flags: int = 0, domain: WaitDomain | None = None) -> None:
        if flags & ~EFD_FLAGS_SET:
            raise OSError(errno.EINVAL, f"eventfd: unknown flags {flags:#x}")
        if not 0 <= initval <= 0xFFFFFFFF:
            raise OverflowError("eventfd: initval must fit an unsigned int")
        super().__init__()
        self.wq = WaitQueue(domain, name="eventfd")
        self.count = initval
        self.semaphore = bool(flags & mman.EFD_SEMAPHORE)
        self.f_flags = mman.O_RDWR | (flags & mman.EFD_NONBLOCK)
        self._ctime = time.time_ns()

    @property
    def nonblock(self) -> bool:
        return bool(self.f_flags & mman.O_NONBLOCK)

    # -- kernel-side API --------------------------------------------------------------------
    def signal(self, n: int = 1) -> None:
        """eventfd_signal: add ``n`` (saturating at ULLONG_MAX), never blocks."""
        with self.wq.lock:
            self.count = min(self.count + n, ULLONG_MAX)
            self.wq.wake_up_all_locked()

    def read_value(self, *, nonblock: bool | None = None) -> int:
        """The counter value a read(2) returns (blocking per flags or ``nonblock``)."""
        nb = self.nonblock if nonblock is None else nonblock
        wq = self.wq
        with wq.lock:
            if self.count == 0:
                if nb:
                    raise OSError(errno.EAGAIN, "eventfd: counter is 0")
                wq.wait_event_locked(lambda: self.count > 0, interruptible=True, what="eventfd read")
            if self.semaphore:
                v = 1
                self.count -= 1
            else:
                v = self.count
                self.count = 0
            wq.wake_up_all_locked()
            return v

    # -- file operations ------------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        if n < 8:
            raise OSError(errno.EINVAL, "eventfd: read buffer smaller than 8 bytes")
        return _U64.pack(self.read_value())

    def write(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data).cast("B")
        if mv.nbytes != 8:
            raise OSError(errno.EINVAL, "eventfd: write needs exactly 8 bytes")
        (v,) = _U64.unpack_from(mv)
        if v == ULLONG_MAX:
            raise OSError(errno.EINVAL, "eventfd: cannot add 0xffffffffffffffff")
        wq = self.wq
        with wq.lock:
            if ULLONG_MAX - self.count <= v:
                if self.nonblock:
                    raise OSError(errno.EAGAIN, "eventfd: counter would overflow")
                wq.wait_event_locked(
                    lambda: ULLONG_MAX - self.count > v, interruptible=True, what="eventfd write"
                )
            self.count += v
            if v:
                wq.wake_up_all_locked()
        return 8

    def poll(self) -> int:
        c = self.count
        ev = 0
        if c > 0:
            ev |= mman.POLLIN
        if c == ULLONG_MAX:
            ev |= mman.POLLERR
        if c < ULLONG_MAX - 1:
            ev |= mman.POLLOUT
        return ev

    def __repr__(self) -> str:
        return f"<FakeEventfd count={self.count} sem={self.semaphore} nb={self.nonblock}>"
