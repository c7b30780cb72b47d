"""The simulated network: latency, bandwidth, loss and the transport's end-of-stream rules."""

from __future__ import annotations

import threading

import pytest

from fakekvm.fake.detprims import deterministic
from postcopy.simnet import sim_pair


def test_arrival_time_is_latency_plus_transmit_time() -> None:
    with deterministic(1, cost_ns=0) as s:
        a, b = sim_pair(s, latency_ns=100_000, bandwidth_Bps=1e9, seed=1)
        a.send([b"x" * 10_000])  # 10 us on the wire, 100 us of propagation
        buf = bytearray(20_000)
        t0 = s.now_ns
        assert b.recv_into(buf) == 10_000
        assert s.now_ns - t0 == 110_000
        assert bytes(buf[:10_000]) == b"x" * 10_000


def test_segments_queue_behind_each_other_and_partial_reads() -> None:
    with deterministic(2, cost_ns=0) as s:
        a, b = sim_pair(s, latency_ns=1_000, bandwidth_Bps=1e6, seed=2, mss=100)
        a.send([b"a" * 100, memoryview(b"b" * 100)])  # two segments, 100 us each
        buf = bytearray(150)
        n = b.recv_into(buf)  # only the first segment has arrived
        assert (n, s.now_ns) == (100, 101_000)
        assert b.recv_into(buf) == 100
        assert s.now_ns == 201_000
        assert bytes(buf[:100]) == b"b" * 100


def test_loss_delays_by_the_retransmit_timeout_deterministically() -> None:
    def run(seed: int) -> tuple[int, int]:
        with deterministic(seed, cost_ns=0) as s:
            a, b = sim_pair(
                s, latency_ns=1_000, bandwidth_Bps=1e9, loss=0.3, seed=seed, rto_ns=50_000
            )
            buf = bytearray(1 << 16)
            for _ in range(40):
                a.send([b"z" * 1000])
            got = 0
            while got < 40_000:
                got += b.recv_into(buf)
            return s.now_ns, a.stats.losses

    t1, lost1 = run(9)
    assert (t1, lost1) == run(9)
    assert lost1 > 0
    # every loss costs exactly one RTO; delivery is in order, so the last arrival is
    # the lossless one plus at least the RTOs of the last segment's own losses
    assert t1 >= 40 * 1_000 + 1_000
    others = {run(seed) for seed in range(10, 16)}
    assert len(others) >= 2


def test_timeout_is_virtual() -> None:
    with deterministic(3) as s:
        _, b = sim_pair(s, seed=3)
        t0 = s.now_ns
        with pytest.raises(TimeoutError):
            b.recv_into(bytearray(10), timeout=2.0)
        assert s.now_ns - t0 >= 2_000_000_000


def test_close_is_eof_after_the_data_and_breaks_the_peer() -> None:
    with deterministic(4) as s:
        a, b = sim_pair(s, seed=4)
        a.send([b"last words"])
        a.close()
        buf = bytearray(64)
        assert b.recv_into(buf) == 10
        assert b.recv_into(buf) == 0
        with pytest.raises(BrokenPipeError):
            a.send([b"more"])
        b.close()


def test_abort_resets_both_sides() -> None:
    with deterministic(5) as s:
        a, b = sim_pair(s, seed=5)
        a.send([b"lost"])
        a.abort()
        with pytest.raises(ConnectionResetError):
            b.recv_into(bytearray(8))
        with pytest.raises(ConnectionResetError):
            b.send([b"x"])


def test_a_blocked_receiver_is_woken_by_a_sender_thread() -> None:
    with deterministic(6) as s:
        a, b = sim_pair(s, latency_ns=5_000, seed=6)
        got = bytearray()

        def reader() -> None:
            buf = bytearray(4)
            while len(got) < 12:
                n = b.recv_into(buf)
                got.extend(buf[:n])

        th = threading.Thread(target=reader)
        th.start()
        for part in (b"abcd", b"efgh", b"ijkl"):
            a.send([part])
        th.join()
    assert bytes(got) == b"abcdefghijkl"


def test_send_buffer_backpressure_sleeps_in_virtual_time() -> None:
    with deterministic(7, cost_ns=0) as s:
        a, b = sim_pair(s, latency_ns=0, bandwidth_Bps=1e6, seed=7, sndbuf_bytes=1000)
        a.send([b"q" * 5000])  # 5 ms of transmit time queued: fits only after waiting
        assert s.now_ns == 0
        a.send([b"r" * 10])
        assert s.now_ns >= 4_000_000  # slept until the queue drained below 1000 B of time
        del b


def test_bad_parameters() -> None:
    with deterministic(8) as s:
        with pytest.raises(ValueError):
            sim_pair(s, loss=1.0)
        with pytest.raises(ValueError):
            sim_pair(s, bandwidth_Bps=0)
