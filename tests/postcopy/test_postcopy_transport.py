"""Transports: scatter-gather sends that survive partial writes, EOF, reset, timeouts."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from postcopy import transport as tp


class _Dribble:
    """A socket stand-in whose sendmsg writes at most ``k`` bytes a call."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.out = bytearray()
        self.calls = 0

    def sendmsg(self, parts: Any) -> int:
        self.calls += 1
        data = b"".join(bytes(p) for p in parts)[: self.k]
        self.out += data
        return len(data)


def test_partial_sendmsg_is_continued_exactly() -> None:
    fake = _Dribble(7)
    t = tp.SocketTransport(fake)  # type: ignore[arg-type]
    mem = memoryview(bytearray(range(256)) * 4)
    parts: list[tp.Buffer] = [b"header--", mem[10:300], b"", mem[500:777], b"x"]
    t.send(parts)
    assert bytes(fake.out) == b"".join(bytes(p) for p in parts)
    assert fake.calls == -(-len(fake.out) // 7)


@pytest.mark.parametrize("kind", ["memory", "socketpair"])
def test_eof_reset_and_timeout(kind: str) -> None:
    a, b = tp.memory_pair() if kind == "memory" else tp.socket_pair()
    buf = bytearray(64)
    with pytest.raises(TimeoutError):
        b.recv_into(buf, timeout=0.01)  # nothing was sent: the timeout is the point
    a.send([b"abc", memoryview(b"defgh")[1:3]])
    got = bytearray()
    while len(got) < 5:
        n = b.recv_into(buf)
        got += buf[:n]
    assert bytes(got) == b"abcef"
    a.close()
    assert b.recv_into(buf) == 0  # EOF after the data
    b.close()

    c, d = tp.memory_pair() if kind == "memory" else tp.socket_pair()
    ready = threading.Event()
    seen: list[BaseException | int] = []

    def reader() -> None:
        ready.set()
        try:
            seen.append(d.recv_into(buf))
        except OSError as e:
            seen.append(e)

    th = threading.Thread(target=reader)
    th.start()
    assert ready.wait(10)
    c.abort()
    th.join(10)
    assert not th.is_alive()
    # a reset is an error for an in-memory pipe; a Unix socketpair reports EOF
    assert isinstance(seen[0], ConnectionResetError) or seen[0] == 0
    d.close()


def test_memory_pair_send_after_peer_closed() -> None:
    a, b = tp.memory_pair()
    b.close()
    with pytest.raises(BrokenPipeError):
        a.send([b"x"])


def test_listen_and_connect_tcp_nodelay() -> None:
    ls = tp.listen()
    addr = ls.getsockname()
    assert addr[0] == "127.0.0.1"
    c = tp.connect(addr, nodelay=True)
    s, _ = ls.accept()
    assert c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    c.send([b"ping"])
    assert s.recv(4) == b"ping"
    s.close()
    c.close()
    ls.close()


def test_parse_address() -> None:
    assert tp.parse_address("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert tp.parse_address("10.0.0.2:80") == ("10.0.0.2", 80)
    assert tp.parse_address(":5000") == ("127.0.0.1", 5000)
    assert tp.parse_address("unix:/run/src.sock") == "/run/src.sock"
    assert tp.parse_address("/tmp/x.sock") == "/tmp/x.sock"
    with pytest.raises(ValueError, match="not an address"):
        tp.parse_address("localhost")


def test_tcp_keepalive_is_armed() -> None:
    ls = tp.listen()
    c = tp.connect(ls.getsockname(), keepalive_s=2)
    try:
        assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
        assert c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        c.close()
        ls.close()
