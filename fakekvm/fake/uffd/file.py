"""`UserfaultfdFile`: the fake ``anon_inode:[userfaultfd]`` file and its fault handler.

Follows ``fs/userfaultfd.c`` (Linux 6.18): ``userfaultfd_ioctl`` (every command but UFFDIO_API
fails EINVAL before the handshake; unknown commands EINVAL), ``userfaultfd_read``
(``userfaultfd_ctx_read``: blocks unless O_NONBLOCK, only the first message may block),
``userfaultfd_poll``, ``userfaultfd_release`` (unregister everything, wake every fault),
``handle_userfault`` (queue a PAGEFAULT, re-check, sleep until a resolution ioctl or WAKE covers
the address; then the fault is retried) and ``userfaultfd_event_wait_completion`` (the thread
raising REMOVE/UNMAP/REMAP sleeps until the monitor has read the event).

The resolution ioctls are in :mod:`fakekvm.fake.uffd.ioctls`. Locking: ``self.lock`` guards
the context state and nobody sleeps holding it; every sleep goes through
:mod:`fakekvm.fake.waits`: readers and poll on ``self.wq``, each faulting thread on its own
queue (woken by a resolution ioctl, WAKE, UNREGISTER, close or shutdown), event raisers on
``event_wq``. Page-table state is E1's mm (``mm.present``/``wp``/``poison`` under
``mm.pt_lock``): a resolver changes it *before* it takes ``self.lock`` to wake, and a faulter
re-checks it *after* queueing under ``self.lock`` (``userfaultfd_must_wait``), so no wake-up is
lost. A fault with ``who.user`` False (KVM's own access) on a UFFD_USER_MODE_ONLY context, or
any fault with UFFD_FEATURE_SIGBUS, ends at once with SIGBUS (E2 turns it into -EFAULT).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fakekvm.abi import mman
from fakekvm.fake.files import FakeFile
from fakekvm.fake.mm import VM_UFFD_MINOR, VM_UFFD_WP, FaultResult
from fakekvm.fake.uffd import _uapi as U
from fakekvm.fake.uffd.state import UffdState, Waiter, remap_msg, remove_msg
from fakekvm.fake.waits import WaitQueue
from fakekvm.kernel.seam import IoctlArg

PAGE_SHIFT = mman.PAGE_SHIFT
_O_NONBLOCK = mman.O_NONBLOCK
_FIONBIO = 0x5421  # asm-generic/ioctls.h
_SIGBUS = FaultResult.SIGBUS
_MSG = U.UFFD_MSG_SIZE


class UserfaultfdFile(FakeFile):
    kind = "userfaultfd"

    def __init__(self, kernel: Any, flags: int, available: int = U.UFFD_API_FEATURES) -> None:
        super().__init__()
        self.kernel = kernel
        self.mm = kernel.mm
        self.domain = domain = kernel.waits
        #: the context lock: guards `state`; nobody sleeps holding it
        self.lock = threading.Lock()
        #: readers and poll (``fd_wqh``)
        self.wq = WaitQueue(domain, "userfaultfd")
        #: threads raising non-cooperative events (``event_wqh`` completion)
        self.event_wq = WaitQueue(domain, "userfaultfd-event")
        #: tests waiting for a faulter to fall asleep (`wait_for_faulter`): one per kernel
        subsystems = getattr(kernel, "subsystems", {})
        self.blocked_wq = subsystems.setdefault("uffd-blocked", WaitQueue(domain, "userfaultfd-blocked"))
        self.state = UffdState(flags=flags, available=available)
        self._thread_wqs: dict[int, WaitQueue] = {}
        self.f_flags = flags & _O_NONBLOCK
        from fakekvm.fake.uffd import ioctls

        self._ioctls = ioctls.table(self)

    # -- file operations --------------------------------------------------------------------------
    def ioctl(self, request: int, arg: IoctlArg) -> int:
        fn = self._ioctls.get(request)
        if request == _FIONBIO:  # do_vfs_ioctl answers it for every file, before the driver
            on = arg if isinstance(arg, int) else int.from_bytes(bytes(memoryview(arg).cast("B")[:4]), "little")  # type: ignore[arg-type]
            self.f_flags = self.f_flags | _O_NONBLOCK if on else self.f_flags & ~_O_NONBLOCK
            return 0
        if request != U.UFFDIO_API and not self.state.initialized:
            raise OSError(errno.EINVAL, f"userfaultfd: ioctl {request:#x} before UFFDIO_API")
        if fn is None:
            raise OSError(errno.EINVAL, f"userfaultfd: unknown ioctl {request:#x}")
        return fn(arg)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise OSError(errno.EBADF, "userfaultfd: not open for writing")

    def read(self, n: int) -> bytes:
        st = self.state
        if not st.initialized:
            raise OSError(errno.EINVAL, "userfaultfd: read before UFFDIO_API")
        while True:
            with self.lock:
                if st.pending and _MSG <= n < 2 * _MSG:
                    # fast path: one message, and faults are read before events (pop_msg)
                    w = st.pending.popleft()
                    w.read = True
                    lst = st.waiting.get(w.page)
                    if lst is None:
                        st.waiting[w.page] = [w]
                    else:
                        lst.append(w)
                    return w.msg
                nev = len(st.events)
                out = st.read(n)
                ev_read = len(st.events) != nev
            if ev_read:
                self.event_wq.wake_up_all()  # raisers whose event was read
            if out:
                return out
            if self.f_flags & _O_NONBLOCK or st.released:
                raise OSError(errno.EAGAIN, "userfaultfd: nothing to read")
            self.wq.wait_event(lambda: st.has_msgs() or st.released, interruptible=True, what="a userfault")

    def poll(self) -> int:
        return self.state.poll(bool(self.f_flags & _O_NONBLOCK))

    def release(self) -> None:
        self.mm.unregister_ctx(self)
        with self.lock:
            woken = self.state.release()
        for w in woken:
            w.wq.wake_up_all()
        self.event_wq.wake_up_all()
        self.wq.wake_up_all()

    # -- the fault handler (called by mm.fault for VMAs registered with this context) -----------
    def handle_fault(
        self, mm: Any, vma: Any, address: int, reason: int, who: Any, user: bool | None = None
    ) -> FaultResult | None:
        """``handle_userfault``: None means "retry the fault"; a FaultResult ends it.

        ``who`` is E1's `Faulter` (``who.tid`` for ptid, ``who.user`` = FAULT_FLAG_USER).
        """
        st = self.state
        if user is None:
            user = bool(getattr(who, "user", True))
        if st.features & U.UFFD_FEATURE_SIGBUS:
            return _SIGBUS
        if not user and st.flags & U.UFFD_USER_MODE_ONLY:
            return _SIGBUS
        # one queue per faulting thread, reused (a thread sleeps in at most one fault)
        me = threading.get_native_id()
        tid = getattr(who, "tid", None) or me
        ps = vma.page_size
        vpn = address >> PAGE_SHIFT
        wp = reason & U.UFFD_PAGEFAULT_FLAG_WP
        present = mm.present
        wq = self._thread_wqs.get(me)
        if wq is None:
            wq = self._thread_wqs[me] = WaitQueue(self.domain, "userfaultfd-fault")
        w = Waiter(address, st.fault_msg(address, reason, tid, ps), tid, wq)
        with self.lock:
            if st.released:
                return None
            if st.inject.owner_dead:
                return _SIGBUS
            if st.inject.remove_before_fault:
                st.inject.remove_before_fault -= 1
                base = address & ~(ps - 1)
                st.add_event(remove_msg(U.UFFD_EVENT_REMOVE, base, base + ps), detached=True)
            st.add_fault(w)
            # userfaultfd_must_wait, re-checked with the fault queued
            must_wait = (mm.wp.test(vpn) and present.test(vpn)) if wp else not present.test(vpn)
            if not must_wait:
                st.drop_fault(w)
                return None
        self.wq.wake_up_all()
        if self.blocked_wq.waiters:
            self.blocked_wq.wake_up_all()
        wq.wait_event(lambda: w.woken or st.released or st.inject.owner_dead, what="UFFDIO_COPY/WAKE")
        self.domain.check("a thread blocked in a userfault")  # FakeKernel.shutdown: never hang
        if not w.woken and st.inject.owner_dead:
            with self.lock:
                st.drop_fault(w)
            return _SIGBUS
        return None

    def remap_keep(self, mm: Any, old: int, new: int, length: int) -> bool:
        """mremap_userfaultfd_prep: a moved VMA stays registered only with EVENT_REMAP."""
        return bool(self.state.features & U.UFFD_FEATURE_EVENT_REMAP)

    # -- non-cooperative events (raised by the thread changing the mm; it waits for the read) -----
    def raise_event(self, msg: bytes) -> None:
        st = self.state
        with self.lock:
            if st.released:
                return
            ev = st.add_event(msg)
        self.wq.wake_up_all()
        try:
            self.event_wq.wait_event(lambda: ev.done or st.released, what="event read")
        finally:
            with self.lock:
                if not st.released:
                    st.mmap_changing -= 1

    def event_remove(self, start: int, end: int) -> None:
        if self.state.features & U.UFFD_FEATURE_EVENT_REMOVE:
            self.raise_event(remove_msg(U.UFFD_EVENT_REMOVE, start, end))

    def event_unmap(self, start: int, end: int) -> None:
        if self.state.features & U.UFFD_FEATURE_EVENT_UNMAP:
            self.raise_event(remove_msg(U.UFFD_EVENT_UNMAP, start, end))

    def event_remap(self, old: int, new: int, length: int) -> None:
        if self.state.features & U.UFFD_FEATURE_EVENT_REMAP:
            self.raise_event(remap_msg(old, new, length))

    # -- waking -------------------------------------------------------------------------------------
    def wake_range(self, start: int, length: int) -> None:
        if not (self.state.pending or self.state.waiting):
            return
        with self.lock:
            woken = self.state.wake(start, length)
        for w in woken:
            w.wq.wake_up_all()

    def kill_owner(self) -> None:
        """Fault injection: the owning process is gone; blocked faulters end with SIGBUS."""
        st = self.state
        with self.lock:
            st.inject.owner_dead = True
            waiters = list(st.pending) + [w for lst in st.waiting.values() for w in lst]
        for w in waiters:
            w.wq.wake_up_all()

    def wait_for_faulter(
        self,
        tid: int,
        timeout: float,
        others: Sequence[UserfaultfdFile] = (),
        alive: Callable[[], bool] | None = None,
    ) -> bool:
        """Test hook: block until thread ``tid`` sleeps in this (or an ``others``) context's
        fault handler, or ``alive()`` is false (all contexts of a kernel share ``blocked_wq``)."""
        ctxs = [self, *others]

        def asleep() -> bool:
            if alive is not None and not alive():
                return True
            for c in ctxs:
                with c.lock:
                    if tid in c.state.blocked_tids():
                        return True
            return False

        return self.blocked_wq.wait_event(asleep, timeout)

    def __repr__(self) -> str:
        st = self.state
        return (
            f"<UserfaultfdFile features={st.features:#x} pending={len(st.pending)} "
            f"events={len(st.events)} released={st.released}>"
        )


def vma_wp(vma: Any) -> bool:
    return bool(vma.uffd_flags & VM_UFFD_WP)


def vma_minor(vma: Any) -> bool:
    return bool(vma.uffd_flags & VM_UFFD_MINOR)
