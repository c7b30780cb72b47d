"""The fault-mechanism interface of the post-copy destination, and the userfaultfd plumbing.

A *mechanism* is how the destination learns that a page is needed and how it
makes a received page visible to the guest. Four implement one interface:

================  ==============================================================  ========================
name              how a vCPU's access to a missing page is seen / resolved        kernel
================  ==============================================================  ========================
``uffd-missing``  anonymous memory, uffd MISSING; ``UFFDIO_COPY`` (QEMU)           any (MISSING on anon)
``uffd-minor``    memfd mapped twice; page written through the alias, then        shmem MINOR (5.13+)
                  ``UFFDIO_CONTINUE`` in the registered mapping
``kvm-userfault`` ``KVM_MEM_USERFAULT`` + bitmap: ``KVM_EXIT_MEMORY_FAULT``       NOT UPSTREAM (profile)
                  (USERFAULT) on the vCPU thread; uffd MISSING for the rest
``gmem-private``  guest_memfd; the private access of a shared gfn exits            fake CC VM type
                  (PRIVATE); fill through the gmem mmap, then
                  ``KVM_SET_MEMORY_ATTRIBUTES`` PRIVATE; uffd MISSING for shared
================  ==============================================================  ========================

The interface (:class:`Mechanism`), in call order:

* ``arm(kernel, layout)`` creates the guest memory and whatever catches faults
  (userfaultfd, bitmap), before the VM exists; returns nothing.
* ``vm_type`` and ``bind(vm)`` -- the VM type for ``KVM_CREATE_VM`` and the
  memslot(s) to install (``bind`` gets a :class:`~postcopy.guestrun.DestVM`).
* ``buffer_for(start, count, demand)`` / ``place(start, count, demand)`` -- the
  receiver's side: where the bytes of arriving pages go, and making them
  visible (one ``UFFDIO_COPY`` for a whole contiguous batch, or nothing at all
  when the bytes were received straight into the page cache). A mechanism with
  ``bulk_slots > 1`` also has ``buffer_for_slot(start, count, slot)`` /
  ``place_slot(start, count, slot)`` for background batches: up to that many
  are received ahead of their placement (a pipeline). ``place`` must
  wake any vCPU blocked on those pages and report the faults it resolved.
* ``run_fault_loop(ctx)`` -- the fault thread's body (userfaultfd designs); it
  returns when ``ctx.stop`` is set (an eventfd wakes its ``poll``).
* ``on_vcpu_exit(ctx, vcpu, run)`` -- for exit-based designs: called on the
  vCPU thread when ``KVM_RUN`` failed ``EFAULT`` with ``KVM_EXIT_MEMORY_FAULT``;
  returns True when it resolved the fault (re-enter) and False when the exit is
  not its business.
* ``complete()`` -- every page is placed: stop intercepting (``UFFDIO_UNREGISTER``,
  clear ``KVM_MEM_USERFAULT``, flip the remaining gfns private).
* ``disarm()`` -- release fds and mappings (after the VM is closed).

:class:`UffdPlacer` holds the userfaultfd rules real handlers get wrong
(``Documentation/admin-guide/mm/userfaultfd.rst``; uapi.md §5): ``EEXIST`` from
COPY/CONTINUE proves the page is present, not that its waiter woke, so an
explicit ``UFFDIO_WAKE`` follows; ``EAGAIN`` (a non-cooperative event such as
REMOVE is unread) makes no progress past the signed ``copy``/``mapped`` field,
so the placer drains the event queue itself and retries the rest; page faults
it drains on the way are queued for the fault thread, which the wake eventfd
kicks. Everything goes through the `Kernel` seam; nothing here knows which
kernel it has.
"""

from __future__ import annotations

import abc
import errno
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fakekvm.abi import mman, uffd
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import Kernel

if TYPE_CHECKING:
    from postcopy.guestrun import DestVM

