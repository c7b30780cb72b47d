"""A virtio-balloon storm on the post-copy destination: REMOVE events and refaults while pages arrive.

What is modelled (``fakekvm migrate --workload balloon``): a guest whose vCPUs run the hot-set
toucher over their share of memory (its working set) and give the pages they never touch to a
balloon. On the destination, while the guest runs and pages are still arriving, the VMM's
balloon device *inflates* -- ``madvise(MADV_DONTNEED)`` over guest ranges the guest gave up
(anonymous memory, ``uffd-missing``), or ``madvise(MADV_REMOVE)`` for memory that is a shared
memfd mapping (``uffd-minor``), which is what QEMU's ``ram_block_discard_range`` does for each
kind -- and *deflates*: the guest takes the pages back and touches them again (a refault).
A storm is many such rounds back to back: round r+1 inflates while round r's refaults are still
being resolved, overlapping the engine's in-flight demand requests and background placement.

Kernel semantics this leans on (``fs/userfaultfd.c`` ``userfaultfd_remove``,
``Documentation/admin-guide/mm/userfaultfd.rst``, uapi.md §5):

* every such ``madvise`` over a registered range of a context with ``UFFD_FEATURE_EVENT_REMOVE``
  raises one ``UFFD_EVENT_REMOVE`` (clipped to the VMA) *before* the pages go, and the caller
  sleeps until the monitor has read it;
* while a REMOVE is unread every resolution ioctl (``UFFDIO_COPY``/``ZEROPAGE``/``CONTINUE``/
  ``WAKE``) fails ``EAGAIN`` with zero progress: the engine must read the event and retry, never
  fail the migration;
* after REMOVE the page's content is gone: the guest promised not to care (balloon pages).
  A refault of a removed page must still be resolved: a zero page is correct for anonymous
  memory (the engine answers ``UFFDIO_ZEROPAGE`` for a page it had placed before); a page the
  background push copies in *after* the REMOVE holds the source's bytes instead -- equally
  correct, since nobody may rely on a ballooned page's content;
* so the final memory check cannot compare ballooned pages with the source: they are excluded
  explicitly (:attr:`BalloonStorm.ballooned`, one bit a page) and counted in the summary.

QEMU inhibits the balloon during post-copy (``postcopy_ram_incoming_setup`` ->
``postcopy_balloon_inhibit(true)``; ``qemu_balloon_is_inhibited``): a discard on the destination
would race the incoming pages, and on the *source* a discarded page would be re-sent as zeros
over a page the destination already placed. We model the storm anyway: other VMMs (and
free-page-reporting or guest-initiated ``MADV_DONTNEED`` through a vhost-user backend, and any
non-cooperative userfaultfd monitor) do see REMOVE during post-copy, and every rule above is one
real handlers get wrong (anchors.md, last list). The storm is confined to pages the guest never
touches, so the vCPUs' reports still check out.

How it is driven: :class:`BalloonKernel` wraps the destination's `Kernel` -- the engine keeps
talking to a plain `Kernel` and does not know. It learns guest memory from the engine's own
``UFFDIO_REGISTER`` (and whether it is a shared mapping from the ``mmap`` that made it), starts
the storm at the first ``KVM_RUN`` (the guest is running), and holds the engine's
``UFFDIO_UNREGISTER`` (``mechanism.complete()``) until the storm has ended, so that every round
happens while post-copy is live. Inflation is ``madvise`` through the seam; the refault is a
host read of the page as the guest would do it (on the fake through its mm's fault path, on the
real kernel a ``memcpy`` with the GIL released), so it runs on the fake and on the real kernel.
Page choice is seeded (:func:`plan_rounds`): same options, same storm.
"""

from __future__ import annotations

import ctypes
import errno
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fakekvm.abi import kvm, mman, uffd
from fakekvm.guests import layout
from fakekvm.guests import workloads as w
from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.seam import ForwardingKernel, IoctlArg, Kernel

