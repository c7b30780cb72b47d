"""`FetchClient`: the destination's end of the wire, without any fault handling.

It opens the demand channel (``TCP_NODELAY``; the source's HELLO and the vCPU
state come first on it) and the bulk channel, and receives every PAGES frame
straight into memory the caller provides (:class:`PageSink`; ``recv_into`` at the page's place, no copy but the
few bytes that arrived with the frame header). Page requests are
de-duplicated by a :class:`~postcopy.pages.PageTracker`: a page already
received or in flight is not asked for again.

Nobody sits on the demand channel: a thread waiting for pages it asked for
reads the demand channel itself (leader/follower: one waiter at a time reads
and places whatever arrives, the others wait on a condition), so a demand reply
costs no extra thread hand-off (and :meth:`FetchClient.fetch`, the fault path, takes
the lead at once when nobody has it). The bulk channel has its receiver thread,
which reads each PAGES body with one ``recv_into_all`` (``MSG_WAITALL``) when the
transport has it. Sink
callbacks therefore run on the bulk thread or on a waiting thread.

The destination (later) builds on this: its sink will hand out a staging
buffer and place each batch with one ``UFFDIO_COPY`` in :meth:`PageSink.placed`.

A source that goes away mid-migration (EOF or reset on either channel before
the migration ended) makes every waiter raise :class:`SourceLost`, a
:class:`ConnectionError`, at once. A refused request raises :class:`RemoteError`
(an ``OSError`` with the source's errno, ``EFAULT`` for pages outside memory) in
the waiter of those pages only. :meth:`FetchClient.verify` compares per-page
digests with the source's at the end.

Typical use::

    c = FetchClient.connect(("127.0.0.1", port), sink=guest_mapping)
    regs = c.vcpu_states[0][VcpuStateKind.REGS]
    c.fetch(page, timeout=5)        # a fault: request + wait (leader reads the reply)
    c.wait_complete()               # the bulk stream filled the rest
    assert c.verify() is None       # every page's digest equals the source's
    c.finish()                      # DONE; the source answers BYE and ends
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from postcopy import transport as tp
from postcopy.pages import PageTracker, first_difference, page_digests
from postcopy.protocol import (
    MAX_DIGESTS,
    PAGES_HEAD,
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
    Pages,
    ProtocolError,
    Role,
    VcpuState,
)

_RECV = 1 << 16


class SourceLost(ConnectionError):
    """The source closed or reset a channel before the migration ended."""


class RemoteError(OSError):
    """The source refused a request (ERROR reply); ``errno`` is the source's code."""