POLLIN = 0x1
POLLERR = 0x8
POLLHUP = 0x10
MSG = uffd.UFFD_MSG_SIZE
#: the most uffd messages one read() takes
READ_MSGS = 64


@dataclass(frozen=True)
class MemoryLayout:
    """Guest memory: ``mem_size`` bytes at GPA 0 in ``page_size`` pages."""

    mem_size: int
    page_size: int = mman.PAGE_SIZE

    @property
    def nr_pages(self) -> int:
        return self.mem_size // self.page_size


class FaultContext(Protocol):
    """What the destination offers a mechanism (see :class:`postcopy.destination.Destination`)."""

    kernel: Kernel
    stop: threading.Event

    def vcpu_of_tid(self, tid: int) -> int:
        """The vCPU index of kernel thread ``tid`` (-1: not a vCPU thread)."""
        ...

    def fault_observed(self, page: int, vcpu: int, t_ns: int) -> bool:
        """Record a fault; True when the page is already placed (resolve it at once)."""
        ...

    def fault_resolved_now(self, page: int, vcpu: int, t_begin_ns: int) -> None:
        """A fault on an already-placed page was woken (explicit wake): account it."""
        ...

    def fetch(self, pages: list[int]) -> None:
        """Request ``pages`` (duplicates suppressed) and wait until they are placed."""
        ...

    def pages_removed(self, start: int, count: int) -> None:
        """A REMOVE event dropped ``[start, start+count)`` from the guest mapping."""
        ...


class Mechanism(abc.ABC):
    """One way of catching and resolving the guest's accesses to missing pages."""

    name: str = "?"
    #: the KVM_CREATE_VM argument
    vm_type: int = 0
    #: does the destination need a fault thread (userfaultfd designs)?
    needs_fault_thread: bool = True
    #: can the guest-memory memslot carry KVM_MEM_LOG_DIRTY_PAGES? (guest_memfd slots cannot)
    supports_dirty_log: bool = True
    #: how many background batches may be received ahead of their placement. Above 1,
    #: background batches go through ``buffer_for_slot``/``place_slot`` (slot 0 ..
    #: bulk_slots-1) and the destination places them on a thread of their own, so
    #: the next batch's ``recv`` overlaps this one's ``UFFDIO_COPY``
    bulk_slots: int = 1
    #: can pages be placed right after ``arm``, before ``bind`` installed the memslots?
    #: (then the background push starts while the VM is being built)
    places_before_bind: bool = False

    def __init__(self) -> None:
        self.kernel: Kernel | None = None
        self.layout = MemoryLayout(0)
        #: extra memslot flags (the destination adds KVM_MEM_LOG_DIRTY_PAGES)
        self.slot_flags = 0
        #: mechanisms without a dirty log record each page's digest as it is placed
        #: (8 bytes a page, `postcopy.pages.page_digests` format), so the migration can
        #: still prove every page arrived intact although the guest kept running
        self.placed_digests: bytearray | None = None

    @abc.abstractmethod
    def arm(self, kernel: Kernel, layout: MemoryLayout) -> None: ...

    @abc.abstractmethod
    def bind(self, vm: DestVM) -> None:
        """Install the memslot(s) of guest memory in ``vm``."""

    @abc.abstractmethod
    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview: ...

    @abc.abstractmethod
    def place(self, start: int, count: int, demand: bool) -> None: ...

    def buffer_for_slot(self, start: int, count: int, slot: int) -> memoryview:
        """``buffer_for`` of a background batch staged in ``slot`` (``bulk_slots > 1``)."""
        raise NotImplementedError(f"{self.name} has no bulk slots")

    def place_slot(self, start: int, count: int, slot: int) -> None:
        """``place`` of the background batch staged in ``slot`` (on the placer thread)."""
        raise NotImplementedError(f"{self.name} has no bulk slots")

    def run_fault_loop(self, ctx: FaultContext) -> None:
        """The fault thread's body; returns when ``ctx.stop`` is set."""
        return None

    def on_vcpu_exit(self, ctx: FaultContext, vcpu: int, run: memoryview) -> bool:
        return False

    def kick(self) -> None:
        """Wake the fault thread (after ``ctx.stop`` was set)."""
        return None

    def guest_view(self) -> memoryview:
        """Guest memory as the host sees it, for the final digest compare."""
        raise NotImplementedError

    @abc.abstractmethod
    def complete(self) -> None: ...

    @abc.abstractmethod
    def disarm(self) -> None: ...


