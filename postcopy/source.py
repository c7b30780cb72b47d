"""The post-copy source: serves a paused guest's memory and vCPU state.

The source half of QEMU post-copy (``migration/ram.c``, ``migration/migration.c``
with ``postcopy-preempt``): the destination opens a *demand* channel (page
requests and their replies; the vCPU state goes first on it) and a *bulk*
channel (background push, in the order of :class:`~postcopy.schedule.SendScheduler`).
Each channel has its own thread, so a requested page never queues behind bulk
data. Memory is anything with the buffer protocol — a
:class:`~fakekvm.kernel.mapping.Mapping` of the guest, or a saved image file
(:meth:`Source.from_image`, Firecracker-style snapshot restore) — and is sent
straight from it with ``sendmsg`` (no copy).

The demand thread can run with a short scheduler slice (``demand_slice_ns``) and
on a given CPU (``demand_cpu``: with the destination's faulting vCPU
on one host, no cross-CPU wake); the bulk thread's priority can be lowered
(``bulk_nice``, :func:`postcopy.threadprio.background`).

Requests are bounds-checked: a range outside guest memory is answered with
ERROR (``EFAULT``) and the source keeps serving. The source runs until the
destination says DONE (or BYE) or disconnects, then closes everything;
:meth:`Source.close` shuts down cleanly at any time, :meth:`Source.kill` drops
every connection with a reset (what a crashed source looks like). Once its
threads have ended, the source releases the one view it took of the caller's
memory (the caller may then close its ``mmap`` or resize its ``bytearray``).
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from postcopy import threadprio
from postcopy import transport as tp
from postcopy.pages import page_digests
from postcopy.protocol import (
    PAGES_DEMAND,
    Bye,
    Channel,
    Connection,
    Digest,
    DigestRequest,
    Done,
    Error,
    Event,
    Hello,
    NeedData,
    ProtocolError,
    Request,
    Role,
    VcpuState,
    encode,
    request_bounds_error,
)
from postcopy.schedule import Policy, SendScheduler

HANDSHAKE_TIMEOUT = 10.0
_RECV = 1 << 16


@dataclass
class SourceStats:
    start_ns: int = 0  # the demand channel's HELLO came in (clock: the ``clock`` given)
    end_ns: int = 0  # the migration ended
    pages_demand: int = 0
    pages_background: int = 0
    pages_resent: int = 0
    requests: int = 0
    errors_sent: int = 0
    bytes_sent: int = 0


class _Channel:
    """A transport with its protocol state and a receive buffer."""

    def __init__(self, t: tp.Transport, conn: Connection) -> None:
        self.t = t
        self.conn = conn
        self.buf = bytearray(_RECV)
        self.view = memoryview(self.buf)
        self.send_lock = threading.Lock()

    def send(self, ev: Event) -> None:
        with self.send_lock:
            self.t.send(self.conn.send(ev))

    def next_event(self) -> Event | None:
        """The next event; None at end of stream."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if not isinstance(ev, NeedData):
                return ev
            n = self.t.recv_into(self.view)
            conn.receive_data(self.view[:n])
            if n == 0:
                conn.next_event()  # raises if EOF came inside a frame
                return None


