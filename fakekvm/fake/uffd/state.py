"""The pure state of one userfaultfd context (``struct userfaultfd_ctx``): no threads, no fds.

Follows ``fs/userfaultfd.c`` (Linux 6.18): ``userfaultfd_api`` (handshake and feature
negotiation), ``validate_range``, the three queues of a context (``fault_pending_wqh``: faults
not yet read; ``fault_wqh``: faults read and not yet woken; ``event_wqh``: non-cooperative
events), ``userfaultfd_ctx_read`` (faults before events, each queue oldest first),
``userfaultfd_poll``, ``userfaultfd_wake_function`` (a wake covers a waiter when the range
contains its address; a waiter woken before it was read disappears from the pending queue) and
``mmap_changing`` (resolution ioctls fail EAGAIN while a non-cooperative event is unread).
Facts that differ from older documentation were measured on the live 6.18 host (see
``fakekvm/testing/uffd_scenarios.py``): a failed UFFDIO_API zeroes the whole struct, and the
second UFFDIO_API fails the same way.

One `Waiter` exists per *blocked fault* (threads, never pages); waiters that were read are
indexed by page address so a wake over a small range is a few dict lookups.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fakekvm.abi import mman
from fakekvm.fake.uffd import _uapi as U

PAGE_SIZE = mman.PAGE_SIZE
PAGE_MASK = ~(PAGE_SIZE - 1)
#: x86-64 TASK_SIZE_MAX (47-bit user space)
TASK_SIZE = (1 << 47) - PAGE_SIZE

_pack_pf = U.uffd_msg_pagefault_fmt.pack
_MSG = U.UFFD_MSG_SIZE


class Waiter:
    """One thread blocked in ``handle_userfault`` (``struct userfaultfd_wait_queue``)."""

    __slots__ = ("address", "msg", "page", "read", "tid", "woken", "wq")

    def __init__(self, address: int, msg: bytes, tid: int, wq: Any = None) -> None:
        self.address = address  # the faulting address, for wake ranges
        self.page = address & PAGE_MASK
        self.msg = msg
        self.tid = tid
        self.read = False
        self.woken = False
        #: what the faulting thread sleeps on (a fakekvm.fake.waits.WaitQueue; opaque here)
        self.wq = wq


@dataclass(slots=True)
class Event:
    """A non-cooperative event (REMOVE, UNMAP, REMAP) waiting to be read."""

    msg: bytes
    done: bool = False
    #: no thread waits for it (an injected event): reading it ends mmap_changing itself
    detached: bool = False


@dataclass(slots=True)
class Injections:
    """Deterministic fault-injection knobs (all off by default).

    * ``eagain``: the next N resolution ioctls (COPY, ZEROPAGE, CONTINUE, POISON, MOVE,
      WRITEPROTECT) fail with EAGAIN and their output field -EAGAIN, as while an event is unread;
    * ``remove_before_fault``: the next N page faults are preceded by a REMOVE event for their
      page (the race "a vCPU's PAGEFAULT arrives with the REMOVE that caused it"; the kernel
      reads faults first, so the handler sees the PAGEFAULT, gets EAGAIN, must read the REMOVE);
    * ``eexist_race``: the next N resolution ioctls aimed at a page some thread sleeps on find
      the page already installed by "someone else" without a wake (EEXIST; the waiter stays
      asleep until the handler issues UFFDIO_WAKE) — the lost-wake race of real handlers;
    * ``owner_dead``: the owning process is gone: resolution ioctls fail ESRCH with the output
      field unwritten, MOVE fails EINVAL (cross-mm), blocked faulters end with SIGBUS.
    """

    eagain: int = 0
    remove_before_fault: int = 0
    eexist_race: int = 0
    owner_dead: bool = False


@dataclass(slots=True)
class UffdState:
    """A context's state; every method is pure (the caller holds the context's lock)."""

    flags: int
    available: int = U.UFFD_API_FEATURES
    features: int = 0
    initialized: bool = False
    released: bool = False
    mmap_changing: int = 0
    pending: deque[Waiter] = field(default_factory=deque)
    waiting: dict[int, list[Waiter]] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=deque)
    inject: Injections = field(default_factory=Injections)

    # -- UFFDIO_API ----------------------------------------------------------------------------
    def api(self, api: int, features: int) -> tuple[int, int]:
        """Negotiate; returns (features, ioctls) to write back. Raises EINVAL (caller zeroes)."""
        if api != U.UFFD_API:
            raise OSError(errno.EINVAL, f"UFFDIO_API: api {api:#x} != UFFD_API")
        if features & U.UFFD_FEATURE_WP_ASYNC:
            features |= U.UFFD_FEATURE_WP_UNPOPULATED
        if features & ~self.available:
            raise OSError(errno.EINVAL, f"UFFDIO_API: unsupported features {features & ~self.available:#x}")
        if self.initialized:
            raise OSError(errno.EINVAL, "UFFDIO_API: already done on this userfaultfd")
        self.features = features
        self.initialized = True
        return self.available, U.UFFD_API_IOCTLS

    # -- argument checks -------------------------------------------------------------------------
    @staticmethod
    def validate_range(start: int, length: int, what: str) -> None:
        """``validate_range``: page-aligned start and len, len > 0, inside the user space."""
        if start & ~PAGE_MASK or length & ~PAGE_MASK or not length or start >= TASK_SIZE or length > TASK_SIZE - start:
            raise OSError(errno.EINVAL, f"{what}: bad range {start:#x}+{length:#x}")

    def changing(self) -> bool:
        """Should a resolution ioctl fail EAGAIN now (an event unread, or injected)?"""
        if self.mmap_changing:
            return True
        if self.inject.eagain:
            self.inject.eagain -= 1
            return True
        return False

    # -- faults -------------------------------------------------------------------------------------
    def fault_msg(self, address: int, reason: int, tid: int, page_size: int = PAGE_SIZE) -> bytes:
        """``userfault_msg``: the 32-byte PAGEFAULT message for a fault at ``address``."""
        feats = self.features
        addr = address if feats & U.UFFD_FEATURE_EXACT_ADDRESS else address & ~(page_size - 1)
        ptid = tid & 0xFFFFFFFF if feats & U.UFFD_FEATURE_THREAD_ID else 0
        return _pack_pf(U.UFFD_EVENT_PAGEFAULT, reason, addr, ptid)

    def add_fault(self, w: Waiter) -> None:
        self.pending.append(w)

    def drop_fault(self, w: Waiter) -> None:
        """Forget a waiter that stops waiting without a wake (it found its page on re-check)."""
        if w.read:
            lst = self.waiting.get(w.page)
            if lst is not None and w in lst:
                lst.remove(w)
                if not lst:
                    del self.waiting[w.page]
        else:
            try:
                self.pending.remove(w)
            except ValueError:
                pass

    def wake(self, start: int, length: int) -> list[Waiter]:
        """``wake_userfault``: wake waiters whose address is in [start, start+len) (len 0: all).

        Returns the waiters woken; they leave both queues (so an unread one is never read).
        """
        woken: list[Waiter] = []
        end = start + length
        if self.pending:
            keep: deque[Waiter] = deque()
            for w in self.pending:
                if not length or start <= w.address < end:
                    w.woken = True
                    woken.append(w)
                else:
                    keep.append(w)
            if woken:
                self.pending = keep
        waiting = self.waiting
        if not waiting:
            return woken
        if length and length <= 64 * PAGE_SIZE:
            pages = range(start & PAGE_MASK, end, PAGE_SIZE)
            keys = [p for p in pages if p in waiting]
        else:
            keys = [p for p in waiting if not length or start - PAGE_SIZE < p < end]
        for p in keys:
            lst = waiting[p]
            rest = []
            for w in lst:
                if not length or start <= w.address < end:
                    w.woken = True
                    woken.append(w)
                else:
                    rest.append(w)
            if rest:
                waiting[p] = rest
            else:
                del waiting[p]
        return woken

    def waiters_in(self, start: int, end: int) -> bool:
        """Is some unwoken fault waiting on an address in [start, end)?"""
        if any(start <= w.address < end for w in self.pending):
            return True
        return any(start <= w.address < end for lst in self.waiting.values() for w in lst)

    def blocked_tids(self) -> set[int]:
        s = {w.tid for w in self.pending}
        for lst in self.waiting.values():
            s.update(w.tid for w in lst)
        return s

    # -- events ---------------------------------------------------------------------------------------
    def add_event(self, msg: bytes, *, detached: bool = False) -> Event:
        """Queue a non-cooperative event; mmap_changing stays raised until it is read and done."""
        ev = Event(msg, detached=detached)
        self.mmap_changing += 1
        self.events.append(ev)
        return ev

    def has_msgs(self) -> bool:
        return bool(self.pending or self.events)

    def pop_msg(self) -> bytes | None:
        """One message as ``userfaultfd_ctx_read`` picks it: the oldest fault, else the oldest event."""
        if self.pending:
            w = self.pending.popleft()
            w.read = True
            self.waiting.setdefault(w.page, []).append(w)
            return w.msg
        if self.events:
            ev = self.events.popleft()
            ev.done = True
            if ev.detached:
                self.mmap_changing -= 1
            return ev.msg
        return None

    def read(self, n: int) -> bytes:
        """Up to ``n // 32`` messages without blocking (b"" when none are queued)."""
        if n < _MSG:
            raise OSError(errno.EINVAL, f"read: buffer of {n} bytes is smaller than a uffd_msg")
        out = []
        while n >= _MSG:
            m = self.pop_msg()
            if m is None:
                break
            out.append(m)
            n -= _MSG
        return b"".join(out)

    def poll(self, nonblock: bool) -> int:
        """``userfaultfd_poll``: POLLERR before the handshake and on a blocking fd, else POLLIN if queued."""
        if not self.initialized or not nonblock:
            return mman.POLLERR
        return mman.POLLIN if (self.pending or self.events) else 0

    def release(self) -> list[Waiter]:
        """The last fd closed: wake every fault, complete every event, drop unread messages."""
        self.released = True
        woken = self.wake(0, 0)
        for ev in self.events:
            ev.done = True
        self.events.clear()
        self.mmap_changing = 0
        return woken


def remove_msg(event: int, start: int, end: int) -> bytes:
    """A REMOVE or UNMAP message (``arg.remove``: start, end)."""
    return U.uffd_msg_fmt.pack(event, 0, 0, 0, start, end, 0)


def remap_msg(old: int, new: int, length: int) -> bytes:
    return U.uffd_msg_fmt.pack(U.UFFD_EVENT_REMAP, 0, 0, 0, old, new, length)


def register_ioctls(mode: int, basic: bool) -> int:
    """The ``ioctls`` mask UFFDIO_REGISTER writes back (``userfaultfd_register``)."""
    out = U.UFFD_API_RANGE_IOCTLS_BASIC if basic else U.UFFD_API_RANGE_IOCTLS
    if not mode & U.UFFDIO_REGISTER_MODE_WP:
        out &= ~(1 << U._UFFDIO_WRITEPROTECT)
    if not mode & U.UFFDIO_REGISTER_MODE_MINOR:
        out &= ~(1 << U._UFFDIO_CONTINUE)
    return out
