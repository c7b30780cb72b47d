"""Transports: the byte pipes the post-copy protocol runs over.

A :class:`Transport` is three calls, so that a simulated network (virtual
clock, latency, loss) can stand in later: ``send(parts)`` writes every byte of
a list of buffers (a scatter-gather write, ``sendmsg(2)``, so page data goes
from the guest mapping to the socket with no copy in Python), ``recv_into(buf)``
reads what is there into ``buf`` and returns the count (0 at end of stream), and
``close()``. ``abort()`` is a close that the peer sees as a reset (``SO_LINGER``
0: a ``RST``), which is what a crashed peer looks like. A transport may also offer
``recv_into_all(buf)`` (fill the whole buffer unless the stream ends; sockets do it
with ``MSG_WAITALL``), which the receivers use for page data when it is there.

* :class:`SocketTransport` over a connected TCP or Unix stream socket;
  :func:`connect` and :func:`listen` make them (TCP on 127.0.0.1 by default;
  ``TCP_NODELAY`` for the demand channel, as QEMU sets on its
  ``postcopy-preempt`` channel).
* :class:`QueueTransport` (:func:`memory_pair`): two in-memory queues with a
  condition variable, for tests and for the later deterministic scheduler.

Failures are :class:`ConnectionError` subclasses (``ConnectionResetError``,
``BrokenPipeError``), timeouts are :class:`TimeoutError`.
"""

from __future__ import annotations

import collections
import select
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview
#: a TCP (host, port) or a Unix socket path
Address = tuple[str, int] | str

_LINGER0 = struct.pack("ii", 1, 0)


class Transport(Protocol):
    def send(self, parts: Sequence[Buffer]) -> None: ...

    def recv_into(self, buf: memoryview | bytearray, timeout: float | None = None) -> int:
        """Read what is there (block until something is); 0 at end of stream.
        ``timeout`` (seconds) raises :class:`TimeoutError` if nothing came."""
        ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class SocketTransport:
    """A connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._closed = False
        self._poll: select.poll | None = None

    def send(self, parts: Sequence[Buffer]) -> None:
        sock = self.sock
        n = sock.sendmsg(parts)
        total = 0
        for p in parts:  # bytes and flat unsigned-byte views (the protocol's) need no view
            total += p.nbytes if isinstance(p, memoryview) else len(p)
        if n == total:
            return
        # partial write: continue from where it stopped
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if not views:
                return
            if n:
                views[0] = views[0][n:]
            n = sock.sendmsg(views)

    def recv_into(self, buf: memoryview | bytearray, timeout: float | None = None) -> int:
        if timeout is not None:
            if self._poll is None:
                self._poll = select.poll()
                self._poll.register(self.sock.fileno(), select.POLLIN)
            if not self._poll.poll(max(0, int(timeout * 1000))):
                raise TimeoutError(f"nothing received in {timeout} s")
        return self.sock.recv_into(buf)

    def recv_into_all(self, buf: memoryview) -> int:
        """Fill ``buf`` (fewer bytes only at end of stream): ``MSG_WAITALL``, one call
        (and one GIL release) for a whole PAGES body instead of one per socket chunk."""
        sock = self.sock
        want = buf.nbytes
        got = sock.recv_into(buf, want, socket.MSG_WAITALL)
        while 0 < got < want:  # a signal or a socket error interrupted the wait
            n = sock.recv_into(buf[got:], want - got, socket.MSG_WAITALL)
            if n == 0:
                break
            got += n
        return got

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes threads blocked on this socket
        except OSError:
            pass
        self.sock.close()

    def abort(self) -> None:
        if self._closed:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        self.close()


def _family(address: Address) -> socket.AddressFamily:
    return socket.AF_UNIX if isinstance(address, str) else socket.AF_INET


def parse_address(text: str) -> Address:
    """``tcp:HOST:PORT``, ``HOST:PORT`` or ``unix:PATH`` (a bare path with a ``/`` is
    a Unix socket too)."""
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not an address: {text!r} (tcp:HOST:PORT or unix:PATH)")
    return (host or "127.0.0.1", int(port))


def keepalive(sock: socket.socket, seconds: int = 2, probes: int = 3) -> None:
    """Arm TCP keepalive: a vanished peer is an error after about ``seconds * (1 + probes)``."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


def connect(
    address: Address,
    *,
    nodelay: bool = False,
    timeout: float | None = 10.0,
    keepalive_s: int = 2,
) -> SocketTransport:
    """Connect to a listening source. ``timeout`` bounds the connect only. TCP
    keepalive probes (``keepalive_s`` idle, then every ``keepalive_s``, 3 tries) make a
    peer that vanished without a FIN or RST an error within seconds."""
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        if sock.family == socket.AF_INET:
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if keepalive_s > 0:
                keepalive(sock, keepalive_s)
    except BaseException:
        sock.close()
        raise
    return SocketTransport(sock)


def listen(address: Address | None = None, backlog: int = 4) -> socket.socket:
    """A listening socket: TCP on 127.0.0.1 with a free port by default."""
    address = ("127.0.0.1", 0) if address is None else address
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_pair() -> tuple[SocketTransport, SocketTransport]:
    a, b = socket.socketpair()
    return SocketTransport(a), SocketTransport(b)


# -- in memory -------------------------------------------------------------------------


class _Pipe:
    """One direction: a queue of byte chunks."""

    def __init__(self) -> None:
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.cond = threading.Condition()
        self.eof = False  # writer closed: reader drains, then reads 0
        self.reader_gone = False  # reader closed: writes fail
        self.reset = False  # aborted: reader and writer fail at once


class QueueTransport:
    """One end of an in-memory duplex pipe (see :func:`memory_pair`)."""

    def __init__(self, tx: _Pipe, rx: _Pipe) -> None:
        self._tx = tx
        self._rx = rx

    def send(self, parts: Sequence[Buffer]) -> None:
        tx = self._tx
        with tx.cond:
            if tx.reset:
                raise ConnectionResetError("in-memory transport reset by peer")
            if tx.reader_gone or tx.eof:
                raise BrokenPipeError("in-memory transport closed")
            for p in parts:
                b = bytes(p)
                if b:
                    tx.chunks.append(memoryview(b))
            tx.cond.notify_all()

    def recv_into(self, buf: memoryview | bytearray, timeout: float | None = None) -> int:
        rx = self._rx
        out = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
        with rx.cond:
            while not rx.chunks and not rx.eof and not rx.reset and not rx.reader_gone:
                if not rx.cond.wait(timeout):
                    raise TimeoutError(f"nothing received in {timeout} s")
            if rx.reset:
                raise ConnectionResetError("in-memory transport reset by peer")
            n = 0
            while rx.chunks and n < len(out):
                c = rx.chunks[0]
                k = min(len(c), len(out) - n)
                out[n : n + k] = c[:k]
                n += k
                if k == len(c):
                    rx.chunks.popleft()
                else:
                    rx.chunks[0] = c[k:]
            return n

    def close(self) -> None:
        for p, attr in ((self._tx, "eof"), (self._rx, "reader_gone")):
            with p.cond:
                setattr(p, attr, True)
                p.cond.notify_all()

    def abort(self) -> None:
        for p in (self._tx, self._rx):
            with p.cond:
                p.reset = True
                p.chunks.clear()
                p.cond.notify_all()


def memory_pair() -> tuple[QueueTransport, QueueTransport]:
    """Two connected in-memory transports."""
    a, b = _Pipe(), _Pipe()
    return QueueTransport(a, b), QueueTransport(b, a)