class Source:
    """Serves ``memory`` (``page_size`` pages) and per-vCPU state blobs.

    ``vcpu_states[i]`` is a sequence of blobs for vCPU ``i``; blob ``k`` is sent
    with kind ``k + 1`` (:class:`~postcopy.protocol.VcpuStateKind`: ``kvm_regs``
    then ``kvm_sregs``).
    """

    def __init__(
        self,
        memory: Any,
        vcpu_states: Sequence[Sequence[bytes]] = (),
        *,
        page_size: int = 4096,
        batch_pages: int = 1024,
        policy: Policy | str = Policy.SEQUENTIAL,
        trace: Iterable[int] | None = None,
        follow_demand: bool = True,
        clock: Callable[[], int] = time.monotonic_ns,
        bulk_nice: int = 0,
        demand_cpu: int | None = None,
        demand_slice_ns: int = 0,
        demand_rt: bool = False,
    ) -> None:
        #: the one view of the caller's image this source holds (every page sent is a
        #: slice of it, alive only while it is sent); released by :meth:`close`/:meth:`wait`
        self.memory = _flat_view(memory)
        if self.memory.nbytes % page_size:
            nbytes = self.memory.nbytes
            self.memory.release()  # the caller may close its image after the ValueError
            raise ValueError(f"memory of {nbytes} bytes is not whole {page_size} B pages")
        self.page_size = page_size
        self.nr_pages = self.memory.nbytes // page_size
        self.vcpu_states = [list(s) for s in vcpu_states]
        self.clock = clock
        #: the bulk sender's priority (:func:`postcopy.threadprio.background`)
        self.bulk_nice = bulk_nice
        #: pin the demand thread to this CPU index (None: leave it to the scheduler)
        self.demand_cpu = demand_cpu
        #: a short scheduler slice for the demand thread (0: the default), so that a
        #: request wakes it ahead of the bulk sender (:func:`threadprio.latency_sensitive`)
        self.demand_slice_ns = demand_slice_ns
        #: run the demand thread ``SCHED_FIFO`` (:func:`threadprio.realtime`)
        self.demand_rt = demand_rt
        self.sched = SendScheduler(
            self.nr_pages,
            batch_pages=batch_pages,
            policy=policy,
            trace=trace,
            follow_demand=follow_demand,
        )
        self.stats = SourceStats()
        self.session = secrets.randbits(63) | 1
        self.result: str | None = None  # "done", "disconnected", "closed", "killed", "error: ..."
        self.address: tp.Address | None = None
        self._lock = threading.Lock()  # scheduler + stats
        self._finished = threading.Event()  # the migration is over (any way)
        self._threads: list[threading.Thread] = []
        self._channels: list[_Channel] = []
        self._listener: socket.socket | None = None
        self._demand: _Channel | None = None
        self._bulk: _Channel | None = None
        self._owned: list[Any] = []  # objects to close at the end (image mmap, fd)
        self.bulk_started = threading.Event()  # the first background batch went out

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_image(
        cls, path: str | os.PathLike[str], vcpu_states: Sequence[Sequence[bytes]] = (), **kw: Any
    ) -> Source:
        """Serve a saved memory image (a file of the guest's bytes), mapped read-only."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            src = cls(m, vcpu_states, **kw)
        except BaseException:
            m.close()
            raise
        src._owned.append(m)
        return src

    # -- serving ---------------------------------------------------------------------
    def listen(self, address: tp.Address | None = None) -> tp.Address:
        """Listen (TCP 127.0.0.1, free port, by default; a str is a Unix socket path) and
        serve in the background. Returns the bound address."""
        sock = tp.listen(address)
        self._listener = sock
        self.address = sock.getsockname() if sock.family == socket.AF_INET else str(address)
        self._spawn(self._accept_loop, "postcopy-source-accept")
        return self.address

    def serve(self, demand: tp.Transport, bulk: tp.Transport | None = None) -> None:
        """Serve already-connected transports (e.g. :func:`~postcopy.transport.memory_pair`)."""
        self._spawn(lambda: self._handshake(demand), "postcopy-source-demand")
        if bulk is not None:
            self._spawn(lambda: self._handshake(bulk), "postcopy-source-bulk")

    def _spawn(self, fn: Callable[[], None], name: str) -> None:
        th = threading.Thread(target=self._guard(fn), name=name, daemon=True)
        with self._lock:
            self._threads.append(th)
        th.start()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except ConnectionError as e:
                self._finish(f"disconnected: {type(e).__name__}: {e}")
            except (ProtocolError, OSError, ValueError) as e:
                self._finish(f"error: {type(e).__name__}: {e}")

        return run

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._finished.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tp.keepalive(sock)
            t = tp.SocketTransport(sock)
            self._spawn(lambda t=t: self._handshake(t), "postcopy-source-conn")  # type: ignore[misc]

    def _handshake(self, t: tp.Transport) -> None:
        ch = _Channel(t, Connection(Role.SOURCE))
        with self._lock:
            if self._finished.is_set():
                t.close()
                return
            self._channels.append(ch)
        try:
            ev = ch.next_event()
            if ev is not None and not isinstance(ev, Hello):
                raise ProtocolError(f"expected HELLO, got {type(ev).__name__}")
        except (ProtocolError, OSError) as e:
            # a stray or broken connection does not end the migration
            with self._lock:
                self.stats.errors_sent += 1
            try:
                ch.t.send([_error_frame(errno.EPROTO, f"handshake: {e}")])
            except OSError:
                pass
            ev = None
        if ev is None:
            self._drop(ch)
            return
        hello = Hello(
            ev.channel,
            self.page_size,
            self.nr_pages * self.page_size,
            len(self.vcpu_states),
            sum(len(s) for s in self.vcpu_states),
            self.session,
        )
        refuse: Error | None = None
        with self._lock:
            if ev.channel is Channel.DEMAND:
                if self._demand is not None:
                    refuse = Error(errno.EBUSY, "HELLO: a demand channel is already connected")
                else:
                    self._demand = ch
            else:
                if self._demand is None or ev.session != self.session:
                    refuse = Error(errno.EINVAL, "HELLO: bulk channel with no matching session")
                elif self._bulk is not None:
                    refuse = Error(errno.EBUSY, "HELLO: a bulk channel is already connected")
                else:
                    self._bulk = ch
        if refuse is not None:  # ERROR instead of HELLO, then BYE
            ch.send(refuse)
            ch.send(Bye())
            self._drop(ch)
            return
        ch.send(hello)
        if ev.channel is Channel.DEMAND:
            self.stats.start_ns = self.clock()
            for i, blobs in enumerate(self.vcpu_states):
                for k, blob in enumerate(blobs):
                    ch.send(VcpuState(i, k + 1, blob))
            self._demand_loop(ch)
        else:
            self._bulk_loop(ch)

    def _send_pages(self, ch: _Channel, start: int, count: int, flags: int) -> None:
        ps = self.page_size
        data = self.memory[start * ps : (start + count) * ps]
        with ch.send_lock:
            ch.t.send(ch.conn.send_pages(start, count, flags, data))

    def _demand_loop(self, ch: _Channel) -> None:
        if self.demand_cpu is not None:
            threadprio.pin(self.demand_cpu)
        if self.demand_slice_ns:
            threadprio.latency_sensitive(self.demand_slice_ns)
        if self.demand_rt:
            threadprio.realtime()
        while True:
            ev = ch.next_event()
            if ev is None or isinstance(ev, Bye):
                self._finish("disconnected" if ev is None else "done")
                return
            if isinstance(ev, Done):
                self._finish("done")
                return
            if isinstance(ev, Request):
                self._serve_request(ch, ev)
            elif isinstance(ev, DigestRequest):
                self._serve_digest(ch, ev)

    def _serve_digest(self, ch: _Channel, ev: DigestRequest) -> None:
        err = request_bounds_error([(ev.start, ev.count)], self.nr_pages)
        if err is not None:
            with self._lock:
                self.stats.errors_sent += 1
            ch.send(err)
            return
        data = page_digests(self.memory, ev.start, ev.count, ev.granule, self.page_size)
        ch.send(Digest(ev.start, ev.count, ev.granule, data))

    def _serve_request(self, ch: _Channel, ev: Request) -> None:
        err = request_bounds_error(ev.ranges, self.nr_pages)
        runs: list[tuple[int, int]] = []
        with self._lock:
            st = self.stats
            st.requests += 1
            if err is not None:
                st.errors_sent += 1
            else:
                sched = self.sched
                for s, c in ev.ranges:
                    sched.demand(s, c)
                while (run := sched.take_demand()) is not None:
                    runs.append(run)
                    st.pages_demand += run[1]
                    st.bytes_sent += run[1] * self.page_size
                st.pages_resent = sched.pages_resent
        if err is not None:
            ch.send(err)
            return
        for start, count in runs:
            self._send_pages(ch, start, count, PAGES_DEMAND)

    def _bulk_loop(self, ch: _Channel) -> None:
        threadprio.background(self.bulk_nice)
        while not self._finished.is_set():
            with self._lock:
                run = self.sched.next_background()
                if run is not None:
                    self.stats.pages_background += run[1]
                    self.stats.bytes_sent += run[1] * self.page_size
            if run is None:
                ch.send(Done())  # every page was sent at least once
                break
            self._send_pages(ch, run[0], run[1], 0)
            self.bulk_started.set()
        # the channel stays open (BYE comes from _finish) until the migration ends

    # -- ending ----------------------------------------------------------------------
    def _drop(self, ch: _Channel) -> None:
        with self._lock:
            if ch in self._channels:
                self._channels.remove(ch)
        ch.t.close()

    def _finish(self, result: str) -> None:
        with self._lock:
            if self._finished.is_set():
                return
            self.result = result
            self.stats.end_ns = self.clock()
            self._finished.set()
            channels, self._channels = list(self._channels), []
            listener, self._listener = self._listener, None
        if listener is not None:
            _close_listener(listener)
            if isinstance(self.address, str):
                try:
                    os.unlink(self.address)
                except OSError:
                    pass
        if result == "killed":
            for ch in channels:
                ch.t.abort()
            return
        last: list[bytes] = []
        if result.startswith("error"):  # tell the destination why, then BYE
            last.append(_error_frame(errno.EPROTO, result))
        if not result.startswith("disconnected"):
            last.append(_BYE)
        for ch in channels:
            if last and ch.send_lock.acquire(timeout=1.0):
                # a thread blocked in a send holds the lock: then nothing more, just close
                try:
                    ch.t.send(last)
                except OSError:
                    pass
                finally:
                    ch.send_lock.release()
            ch.t.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the migration is over and every thread has ended."""
        if not self._finished.wait(timeout):
            return False
        return self._join(timeout)

    def _join(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        me = threading.current_thread()
        for th in threads:
            if th is me:
                continue
            th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if th.is_alive():
                return False
        self._release()
        return True

    def _release(self) -> None:
        """Let go of the image once every thread has ended: release :attr:`memory` (the
        caller's mmap can then be closed, its bytearray resized) and close what
        :meth:`from_image` opened."""
        try:
            self.memory.release()  # idempotent
        except BufferError:  # someone took a buffer of ``memory`` itself and still holds it
            pass
        owned, self._owned = self._owned, []
        for o in owned:
            try:
                o.close()
            except BufferError:  # a view is still alive somewhere; the GC will unmap
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving (BYE to the destination if connected), join every thread and
        release the memory view (not when a thread outlives ``timeout``)."""
        self._finish("closed")
        self._join(timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Drop every connection with a reset, as if the source process died."""
        self._finish("killed")
        self._join(timeout)

    @property
    def threads_alive(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BYE = bytes(encode(Bye())[0])


def _flat_view(memory: Any) -> memoryview:
    """One flat unsigned-byte view of ``memory``; no other view of it is left behind."""
    mv = memoryview(memory)
    if mv.format == "B" and mv.ndim == 1:
        return mv
    try:
        return mv.cast("B")  # a view of its own (not an export of ``mv``)
    finally:
        mv.release()


def _error_frame(code: int, text: str) -> bytes:
    return bytes(encode(Error(code, text))[0])


def _close_listener(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
    except OSError:
        pass
    sock.close()