class SinkFailed(Exception):
    """Internal: the sink raised; carries its exception (re-raised as is)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class PageSink(Protocol):
    """Where received pages go. ``buffer_for`` and ``placed`` are called from the bulk
    receiver thread (``demand=False``: bulk frames) and from the waiting thread that
    leads the demand channel (``demand=True``), possibly at the same time — but never
    two frames with the same ``demand`` value at once, so one staging buffer per value
    of ``demand`` is safe. A page may arrive twice (a demand reply racing the bulk
    stream): ``placed`` must tolerate that (``EEXIST``)."""

    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        """Writable memory for ``count`` pages from ``start`` (``count * page_size`` bytes)."""
        ...

    def placed(self, start: int, count: int, demand: bool) -> None:
        """The pages are in the buffer from :meth:`buffer_for` (called on the receiver thread)."""
        ...


class BufferSink:
    """Receive pages in place into one guest-sized writable buffer."""

    def __init__(self, buffer: Any, page_size: int) -> None:
        mv = memoryview(buffer)
        self.view = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        if self.view.readonly:
            raise ValueError("BufferSink needs a writable buffer")
        self.page_size = page_size
        self.on_placed: Callable[[int, int, bool], None] | None = None

    def buffer_for(self, start: int, count: int, demand: bool) -> memoryview:
        ps = self.page_size
        return self.view[start * ps : (start + count) * ps]

    def placed(self, start: int, count: int, demand: bool) -> None:
        if self.on_placed is not None:
            self.on_placed(start, count, demand)


class _Chan:
    def __init__(self, t: tp.Transport, channel: Channel) -> None:
        self.t = t
        self.conn = Connection(Role.DESTINATION, channel, zero_copy_pages=True)
        self.buf = bytearray(_RECV)
        self.view = memoryview(self.buf)
        self.send_lock = threading.Lock()
        # bulk: read a PAGES header alone, so its (large) body lands in place with no
        # copy; demand: read what is there (a whole one-page reply in one call)
        self.read_size = PAGES_HEAD.size if channel is Channel.BULK else _RECV

    def send(self, ev: Event) -> None:
        with self.send_lock:
            self.t.send(self.conn.send(ev))

    def next_event(self, timeout: float | None = None) -> Event | None:
        conn = self.conn
        while True:
            ev = conn.next_event()
            if not isinstance(ev, NeedData):
                return ev
            view = self.view[: self.read_size] if not conn.decoder.buffered else self.view
            n = self.t.recv_into(view, timeout)
            conn.receive_data(view[:n])
            if n == 0:
                conn.next_event()
                return None

    def read_body(self, target: memoryview) -> None:
        """Fill ``target`` with the PAGES data the decoder owes."""
        dec = self.conn.decoder
        got = dec.take_body_into(target)
        want = len(target)
        fill = getattr(self.t, "recv_into_all", None)
        if fill is not None and got < want:
            n = fill(target[got:])
            dec.body_received(n)
            got += n
            if got < want:
                raise SourceLost("source closed the connection inside a PAGES frame")
        while got < want:
            n = self.t.recv_into(target[got:])
            if n == 0:
                raise SourceLost("source closed the connection inside a PAGES frame")
            dec.body_received(n)
            got += n


class FetchClient:
    """Connects to a :class:`~postcopy.source.Source` and fetches pages.

    Build with :meth:`connect` (sockets) or :meth:`over` (any transports).
    ``sink`` is a :class:`PageSink`, a writable guest-sized buffer, or None (a
    ``bytearray`` is allocated: :attr:`memory`).
    """

    def __init__(self, demand: tp.Transport, *, sink: Any = None) -> None:
        self._demand = _Chan(demand, Channel.DEMAND)
        self._bulk: _Chan | None = None
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self._errors: list[Error] = []
        self._ending = False  # we said DONE / closed: EOF is expected
        self._leader = False  # a waiter is reading the demand channel
        self._outstanding_pages = 0  # demand pages asked and not answered
        self._outstanding_errors = 0  # out-of-range requests not answered
        self._outstanding_digests = 0
        self._digest_replies: dict[tuple[int, int, int], bytes] = {}
        self._threads: list[threading.Thread] = []
        self.background_done = False
        self.pages_demand = 0
        self.pages_background = 0
        self.bytes_received = 0
        self.requests = 0
        # handshake on the demand channel: HELLO, then the vCPU state blobs
        try:
            self._demand.send(Hello(Channel.DEMAND))
            hello = self._expect_hello(self._demand)
            self.vcpu_states: list[dict[int, bytes]] = [{} for _ in range(hello.nr_vcpus)]
            for _ in range(hello.state_blobs):
                ev = self._demand.next_event()
                if not isinstance(ev, VcpuState) or ev.vcpu >= hello.nr_vcpus:
                    raise ProtocolError(f"expected VCPU_STATE, got {ev!r}")
                self.vcpu_states[ev.vcpu][ev.kind] = ev.blob
        except BaseException:
            demand.close()
            raise
        self.hello = hello
        self.page_size = hello.page_size
        self.nr_pages = hello.nr_pages
        self.session = hello.session
        self.tracker = PageTracker(self.nr_pages)
        self.memory: Any = None  # the buffer pages land in, unless a PageSink was given
        if sink is None:
            self.memory = bytearray(self.nr_pages * self.page_size)
            sink = BufferSink(self.memory, self.page_size)
        elif not hasattr(sink, "buffer_for"):
            self.memory = sink
            if memoryview(sink).nbytes < self.nr_pages * self.page_size:
                raise ValueError("sink buffer is smaller than guest memory")
            sink = BufferSink(sink, self.page_size)
        self.sink: PageSink = sink

    @staticmethod
    def _expect_hello(ch: _Chan) -> Hello:
        ev = ch.next_event()
        if isinstance(ev, Hello):
            return ev
        if isinstance(ev, Error):
            raise RemoteError(ev.code, ev.text)
        if ev is None:
            raise SourceLost("source closed the connection during the handshake")
        raise ProtocolError(f"expected HELLO, got {ev!r}")

    # -- construction ------------------------------------------------------------
    @classmethod
    def connect(
        cls, address: tp.Address, *, sink: Any = None, bulk: bool = True, timeout: float = 10.0
    ) -> FetchClient:
        c = cls(tp.connect(address, nodelay=True, timeout=timeout), sink=sink)
        if bulk:
            try:
                c.attach_bulk(tp.connect(address, timeout=timeout))
            except BaseException:
                c.close()
                raise
        return c

    @classmethod
    def over(
        cls, demand: tp.Transport, bulk: tp.Transport | None = None, *, sink: Any = None
    ) -> FetchClient:
        c = cls(demand, sink=sink)
        if bulk is not None:
            c.attach_bulk(bulk)
        return c

    def attach_bulk(self, t: tp.Transport) -> None:
        """Open the bulk channel: the background push starts."""
        ch = _Chan(t, Channel.BULK)
        try:
            ch.send(Hello(Channel.BULK, session=self.session))
            hello = self._expect_hello(ch)
            if (hello.page_size, hello.nr_pages) != (self.page_size, self.nr_pages):
                raise ProtocolError(
                    f"bulk HELLO geometry {hello} differs from the demand channel's"
                )
        except BaseException:
            t.close()
            raise
        self._bulk = ch
        th = threading.Thread(
            target=self._bulk_receiver, args=(ch,), name="postcopy-fetch-bulk", daemon=True
        )
        self._threads.append(th)
        th.start()

    # -- receiving -----------------------------------------------------------------
    def _handle(self, ch: _Chan, ev: Event | None) -> bool:
        """Act on one event from ``ch``; False when the channel has ended."""
        if isinstance(ev, Pages):
            self._on_pages(ch, ev)
        elif isinstance(ev, Error):
            self._on_error(ev)
        elif isinstance(ev, Done):
            with self._cond:
                self.background_done = True
                self._cond.notify_all()
        elif isinstance(ev, Digest):
            with self._cond:
                self._digest_replies[(ev.start, ev.count, ev.granule)] = ev.digests
                self._outstanding_digests -= 1
                self._cond.notify_all()
        elif ev is None or isinstance(ev, Bye):
            if self._ending or (isinstance(ev, Bye) and self.tracker.complete):
                return False
            what = "closed" if ev is None else "said BYE on"
            raise SourceLost(
                f"source {what} the {_chname(ch)} channel with {self.tracker.missing} pages missing"
            )
        else:
            raise ProtocolError(f"unexpected {type(ev).__name__} from the source")
        return True

    def _fail(self, ch: _Chan, e: BaseException, *, wrap: bool = True) -> BaseException:
        """Record a failure (the first one wins) and wake every waiter. Connection
        failures become :class:`SourceLost`; a sink's own error (``wrap=False``) is kept."""
        err = e
        if wrap and not isinstance(e, (SourceLost, ProtocolError, RemoteError, TimeoutError)):
            err = SourceLost(f"source lost on the {_chname(ch)} channel: {e}")
            err.__cause__ = e
        with self._cond:
            if self.error is None and not self._ending:
                self.error = err
            self._cond.notify_all()
        return err

    def _bulk_receiver(self, ch: _Chan) -> None:
        try:
            while self._handle(ch, ch.next_event()):
                pass
        except SinkFailed as e:
            self._fail(ch, e.error, wrap=False)
        except (ConnectionError, OSError, ProtocolError) as e:
            self._fail(ch, e)

    def _on_pages(self, ch: _Chan, ev: Pages) -> None:
        demand = ev.demand
        try:
            target = self.sink.buffer_for(ev.start, ev.count, demand)
        except Exception as e:
            raise SinkFailed(e) from e
        ch.read_body(target)
        try:
            self.sink.placed(ev.start, ev.count, demand)
        except Exception as e:
            raise SinkFailed(e) from e
        with self._cond:
            self.tracker.mark_received(ev.start, ev.count)
            if demand:
                self.pages_demand += ev.count
                self._outstanding_pages -= ev.count
            else:
                self.pages_background += ev.count
            self.bytes_received += ev.count * self.page_size
            self._cond.notify_all()

    def _on_error(self, ev: Error) -> None:
        with self._cond:
            if ev.count == 0:  # not about pages: the migration cannot go on
                if self.error is None:
                    self.error = RemoteError(ev.code, ev.text)
            else:
                self._errors.append(ev)
                if ev.start + ev.count > self.nr_pages:
                    self._outstanding_errors -= 1
                else:  # let a later request retry these pages
                    self._outstanding_pages -= ev.count
                    self.tracker.inflight.clear_range(ev.start, ev.count)
            self._cond.notify_all()

    # -- requesting ------------------------------------------------------------------
    def request(self, start: int, count: int = 1) -> list[tuple[int, int]]:
        """Ask for pages not yet received nor in flight; returns the ranges asked.

        A range outside guest memory is sent as is: the source answers ERROR,
        and :meth:`wait_pages` raises :class:`RemoteError`.
        """
        with self._cond:
            self._raise_if_failed()
            if start < 0 or count <= 0 or start + count > self.nr_pages:
                ranges = [(start, count)]
                self._outstanding_errors += 1
            else:
                ranges = self.tracker.want(start, count)
                for _, n in ranges:
                    self._outstanding_pages += n
            if ranges:
                self.requests += 1
        if ranges:
            ch = self._demand
            try:
                with ch.send_lock:
                    ch.t.send(ch.conn.send_request(ranges))
            except (ConnectionError, OSError) as e:
                raise self._fail(ch, e) from e
        return ranges

    def _have(self, start: int, count: int) -> bool:
        """True when the pages are here; raises the source's refusal of them."""
        inside = start >= 0 and count > 0 and start + count <= self.nr_pages
        for i, e in enumerate(self._errors):
            if e.start < start + count and start < e.start + e.count:
                e_inside = e.start + e.count <= self.nr_pages
                if inside and not e_inside:
                    continue  # a refusal of a range reaching outside: not about these pages
                if e_inside:
                    del self._errors[i]  # fails one wait; a new request may succeed
                raise RemoteError(e.code, e.text)
        return inside and self.tracker.received.all_set(start, count)

    def wait_pages(self, start: int, count: int = 1, timeout: float | None = None) -> None:
        """Wait until the pages are in the sink (raises on ERROR, source loss, timeout)."""
        self._wait_for(
            lambda: self._have(start, count), timeout, f"pages [{start}, {start + count})"
        )

    def _expecting(self) -> bool:
        """Replies are owed on the demand channel."""
        return (
            self._outstanding_pages > 0
            or self._outstanding_errors > 0
            or self._outstanding_digests > 0
        )

    def _wait_for(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Wait until ``done()`` (called under the condition; it may raise). While replies
        are owed and nobody reads the demand channel, read it ourselves (leader)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._cond
        while True:
            with cond:
                while True:
                    if done():
                        return
                    self._raise_if_failed()
                    if not self._leader and self._expecting():
                        self._leader = True
                        break
                    if not self._wait(deadline):
                        raise TimeoutError(f"{what} did not arrive in time")
            self._lead(done, deadline, what)

    def _lead(self, done: Callable[[], bool], deadline: float | None, what: str) -> None:
        ch = self._demand
        try:
            while True:
                with self._cond:
                    if done() or self.error is not None or not self._expecting():
                        return
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._handle(ch, ch.next_event(left)):
                    return
        except RemoteError:
            raise  # the source refused this; the channel is fine
        except SinkFailed as e:
            raise self._fail(ch, e.error, wrap=False) from None
        except TimeoutError:
            raise TimeoutError(f"{what} did not arrive in time") from None
        except (ConnectionError, OSError, ProtocolError) as e:
            raise self._fail(ch, e) from e
        finally:
            with self._cond:
                self._leader = False
                self._cond.notify_all()

    # -- verification ----------------------------------------------------------------
    def digests(
        self, start: int, count: int, granule: int = 1, timeout: float | None = None
    ) -> bytes:
        """The source's digests of ``count`` pages from ``start`` (one per ``granule``
        pages; :func:`postcopy.pages.page_digests`): compare with the same function over
        the destination's memory. At most ``MAX_DIGESTS`` digests per call."""
        key = (start, count, granule)
        inside = start >= 0 and count > 0 and start + count <= self.nr_pages
        with self._cond:
            self._raise_if_failed()
            if inside:
                self._outstanding_digests += 1
            else:
                self._outstanding_errors += 1
        ch = self._demand
        try:
            with ch.send_lock:
                ch.t.send(ch.conn.send(DigestRequest(start, count, granule)))
        except (ConnectionError, OSError) as e:
            raise self._fail(ch, e) from e

        def done() -> bool:
            if key in self._digest_replies:
                return True
            if not inside:
                self._have(start, count)  # raises the refusal once it came
            return False

        self._wait_for(done, timeout, f"digests of [{start}, {start + count})")
        with self._cond:
            return self._digest_replies.pop(key)

    def verify(self, granule: int = 1, timeout: float | None = None) -> int | None:
        """Compare every page's digest with the source's; the first differing page, or
        None when the sink's memory equals the source's. Needs a buffer sink."""
        if self.memory is None:
            raise ValueError("verify() needs the pages in a buffer (no custom PageSink)")
        step = MAX_DIGESTS * granule
        for start in range(0, self.nr_pages, step):
            count = min(step, self.nr_pages - start)
            theirs = self.digests(start, count, granule, timeout)
            ours = page_digests(self.memory, start, count, granule, self.page_size)
            i = first_difference(ours, theirs)
            if i is not None:
                return start + i * granule
        return None

    def fetch(self, start: int, count: int = 1, timeout: float | None = None) -> None:
        """Request pages and wait until they are in the sink.

        The fault path's common case -- pages inside memory, no refusal pending, nobody
        else reading the demand channel -- takes the lead at once and reads replies until
        its pages are in, with one lock round per step (:meth:`request` and
        :meth:`wait_pages` do the same in general, for any number of waiters)."""
        cond = self._cond
        tracker = self.tracker
        with cond:
            fast = (
                self.error is None
                and not self._leader
                and not self._errors
                and start >= 0
                and count > 0
                and start + count <= self.nr_pages
            )
            if fast:
                if tracker.received.all_set(start, count):
                    return
                ranges = tracker.want(start, count)
                for _, n in ranges:
                    self._outstanding_pages += n
                if ranges:
                    self.requests += 1
                self._leader = True
        if not fast:
            self.request(start, count)
            self.wait_pages(start, count, timeout)
            return
        ch = self._demand
        received = tracker.received
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if ranges:
                with ch.send_lock:
                    ch.t.send(ch.conn.send_request(ranges))
            while not received.all_set(start, count) and self.error is None and not self._errors:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._handle(ch, ch.next_event(left)):
                    break
        except RemoteError:
            pass  # a refusal: wait_pages below raises it
        except SinkFailed as e:
            raise self._fail(ch, e.error, wrap=False) from None
        except TimeoutError:
            raise TimeoutError(f"pages [{start}, {start + count}) did not arrive in time") from None
        except (ConnectionError, OSError, ProtocolError) as e:
            raise self._fail(ch, e) from e
        finally:
            with cond:
                self._leader = False
                cond.notify_all()
        if not received.all_set(start, count) or self._errors:
            self.wait_pages(start, count, timeout)  # errors, or replies still owed

    def wait_complete(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.tracker.complete:
                self._raise_if_failed()
                if not self._wait(deadline):
                    raise TimeoutError(f"{self.tracker.missing} pages still missing")

    def _wait(self, deadline: float | None) -> bool:
        if deadline is None:
            self._cond.wait()
            return True
        left = deadline - time.monotonic()
        return left > 0 and (self._cond.wait(left) or time.monotonic() < deadline)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # -- ending ------------------------------------------------------------------------
    def finish(self, timeout: float = 10.0) -> None:
        """Say DONE (every page is here), drain the demand channel to the source's BYE,
        and join the bulk receiver."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._raise_if_failed()
            if not self.tracker.complete:
                raise ProtocolError(f"DONE with {self.tracker.missing} pages missing")
            while self._leader:
                if not self._wait(deadline):
                    raise TimeoutError("a waiter kept the demand channel")
            self._leader = True
            self._ending = True
        ch = self._demand
        try:
            ch.send(Done())
            while self._handle(ch, ch.next_event(max(0.0, deadline - time.monotonic()))):
                pass
        except (ConnectionError, OSError, ProtocolError):
            pass  # the source may close first: everything is here already
        finally:
            with self._cond:
                self._leader = False
        self._join(max(0.0, deadline - time.monotonic()))
        self._close_transports()

    def close(self, timeout: float = 10.0) -> None:
        """Drop both channels now (no DONE) and join the receiver thread."""
        with self._cond:
            if self.error is None and not self._ending:
                self.error = ConnectionAbortedError("FetchClient closed")
            self._ending = True
            self._cond.notify_all()
        self._close_transports()
        self._join(timeout)

    def _close_transports(self) -> None:
        for ch in (self._demand, self._bulk):
            if ch is not None:
                ch.t.close()

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))

    @property
    def threads_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def __enter__(self) -> FetchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chname(ch: _Chan) -> str:
    c = ch.conn.channel
    return c.name.lower() if c is not None else "?"