#: mechanisms the storm supports (guest memory registered on a userfaultfd with EVENT_REMOVE)
MECHANISMS = ("uffd-missing", "uffd-minor")
#: defaults of ``--balloon-rounds`` / ``--balloon-pages`` (what deterministic replays use)
ROUNDS = 16
PAGES_PER_ROUND = 32
#: the longest run of contiguous pages one ``madvise`` covers
CHUNK = 8
#: ``UFFDIO_UNREGISTER`` waits for the storm while it makes progress; a storm with no madvise
#: and no refault done for this long (seconds; virtual in the deterministic mode) has stalled:
#: nobody reads its REMOVE events or resolves its refaults (a dead fault thread, an engine
#: bug) -- a `BalloonError`, and the unregister goes on
STALL_S = 5
#: how long ``munmap`` of guest memory waits for the storm's threads to leave it (seconds)
JOIN_TIMEOUT_S = 10.0


class BalloonError(RuntimeError):
    """The storm itself failed (a madvise or a refault the kernel refused)."""


# -- the plan (pure) --------------------------------------------------------------------------


def eligible_pages(mem_size: int, vcpus: int, seed: int) -> bytearray:
    """One byte a guest page: 1 where the balloon may inflate (the ``balloon`` workload's
    guest never touches it). Mirrors `postcopy.migrate.prepare_source` for that workload:
    vCPU i runs the hot-set toucher over its share with seed ``seed + i``."""
    from postcopy.migrate import shares

    nr = mem_size // layout.PAGE
    out = bytearray(nr)
    first = layout.DATA_BASE // layout.PAGE
    out[first:] = b"\x01" * (nr - first)
    for i, (base, size) in enumerate(shares(mem_size, vcpus)):
        p = w.TouchParams(base, size, w.Pattern.HOTSET, seed=seed + i)
        b0 = base // layout.PAGE
        touched = w.touched_pages(p)
        for j in range(len(touched)):
            if touched[j]:
                out[b0 + j] = 0
    return out


def plan_rounds(
    eligible: bytes | bytearray, rounds: int, pages: int, seed: int, chunk: int = CHUNK
) -> list[list[tuple[int, int]]]:
    """Each round's inflations: ``(first page, count)`` runs of eligible pages, about
    ``pages`` pages a round in runs of 1..``chunk``, drawn from ``seed``. Rounds may overlap
    (a page ballooned twice) -- storms do."""
    idx = [i for i, e in enumerate(eligible) if e]
    if not idx or rounds <= 0 or pages <= 0:
        return [[] for _ in range(max(rounds, 0))]
    rng = random.Random(seed * 1_000_003 + 0xBA11)
    out: list[list[tuple[int, int]]] = []
    for _ in range(rounds):
        runs: list[tuple[int, int]] = []
        left = pages
        while left > 0:
            start = idx[rng.randrange(len(idx))]
            n = 1
            want = min(left, rng.randint(1, chunk))
            while n < want and start + n < len(eligible) and eligible[start + n]:
                n += 1
            runs.append((start, n))
            left -= n
        runs.sort()
        merged: list[tuple[int, int]] = []
        for s, n in runs:  # overlapping draws within a round become one madvise
            if merged and s <= merged[-1][0] + merged[-1][1]:
                ps, pn = merged[-1]
                merged[-1] = (ps, max(pn, s + n - ps))
            else:
                merged.append((s, n))
        out.append(merged)
    return out


@dataclass
class StormStats:
    rounds: int = 0
    #: madvise calls (each raises one UFFD_EVENT_REMOVE on a registered range)
    inflations: int = 0
    pages_inflated: int = 0
    refaults: int = 0
    #: time the refaulting thread spent in its accesses (a refault waits for the engine)
    refault_ns_total: int = 0
    refault_ns_max: int = 0
    #: distinct pages ever ballooned (excluded from the memory check)
    ballooned: int = 0
    #: storm started at the first KVM_RUN (False: at UFFDIO_UNREGISTER, the guest never ran)
    started_on_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# -- the refault: a read of guest memory as the guest would do it ------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcpy.restype = ctypes.c_void_p


