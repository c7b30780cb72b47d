"""Real host memory under the fake address space: libc mmap & co. through ctypes.

The fake mm (``fakekvm.fake.mm.core``) keeps its VMAs inside one *arena*: a
PROT_NONE, MAP_NORESERVE reservation of host address space made once per fake
process. A fake mapping is a real ``mmap(MAP_FIXED)`` inside the arena, and a
fake ``munmap`` puts the PROT_NONE reservation back, so the fake never unmaps
memory it does not own and nothing else in the Python process can be placed in
a hole of the fake address space.

Also here: ``safe_copy_from``/``safe_copy_to`` (``process_vm_readv``/``writev``
on our own pid, syscalls 310/311): copy from/to an arbitrary user pointer and
get ``EFAULT`` instead of a crash for a bad one (what ``copy_from_user`` does
for ``UFFDIO_COPY``'s ``src``).

libc is the one set up by ``fakekvm.kernel.real``.
"""

from __future__ import annotations

import ctypes
import errno
import os

from fakekvm.abi import mman
from fakekvm.kernel.real import _libc

_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value

GiB = 1 << 30
PAGE_SIZE = mman.PAGE_SIZE


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def host_mmap(address: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """Real mmap; raises OSError. ``address`` 0 lets the host choose."""
    addr = _libc.mmap(address or None, length, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        raise _err("host mmap")
    return int(addr)


def host_munmap(address: int, length: int) -> None:
    if _libc.munmap(address, length) != 0:
        raise _err("host munmap")


def host_mprotect(address: int, length: int, prot: int) -> None:
    if _libc.mprotect(address, length, prot) != 0:
        raise _err("host mprotect")


def host_madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        raise _err("host madvise")


def host_mremap(old: int, old_len: int, new_len: int, flags: int, new: int = 0) -> int:
    addr = _libc.mremap(old, old_len, new_len, flags, new or None)
    if addr is None or addr == _MAP_FAILED:
        raise _err("host mremap")
    return int(addr)


_RESERVE_FLAGS = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE


def map_anon_fixed(address: int, length: int, prot: int, *, shared: bool = False) -> None:
    """Fresh zero-filled anonymous memory at exactly ``address`` (replacing what is there)."""
    flags = mman.MAP_FIXED | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE
    flags |= mman.MAP_SHARED if shared else mman.MAP_PRIVATE
    host_mmap(address, length, prot, flags)


def map_fd_fixed(address: int, length: int, prot: int, real_fd: int, offset: int, *, shared: bool = True) -> None:
    """Map a real fd (e.g. a memfd backing a fake file) at exactly ``address``."""
    flags = mman.MAP_FIXED | (mman.MAP_SHARED if shared else mman.MAP_PRIVATE)
    host_mmap(address, length, prot, flags, real_fd, offset)


def reserve_fixed(address: int, length: int) -> None:
    """Put the PROT_NONE reservation back over [address, address+length)."""
    host_mmap(address, length, mman.PROT_NONE, _RESERVE_FLAGS | mman.MAP_FIXED)


class Arena:
    """A PROT_NONE reservation of ``size`` bytes aligned to 1 GiB."""

    def __init__(self, size: int) -> None:
        raw = host_mmap(0, size + GiB, mman.PROT_NONE, _RESERVE_FLAGS)
        start = (raw + GiB - 1) & ~(GiB - 1)
        # trim the unaligned head and tail
        if start > raw:
            host_munmap(raw, start - raw)
        tail = raw + size + GiB - (start + size)
        if tail:
            host_munmap(start + size, tail)
        self.start = start
        self.end = start + size
        self.closed = False

    def __contains__(self, address: int) -> bool:
        return self.start <= address < self.end

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            host_munmap(self.start, self.end - self.start)


# -- safe copies through process_vm_readv / process_vm_writev ----------------------
class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _vm_rw(nr: int, local: int, remote: int, n: int) -> int:
    liov = _iovec(local, n)
    riov = _iovec(remote, n)
    pid = os.getpid()
    r = _libc.syscall(
        ctypes.c_long(nr), ctypes.c_long(pid), ctypes.byref(liov), ctypes.c_ulong(1),
        ctypes.byref(riov), ctypes.c_ulong(1), ctypes.c_ulong(0),
    )
    return int(r)


def safe_copy_from(address: int, n: int) -> bytes:
    """``n`` bytes at host ``address``; ``OSError(EFAULT)`` if any of it is not readable."""
    if n == 0:
        return b""
    buf = ctypes.create_string_buffer(n)
    r = _vm_rw(mman.__NR_process_vm_readv, ctypes.addressof(buf), address, n)
    if r != n:
        raise OSError(errno.EFAULT, f"bad address {address:#x} (+{n:#x})")
    return buf.raw


def safe_copy_to(address: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at host ``address``; ``OSError(EFAULT)`` if any of it is not writable."""
    n = len(data)
    if n == 0:
        return
    buf = ctypes.create_string_buffer(bytes(data), n)
    r = _vm_rw(mman.__NR_process_vm_writev, ctypes.addressof(buf), address, n)
    if r != n:
        raise OSError(errno.EFAULT, f"bad address {address:#x} (+{n:#x})")


def memcpy(dst: int, src: int, n: int) -> None:
    """Unchecked host copy (both ranges known to be mapped by the fake)."""
    ctypes.memmove(dst, src, n)


def memset(dst: int, value: int, n: int) -> None:
    ctypes.memset(dst, value, n)


def read_bytes(address: int, n: int) -> bytes:
    """Unchecked read of mapped host memory."""
    return ctypes.string_at(address, n)


def write_bytes(address: int, data: bytes | bytearray | memoryview) -> None:
    """Unchecked write to mapped host memory."""
    if isinstance(data, bytes):
        if data:
            ctypes.memmove(address, data, len(data))
        return
    mv = memoryview(data).cast("B")
    n = mv.nbytes
    if n:
        if mv.readonly:
            ctypes.memmove(address, mv.tobytes(), n)
        else:
            ctypes.memmove(address, (ctypes.c_char * n).from_buffer(mv), n)
