"""`RecorderRows`: how `replay.recorder.RecordingKernel` gathers its rows and hands them on.

A mixin of `RecordingKernel` (which sets every attribute declared below in its
``__init__``). A recorded call is one row (a tuple of the `replay.events.Call` fields but
``seq``) appended to a shared list without a lock (`_emit`, or inline on the fault path);
when a chunk's worth has gathered, the thread that filled it converts them (`_finish_rows`:
``seq``, the ioctl name, the ``struct pollfd`` arrays, the `Contents` of a ``UFFDIO_COPY``)
and hands them to the sink (`_deliver`): a `replay.format.TraceWriter` derives the chunk's
faults (`_derive`, its ``before_flush``) with `replay.faults.FaultTracker`; any other sink
gets each call, then the faults it resolves. `stop_recording` writes what is left and the
faults still waiting. The row layout and the fields are documented in `replay.recorder`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fakekvm.abi import kvm, names
from fakekvm.kernel.seam import Kernel
from replay.events import Call, Contents, Event, Fault
from replay.faults import FaultTracker
from replay.format import TraceWriter
from replay.recorder_setup import _ACTIVE

_POLLFD = struct.Struct("<iHH")
_NO_FD = ("", -1)
_REGIONS = frozenset({kvm.KVM_SET_USER_MEMORY_REGION, kvm.KVM_SET_USER_MEMORY_REGION2})


class Sink(Protocol):
    def append(self, event: Event, /) -> None: ...


class RecorderRows:
    """The rows of a `RecordingKernel`: appending, converting, delivering, stopping."""

    # set by `RecordingKernel.__init__` (see there)
    inner: Kernel
    sink: Sink
    with_contents: bool
    _secret: bool
    faults: FaultTracker
    fault_count: int
    closed: bool
    _seq: int
    _gettid: Callable[[], int]
    _tls: Any
    _now: Callable[[], int]
    _rows: list[Any]
    _flush_lock: threading.Lock
    _seq_of: dict[int, int] | None
    _writer: TraceWriter | None
    _chunk: int
    _fds: dict[int, tuple[str, int]]
    _runs: dict[int, tuple[int, int]]
    _answer: dict[int, tuple[int, int]]
    _names: dict[int, str]
    _polls: dict[tuple[Any, ...], tuple[bytes, bytes]]
    _tid_vcpu: dict[int, int]

    # -- recording -------------------------------------------------------------------------------

    def _emit(
        self,
        tid: int,
        t_ns: int,
        dur_ns: int,
        op: str,
        fd: int,
        fd_kind: str,
        vcpu: int,
        request: int,
        name: str,
        iarg: int | None,
        args: Sequence[int],
        inp: bytes,
        out: bytes,
        ret: int,
        err: int = 0,
    ) -> None:
        """Append a call given by all its fields but ``seq``."""
        rows = self._rows
        # no list in the row when there are no args: a row of atoms is untracked by the GC
        rows.append((tid, t_ns, dur_ns, op, fd, fd_kind, vcpu, request, name, iarg, args or (),
                     inp, out, ret, err))  # fmt: skip
        if len(rows) >= self._chunk:
            self._convert_ready()

    def _convert_ready(self) -> None:
        """Hand every whole chunk of rows gathered to the sink (the thread that finds the flush
        lock taken leaves its row to the thread holding it, which looks again before leaving)."""
        rows = self._rows
        chunk = self._chunk
        lock = self._flush_lock
        while len(rows) >= chunk:
            if not lock.acquire(False):
                return
            try:
                while len(rows) >= chunk and not self.closed:
                    batch = rows[:chunk]
                    del rows[:chunk]  # (appends meanwhile land after: untouched)
                    self._deliver(batch)
            finally:
                lock.release()
            if self.closed:
                return

    def _deliver(self, batch: list[Any]) -> None:
        """Finish the rows (pollfd arrays) and hand them to the sink."""
        events = self._finish_rows(batch)
        w = self._writer
        if w is not None:
            with w._lock:  # the writer derives the faults of the chunk in ``before_flush``
                if not w.closed:
                    w._buf.extend(events)
                    w._flush_locked()
            return
        put = self.sink.append
        feed = self.faults.feed
        for e in events:
            if type(e) is tuple:
                call = Call(*e[:11], list(e[11]), *e[12:])  # type: ignore[call-arg]
                put(call)
                if e[6] == "userfaultfd" or e[7] >= 0 or e[8] in _REGIONS:
                    faults = feed(call)
                    if faults:
                        self.fault_count += len(faults)
                        for f in faults:
                            put(f)
            else:
                put(e)

    def _finish_rows(self, batch: list[Any]) -> list[Any]:
        """Rows -> `Call` field tuples: ``seq`` (the position: trace order = the order the
        rows were appended in) goes in front; a ``poll`` row's ``inp`` holds the ``(fd,
        events)`` pairs and its ``out`` the result until here, where they become ``struct
        pollfd`` arrays (cached: a fault thread polls the same fds again and again); a
        `_PendingContents` gets the seq of its call."""
        polls = self._polls
        seq = self._seq
        seq_of = self._seq_of
        out: list[Any] = []
        add = out.append
        names = self._names
        name_of = self._name
        for r in batch:
            if type(r) is tuple:
                if seq_of is not None:
                    seq_of[id(r)] = seq
                if r[8] is None:  # an ioctl from the call path: its name; out only if changed
                    req = r[7]
                    o = r[12]
                    r = (*r[:8], names.get(req) or name_of(req), r[9], r[10], r[11],
                         b"" if o == r[11] else o, r[13], r[14])  # fmt: skip
                elif r[3] == "poll":
                    fds, res = r[11], r[12]
                    try:
                        io = polls.get((fds, *res))
                    except TypeError:  # (lists inside: not hashable)
                        io = _pollfds(fds, res)
                    if io is None:
                        io = _pollfds(fds, res)
                        if len(polls) >= 256:
                            polls.clear()
                        polls[(fds, *res)] = io
                    r = (*r[:11], io[0], b"" if r[14] else io[1], r[13], r[14])
                add((seq, *r))
                seq += 1
            elif type(r) is _PendingContents:
                assert seq_of is not None
                add(Contents(seq=seq_of.pop(id(r.call), -1), hva=r.hva, data=r.data))
            else:  # pragma: no cover - every row kind is above
                raise AssertionError(f"recorder: unknown row {r!r}")
        self._seq = seq
        if seq_of is not None and len(seq_of) > 4 * self._chunk + 64:
            seq_of.clear()  # (the calls of Contents still to come are the last few only)
        return out

    def _derive(self, events: list[Any]) -> list[Event]:
        """The faults resolved by a chunk's calls (the writer calls this before writing it)."""
        feed = self.faults.feed
        out: list[Event] = []
        for e in events:
            if type(e) is tuple and (e[6] == "userfaultfd" or e[7] >= 0 or e[8] in _REGIONS):
                faults = feed(Call(*e))  # (args may be a tuple here: the tracker ignores it)
                if faults:
                    out.extend(faults)
        self.fault_count += len(out)
        return out

    def _drain(self) -> None:
        """Convert and deliver every row gathered (the last chunk may be short)."""
        with self._flush_lock:
            rows = self._rows
            if self.closed or not rows:
                return
            batch = rows[:]
            del rows[: len(batch)]
            for i in range(0, len(batch), self._chunk):
                self._deliver(batch[i : i + self._chunk])

    def _hook_writer(self, w: TraceWriter) -> None:
        """The writer's own ``flush``/``close`` (a `TraceWriter` used as a context manager around
        the recorder) write the rows not yet converted first."""
        w_flush, w_close = w.flush, w.close

        def flush() -> None:
            self._drain()
            w_flush()

        def close() -> None:
            self._drain()
            w_close()

        w.flush = flush  # type: ignore[method-assign]
        w.close = close  # type: ignore[method-assign]

    @property
    def calls(self) -> int:
        """Calls recorded so far (with ``with_contents``: and their `Contents`)."""
        return self._seq + len(self._rows)

    def stop_recording(self) -> None:
        """Write the calls not yet written, append the faults still waiting, then close the sink
        (idempotent). The kernel stays usable; later calls are forwarded and no longer
        recorded."""
        with self._flush_lock:
            if self.closed:
                return
            rows = self._rows
            if rows:
                batch = rows[:]
                del rows[: len(batch)]
                for i in range(0, len(batch), self._chunk):
                    self._deliver(batch[i : i + self._chunk])
            self.closed = True
            self._rows = _Discard()
            self._chunk = 1 << 62
            w = self._writer
            if w is not None:
                with w._lock:
                    if not w.closed:
                        w._flush_locked()
                        pending: list[Fault] = self.faults.finish()
                        w._buf.extend(pending)
                        self.fault_count += len(pending)
            else:
                pending = self.faults.finish()
                for f in pending:
                    self.sink.append(f)
                self.fault_count += len(pending)
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()
        _ACTIVE.discard(self)

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        finally:
            self.stop_recording()

    def _kind(self, fd: int) -> tuple[str, int]:
        return self._fds.get(fd, _NO_FD)

    def _name(self, request: int) -> str:
        n = self._names.get(request)
        if n is None:
            n = self._names[request] = names.ioctl_name(request)
        return n


class _PendingContents:
    """A `Contents` whose call has no seq yet (it gets it when the chunk is written)."""

    __slots__ = ("call", "data", "hva")

    def __init__(self, call: tuple[Any, ...], hva: int, data: bytes) -> None:
        self.call, self.hva, self.data = call, hva, data


class _Discard(list[Any]):
    """Where rows go once recording stopped: nowhere."""

    def append(self, _row: Any, /) -> None:
        return None


def _pollfds(fds: Sequence[tuple[int, int]], res: Sequence[tuple[int, int]]) -> tuple[bytes, bytes]:
    """The ``struct pollfd`` arrays (``<iHH``) before and after a ``poll``."""
    rev = dict(res)
    inp = b"".join([_POLLFD.pack(fd, ev & 0xFFFF, 0) for fd, ev in fds])
    out = b"".join([_POLLFD.pack(fd, ev & 0xFFFF, rev.get(fd, 0) & 0xFFFF) for fd, ev in fds])
    return inp, out