# -- staging buffers -----------------------------------------------------------------------


class Staging:
    """Host buffers the receivers write pages into before a COPY: one for demand
    replies and ``bulk_slots`` for the background stream.

    The demand buffer is used by one leader thread at a time; each bulk slot is
    written by the bulk receiver and then read by the placer thread that COPYs
    it, never both at once (:class:`postcopy.destination.Destination` hands a
    slot back only after its COPY returned). A frame larger than a buffer grows it.
    """

    def __init__(
        self, kernel: Kernel, page_size: int, pages: int = 256, bulk_slots: int = 1
    ) -> None:
        self.kernel = kernel
        self.page_size = page_size
        self.maps: list[Mapping] = [self._map(pages) for _ in range(1 + max(1, bulk_slots))]
        self.views = [m.view() for m in self.maps]

    def _map(self, pages: int) -> Mapping:
        # MAP_POPULATE: the pages exist before the receiver writes them through the
        # buffer (on a fake kernel, a later first fault would zero-fill them)
        return self.kernel.mmap(
            -1,
            pages * self.page_size,
            mman.PROT_READ | mman.PROT_WRITE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_POPULATE,
        )

    def get(self, count: int, demand: bool, slot: int = 0) -> tuple[int, memoryview]:
        """(host address, view) of ``count`` pages of the demand buffer or bulk ``slot``."""
        i = 0 if demand else 1 + slot
        n = count * self.page_size
        if n > self.maps[i].length:
            old = self.maps[i]
            self.views[i].release()
            self.kernel.munmap(old.address, old.length)
            self.maps[i] = self._map(count)
            self.views[i] = self.maps[i].view()
        return self.maps[i].address, self.views[i][:n]

    def close(self) -> None:
        for v in self.views:
            v.release()
        for m in self.maps:
            self.kernel.munmap(m.address, m.length)
        self.maps, self.views = [], []


# -- userfaultfd ----------------------------------------------------------------------------


def open_uffd(kernel: Kernel, features: int) -> int:
    """``userfaultfd(O_CLOEXEC|O_NONBLOCK)`` + ``UFFDIO_API``; returns the fd.

    Non-blocking because a blocking uffd always polls POLLERR (uapi.md §5).
    """
    fd = kernel.userfaultfd(mman.O_CLOEXEC | mman.O_NONBLOCK)
    try:
        api = bytearray(uffd.uffdio_api_fmt.pack(uffd.UFFD_API, features, 0))
        kernel.ioctl(fd, uffd.UFFDIO_API, api)
    except BaseException:
        kernel.close(fd)
        raise
    return fd


def uffd_register(kernel: Kernel, fd: int, start: int, length: int, mode: int) -> int:
    """``UFFDIO_REGISTER``; returns the ``ioctls`` mask."""
    buf = bytearray(uffd.uffdio_register_fmt.pack(start, length, mode, 0))
    kernel.ioctl(fd, uffd.UFFDIO_REGISTER, buf)
    return int(uffd.uffdio_register_fmt.unpack(buf)[3])


def uffd_unregister(kernel: Kernel, fd: int, start: int, length: int) -> None:
    kernel.ioctl(fd, uffd.UFFDIO_UNREGISTER, bytearray(uffd.uffdio_range_fmt.pack(start, length)))


