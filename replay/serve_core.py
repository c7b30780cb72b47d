"""The matching core of `replay.serve.ReplayKernel`: its state, and the path every call takes.

`ServeCore` (the base class of `ReplayKernel`) holds what a serve run knows: the trace's
calls split by `replay.serve_model.ServeModel` into ordered ones (given to a
`replay.match.Matcher`) and timing-dependent ones (answered by the model), the live fds'
kinds, the live mappings, and one lock and condition every waiting call uses. A live call is
described as a `LiveCall` (`_live`), matched (`_match`: the recorded call, or a
`ReplayDivergence`), booked (`_matched`: created fds' kinds, eventfds and uffd registrations
told to the model) and answered (`_raise`, `_out`). A call that must wait for the live run
to catch up waits at most ``patience`` seconds (`_wait`), then is a divergence (`_stuck`):
never a silent hang. The end of a run: `pending`, `unfinished`, `shutdown`.
`ReplayDivergence` and `created_kinds` are re-exported by `replay.serve`.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fakekvm.kernel.mapping import Mapping
from fakekvm.kernel.real import RealKernel
from fakekvm.kernel.seam import Kernel
from replay.events import Call, Event, Header
from replay.match import AddressMap, Divergence, LiveCall, Matcher, creates_fd
from replay.serve_fills import ModelDivergence
from replay.serve_model import ServeModel

__all__ = ["ReplayDivergence", "ServeCore", "created_kinds"]

_TEARDOWN = frozenset({"close", "munmap"})
#: recorded calls a live run need not make: teardown, and clock reads (answered while there)
_NOT_OWED = _TEARDOWN | {"monotonic_ns"}


class ReplayDivergence(OSError):
    """The engine made a call the trace does not have; ``str()`` is the decoded report."""

    def __init__(self, divergence: Divergence) -> None:
        super().__init__(errno.EPROTO, divergence.report())
        self.divergence = divergence

    def __str__(self) -> str:
        return str(self.strerror)


def _infer_kind(c: Call) -> str:
    """The fd_kind of the fd a call creates, when the trace never uses that fd."""
    if c.op == "open":
        path = c.inp.decode("utf-8", "replace")
        return {"/dev/kvm": "kvm", "/dev/userfaultfd": "dev-userfaultfd"}.get(path, "file")
    if c.op in ("userfaultfd", "eventfd"):
        return c.op
    if c.op == "memfd_create":
        return "memfd"
    return {
        "KVM_CREATE_VM": "kvm-vm",
        "KVM_CREATE_GUEST_MEMFD": "guest_memfd",
        "USERFAULTFD_IOC_NEW": "userfaultfd",
        "KVM_CREATE_VCPU": f"kvm-vcpu:{c.iarg}",
    }.get(c.name, "")


def created_kinds(calls: Sequence[Call]) -> dict[int, str]:
    """index of each fd-creating call -> the fd_kind the trace gives that fd later."""
    out: dict[int, str] = {}
    open_: dict[int, int] = {}  # fd -> index of the call that created it, kind unknown yet
    for i, c in enumerate(calls):
        if c.fd >= 0 and c.fd in open_ and c.fd_kind:
            out[open_.pop(c.fd)] = c.fd_kind
        if c.op == "close" and c.fd in open_:
            open_.pop(c.fd)
        if not c.errno and c.ret >= 0 and creates_fd(c.op, c.name):
            if c.ret in open_:
                out[open_[c.ret]] = _infer_kind(calls[open_[c.ret]])
            open_[c.ret] = i
    for fd_idx in open_.values():
        out[fd_idx] = _infer_kind(calls[fd_idx])
    return out


class ServeCore(Kernel):
    """The state and the matching path of `ReplayKernel` (see the module docstring).

    ``patience``: the longest a call waits for the live run to catch up with the recording
    (a fault's page to be filled, a message to become deliverable, a poll to become ready)
    before it is reported as a divergence.
    """

    def __init__(
        self, header: Header, events: Iterable[Event], *, window: int = 64, patience: float = 30.0
    ) -> None:
        self.header = header
        calls = [e for e in events if isinstance(e, Call)]
        self.model = ServeModel(calls, page_size=header.host.page_size or 4096)
        self.matcher = Matcher(self.model.ordered, window=window)
        self.patience = patience
        self._kind_of_created = created_kinds(calls)
        self._index = {id(c): i for i, c in enumerate(calls)}
        self.kinds: dict[int, str] = {}  #: live fd -> fd_kind
        self._runs: dict[int, Mapping] = {}  #: vCPU fd -> its kvm_run mapping
        #: vCPU fd -> (offset, length) in kvm_run of the data the VMM answers the last exit with
        self._answer: dict[int, tuple[int, int]] = {}
        self._maps: dict[int, int] = {}  #: live address -> length (what we mapped)
        self._memfds: dict[int, int] = {}  #: recorded memfd/guest_memfd -> a real memfd
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._real = RealKernel()
        self._now = calls[0].t_ns if calls else 0
        self.divergence: ReplayDivergence | None = None
        self._closed = False
        self._main_thread = -1  #: native id of the live thread that made the first call
        self._extra: set[int] = set()  #: live addresses of workers' unrecorded buffers
        #: set at the first divergence (for a watcher: the engine may swallow the error)
        self.diverged = threading.Event()

    @property
    def addresses(self) -> AddressMap:
        return self.matcher.addresses

    # -- the one path every ordered call takes ------------------------------------------------
    def _live(self, op: str, fd: int = -1, **kw: Any) -> LiveCall:
        kind = self.kinds.get(fd, "") if fd >= 0 else ""
        me = threading.get_native_id()
        if self._main_thread < 0:
            self._main_thread = me  # the thread of the first call: setup and teardown
        return LiveCall(op=op, fd=fd, fd_kind=kind, tid=me, **kw)

    def _diverge(self, d: Divergence) -> ReplayDivergence:
        """The error to raise for ``d`` (the first one is kept); call with the lock held."""
        err = ReplayDivergence(d)
        if self.divergence is None:
            self.divergence = err
            self.diverged.set()
            self._cond.notify_all()
        return err

    def _model_divergence(self, e: ModelDivergence, live: LiveCall) -> ReplayDivergence:
        return self._diverge(Divergence(e.reason, live, e.expected, self.matcher._recent))

    def _match(self, op: str, fd: int = -1, *, lenient: bool = False, **kw: Any) -> Call | None:
        live = self._live(op, fd, **kw)
        with self._lock:
            try:
                rec = self.matcher.match(live)
            except Divergence as d:
                if lenient:
                    return None
                if self.divergence is not None and op in _TEARDOWN:
                    # after a divergence, let the engine release what it holds
                    return Call(seq=-1, tid=live.tid, t_ns=self._now, dur_ns=0, op=op, fd=fd)
                raise self._diverge(d) from None
            self._matched(rec)
        return rec

    def _matched(self, rec: Call) -> None:
        """Bookkeeping after ``rec`` answered a live call (lock held)."""
        self._now = max(self._now, rec.t_ns + rec.dur_ns)
        if not rec.errno and rec.ret >= 0 and creates_fd(rec.op, rec.name):
            idx = self._index[id(rec)]
            self.kinds[rec.ret] = self._kind_of_created.get(idx, "")
            if rec.op == "eventfd":
                self.model.eventfd_created(rec.ret, rec.iarg or 0)
        elif rec.name == "KVM_CREATE_DEVICE" and not rec.errno and len(rec.out) >= 8:
            self.kinds[struct.unpack_from("<I", rec.out, 4)[0]] = "kvm-device"
        elif rec.name in ("UFFDIO_REGISTER", "UFFDIO_UNREGISTER") and not rec.errno:
            start, length = struct.unpack_from("<QQ", rec.inp)
            if rec.name == "UFFDIO_REGISTER":
                self.model.registered(rec.fd, start, length)
            else:
                self.model.unregistered(rec.fd, start, length)
        self._cond.notify_all()

    @staticmethod
    def _raise(rec: Call) -> None:
        if rec.errno:
            raise OSError(rec.errno, f"{rec.name or rec.op}: {os.strerror(rec.errno)} (replayed)")

    def _call(self, op: str, fd: int = -1, **kw: Any) -> Call:
        rec = self._match(op, fd, **kw)
        assert rec is not None
        self._raise(rec)
        return rec

    def _out(self, rec: Call) -> bytes:
        return self.addresses.bytes_a_to_b(rec.out) if rec.out else b""

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait (lock held) until ``ready()``; False on timeout. Raises after a divergence."""
        t = self.patience if timeout is None else timeout
        ok = self._cond.wait_for(lambda: self.divergence is not None or self._closed or ready(), t)
        if self.divergence is not None:
            raise OSError(errno.EPROTO, "replay stopped: the run diverged from the trace")
        if self._closed:
            raise OSError(errno.EBADF, "replay stopped: the ReplayKernel was shut down")
        return ok

    def _stuck(self, live: LiveCall, why: str, expected: Call | None = None) -> ReplayDivergence:
        return self._diverge(
            Divergence(
                f"stuck for {self.patience:g} s: {why}", live, expected, self.matcher._recent
            )
        )

    # -- the end of a run -----------------------------------------------------------------
    def pending(self) -> list[Call]:
        """Recorded ordered calls the live run has not made (yet)."""
        with self._lock:
            return self.matcher.pending()

    def unfinished(self) -> list[str]:
        """What the live run left undone: ordered calls not made (teardown aside), the
        model's coverage, undelivered messages, final attributes (empty: nothing)."""
        with self._lock:
            left = [c for c in self.matcher.pending() if c.op not in _NOT_OWED]
            out = self.model.finish()
        if left:
            from replay.show import format_call

            out.insert(
                0,
                f"{len(left)} recorded call(s) not made; the first: #{left[0].seq} "
                f"[{left[0].tid}] {format_call(left[0])}",
            )
        return out

    def shutdown(self) -> None:
        """Release the live memory; a call still waiting for the trace fails (EBADF)."""
        with self._lock:
            self._closed = True
            maps, self._maps = self._maps, {}
            self._runs.clear()
            memfds, self._memfds = self._memfds, {}
            self._cond.notify_all()
        for address, length in maps.items():
            self._real.munmap(address, length)
        for real in memfds.values():
            os.close(real)
