"""Benchmarks (pytest-benchmark; disabled by default, so each runs once as a test).

Run them with ``python -m pytest tests/postcopy/test_postcopy_bench.py --benchmark-enable``.
Each engine figure has a raw-socket baseline in the same process and the same
group, so the comparison holds on a noisy machine:

* ``bulk``: 64 MiB over loopback TCP and over a Unix socket into a pre-touched
  buffer — ``sendall`` of 1 MiB slices against the Source's bulk channel (PAGES
  frames of 1024 pages), connection set-up and handshake included;
* ``demand``: one 4 KiB page on request — a 16-byte request answered with 4 KiB
  on a TCP_NODELAY socket against ``FetchClient.fetch`` of one page.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postcopy.client import FetchClient
from postcopy.source import Source

PS = 4096
SIZE = 64 << 20
NR = SIZE // PS


@pytest.fixture(scope="module")
def memory() -> bytearray:
    return bytearray(os.urandom(SIZE))


@pytest.fixture
def target() -> bytearray:
    return bytearray(b"\x01") * SIZE  # touched: no first-touch faults inside the timing


def _tcp_pair(nodelay: bool) -> tuple[socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    b = socket.create_connection(ls.getsockname())
    a, _ = ls.accept()
    ls.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
    return a, b


def _pps(benchmark: Any, pages: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["pages_per_s"] = round(pages / stats.stats.median)


def _tail(benchmark: Any) -> None:
    stats = getattr(benchmark, "stats", None)
    data = sorted(getattr(getattr(stats, "stats", None), "data", None) or [])
    if data:
        benchmark.extra_info["p50_us"] = round(data[len(data) // 2] * 1e6, 1)
        benchmark.extra_info["p99_us"] = round(
            data[min(len(data) - 1, len(data) * 99 // 100)] * 1e6, 1
        )


@pytest.mark.benchmark(group="bulk")
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_bench_bulk_raw_socket(
    benchmark: Any, memory: bytearray, target: bytearray, kind: str
) -> None:
    def run() -> None:
        a, b = _tcp_pair(nodelay=False) if kind == "tcp" else socket.socketpair()

        def send() -> None:
            mv = memoryview(memory)
            for off in range(0, SIZE, 1 << 20):
                a.sendall(mv[off : off + (1 << 20)])
            a.close()

        th = threading.Thread(target=send)
        th.start()
        mv = memoryview(target)
        got = 0
        while got < SIZE:
            n = b.recv_into(mv[got:])
            assert n
            got += n
        b.close()
        th.join()

    benchmark.pedantic(run, rounds=5, iterations=1)
    _pps(benchmark, NR)
    assert target == memory


@pytest.mark.benchmark(group="bulk")
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_bench_bulk_engine(
    benchmark: Any, memory: bytearray, target: bytearray, kind: str, tmp_path: Path
) -> None:
    def run() -> None:
        src = Source(memory)  # batch_pages=1024: 4 MiB PAGES frames
        c = FetchClient.connect(
            src.listen(None if kind == "tcp" else str(tmp_path / "b.sock")), sink=target
        )
        c.wait_complete(60)
        c.finish(60)
        assert src.wait(60) and src.result == "done"

    benchmark.pedantic(run, rounds=5, iterations=1)
    _pps(benchmark, NR)
    assert target == memory


@pytest.fixture
def raw_server() -> Iterator[socket.socket]:
    a, b = _tcp_pair(nodelay=True)

    def serve() -> None:
        req = bytearray(16)
        page = bytes(PS)
        while a.recv_into(req):
            a.sendall(page)
        a.close()

    th = threading.Thread(target=serve)
    th.start()
    yield b
    b.close()
    th.join()


@pytest.mark.benchmark(group="demand")
def test_bench_demand_raw_socket(benchmark: Any, raw_server: socket.socket) -> None:
    buf = bytearray(PS)
    mv = memoryview(buf)

    def one() -> int:
        raw_server.sendall(b"r" * 16)
        got = 0
        while got < PS:
            got += raw_server.recv_into(mv[got:])
        return got

    assert benchmark.pedantic(one, rounds=3000, iterations=1, warmup_rounds=50) == PS
    _tail(benchmark)


@pytest.mark.benchmark(group="demand")
def test_bench_demand_engine(benchmark: Any, memory: bytearray) -> None:
    src = Source(memory)
    c = FetchClient.connect(src.listen(), bulk=False)
    pages = iter(range(NR))

    def one() -> int:
        page = next(pages)
        c.fetch(page, timeout=60)
        return page

    try:
        last = benchmark.pedantic(one, rounds=3000, iterations=1, warmup_rounds=50)
        _tail(benchmark)
        assert c.memory[last * PS : (last + 1) * PS] == memory[last * PS : (last + 1) * PS]
        assert c.pages_demand >= 1 and c.pages_background == 0
    finally:
        c.close()
        src.close()


@pytest.mark.benchmark(group="demand")
def test_bench_demand_engine_during_bulk(benchmark: Any) -> None:
    """A demand page while the bulk channel streams (QEMU's postcopy-preempt case):
    the reply must not queue behind bulk data."""
    size = 256 << 20
    mem = bytearray(os.urandom(size))
    src = Source(mem)
    c = FetchClient.connect(src.listen(), sink=bytearray(b"\x01") * size)
    nr = size // PS
    pages = iter(range(nr - 1, 0, -97))  # from the end: the bulk stream starts at 0

    def one() -> int:
        page = next(pages)
        c.fetch(page, timeout=60)
        return page

    try:
        benchmark.pedantic(one, rounds=200, iterations=1)
        _tail(benchmark)
        during = not c.background_done
        benchmark.extra_info["bulk_still_running_at_end"] = during
        assert c.pages_demand >= 1
        c.wait_complete(60)
        assert c.memory == mem
        c.finish(60)
    finally:
        c.close()
        src.close()