class UffdPlacer:
    """Resolves pages on one userfaultfd: COPY / CONTINUE / WAKE with the corner cases.

    ``base`` is the host address of guest page 0 in the registered mapping.
    Messages other than the ones it needs (drained on ``EAGAIN``) are queued in
    :attr:`pending` as raw 32-byte records for the fault thread and ``on_pending``
    is called (the destination kicks the fault thread's eventfd).
    """

    def __init__(
        self, kernel: Kernel, fd: int, base: int, page_size: int, *, max_retries: int = 1000
    ) -> None:
        self.kernel = kernel
        self.fd = fd
        self.base = base
        self.page_size = page_size
        self.max_retries = max_retries
        self.pending: deque[tuple[bytes, int]] = deque()  # (messages, t_ns read)
        self.on_pending: Callable[[], None] | None = None
        self.on_remove: Callable[[int, int], None] | None = None
        self._read_lock = threading.Lock()
        self._copy = uffd.uffdio_copy_fmt
        self._cont = uffd.uffdio_continue_fmt
        # counters (read by tests and the summary)
        self.eexist = 0
        self.eagain = 0
        self.wakes = 0
        #: faults on placed pages whose range was unregistered meanwhile (teardown): ENOENT
        self.gone = 0

    # -- reading ------------------------------------------------------------------
    def read_messages(self) -> bytes:
        """Read whatever messages are pending (``b""`` if none); REMOVE is handled here."""
        with self._read_lock:
            try:
                data = self.kernel.read(self.fd, MSG * READ_MSGS)
            except BlockingIOError:
                return b""
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return b""
                raise
        if self.on_remove is not None:
            for off in range(0, len(data), MSG):
                if data[off] in (uffd.UFFD_EVENT_REMOVE, uffd.UFFD_EVENT_UNMAP):
                    _, start, end = uffd.uffd_msg_remove_fmt.unpack_from(data, off)
                    self.on_remove(start, end)
        return data

    def drain(self) -> None:
        """Read pending events (EAGAIN recovery); page faults go to :attr:`pending`."""
        data = self.read_messages()
        if data:
            t = self.kernel.monotonic_ns()
            self.pending.append((data, t))
            if self.on_pending is not None:
                self.on_pending()
        else:
            # nothing to read: another thread read the event, but the thread that raised it
            # (a REMOVE's madvise) has yet to wake and end ``mmap_changing``
            # (``userfaultfd_event_wait_completion``); until it runs, every resolving ioctl
            # fails EAGAIN -- give it the CPU (and, on the fake, the GIL)
            time.sleep(0)

    # -- resolving -------------------------------------------------------------------
    def copy(self, start_page: int, count: int, src: int, *, wake: bool = True) -> None:
        """``UFFDIO_COPY`` of ``count`` pages from host address ``src`` to guest page ``start_page``."""
        mode = 0 if wake else uffd.UFFDIO_COPY_MODE_DONTWAKE
        fmt = self._copy
        self._resolve(
            uffd.UFFDIO_COPY, "UFFDIO_COPY", start_page, count, fmt, 4,
            lambda dst, done, left: fmt.pack(dst, src + done, left, mode, 0),
        )  # fmt: skip

    def cont(self, start_page: int, count: int, *, wake: bool = True) -> None:
        """``UFFDIO_CONTINUE`` of pages already in the page cache."""
        mode = 0 if wake else uffd.UFFDIO_CONTINUE_MODE_DONTWAKE
        fmt = self._cont
        self._resolve(
            uffd.UFFDIO_CONTINUE, "UFFDIO_CONTINUE", start_page, count, fmt, 3,
            lambda dst, done, left: fmt.pack(dst, left, mode, 0),
        )  # fmt: skip

    def _resolve(
        self,
        request: int,
        what: str,
        start_page: int,
        count: int,
        fmt: struct.Struct,
        progress_field: int,
        pack: Callable[[int, int, int], bytes],
    ) -> None:
        """Run a resolving ioctl over a range with the rules real handlers get wrong.

        The output field (``copy``/``mapped``, index ``progress_field`` of the struct) is
        signed: positive is bytes done, negative is ``-errno``. ``EEXIST`` means the page at
        the point reached is present (placed by someone else), not that its waiter woke:
        wake it explicitly and go on after it. ``EAGAIN`` means a non-cooperative event
        is unread: drain the events, then retry what is left.
        """
        ps = self.page_size
        dst = self.base + start_page * ps
        length = count * ps
        done = 0
        for _ in range(self.max_retries):
            buf = bytearray(pack(dst + done, done, length - done))
            try:
                self.kernel.ioctl(self.fd, request, buf)
                return
            except OSError as e:
                progress = fmt.unpack(buf)[progress_field]
                if progress > 0:  # signed: bytes done before the error
                    done += progress
                if e.errno == errno.EEXIST:
                    self.eexist += 1
                    self.wake(dst + done, ps)
                    done += ps
                elif e.errno == errno.EAGAIN:
                    self.eagain += 1
                    self.drain()
                else:
                    raise OSError(
                        e.errno, f"{what} dst={dst + done:#x} len={length - done:#x}: {e.strerror}"
                    ) from e
                if done >= length:
                    return
        raise OSError(errno.EAGAIN, f"{what} dst={dst:#x}: no progress after retries")

    def wake(self, address: int, length: int) -> None:
        """``UFFDIO_WAKE`` (EAGAIN: drain and retry)."""
        rng = uffd.uffdio_range_fmt.pack(address, length)
        for _ in range(self.max_retries):
            try:
                self.kernel.ioctl(self.fd, uffd.UFFDIO_WAKE, bytearray(rng))
                self.wakes += 1
                return
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise OSError(
                        e.errno, f"UFFDIO_WAKE start={address:#x} len={length:#x}: {e.strerror}"
                    ) from e
                self.eagain += 1
                self.drain()
        raise OSError(errno.EAGAIN, f"UFFDIO_WAKE start={address:#x}: no progress after retries")

    def zeropage_or_wake(self, page: int) -> None:
        """Resolve a fault on a page placed before: ``UFFDIO_ZEROPAGE`` if a REMOVE
        dropped it (the guest discarded it: zeros), else ``EEXIST`` -> explicit wake."""
        ps = self.page_size
        addr = self.base + page * ps
        fmt = uffd.uffdio_zeropage_fmt
        for _ in range(self.max_retries):
            buf = bytearray(fmt.pack(addr, ps, 0, 0))
            try:
                self.kernel.ioctl(self.fd, uffd.UFFDIO_ZEROPAGE, buf)
                return
            except OSError as e:
                if e.errno == errno.EEXIST:
                    self.eexist += 1
                    self.wake(addr, ps)
                    return
                if e.errno == errno.ENOENT:
                    # the range is no longer registered (the destination tears down while a
                    # late fault on a placed page is handled): unregistering woke every waiter
                    # (``userfaultfd_unregister`` -> ``wake_userfault``), so nobody waits here
                    self.gone += 1
                    return
                if e.errno != errno.EAGAIN:
                    raise OSError(e.errno, f"UFFDIO_ZEROPAGE start={addr:#x}: {e.strerror}") from e
                self.eagain += 1
                self.drain()
        raise OSError(errno.EAGAIN, f"UFFDIO_ZEROPAGE start={addr:#x}: no progress after retries")

    def wake_page(self, page: int) -> None:
        self.wake(self.base + page * self.page_size, self.page_size)


