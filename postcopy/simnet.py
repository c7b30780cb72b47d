"""A simulated network between source and destination, on the deterministic scheduler's clock.

:func:`sim_pair` returns two connected :class:`SimTransport` ends (the
:class:`~postcopy.transport.Transport` protocol) for a run under
:func:`fakekvm.fake.detprims.deterministic`. Each direction is a link with

* ``bandwidth_Bps``: a segment occupies the link ``len * 1e9 / bandwidth_Bps`` ns
  after the previous one (a FIFO, like a bottleneck queue);
* ``latency_ns``: one-way propagation delay added to every segment;
* ``loss``: each segment (at most ``mss`` bytes) is lost with this probability and
  retransmitted ``rto_ns`` later, again and again (TCP's RTO, RFC 6298); delivery
  stays in order, so a loss delays everything behind it (head-of-line blocking);
* a send buffer: a sender whose bytes would leave the link more than
  ``sndbuf_bytes`` worth of transmit time from now sleeps (virtual time) until they fit.

Loss draws come from ``random.Random(seed)``; sends are serialised by the
scheduler, so the draws — and every arrival time — are a function of the seeds.
A receiver blocks in the scheduler until the head segment's arrival time (the
scheduler jumps the clock there when nothing else can run) or its timeout
(:class:`TimeoutError`). ``close()`` sends a FIN that arrives after the data
(then ``recv_into`` returns 0); the peer's later sends fail with
:class:`BrokenPipeError`. ``abort()`` resets both directions at once
(:class:`ConnectionResetError` on both sides), like ``SO_LINGER`` 0.

Every ``send`` and ``recv_into`` is a scheduling point.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fakekvm.fake.detsched import DeterministicScheduler, _ns
from postcopy.transport import Buffer


@dataclass
class LinkStats:
    bytes: int = 0
    segments: int = 0
    losses: int = 0


class _Link:
    """One direction: segments in flight with their arrival times."""

    def __init__(
        self,
        sched: DeterministicScheduler,
        name: str,
        latency_ns: int,
        bandwidth_Bps: float,
        loss: float,
        rng: random.Random,
        rto_ns: int,
        mss: int,
        sndbuf_bytes: int,
    ) -> None:
        self.sched = sched
        self.name = name
        self.latency_ns = latency_ns
        self.bandwidth = float(bandwidth_Bps)
        self.loss = loss
        self.rng = rng
        self.rto_ns = rto_ns
        self.mss = mss
        self.max_queue_ns = int(sndbuf_bytes * 1e9 / self.bandwidth)
        self.segs: collections.deque[tuple[int, memoryview]] = collections.deque()
        self.busy_until = 0
        self.last_arrival = 0
        self.fin_at: int | None = None
        self.reader_gone = False
        self.reset = False
        self.stats = LinkStats()

    def __repr__(self) -> str:
        return f"<simulated link {self.name}>"

    def push(self, data: bytes) -> None:
        s = self.sched
        while self.busy_until - s.now_ns > self.max_queue_ns and not self.reset:
            s.sleep_until(self.busy_until - self.max_queue_ns, f"send buffer of {self.name}")
        mv = memoryview(data)
        for off in range(0, len(mv), self.mss):
            seg = mv[off : off + self.mss]
            start = max(s.now_ns, self.busy_until)
            self.busy_until = start + max(1, int(len(seg) * 1e9 / self.bandwidth))
            arrival = self.busy_until + self.latency_ns
            while self.loss and self.rng.random() < self.loss:
                arrival += self.rto_ns
                self.stats.losses += 1
            arrival = max(arrival, self.last_arrival)
            self.last_arrival = arrival
            self.segs.append((arrival, seg))
            self.stats.segments += 1
        self.stats.bytes += len(mv)
        s.wake_obj(self)

    def fin(self) -> None:
        s = self.sched
        if self.fin_at is None:
            self.fin_at = max(
                s.now_ns + self.latency_ns, self.busy_until + self.latency_ns, self.last_arrival
            )
        s.wake_obj(self)


class SimTransport:
    """One end of a simulated connection (see the module docstring)."""

    def __init__(self, sched: DeterministicScheduler, tx: _Link, rx: _Link) -> None:
        self.sched = sched
        self._tx = tx
        self._rx = rx

    @property
    def stats(self) -> LinkStats:
        """What this end sent."""
        return self._tx.stats

    def send(self, parts: Sequence[Buffer]) -> None:
        tx = self._tx
        self.sched.point("net send")
        if tx.reset:
            raise ConnectionResetError(f"{tx.name}: connection reset by peer")
        if tx.reader_gone or tx.fin_at is not None:
            raise BrokenPipeError(f"{tx.name}: connection closed")
        data = b"".join(bytes(p) for p in parts)
        if data:
            tx.push(data)

    def recv_into(self, buf: memoryview | bytearray, timeout: float | None = None) -> int:
        rx = self._rx
        s = self.sched
        s.point("net recv")
        out = memoryview(buf).cast("B")
        deadline = None if timeout is None else s.now_ns + _ns(timeout)
        while True:
            if rx.reset:
                raise ConnectionResetError(f"{rx.name}: connection reset by peer")
            now = s.now_ns
            segs = rx.segs
            if segs and segs[0][0] <= now:
                n = 0
                while segs and segs[0][0] <= now and n < len(out):
                    t, c = segs[0]
                    k = min(len(c), len(out) - n)
                    out[n : n + k] = c[:k]
                    n += k
                    if k == len(c):
                        segs.popleft()
                    else:
                        segs[0] = (t, c[k:])
                return n
            if not segs and (rx.reader_gone or (rx.fin_at is not None and rx.fin_at <= now)):
                return 0
            wake_at = segs[0][0] if segs else rx.fin_at
            if deadline is not None:
                if now >= deadline:
                    raise TimeoutError(f"{rx.name}: nothing received in {timeout} s")
                wake_at = deadline if wake_at is None else min(wake_at, deadline)
            s.block_on(rx, wake_at, f"receive on {rx.name}")

    def close(self) -> None:
        self._tx.fin()
        self._rx.reader_gone = True
        self.sched.wake_obj(self._rx)

    def abort(self) -> None:
        for link in (self._tx, self._rx):
            link.reset = True
            link.segs.clear()
            self.sched.wake_obj(link)


def sim_pair(
    sched: DeterministicScheduler,
    latency_ns: int = 50_000,
    bandwidth_Bps: float = 1.25e9,
    loss: float = 0.0,
    seed: int = 0,
    *,
    rto_ns: int | None = None,
    mss: int = 64 << 10,
    sndbuf_bytes: int = 4 << 20,
    name: str = "sim",
) -> tuple[SimTransport, SimTransport]:
    """Two connected ends ``(a, b)``: what ``a`` sends ``b`` receives and back."""
    if not 0.0 <= loss < 1.0:
        raise ValueError(f"loss must be in [0, 1): {loss}")
    if bandwidth_Bps <= 0 or latency_ns < 0:
        raise ValueError("bandwidth must be positive and latency not negative")
    rng = random.Random(seed)
    rto = rto_ns if rto_ns is not None else max(4 * latency_ns, 1_000_000)
    ab = _Link(sched, f"{name} a->b", latency_ns, bandwidth_Bps, loss, rng, rto, mss, sndbuf_bytes)
    ba = _Link(sched, f"{name} b->a", latency_ns, bandwidth_Bps, loss, rng, rto, mss, sndbuf_bytes)
    return SimTransport(sched, ab, ba), SimTransport(sched, ba, ab)
