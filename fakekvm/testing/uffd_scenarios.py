"""userfaultfd scenarios written once against the `Kernel` seam, run on the real and the fake kernel.

Each scenario is a function ``scenario(kernel) -> Record``: a dict of step name to what the
kernel answered (return value or errno name, output fields, ``uffd_msg`` fields with addresses
made relative to a mapping base), so the records of two kernels compare with ``==``. The rows
follow /work/shared/reference/uapi.md §5 (measured on Linux 6.18), ``man 2 ioctl_userfaultfd``
and Documentation/admin-guide/mm/userfaultfd.rst.

Only the "kernel kind" helpers at the top of the module know which kernel they drive:
:func:`touch_in_thread` (a second thread touching memory: ctypes on the host, ``kernel.mm.touch``
on the fake), :func:`poke`/:func:`peek` (host-side accesses that must go through the fake's mm),
:func:`touch_outcome` (does an access SIGBUS: a forked child on the host), :func:`kernel_access`
(an access made by the kernel on the process's behalf, i.e. ``user=False``) and
:func:`orphan_uffd` (a uffd whose owning process has exited: fork + SCM_RIGHTS on the host,
the fake's "kill the owner" knob on the fake).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from fakekvm.abi import mman
from fakekvm.fake.uffd import _uapi as U
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel

Record = dict[str, Any]
PAGE = mman.PAGE_SIZE
RW = mman.PROT_READ | mman.PROT_WRITE
ANON = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
SENTINEL = 0x7777  # written into output fields to see whether the kernel touched them
GUARD_S = 20.0  # a guard against hangs, never a synchronisation

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


# ---------------------------------------------------------------------------------------------
# The kernel-kind helpers (the only code that asks which kernel it drives)
# ---------------------------------------------------------------------------------------------
def is_fake(k: Kernel) -> bool:
    return hasattr(k, "mm")


class Toucher:
    """A thread that touches one address; on either kernel it blocks until the fault is resolved."""

    def __init__(self, k: Kernel, address: int, write: bool, value: int = 0x5A) -> None:
        self.k, self.address, self.write, self.value = k, address, write, value
        self.tid = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="uffd-toucher")

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._started.set()
        try:
            if is_fake(self.k):
                r = self.k.mm.touch(self.address, self.write)  # type: ignore[attr-defined]
                if int(r) != 0:
                    raise OSError(errno.EFAULT, f"fake touch at {self.address:#x}: {r!r}")
                if self.write:
                    ctypes.memset(self.address, self.value, 1)
                else:
                    self.result = ctypes.string_at(self.address, 1)[0]
            elif self.write:
                _libc.memset(self.address, self.value, 1)  # ctypes drops the GIL around the call
            else:
                b = ctypes.c_ubyte()
                _libc.memcpy(ctypes.addressof(b), self.address, 1)
                self.result = b.value
        except BaseException as e:  # reported to the test thread
            self.error = e
        finally:
            if is_fake(self.k):
                from fakekvm.fake.uffd import kick_faulter_watchers

                kick_faulter_watchers(self.k)

    def start(self) -> Toucher:
        self.thread.start()
        self._started.wait(GUARD_S)
        return self

    def join(self) -> bool:
        """Wait for the toucher to finish; True if it did (False means it is still blocked)."""
        self.thread.join(GUARD_S)
        if self.error is not None:
            raise self.error
        return not self.thread.is_alive()

    def wait_blocked(self) -> None:
        """Return once the toucher sleeps in the userfault handler (no sleeping here either)."""
        if is_fake(self.k):
            from fakekvm.fake.uffd import wait_for_faulter

            wait_for_faulter(self.k, self.tid, GUARD_S, self.thread.is_alive)
            if not self.thread.is_alive():
                self.join()  # raises what the toucher raised
                raise AssertionError(f"thread {self.tid} finished instead of blocking")
            return
        path = f"/proc/self/task/{self.tid}/wchan"
        deadline = self.k.monotonic_ns() + int(GUARD_S * 1e9)
        while self.k.monotonic_ns() < deadline:
            with open(path) as f:
                if f.read().strip() == "handle_userfault":
                    return
            os.sched_yield()
        raise TimeoutError(f"thread {self.tid} never blocked in handle_userfault")


def touch_in_thread(k: Kernel, address: int, write: bool) -> Toucher:
    """Start a thread that reads or writes ``address`` (blocking in the kernel if it faults)."""
    return Toucher(k, address, write).start()


class Blocker:
    """A thread running one call that may block in the kernel (madvise, munmap, mremap, read)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="uffd-blocker")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:
            self.error = e

    def join(self) -> bool:
        self.thread.join(GUARD_S)
        return not self.thread.is_alive()


def _fake_access(k: Kernel, address: int, n: int, write: bool) -> None:
    page = address & ~(PAGE - 1)
    while page < address + n:
        r = k.mm.touch(max(page, address), write)  # type: ignore[attr-defined]
        if int(r) != 0:
            raise OSError(errno.EFAULT, f"fake access at {page:#x}: {r!r}")
        page += PAGE


def poke(k: Kernel, address: int, data: bytes) -> None:
    """Write ``data`` at ``address`` as the process would (the fake's mm sees the access)."""
    if is_fake(k):
        _fake_access(k, address, len(data), True)
    ctypes.memmove(address, data, len(data))


def peek(k: Kernel, address: int, n: int) -> bytes:
    """Read ``n`` bytes at ``address`` as the process would."""
    if is_fake(k):
        _fake_access(k, address, n, False)
    return ctypes.string_at(address, n)