def guest_touch(k: Kernel, address: int) -> int:
    """Read one byte at ``address`` the way the guest's access would, blocking while the
    destination resolves the fault; returns the byte.

    On the fake the access must go through its mm (where userfaultfd lives): a kernel in the
    wrapper chain with ``touch`` (the deterministic mode's serialising kernel) or ``mm`` (the
    fake itself). On the real kernel the MMU does it: ``memcpy`` through ctypes, which drops
    the GIL, so the engine's fault thread (Python) can resolve the fault meanwhile."""
    obj: Any = k
    while obj is not None:
        d = getattr(obj, "__dict__", {})
        if callable(getattr(type(obj), "touch", None)):
            r = obj.touch(address, False)
            break
        if "mm" in d or hasattr(type(obj), "mm"):
            r = obj.mm.touch(address, False)
            break
        obj = d.get("inner")
    else:
        b = ctypes.c_ubyte()
        _libc.memcpy(ctypes.addressof(b), address, 1)
        return b.value
    if int(r) != 0:
        raise OSError(errno.EFAULT, f"balloon refault at {address:#x}: {r!r}")
    return ctypes.string_at(address, 1)[0]


# -- the storm, behind the engine's kernel -----------------------------------------------------


class BalloonStorm:
    """The storm's state: the plan, the ballooned-page bitmap, counters, errors."""

    def __init__(self, plan: list[list[tuple[int, int]]], nr_pages: int) -> None:
        self.plan = plan
        self.nr_pages = nr_pages
        #: one bit a page: ever inside an inflated range
        self.ballooned = bytearray((nr_pages + 7) // 8)
        self.stats = StormStats()
        self.errors: list[BaseException] = []

    @classmethod
    def for_options(cls, o: Any) -> BalloonStorm | None:
        """The storm a `MigrateOptions` asks for (None unless ``workload == "balloon"``)."""
        if o.workload != "balloon":
            return None
        if o.mechanism not in MECHANISMS or o.huge:
            raise ValueError(
                f"the balloon storm needs a userfaultfd mechanism with REMOVE events "
                f"({', '.join(MECHANISMS)}, 4 KiB pages); not {o.mechanism}{' --huge' if o.huge else ''}"
            )
        rounds = getattr(o, "balloon_rounds", ROUNDS)
        pages = getattr(o, "balloon_pages", PAGES_PER_ROUND)
        el = eligible_pages(o.mem_size, o.vcpus, o.seed)
        return cls(plan_rounds(el, rounds, pages, o.seed), o.mem_size // layout.PAGE)

    def mark(self, start: int, count: int) -> None:
        b = self.ballooned
        for p in range(start, start + count):
            if not b[p >> 3] & (1 << (p & 7)):
                b[p >> 3] |= 1 << (p & 7)
                self.stats.ballooned += 1

    def is_ballooned(self, page: int) -> bool:
        return bool(self.ballooned[page >> 3] & (1 << (page & 7)))

    def check(self) -> None:
        """Raise the storm's first error, if any."""
        if self.errors:
            e = self.errors[0]
            raise BalloonError(f"balloon storm failed: {type(e).__name__}: {e}") from e

    def wrap(self, kernel: Kernel) -> BalloonKernel:
        return BalloonKernel(kernel, self)


class BalloonKernel(ForwardingKernel):
    """The destination's kernel with a balloon device behind it (see the module docstring)."""

    def __init__(self, inner: Kernel, storm: BalloonStorm) -> None:
        super().__init__(inner)
        self.storm = storm
        self._maps: list[tuple[int, int, int]] = []  # (address, length, flags) of mmaps
        self._base = -1
        self._length = 0
        self._advice = mman.MADV_DONTNEED
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: deque[list[tuple[int, int]] | None] = deque()
        self._started = False
        self._stopping = False  # guest memory is going away: the storm stops where it is
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    def __getattr__(self, name: str) -> Any:
        # a recorder's stop_recording, a fake's mm, ...: the wrapped kernel's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- what the engine does ---------------------------------------------------------------
    def mmap(
        self, fd: int, length: int, prot: int, flags: int, offset: int = 0, address: int = 0
    ) -> Mapping:
        m = self.inner.mmap(fd, length, prot, flags, offset, address)
        self._maps.append((m.address, m.length, flags))
        return m

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        if request == uffd.UFFDIO_REGISTER and self._base < 0:
            start, length = uffd.uffdio_register_fmt.unpack_from(bytes(arg))[:2]  # type: ignore[arg-type]
            r = self.inner.ioctl(fd, request, arg)
            self._guest_memory(start, length)
            return r
        if request == kvm.KVM_RUN and not self._started:
            self._start(on_run=True)
        elif request == uffd.UFFDIO_UNREGISTER and self._base >= 0:
            self._start(on_run=False)
            self._hold()
        return self.inner.ioctl(fd, request, arg)

    def _hold(self) -> None:
        """Wait for the storm to end (see `STALL_S`)."""
        st = self.storm.stats
        last, idle = (-1, -1), 0
        while not self._done.wait(1.0):
            now = (st.inflations, st.refaults)
            idle = idle + 1 if now == last else 0
            last = now
            if idle >= STALL_S:
                self.storm.errors.append(
                    TimeoutError(
                        f"stalled for {STALL_S} s after {st.inflations} madvise calls and "
                        f"{st.refaults} refaults: REMOVE unread or a refault unresolved"
                    )
                )
                return

    def munmap(self, address: int, length: int) -> None:
        """Guest memory goes (``mechanism.disarm``): the storm's threads must be out of it
        first -- on the real kernel a refault of unmapped memory is a SIGSEGV of the process.
        In a migration that went well the storm ended long ago; in one that failed, the
        userfaultfd is closed by now, which wakes whatever the storm was blocked in."""
        if (
            self._base >= 0
            and address < self._base + self._length
            and self._base < address + length
        ):
            self._stopping = True
            for th in self._threads:
                th.join(JOIN_TIMEOUT_S)
            if any(th.is_alive() for th in self._threads):
                self.storm.errors.append(
                    TimeoutError("a balloon thread is still in guest memory at its munmap")
                )
                return  # leave the memory mapped rather than crash the process
        self.inner.munmap(address, length)

    def _guest_memory(self, start: int, length: int) -> None:
        self._base, self._length = start, length
        for a, n, flags in self._maps:
            if a <= start < a + n and flags & mman.MAP_SHARED:
                self._advice = mman.MADV_REMOVE  # shmem/memfd: punch the page-cache pages
        if length // layout.PAGE < self.storm.nr_pages:
            self.storm.errors.append(
                ValueError(
                    f"registered {length:#x} bytes, the storm plans {self.storm.nr_pages} pages"
                )
            )

    def _start(self, *, on_run: bool) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self.storm.stats.started_on_run = on_run
        if self._base < 0 or self.storm.errors:
            self._done.set()
            return
        for target, name in (
            (self._inflate, "balloon-inflate"),
            (self._refault, "balloon-refault"),
        ):
            th = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(th)
            th.start()

    # -- the storm's two threads --------------------------------------------------------------
    def _inflate(self) -> None:
        st, ps = self.storm, layout.PAGE
        try:
            for ranges in st.plan:
                for start, count in ranges:
                    if self._stopping:
                        return
                    # raises UFFD_EVENT_REMOVE; sleeps until the engine has read it
                    self.inner.madvise(self._base + start * ps, count * ps, self._advice)
                    with self._lock:
                        st.mark(start, count)
                        st.stats.inflations += 1
                        st.stats.pages_inflated += count
                with self._cv:  # deflate: the guest takes this round back (the other thread)
                    st.stats.rounds += 1
                    self._queue.append(ranges)
                    self._cv.notify_all()
        except BaseException as e:
            st.errors.append(e)
        finally:
            with self._cv:
                self._queue.append(None)
                self._cv.notify_all()

    def _refault(self) -> None:
        st, ps = self.storm, layout.PAGE
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: bool(self._queue))
                    ranges = self._queue.popleft()
                if ranges is None:
                    return
                for start, count in ranges:
                    for p in range(start, start + count):
                        if self._stopping:
                            return
                        t0 = time.monotonic_ns()
                        guest_touch(self.inner, self._base + p * ps)
                        dt = time.monotonic_ns() - t0
                        with self._lock:
                            st.stats.refaults += 1
                            st.stats.refault_ns_total += dt
                            st.stats.refault_ns_max = max(st.stats.refault_ns_max, dt)
        except BaseException as e:
            st.errors.append(e)
            with self._cv:  # let the inflater finish its rounds
                self._queue.clear()
        finally:
            self._done.set()


__all__ = [
    "BalloonError",
    "BalloonKernel",
    "BalloonStorm",
    "StormStats",
    "eligible_pages",
    "guest_touch",
    "plan_rounds",
]
