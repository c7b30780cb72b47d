"""`FakeFile`: the base of every object a fake fd refers to (the fake's `struct file`).

`FakeKernel` keeps an fd table mapping fd numbers to `FakeFile` objects and
dispatches every fd-taking `Kernel` call to the file. A subclass overrides what
its kind of file supports; everything else answers as the kernel answers for a
file without that operation (these defaults follow fs/read_write.c, fs/ioctl.c,
mm/mmap.c and fs/open.c, and were checked on the live kernel with VM, vCPU and
userfaultfd fds: lseek 0, read/write/ftruncate EINVAL, pread ESPIPE, fstat an
anon inode, fallocate ENODEV). Subclasses: /dev/kvm, VM, vCPU, guest_memfd,
userfaultfd, /dev/userfaultfd, eventfd, memfd.

Reference counting is the kernel's: a file lives while an fd or another kernel
object (a vCPU holding its VM, a memslot holding its guest_memfd, a VMA mapping
it) holds a reference; `release()` runs when the last reference goes.

Polling follows ``include/linux/poll.h``: ``poll()`` returns the current revents
and ``poll_wait(table)`` registers the queue(s) whose wake-ups can change them
(default: ``self.wq``). A subclass that changes its poll state calls
``self.wq.wake_up_all()``.

Memory mapping follows ``file_operations.mmap`` + ``vm_operations_struct``: the
fake mm chooses the address and holds a PROT_NONE reservation there; ``mmap``
must place real host memory at exactly ``address`` (``fakekvm.fake.mm.hostmem``
has helpers) and return a `Mapping`; ``vm_fault`` answers the fault path for a
page of the file (default: present). ``i_mmap`` lists the VMAs mapping the file
(kept by the mm), so a file can invalidate the user mappings of a range
(``fakekvm.fake.mm.invalidate_file_range``).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING, Any

from fakekvm.fake.waits import PollTable, WaitQueue, poll_wait
from fakekvm.kernel.seam import IoctlArg

if TYPE_CHECKING:
    from fakekvm.kernel.mapping import Mapping

#: results of FakeFile.vm_fault (same values as fakekvm.fake.mm.FaultResult)
VM_FAULT_OK = 0
VM_FAULT_SIGBUS = 1
VM_FAULT_SIGSEGV = 2


_ANON_STAT: os.stat_result | None = None


def anon_inode_stat() -> os.stat_result:
    """fstat of an anon-inode file (they all share one inode): taken once from a real eventfd."""
    global _ANON_STAT
    if _ANON_STAT is None:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            _ANON_STAT = os.fstat(fd)
        finally:
            os.close(fd)
    return _ANON_STAT


class FakeFile:
    #: what printouts and traces call this kind of fd ("kvm", "kvm-vm", "kvm-vcpu:0", "userfaultfd", ...)
    kind: str = "file"

    def __init__(self) -> None:
        self._refs = 1
        self._ref_lock = threading.Lock()
        #: file status flags (O_NONBLOCK etc.), as fcntl(F_GETFL) would show them
        self.f_flags = 0
        #: the default wait queue: poll() state changes wake it (domain set by install_fd)
        self.wq = WaitQueue(name=self.kind)
        #: the FakeKernel whose fd table installed this file (None until installed)
        self.kernel: Any = None
        #: VMAs mapping this file (maintained by fakekvm.fake.mm; like address_space.i_mmap)
        self.i_mmap: list[Any] = []

    # -- lifetime -----------------------------------------------------------------
    def get(self) -> FakeFile:
        """Take a reference (like fget/get_file)."""
        with self._ref_lock:
            if self._refs <= 0:
                raise OSError(errno.EBADF, f"{self.kind}: file already released")
            self._refs += 1
        return self

    def put(self) -> None:
        """Drop a reference; the last one calls `release()` (like fput)."""
        with self._ref_lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.release()

    def release(self) -> None:
        """Called once when the last reference is dropped."""

    # -- operations (defaults = what the kernel answers when a file lacks them) ----
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        raise OSError(errno.ENOTTY, f"{self.kind}: inappropriate ioctl {request:#x}")

    def read(self, n: int) -> bytes:
        raise OSError(errno.EINVAL, f"{self.kind}: read not supported")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise OSError(errno.EINVAL, f"{self.kind}: write not supported")

    def pread(self, n: int, offset: int) -> bytes:
        raise OSError(errno.ESPIPE, f"{self.kind}: pread not supported")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        raise OSError(errno.ESPIPE, f"{self.kind}: pwrite not supported")

    def lseek(self, pos: int, how: int) -> int:
        # noop_llseek: what KVM's, userfaultfd's and eventfd's anon-inode files use (live: 0)
        return 0

    def fstat(self) -> os.stat_result:
        # an anon inode: mode 0600 with no file type bits (live, for VM/vCPU/uffd/eventfd fds)
        return anon_inode_stat()

    def ftruncate(self, length: int) -> None:
        raise OSError(errno.EINVAL, f"{self.kind}: ftruncate not supported")

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        # vfs_fallocate: an anon inode is neither a regular file nor a block device
        raise OSError(errno.ENODEV, f"{self.kind}: fallocate not supported")

    def mmap(self, length: int, prot: int, flags: int, offset: int, address: int) -> Mapping:
        raise OSError(errno.ENODEV, f"{self.kind}: mmap not supported")

    def poll(self) -> int:
        """Current revents bits (POLLIN, POLLERR, ...) for this file; no waiting here."""
        return 0

    def poll_wait(self, table: PollTable) -> None:
        """Register the queue(s) whose wake-ups may change `poll()` (default: ``self.wq``)."""
        poll_wait(self.wq, table)

    def vm_fault(self, vma: Any, pgoff: int, write: bool) -> int:
        """Fault on page ``pgoff`` of a mapping of this file: VM_FAULT_OK/SIGBUS/SIGSEGV."""
        return VM_FAULT_OK

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}>"
