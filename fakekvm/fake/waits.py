"""Every place a thread blocks inside the fake kernel.

Models the kernel's wait queues (``include/linux/wait.h``: ``wait_queue_head``,
``wait_event_interruptible_timeout``, ``wake_up_all``) and the poll table hook
(``include/linux/poll.h``: ``poll_wait``). Rules:

* A :class:`WaitQueue` is a lock plus its sleepers (a Condition without the overhead). Waiters call
  :meth:`WaitQueue.wait_event` with a predicate; wakers change state *then* call
  :meth:`WaitQueue.wake_up_all` (or change state inside ``with wq.lock:`` and call
  :meth:`WaitQueue.wake_up_all_locked`). The predicate is evaluated with the
  queue's lock held, so a wake-up between "check" and "sleep" is never lost.
* Nobody sleeps or spins: waiting is a blocking lock hand-off through a pluggable
  :class:`Scheduler` (default: real threads) so that a later deterministic
  scheduler can serialise every thread at exactly these points.
* Nobody hangs silently: every queue belongs to a :class:`WaitDomain` (one per
  ``FakeKernel``). ``WaitDomain.shutdown()`` wakes every waiter, which then raises
  :class:`KernelShutdown` (``ESHUTDOWN``); ``WaitQueue.abort(exc)`` does the same
  for one queue (a file being released). With ``watchdog_s`` set (debug), an
  untimed wait that lasts longer raises :class:`WaitTimeout` (``ETIMEDOUT``)
  naming the queue and what was waited for.
* Interruptible waits model signals: ``WaitDomain.interrupt(tid)`` makes the
  thread's current or next interruptible wait raise ``OSError(EINTR)`` (what a
  pending signal does to ``KVM_RUN`` or a blocking ``read``).
* ``poll_wait(wq, table)`` registers a callback entry on ``wq`` (the kernel's
  ``poll_table`` ``_qproc``); ``wake_up_all`` runs the callbacks, which is how
  ``FakeKernel.poll`` sleeps on many files at once.
"""

from __future__ import annotations

import errno
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable
from typing import Any, Protocol


class KernelShutdown(OSError):
    """Raised by a wait when its domain was shut down (``FakeKernel.shutdown``)."""


class WaitTimeout(OSError):
    """Raised when an untimed wait exceeds the domain's debug watchdog."""


class Scheduler:
    """How a thread actually blocks and wakes. The default uses real threads.

    A deterministic scheduler overrides these three methods; each is called
    with ``wq.lock`` held (like the kernel's ``schedule()`` inside
    ``___wait_event``).
    """

    def block(self, wq: WaitQueue, timeout: float | None) -> None:
        """Sleep on ``wq`` for at most ``timeout`` seconds (None: until woken).

        The cheapest hand-off CPython has: a fresh ``threading.Lock`` taken once, queued on
        ``wq.waiters``, then taken again with ``wq.lock`` dropped; the second acquire returns
        when a waker releases it (``wake``). No ``threading.Condition`` bookkeeping.
        """
        w = _allocate_lock()
        w.acquire()
        wq.waiters.append(w)
        lock: Any = wq.lock
        recursive = wq.recursive
        saved = None
        if recursive:
            saved = lock._release_save()
        else:
            lock.release()
        try:
            got = w.acquire() if timeout is None else w.acquire(True, timeout) if timeout > 0 else False
        finally:
            if recursive:
                lock._acquire_restore(saved)
            else:
                lock.acquire()
        if not got:
            try:  # timed out (or interrupted) before a wake: leave the queue
                wq.waiters.remove(w)
            except ValueError:
                pass  # a waker took it off (and released it) meanwhile

    def wake(self, wq: WaitQueue) -> None:
        """Wake every thread sleeping on ``wq``."""
        ws = wq.waiters
        if ws:
            wq.waiters = []
            for w in ws:
                w.release()

    def now(self) -> float:
        """Seconds, for computing remaining timeouts."""
        return time.monotonic()


