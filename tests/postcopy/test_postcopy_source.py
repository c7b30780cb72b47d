"""Source + FetchClient end to end: real loopback TCP, Unix sockets, in-memory transports."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakekvm.kernel.real import RealKernel
from postcopy import protocol as p
from postcopy import transport as tp
from postcopy.client import BufferSink, FetchClient, RemoteError, SourceLost
from postcopy.source import Source

PS = 4096
MIB64 = 64 << 20
NR64 = MIB64 // PS
T = 60.0  # a failure guard only: nothing waits this long when things work
REGS, SREGS = bytes(range(144)), bytes(range(200, 256)) * 5 + bytes(32)


class GateSink(BufferSink):
    """Receives in place; logs every PAGES frame; can hold the bulk receiver at its first batch."""

    def __init__(self, buffer: bytearray, *, hold_bulk: bool) -> None:
        super().__init__(buffer, PS)
        self.log: list[tuple[bool, int, int, int]] = []  # demand, start, count, bulk pages so far
        self.bulk_pages = 0
        self.bulk_frontier = 0  # highest background page end received
        self.hold = hold_bulk
        self.bulk_running = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def placed(self, start: int, count: int, demand: bool) -> None:
        with self.lock:
            if not demand:
                self.bulk_pages += count
                self.bulk_frontier = max(self.bulk_frontier, start + count)
            self.log.append((demand, start, count, self.bulk_frontier))
        if not demand and self.hold:
            self.bulk_running.set()
            assert self.release.wait(T), "test never released the bulk receiver"


def _memory(n: int) -> bytearray:
    return bytearray(os.urandom(n))


def _address(kind: str, tmp_path: Path) -> tp.Address | None:
    return None if kind == "tcp" else str(tmp_path / "src.sock")


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in left:
        t.join(T)
    assert not [t for t in left if t.is_alive()], f"threads leaked: {left}"


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_64mib_every_page_once_and_demand_overtakes_bulk(
    kind: str, tmp_path: Path, no_thread_leak: None
) -> None:
    mem = _memory(MIB64)
    src = Source(mem, [(REGS, SREGS), (SREGS[:144], REGS * 2)], batch_pages=256)
    addr = src.listen(_address(kind, tmp_path))
    if kind == "tcp":
        assert isinstance(addr, tuple) and addr[0] == "127.0.0.1" and addr[1] > 0
    dst = bytearray(MIB64)
    sink = GateSink(dst, hold_bulk=True)
    c = FetchClient.connect(addr, sink=sink)
    try:
        if kind == "tcp":
            sock = c._demand.t.sock  # type: ignore[attr-defined]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert c.vcpu_states == [{1: REGS, 2: SREGS}, {1: SREGS[:144], 2: REGS * 2}]
        assert (c.page_size, c.nr_pages) == (PS, NR64)
        # the bulk stream is running (its first batch is in), and held there
        assert sink.bulk_running.wait(T)
        wanted = [NR64 - 1, 15000, 12345]  # all beyond what socket buffers can hold in flight
        for page in wanted:
            c.fetch(page, timeout=T)
            assert dst[page * PS : (page + 1) * PS] == mem[page * PS : (page + 1) * PS]
        demand_log = [e for e in sink.log if e[0]]
        assert [(s, n) for _, s, n, _ in demand_log] == [(pg, 1) for pg in wanted]
        for (_, s, _, frontier), _pg in zip(demand_log, wanted, strict=True):
            assert frontier <= s  # the background had not reached the page when it arrived
        assert sink.bulk_pages >= 1
        sink.release.set()
        c.wait_complete(T)
        assert dst == mem
        assert c.tracker.duplicate_pages == 0  # every page exactly once
        assert c.pages_demand == 3 and c.pages_background == NR64 - 3
        assert sum(n for _, _, n, _ in sink.log) == NR64
        c.finish(T)
    finally:
        sink.release.set()
        c.close()
    assert src.wait(T)
    assert src.result == "done"
    assert src.stats.pages_demand == 3 and src.stats.pages_background == NR64 - 3
    assert src.stats.pages_resent == 0
    assert src.threads_alive == 0 and c.threads_alive == 0
    if kind == "unix":
        assert isinstance(addr, str)


def test_request_beyond_memory_is_refused_and_serving_goes_on(no_thread_leak: None) -> None:
    mem = _memory(1 << 20)
    nr = (1 << 20) // PS
    with Source(mem) as src:
        addr = src.listen()
        c = FetchClient.connect(addr, bulk=False)
        with pytest.raises(RemoteError) as ei:
            c.fetch(nr, timeout=T)
        assert ei.value.errno == errno.EFAULT
        assert "outside guest memory" in str(ei.value)
        with pytest.raises(RemoteError):
            c.fetch(nr - 1, 2, timeout=T)
        with pytest.raises(RemoteError):
            c.fetch(1 << 60, timeout=T)
        c.fetch(nr - 1, timeout=T)  # the source still serves
        assert c.memory[-PS:] == mem[-PS:]
        assert src.stats.errors_sent == 3
        c.close()
        assert src.wait(T)
        assert src.result == "disconnected"


def test_source_killed_gives_source_lost_promptly(no_thread_leak: None) -> None:
    mem = _memory(MIB64)
    src = Source(mem)
    addr = src.listen()
    sink = GateSink(bytearray(MIB64), hold_bulk=True)
    c = FetchClient.connect(addr, sink=sink)
    waiter_error: list[BaseException] = []
    waiting = threading.Event()

    def wait_all() -> None:
        waiting.set()
        try:
            c.wait_complete(T)
        except BaseException as e:
            waiter_error.append(e)

    th = threading.Thread(target=wait_all)
    try:
        assert sink.bulk_running.wait(T)
        c.fetch(9000, timeout=T)
        th.start()
        assert waiting.wait(T)
        src.kill()
        assert src.result == "killed"
        with pytest.raises(SourceLost):  # a demand fault after the death: a clear error
            c.fetch(15000, timeout=T)
        sink.release.set()
        th.join(T)
        assert not th.is_alive()
        assert len(waiter_error) == 1 and isinstance(waiter_error[0], ConnectionError)
        assert isinstance(waiter_error[0], SourceLost)
    finally:
        sink.release.set()
        c.close()
        src.close()
    assert src.threads_alive == 0


def test_source_close_mid_migration_is_clean(no_thread_leak: None) -> None:
    mem = _memory(8 << 20)
    src = Source(mem)
    addr = src.listen()
    sink = GateSink(bytearray(8 << 20), hold_bulk=True)
    c = FetchClient.connect(addr, sink=sink)
    try:
        assert sink.bulk_running.wait(T)
        src.close()
        assert src.result == "closed"
        assert src.threads_alive == 0
        with pytest.raises(SourceLost):
            c.fetch(2000, timeout=T)
    finally:
        sink.release.set()
        c.close()


def test_destination_disconnect_ends_the_source(no_thread_leak: None) -> None:
    src = Source(_memory(1 << 20))
    addr = src.listen()
    c = FetchClient.connect(addr)
    c.fetch(3, timeout=T)
    c.close()
    assert src.wait(T)
    assert src.result is not None and src.result.startswith("disconnected")
    assert src.threads_alive == 0


def test_stray_connections_are_refused_and_do_not_end_the_migration(
    no_thread_leak: None,
) -> None:
    mem = _memory(1 << 20)
    with Source(mem) as src:
        addr = src.listen()
        c = FetchClient.connect(addr, bulk=False)
        # a second demand channel
        with pytest.raises(RemoteError) as ei:
            FetchClient.connect(addr, bulk=False)
        assert ei.value.errno == errno.EBUSY
        # a bulk channel with the wrong session
        t = tp.connect(addr)
        conn = p.Connection(p.Role.DESTINATION, p.Channel.BULK)
        t.send(conn.send(p.Hello(p.Channel.BULK, session=12345)))
        buf = bytearray(4096)
        evs: list[object] = []
        while not evs or not isinstance(evs[-1], p.Bye):
            n = t.recv_into(buf, timeout=T)
            assert n > 0, "source closed without ERROR and BYE"
            conn.receive_data(memoryview(buf)[:n])
            while not conn.peer_closed and not isinstance(ev := conn.next_event(), p.NeedData):
                evs.append(ev)
        t.close()
        errs = [e for e in evs if isinstance(e, p.Error)]
        assert errs and errs[0].code == errno.EINVAL
        # garbage
        g = tp.connect(addr)
        g.send([b"GET / HTTP/1.0\r\n\r\n" * 4])
        assert g.recv_into(buf, timeout=T) >= 0
        g.close()
        # the real destination is unaffected
        c.attach_bulk(tp.connect(addr))
        c.wait_complete(T)
        assert c.memory == mem
        c.finish(T)
        assert src.wait(T) and src.result == "done"


def test_in_memory_transports_and_trace_order(no_thread_leak: None) -> None:
    mem = _memory(256 * PS)
    trace = [200, 201, 202, 50, 7, 8]
    src = Source(mem, [(REGS, SREGS)], policy="trace", trace=trace, batch_pages=16)
    d_src, d_dst = tp.memory_pair()
    b_src, b_dst = tp.memory_pair()
    src.serve(d_src, b_src)
    sink = GateSink(bytearray(256 * PS), hold_bulk=False)
    c = FetchClient.over(d_dst, b_dst, sink=sink)
    try:
        c.wait_complete(T)
        assert c.memory is None and sink.view == mem
        bulk = [(s, n) for d, s, n, _ in sink.log if not d]
        # each trace page with the unsent rest of its 16-page block, then the rest in order
        assert bulk[:4] == [(200, 8), (50, 14), (7, 9), (0, 7)]
        assert c.tracker.duplicate_pages == 0
        assert c.vcpu_states == [{1: REGS, 2: SREGS}]
        c.finish(T)
    finally:
        c.close()
        src.close()
    assert src.wait(T) and src.result == "done"


def test_serves_a_saved_image_file(tmp_path: Path, no_thread_leak: None) -> None:
    mem = _memory(2 << 20)
    img = tmp_path / "guest.img"
    img.write_bytes(mem)
    src = Source.from_image(img, [(REGS, SREGS)])
    addr = src.listen(str(tmp_path / "img.sock"))
    c = FetchClient.connect(addr)
    c.fetch(100, 3, timeout=T)
    c.wait_complete(T)
    assert c.memory == mem
    c.finish(T)
    assert src.wait(T) and src.result == "done"
    assert src._owned == []  # the image mapping was released


def test_duplicate_requests_are_suppressed(no_thread_leak: None) -> None:
    mem = _memory(1 << 20)
    with Source(mem) as src:
        c = FetchClient.connect(src.listen(), bulk=False)
        assert c.request(10) == [(10, 1)]
        assert c.request(10) == []  # in flight: not asked twice
        c.wait_pages(10, timeout=T)
        assert c.request(10) == []  # here already
        assert c.request(9, 3) == [(9, 1), (11, 1)]
        c.wait_pages(9, 3, timeout=T)
        assert src.stats.requests == 2 and src.stats.pages_demand == 3
        c.close()


def test_serves_a_kernel_mapping_into_a_kernel_mapping(
    real_kernel: RealKernel, no_thread_leak: None
) -> None:
    """Guest memory as the seam hands it out (`Kernel.mmap` -> `Mapping`), on both sides."""
    from fakekvm.abi import mman

    size = 4 << 20
    prot, flags = mman.PROT_READ | mman.PROT_WRITE, mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
    a = real_kernel.mmap(-1, size, prot, flags)
    b = real_kernel.mmap(-1, size, prot, flags)
    try:
        a.view()[:] = os.urandom(size)
        src = Source(a, [(REGS, SREGS)])
        c = FetchClient.connect(src.listen(), sink=b)
        try:
            c.fetch(1000, timeout=T)
            c.wait_complete(T)
            assert c.memory is b
            assert bytes(b.view()) == bytes(a.view())
            c.finish(T)
        finally:
            c.close()
            src.close()
        assert src.result == "done"
    finally:
        real_kernel.munmap(a.address, size)
        real_kernel.munmap(b.address, size)


def test_digests_verify_memory_and_name_the_first_difference(no_thread_leak: None) -> None:
    from postcopy.pages import page_digests

    mem = _memory(1 << 20)
    nr = (1 << 20) // PS
    with Source(mem) as src:
        c = FetchClient.connect(src.listen())
        try:
            c.wait_complete(T)
            assert c.digests(0, nr, 1, timeout=T) == page_digests(mem, 0, nr, 1, PS)
            assert len(c.digests(10, 20, 8, timeout=T)) == 8 * 3
            assert c.verify() is None
            assert c.verify(granule=16) is None
            c.memory[77 * PS + 5] ^= 0xFF  # corrupt one byte of page 77
            assert c.verify() == 77
            assert c.verify(granule=16) == 64  # the granule holding page 77
            with pytest.raises(RemoteError) as ei:
                c.digests(nr - 1, 2, timeout=T)
            assert ei.value.errno == errno.EFAULT
            c.fetch(0, timeout=T)  # still serving
            c.finish(T)
        finally:
            c.close()
    assert src.result == "done"


def test_protocol_violation_gets_an_error_reply(tmp_path: Path, no_thread_leak: None) -> None:
    path = str(tmp_path / "v.sock")
    src = Source(_memory(1 << 20))
    src.listen(path)
    t = tp.connect(path)
    conn = p.Connection(p.Role.DESTINATION, p.Channel.DEMAND)
    t.send(conn.send(p.Hello(p.Channel.DEMAND)))
    t.send([p.FRAME.pack(99, 0, 0, 0)])  # an unknown message type
    buf = bytearray(1 << 16)
    evs: list[object] = []
    while not evs or not isinstance(evs[-1], p.Bye):
        n = t.recv_into(buf, timeout=T)
        assert n > 0, "source closed without ERROR and BYE"
        conn.receive_data(memoryview(buf)[:n])
        while not conn.peer_closed and not isinstance(ev := conn.next_event(), p.NeedData):
            evs.append(ev)
    t.close()
    errs = [e for e in evs if isinstance(e, p.Error)]
    assert errs and errs[0].code == errno.EPROTO and "unknown message type 99" in errs[0].text
    assert src.wait(T)
    assert src.result is not None and src.result.startswith("error: ProtocolError")
    assert not os.path.exists(path)  # the Unix socket file is removed


def test_a_failing_sink_is_reported_as_itself(no_thread_leak: None) -> None:
    class Broken(BufferSink):
        def placed(self, start: int, count: int, demand: bool) -> None:
            if demand:
                raise OSError(errno.ENOMEM, "UFFDIO_COPY: no memory")

    with Source(_memory(1 << 20)) as src:
        c = FetchClient.connect(src.listen(), sink=Broken(bytearray(1 << 20), PS), bulk=False)
        try:
            with pytest.raises(OSError) as ei:
                c.fetch(5, timeout=T)
            assert ei.value.errno == errno.ENOMEM and not isinstance(ei.value, SourceLost)
            with pytest.raises(OSError, match="no memory"):
                c.fetch(6, timeout=T)  # the failure sticks: the migration cannot go on
        finally:
            c.close()