def pagefaults(data: bytes, base: int, page_size: int, nr_pages: int) -> list[tuple[int, int, int]]:
    """``(page, flags, ptid)`` of each PAGEFAULT message in ``data`` inside guest memory."""
    out = []
    unpack = uffd.uffd_msg_pagefault_fmt.unpack_from
    for off in range(0, len(data), MSG):
        if data[off] != uffd.UFFD_EVENT_PAGEFAULT:
            continue
        _, flags, address, ptid = unpack(data, off)
        page = (address - base) // page_size
        if 0 <= page < nr_pages:
            out.append((page, flags, ptid))
    return out


def uffd_fault_loop(
    ctx: FaultContext,
    placer: UffdPlacer,
    stop_fd: int,
    nr_pages: int,
    resolve_present: Callable[[int], None],
) -> None:
    """The fault thread of every userfaultfd design (QEMU's ``postcopy_ram_fault_thread``).

    ``poll`` on the uffd and the stop eventfd; read a batch of messages; for each
    page fault: account it, and either resolve it at once (``resolve_present``:
    the page was placed already, e.g. by the background push, whose COPY may
    have raced the fault) or collect it; request every collected page in one go
    and wait for them (the receiver's placement wakes the vCPUs). Messages that
    another thread drained (:meth:`UffdPlacer.drain`) are handled the same way.
    """
    k = ctx.kernel
    fds = [(placer.fd, POLLIN), (stop_fd, POLLIN)]
    base, ps = placer.base, placer.page_size
    while not ctx.stop.is_set():
        batches: list[tuple[bytes, int]] = []
        while placer.pending:
            batches.append(placer.pending.popleft())
        if not batches:
            ready = k.poll(fds, -1)
            if ctx.stop.is_set():
                return  # leave the eventfd readable: other fault threads wake too
            for fd, rev in ready:
                if fd == stop_fd:  # a kick for drained faults (see UffdPlacer.drain)
                    try:
                        k.read(stop_fd, 8)
                    except OSError:
                        pass
                elif rev & (POLLERR | POLLHUP) and not rev & POLLIN:
                    raise OSError(errno.EIO, f"userfaultfd {placer.fd}: poll revents {rev:#x}")
            data = placer.read_messages()
            if data:
                batches.append((data, k.monotonic_ns()))
        want: list[int] = []
        for data, t in batches:
            for page, _flags, ptid in pagefaults(data, base, ps, nr_pages):
                vcpu = ctx.vcpu_of_tid(ptid)
                if ctx.fault_observed(page, vcpu, t):
                    resolve_present(page)
                    ctx.fault_resolved_now(page, vcpu, t)
                else:
                    want.append(page)
        if want:
            ctx.fetch(want)