def touch_outcome(k: Kernel, address: int, write: bool) -> str:
    """"ok", "SIGBUS" or "SIGSEGV": what touching ``address`` does (host: in a forked child)."""
    if is_fake(k):
        r = k.mm.touch(address, write)  # type: ignore[attr-defined]
        name = getattr(r, "name", str(r))
        return "ok" if name in ("OK", "ok") else str(name)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            import faulthandler

            faulthandler.disable()  # the child's SIGBUS is the expected outcome, not a crash report
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            if write:
                ctypes.memset(address, 1, 1)
            else:
                ctypes.string_at(address, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return "ok"


def kernel_access(k: Kernel, address: int, n: int) -> str:
    """The kernel writes ``n`` bytes at ``address`` for the process (copy_to_user, ``user=False``)."""
    if is_fake(k):
        try:
            r = k.mm.fault(address, True, user=False, who=None)  # type: ignore[attr-defined]
        except OSError as e:
            return errno.errorcode[e.errno or 0]
        name = getattr(r, "name", str(r))
        return "ok" if name in ("OK", "ok") else "EFAULT"
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        buf = (ctypes.c_char * n).from_address(address)
        os.readv(fd, [memoryview(buf).cast("B")])
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    finally:
        os.close(fd)


def orphan_uffd(k: Kernel, npages: int = 2) -> tuple[int, int]:
    """A uffd (API done, ``npages`` anon pages registered MISSING) whose owning mm is gone.

    Returns (uffd, registered start address in the dead mm).
    """
    if is_fake(k):
        m = k.mmap(-1, npages * PAGE, RW, ANON)
        fd = new_uffd(k)
        register(k, fd, m.address, npages * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
        from fakekvm.fake.uffd import kill_owner

        kill_owner(k, fd)
        return fd, m.address
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            a.close()
            m = k.mmap(-1, npages * PAGE, RW, ANON)
            fd = new_uffd(k)
            register(k, fd, m.address, npages * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
            socket.send_fds(b, [m.address.to_bytes(8, "little")], [fd])
        finally:
            os._exit(0)
    b.close()
    msg, fds, _, _ = socket.recv_fds(a, 8, 1)
    a.close()
    os.waitpid(pid, 0)
    return fds[0], int.from_bytes(msg, "little")


# ---------------------------------------------------------------------------------------------
# Small building blocks (kernel-agnostic)
# ---------------------------------------------------------------------------------------------
def res(fn: Callable[[], Any]) -> str:
    """The call's return value as a string, or its errno name."""
    try:
        return str(fn())
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def api(k: Kernel, fd: int, features: int = 0, api_: int = U.UFFD_API) -> tuple[str, tuple[int, ...]]:
    b = bytearray(U.uffdio_api_fmt.pack(api_, features, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_API, b))
    return r, U.uffdio_api_fmt.unpack(b)


def new_uffd(k: Kernel, features: int = 0, flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    fd = k.userfaultfd(flags)
    b = bytearray(U.uffdio_api_fmt.pack(U.UFFD_API, features, 0))
    k.ioctl(fd, U.UFFDIO_API, b)
    return fd


def register(k: Kernel, fd: int, start: int, length: int, mode: int) -> tuple[str, int]:
    b = bytearray(U.uffdio_register_fmt.pack(start, length, mode, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_REGISTER, b))
    return r, U.uffdio_register_fmt.unpack(b)[3]


def rng(k: Kernel, fd: int, req: int, start: int, length: int) -> str:
    b = bytearray(U.uffdio_range_fmt.pack(start, length))
    return res(lambda: k.ioctl(fd, req, b))


def copy(k: Kernel, fd: int, dst: int, src: int, length: int = PAGE, mode: int = 0) -> tuple[str, int]:
    b = bytearray(U.uffdio_copy_fmt.pack(dst, src, length, mode, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_COPY, b))
    return r, U.uffdio_copy_fmt.unpack(b)[4]


def zeropage(k: Kernel, fd: int, start: int, length: int = PAGE, mode: int = 0) -> tuple[str, int]:
    b = bytearray(U.uffdio_zeropage_fmt.pack(start, length, mode, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_ZEROPAGE, b))
    return r, U.uffdio_zeropage_fmt.unpack(b)[3]


def cont(k: Kernel, fd: int, start: int, length: int = PAGE, mode: int = 0) -> tuple[str, int]:
    b = bytearray(U.uffdio_continue_fmt.pack(start, length, mode, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_CONTINUE, b))
    return r, U.uffdio_continue_fmt.unpack(b)[3]


def poison(k: Kernel, fd: int, start: int, length: int = PAGE, mode: int = 0) -> tuple[str, int]:
    b = bytearray(U.uffdio_poison_fmt.pack(start, length, mode, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_POISON, b))
    return r, U.uffdio_poison_fmt.unpack(b)[3]


def move(k: Kernel, fd: int, dst: int, src: int, length: int = PAGE, mode: int = 0) -> tuple[str, int]:
    b = bytearray(U.uffdio_move_fmt.pack(dst, src, length, mode, SENTINEL))
    r = res(lambda: k.ioctl(fd, U.UFFDIO_MOVE, b))
    return r, U.uffdio_move_fmt.unpack(b)[4]


def wp(k: Kernel, fd: int, start: int, length: int, mode: int) -> str:
    b = bytearray(U.uffdio_writeprotect_fmt.pack(start, length, mode))
    return res(lambda: k.ioctl(fd, U.UFFDIO_WRITEPROTECT, b))


def msgs(data: bytes, base: int, tid: int = -1) -> list[tuple[Any, ...]]:
    """Decode ``uffd_msg``s with addresses relative to ``base`` (ptid as "tid" when it equals ``tid``)."""
    out: list[tuple[Any, ...]] = []
    for off in range(0, len(data), U.UFFD_MSG_SIZE):
        ev, r1, r2, r3, a0, a1, a2 = U.uffd_msg_fmt.unpack_from(data, off)
        if ev == U.UFFD_EVENT_PAGEFAULT:
            ptid = a2 & 0xFFFFFFFF
            tail = a2 >> 32
            out.append(("PAGEFAULT", hex(a0), hex(a1 - base), "tid" if ptid == tid else ptid, r1, r2, r3, tail))
        elif ev in (U.UFFD_EVENT_REMOVE, U.UFFD_EVENT_UNMAP):
            name = "REMOVE" if ev == U.UFFD_EVENT_REMOVE else "UNMAP"
            out.append((name, hex(a0 - base), hex(a1 - base), a2, r1, r2, r3))
        elif ev == U.UFFD_EVENT_REMAP:
            out.append(("REMAP", hex(a0 - base), hex(a1 - base), hex(a2), r1, r2, r3))
        else:
            out.append((hex(ev), a0, a1, a2))
    return out


def read_msgs(k: Kernel, fd: int, n: int, base: int, tid: int = -1) -> Any:
    try:
        return msgs(k.read(fd, n), base, tid)
    except OSError as e:
        return errno.errorcode[e.errno or 0]


def wait_readable(k: Kernel, fd: int) -> list[tuple[int, int]]:
    return k.poll([(fd, mman.POLLIN)], int(GUARD_S * 1000))


def anon(k: Kernel, npages: int) -> Mapping:
    return k.mmap(-1, npages * PAGE, RW, ANON)


def src_page(k: Kernel, fill: int, npages: int = 1) -> Mapping:
    """An unregistered anon page filled with ``fill`` (a COPY source)."""
    m = anon(k, npages)
    poke(k, m.address, bytes([fill]) * (npages * PAGE))
    return m


def shmem(k: Kernel, npages: int) -> tuple[int, Mapping, Mapping]:
    """A memfd of ``npages`` with two shared mappings: (memfd, registered-to-be, populate-through)."""
    mfd = k.memfd_create("uffd-scn", mman.MFD_CLOEXEC)
    k.ftruncate(mfd, npages * PAGE)
    a = k.mmap(mfd, npages * PAGE, RW, mman.MAP_SHARED)
    b = k.mmap(mfd, npages * PAGE, RW, mman.MAP_SHARED)
    return mfd, a, b


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------
def scn_create_flags(k: Kernel) -> Record:
    r: Record = {}
    for name, flags in (
        ("0", 0),
        ("CLOEXEC", os.O_CLOEXEC),
        ("NONBLOCK", os.O_NONBLOCK),
        ("USER_MODE_ONLY", U.UFFD_USER_MODE_ONLY),
        ("all", os.O_CLOEXEC | os.O_NONBLOCK | U.UFFD_USER_MODE_ONLY),
        ("O_RDWR", os.O_RDWR),
        ("bit1", 2),
        ("O_APPEND", os.O_APPEND),
        ("bit31", 1 << 31),
    ):
        try:
            fd = k.userfaultfd(flags)
            r[name] = "fd"
            k.close(fd)
        except OSError as e:
            r[name] = errno.errorcode[e.errno or 0]
    return r


def scn_dev_userfaultfd(k: Kernel) -> Record:
    r: Record = {}
    dev = k.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = k.ioctl(dev, U.USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
        r["new"] = "fd" if fd >= 0 else fd
        r["api"] = api(k, fd)
        r["read_empty"] = res(lambda: k.read(fd, 32))
        k.close(fd)
        r["new_bad_flags"] = res(lambda: k.ioctl(dev, U.USERFAULTFD_IOC_NEW, 2))
        r["other_ioctl"] = res(lambda: k.ioctl(dev, U.UFFDIO_API, bytearray(24)))
        r["other_nr"] = res(lambda: k.ioctl(dev, U.USERFAULTFD_IOC_NEW + 1, 0))
        r["read_dev"] = res(lambda: k.read(dev, 32))
    finally:
        k.close(dev)
    return r


def scn_api(k: Kernel) -> Record:
    r: Record = {}
    fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    m = anon(k, 1)
    try:
        r["register_before"] = register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
        r["read_before"] = res(lambda: k.read(fd, 32))
        r["poll_before"] = [ev for _, ev in k.poll([(fd, mman.POLLIN)], 0)]
        r["wake_before"] = rng(k, fd, U.UFFDIO_WAKE, m.address, PAGE)
        r["bad_api"] = api(k, fd, api_=0xAB)
        r["bad_feature"] = api(k, fd, features=1 << 17)
        r["bad_feature_hi"] = api(k, fd, features=1 << 63)
        r["ok"] = api(k, fd)
        r["second"] = api(k, fd)
        r["unknown_nr"] = res(lambda: k.ioctl(fd, U.UFFDIO_POISON + 1, bytearray(32)))
        r["foreign_ioctl"] = res(lambda: k.ioctl(fd, 0xAE00, 0))
        r["write"] = res(lambda: k.write(fd, bytes(32)))
        r["poll_after"] = [ev for _, ev in k.poll([(fd, mman.POLLIN)], 0)]
        r["fionbio_off"] = res(lambda: k.ioctl(fd, 0x5421, bytearray(4)))
        r["poll_blocking"] = [ev for _, ev in k.poll([(fd, mman.POLLIN)], 0)]
        r["fionbio_on"] = res(lambda: k.ioctl(fd, 0x5421, bytearray(b"\x01\0\0\0")))
        r["poll_nonblocking"] = [ev for _, ev in k.poll([(fd, mman.POLLIN)], 0)]
    finally:
        k.close(fd)
    fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    r["all_features"] = api(k, fd, features=U.UFFD_API_FEATURES)
    k.close(fd)
    return r


def scn_register(k: Kernel) -> Record:
    r: Record = {}
    MISSING, WP, MINOR = (
        U.UFFDIO_REGISTER_MODE_MISSING,
        U.UFFDIO_REGISTER_MODE_WP,
        U.UFFDIO_REGISTER_MODE_MINOR,
    )
    fd = new_uffd(k)
    fd2 = new_uffd(k)
    m = anon(k, 8)
    a = m.address
    gone = anon(k, 1)
    k.munmap(gone.address, PAGE)
    r["mode0"] = register(k, fd, a, PAGE, 0)
    r["mode8"] = register(k, fd, a, PAGE, 8)
    r["unaligned_start"] = register(k, fd, a + 1, PAGE, MISSING)
    r["unaligned_len"] = register(k, fd, a, PAGE + 1, MISSING)
    r["len0"] = register(k, fd, a, 0, MISSING)
    r["no_mapping"] = register(k, fd, gone.address, PAGE, MISSING)
    r["minor_anon"] = register(k, fd, a, PAGE, MINOR)
    r["missing"] = register(k, fd, a, 2 * PAGE, MISSING)
    r["missing_again"] = register(k, fd, a, 2 * PAGE, MISSING)
    r["missing_wp"] = register(k, fd, a + 2 * PAGE, 2 * PAGE, MISSING | WP)
    r["wp_only"] = register(k, fd, a + 4 * PAGE, PAGE, WP)
    r["other_uffd_busy"] = register(k, fd2, a, PAGE, MISSING)
    r["other_uffd_free_part"] = register(k, fd2, a + 6 * PAGE, PAGE, MISSING)
    r["other_uffd_unregister"] = rng(k, fd2, U.UFFDIO_UNREGISTER, a, PAGE)
    r["unregister"] = rng(k, fd, U.UFFDIO_UNREGISTER, a, 2 * PAGE)
    r["unregister_unaligned"] = rng(k, fd, U.UFFDIO_UNREGISTER, a + 1, PAGE)
    r["unregister_len0"] = rng(k, fd, U.UFFDIO_UNREGISTER, a, 0)
    r["unregister_no_mapping"] = rng(k, fd, U.UFFDIO_UNREGISTER, gone.address, PAGE)
    r["unregister_unregistered"] = rng(k, fd, U.UFFDIO_UNREGISTER, a, PAGE)
    r["copy_after_unregister"] = copy(k, fd, a, src_page(k, 1).address)
    r["reregister_after"] = register(k, fd2, a, PAGE, MISSING)
    mfd, s, _ = shmem(k, 4)
    r["shmem_missing_minor"] = register(k, fd, s.address, PAGE, MISSING | MINOR)
    r["shmem_wp"] = register(k, fd, s.address + PAGE, PAGE, WP)
    r["shmem_missing"] = register(k, fd, s.address + 2 * PAGE, PAGE, MISSING)
    r["shmem_all"] = register(k, fd, s.address + 3 * PAGE, PAGE, MISSING | MINOR | WP)
    sa = k.mmap(-1, PAGE, RW, mman.MAP_SHARED | mman.MAP_ANONYMOUS)
    r["shared_anon_minor"] = register(k, fd, sa.address, PAGE, MINOR)
    for f in (fd, fd2, mfd):
        k.close(f)
    return r


def scn_copy(k: Kernel) -> Record:
    r: Record = {}
    fd = new_uffd(k)
    m = anon(k, 6)
    a = m.address
    src = src_page(k, 0xAB, 2)
    other = anon(k, 1)
    gone = anon(k, 1)
    k.munmap(gone.address, PAGE)
    register(k, fd, a, 4 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["ok"] = copy(k, fd, a, src.address)
    r["content"] = peek(k, a, 2).hex() + peek(k, a + PAGE - 2, 2).hex()
    r["eexist"] = copy(k, fd, a, src.address)
    r["unaligned_dst"] = copy(k, fd, a + 8, src.address)
    r["unaligned_len"] = copy(k, fd, a + PAGE, src.address, PAGE + 8)
    r["len0"] = copy(k, fd, a + PAGE, src.address, 0)
    r["bad_mode"] = copy(k, fd, a + PAGE, src.address, PAGE, 4)
    r["mode_wp_not_wp"] = copy(k, fd, a + PAGE, src.address, PAGE, U.UFFDIO_COPY_MODE_WP)
    r["unregistered_dst"] = copy(k, fd, other.address, src.address)
    r["unmapped_dst"] = copy(k, fd, gone.address, src.address)
    r["cross_vma"] = copy(k, fd, a + 3 * PAGE, src.address, 2 * PAGE)
    r["bad_src"] = copy(k, fd, a + PAGE, gone.address)
    r["low_src"] = copy(k, fd, a + PAGE, 0x1000)
    r["unaligned_src"] = copy(k, fd, a + PAGE, src.address + 1)
    r["unaligned_src_content"] = peek(k, a + PAGE, 1).hex()
    r["partial"] = copy(k, fd, a + 2 * PAGE, src.address, 2 * PAGE)  # a+3P is free
    poke(k, src.address, b"\x11" * PAGE)
    r["partial_hits_populated"] = copy(k, fd, a + 3 * PAGE, src.address, 2 * PAGE)
    r["page3"] = peek(k, a + 3 * PAGE, 1).hex()
    k.close(fd)
    return r


def scn_copy_partial(k: Kernel) -> Record:
    """A 2-page COPY whose second destination page is already populated: copy=4096, EAGAIN."""
    r: Record = {}
    fd = new_uffd(k)
    m = anon(k, 2)
    src = src_page(k, 0x42, 2)
    poke(k, m.address + PAGE, b"\x01")
    register(k, fd, m.address, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["copy"] = copy(k, fd, m.address, src.address, 2 * PAGE)
    r["pages"] = (peek(k, m.address, 1).hex(), peek(k, m.address + PAGE, 1).hex())
    k.close(fd)
    return r


def scn_zeropage(k: Kernel) -> Record:
    r: Record = {}
    fd = new_uffd(k)
    m = anon(k, 3)
    a = m.address
    register(k, fd, a, 3 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["ok"] = zeropage(k, fd, a)
    r["content"] = peek(k, a, 4).hex()
    r["eexist"] = zeropage(k, fd, a)
    r["unaligned"] = zeropage(k, fd, a + 1)
    r["len0"] = zeropage(k, fd, a + PAGE, 0)
    r["bad_mode"] = zeropage(k, fd, a + PAGE, PAGE, 2)
    r["partial"] = zeropage(k, fd, a - PAGE, 2 * PAGE)
    r["two"] = zeropage(k, fd, a + PAGE, 2 * PAGE)
    mfd, s, via = shmem(k, 2)
    register(k, fd, s.address, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["shmem"] = zeropage(k, fd, s.address)
    poke(k, via.address + PAGE, b"\x07")
    r["shmem_eexist_pagecache"] = zeropage(k, fd, s.address + PAGE)
    r["shmem_copy_eexist_pagecache"] = copy(k, fd, s.address + PAGE, src_page(k, 3).address)
    k.close(fd)
    k.close(mfd)
    return r


def scn_pagefault_msgs(k: Kernel) -> Record:
    r: Record = {}
    m = anon(k, 5)
    a = m.address
    src = src_page(k, 0x33)
    for i, (name, feats, off, write) in enumerate((
        ("write", 0, 0, True),
        ("read", 0, 0, False),
        ("write_exact", U.UFFD_FEATURE_EXACT_ADDRESS, 0x123, True),
        ("read_inexact", 0, 0x123, False),
        ("thread_id", U.UFFD_FEATURE_THREAD_ID, 0x10, True),
    )):
        fd = new_uffd(k, feats)
        page = a + i * PAGE
        register(k, fd, page, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
        t = touch_in_thread(k, page + off, write)
        wait_readable(k, fd)
        got = read_msgs(k, fd, 64, page, t.tid)
        res_copy = copy(k, fd, page, src.address)
        r[name] = (got, res_copy, t.join())
        rng(k, fd, U.UFFDIO_UNREGISTER, page, PAGE)
        k.close(fd)
    return r


def scn_read_poll(k: Kernel) -> Record:
    r: Record = {}
    m = anon(k, 2)
    a = m.address
    src = src_page(k, 0x44)
    fd = new_uffd(k)
    register(k, fd, a, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["short"] = res(lambda: k.read(fd, 31))
    r["empty"] = res(lambda: k.read(fd, 32))
    r["poll_empty"] = k.poll([(fd, mman.POLLIN)], 0)
    t1 = touch_in_thread(k, a, True)
    t1.wait_blocked()
    t2 = touch_in_thread(k, a + PAGE, False)
    t2.wait_blocked()
    r["poll_two"] = [(x == fd, ev) for x, ev in k.poll([(fd, mman.POLLIN)], 0)]
    r["read_short_with_events"] = res(lambda: k.read(fd, 16))
    r["read128"] = read_msgs(k, fd, 128, a)
    r["poll_after_read"] = k.poll([(fd, mman.POLLIN)], 0)
    r["read_again"] = read_msgs(k, fd, 128, a)
    r["copy"] = copy(k, fd, a, src.address, PAGE)
    r["zero"] = zeropage(k, fd, a + PAGE)
    r["joined"] = (t1.join(), t2.join())
    k.close(fd)
    # a blocking fd: poll says POLLERR always; a blocking read wakes on a fault
    bfd = k.userfaultfd(os.O_CLOEXEC)
    r["blocking_poll_before_api"] = [ev for _, ev in k.poll([(bfd, mman.POLLIN)], 0)]
    api(k, bfd)
    m2 = anon(k, 1)
    register(k, bfd, m2.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["blocking_poll_idle"] = [ev for _, ev in k.poll([(bfd, mman.POLLIN)], 0)]
    reader = Blocker(lambda: k.read(bfd, 64))
    t = touch_in_thread(k, m2.address, True)
    r["blocking_read"] = (reader.join(), msgs(reader.result or b"", m2.address))
    t.wait_blocked()
    r["blocking_poll_busy"] = [ev for _, ev in k.poll([(bfd, mman.POLLIN)], 0)]
    r["blocking_copy"] = copy(k, bfd, m2.address, src.address)
    r["blocking_joined"] = t.join()
    k.close(bfd)
    return r


def scn_wake(k: Kernel) -> Record:
    r: Record = {}
    m = anon(k, 2)
    a = m.address
    src = src_page(k, 0x55)
    fd = new_uffd(k)
    register(k, fd, a, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["len0"] = rng(k, fd, U.UFFDIO_WAKE, a, 0)
    r["unaligned"] = rng(k, fd, U.UFFDIO_WAKE, a + 1, PAGE)
    r["idle"] = rng(k, fd, U.UFFDIO_WAKE, a, PAGE)
    r["unregistered"] = rng(k, fd, U.UFFDIO_WAKE, src.address, PAGE)
    t = touch_in_thread(k, a, True)
    t.wait_blocked()
    r["msg"] = read_msgs(k, fd, 32, a)
    r["copy_dontwake"] = copy(k, fd, a, src.address, PAGE, U.UFFDIO_COPY_MODE_DONTWAKE)
    t.wait_blocked()  # still asleep: DONTWAKE did not wake it
    r["msgs_after_dontwake"] = read_msgs(k, fd, 32, a)
    r["eexist_no_wake"] = copy(k, fd, a, src.address)
    t.wait_blocked()  # EEXIST does not wake either
    r["wake_other_page"] = rng(k, fd, U.UFFDIO_WAKE, a + PAGE, PAGE)
    t.wait_blocked()
    r["wake"] = rng(k, fd, U.UFFDIO_WAKE, a, PAGE)
    r["joined"] = t.join()
    r["content"] = peek(k, a, 2).hex()
    # a WAKE without resolution: the fault retries and is reported again
    t2 = touch_in_thread(k, a + PAGE, False)
    t2.wait_blocked()
    r["first"] = read_msgs(k, fd, 32, a)
    r["wake_unresolved"] = rng(k, fd, U.UFFDIO_WAKE, a + PAGE, PAGE)
    wait_readable(k, fd)
    r["refault"] = read_msgs(k, fd, 64, a)
    r["zero"] = zeropage(k, fd, a + PAGE)
    r["joined2"] = t2.join()
    k.close(fd)
    return r


def scn_writeprotect(k: Kernel) -> Record:
    r: Record = {}
    WPM, DW = U.UFFDIO_WRITEPROTECT_MODE_WP, U.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    m = anon(k, 3)
    a = m.address
    poke(k, a, b"\x01")
    poke(k, a + 2 * PAGE, b"\x02")
    fd = new_uffd(k, U.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    register(k, fd, a, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP)
    register(k, fd, a + 2 * PAGE, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["wp_dontwake"] = wp(k, fd, a, PAGE, WPM | DW)
    r["bad_mode"] = wp(k, fd, a, PAGE, 4)
    r["unaligned"] = wp(k, fd, a + 1, PAGE, WPM)
    r["len0"] = wp(k, fd, a, 0, WPM)
    r["not_wp_registered"] = wp(k, fd, a + 2 * PAGE, PAGE, WPM)
    r["unregistered"] = wp(k, fd, m.address + 3 * PAGE, PAGE, WPM)
    r["protect"] = wp(k, fd, a, PAGE, WPM)
    r["protect_again"] = wp(k, fd, a, PAGE, WPM)
    r["read_ok"] = peek(k, a, 1).hex()
    t = touch_in_thread(k, a, True)
    t.wait_blocked()
    r["msg"] = read_msgs(k, fd, 64, a)
    r["unprotect_dontwake"] = wp(k, fd, a, PAGE, DW)
    t.wait_blocked()
    r["wake"] = rng(k, fd, U.UFFDIO_WAKE, a, PAGE)
    r["joined"] = t.join()
    r["content"] = peek(k, a, 1).hex()
    r["protect2"] = wp(k, fd, a, PAGE, WPM)
    t = touch_in_thread(k, a, True)
    t.wait_blocked()
    r["msg2"] = read_msgs(k, fd, 64, a)
    r["unprotect"] = wp(k, fd, a, PAGE, 0)
    r["joined2"] = t.join()
    # the missing page in the WP range: a MISSING fault, not WP
    t = touch_in_thread(k, a + PAGE, True)
    t.wait_blocked()
    r["missing_msg"] = read_msgs(k, fd, 64, a)
    r["copy_wp"] = copy(k, fd, a + PAGE, a, PAGE, U.UFFDIO_COPY_MODE_WP)
    t.wait_blocked()
    r["msg_after_copy_wp"] = read_msgs(k, fd, 64, a)
    r["unprotect3"] = wp(k, fd, a + PAGE, PAGE, 0)
    r["joined3"] = t.join()
    k.close(fd)
    return r


def scn_continue(k: Kernel) -> Record:
    r: Record = {}
    mfd, s, via = shmem(k, 3)
    a = s.address
    fd = new_uffd(k, U.UFFD_FEATURE_MINOR_SHMEM)
    register(k, fd, a, 3 * PAGE, U.UFFDIO_REGISTER_MODE_MINOR)
    poke(k, via.address, b"\x77")
    poke(k, via.address + 2 * PAGE, b"\x78")
    t = touch_in_thread(k, a, False)
    t.wait_blocked()
    r["msg"] = read_msgs(k, fd, 64, a)
    r["continue"] = cont(k, fd, a)
    r["joined"] = (t.join(), t.result)
    r["content"] = peek(k, a, 1).hex()
    r["eexist"] = cont(k, fd, a)
    r["not_in_cache"] = cont(k, fd, a + PAGE)
    r["unaligned"] = cont(k, fd, a + 1)
    r["bad_mode"] = cont(k, fd, a, PAGE, 4)
    r["mode_wp_not_wp"] = cont(k, fd, a + 2 * PAGE, PAGE, U.UFFDIO_CONTINUE_MODE_WP)
    t = touch_in_thread(k, a + 2 * PAGE, True)
    t.wait_blocked()
    r["msg_write"] = read_msgs(k, fd, 64, a)
    r["continue2"] = cont(k, fd, a + 2 * PAGE)
    r["joined2"] = t.join()
    r["missing_page_no_fault"] = (touch_in_thread(k, a + PAGE, False).join(),)
    m = anon(k, 1)
    register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["anon"] = cont(k, fd, m.address)
    k.close(fd)
    k.close(mfd)
    return r


def scn_continue_fallocated(k: Kernel) -> Record:
    """Pages ``fallocate`` put in the page cache (never written) are CONTINUE-able, though
    ``SEEK_DATA`` calls them holes; a punched page (MADV_REMOVE) is not, until refilled."""
    r: Record = {}
    mfd, s, via = shmem(k, 4)
    a = s.address
    fd = new_uffd(k, U.UFFD_FEATURE_MINOR_SHMEM)
    register(k, fd, a, 4 * PAGE, U.UFFDIO_REGISTER_MODE_MINOR)

    def seek_data(off: int) -> str:
        return res(lambda: k.lseek(mfd, off, os.SEEK_DATA))

    r["hole"] = cont(k, fd, a)
    k.fallocate(mfd, 0, 0, PAGE)
    r["seek_after_fallocate"] = seek_data(0)
    r["fallocated"] = cont(k, fd, a)
    r["content"] = peek(k, a, 1).hex()
    r["again"] = cont(k, fd, a)
    poke(k, via.address + PAGE, b"\x42")
    k.madvise(via.address + PAGE, PAGE, mman.MADV_REMOVE)
    r["punched"] = cont(k, fd, a + PAGE)
    k.fallocate(mfd, 0, PAGE, PAGE)
    r["refilled"] = cont(k, fd, a + PAGE)
    r["refilled_content"] = peek(k, a + PAGE, 1).hex()
    k.fallocate(mfd, 0, 2 * PAGE, 2 * PAGE)  # a range: every page it covers
    r["range"] = cont(k, fd, a + 2 * PAGE, 2 * PAGE)
    # a fallocated page, never written, then punched out: gone from the page cache again
    k.fallocate(mfd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, 2 * PAGE, 2 * PAGE)
    k.fallocate(mfd, 0, 2 * PAGE, PAGE)
    k.fallocate(mfd, mman.FALLOC_FL_PUNCH_HOLE | mman.FALLOC_FL_KEEP_SIZE, 2 * PAGE, PAGE)
    r["fallocated_then_punched"] = cont(k, fd, a + 2 * PAGE)
    # and past a shrinking ftruncate (then grown back): no page left there either
    k.fallocate(mfd, 0, 3 * PAGE, PAGE)
    k.ftruncate(mfd, 3 * PAGE)
    k.ftruncate(mfd, 4 * PAGE)
    r["fallocated_then_truncated"] = cont(k, fd, a + 3 * PAGE)
    k.close(fd)
    k.close(mfd)
    return r


def scn_poison(k: Kernel) -> Record:
    r: Record = {}
    m = anon(k, 2)
    a = m.address
    fd = new_uffd(k, U.UFFD_FEATURE_POISON)
    register(k, fd, a, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["poison"] = poison(k, fd, a)
    r["again"] = poison(k, fd, a)
    r["zeropage_over"] = zeropage(k, fd, a)
    r["bad_mode"] = poison(k, fd, a + PAGE, PAGE, 2)
    r["unaligned"] = poison(k, fd, a + 1)
    r["touch"] = touch_outcome(k, a, False)
    r["copy_over"] = copy(k, fd, a, src_page(k, 1).address)
    r["touch_after_copy"] = touch_outcome(k, a, False)
    r["other_page_zero"] = zeropage(k, fd, a + PAGE)
    k.close(fd)
    return r


def scn_move(k: Kernel) -> Record:
    r: Record = {}
    MOVE_HOLES = U.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
    dst = anon(k, 6)
    d = dst.address
    srcm = anon(k, 6)
    s = srcm.address
    for i in (0, 1, 2, 4):
        poke(k, s + i * PAGE, bytes([0x60 + i]) * 8)
    fd = new_uffd(k, U.UFFD_FEATURE_MOVE)
    register(k, fd, d, 5 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["move"] = move(k, fd, d, s)
    r["content"] = (peek(k, d, 1).hex(), peek(k, s, 1).hex())
    poke(k, s, b"\x70")
    r["eexist"] = move(k, fd, d, s)
    r["src_hole"] = move(k, fd, d + PAGE, s + 3 * PAGE)
    r["src_hole_allowed"] = move(k, fd, d + PAGE, s + 3 * PAGE, PAGE, MOVE_HOLES)
    r["partial"] = move(k, fd, d + 2 * PAGE, s + 2 * PAGE, 2 * PAGE)
    r["unaligned_src"] = move(k, fd, d + 3 * PAGE, s + 8)
    r["unaligned_dst"] = move(k, fd, d + 8, s)
    r["len0"] = move(k, fd, d + 3 * PAGE, s + 4 * PAGE, 0)
    r["bad_mode"] = move(k, fd, d + 3 * PAGE, s + 4 * PAGE, PAGE, 4)
    r["unregistered_dst"] = move(k, fd, d + 5 * PAGE, s + 4 * PAGE)
    r["overlap"] = move(k, fd, d + 3 * PAGE, d + 3 * PAGE)
    r["ok2"] = move(k, fd, d + 4 * PAGE, s + 4 * PAGE, PAGE, U.UFFDIO_MOVE_MODE_DONTWAKE)
    k.close(fd)
    fd = new_uffd(k, 0)
    dst2 = anon(k, 1)
    register(k, fd, dst2.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    poke(k, s + 5 * PAGE, b"\x99")
    r["without_feature"] = move(k, fd, dst2.address, s + 5 * PAGE)
    k.close(fd)
    return r


def scn_remove_event(k: Kernel) -> Record:
    """REMOVE on MADV_DONTNEED: the raising thread waits; resolution ioctls EAGAIN until it is read."""
    r: Record = {}
    m = anon(k, 4)
    a = m.address
    src = src_page(k, 0x21)
    poke(k, a, b"\x01")
    fd = new_uffd(k, U.UFFD_FEATURE_EVENT_REMOVE)
    register(k, fd, a, 4 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    b = Blocker(lambda: k.madvise(a, 2 * PAGE, mman.MADV_DONTNEED))
    r["poll"] = [ev for _, ev in wait_readable(k, fd)]
    r["raiser_waits"] = b.thread.is_alive()
    r["copy"] = copy(k, fd, a + 2 * PAGE, src.address)
    r["copy_invalid"] = copy(k, fd, a + 2 * PAGE + 1, src.address)
    r["zeropage"] = zeropage(k, fd, a + 2 * PAGE)
    r["poison"] = poison(k, fd, a + 2 * PAGE)
    r["move"] = move(k, fd, a + 2 * PAGE, src.address)
    r["writeprotect"] = wp(k, fd, a, PAGE, 0)
    r["continue"] = cont(k, fd, a, PAGE)
    r["wake"] = rng(k, fd, U.UFFDIO_WAKE, a, PAGE)
    r["register"] = register(k, fd, a, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["msg"] = read_msgs(k, fd, 64, a)
    r["raiser_done"] = b.join()
    r["copy_after"] = copy(k, fd, a + 2 * PAGE, src.address)
    r["content_after_dontneed"] = zeropage(k, fd, a)
    # a fault that arrives after a REMOVE is read first (faults before events)
    b2 = Blocker(lambda: k.madvise(a + 2 * PAGE, PAGE, mman.MADV_DONTNEED))
    wait_readable(k, fd)
    t = touch_in_thread(k, a + 3 * PAGE, True)
    t.wait_blocked()
    r["order"] = read_msgs(k, fd, 96, a)
    r["raiser2_done"] = b2.join()
    r["copy3"] = copy(k, fd, a + 3 * PAGE, src.address)
    r["joined"] = t.join()
    k.close(fd)
    return r


def scn_unmap_remap_events(k: Kernel) -> Record:
    """UNMAP on munmap and REMAP on mremap; the raising thread waits until the event is read.

    (On the 6.18 host, mremap with EVENT_UNMAP also raises UNMAP for the old range and that wait
    was seen to hold the mmap lock, which deadlocks an in-process monitor that then allocates;
    so the REMAP part uses a uffd with EVENT_REMAP only. Whether the moved VMA is still
    registered at its new place was not stable on the host — ENOENT for the first such mremap
    of a process, registered afterwards — so no row depends on it.)
    """
    r: Record = {}
    region = anon(k, 8)
    base = region.address
    k.munmap(base + 4 * PAGE, 4 * PAGE)
    fd = new_uffd(k, U.UFFD_FEATURE_EVENT_UNMAP)
    register(k, fd, base, 4 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    b = Blocker(lambda: k.munmap(base + 3 * PAGE, PAGE))
    wait_readable(k, fd)
    r["raiser_waits"] = b.thread.is_alive()
    r["copy_while_unread"] = copy(k, fd, base, base + 7 * PAGE)
    r["unmap"] = read_msgs(k, fd, 64, base)
    r["unmap_done"] = b.join()
    k.close(fd)
    fd = new_uffd(k, U.UFFD_FEATURE_EVENT_REMAP)
    register(k, fd, base, 3 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    flags = mman.MREMAP_MAYMOVE | mman.MREMAP_FIXED
    b = Blocker(lambda: k.mremap(base, 2 * PAGE, 2 * PAGE, flags, base + 5 * PAGE))
    wait_readable(k, fd)
    r["remap_waits"] = b.thread.is_alive()
    r["copy_while_remap_unread"] = copy(k, fd, base + 2 * PAGE, base + 7 * PAGE)
    r["remap"] = read_msgs(k, fd, 64, base)
    r["remap_done"] = (b.join(), hex((b.result or base) - base))
    src = src_page(k, 0x31)
    r["copy_at_old"] = copy(k, fd, base, src.address)
    r["copy_at_rest"] = copy(k, fd, base + 2 * PAGE, src.address)
    r["no_more"] = read_msgs(k, fd, 64, base)
    k.close(fd)
    # without the features: no events, nobody waits
    fd = new_uffd(k, 0)
    m = anon(k, 2)
    register(k, fd, m.address, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    k.munmap(m.address + PAGE, PAGE)
    k.madvise(m.address, PAGE, mman.MADV_DONTNEED)
    r["no_feature_events"] = read_msgs(k, fd, 64, m.address)
    k.close(fd)
    return r


def scn_close_wakes(k: Kernel) -> Record:
    r: Record = {}
    m = anon(k, 1)
    fd = new_uffd(k)
    register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    t = touch_in_thread(k, m.address, True)
    t.wait_blocked()
    k.close(fd)
    r["joined"] = t.join()
    r["content"] = peek(k, m.address, 1).hex()
    # a fresh uffd can register the range again (the closed one released it)
    fd = new_uffd(k)
    r["reregister"] = register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    k.close(fd)
    return r


def scn_esrch(k: Kernel) -> Record:
    r: Record = {}
    fd, a = orphan_uffd(k)
    src = src_page(k, 1)
    r["copy"] = copy(k, fd, a, src.address)
    r["copy_invalid"] = copy(k, fd, a + 1, src.address)
    r["zeropage"] = zeropage(k, fd, a)
    r["poison"] = poison(k, fd, a)
    r["move"] = move(k, fd, a, src.address)
    r["wake"] = rng(k, fd, U.UFFDIO_WAKE, a, PAGE)
    r["read"] = res(lambda: k.read(fd, 32))
    k.close(fd)
    return r


def scn_user_mode_only(k: Kernel) -> Record:
    r: Record = {}
    m = anon(k, 2)
    src = src_page(k, 0x12)
    fd = k.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
    api(k, fd)
    register(k, fd, m.address, 2 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["kernel_access"] = kernel_access(k, m.address, 8)
    r["no_msg"] = read_msgs(k, fd, 64, m.address)
    t = touch_in_thread(k, m.address + PAGE, True)
    t.wait_blocked()
    r["user_fault"] = read_msgs(k, fd, 64, m.address)
    r["copy"] = copy(k, fd, m.address + PAGE, src.address)
    r["joined"] = t.join()
    k.close(fd)
    return r




# ---------------------------------------------------------------------------------------------
# Speed: the per-fault round trip of one Python handler (MISSING + UFFDIO_COPY of 4 KiB)
# ---------------------------------------------------------------------------------------------
def fault_round_trip(k: Kernel, npages: int = 2000, cpu: int | None = 0, batch: bool = False) -> float:
    """Seconds per fault: one thread writes ``npages`` fresh pages, a Python handler resolves each.

    The handler is the usual one (blocking ``read`` of one ``uffd_msg``, ``struct`` decode,
    ``UFFDIO_COPY`` of a 4 KiB source page); the same code runs on either kernel.

    ``cpu``: pin both threads to that CPU (anchors.md: "both threads on one vCPU").
    ``batch``: run both threads under ``SCHED_BATCH``, so a woken thread does not preempt
    the waker (CFS/EEVDF skip wakeup preemption for batch tasks): each hand-off then costs one
    context switch instead of a preempt-and-bounce on a lock the waker still holds.
    """
    m = anon(k, npages)
    src = src_page(k, 0x5A)
    fd = k.userfaultfd(os.O_CLOEXEC)
    api(k, fd)
    register(k, fd, m.address, npages * PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    copy_fmt = U.uffdio_copy_fmt
    msg_fmt = U.uffd_msg_fmt
    req = U.UFFDIO_COPY
    src_addr = src.address

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # this thread only (anchors.md: "both threads on one vCPU")
        if batch:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # this thread only

    def handler() -> None:
        pin()
        buf = bytearray(copy_fmt.size)
        for _ in range(npages):
            msg = k.read(fd, 32)
            addr = msg_fmt.unpack(msg)[5]
            copy_fmt.pack_into(buf, 0, addr & ~(PAGE - 1), src_addr, PAGE, 0, 0)
            k.ioctl(fd, req, buf)

    fake = is_fake(k)
    base = m.address

    def toucher() -> None:
        if fake:
            touch = k.mm.touch  # type: ignore[attr-defined]
            for i in range(npages):
                touch(base + i * PAGE, True)
        else:
            memset = _libc.memset
            for i in range(npages):
                memset(base + i * PAGE, 1, 1)

    h = threading.Thread(target=handler, daemon=True)
    h.start()
    old = os.sched_getaffinity(0)
    old_policy = os.sched_getscheduler(0)
    pin()
    try:
        t0 = k.monotonic_ns()
        toucher()
        dt = k.monotonic_ns() - t0
    finally:
        os.sched_setaffinity(0, old)
        if batch:
            os.sched_setscheduler(0, old_policy, os.sched_param(0))
    h.join(GUARD_S)
    k.close(fd)
    k.munmap(m.address, npages * PAGE)
    return dt / 1e9 / npages


# ---------------------------------------------------------------------------------------------
# hugetlb (needs reserved 2 MiB pages on the host: /proc/sys/vm/nr_hugepages)
# ---------------------------------------------------------------------------------------------
HPAGE = 2 << 20


def scn_hugetlb_2m(k: Kernel) -> Record:
    """A 2 MiB hugetlb mapping: masks, alignment, whole-huge-page faults and copies."""
    r: Record = {}
    flags = ANON | mman.MAP_HUGETLB | mman.MAP_HUGE_2MB
    m = k.mmap(-1, 2 * HPAGE, RW, flags)
    a = m.address
    src = anon(k, HPAGE // PAGE)
    poke(k, src.address, b"\x4d" * 16)
    fd = new_uffd(k, U.UFFD_FEATURE_MISSING_HUGETLBFS)
    r["register_unaligned"] = register(k, fd, a + PAGE, HPAGE - PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["register_len_unaligned"] = register(k, fd, a, HPAGE + PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    r["register"] = register(k, fd, a, 2 * HPAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    t = touch_in_thread(k, a + 0x1234, True)
    t.wait_blocked()
    r["msg"] = read_msgs(k, fd, 64, a)
    r["copy_small"] = copy(k, fd, a, src.address, PAGE)
    r["zeropage"] = zeropage(k, fd, a, HPAGE)
    r["copy"] = copy(k, fd, a, src.address, HPAGE)
    r["joined"] = t.join()
    r["content"] = (peek(k, a, 2).hex(), peek(k, a + 0x1234, 1).hex(), peek(k, a + HPAGE - 1, 1).hex())
    r["eexist"] = copy(k, fd, a, src.address, HPAGE)
    r["unregister_unaligned"] = rng(k, fd, U.UFFDIO_UNREGISTER, a + PAGE, HPAGE)
    k.close(fd)
    k.munmap(a, 2 * HPAGE)
    return r


HUGETLB_SCENARIOS: dict[str, Callable[[Kernel], Record]] = {"hugetlb_2m": scn_hugetlb_2m}


def scn_shmem_missing_wp(k: Kernel) -> Record:
    """shmem: MISSING faults resolved by COPY into the page cache; WP on shmem; WP_UNPOPULATED on anon."""
    r: Record = {}
    mfd, s, via = shmem(k, 3)
    a = s.address
    src = src_page(k, 0x6E)
    fd = new_uffd(k, U.UFFD_FEATURE_MISSING_SHMEM | U.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    register(k, fd, a, 3 * PAGE, U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP)
    t = touch_in_thread(k, a, False)
    t.wait_blocked()
    r["missing_msg"] = read_msgs(k, fd, 64, a)
    r["copy"] = copy(k, fd, a, src.address)
    r["joined"] = (t.join(), t.result)
    r["other_mapping_sees_it"] = peek(k, via.address, 1).hex()
    poke(k, via.address + PAGE, b"\x01")  # in the page cache, not mapped in `s`
    r["present_in_cache_no_fault"] = touch_in_thread(k, a + PAGE, False).join()
    r["protect"] = wp(k, fd, a, 2 * PAGE, U.UFFDIO_WRITEPROTECT_MODE_WP)
    t = touch_in_thread(k, a + PAGE, True)
    t.wait_blocked()
    r["wp_msg"] = read_msgs(k, fd, 64, a)
    r["unprotect"] = wp(k, fd, a + PAGE, PAGE, 0)
    r["joined_wp"] = t.join()
    # the missing page 2 in the protected range: with shmem, none PTEs are protected too
    r["protect_missing"] = wp(k, fd, a + 2 * PAGE, PAGE, U.UFFDIO_WRITEPROTECT_MODE_WP)
    t = touch_in_thread(k, a + 2 * PAGE, True)
    t.wait_blocked()
    r["missing_then"] = read_msgs(k, fd, 64, a)
    r["zeropage"] = zeropage(k, fd, a + 2 * PAGE)
    r["joined_missing"] = t.join()
    k.close(fd)
    k.close(mfd)
    # anonymous memory: unpopulated pages are protected only with WP_UNPOPULATED
    for name, feats in (("anon_wp", 0), ("anon_wp_unpopulated", U.UFFD_FEATURE_WP_UNPOPULATED)):
        m = anon(k, 1)
        fd = new_uffd(k, U.UFFD_FEATURE_PAGEFAULT_FLAG_WP | feats)
        register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_WP)
        wp(k, fd, m.address, PAGE, U.UFFDIO_WRITEPROTECT_MODE_WP)
        t = touch_in_thread(k, m.address, True)
        done = t.join() if not feats else None
        if feats:
            t.wait_blocked()
            msg = read_msgs(k, fd, 64, m.address)
            un = wp(k, fd, m.address, PAGE, 0)
            r[name] = (msg, un, t.join())
        else:
            r[name] = (done, read_msgs(k, fd, 64, m.address))
        k.close(fd)
    return r


def scn_same_page_two_threads(k: Kernel) -> Record:
    """Two threads fault on one page: two messages; one COPY wakes both."""
    r: Record = {}
    m = anon(k, 1)
    src = src_page(k, 0x2B)
    fd = new_uffd(k, U.UFFD_FEATURE_THREAD_ID)
    register(k, fd, m.address, PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
    t1 = touch_in_thread(k, m.address + 8, False)
    t1.wait_blocked()
    t2 = touch_in_thread(k, m.address + 16, True)
    t2.wait_blocked()
    got = msgs(k.read(fd, 96), m.address)
    r["msgs"] = [(g[0], g[1], g[2]) for g in got]
    r["tids"] = sorted(g[3] for g in got) == sorted([t1.tid, t2.tid])
    r["copy"] = copy(k, fd, m.address, src.address)
    r["joined"] = (t1.join(), t2.join(), t1.result)
    r["after"] = read_msgs(k, fd, 32, m.address)
    k.close(fd)
    return r


#: every scenario but the hugetlb ones (which need reserved huge pages on the host)
SCENARIOS: dict[str, Callable[[Kernel], Record]] = {
    name[4:]: fn
    for name, fn in sorted(globals().items())
    if name.startswith("scn_") and callable(fn) and name[4:] not in HUGETLB_SCENARIOS
}