class WaitDomain:
    """The set of queues belonging to one fake kernel: shutdown, watchdog, signals."""

    def __init__(
        self,
        name: str = "fake",
        *,
        scheduler: Scheduler | None = None,
        watchdog_s: float | None = None,
    ) -> None:
        self.name = name
        self.scheduler = scheduler or Scheduler()
        #: debug: untimed waits longer than this raise WaitTimeout
        self.watchdog_s = watchdog_s
        self.dead = False
        self._lock = threading.Lock()
        # native tid -> queue it is sleeping on (interruptible or not)
        self._sleeping: dict[int, WaitQueue] = {}
        # tids with a pending "signal"
        self._pending: set[int] = set()
        # called by shutdown(): wakes blocking points that are not WaitQueues (a real poll)
        self._hooks: list[Callable[[], None]] = []

    # -- signals -----------------------------------------------------------------
    def interrupt(self, tid: int) -> None:
        """Mark a signal pending for thread ``tid`` and wake it if it sleeps."""
        with self._lock:
            self._pending.add(tid)
            wq = self._sleeping.get(tid)
        if wq is not None:
            wq.wake_up_all()

    def signal_pending(self, tid: int | None = None) -> bool:
        return (threading.get_native_id() if tid is None else tid) in self._pending

    def take_signal(self, tid: int | None = None) -> bool:
        """Consume a pending signal of ``tid`` (default: the caller). True if one was pending."""
        t = threading.get_native_id() if tid is None else tid
        with self._lock:
            if t in self._pending:
                self._pending.discard(t)
                return True
        return False

    # -- shutdown ----------------------------------------------------------------
    def shutdown(self) -> None:
        """Wake every sleeper; they and all later waits raise KernelShutdown."""
        with self._lock:
            self.dead = True
            queues = list(set(self._sleeping.values()))
            hooks = list(self._hooks)
        for wq in queues:
            wq.wake_up_all()
        for h in hooks:
            h()

    def add_shutdown_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` on shutdown (for a thread blocked outside a WaitQueue, e.g. in a real poll)."""
        with self._lock:
            self._hooks.append(hook)

    def remove_shutdown_hook(self, hook: Callable[[], None]) -> None:
        with self._lock:
            try:
                self._hooks.remove(hook)
            except ValueError:
                pass

    def check(self, what: str = "") -> None:
        """Raise KernelShutdown if the domain is dead."""
        if self.dead:
            raise KernelShutdown(errno.ESHUTDOWN, f"fake kernel {self.name} shut down" + (f" ({what})" if what else ""))

    def _enter(self, tid: int, wq: WaitQueue) -> None:
        with self._lock:
            self._sleeping[tid] = wq

    def _leave(self, tid: int) -> None:
        with self._lock:
            self._sleeping.pop(tid, None)

    def sleepers(self) -> dict[int, str]:
        """tid -> queue name, for diagnostics."""
        with self._lock:
            return {t: q.name for t, q in self._sleeping.items()}


#: queues created without a domain belong here (never shut down implicitly)
DEFAULT_DOMAIN = WaitDomain("default")

WakeCallback = Callable[["WaitQueue"], None]
_LOCK_TYPE = type(threading.Lock())


class WaitQueue:
    """A wait queue head: a lock, the sleepers' hand-off locks, a domain, and poll callbacks."""

    __slots__ = ("_aborted", "_callbacks", "domain", "lock", "name", "recursive", "waiters")

    def __init__(
        self,
        domain: WaitDomain | None = None,
        name: str = "wq",
        lock: threading.Lock | threading.RLock | None = None,
    ) -> None:
        self.lock = lock if lock is not None else threading.Lock()
        #: an RLock: `Scheduler.block` must drop every recursion level while asleep
        self.recursive = not isinstance(self.lock, _LOCK_TYPE)
        #: the default Scheduler's sleepers: one hand-off lock each (released to wake)
        self.waiters: list[threading.Lock] = []
        self.domain = domain if domain is not None else DEFAULT_DOMAIN
        self.name = name
        self._callbacks: list[WakeCallback] = []
        self._aborted: OSError | None = None

    def __repr__(self) -> str:
        return f"<WaitQueue {self.name} domain={self.domain.name}>"

    # -- waking --------------------------------------------------------------------
    def wake_up_all(self) -> None:
        """Wake every waiter and run the poll callbacks (call after changing state)."""
        with self.lock:
            self.wake_up_all_locked()

    def wake_up_all_locked(self) -> None:
        """As `wake_up_all`, with ``self.lock`` already held."""
        self.domain.scheduler.wake(self)
        for cb in self._callbacks:
            cb(self)

    def abort(self, exc: OSError) -> None:
        """Make every current and future wait on this queue raise ``exc`` (file released)."""
        with self.lock:
            self._aborted = exc
            self.wake_up_all_locked()

    # -- poll callbacks --------------------------------------------------------------
    def add_callback(self, cb: WakeCallback) -> None:
        with self.lock:
            self._callbacks.append(cb)

    def remove_callback(self, cb: WakeCallback) -> None:
        with self.lock:
            try:
                self._callbacks.remove(cb)
            except ValueError:
                pass

    # -- waiting ------------------------------------------------------------------------
    def wait_event(
        self,
        cond: Callable[[], bool],
        timeout: float | None = None,
        *,
        interruptible: bool = False,
        what: str = "",
    ) -> bool:
        """Block until ``cond()`` is true (evaluated with the lock held).

        Returns True when the condition holds, False on timeout (``timeout``
        in seconds; None waits for ever, 0 only checks). Raises
        ``OSError(EINTR)`` for an interruptible wait with a pending signal,
        `KernelShutdown` after ``domain.shutdown()``, the abort exception after
        ``abort()``, and `WaitTimeout` when the debug watchdog fires.
        """
        with self.lock:
            return self.wait_event_locked(cond, timeout, interruptible=interruptible, what=what)

    def wait_event_locked(
        self,
        cond: Callable[[], bool],
        timeout: float | None = None,
        *,
        interruptible: bool = False,
        what: str = "",
    ) -> bool:
        """As `wait_event`, with ``self.lock`` held by the caller."""
        if cond():
            return True
        domain = self.domain
        sched = domain.scheduler
        tid = threading.get_native_id()
        deadline = None if timeout is None else sched.now() + timeout
        watchdog = domain.watchdog_s if timeout is None else None
        wd_deadline = None if watchdog is None else sched.now() + watchdog
        domain._enter(tid, self)
        try:
            while True:
                self._check_abort(tid, interruptible, what)
                if deadline is not None:
                    remaining = deadline - sched.now()
                    if remaining <= 0:
                        return False
                    sched.block(self, remaining)
                elif wd_deadline is not None:
                    remaining = wd_deadline - sched.now()
                    if remaining <= 0:
                        raise WaitTimeout(
                            errno.ETIMEDOUT,
                            f"fake kernel watchdog: thread {tid} waited more than {watchdog}s "
                            f"on {self.name}" + (f" for {what}" if what else ""),
                        )
                    sched.block(self, remaining)
                else:
                    sched.block(self, None)
                if cond():
                    return True
        finally:
            domain._leave(tid)

    def _check_abort(self, tid: int, interruptible: bool, what: str) -> None:
        if self._aborted is not None:
            raise self._aborted
        if self.domain.dead:
            raise KernelShutdown(
                errno.ESHUTDOWN,
                f"fake kernel {self.domain.name} shut down while waiting on {self.name}"
                + (f" for {what}" if what else ""),
            )
        if interruptible and self.domain.take_signal(tid):
            raise OSError(errno.EINTR, f"interrupted while waiting on {self.name}")


class PollTable:
    """What ``FakeFile.poll_wait`` registers with (the kernel's ``poll_table``).

    Every queue passed to `poll_wait` gets a callback that sets ``triggered``
    and wakes ``self.wq`` (and calls ``extra`` if given: e.g. write to a real
    eventfd so a real ``select.poll`` over real fds wakes too).
    """

    def __init__(self, domain: WaitDomain, extra: Callable[[], None] | None = None) -> None:
        self.wq = WaitQueue(domain, name="poll")
        self.triggered = False
        self.extra = extra
        self._queues: list[WaitQueue] = []

    def _callback(self, _src: WaitQueue) -> None:
        # Runs with _src.lock held; take only our own lock (never the other way round).
        with self.wq.lock:
            self.triggered = True
            self.wq.wake_up_all_locked()
        if self.extra is not None:
            self.extra()

    def add(self, wq: WaitQueue) -> None:
        if any(q is wq for q in self._queues):
            return
        self._queues.append(wq)
        wq.add_callback(self._callback)

    def remove_all(self) -> None:
        for wq in self._queues:
            wq.remove_callback(self._callback)
        self._queues.clear()


class SupportsPollWait(Protocol):
    def poll_wait(self, table: PollTable) -> None: ...


def poll_wait(wq: WaitQueue, table: PollTable | None) -> None:
    """Register ``wq`` with a poll table (no-op when ``table`` is None), like the kernel's."""
    if table is not None:
        table.add(wq)