def new_eventfd(kernel: Kernel) -> int:
    return kernel.eventfd(0, mman.EFD_CLOEXEC | mman.EFD_NONBLOCK)


def kick_eventfd(kernel: Kernel, fd: int) -> None:
    try:
        kernel.write(fd, (1).to_bytes(8, "little"))
    except OSError:
        pass


class UffdMechanism(Mechanism):
    """What the userfaultfd designs share: a uffd, a stop eventfd for its fault
    thread, and guest memory registered on it (`uffd`, `stop_fd`, `memory`,
    `staging` are set by the subclass's `arm`)."""

    uffd: int = -1
    stop_fd: int = -1
    places_before_bind = True  # COPY/CONTINUE need the registered memory only
    memory: Mapping | None = None
    staging: Staging | None = None
    _registered: bool = False

    def kick(self) -> None:
        if self.stop_fd >= 0 and self.kernel is not None:
            kick_eventfd(self.kernel, self.stop_fd)

    def guest_view(self) -> memoryview:
        assert self.memory is not None
        return self.memory.view()[: self.layout.mem_size]

    def complete(self) -> None:
        if self._registered and self.kernel is not None and self.memory is not None:
            # cleared first: a placement racing with the unregister then sees ENOENT with
            # the flag already down and drops its (duplicate) pages, as it should
            self._registered = False
            uffd_unregister(self.kernel, self.uffd, self.memory.address, self.layout.mem_size)

    def _release_uffd(self, k: Kernel) -> None:
        """Close the staging buffer, the uffd and the stop eventfd (for `disarm`)."""
        if self.staging is not None:
            self.staging.close()
            self.staging = None
        for fd in (self.uffd, self.stop_fd):
            if fd >= 0:
                k.close(fd)
        self.uffd = self.stop_fd = -1
